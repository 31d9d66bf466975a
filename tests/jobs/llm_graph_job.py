"""The decoder's fast paths against transformers: ggml ranks' whole-block graphs past the K/V
cache's first capacity, 16-bit weights on every backend, and the decode profile.

Run: mpiexec -n N python -m cmatrix run tests/jobs/llm_graph_job.py WORKDIR '["ggml", ...]'
Checks (within 1e-4 unless said): a 250-token prefill, then 12 decode steps that cross the
ggml cache's growth from 256 to 512 positions, then a restart at position 100; float16 and
bfloat16 weights against a reference whose weights were rounded the same way (ggml ranks also
round the activations to the weight type: a bound relative to the largest logit); the
profile of 5 decode steps on every rank. Prints "graph: K checks, 0 failures on N ranks".
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

import cmatrix as cm

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "jobs"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from tally import Tally  # noqa: E402
from tiny_llama import build  # noqa: E402

work = Path(sys.argv[1])
names = json.loads(sys.argv[2])
cl = cm.init(backends=names)
t = Tally("graph")
TOL = 1e-4
GGML_REL = {"float16": 0.01, "bfloat16": 0.05}  # of the largest logit, when a ggml rank holds weights

path = build(work / "llama", model_type="llama", vocab_size=96, hidden_size=64, intermediate_size=96,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, scale=4.0,
             tokenizer=False, max_position_embeddings=600, seed=cl.size)
ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
ids = [int(i) for i in np.random.default_rng(7).integers(0, 96, 262)]
with torch.no_grad():
    want = ref(torch.tensor([ids])).logits[0].numpy()

model = cm.llm.load(cl, path)
got = model.forward(ids[:250], start=0, all_logits=True)
err = float(np.abs(got - want[:250]).max())
t.check("prefill 250", err <= TOL, f"max error {err:.2e}")
errs = [float(np.abs(model.forward([tok]) - want[250 + i]).max()) for i, tok in enumerate(ids[250:])]
t.check("decode 250..261 (the cache grows at 256)", max(errs) <= TOL, f"max error {max(errs):.2e}")
again = model.forward(ids[100:110], start=100, all_logits=True)
t.check("restart at 100", np.abs(again - want[100:110]).max() <= TOL,
        f"max error {np.abs(again - want[100:110]).max():.2e}")

model.profile(True)
model.forward([3], start=0)  # a prefill of one token is a decode-shaped step too
for tok in (5, 9, 11, 13):
    model.forward([tok])
reports = model.profile(False)
kinds = [r.get("decoder") for r in reports]
backends = [r.backend for r in cl.ranks]
expected = ["ggml graphs" if b == "ggml" else f"numpy+{b}" for b in backends]
t.check("profile on every rank", [r["steps"] for r in reports] == [5] * cl.size and kinds == expected,
        f"steps {[r['steps'] for r in reports]}, decoders {kinds}")
phases = [sum(r["phases"].values()) for r in reports]
t.check("profile phases add up to the step time", all(
    abs(p - r["ms_per_token"]) <= 0.01 * r["ms_per_token"] + 1e-6 and r["phases"]["matmul"] > 0
    for p, r in zip(phases, reports, strict=True)), f"{reports}")
model.close()

ggml_holds = "ggml" in backends
for dtype, torch_type in (("float16", torch.float16), ("bfloat16", torch.bfloat16)):
    rounded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in rounded.named_parameters():
            if name.endswith("proj.weight") or name == "lm_head.weight":
                p.copy_(p.to(torch_type).to(torch.float32))
        want16 = rounded(torch.tensor([ids[:40]])).logits[0].numpy()
    m = cm.llm.load(cl, path, dtype=dtype)
    got = m.forward(ids[:40], start=0, all_logits=True)
    err, scale = float(np.abs(got - want16).max()), float(np.abs(want16).max())
    bound = GGML_REL[dtype] * scale if ggml_holds else TOL
    t.check(f"{dtype} weights", err <= bound, f"max error {err:.2e} (bound {bound:.2e})")
    m.close()

t.finish(cl.size)

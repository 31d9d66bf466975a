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
import os
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
other = ids[:100] + [(i * 7 + 3) % 96 for i in range(10)]  # new tokens from position 100 on
with torch.no_grad():
    want_other = ref(torch.tensor([other])).logits[0, 100:].numpy()
again = model.forward(other[100:], start=100, all_logits=True)
err = float(np.abs(again - want_other).max())
t.check("restart at 100 with other tokens", err <= TOL, f"max error {err:.2e}")

# a numpy or CPU torch rank's graphs multiply the backend's own arrays: nothing is copied
mine = cl.driver.runtime.models[model._id]
if mine.kind.startswith("ggml on "):
    blocks = [blk for parts in mine.blocks[0] for blk in parts.values()] + [mine.blocks[1]]
    own = {blk.handle.ctypes.data if isinstance(blk.handle, np.ndarray) else blk.handle.data_ptr()
           for blk in blocks if not blk.empty}
    seen = {b.array.ctypes.data for b in mine._borrowed}
    t.check("weights borrowed, not copied", seen == own and len(mine._borrowed) == len(own),
            f"{len(seen & own)} of {len(own)} blocks used in place")

model.profile(True)
model.forward([3], start=0)  # a prefill of one token is a decode-shaped step too
model.forward([5, 9, 11], start=0)  # a prefill of three: not profiled (its phases would leak)
for tok in (5, 9, 11, 13):
    model.forward([tok])
reports = model.profile(False)
kinds = [r.get("decoder") for r in reports]
backends = [r.backend for r in cl.ranks]
paths = {"ggml": "ggml graphs", "numpy": "ggml on numpy", "torch": "ggml on torch"}
if os.environ.get("CMATRIX_DECODER") == "torch":
    paths["torch"] = "torch cpu"
expected = [paths.get(b, f"numpy+{b}") for b in backends]
t.check("profile on every rank", [r["steps"] for r in reports] == [5] * cl.size and kinds == expected,
        f"steps {[r['steps'] for r in reports]}, decoders {kinds}")
phases = [sum(r["phases"].values()) for r in reports]
t.check("profile phases add up to the step time", all(
    abs(p - r["ms_per_token"]) <= 0.01 * r["ms_per_token"] + 1e-6 and r["phases"]["matmul"] > 0
    for p, r in zip(phases, reports, strict=True)), f"{reports}")
model.close()

ggml_holds = any(k in ("ggml graphs", "ggml on torch") for k in kinds)  # ggml multiplies 16-bit weights
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
    part = cl.driver.runtime.models[m._id]
    if part.kind == "ggml on torch":  # a CPU torch rank keeps 16-bit weights, and ggml uses them in place
        blocks = [blk for parts in part.blocks[0] for blk in parts.values()] + [part.blocks[1]]
        held = [blk.handle for blk in blocks if not blk.empty]
        t.check(f"{dtype} kept 16-bit on CPU torch and borrowed",
                all(h.dtype == torch_type for h in held)
                and {b.array.ctypes.data for b in part._borrowed} == {h.data_ptr() for h in held}
                and all(b.array.itemsize == 2 for b in part._borrowed),
                f"{[h.dtype for h in held][:3]}, {len(part._borrowed)} borrowed")
    m.close()

if cl.size > 1:  # 16-bit partial sums between ranks (one rank sends nothing)
    def decode(m):
        logits = m.forward(ids[:40], start=0, all_logits=True)
        return logits, m.generate(token_ids=ids[:8], max_new_tokens=6, stop_token_ids=[])

    m = cm.llm.load(cl, path)
    want32, run32 = decode(m)
    m.close()
    for wire in ("float16", "bfloat16"):
        m = cm.llm.load(cl, path, wire=wire)
        got, run16 = decode(m)
        m.close()
        err, scale = float(np.abs(got - want32).max()), float(np.abs(want32).max())
        # each of the 2 sums per layer sends (hidden + 1 flag) values per rank in 2 bytes, not 4
        saved = 2 * 2 * (64 + 1) * 2 * (cl.size - 1)
        fewer = run32.bytes_per_token - run16.bytes_per_token
        t.check(f"wire {wire}", err <= 0.02 * scale and fewer == saved,
                f"max error {err:.2e} at scale {scale:.1f}; {run16.bytes_per_token:.0f} vs "
                f"{run32.bytes_per_token:.0f} bytes/token, expected {saved} fewer")
    # partial sums beyond float16's range travel again in float32 rather than turn into inf
    import shutil

    from safetensors.numpy import load_file, save_file

    big = work / "big"
    shutil.copytree(path, big, dirs_exist_ok=True)
    tensors = load_file(big / "model.safetensors")
    for name in ("model.layers.0.self_attn.o_proj.weight", "model.layers.0.mlp.down_proj.weight"):
        tensors[name] = tensors[name] * np.float32(1e6)
    save_file(tensors, big / "model.safetensors", metadata={"format": "pt"})
    logits = {}
    for wire in ("float32", "float16"):
        m = cm.llm.load(cl, big, wire=wire)
        logits[wire] = m.forward(ids[:20], start=0, all_logits=True)
        m.close()
    err = float(np.abs(logits["float16"] - logits["float32"]).max())
    t.check("wire float16 beyond its range", np.isfinite(logits["float16"]).all() and
            err <= 0.02 * float(np.abs(logits["float32"]).max()), f"max error {err:.2e}")

t.finish(cl.size)

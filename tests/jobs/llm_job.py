"""cmatrix.llm against transformers on random tiny Llama-family checkpoints.

Run: mpiexec -n N python -m cmatrix run tests/jobs/llm_job.py WORKDIR '[w0, ...]' ['["numpy", ...]'] [quant]
Checks: logits of a prompt (every position) within 1e-4; the K/V cache over prefill +
decode and after restarting mid-sequence; 32 greedy steps token-identical; with quant,
the logits of a reference whose weights were rounded the same way. Prints
"llm: K checks, 0 failures on N ranks"; exits non-zero on a mismatch.
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

import cmatrix as cm
from cmatrix.core import quant as qz

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "jobs"))
from tiny_llama import build  # noqa: E402

work = Path(sys.argv[1])
weights = json.loads(sys.argv[2])
names = json.loads(sys.argv[3]) if len(sys.argv) > 3 and sys.argv[3] != "null" else None
quant = sys.argv[4] if len(sys.argv) > 4 else None
cl = cm.init(weights=weights, backends=names)
# LLM_JOB_PARALLEL=pp: pipeline stages (on one host, one per rank), over 4 layers
parallel = os.environ.get("LLM_JOB_PARALLEL", "auto")
TOL = 1e-4
# ggml's quantised matmul also rounds the activations to 8-bit blocks: ranks whose blocks
# ggml multiplies (ggml ranks, and the ggml graphs of numpy and CPU torch ranks) are compared
# with a looser bound, relative to the largest logit (see README, "Quantised weights").
GGML_REL = {"q8_0": 0.05, "q4_0": 0.05}
checks, failures = 0, []
common = dict(vocab_size=96, hidden_size=64, intermediate_size=96,
              num_hidden_layers=4 if parallel == "pp" else 2,
              scale=2.0 if quant else 8.0,
              tokenizer=False, max_position_embeddings=128)
variants = {
    # GQA with Llama 3.1 rope scaling
    "llama3": dict(model_type="llama", num_attention_heads=8, num_key_value_heads=4,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    # q/k/v biases, tied embeddings
    "qwen2": dict(model_type="qwen2", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    # sliding window shorter than the prompt
    "mistral": dict(model_type="mistral", num_attention_heads=4, num_key_value_heads=1, sliding_window=5),
}
if quant:  # a rank's attention output must be whole 32-value blocks: 2 query heads of 16 per group
    variants = {"llama-quant": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=2)}


def check(label: str, ok: bool, detail: str) -> None:
    global checks
    checks += 1
    print(f"{'ok  ' if ok else 'FAIL'} {label}: {detail}")
    if not ok:
        failures.append(label)


def logits_of(ref, ids):
    with torch.no_grad():
        return ref(torch.tensor([ids])).logits[0].numpy()


rng = np.random.default_rng(cl.size)
for label, settings in variants.items():
    path = build(work / label, seed=cl.size, **common, **settings)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if quant:  # the same rounding of every weight matrix the ranks use (32-blocks along the input)
        with torch.no_grad():
            for name, p in ref.named_parameters():
                if name.endswith("proj.weight") or name == "lm_head.weight":
                    p.copy_(torch.from_numpy(qz.roundtrip(p.numpy(), quant, 1)))
    model = cm.llm.load(cl, path, quant=quant, parallel=parallel)
    if parallel == "pp":
        try:  # re-planning re-splits a tensor-parallel model: refused before anything moves
            model.replan(cl.weights)
            refused = ""
        except cm.InputError as exc:
            refused = str(exc)
        check(f"{label} in stages", model.stages is not None and len(model.stages) == len(
            [w for w in cl.weights[1:] if w > 0]) + 1 and "pipeline stages" in refused,
            f"{model.layout_note}; replan: {refused or 'not refused'}")
    ggml_holds = quant is not None and any(
        "ggml" in kind and w > 0 for kind, w in zip(model.decoders, cl.weights, strict=True))
    groups = [r["kv_groups"] for r in model.layout()]
    ids = [int(t) for t in rng.integers(0, 96, 12)]
    want = logits_of(ref, ids)
    scale = float(np.abs(want).max())
    got = model.forward(ids, start=0, all_logits=True)
    err = float(np.abs(got - want).max())
    if ggml_holds:
        check(f"{label} {quant} on ggml", err <= GGML_REL[quant] * scale,
              f"max error {err:.2e} at logit scale {scale:.1f} (bound {GGML_REL[quant]} of it)")
        rel = float(np.abs(got - logits_of(AutoModelForCausalLM.from_pretrained(path).eval(), ids)).max())
        print(f"info {label} {quant} vs float weights: max error / logit scale = {rel / scale:.3e}")
        continue
    check(f"{label} prefill", err <= TOL, f"max error {err:.2e} at logit scale {scale:.1f}, groups {groups}")

    model.forward(ids[:5], start=0)
    errs = [float(np.abs(model.forward([t]) - want[5 + i]).max()) for i, t in enumerate(ids[5:])]
    check(f"{label} prefill 5 + decode 7", max(errs) <= TOL, f"max error {max(errs):.2e}")
    again = model.forward(ids[3:8], start=3, all_logits=True)  # rewrite the cache from position 3
    err = float(np.abs(again - want[3:8]).max())
    check(f"{label} restart at position 3", err <= TOL, f"max error {err:.2e}")

    prompt = ids[:4]
    result = model.generate(token_ids=prompt, max_new_tokens=32, stop_token_ids=[])
    seq = list(prompt)
    for _ in range(32):
        seq.append(int(np.argmax(logits_of(ref, seq)[-1])))
    check(f"{label} greedy 32", result.token_ids == seq[4:],
          f"{result.token_ids[:8]}... vs transformers {seq[4:12]}...")
    if quant:
        plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        rel = float(np.abs(got - logits_of(plain, ids)).max()) / scale
        print(f"info {label} {quant} vs float weights: max error / logit scale = {rel:.3e}")
    model.close()

print(f"llm: {checks} checks, {len(failures)} failures on {cl.size} ranks")
sys.exit(1 if failures else 0)

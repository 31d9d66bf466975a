"""A rank fails while the decoder loads or runs (CMATRIX_FAULT); the driver gets a RankError
naming that rank and phase, and the model keeps working: the same logits as before. Ranks
1 and 2 run ggml (whole-block graphs), rank 0 numpy.

Run: CMATRIX_FAULT=llm_load:load:2,llm_step:attention:1,... mpiexec -n 3 python -m cmatrix run
     tests/jobs/llm_fault.py WORKDIR
(``LLM_FAULT_WEIGHTS=0.5,0,0.5``: other shares, e.g. one that leaves a rank out of the steps;
``LLM_FAULT_PARALLEL=pp``: in pipeline stages, one per rank, over 4 layers.)
"""

import os
import sys
from pathlib import Path

import numpy as np

import cmatrix as cm

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "jobs"))
from tiny_llama import build  # noqa: E402

size = int(os.environ.get("PMI_SIZE") or os.environ.get("OMPI_COMM_WORLD_SIZE") or 1)
shares = os.environ.get("LLM_FAULT_WEIGHTS")  # e.g. "0.5,0,0.5": rank 1 stays out of the steps
cl = cm.init(weights=[float(w) for w in shares.split(",")] if shares else [0.4, 0.3, 0.3][:size] if size == 3
             else None, backends=["numpy", "ggml", "ggml"][:size])
parallel = os.environ.get("LLM_FAULT_PARALLEL", "auto")
path = build(Path(sys.argv[1]) / "tiny", vocab_size=64, hidden_size=32, intermediate_size=64,
             num_hidden_layers=4 if parallel == "pp" else 2, num_attention_heads=4, num_key_value_heads=2,
             tokenizer=False, scale=4.0)
specs = [s.split(":") for s in os.environ["CMATRIX_FAULT"].split(",")]
model = None
if any(op == "llm_load" for op, *_ in specs):
    try:
        cm.llm.load(cl, path, parallel=parallel)
    except cm.RankError as err:
        print("CAUGHT", err.failures[0].headline())
    else:
        sys.exit("llm_load: no error was raised")
model = cm.llm.load(cl, path, parallel=parallel)
ids = [3, 1, 4, 1, 5, 9, 2, 6]
for op, phase, rank, *_ in specs:
    if op != "llm_step":
        continue
    try:
        model.forward(ids, start=0)
    except cm.RankError as err:
        f = err.failures[0]
        assert err.ranks == [int(rank)] and f.phase == phase and f.backend == cl.ranks[int(rank)].backend, f
        assert "InjectedFault" in f.traceback, f.traceback
        print("CAUGHT", f.headline())
    else:
        sys.exit(f"{phase}: no error was raised")
clean = model.forward(ids, start=0, all_logits=True)
model.forward(ids[:5], start=0)
steps = np.stack([model.forward([t]) for t in ids[5:]])
assert np.allclose(steps, clean[5:], atol=1e-5), np.abs(steps - clean[5:]).max()
print("RECOVERED")

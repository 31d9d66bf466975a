"""Generate text with a Llama-family model across the cluster (the CLI's `generate`, from Python).

    mpirun -n 2 python -m cmatrix run jobs/llm_generate.py --model DIR --prompt "..." \\
        [--weights 0.6,0.4] [--backends torch,ggml] [--quant q4_0] [--cache save]
    make demo-llm [MODEL=DIR]

Without --model it first builds a small random-weight Llama checkpoint (with a
tokenizer trained on the README) in a temporary folder, so it runs on a fresh
machine: the text is nonsense, everything around it is real. The answer streams
to stdout; the speed (prefill and decode tokens/s, bytes moved per token) goes to stderr.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import cmatrix as cm
from cmatrix.llm.run import add_arguments, parse_list, parse_weights, run

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
add_arguments(ap, model_required=False)
ns = ap.parse_args()
cl = cm.init(weights=parse_weights(ns.weights), backends=parse_list(ns.backends, str))
with tempfile.TemporaryDirectory(prefix="cmatrix-demo-llm-") as tmp:
    if ns.model is None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from tiny_llama import build

        ns.model = str(build(Path(tmp) / "tiny-llama", seed=0, scale=4.0))
        print(f"cmatrix: no --model given; built a random-weight Llama in {ns.model}", file=sys.stderr)
    status = run(cl, ns)
sys.exit(status)

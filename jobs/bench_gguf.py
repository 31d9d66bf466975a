"""GGUF files in cmatrix against llama.cpp's own loader on the same files, same run.

    python jobs/bench_gguf.py [--dir DIR] [--types f32,f16,q8_0,q4_0,q4_k_m] [--ranks 2]

A random-weight Llama with a real byte-level BPE vocabulary (jobs/tiny_llama.py: hidden
512, 6 layers, vocab 1024) is written as GGUF by jobs/gguf_export.py (f32, f16) and quantised
by llama.cpp itself (q8_0, q4_0: every matrix that type; q4_k_m: llama.cpp's own mix of Q4_K,
Q6_K and fallbacks). For each file:

- llama.cpp (llama-cpp-python in the benchmark's environment `.venv-bench`, see
  jobs/bench_llm.py) tokenizes a few texts and returns the logits of every position of the
  first one;
- cmatrix on --ranks ranks (numpy backend; the LLM's ggml graphs borrow the ranks' blocks)
  loads the same file, tokenizes the same texts with the file's vocabulary and returns its logits.

Reported per file: what cmatrix stores, its load time, the largest logit difference relative
to the largest logit, the positions whose top token agrees, and whether every text was
tokenized alike.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_llm import bench_python, ensure_gguf  # noqa: E402

MODEL = dict(vocab_size=1024, hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
             num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024)
TYPES = ("f32", "f16", "q8_0", "q4_0", "q4_k_m", "q4_k_m:q8_0")  # FILE[:what cmatrix converts it to]
TEXTS = ["Old computers, together, run models no single one of them can hold.",
         "  Two leading spaces, digits 1234567 and ünïcode: ça va? 😀",
         "<s>A special token inside</s> the text."]
TIMEOUT = 1800


def llama_cpp_part(gguf: str, out: str) -> None:
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(gguf, n_ctx=256, n_threads=os.cpu_count() or 1, logits_all=True, verbose=False)
    tokens = [llm.tokenize(t.encode(), add_bos=True, special=True) for t in TEXTS]
    llm.eval(tokens[0])
    logits = np.array(llm.scores[: len(tokens[0])], dtype=np.float32)
    np.save(out + ".npy", logits)
    Path(out + ".json").write_text(json.dumps({"tokens": tokens}))


def cmatrix_part(gguf: str, out: str, quant: str) -> None:
    import numpy as np

    import cmatrix as cm

    cl = cm.init(backends="numpy")
    t = time.perf_counter()
    model = cm.llm.load(cl, gguf, quant=quant or None)
    load = time.perf_counter() - t
    tokens = [model.tokenizer.encode(text) for text in TEXTS]
    logits = model.forward(tokens[0], start=0, all_logits=True)
    np.save(out + ".npy", logits.astype(np.float32))
    Path(out + ".json").write_text(json.dumps({
        "tokens": tokens, "load_s": load, "stored": model.quant or model.dtype,
        "note": model.conversion_note, "decoders": model.decoders}))
    model.close()


def run(argv: list[str], env: dict | None, what: str) -> None:
    print(f"  {what} ...", flush=True)
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    if proc.returncode:
        raise SystemExit(f"{what} failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")


def quantise(python: Path, path: Path, kind: str) -> Path:
    """q4_k_m as llama.cpp makes it (its own mix of K-quants); other kinds as bench_llm makes them."""
    if kind != "q4_k_m":
        return ensure_gguf(python, path, kind)
    out = path / "model-q4_k_m.gguf"
    if out.exists() and out.stat().st_mtime >= (path / "model.safetensors").stat().st_mtime:
        return out
    src = ensure_gguf(python, path, "f32")
    code = ("import sys, llama_cpp as l\n"
            "p = l.llama_model_quantize_default_params()\n"
            f"p.ftype = 15; p.nthread = {os.cpu_count() or 1}\n"  # LLAMA_FTYPE_MOSTLY_Q4_K_M
            "sys.exit(l.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))\n")
    subprocess.run([str(python), "-c", code, str(src), str(out)], check=True, capture_output=True,
                   timeout=TIMEOUT)
    return out


def main(args: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/cmatrix-bench-gguf")
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--llama-cpp-part", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--cmatrix-part", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args(args)
    if a.llama_cpp_part:
        llama_cpp_part(*a.llama_cpp_part)
        return 0
    if a.cmatrix_part:
        cmatrix_part(*a.cmatrix_part)
        return 0
    import numpy as np

    from cmatrix.engine import launch

    path = Path(a.dir)
    cfg = path / "config.json"
    if not (cfg.exists() and (path / "tokenizer.json").exists()
            and all(json.loads(cfg.read_text()).get(k) == v for k, v in MODEL.items())):
        from tiny_llama import build

        for old in path.glob("*.gguf"):
            old.unlink()
        build(path, model_type="llama", seed=0, scale=2.0, **MODEL)
        print(f"built {path}")
    python = bench_python()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CMATRIX_THREADS": "1"}
    rows, ref_f32 = [], None
    for entry in a.types.split(","):
        kind, _, quant = entry.partition(":")
        file = quantise(python, path, kind)
        ref, mine = path / f"llama-{kind}", path / f"cmatrix-{kind}-{quant}"
        if not Path(f"{ref}.npy").exists() or Path(f"{ref}.npy").stat().st_mtime < file.stat().st_mtime:
            run([str(python), __file__, "--llama-cpp-part", str(file), str(ref)], None,
                f"llama.cpp on {file.name}")
        run(launch.command(a.ranks, [sys.executable, __file__, "--cmatrix-part", str(file), str(mine), quant],
                           None), env, f"cmatrix, {a.ranks} ranks, on {file.name}")
        want, got = np.load(f"{ref}.npy"), np.load(f"{mine}.npy")
        if kind == "f32":
            ref_f32 = want
        info = json.loads(Path(f"{mine}.json").read_text())
        ref_tokens = json.loads(Path(f"{ref}.json").read_text())
        scale = float(np.abs(want).max())
        rows.append((entry, info["stored"] or "float32", info["load_s"],
                     float(np.abs(got - want).max()) / scale,
                     float(np.abs(want - ref_f32).max()) / scale if ref_f32 is not None else float("nan"),
                     int((got.argmax(1) == want.argmax(1)).sum()), len(want),
                     info["tokens"] == ref_tokens["tokens"], info["note"]))
    print(f"\nGGUF in cmatrix ({a.ranks} ranks, numpy backend) against llama.cpp on the same file "
          "(logits relative to the largest;\n"
          "'quantisation': llama.cpp on this file against llama.cpp on f32):")
    print(f"{'file':12} {'cmatrix stores':>15} {'load s':>7} {'cmatrix vs llama.cpp':>21} "
          f"{'quantisation':>13} {'top-1 agree':>12} {'tokens alike':>13}")
    for entry, stored, load, diff, quant_effect, agree, n, same, _ in rows:
        print(f"{entry:12} {stored:>15} {load:7.2f} {diff:21.2e} {quant_effect:13.2e} {f'{agree}/{n}':>12} "
              f"{str(same):>13}")
    for row in rows:
        if row[-1]:
            print(f"note ({row[0]}): {row[-1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

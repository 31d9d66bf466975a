"""LLM decode: cmatrix on 1 and 2 ranks against llama.cpp on the same cores, same run.

    python jobs/bench_llm.py [--types f32,f16,q8_0,q4_0] [--tokens 32] [--dir DIR] [--small]
                             [--backend ggml] [--no-llama-cpp]

A random-weight Llama of TinyLlama-1.1B's shape (hidden 2048, 22 layers, 32 heads, 4 KV
heads, intermediate 5632, vocab 32000; 4.4 GB as float32; --small: a tiny one for a smoke
test) is built once into --dir (default /tmp/cmatrix-bench-llm, reused while its
config matches). For every weight type it measures, one part at a time:

- llama.cpp through llama-cpp-python, 1 process x every core, in the benchmark's own
  environment `.venv-bench` (made on first use: llama-cpp-python is compiled there for
  this machine, a few minutes once; pip keeps the wheel). The model is the same folder
  written as GGUF by jobs/gguf_export.py (f32, f16) and quantised by llama.cpp itself
  (q8_0, q4_0: every weight matrix that type, the output too; token embeddings float32,
  as in cmatrix);
- cmatrix on 1 rank and on 2 ranks x 1 thread (default backend ggml: its ranks run each
  block as one ggml graph), the same weights in the same type (`dtype=` / `quant=`);
- the fixed cost per layer: a 22-layer decoder of tiny matrices on 1 and 2 ranks.

distributed-llama is not measured: it has no source package in the package registry, so
this environment cannot build it (the README says how it compared when built by hand).
Reported: decode tokens/s and ms/token (median of the decode steps), KiB moved between
ranks per token, how many greedy tokens agree with llama.cpp's, and the ratios. Goal
(issue 20): cmatrix 2 ranks >= llama.cpp for every type.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BENCH_VENV = ROOT / ".venv-bench"
TINYLLAMA = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)
SMALL = dict(vocab_size=1024, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048)
TINY_LAYERS = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=22,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
SCALE = 2.0  # larger random weights: logits further from uniform, fewer greedy near-ties
TYPES = ("f32", "f16", "q8_0", "q4_0")
LLAMA_FTYPE = {"q8_0": 7, "q4_0": 2}  # llama.cpp's LLAMA_FTYPE_MOSTLY_Q8_0 / _Q4_0
TIMEOUT = 1800


def ensure_checkpoint(path: Path, settings: dict) -> bool:
    """Build the checkpoint unless ``path`` already holds one with these settings; True if built."""
    cfg = path / "config.json"
    if cfg.exists() and (path / "model.safetensors").exists():
        have = json.loads(cfg.read_text())
        if all(have.get(k) == v for k, v in settings.items()) and have.get("model_type") == "llama":
            return False
    sys.path.insert(0, str(HERE))
    from tiny_llama import build

    for old in path.glob("*.gguf"):
        old.unlink()
    build(path, model_type="llama", seed=0, scale=SCALE, tokenizer=False, **settings)
    return True


def prompt_ids(vocab: int, n: int) -> list[int]:
    import numpy as np

    return [int(t) for t in np.random.default_rng(0).integers(3, vocab, n)]


def summary(steps: list[float], tokens: list[int], **extra) -> dict:
    med = statistics.median(steps) if steps else float("nan")
    return {"ms_per_token": med * 1e3, "tokens_per_s": 1.0 / med if steps else 0.0,
            "steps": steps, "tokens": tokens, **extra}


# ---- the halves, each run in a subprocess ------------------------------------------------------

def llama_cpp_half(gguf: Path, n_tokens: int, n_prompt: int, vocab: int) -> dict:
    import llama_cpp
    import numpy as np
    from llama_cpp import Llama

    threads = os.cpu_count() or 1
    t = time.perf_counter()
    llm = Llama(str(gguf), n_ctx=n_prompt + n_tokens + 8, n_threads=threads, n_threads_batch=threads,
                n_batch=64, verbose=False)
    load = time.perf_counter() - t
    ids = prompt_ids(vocab, n_prompt)

    def last_logits() -> np.ndarray:  # the Llama class keeps no logits unless logits_all
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))

    def decode(new: int) -> tuple[list[int], list[float], float]:
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids)
        prefill = time.perf_counter() - t
        tokens = [int(np.argmax(last_logits()))]
        steps = []
        while len(tokens) < new:
            t = time.perf_counter()
            llm.eval([tokens[-1]])
            steps.append(time.perf_counter() - t)
            tokens.append(int(np.argmax(last_logits())))
        return tokens, steps, prefill

    decode(min(n_tokens, 4))  # warm-up
    tokens, steps, prefill = decode(n_tokens)
    return summary(steps, tokens, label=f"llama.cpp, 1 process x {threads} threads", load_s=load,
                   prefill_s=prefill, bytes_per_token=0.0)


def cmatrix_half(path: Path, kind: str, n_tokens: int, n_prompt: int, backend: str) -> dict:
    import cmatrix as cm

    cl = cm.init(backends=backend)
    quant = kind if kind.startswith("q") else None
    dtype = {"f32": "float32", "f16": "float16"}.get(kind)
    t = time.perf_counter()
    model = cm.llm.load(cl, path, quant=quant, dtype=dtype)
    load = time.perf_counter() - t
    ids = prompt_ids(model.config.vocab_size, n_prompt)
    model.generate(token_ids=ids, max_new_tokens=min(n_tokens, 4), stop_token_ids=[])  # warm-up
    times: list[float] = []
    forward = model.forward

    def timed(*a, **k):
        t = time.perf_counter()
        out = forward(*a, **k)
        times.append(time.perf_counter() - t)
        return out

    model.forward = timed  # per-step times inside generate(); times[0] is the prefill
    res = model.generate(token_ids=ids, max_new_tokens=n_tokens, stop_token_ids=[])
    model.forward = forward
    n = cl.size
    out = summary(times[1:], res.token_ids, label=f"cmatrix, {n} rank{'s' * (n > 1)} x 1 thread ({backend})",
                  load_s=load, prefill_s=res.prefill_seconds, bytes_per_token=res.bytes_per_token)
    model.close()
    return out


def fixed_cost_half(path: Path) -> dict:
    """Median decode step of the tiny-matrix decoder: what the layers cost besides arithmetic."""
    import cmatrix as cm

    cl = cm.init(backends="ggml")
    model = cm.llm.load(cl, path)
    model.forward([1, 2, 3], start=0)
    steps = []
    for i in range(200):
        t = time.perf_counter()
        model.forward([4 + i % 100])
        steps.append(time.perf_counter() - t)
    layers = model.config.num_layers
    model.close()
    med = statistics.median(steps)
    return {"ms_per_token": med * 1e3, "us_per_layer": med * 1e6 / layers, "ranks": cl.size}


# ---- the driver of the benchmark ---------------------------------------------------------------

def busy_cores(seconds: float = 1.0) -> float:
    """Cores kept busy by other work over ``seconds`` (from /proc/stat; else the load average)."""
    def sample() -> list[int]:
        with open("/proc/stat") as f:
            return [int(v) for v in f.readline().split()[1:]]
    try:
        a = sample()
        time.sleep(seconds)
        d = [y - x for x, y in zip(a, sample(), strict=True)]
    except (OSError, ValueError):
        return os.getloadavg()[0]
    return (os.cpu_count() or 1) * (1 - (d[3] + d[4]) / max(sum(d[:8]), 1))


def run_part(argv: list[str], env: dict | None, what: str) -> dict:
    load = busy_cores()
    print(f"  {what} (other work busy on {load:.2f} cores just before) ...", flush=True)
    try:
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"{what}: timed out after {TIMEOUT} s\n{exc.stdout or ''}{exc.stderr or ''}") \
            from exc
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return {**json.loads(lines[-1][len("RESULT "):]), "load_before": load}


def bench_python() -> Path:
    """The benchmark's own environment with llama-cpp-python (built for this CPU) and gguf."""
    python = BENCH_VENV / "bin" / "python"
    stamp = BENCH_VENV / ".installed"
    if stamp.exists() and python.exists():
        return python
    print(f"setting up {BENCH_VENV.name} (llama-cpp-python compiles for this machine: a few minutes, "
          "once) ...", flush=True)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True)
    env = {**os.environ, "CMAKE_ARGS": "-DGGML_NATIVE=ON"}  # llama.cpp's own default, not the Makefile's
    t = time.perf_counter()
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "llama-cpp-python", "gguf",
                    "safetensors", "numpy"], check=True, env=env, timeout=3600)
    stamp.write_text("llama-cpp-python gguf safetensors numpy\n")
    print(f"  ready in {time.perf_counter() - t:.0f} s", flush=True)
    return python


def ensure_gguf(python: Path, path: Path, kind: str) -> Path:
    """The checkpoint as GGUF of ``kind``: exported (f32/f16) or quantised by llama.cpp (q8_0/q4_0)."""
    out = path / f"model-{kind}.gguf"
    if out.exists() and out.stat().st_mtime >= (path / "model.safetensors").stat().st_mtime:
        return out
    if kind in ("f32", "f16"):
        subprocess.run([str(python), str(HERE / "gguf_export.py"), str(path), str(out), "--type", kind],
                       check=True, capture_output=True, timeout=TIMEOUT)
        return out
    src = ensure_gguf(python, path, "f32")
    code = ("import sys, llama_cpp as l\n"
            "p = l.llama_model_quantize_default_params()\n"
            f"p.ftype = {LLAMA_FTYPE[kind]}; p.pure = True; p.nthread = {os.cpu_count() or 1}\n"
            "p.token_embedding_type = 0\n"  # float32 embeddings, as cmatrix keeps them
            "sys.exit(l.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))\n")
    subprocess.run([str(python), "-c", code, str(src), str(out)], check=True, capture_output=True,
                   timeout=TIMEOUT)
    return out


def agree(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two greedy sequences."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def report(rows: dict, fixed: list[dict], settings: dict, args) -> None:
    print(f"\nLlama (TinyLlama-1.1B's shape unless --small): hidden {settings['hidden_size']}, "
          f"{settings['num_hidden_layers']} layers, {settings['num_attention_heads']} heads / "
          f"{settings['num_key_value_heads']} KV heads, intermediate {settings['intermediate_size']}, "
          f"vocab {settings['vocab_size']}, random weights")
    print(f"machine: {os.cpu_count()} cores; prompt {args.prompt} tokens, {args.tokens} new tokens; "
          "per-token time = median of the decode steps (shared machine: noisy)")
    print(f"\n{'type':5} {'configuration':40} {'tokens/s':>9} {'ms/token':>9} {'KiB/token':>10} "
          f"{'load s':>7} {'agree':>6} {'busy':>5}")
    for kind, results in rows.items():
        base = results.get("llama.cpp")
        for r in results.values():
            same = "" if not base or r is base else f"{agree(r['tokens'], base['tokens'])}/{len(r['tokens'])}"
            print(f"{kind:5} {r['label']:40} {r['tokens_per_s']:9.2f} {r['ms_per_token']:9.1f} "
                  f"{r['bytes_per_token'] / 1024:10.1f} {r['load_s']:7.1f} {same:>6} {r['load_before']:5.2f}")
    print("\n'agree': leading greedy tokens equal to llama.cpp's (random weights have near-ties; "
          "quantised types round differently); 'busy': cores used by other work just before")
    if fixed:
        print("fixed cost (22 layers of tiny matrices, ggml): " + ", ".join(
            f"{f['ranks']} rank{'s' * (f['ranks'] > 1)} {f['us_per_layer']:.0f} us/layer "
            f"({f['ms_per_token']:.2f} ms/token)" for f in fixed))
    ratios = []
    for kind, results in rows.items():
        base, one, two = results.get("llama.cpp"), results.get("1 rank"), results.get("2 ranks")
        if base and two:
            ratios.append((kind, two["tokens_per_s"] / base["tokens_per_s"],
                           one["tokens_per_s"] / base["tokens_per_s"] if one else float("nan")))
    if ratios:
        print("\ncmatrix / llama.cpp (decode tokens/s; >= 1 is at least as fast):")
        for kind, r2, r1 in ratios:
            print(f"  {kind:5} 2 ranks {r2:5.2f}   1 rank {r1:5.2f}")
        met = all(r2 >= 1.0 for _, r2, _ in ratios)
        print("goal met: 2 ranks >= llama.cpp for every type" if met else
              "goal NOT met on this run for: " + ", ".join(k for k, r2, _ in ratios if r2 < 1.0)
              + " (shared machines are noisy: rerun)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default=",".join(TYPES), help="comma-separated: f32,f16,q8_0,q4_0")
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per timed decode")
    ap.add_argument("--prompt", type=int, default=8, help="prompt length in tokens")
    ap.add_argument("--dir", default="/tmp/cmatrix-bench-llm", help="checkpoint folder (built there "
                    "unless it matches; the GGUF files go beside it)")
    ap.add_argument("--backend", default="ggml", choices=["ggml", "torch", "numpy", "opencl"])
    ap.add_argument("--small", action="store_true", help="a tiny model, for a quick smoke test")
    ap.add_argument("--no-llama-cpp", action="store_true", help="cmatrix only (no .venv-bench)")
    ap.add_argument("--llama-cpp-half", help=argparse.SUPPRESS)
    ap.add_argument("--cmatrix-half", help=argparse.SUPPRESS)
    ap.add_argument("--fixed-cost-half", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    kinds = [k.strip() for k in args.types.split(",") if k.strip()]
    if args.tokens < 2 or args.prompt < 1 or not kinds or any(k not in TYPES for k in kinds):
        ap.error(f"--tokens >= 2, --prompt >= 1, --types from {','.join(TYPES)}")
    settings = SMALL if args.small else TINYLLAMA
    path = Path(args.dir)
    if args.llama_cpp_half:
        vocab = json.loads((path / "config.json").read_text())["vocab_size"]
        r = llama_cpp_half(Path(args.llama_cpp_half), args.tokens, args.prompt, vocab)
        print("RESULT " + json.dumps(r))
        return 0
    if args.cmatrix_half:
        print("RESULT " + json.dumps(cmatrix_half(path, args.cmatrix_half, args.tokens, args.prompt,
                                                  args.backend)))
        return 0
    if args.fixed_cost_half:
        print("RESULT " + json.dumps(fixed_cost_half(path)))
        return 0

    from cmatrix.engine.launch import command, environment

    try:
        print(f"checkpoint in {path} ...", flush=True)
        t = time.perf_counter()
        built = ensure_checkpoint(path, settings)
        print(f"  {'built' if built else 'reused'} in {time.perf_counter() - t:.1f} s", flush=True)
        python = None if args.no_llama_cpp else bench_python()
        common = ["--dir", str(path), f"--tokens={args.tokens}", f"--prompt={args.prompt}"]
        rows: dict[str, dict] = {}
        for kind in kinds:
            print(f"{kind}:", flush=True)
            results = rows.setdefault(kind, {})
            if python is not None:
                gguf = ensure_gguf(python, path, kind)
                argv = [str(python), __file__, "--llama-cpp-half", str(gguf), *common]
                results["llama.cpp"] = run_part(argv, None, f"llama.cpp on {gguf.name}")
            for n in (1, 2):
                argv = [sys.executable, "-m", "cmatrix", "run", __file__, "--cmatrix-half", kind, *common,
                        f"--backend={args.backend}"]
                results[f"{n} rank{'s' * (n > 1)}"] = run_part(command(n, argv), environment(threads=1),
                                                               f"cmatrix {kind}, {n} rank(s) x 1 thread")
        tiny = path.parent / (path.name + "-tiny-layers")
        ensure_checkpoint(tiny, TINY_LAYERS)
        fixed = [run_part(command(n, [sys.executable, "-m", "cmatrix", "run", __file__, "--fixed-cost-half",
                                      "--dir", str(tiny)]), environment(threads=1),
                          f"fixed cost, {n} rank(s)") for n in (1, 2)]
        report(rows, fixed, settings, args)
        return 0
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", None) or ""
        print(f"bench_llm: {exc}\n{detail}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

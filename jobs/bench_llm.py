"""LLM decode: cmatrix on 1 and 2 ranks vs single-process PyTorch, same run.

    python jobs/bench_llm.py [--tokens 16] [--prompt 8] [--dir DIR] [--backend torch] [--small]
    mpirun -n N python -m cmatrix run jobs/bench_llm.py --cmatrix-half --dir DIR   # cmatrix half only

A random-weight Llama checkpoint (hidden 2048, 16 layers, 32 heads, 8 KV heads,
intermediate 5632, vocab 32000, float32: about 3.4 GB; --small: a tiny one for a
smoke test) is built once into --dir (default: a temporary folder removed at the
end; a folder whose config.json matches is reused). The baseline is transformers
in one process with every core (greedy decode with its KV cache), measured in a
subprocess while no MPI job runs (waiting MPI ranks poll and would slow it); then
cmatrix decodes the same prompt on 1 rank and on 2 ranks, one thread per rank.
Reported: decode tokens/s and ms/token from the median per-token time, bytes moved
between ranks per token, load time. Goal: 2 ranks at least as fast as PyTorch.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FULL = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
            num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=2048)
SMALL = dict(vocab_size=1024, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048)
SCALE = 2.0  # larger random weights: logits further from uniform, fewer greedy near-ties
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

    build(path, model_type="llama", seed=0, scale=SCALE, tokenizer=False, **settings)
    return True


def prompt_ids(path: Path, n: int) -> list[int]:
    import numpy as np

    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    return [int(t) for t in np.random.default_rng(0).integers(3, vocab, n)]


def summary(kind: str, steps: list[float], tokens: list[int], **extra) -> dict:
    med = statistics.median(steps) if steps else float("nan")
    return {"kind": kind, "ms_per_token": med * 1e3, "tokens_per_s": 1.0 / med if steps else 0.0,
            "mean_ms_per_token": 1e3 * sum(steps) / max(len(steps), 1), "steps": steps,
            "tokens": tokens, **extra}


def torch_half(path: Path, n_tokens: int, n_prompt: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    load = time.perf_counter() - t
    ids = prompt_ids(path, n_prompt)
    # transformers 5 names the KV-cache argument (and output field) "cache"; older versions past_key_values
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def decode(new: int) -> tuple[list[int], list[float], float]:
        steps: list[float] = []
        with torch.inference_mode():
            t = time.perf_counter()
            out = model(torch.tensor([ids]), use_cache=True)
            prefill = time.perf_counter() - t
            tokens = [int(out.logits[0, -1].argmax())]
            while len(tokens) < new:
                t = time.perf_counter()
                out = model(torch.tensor([[tokens[-1]]]), use_cache=True, **{key: getattr(out, key)})
                steps.append(time.perf_counter() - t)
                tokens.append(int(out.logits[0, -1].argmax()))
        return tokens, steps, prefill

    decode(min(n_tokens, 4))  # warm-up
    tokens, steps, prefill = decode(n_tokens)
    return summary("torch", steps, tokens, label=f"PyTorch, 1 process x {torch.get_num_threads()} threads",
                   ranks=1, threads=torch.get_num_threads(), load_s=load, prefill_s=prefill,
                   bytes_per_token=0.0)


def cmatrix_half(path: Path, n_tokens: int, n_prompt: int, backend: str) -> dict:
    import cmatrix as cm

    cl = cm.init(backends=backend)
    t = time.perf_counter()
    model = cm.llm.load(cl, path)
    load = time.perf_counter() - t
    ids = prompt_ids(path, n_prompt)
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
    n, threads = cl.size, cl.ranks[0].threads
    label = f"cmatrix, {n} rank{'s' * (n > 1)} x {threads} thread{'s' * (threads > 1)} ({backend})"
    out = summary("cmatrix", times[1:], res.token_ids, ranks=n, threads=threads, backend=backend, label=label,
                  load_s=load, prefill_s=res.prefill_seconds, bytes_per_token=res.bytes_per_token,
                  generate_tokens_per_s=res.decode_tokens_per_s)
    model.close()
    return out


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
    print(f"running {what} (other work busy on {load:.2f} cores just before) ...", flush=True)
    try:
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        out = f"{exc.stdout or ''}{exc.stderr or ''}"
        raise RuntimeError(f"{what}: timed out after {TIMEOUT} s\n{out}") from exc
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return {**json.loads(lines[-1][len("RESULT "):]), "load_before": load}


def report(results: list[dict], settings: dict, args) -> None:
    print(f"\nLlama {settings['hidden_size']} hidden, {settings['num_hidden_layers']} layers, "
          f"{settings['num_attention_heads']} heads / {settings['num_key_value_heads']} KV heads, "
          f"intermediate {settings['intermediate_size']}, vocab {settings['vocab_size']}, float32, "
          "random weights")
    print(f"machine: {os.cpu_count()} cores; prompt {args.prompt} tokens, {args.tokens} new tokens "
          f"({args.tokens - 1} decode steps); per-token time = median of steps (shared machine: noisy)")
    loads = ", ".join(f"{name} {r['load_before']:.2f}"
                      for name, r in zip(("torch", "1 rank", "2 ranks"), results, strict=True))
    print(f"cores busy with other work just before each part: {loads} (well above 0: expect noise)")
    print(f"{'configuration':38} {'tokens/s':>9} {'ms/token':>9} {'KiB/token':>10} {'prefill s':>10} "
          f"{'load s':>7}")
    for r in results:
        print(f"{r['label']:38} {r['tokens_per_s']:9.2f} {r['ms_per_token']:9.1f} "
              f"{r['bytes_per_token'] / 1024:10.1f} {r['prefill_s']:10.3f} {r['load_s']:7.1f}")
    base, one, two = results
    print(f"\n1 rank / torch     {one['tokens_per_s'] / base['tokens_per_s']:6.2f}  "
          "(decode tokens/s; >= 1 is at least as fast)")
    print(f"2 ranks / torch    {two['tokens_per_s'] / base['tokens_per_s']:6.2f}")
    print(f"2 ranks / 1 rank   {two['tokens_per_s'] / one['tokens_per_s']:6.2f}  (speedup)")
    for r in (one, two):
        if r["tokens"] != base["tokens"]:
            print(f"warning: {r['label']} greedy tokens differ from PyTorch's (random weights can tie): "
                  f"{r['tokens']} vs {base['tokens']}")
    ok = two["tokens_per_s"] >= base["tokens_per_s"]
    print("goal met: 2 ranks >= PyTorch" if ok else
          "goal NOT met on this run: 2 ranks slower than PyTorch (shared machines are noisy: rerun)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=16, help="new tokens per timed generate")
    ap.add_argument("--prompt", type=int, default=8, help="prompt length in tokens")
    ap.add_argument("--dir", help="checkpoint folder (built there unless it matches)")
    ap.add_argument("--backend", default="torch", choices=["torch", "numpy"])
    ap.add_argument("--small", action="store_true", help="a tiny model, for a quick smoke test")
    ap.add_argument("--torch-half", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cmatrix-half", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.tokens < 2 or args.prompt < 1:
        ap.error("--tokens must be >= 2 and --prompt >= 1")
    from cmatrix.engine.launch import command, environment, launched_by_mpiexec

    settings = SMALL if args.small else FULL
    temp = None if args.dir else Path(tempfile.mkdtemp(prefix="bench_llm_", dir="/tmp"))
    path = Path(args.dir) if args.dir else temp
    try:
        if args.torch_half:
            print("RESULT " + json.dumps(torch_half(path, args.tokens, args.prompt)))
            return 0
        if args.cmatrix_half or launched_by_mpiexec():
            if not (path / "config.json").exists():  # alone: use the folder's checkpoint as it is
                ensure_checkpoint(path, settings)
            r = cmatrix_half(path, args.tokens, args.prompt, args.backend)
            print(f"{r['label']}: {r['tokens_per_s']:.2f} tokens/s, {r['ms_per_token']:.1f} ms/token "
                  f"(median), {r['bytes_per_token'] / 1024:.1f} KiB/token, load {r['load_s']:.1f} s")
            print("RESULT " + json.dumps(r))
            return 0
        print(f"checkpoint in {path} ...", flush=True)
        t = time.perf_counter()
        built = ensure_checkpoint(path, settings)
        print(f"  {'built' if built else 'reused'} in {time.perf_counter() - t:.1f} s", flush=True)
        common = ["--dir", str(path), f"--tokens={args.tokens}", f"--prompt={args.prompt}"]
        common += ["--small"] if args.small else []
        results = [run_part([sys.executable, os.path.abspath(__file__), "--torch-half", *common], None,
                            f"PyTorch baseline (1 process, {os.cpu_count()} threads)")]
        for n in (1, 2):
            argv = [sys.executable, "-m", "cmatrix", "run", os.path.abspath(__file__), "--cmatrix-half",
                    *common, f"--backend={args.backend}"]
            results.append(run_part(command(n, argv), environment(threads=1),
                                    f"cmatrix, {n} rank(s) x 1 thread"))
        report(results, settings, args)
        return 0
    except RuntimeError as exc:
        print(f"bench_llm: {exc}", file=sys.stderr)
        return 1
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

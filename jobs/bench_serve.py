"""The HTTP server's cost: time to first token and decode speed through `cmatrix serve`'s
OpenAI API against `cmatrix generate`, on the same model and ranks in the same run, and the
prompt tokens a 5-turn conversation saves by reusing the ranks' K/V caches.

    python jobs/bench_serve.py [--small] [--tokens 48] [--ranks 2] [--backend ggml] [--repeats 3]

A random-weight Llama of TinyLlama-1.1B's shape (float32, 4.4 GB; --small: a tiny one) with
a byte-level tokenizer and chat template is built once into --dir. Then, one after the other:

- `cmatrix launch -n R generate --no-chat` with a fixed text prompt, --repeats times: its own
  prefill time (the time to its first token) and decode tokens/s, as it prints them;
- `cmatrix launch -n R serve`, and the official openai client streaming `/v1/completions`
  with the same prompt and greedy sampling, --repeats times (an unrelated request in
  between, so no answer comes from the cache): time to the first chunk, and decode tokens/s
  from the chunks' arrival (the server sends one per token);
- a 5-turn chat through `/v1/chat/completions`: per turn the prompt's tokens, those taken
  from the cache, and those run.

Goal (issue 14): the server adds under 5% per token. Timings are the best of the repeats
(the machine is shared; the best is the least disturbed).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_llm import SCALE, SMALL, TINYLLAMA  # noqa: E402
from serve_process import ServeProcess  # noqa: E402

PROMPT = "Tell me about the clusters of old computers that people keep in their homes, and why."
SUMMARY = re.compile(r"prefill: (\d+) tokens.*?, ([\d.]+) tokens/s \| "
                     r"decode: (\d+) tokens, ([\d.]+) tokens/s")
TURNS = ["Hello! Who are you?", "What can a cluster of old PCs do?", "How fast is it?",
         "And with a slow network?", "Thanks. Summarise what you said."]


def ensure_model(path: Path, settings: dict) -> None:
    cfg = path / "config.json"
    if cfg.exists() and (path / "tokenizer.json").exists():
        have = json.loads(cfg.read_text())
        if all(have.get(k) == v for k, v in settings.items()):
            return
    from tiny_llama import build

    build(path, model_type="llama", seed=0, scale=SCALE, tokenizer=True, **settings)


def launch(ranks: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "cmatrix", "launch", "-n", str(ranks), *args]


def environment() -> dict:
    from cmatrix.engine.launch import environment as job_environment

    return {**job_environment(threads=1), "PYTHONUNBUFFERED": "1"}


def run_generate(args, path: Path) -> dict:
    argv = launch(args.ranks, "generate", "--model", str(path), "--backends", args.backend, "--no-chat",
                  "--prompt", PROMPT, "--max-new-tokens", str(args.tokens))
    proc = subprocess.run(argv, capture_output=True, text=True, env=environment(), timeout=1800)
    found = SUMMARY.search(proc.stderr)
    if proc.returncode or not found:
        raise RuntimeError(f"generate failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    prompt, prefill_rate, tokens, decode_rate = found.groups()
    return {"ttft_s": int(prompt) / float(prefill_rate), "decode_tokens_per_s": float(decode_rate),
            "tokens": int(tokens)}


def run_http(client, tokens: int) -> dict:
    start = time.perf_counter()
    arrivals = []
    for chunk in client.completions.create(model="m", prompt=PROMPT, max_tokens=tokens, temperature=0,
                                           stream=True):
        if chunk.choices:
            arrivals.append(time.perf_counter())
    if len(arrivals) < 2:
        raise RuntimeError(f"only {len(arrivals)} chunks came back")
    return {"ttft_s": arrivals[0] - start,
            "decode_tokens_per_s": (len(arrivals) - 1) / (arrivals[-1] - arrivals[0]),
            "tokens": len(arrivals)}


def conversation(client, tokens: int) -> list[dict]:
    messages, turns = [{"role": "system", "content": "You are a helpful assistant."}], []
    for text in TURNS:
        messages.append({"role": "user", "content": text})
        r = client.chat.completions.create(model="m", messages=messages, max_tokens=tokens, temperature=0)
        messages.append({"role": "assistant", "content": r.choices[0].message.content})
        cached = r.usage.prompt_tokens_details.cached_tokens
        prompt = r.usage.prompt_tokens
        turns.append({"prompt": prompt, "cached": cached, "run": prompt - cached})
    return turns


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="a tiny model, for a quick smoke test")
    ap.add_argument("--tokens", type=int, default=48, help="new tokens per timed answer")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--backend", default="ggml", choices=["ggml", "torch", "numpy", "opencl"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="model folder (default /tmp/cmatrix-bench-serve[-small])")
    args = ap.parse_args()
    if args.tokens < 2 or args.repeats < 1 or args.ranks < 1:
        ap.error("--tokens >= 2, --repeats >= 1, --ranks >= 1")
    from openai import OpenAI

    settings = SMALL if args.small else TINYLLAMA
    path = Path(args.dir or f"/tmp/cmatrix-bench-serve{'-small' if args.small else ''}")
    print(f"model in {path} ...", flush=True)
    ensure_model(path, settings)
    gen = []
    for i in range(args.repeats):
        print(f"cmatrix generate, run {i + 1}/{args.repeats} ...", flush=True)
        gen.append(run_generate(args, path))
    print("cmatrix serve ...", flush=True)
    server = ServeProcess(args.ranks, path, "--backends", args.backend, env=environment(), timeout=1800)
    try:
        client = OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=1800)
        http = []
        for i in range(args.repeats):
            # an unrelated prompt first: the timed one then starts from an empty cache
            client.completions.create(model="m", prompt=[5, 6, 7], max_tokens=2, temperature=0)
            print(f"HTTP, run {i + 1}/{args.repeats} ...", flush=True)
            http.append(run_http(client, args.tokens))
        turns = conversation(client, 16)
    finally:
        server.stop()
    # the server's own figures for the timed requests (generate() inside it, before HTTP)
    inside = [float(m.group(4)) for line in server.lines if f"decode: {args.tokens} tokens" in line
              and (m := SUMMARY.search(line))]
    g_ttft, h_ttft = min(r["ttft_s"] for r in gen), min(r["ttft_s"] for r in http)
    g_rate = max(r["decode_tokens_per_s"] for r in gen)
    h_rate = max(r["decode_tokens_per_s"] for r in http)
    shape = "small" if args.small else "TinyLlama-1.1B shape, float32"
    print(f"\n{args.ranks} rank(s), backend {args.backend}, {shape}, {args.tokens} new tokens, best of "
          f"{args.repeats}:")
    print(f"{'':24}{'first token (ms)':>18}{'decode tokens/s':>18}{'ms/token':>10}")
    print(f"{'cmatrix generate':24}{1e3 * g_ttft:>18.1f}{g_rate:>18.2f}{1e3 / g_rate:>10.2f}")
    print(f"{'HTTP (openai client)':24}{1e3 * h_ttft:>18.1f}{h_rate:>18.2f}{1e3 / h_rate:>10.2f}")
    if inside:
        print(f"{'  (inside the server)':24}{'':>18}{max(inside):>18.2f}{1e3 / max(inside):>10.2f}")
    extra = (g_rate / h_rate - 1) * 100
    print(f"the server adds {extra:+.1f}% per token ({'meets' if extra < 5 else 'misses'} the goal: under 5%)"
          f" and {1e3 * (h_ttft - g_ttft):+.1f} ms to the first token")
    print(f"\n5-turn conversation (16 new tokens per turn):\n{'turn':>4}{'prompt':>8}{'cached':>8}{'run':>6}")
    for i, t in enumerate(turns, 1):
        print(f"{i:>4}{t['prompt']:>8}{t['cached']:>8}{t['run']:>6}")
    total, run = sum(t["prompt"] for t in turns), sum(t["run"] for t in turns)
    print(f"prefilled {run} of {total} prompt tokens: the cache saved {total - run} "
          f"({100 * (total - run) / total:.0f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

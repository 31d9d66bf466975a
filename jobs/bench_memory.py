"""Memory per rank against the bytes of its share of the weights, per backend and weight type,
and decode speed, all in one run.

    python jobs/bench_memory.py [--small] [--ranks 2] [--backends numpy,torch,ggml]
                                [--types f32,bf16,q8_0,q4_0] [--tokens 16] [--local-weights auto,off]

A random bfloat16 Llama of about 1 GB (TinyLlama-1.1B's width, 10 layers; --small: a tiny
one) is built once into --dir. For every backend and type, one job on --ranks ranks loads
it and reports, per rank: resident memory (RSS, or device memory on a GPU) before and after
the load, the growth against the bytes of the rank's share as its backend stores them, and
the driver's peak RSS during the load against embeddings + the largest tensor; then decode
tokens/s for --tokens greedy tokens. --local-weights: "auto" (ranks read their blocks from
the checkpoint themselves, all ranks being on this host), "off" (the driver reads every
matrix and sends each rank its block), or both, to compare load time and driver peak.
Goal (issue 15): every rank's growth <= 1.15x its share (in the stored type); driver peak
<= embeddings + largest tensor + 300 MB.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
GIB = 1 << 30
ONE_GB = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=10,
              num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)
SMALL = dict(vocab_size=1024, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512)
TYPES = {"f32": {}, "bf16": {"dtype": "bfloat16"}, "f16": {"dtype": "float16"}, "q8_0": {"quant": "q8_0"},
         "q4_0": {"quant": "q4_0"}}


def ensure_model(path: Path, settings: dict) -> None:
    cfg = path / "config.json"
    if cfg.exists() and all(json.loads(cfg.read_text()).get(k) == v for k, v in settings.items()):
        return
    sys.path.insert(0, str(HERE))
    from tiny_llama import build

    build(path, model_type="llama", seed=0, scale=2.0, tokenizer=False, save_dtype="bfloat16", **settings)


def peak_rss() -> int:
    """This process's peak resident set in bytes (Linux reports kilobytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def one_job(path: str, backend: str, kind: str, tokens: int, local: str) -> dict:
    """Rank 0 of the job: load, measure, decode; returns the figures."""
    import cmatrix as cm
    from cmatrix.llm import memory_plan
    from cmatrix.llm.layout import matrix_splits

    cl = cm.init(backends=backend)
    peak_before = peak_rss()
    t = time.perf_counter()
    model = cm.llm.load(cl, path, local_weights=local, **TYPES[kind])
    load_s = time.perf_counter() - t
    peak_load = peak_rss()
    after = model.rank_stats()
    values = memory_plan.per_rank_values(model.config, model.weights, model.quant)
    ranks = []
    for r, (before, now) in enumerate(zip(model.memory_before, after, strict=True)):
        share = int(values[r] * before["per_value"])
        ranks.append({"rank": r, "backend": now["backend"], "decoder": model.decoders[r],
                      "share_bytes": share, "before": before["used"], "after": now["memory_used"],
                      "per_value": before["per_value"]})
    cfg = model.config
    largest = max(rows * cols for (rows, cols), _, _ in matrix_splits(cfg, None).values())
    result = model.generate(token_ids=[1, 2, 3, 4], max_new_tokens=tokens, stop_token_ids=[])
    return {"kind": kind, "local": local, "ranks": ranks, "load_s": load_s,
            "driver_peak_growth": peak_load - peak_before,
            "embeddings": 4 * cfg.vocab_size * cfg.hidden_size, "largest": 4 * largest,
            "tokens_per_s": result.decode_tokens_per_s}


def run(args, path: Path, backend: str, kind: str, local: str) -> dict:
    from cmatrix.engine.launch import environment

    argv = [sys.executable, "-m", "cmatrix", "launch", "-n", str(args.ranks), __file__, "--job", str(path),
            backend, kind, str(args.tokens), local]
    env = environment(threads=1)
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=3600)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        raise RuntimeError(f"{backend} {kind} local_weights={local} failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def report(rows: list[tuple[str, dict]]) -> None:
    mib = 1 << 20
    print(f"\n{'backend':8} {'type':5} {'rank':>4} {'decoder':14} {'B/value':>7} {'share MiB':>10} "
          f"{'RSS growth MiB':>15} {'ratio':>6}")
    worst = 0.0
    for backend, r in rows:
        for rank in r["ranks"]:
            growth = rank["after"] - rank["before"]
            ratio = growth / rank["share_bytes"] if rank["share_bytes"] else float("nan")
            if rank["rank"] > 0 and rank["share_bytes"]:  # rank 0 also holds the embeddings
                worst = max(worst, ratio)
            print(f"{backend:8} {r['kind']:5} {rank['rank']:>4} {rank['decoder'][:14]:14} "
                  f"{rank['per_value']:>7.3f} {rank['share_bytes'] / mib:>10.1f} {growth / mib:>15.1f} "
                  f"{ratio:>6.2f}")
    print(f"\n{'backend':8} {'type':5} {'weights from':14} {'load s':>7} {'driver peak growth MiB':>23} "
          f"{'embeddings+largest MiB':>23} {'decode tok/s':>13}")
    for backend, r in rows:
        limit = r["embeddings"] + r["largest"]
        source = "ranks' copies" if r["local"] == "auto" else "the driver"
        print(f"{backend:8} {r['kind']:5} {source:14} {r['load_s']:>7.1f} "
              f"{r['driver_peak_growth'] / mib:>23.1f} {limit / mib:>23.1f} {r['tokens_per_s']:>13.2f}")
    print(f"\nworst RSS growth / share on ranks 1..n: {worst:.2f} (goal <= 1.15)")
    base = {b: r["tokens_per_s"] for b, r in rows if r["kind"] == "f32"}
    for backend, r in rows:
        if r["kind"] != "f32" and base.get(backend) and r["local"] == rows[0][1]["local"]:
            print(f"{backend} {r['kind']}: {r['tokens_per_s'] / base[backend]:.2f}x the decode speed of f32")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--backends", default="numpy,torch,ggml")
    ap.add_argument("--types", default="f32,bf16,q8_0,q4_0")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--local-weights", default="auto", help="auto, off, or both: auto,off")
    ap.add_argument("--job", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.job:
        path, backend, kind, tokens, local = args.job
        print("RESULT " + json.dumps(one_job(path, backend, kind, int(tokens), local)), flush=True)
        return 0
    kinds = args.types.split(",")
    if any(k not in TYPES for k in kinds):
        ap.error(f"--types from {','.join(TYPES)}")
    path = Path(args.dir or f"/tmp/cmatrix-bench-memory{'-small' if args.small else ''}")
    print(f"model in {path} ...", flush=True)
    ensure_model(path, SMALL if args.small else ONE_GB)
    rows = []
    for backend in args.backends.split(","):
        for kind in kinds:
            for local in args.local_weights.split(","):
                print(f"{backend} {kind} local_weights={local} ...", flush=True)
                rows.append((backend, run(args, path, backend, kind, local)))
    report(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

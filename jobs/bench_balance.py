"""Shares from measured speed against equal shares and the ideal, with one rank slowed down.

    python jobs/bench_balance.py [--ranks 2] [--slow 0.25] [--how competitors|quota] [--tokens 24]
                                 [--small] [--dir DIR] [--backend ggml] [--dtype bfloat16]

The last rank is slowed to about --slow of its speed (jobs/slowdown.py): by default each rank
is pinned to a core of its own and busy processes share the last rank's core with it (3 of
them for 1/4); ``--how quota`` holds it to that fraction of a core with a CPU cgroup instead
(needs root; the kernel stops it in bursts, so short commands may escape it). Every rank
runs 1 thread. In one MPI job, one part at a time:

- a decode-shaped product (one row against a 4096 x 8192 float32 matrix split by columns):
  seconds per product with equal shares, with ``cm.init(weights="auto")``'s (each rank's
  speed measured now, under the quota), and the ideal: the best of a search over the
  slowed rank's share;
- LLM decoding with bench_llm's model (TinyLlama's shape; --small: a tiny one): tokens/s
  with equal shares, with ``weights="auto"`` (rebalancing off, so the measured shares alone
  count), and the ideal found the same way;
- online rebalancing: the model loaded with equal shares and nothing slowed; the slowdown
  starts at the 8th new token; tokens/s over the 20 tokens that follow the 20th token after
  it, and over the last 20 of --online-tokens, against the ideal; the re-plans it made.

Then one rank alone decodes, the fast rank's speed with nobody to wait for. Goals (issue
16): auto within 10% of the ideal time, equal about 2x worse; rebalancing within 15% of the
ideal within 20 tokens after the slowdown starts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_llm import SMALL, TINYLLAMA, ensure_checkpoint, prompt_ids  # noqa: E402

SEARCH = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)  # the slowed rank's share, for the ideal
TIMEOUT = 3600


def shares_with(slow: float, n: int) -> list[float]:
    """The last rank takes ``slow``; the others split the rest evenly."""
    rest = (1.0 - slow) / (n - 1)
    return [rest] * (n - 1) + [slow]


# ---- the MPI job's parts (rank 0 runs them; the others serve) ------------------------------------

def timed_products(cl, x, w, shares, seconds: float = 1.5) -> float:
    """Mean seconds per product over at least ``seconds`` (a quota stalls a rank now and then)."""
    handle = cl.shard(w, weights=shares)
    try:
        cl.matmul(x, handle)
        calls, began = 0, time.perf_counter()
        while calls < 5 or time.perf_counter() - began < seconds:
            cl.matmul(x, handle)
            calls += 1
        return (time.perf_counter() - began) / calls
    finally:
        cl.free(handle)


def decode_rate(cm, cl, path: str, weights, tokens: int, ids: list[int], **options) -> dict:
    """Load, then decode ``tokens`` tokens; mean seconds per token after 4 warm-up tokens."""
    model = cm.llm.load(cl, path, weights=weights, rebalance=False, **options)
    try:
        stamps: list[float] = []
        model.generate(token_ids=ids, max_new_tokens=tokens + 4, stop_token_ids=[],
                       on_token=lambda _t: stamps.append(time.perf_counter()))
        per_token = (stamps[-1] - stamps[3]) / (len(stamps) - 4)
        return {"s_per_token": per_token, "shares": [round(float(w), 3) for w in model.weights],
                "layout": model.layout()}
    finally:
        model.close()


class Slowdown:
    """Slowing the last rank down, from the driver: its competitors, or its cgroup's quota."""

    def __init__(self, args: argparse.Namespace) -> None:
        import slowdown

        self.args = args
        self.competitors = slowdown.Competitors(args.core, args.competitors) if args.how == "competitors" \
            else None

    def on(self) -> None:
        if self.competitors is not None:
            self.competitors.start()
        else:
            Path(self.args.limit_file).write_text(self.args.limit)

    def off(self) -> None:
        if self.competitors is not None:
            self.competitors.stop()
        else:
            Path(self.args.limit_file).write_text(self.args.no_limit)


def cluster_part(args: argparse.Namespace) -> None:
    import numpy as np

    import cmatrix as cm

    slow = Slowdown(args)
    slow.on()  # before init: the speed it measures is the slowed one
    try:
        run_parts(cm, np, args, slow)
    finally:
        slow.off()


def run_parts(cm, np, args: argparse.Namespace, slow: Slowdown) -> None:
    cl = cm.init(weights="auto", backends=args.backend)
    n = cl.size
    auto = [round(float(w), 3) for w in cl.weights]
    print(cl.ranks, flush=True)
    out: dict = {"ranks": n, "auto_init": auto}
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4096), dtype=np.float32)
    w = rng.standard_normal((4096, 8192), dtype=np.float32)
    product = {"equal": timed_products(cl, x, w, [1.0 / n] * n), "auto": timed_products(cl, x, w, auto)}
    product["search"] = {s: timed_products(cl, x, w, shares_with(s, n)) for s in SEARCH}
    out["product"] = product
    print("product:", json.dumps(product), flush=True)

    options = {"dtype": args.dtype} if args.dtype else {}
    ids = prompt_ids(args.vocab, 8)
    llm = {"equal": decode_rate(cm, cl, args.dir, [1.0 / n] * n, args.tokens, ids, **options),
           "auto": decode_rate(cm, cl, args.dir, "auto", args.tokens, ids, **options)}
    llm["search"] = {s: decode_rate(cm, cl, args.dir, shares_with(s, n), args.tokens, ids, **options)
                     for s in SEARCH if s in (0.0, 0.1, 0.2, 0.3, 0.5)}
    out["llm"] = llm
    print("llm:", json.dumps({k: v if k != "search" else {s: r["s_per_token"] for s, r in v.items()}
                               for k, v in llm.items()}), flush=True)

    # online: nothing slowed at first, the slowdown from the 8th new token on
    slow.off()
    model = cm.llm.load(cl, args.dir, weights=[1.0 / n] * n, rebalance=True, **options)
    stamps: list[float] = []

    def on_token(_t: int) -> None:
        stamps.append(time.perf_counter())
        if len(stamps) == 8:
            slow.on()

    result = model.generate(token_ids=ids, max_new_tokens=8 + args.online_tokens, stop_token_ids=[],
                            on_token=on_token)
    out["online"] = {"stamps": stamps, "rebalances": result.rebalances,
                     "shares": [round(float(w), 3) for w in model.weights], "summary": result.summary()}
    model.close()
    print("RESULT " + json.dumps(out), flush=True)


def alone_part(args: argparse.Namespace) -> None:
    import cmatrix as cm

    cl = cm.init(backends=args.backend)
    options = {"dtype": args.dtype} if args.dtype else {}
    r = decode_rate(cm, cl, args.dir, [1.0], args.tokens, prompt_ids(args.vocab, 8), **options)
    print("RESULT " + json.dumps({"alone": r}), flush=True)


# ---- the launcher -------------------------------------------------------------------------------

def run(argv: list[str], env: dict, what: str) -> dict:
    print(f"  {what} ...", flush=True)
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    for ln in proc.stdout.splitlines():
        if not ln.startswith("RESULT "):
            print("    " + ln)
    return json.loads(lines[-1][len("RESULT "):])


def report(res: dict, slow: float) -> None:
    n = res["ranks"]
    p = res["product"]
    best_s, best = min(((float(s), t) for s, t in p["search"].items()), key=lambda item: item[1])
    print(f"\n{n} ranks, rank {n - 1} slowed to about {slow:g} of its speed; auto shares (measured then): "
          f"{res['auto_init']}")
    print("\ndecode-shaped product, 1 x 4096 @ 4096 x 8192 float32 (ms per product; ratio to ideal):")
    print(f"  equal shares        {1e3 * p['equal']:8.2f}  {p['equal'] / best:5.2f}x")
    print(f"  auto shares         {1e3 * p['auto']:8.2f}  {p['auto'] / best:5.2f}x")
    print(f"  ideal (rank {n - 1} {best_s:g})  {1e3 * best:8.2f}  1.00x   "
          + ", ".join(f"{float(s):g}: {1e3 * t:.2f}" for s, t in p["search"].items()))
    llm = res["llm"]
    lbest_s, lbest = min(((float(s), r["s_per_token"]) for s, r in llm["search"].items()),
                         key=lambda item: item[1])
    print("\nLLM decoding (tokens/s; time per token as a ratio to ideal):")
    for label, r in (("equal shares", llm["equal"]), ("auto shares", llm["auto"])):
        print(f"  {label:19} {1 / r['s_per_token']:8.2f}  {r['s_per_token'] / lbest:5.2f}x   "
              f"shares {r['shares']}")
    print(f"  ideal (rank {n - 1} {lbest_s:g})  {1 / lbest:8.2f}  1.00x   "
          + ", ".join(f"{float(s):g}: {1 / r['s_per_token']:.2f}" for s, r in llm["search"].items()))
    if "alone" in res:
        print(f"  rank 0 alone        {1 / res['alone']['s_per_token']:8.2f}  "
              f"{res['alone']['s_per_token'] / lbest:5.2f}x   (one rank, nobody to wait for)")
    on = res["online"]
    stamps = on["stamps"]
    # the slowdown starts at token 8 (index 7); tokens 28..47 are the 20 after the 20th after it
    window = stamps[27:47]
    per = (window[-1] - window[0]) / (len(window) - 1)
    before = (stamps[7] - stamps[2]) / 5
    tail = stamps[-20:]
    steady = (tail[-1] - tail[0]) / (len(tail) - 1)
    print(f"\nonline rebalancing: {1 / before:.2f} tokens/s before the slowdown; tokens 20-40 after it "
          f"{1 / per:.2f} tokens/s, {per / lbest:.2f}x the ideal time per token (goal <= 1.15); "
          f"the last 20 tokens {1 / steady:.2f} tokens/s, {steady / lbest:.2f}x; shares now {on['shares']}")
    for line in on["rebalances"]:
        print(f"  {line}")
    print(f"  {on['summary']}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=2, help="2-4; the last one is slowed")
    ap.add_argument("--slow", type=float, default=0.25, help="the slowed rank's fraction of its speed")
    ap.add_argument("--how", choices=("competitors", "quota"), default="competitors",
                    help="busy processes on the slowed rank's core, or a CPU cgroup quota (root)")
    ap.add_argument("--tokens", type=int, default=24, help="decode tokens timed per measurement")
    ap.add_argument("--online-tokens", type=int, default=120,
                    help="tokens generated after the slowdown starts, online (a re-plan must pay for "
                         "itself over those still to come)")
    ap.add_argument("--small", action="store_true", help="a tiny model, for a quick smoke test")
    ap.add_argument("--dir", default=None, help="model folder (default /tmp/cmatrix-bench-llm[-small])")
    ap.add_argument("--backend", default="ggml")
    ap.add_argument("--dtype", default="bfloat16", help="the weights' type on the ranks ('' for float32)")
    ap.add_argument("--part", choices=("cluster", "alone"), default=None, help=argparse.SUPPRESS)
    ap.add_argument("--limit-file", default="", help=argparse.SUPPRESS)
    ap.add_argument("--limit", default="", help=argparse.SUPPRESS)
    ap.add_argument("--no-limit", default="", help=argparse.SUPPRESS)
    ap.add_argument("--vocab", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--core", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--competitors", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.part == "cluster":
        cluster_part(args)
        return 0
    if args.part == "alone":
        alone_part(args)
        return 0

    import slowdown

    from cmatrix.engine import launch

    if args.how == "quota" and slowdown.available():
        print(f"bench_balance: --how quota {slowdown.available()}", file=sys.stderr)
        return 2
    if not 2 <= args.ranks <= 4:
        print("bench_balance: --ranks 2 to 4", file=sys.stderr)
        return 2
    settings = SMALL if args.small else TINYLLAMA
    path = Path(args.dir or f"/tmp/cmatrix-bench-llm{'-small' if args.small else ''}")
    print(f"model: {path} ({'built' if ensure_checkpoint(path, settings) else 'reused'})", flush=True)
    env = launch.environment(threads=1)
    cores = sorted(os.sched_getaffinity(0))
    core_of = [cores[r % len(cores)] for r in range(args.ranks)]
    with tempfile.TemporaryDirectory() as cache, contextlib.ExitStack() as stack:
        env["CMATRIX_CACHE_DIR"] = cache  # measure afresh, slowed
        common = [str(HERE / "bench_balance.py"), "--dir", str(path), "--backend", args.backend,
                  "--dtype", args.dtype, "--tokens", str(args.tokens), "--vocab", str(settings["vocab_size"]),
                  "--how", args.how, "--online-tokens", str(args.online_tokens)]
        if args.how == "quota":
            quota = stack.enter_context(slowdown.CpuQuota("cmatrix-bench"))
            limit = str(int(args.slow * slowdown.PERIOD_US))
            common += ["--limit-file", str(quota.limit_file),
                       "--limit", limit if quota.v1 else f"{limit} 100000",
                       "--no-limit", "-1" if quota.v1 else "max 100000"]
            job = [sys.executable, *common, "--part", "cluster"]
            cmd = launch.command(args.ranks - 1, job) + [":", "-n", "1", *quota.enter(job)]
        else:
            common += ["--core", str(core_of[-1]), "--competitors", str(max(1, round(1 / args.slow) - 1))]
            job = [sys.executable, *common, "--part", "cluster"]
            cmd = launch.command(1, slowdown.pinned(core_of[0], job))
            for r in range(1, args.ranks):
                cmd += [":", "-n", "1", *slowdown.pinned(core_of[r], job)]
        res = run(cmd, env, f"{args.ranks} ranks, the last slowed to about {args.slow:g} ({args.how})")
        alone = [sys.executable, *common, "--part", "alone"]
        res.update(run(launch.command(1, slowdown.pinned(core_of[0], alone)), env, "rank 0 alone"))
    report(res, args.slow)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())

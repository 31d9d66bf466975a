"""Decode speed across hosts on slow links: tensor parallelism against pipeline stages and auto.

    python jobs/bench_links.py [--hosts 2,3] [--links none,gigabit,wifi] [--tokens 24]
                               [--small] [--dir DIR] [--dtype float32]

Needs root and ``ip netns`` (jobs/netcluster.py): each "host" is a network namespace with
its own name and address on a private switch; ``gigabit`` shapes every link to 1 Gbit/s,
``wifi`` to 100 Mbit/s with 2 ms added each way (a userspace relay: this kernel has no
netem), ``none`` leaves the kernel bridge unshaped. MPICH reaches the hosts through a
stand-in for ssh and talks over TCP (UCX_TLS=tcp,self), so every byte crosses the veths.

The model is bench_llm's TinyLlama shape cut to 8 layers (hidden 2048; --small: a tiny one),
built once into --dir. For every host count and link kind, one MPI job with one rank per host
(1 thread each) loads it three times, ``parallel="tp"``, ``"pp"`` and ``"auto"``, and decodes
--tokens greedy tokens each. Reported: decode tokens/s (after 4 warm-up tokens), KiB per
token that crossed the hosts' interfaces (their transmit counters, read by this process
between tokens), what auto chose and why, whether the three produced the same tokens,
and the ratios. Goal (issue 19): on the Wi-Fi-like link auto reaches >= 2.5x tensor
parallelism's tokens/s, and it is within 10% of the best layout on every link.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_llm import SMALL, TINYLLAMA, ensure_checkpoint, prompt_ids  # noqa: E402

MODEL = {**TINYLLAMA, "num_hidden_layers": 8}
LAYOUTS = ("tp", "pp", "auto")
WARMUP = 4
TIMEOUT = 1800


# ---- the MPI job (rank 0 runs this; the others serve) ------------------------------------------

def _handshake(sync: Path, name: str) -> None:
    """Tell the parent a window edge was reached; wait until it has read the counters."""
    (sync / name).write_text("")
    ack, until = sync / f"{name}.ack", time.monotonic() + 30
    while not ack.exists():
        if time.monotonic() > until:
            raise RuntimeError(f"no ack for {name}")
        time.sleep(0.002)


def job(args: argparse.Namespace) -> None:
    import cmatrix as cm

    cl = cm.init()
    sync = Path(args.sync)
    ids = prompt_ids(args.vocab, 8)
    out = {"ranks": [[r.host, r.backend] for r in cl.ranks]}
    for layout in LAYOUTS:
        options = {"dtype": args.dtype} if args.dtype else {}
        model = cm.llm.load(cl, args.dir, parallel=layout, rebalance=False, **options)
        stamps: list[float] = []

        def on_token(_t: int, layout: str = layout, stamps: list = stamps) -> None:
            stamps.append(time.perf_counter())
            if len(stamps) == WARMUP:
                _handshake(sync, f"{layout}.start")
                stamps.append(time.perf_counter())  # the decode window starts after the pause

        result = model.generate(token_ids=ids, max_new_tokens=args.tokens + WARMUP, stop_token_ids=[],
                                on_token=on_token)
        _handshake(sync, f"{layout}.end")
        steps = [b - a for a, b in zip(stamps[WARMUP:], stamps[WARMUP + 1:], strict=False)]
        out[layout] = {"s_per_token": statistics.median(steps), "tokens": result.token_ids,
                       "window_tokens": len(steps), "note": model.layout_note,
                       "stages": [[list(s.ranks), s.first, s.end] for s in model.stages or ()]}
        print(f"{layout}: {1 / out[layout]['s_per_token']:.2f} tokens/s; {model.layout_note}", flush=True)
        model.close()
    print("RESULT " + json.dumps(out), flush=True)


# ---- the parent: clusters, counters, report ---------------------------------------------------

def run_cluster(args: argparse.Namespace, hosts: int, link: str | None) -> dict:
    import netcluster

    with tempfile.TemporaryDirectory(prefix="cmatrix-links-") as tmp, \
            netcluster.NetCluster(hosts=hosts, link=link, folder=Path(tmp) / "net") as net:
        sync = Path(tmp) / "sync"
        sync.mkdir()
        env = net.env({**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                       "CMATRIX_THREADS": "1", "PYTHONUNBUFFERED": "1"})
        argv = [str(Path(sys.prefix) / "bin" / "mpiexec"), "-hosts", ",".join(net.names), "-n", str(hosts),
                sys.executable, str(Path(__file__).resolve()), "--part", "job", "--sync", str(sync),
                "--dir", str(args.dir), "--vocab", str(args.vocab), "--tokens", str(args.tokens)]
        if args.dtype:
            argv += ["--dtype", args.dtype]
        proc = net.popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines: list[str] = []

        def read() -> None:
            for line in proc.stdout:
                lines.append(line)
                sys.stdout.write("    " + line)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        counters: dict[str, dict] = {}
        began = time.monotonic()
        while proc.poll() is None:
            for edge in sorted(sync.glob("*.start")) + sorted(sync.glob("*.end")):
                ack = edge.with_name(edge.name + ".ack")
                if not ack.exists():
                    counters[edge.name] = net.counters()
                    ack.write_text("")
            if time.monotonic() - began > TIMEOUT:
                proc.kill()
                raise RuntimeError(f"{hosts} hosts, link {link}: no result in {TIMEOUT} s")
            time.sleep(0.002)
        reader.join(10)
        text = "".join(lines)
        found = [ln for ln in text.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not found:
            raise RuntimeError(f"{hosts} hosts, link {link}: job failed (exit {proc.returncode})\n{text}")
        res = json.loads(found[-1][len("RESULT "):])
        for layout in LAYOUTS:
            a, b = counters[f"{layout}.start"], counters[f"{layout}.end"]
            sent = sum(b[h][1] - a[h][1] for h in a)
            res[layout]["kib_per_token"] = sent / 1024 / res[layout]["window_tokens"]
        return res


def report(results: dict) -> None:
    print("\nhosts  link      layout  tokens/s  KiB/token  same tokens  chosen / why")
    verdicts = []
    for (hosts, link), res in results.items():
        rates = {lay: 1 / res[lay]["s_per_token"] for lay in LAYOUTS}
        same = all(res[lay]["tokens"] == res["tp"]["tokens"] for lay in LAYOUTS)
        for lay in LAYOUTS:
            note = res[lay]["note"] if lay == "auto" else ""
            print(f"{hosts:>5}  {link or 'none':8}  {lay:6}  {rates[lay]:8.2f}  "
                  f"{res[lay]['kib_per_token']:9.1f}  {'yes' if same else 'NO':11}  {note}")
        best = max(rates["tp"], rates["pp"])
        verdicts.append(f"{hosts} hosts, {link or 'none'}: auto/tp {rates['auto'] / rates['tp']:.2f}x, "
                        f"auto/best {rates['auto'] / best:.2f}x, pp/tp {rates['pp'] / rates['tp']:.2f}x")
    print("\n" + "\n".join(verdicts))
    print("goal: on wifi auto/tp >= 2.5x; auto/best >= 0.90 on every link")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hosts", default="2,3")
    ap.add_argument("--links", default="none,gigabit,wifi")
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--small", action="store_true", help="a tiny model (a smoke test)")
    ap.add_argument("--dir", default=None, help="model folder (default /tmp/cmatrix-bench-links[-small])")
    ap.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"))
    ap.add_argument("--part", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--sync", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--vocab", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.part == "job":
        job(args)
        return 0
    import netcluster

    reason = netcluster.skip_reason()
    if reason:
        print(f"bench_links: cannot build the namespace cluster: {reason}", file=sys.stderr)
        return 2
    settings = dict(SMALL) if args.small else dict(MODEL)
    args.dir = Path(args.dir or f"/tmp/cmatrix-bench-links{'-small' if args.small else ''}")
    args.vocab = settings["vocab_size"]
    if ensure_checkpoint(args.dir, settings):
        print(f"built {args.dir}")
    results = {}
    for hosts in (int(h) for h in args.hosts.split(",")):
        for link in args.links.split(","):
            kind = None if link == "none" else link
            print(f"{hosts} hosts, link {link}:", flush=True)
            results[(hosts, kind)] = run_cluster(args, hosts, kind)
    report(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Self-checks of jobs/netcluster.py (``python jobs/netcluster.py --check``, under a minute).

For every link kind: each host has its own name and resolves the others; a TCP round trip and a
bulk transfer between h1 and h2 (wifi: about 4 ms and 100 Mbit/s; gigabit: about 1 Gbit/s unless
the machine is slower); an MPI Allreduce of 8 MB over h1,h2,h3 whose bytes really cross h2's
eth0; and the ssh stand-in's error for an unknown host. Then 2 ranks on one host, and that
nothing is left behind after an exception in the ``with`` block or Ctrl-C of the command line.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from netcluster import JOBS, LINKS, NETNS_DIR, NetCluster

MPIEXEC = str(Path(sys.executable).parent / "mpiexec")
ALLREDUCE = ("from mpi4py import MPI; import socket, numpy as np; c = MPI.COMM_WORLD; a = np.ones(1 << 20); "
             "c.Allreduce(MPI.IN_PLACE, a); names = c.gather(socket.gethostname()); "
             "c.rank or print(' '.join(sorted(names)), a.min(), a.max(), flush=True)")
PROBE = r"""
import socket, statistics, sys, time
if sys.argv[1] == "serve":
    server = socket.create_server(("", 0))
    print(server.getsockname()[1], flush=True)
    echo, _ = server.accept()
    while data := echo.recv(64):
        echo.sendall(data)
    bulk, _ = server.accept()
    total = 0
    while data := bulk.recv(1 << 20):
        total += len(data)
    bulk.sendall(str(total).encode())
else:
    host, port, size = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    c = socket.create_connection((host, port))
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    rtts = []
    for _ in range(30):
        t = time.perf_counter(); c.sendall(b"x"); c.recv(1); rtts.append(time.perf_counter() - t)
    c.close()
    c = socket.create_connection((host, port))
    block, sent, t = bytes(1 << 20), 0, time.perf_counter()
    while sent < size:
        c.sendall(block); sent += len(block)
    c.shutdown(socket.SHUT_WR)
    got = int(c.recv(64))
    print(statistics.median(rtts) * 1e3, got * 8 / (time.perf_counter() - t) / 1e6, got)
"""
EXPECT = {None: (0, 1.0, 1000, 1e9), "gigabit": (0, 1.0, 500, 1250), "wifi": (3.5, 6.0, 75, 125)}


def _verdict(good: bool, done: subprocess.CompletedProcess) -> str:
    return "ok" if good else f"FAILED (exit {done.returncode}): {done.stderr[-600:]}"


def _hosts(done: subprocess.CompletedProcess) -> list[str]:
    """The ranks' host names that ALLREDUCE printed, if the sum was right everywhere."""
    words = done.stdout.split()
    return words[:-2] if words[-2:] == ["3.0", "3.0"] else []


def _ours(prefix: str) -> list[str]:
    return sorted(p.name for p in NETNS_DIR.glob(f"{prefix}-*"))


def probe(net: NetCluster, size: int) -> tuple[float, float]:
    """(median TCP round trip in ms, bulk Mbit/s) from h1 to h2, by name."""
    server = net.popen([sys.executable, "-c", PROBE, "serve"], host="h2", stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None
    port = server.stdout.readline().strip()
    done = net.run([sys.executable, "-c", PROBE, "client", "h2", port, str(size)], capture_output=True,
                   text=True, timeout=60, check=True)
    server.wait(10)
    rtt, mbit, _ = done.stdout.split()
    return float(rtt), float(mbit)


def check_link(link: str | None, say: list[str]) -> bool:
    """Names, round trip, throughput and an MPI Allreduce on a 3-host cluster with ``link``."""
    ok = True
    with NetCluster(3, link) as net:
        name = link or "unshaped"
        say.append(f"[{name}] up in {net.up_seconds:.3f} s: {' '.join(net.addresses)}")
        for host in net.names:
            done = net.run(["sh", "-c", "hostname; getent hosts h2"], host, capture_output=True, text=True)
            lines = done.stdout.split()
            good = lines[:1] == [host] and lines[1:] == [net.addresses[1], "h2"]
            ok &= good
            say.append(f"  {host}: hostname/getent -> {' '.join(lines)} {'ok' if good else 'WRONG'}")
        low_rtt, high_rtt, low_bw, high_bw = EXPECT[link]
        rtt, mbit = probe(net, {None: 250, "gigabit": 125, "wifi": 25}[link] << 20)
        good = low_rtt <= rtt <= high_rtt and low_bw <= mbit <= high_bw
        ok &= good
        say.append(f"  TCP h1->h2: round trip {rtt:.3f} ms, bulk {mbit:.0f} Mbit/s "
                   f"{'ok' if good else 'OUT OF RANGE'}")
        before, start = net.counters(), time.monotonic()
        done = net.run([MPIEXEC, "-hosts", "h1,h2,h3", "-n", "3", sys.executable, "-c", ALLREDUCE],
                       env=net.env(), capture_output=True, text=True, timeout=60)
        seconds, after = time.monotonic() - start, net.counters()
        rx, tx = (after["h2"][i] - before["h2"][i] for i in (0, 1))
        names = _hosts(done)
        good = done.returncode == 0 and names == net.names and rx > 4e6 and tx > 4e6
        ok &= good
        say.append(f"  mpiexec -hosts h1,h2,h3 Allreduce 8 MB: {seconds:.2f} s, hosts {names}, h2 eth0 "
                   f"rx {rx / 1e6:.1f} MB tx {tx / 1e6:.1f} MB {_verdict(good, done)}")
        done = subprocess.run([str(net.standin), "-x", "h9", "true"], capture_output=True, text=True)
        good = done.returncode == 255 and "Could not resolve hostname h9" in done.stderr
        ok &= good
        say.append(f"  stand-in, unknown host: exit {done.returncode}, {done.stderr.strip()!r} "
                   f"{'ok' if good else 'WRONG'}")
    say.append(f"  torn down in {net.down_seconds:.3f} s, left: {_ours(net.id) or 'nothing'}")
    return ok and not _ours(net.id)


def check_two_on_one(say: list[str]) -> bool:
    """``-hosts h1:2,h2:1``: two ranks on h1, one on h2."""
    with NetCluster(2, "gigabit") as net:
        done = net.run([MPIEXEC, "-hosts", "h1:2,h2:1", "-n", "3", sys.executable, "-c", ALLREDUCE],
                       env=net.env(), capture_output=True, text=True, timeout=60)
        names = _hosts(done)
    good = done.returncode == 0 and names == ["h1", "h1", "h2"]
    say.append(f"[gigabit] -hosts h1:2,h2:1: hosts {names} {_verdict(good, done)}")
    return good


def check_teardown(say: list[str]) -> bool:
    """Nothing is left after an exception inside ``with``, nor after Ctrl-C of the command line."""
    net = NetCluster(2, "wifi")
    try:
        with net:
            raise KeyError("on purpose")
    except KeyError:
        pass
    left = _ours(net.id)
    argv = [sys.executable, str(JOBS / "netcluster.py"), "--hosts", "2", "--link", "wifi", "--", "sleep", "9"]
    cli = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    assert cli.stderr is not None
    line = cli.stderr.readline()  # "netcluster: 2 hosts ..., up in ..."
    prefix = f"cmx{cli.pid}x"
    up = [p.name for p in NETNS_DIR.glob(f"{prefix}*")]
    cli.send_signal(signal.SIGINT)
    cli.wait(20)
    after = [p.name for p in NETNS_DIR.glob(f"{prefix}*")]
    good = not left and len(up) == 3 and not after
    say.append(f"teardown: after an exception {left or 'nothing'} left; command line {line.strip()!r}, "
               f"{len(up)} namespaces up, after Ctrl-C (exit {cli.returncode}) {after or 'nothing'} left "
               f"{'ok' if good else 'WRONG'}")
    return good


def selfcheck() -> int:
    """Run every check, print what each measured; 0 when all passed, else 1."""
    start, ok = time.monotonic(), True
    for check in [*(lambda say, k=k: check_link(k, say) for k in LINKS), check_two_on_one, check_teardown]:
        say: list[str] = []
        try:
            ok &= check(say)
        except Exception as e:  # report and go on with the other checks
            ok = False
            say.append(f"check failed: {type(e).__name__}: {e}")
        print("\n".join(say), flush=True)
    print(f"netcluster self-check {'passed' if ok else 'FAILED'} in {time.monotonic() - start:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(selfcheck())

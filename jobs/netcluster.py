"""A home cluster of a few hosts, simulated with network namespaces on this machine (needs root).

Each host is a network namespace whose one interface, ``eth0`` (a veth), leads to a port of a
switch in a namespace of its own: a kernel bridge (``link=None``, ``"gigabit"``), or for
``"wifi"`` jobs/netrelay.py, which holds every frame back 2 ms (this kernel has no netem).
:data:`LINKS` says where HTB limits the rate, on both ends of every veth.

A process enters a host through the cluster's ssh stand-in (jobs/netssh.py), an executable in
the cluster's folder: it joins the host's network namespace, gets a UTS namespace named after the
host and a private mount namespace with the cluster's /etc/hosts, the host's /sys and the host's
home. Nothing is mounted outside; the machine's /etc/hosts is not touched. MPICH's hydra starts
its proxies through the stand-in (``HYDRA_LAUNCHER_EXEC``), just as it would through ssh, and
:meth:`NetCluster.env` keeps UCX on TCP over eth0 (it would see one machine and use shared
memory). HOME is one path in every host with each host's own folder behind it; the rest of the
file system (/tmp, /dev/shm, the checkout) is shared by all hosts, like an NFS mount would be.

    with NetCluster(hosts=3, link="wifi") as net:
        net.run([mpiexec, "-hosts", "h1,h2,h3", "-n", "3", python, "job.py"], env=net.env())
        print(net.counters())

    python jobs/netcluster.py --hosts 3 --link wifi -- CMD ARGS...   # CMD on h1
    python jobs/netcluster.py --check                                # jobs/netcheck.py's checks
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

JOBS = Path(__file__).resolve().parent
NETNS_DIR = Path("/run/netns")
PREFIX = "cmx"  # namespace names: cmx<owner pid>x<serial>-sw, -h1, -h2, ...
_NAME = re.compile(r"^cmx(\d+)x(\d+)-(sw|h\d+)$")
_SERIAL = itertools.count()
if str(JOBS) not in sys.path:
    sys.path.insert(0, str(JOBS))
import netssh  # noqa: E402


class Link(NamedTuple):
    """How the hosts are wired: HTB rate on every veth end (None: unshaped), one-way delay."""

    rate: str | None
    delay: float
    about: str


LINKS: dict[str | None, Link] = {
    None: Link(None, 0.0, "unshaped kernel bridge"),
    "gigabit": Link("1gbit", 0.0, "kernel bridge, HTB 1gbit on both ends of every veth"),
    "wifi": Link("100mbit", 0.002, "user-space relay holding each frame 2 ms, HTB 100mbit on both ends"),
}


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists (the owner of a cluster's namespaces)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _remove_namespaces(names: list[str]) -> None:
    """Kill what still runs in the namespaces ``names``, then delete them."""
    if not names:
        return
    for name in names:
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout
        for pid in pids.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
    subprocess.run(["ip", "-force", "-batch", "-"], input="".join(f"netns del {n}\n" for n in names),
                   capture_output=True, text=True)


def _remove_stale(own: str) -> None:
    """Remove namespaces named ``own``, and namespaces and temporary folders of clusters whose
    owning process has died (killed before it could tear its cluster down)."""
    def stale(name: str) -> bool:
        m = _NAME.match(name)
        return m is not None and (name.startswith(own + "-") or not _alive(int(m[1])))

    _remove_namespaces([p.name for p in NETNS_DIR.glob(f"{PREFIX}*") if stale(p.name)])
    for folder in Path(tempfile.gettempdir()).glob(f"netcluster-{PREFIX}*"):
        if stale(folder.name.removeprefix("netcluster-") + "-sw"):
            shutil.rmtree(folder, ignore_errors=True)


def _batch(tool: str, netns: str | None, lines: list[str]) -> None:
    """Run ``lines`` as one ``ip`` or ``tc`` batch, inside namespace ``netns`` (None: here)."""
    where = ["-n", netns] if netns else []
    done = subprocess.run([tool, *where, "-batch", "-"], input="\n".join(lines) + "\n",
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{tool} {' '.join(where)} -batch failed: {done.stderr.strip()}")


_SKIP: list[str | None] = []


def skip_reason() -> str | None:
    """None when a NetCluster can be built here, else why not. Probes once (a throwaway
    namespace with a veth pair and an HTB qdisc, deleted at once); the answer is remembered."""
    if _SKIP:
        return _SKIP[0]
    why = None
    if not sys.platform.startswith("linux"):
        why = "network namespaces need Linux"
    elif os.geteuid() != 0:
        why = "needs root (network namespaces, veth, tc)"
    elif not shutil.which("ip") or not shutil.which("tc"):
        why = "needs iproute2's ip and tc"
    elif not hasattr(netssh.libc(), "setns"):
        why = "libc has no setns"
    else:
        name = f"{PREFIX}{os.getpid()}x{next(_SERIAL)}-sw"
        steps = [["ip", "netns", "add", name],
                 ["ip", "-n", name, "link", "add", "p1", "type", "veth", "peer", "name", "p2"],
                 ["tc", "-n", name, "qdisc", "add", "dev", "p1", "root", "handle", "1:", "htb"],
                 ["unshare", "--mount", "--uts", "--propagation", "private", "true"]]
        try:
            for step in steps:
                done = subprocess.run(step, capture_output=True, text=True, timeout=20)
                if done.returncode != 0:
                    why = f"cannot run {shlex.join(step)}: {done.stderr.strip()}"
                    break
        except (OSError, subprocess.TimeoutExpired) as e:
            why = f"cannot probe network namespaces: {e}"
        finally:
            _remove_namespaces([name] if (NETNS_DIR / name).exists() else [])
    _SKIP.append(why)
    return why


class NetCluster:
    """Hosts h1..hN on a simulated switch; a context manager that removes everything on exit."""

    def __init__(self, hosts: int = 3, link: str | None = None, folder: str | Path | None = None,
                 own_homes: bool = False) -> None:
        if link not in LINKS:
            raise ValueError(f"link must be one of {list(LINKS)}, not {link!r}")
        if not 1 <= hosts <= 9:
            raise ValueError(f"hosts must be 1..9, not {hosts}")
        self.link, self.spec = link, LINKS[link]
        #: True: each host's HOME is a path of its own (as /Users/you on a Mac beside /home/you),
        #: not one path showing each host's folder; a rank that takes the driver's HOME then
        #: writes into the driver's home
        self.own_homes = own_homes
        self.id = f"{PREFIX}{os.getpid()}x{next(_SERIAL)}"
        subnet = (os.getpid() * 7 + int(self.id.rpartition("x")[2])) % 250 + 2
        self.names = [f"h{i}" for i in range(1, hosts + 1)]
        self.addresses = [f"10.213.{subnet}.{i}" for i in range(1, hosts + 1)]
        self.switch = f"{self.id}-sw"
        self.netns = {h: f"{self.id}-{h}" for h in self.names}
        self._own_folder = folder is None  # made on entry, removed on exit
        self.folder = Path(tempfile.gettempdir() if folder is None else folder).resolve()
        if folder is None:
            self.folder /= f"netcluster-{self.id}"
        self.standin = self.folder / "ssh"
        self.home_path = self.folder / "home"
        self.relay: subprocess.Popen | None = None
        self._procs: list[subprocess.Popen] = []
        self.up_seconds = self.down_seconds = 0.0

    def home(self, host: str) -> Path:
        """Where ``host``'s own HOME folder lies, seen from outside the cluster. Inside every host
        HOME is the same path, :attr:`home_path`, showing that host's folder (as ``/home/user`` is
        on real machines; hydra passes mpiexec's HOME on to every rank)."""
        if host not in self.netns:
            raise KeyError(f"no host {host!r} in {self.names}")
        return self.folder / "homes" / host

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment (``base``, default os.environ) for MPICH's mpiexec inside a host: hydra
        launches through the stand-in, UCX speaks TCP over eth0 only (not shared memory, although
        all hosts are one machine), HOME is :attr:`home_path` (the host's own home in each host)."""
        env = {k: v for k, v in (os.environ if base is None else base).items()
               if not k.startswith(("PMI_", "PMIX_", "HYDI_", "MPI_LOCAL"))}
        env.update(HYDRA_LAUNCHER="ssh", HYDRA_LAUNCHER_EXEC=str(self.standin), UCX_TLS="tcp,self",
                   UCX_NET_DEVICES="eth0", HOME=str(self.home("h1") if self.own_homes else self.home_path))
        return env

    def command(self, argv: list[str], host: str = "h1") -> list[str]:
        """``argv`` wrapped so that it runs inside ``host`` (no shell in between)."""
        self.home(host)
        return [str(self.standin), netssh.EXEC, host, "--", *map(str, argv)]

    def popen(self, argv: list[str], host: str = "h1", env: dict[str, str] | None = None,
              **kw: Any) -> subprocess.Popen:
        """Start ``argv`` inside ``host`` (env None: :meth:`env`)."""
        env = self.env() if env is None else env
        proc = subprocess.Popen(self.command(argv, host), env=env, **kw)
        self._procs.append(proc)
        return proc

    def run(self, argv: list[str], host: str = "h1", env: dict[str, str] | None = None,
            timeout: float | None = 120, **kw: Any) -> subprocess.CompletedProcess:
        """Run ``argv`` inside ``host`` to its end, like subprocess.run (``input``, ``check`` and
        ``capture_output`` too); on timeout or Ctrl-C its whole process group is killed."""
        check, data = kw.pop("check", False), kw.pop("input", None)
        if kw.pop("capture_output", False):
            kw["stdout"] = kw["stderr"] = subprocess.PIPE
        if data is not None:
            kw["stdin"] = subprocess.PIPE
        kw.setdefault("start_new_session", True)
        proc = self.popen(argv, host, env, **kw)
        try:
            out, err = proc.communicate(data, timeout=timeout)
        except BaseException:
            if kw["start_new_session"]:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            proc.kill()
            proc.communicate()
            raise
        result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        if check:
            result.check_returncode()
        return result

    def counters(self) -> dict[str, tuple[int, int]]:
        """Per host: (rx_bytes, tx_bytes) of its eth0."""
        out = {}
        for host, netns in self.netns.items():
            done = subprocess.run(["ip", "-n", netns, "-s", "-j", "link", "show", "dev", "eth0"],
                                  capture_output=True, text=True, check=True)
            stats = json.loads(done.stdout)[0]["stats64"]
            out[host] = (stats["rx"]["bytes"], stats["tx"]["bytes"])
        return out

    def hostfile(self, path: str | Path, slots: dict[str, int] | None = None) -> Path:
        """Write an MPICH hostfile, one ``name:k`` line per host (slots None: every host once)."""
        slots = dict.fromkeys(self.names, 1) if slots is None else slots
        for host in slots:
            self.home(host)
        path = Path(path)
        path.write_text("".join(f"{h}:{k}\n" for h, k in slots.items() if k > 0))
        return path

    def __enter__(self) -> NetCluster:
        """Bring the cluster up (what was made is removed again if that fails)."""
        start = time.monotonic()
        try:
            self._up()
        except BaseException:
            self._down()
            raise
        self.up_seconds = time.monotonic() - start
        return self

    def __exit__(self, *exc: object) -> None:
        """Tear everything down: processes inside, namespaces, relay, own folder (Ctrl-C waits)."""
        start = time.monotonic()
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        try:
            self._down()
        finally:
            if main:
                signal.signal(signal.SIGINT, previous)
        self.down_seconds = time.monotonic() - start

    def _up(self) -> None:
        """Namespaces, veths, switch, addresses, rate limits, relay; then wait for the links."""
        _remove_stale(self.id)
        self._write_files()
        _batch("ip", None, [f"netns add {n}" for n in [self.switch, *self.netns.values()]])
        ports = [f"p{i}" for i in range(1, len(self.names) + 1)]
        # Port i gets ifindex 10+i, never its peer's (2): the kernel delays up to 1 s the carrier
        # news of a veth whose ifindex equals its peer's, and UCX would skip a not-yet-running eth0.
        lines = [f"link add {p} index {10 + i} type veth peer name eth0 netns {self.netns[h]}"
                 for i, (p, h) in enumerate(zip(ports, self.names, strict=True))]
        lines += [f"link set {p} addrgenmode none" for p in ports]
        if self.spec.delay == 0:
            lines += ["link add br0 type bridge forward_delay 0 stp_state 0", "link set br0 addrgenmode none",
                      *(f"link set {p} master br0" for p in ports), "link set br0 up"]
        _batch("ip", self.switch, lines)
        for host, address in zip(self.names, self.addresses, strict=True):
            _batch("ip", self.netns[host], ["link set lo up", "link set eth0 addrgenmode none",
                                            f"addr add {address}/24 dev eth0", "link set eth0 up"])
        _batch("ip", self.switch, [f"link set {p} up" for p in ports])
        if rate := self.spec.rate:
            for netns, devices in [(self.switch, ports), *((n, ["eth0"]) for n in self.netns.values())]:
                _batch("tc", netns, [line for d in devices for line in (
                    f"qdisc add dev {d} root handle 1: htb default 10",
                    f"class add dev {d} parent 1: classid 1:10 htb rate {rate} ceil {rate} quantum 65536")])
        if self.spec.delay:
            self._start_relay(ports)
        self._wait_up()

    def _wait_up(self, seconds: float = 5.0) -> None:
        """Wait until every eth0 is operationally up: UCX skips an interface that is not."""
        deadline = time.monotonic() + seconds
        for netns in self.netns.values():
            while True:
                done = subprocess.run(["ip", "-n", netns, "-j", "link", "show", "dev", "eth0"],
                                      capture_output=True, text=True, check=True)
                if json.loads(done.stdout)[0]["operstate"] == "UP":
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"eth0 in {netns} did not come up within {seconds} s")
                time.sleep(0.02)

    def _write_files(self) -> None:
        """The folder: homes, mount points, hosts file, cluster.json and the ssh stand-in."""
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / ".cgroup").mkdir(exist_ok=True)  # mount point, used inside private namespaces only
        for host in self.names:
            self.home(host).mkdir(parents=True, exist_ok=True)
        self.home_path.mkdir(exist_ok=True)  # mount point of each host's home, inside the hosts
        hosts_file = self.folder / "hosts"
        pairs = zip(self.names, self.addresses, strict=True)
        hosts_file.write_text("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
                              + "".join(f"{a}\t{h}\n" for h, a in pairs))
        config = {"hosts": {h: {"netns": str(NETNS_DIR / self.netns[h]), "home": str(self.home(h))}
                            for h in self.names},
                  "aliases": dict(zip(self.addresses, self.names, strict=True)),
                  "hosts_file": str(hosts_file), "home": str(self.home_path),
                  "stash": str(self.folder / ".cgroup"), "own_homes": self.own_homes}
        (self.folder / "cluster.json").write_text(json.dumps(config, indent=1))
        self.standin.write_text(
            f"#!{sys.executable}\n\"\"\"ssh stand-in of the NetCluster in this folder.\"\"\"\n"
            f"import sys\nsys.path.insert(0, {str(JOBS)!r})\nimport netssh  # noqa: E402\n"
            f"sys.exit(netssh.standin(sys.argv[1:], {str(self.folder / 'cluster.json')!r}))\n")
        self.standin.chmod(0o755)

    def _start_relay(self, ports: list[str]) -> None:
        """Start jobs/netrelay.py in the switch namespace and wait until its ports are open."""
        relay, delay = str(JOBS / "netrelay.py"), f"{self.spec.delay:.6f}"
        argv = ["ip", "netns", "exec", self.switch, sys.executable, relay, "--delay", delay]
        self.relay = subprocess.Popen([*argv, *ports], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.relay.stdout is not None
        ready, _, _ = select.select([self.relay.stdout], [], [], 30)
        line = self.relay.stdout.readline() if ready else b""
        if line.strip() != b"ready":
            raise RuntimeError(f"the wifi relay did not start (exit status {self.relay.poll()})")

    def _down(self) -> None:
        """Stop the relay, kill what runs inside the hosts, delete the namespaces and own folder."""
        if self.relay is not None:
            assert self.relay.stdin is not None
            self.relay.stdin.close()  # end of file: the relay stops
            try:
                self.relay.wait(5)
            except subprocess.TimeoutExpired:
                self.relay.kill()
                self.relay.wait()
            self.relay = None
        _remove_namespaces([n for n in [self.switch, *self.netns.values()] if (NETNS_DIR / n).exists()])
        for proc in self._procs:  # reap what popen() started (killed above if it was still running)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
        self._procs.clear()
        if self._own_folder:
            shutil.rmtree(self.folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """Command line: bring a cluster up, run CMD on h1 with env(), print byte counters, tear down."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, default=3)
    parser.add_argument("--link", choices=[k for k in LINKS if k], default=None)
    parser.add_argument("--folder", default=None, help="the cluster's folder (default: a temporary one)")
    parser.add_argument("--check", action="store_true", help="run the self-checks (jobs/netcheck.py)")
    parser.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD ARGS... to run on h1")
    args = parser.parse_args(argv)
    why = skip_reason()
    if why:
        print(f"netcluster: {why}", file=sys.stderr)
        return 2
    if args.check:
        import netcheck

        return netcheck.selfcheck()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill ends here too, via __exit__
    net, status = NetCluster(args.hosts, args.link, args.folder), 130
    try:
        with net:
            print(f"netcluster: hosts {dict(zip(net.names, net.addresses, strict=True))}, link "
                  f"{net.link or 'unshaped'}, up in {net.up_seconds:.2f} s, folder {net.folder}",
                  file=sys.stderr)
            before = net.counters()
            if cmd:
                status = net.run(cmd, env=net.env(), timeout=None, start_new_session=False).returncode
            else:
                status = 0
            for host, (rx, tx) in net.counters().items():
                print(f"netcluster: {host} eth0 rx {rx - before[host][0]} B, tx {tx - before[host][1]} B",
                      file=sys.stderr)
    except KeyboardInterrupt:
        print("netcluster: interrupted", file=sys.stderr)
    print(f"netcluster: torn down in {net.down_seconds:.2f} s", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())

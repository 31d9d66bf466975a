"""Checks of the seed's cluster lists, and the one cluster they all describe.

The seed configured every matrix with four parallel lists (IPs, accelerator
flags, percentages, backends). Here MPI decides where ranks run, so the lists
are checked against the world MPI started: one entry per rank, entry i naming
rank i's host. Every check raises :class:`InputError` before any data moves.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .. import backends
from ..api import session
from ..api.cluster import Cluster
from ..core import shares as sh
from ..core.plan import validate_weights
from ..engine import hostaddr
from ..errors import InputError
from ..ops.setup import identify

LISTS = ("node_IP_list", "CPU_GPU_select_list", "node_percentages", "back_end_select_list")


def _as_list(value: Any, arg: str) -> list:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise InputError(f"{arg}: expected a list with one entry per rank, got {value!r}")
    return list(value)


def check_lists(ips: Any, accel: Any, percentages: Any, backends_: Any,
                size: int) -> tuple[list[str], list[bool], list[float], list[str]]:
    """The four lists, checked against each other and against the ``size`` ranks MPI started."""
    values = [_as_list(v, arg) for v, arg in zip((ips, accel, percentages, backends_), LISTS, strict=True)]
    lengths = {arg: len(v) for arg, v in zip(LISTS, values, strict=True)}
    if len(set(lengths.values())) > 1:
        detail = ", ".join(f"{arg} has {n}" for arg, n in lengths.items())
        raise InputError(f"the cluster lists must have one entry per node and the same length: {detail}")
    if lengths["node_IP_list"] != size:
        raise InputError(
            f"node_IP_list has {lengths['node_IP_list']} entries but this job runs {size} MPI rank(s); "
            f"start it with mpirun -n {lengths['node_IP_list']} (a host listed k times in the hostfile "
            f"gets k ranks), or list one IP per rank: {values[0]}")
    ip_list, accel_list, pct, names = values
    for i, ip in enumerate(ip_list):
        if not isinstance(ip, str) or not ip.strip():
            raise InputError(f"node_IP_list: entry {i} must be a host name or IP address, got {ip!r}")
    for i, flag in enumerate(accel_list):
        if not isinstance(flag, bool):
            raise InputError(f"CPU_GPU_select_list: entry {i} must be True or False, got {flag!r}")
    shares = [float(x) for x in validate_weights(pct, size, "node_percentages")]
    canon = [backends.canonical(n, f"back_end_select_list[{i}]") for i, n in enumerate(names)]
    return ip_list, accel_list, shares, canon


def match_hosts(ip_list: Sequence[str], hosts: Sequence[dict]) -> None:
    """Entry i must be rank i's host: its name, one of its addresses, or loopback
    when the whole job runs on one host. A mismatch lists both sides.

    ``hosts``: per rank, ``{"rank", "host", "addresses"}`` (see the identify command).
    """
    one_host = len({h["host"] for h in hosts}) == 1
    problems = []
    for entry, h in zip(ip_list, hosts, strict=True):
        if hostaddr.is_loopback(entry):
            if not one_host:
                problems.append(f"  entry {h['rank']} {entry!r} is a loopback address, which cannot say "
                                f"which host rank {h['rank']} is on in a job spanning several hosts")
            continue
        if hostaddr.normalise(entry) not in h["addresses"] and entry.lower() != h["host"].lower():
            problems.append(f"  entry {h['rank']} {entry!r} is not rank {h['rank']}'s host {h['host']!r}")
    if problems:
        world = "\n".join(f"  rank {h['rank']}: {h['host']} "
                          f"({', '.join(h['addresses']) or 'no address found'})" for h in hosts)
        raise InputError("node_IP_list does not match the ranks MPI started:\n" + "\n".join(problems)
                         + f"\nnode_IP_list: {list(ip_list)}\nranks:\n{world}\n"
                         "List rank i's host (name or address) as entry i, in hostfile order.")


def even_percentages(n: int) -> list[float]:
    """The seed's default split: whole percent each, the remainder one by one to the first nodes."""
    base, remainder = divmod(100, n)
    return [(base + (1 if i < remainder else 0)) / 100 for i in range(n)]


class cluster_zmq:  # noqa: N801 - the seed's name, kept so its scripts run unchanged
    """The seed's cluster object, ``cluster_zmq(IP_list)``: the node list (entry i names rank
    i's host, checked against the ranks MPI started, as ``node_IP_list`` is) and the per-node
    defaults a ``cluster_matrix`` takes for the lists it omits: the GGML backend ("llama") and
    the accelerator on; its percentages left out, shares follow each rank's measured speed
    (``default_node_percentages`` keeps the seed's even split, whole percent each). Nothing here
    opens a socket: MPI carries everything."""

    def __init__(self, node_IP_list: Any) -> None:  # noqa: N803
        ips = _as_list(node_IP_list, "node_IP_list")
        n = len(ips)
        if n == 0:
            raise InputError("node_IP_list: empty; list one host per rank")
        self.default_node_percentages = even_percentages(n)
        self.default_back_end_select_list = ["llama"] * n
        self.default_CPU_GPU_select_list = [True] * n
        self.node_IP_list, _, _, _ = check_lists(ips, self.default_CPU_GPU_select_list,
                                                 self.default_node_percentages,
                                                 self.default_back_end_select_list, session.world_size())
        self.num_nodes = n
        self.cluster = session.driver_cluster()  # a worker serves here, then exits
        match_hosts(self.node_IP_list, _hosts(self.cluster))

    def cleanup(self) -> None:
        """The seed closed its sockets here; MPI ends with the job, so there is nothing to do."""

    def __repr__(self) -> str:
        return f"<cluster_zmq {len(self.node_IP_list)} node(s): {self.node_IP_list}>"


def connect(ips: Any, accel: Any, percentages: Any, backends_: Any) -> tuple[Cluster, list[float]]:
    """The job's cluster, started on first use with these backends and accelerator flags.

    On worker ranks (a script started on every rank by plain ``mpirun``) this
    serves the driver and exits the process, as :func:`cmatrix.init` does.
    The hosts are matched before the first call configures the cluster, so a
    call refused for its IP list leaves the backends still to be chosen.
    Returns the cluster and the checked percentages (the shares of this matrix); "auto":
    shares from the ranks' measured speed (see :mod:`cmatrix.ops.speed`).
    """
    auto = isinstance(percentages, str) and percentages == "auto"
    size = session.world_size()
    checked = even_percentages(size) if auto else percentages
    ip_list, accel_list, shares, names = check_lists(ips, accel, checked, backends_, size)
    cluster = session.driver_cluster()  # a worker serves here, then exits
    match_hosts(ip_list, _hosts(cluster))
    config = cluster.driver.config
    if config is None:
        cluster.configure("auto" if auto else shares, names, accel=accel_list)
        return cluster, [float(w) for w in cluster.weights] if auto else shares
    if list(config.backends) != names or list(config.accel) != accel_list:
        raise InputError(f"this job's cluster already runs back_end_select_list={list(config.backends)}, "
                         f"CPU_GPU_select_list={list(config.accel)}; every cluster_matrix of one job must "
                         f"use the same, got {names} and {accel_list}")
    if auto:
        return cluster, auto_percentages(cluster)
    return cluster, shares


def auto_percentages(cluster: Cluster) -> list[float]:
    """Shares from the ranks' measured speed (the cluster's own when it was started with them)."""
    d = cluster.driver
    if d.auto_weights:
        return [float(w) for w in d.weights]
    return sh.suggested(cluster.speed_profiles(), "gemm", "float32")


#: every rank's host and addresses, asked once per job (the answer cannot change)
_known_hosts: list[dict] | None = None


def _hosts(cluster: Cluster) -> list[dict]:
    global _known_hosts
    if _known_hosts is None:
        _known_hosts = identify(cluster.driver)
    return _known_hosts

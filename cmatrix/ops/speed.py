"""Measured speed: every rank times, on its own backend and device, the products that dominate
real work, and the driver turns the rates into shares. Both halves of ``speed_profile`` are here.

Per weight type (float32, the 16-bit type the backend keeps, q8_0, q4_0) a rank times a
decode-shaped product (one row against a large weight matrix: bandwidth bound, reported
in GB/s of the weights as the rank stores them) and a prefill-shaped one (many rows:
compute bound, GFLOP/s). All ranks measure at once, so ranks sharing a host's cores
or memory bus measure what they get while the others work too. Each also notes how much of
that time the kernel held it back (another program on its core, a CPU quota).

A profile is saved on the rank's own host, in the cache folder
(``profiles/HOST-BACKEND-DEVICE-tTHREADS-lLOCALRANK.json``: one per device slot), and
reused until ``remeasure``, so shares come out the same job after job (a split cached on
the nodes' disks stays valid); a file that is unreadable or incomplete is measured again.
"held" is saved too: a profile measured while another program took a rank's cores says so
until it is measured again (``cmatrix bench --remeasure``). Free memory is read when the
profiles are taken (once per job: a model's load reads it afresh for its memory plan).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import backends
from .._version import __version__
from ..core import quant as q
from ..core import shares as sh
from ..core.dtypes import from_float32
from ..engine.driver import Driver
from ..engine.protocol import Header, on_ranks
from ..engine.runtime import Runtime
from ..engine.scheduling import RunDelay
from ..errors import InputError
from ..io.atomic import atomic_path
from ..io.shardfiles import cache_dir

#: (rows of the weight matrix, its columns): a decode product reads all of it per row of input
GEMV_SHAPE = (2048, 2048)
#: (input rows, weight rows, columns) of the prefill-shaped product
GEMM_SHAPE = (128, 1024, 1024)
PROFILE_VERSION = 1
#: what a saved profile says besides its rates
FACTS = ("host", "backend", "device", "measured")
#: seconds per timed product when shares are asked for and no profile is saved (``weights="auto"``)
QUICK_SECONDS = 0.03


@dataclass(frozen=True)
class SpeedProfile(Header, op="speed_profile"):
    remeasure: bool        # measure even where a saved profile exists
    seconds: float         # per timed product (each is repeated until this much time has passed)


def profiles(d: Driver, remeasure: bool = False, seconds: float = 0.15) -> list[dict]:
    """Every rank's profile (see the module doc): ``{"rank", "host", "backend", "device",
    "threads", "decode": {kind: weight values/s}, "decode_gbps": {kind: GB/s}, "gemm": {kind:
    flop/s}, "held": the fraction of the time the kernel kept it runnable but not running
    while it measured, "free": bytes or None, "saved": path,
    "reused": bool}``; the shares they suggest: :func:`cmatrix.core.shares.suggested` and
    :func:`~cmatrix.core.shares.decode_shares`. A saved profile is read once per job."""
    if d.config is None:
        raise InputError("speed profiles need a configured cluster: call cm.init() first")
    if d.speeds is None or remeasure:
        d.speeds = d.run(SpeedProfile(bool(remeasure), float(seconds)))
    return d.speeds


class SpeedMethods:
    """``Cluster.speed_profiles``; the one hook used is ``driver``."""

    driver: Driver

    def speed_profiles(self, remeasure: bool = False, seconds: float | None = None) -> list[dict]:
        """Every rank's measured speed (see :mod:`cmatrix.ops.speed`): its saved profile, or
        measured now (briefly unless ``seconds`` per product is given)."""
        return profiles(self.driver, remeasure, QUICK_SECONDS if seconds is None else seconds)


def profile_path(host: str, backend: str, device: str, threads: int, local_rank: int) -> Path:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{host}-{backend}-{device}-t{threads}")[:150]
    slug += f"-l{local_rank}"
    return cache_dir() / "profiles" / f"{slug}.json"


def _read_profile(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    def rates(key: str) -> bool:
        table = data.get(key)
        return isinstance(table, dict) and all(
            isinstance(table.get(k), int | float) and 0 < table[k] < math.inf for k in sh.KINDS)

    ok = isinstance(data, dict) and data.get("version") == PROFILE_VERSION \
        and all(rates(key) for key in (*sh.WORKS, "decode_gbps")) \
        and isinstance(data.get("threads"), int) and all(isinstance(data.get(k), str) for k in FACTS)
    return data if ok else None


def _timed(fn: Any, seconds: float) -> float:
    """Seconds per call of ``fn``: once to warm up, then repeated for ``seconds`` (3 calls at least)."""
    fn()
    calls, began = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - began < seconds:
        fn()
        calls += 1
    return (time.perf_counter() - began) / calls


def _sixteen(dev: Any) -> str:
    return "bfloat16" if "bfloat16" in dev.dtypes else "float16"


def measure(dev: Any, seconds: float) -> dict:
    """This rank's rates on its backend ``dev`` (a :class:`~cmatrix.backends.device.Device`):
    decode-shaped products where its LLM decoder runs them, prefill-shaped ones on ``dev``."""
    decoder, started = backends.decode_device(dev)
    clock = RunDelay()
    began, held = time.perf_counter(), clock()
    try:
        rates = {**_rates(decoder, seconds, ("decode",)), **_rates(dev, seconds, ("gemm",))}
    finally:
        if started:
            decoder.backend.close()
    # the part of the time the kernel kept this rank waiting (single-thread view of the rank)
    rates["held"] = min(max((clock() - held) / max(time.perf_counter() - began, 1e-9), 0.0), 1.0)
    return rates


def _rates(dev: Any, seconds: float, works: tuple[str, ...]) -> dict:
    rng = np.random.default_rng(0)
    rows, cols = GEMV_SHAPE
    m, n, k = GEMM_SHAPE
    weights = rng.standard_normal((rows, cols), dtype=np.float32) * 0.05
    one = dev.upload(rng.standard_normal((1, cols), dtype=np.float32), "float32")
    many = dev.upload(rng.standard_normal((m, k), dtype=np.float32), "float32")
    out: dict[str, dict[str, float]] = {w: {} for w in works}
    if "decode" in works:
        out["decode_gbps"] = {}
    try:
        for kind in sh.KINDS:
            quant = kind if kind in q.KINDS else None
            dtype = "float32" if quant or kind == "float32" else _sixteen(dev)
            per_value = dev.stored_bytes(dtype, quant)
            for work, shape, x, flops in (("decode", (rows, cols), one, None),
                                          ("gemm", (n, k), many, 2.0 * m * n * k)):
                if work not in works:
                    continue
                values = np.ascontiguousarray(weights[: shape[0], : shape[1]])
                w = dev.upload(values if quant else from_float32(values, dtype), dtype, quant,
                               quant_axis=1 if quant else 0)

                def product(x=x, w=w) -> None:  # the download waits for asynchronous devices
                    y = dev.matmul(x, w, transpose_b=True, partial=True)
                    dev.download(y, "float32")
                    dev.free(y)

                try:
                    t = _timed(product, seconds)
                finally:
                    dev.free(w)
                if work == "decode":
                    out["decode"][kind] = rows * cols / t
                    out["decode_gbps"][kind] = rows * cols * per_value / t / 1e9
                else:
                    out["gemm"][kind] = flops / t
    finally:
        dev.free(one)
        dev.free(many)
    return out


@on_ranks(SpeedProfile)
def _speed_profile(rt: Runtime, h: SpeedProfile, _: Any) -> list[dict] | None:
    comm, report = rt.comm, None
    with rt.step("speed"):
        dev = rt.backend
        threads = getattr(dev.backend, "threads", 0)
        path = profile_path(comm.host, rt.backend_name, dev.device, threads, comm.local_rank)
        saved = None if h.remeasure else _read_profile(path)
        reused = saved is not None
        if saved is None:
            saved = {"version": PROFILE_VERSION, "cmatrix": __version__, "host": comm.host,
                     "backend": rt.backend_name, "device": dev.device, "threads": threads,
                     "measured": time.strftime("%Y-%m-%dT%H:%M:%S"), **measure(dev, h.seconds)}
        report = {**saved, "rank": comm.rank, "saved": str(path), "reused": reused,
                  "free": dev.memory_free()[0]}
    rt.sync()
    if not report["reused"]:
        try:  # a profile that cannot be saved (read-only home) is measured again next time
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                tmp.write_text(json.dumps({k: v for k, v in report.items()
                                           if k not in ("rank", "saved", "reused", "free")},
                                          indent=1))
        except OSError as exc:
            report["saved"] = f"not saved: {exc.strerror or exc}"
    return comm.gather_objects(report)


def forget_profiles() -> None:
    """Remove this host's saved profiles (tests; ``cmatrix bench --remeasure`` overwrites instead)."""
    folder = cache_dir() / "profiles"
    for path in folder.glob("*.json") if folder.is_dir() else ():
        os.unlink(path)

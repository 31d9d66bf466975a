"""Moving a decoder's K/V cache between ranks when its layout changes (see
:mod:`cmatrix.llm.rebalance`), both halves of each command.

``llm_kv_gather`` brings every rank's cache to the driver, KV group after KV group in rank
order; ``llm_kv_scatter`` sends each rank the groups it holds under the new layout. A
cache travels as (2 * layers, groups * positions * head_dim) float32 rows: each layer's
keys (rotated) then its values, so a run of whole groups is a contiguous column block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.plan import Plan
from ..engine.protocol import Header, on_ranks
from ..engine.runtime import Runtime
from ..errors import CMatrixError


@dataclass(frozen=True)
class LlmKvGather(Header, op="llm_kv_gather"):
    model: int
    length: int                    # positions held
    groups: tuple[int, ...]        # KV groups per rank


@dataclass(frozen=True)
class LlmKvScatter(Header, op="llm_kv_scatter"):
    model: int
    length: int
    groups: tuple[int, ...]


def _plan(h: LlmKvGather | LlmKvScatter, head_dim: int) -> Plan:
    return Plan(1, tuple(g * h.length * head_dim for g in h.groups))


def _decoder(rt: Runtime, h: LlmKvGather | LlmKvScatter) -> Any:
    """This rank's part of decoder ``h.model``, holding the KV groups the driver counts."""
    decoder = rt.models.get(h.model)
    if decoder is None:
        raise CMatrixError(f"decoder #{h.model} is not loaded on this rank")
    if decoder.groups != h.groups[rt.comm.rank]:
        raise CMatrixError(f"this rank holds {decoder.groups} KV groups, the driver counts "
                           f"{h.groups[rt.comm.rank]}")
    return decoder


@on_ranks(LlmKvGather)
def _llm_kv_gather(rt: Runtime, h: LlmKvGather, _: Any) -> np.ndarray | None:
    """Every rank's K/V cache to the driver: (2 * layers, all groups, length, head_dim)."""
    comm = rt.comm
    block = full = cfg = None
    with rt.step("export"):
        decoder = _decoder(rt, h)
        cfg = decoder.cfg
        block = decoder.kv_export(h.length).reshape(2 * cfg.num_layers, -1)
        if comm.is_driver:
            full = np.empty((2 * cfg.num_layers, sum(h.groups) * h.length * cfg.head_dim), dtype=np.float32)
    rt.sync()
    comm.gather_blocks(block, full, _plan(h, cfg.head_dim))
    if not comm.is_driver:
        return None
    return full.reshape(2 * cfg.num_layers, sum(h.groups), h.length, cfg.head_dim)


@on_ranks(LlmKvScatter)
def _llm_kv_scatter(rt: Runtime, h: LlmKvScatter, full: np.ndarray | None) -> None:
    """The driver's whole K/V cache -> each rank's decoder, the groups it now holds."""
    comm = rt.comm
    block = decoder = None
    with rt.step("prepare"):
        decoder = _decoder(rt, h)
        cfg = decoder.cfg
        block = np.empty((2 * cfg.num_layers, decoder.groups * h.length * cfg.head_dim), dtype=np.float32)
        if comm.is_driver:
            full = np.ascontiguousarray(full.reshape(2 * cfg.num_layers, -1))
    rt.sync()
    comm.scatter_blocks(full, block, _plan(h, decoder.cfg.head_dim))
    with rt.step("import"):
        decoder.kv_import(block.reshape(2 * decoder.cfg.num_layers, decoder.groups, h.length,
                                        decoder.cfg.head_dim))
    rt.sync()

"""How a decoder's weights are laid out across ranks (pure numpy, no MPI).

Attention: ranks hold whole key/value groups (a KV head and the query heads that
share it). The q, k and v rows of each group are stored next to each other in one
fused matrix, so a rank's contiguous block of rows is its groups' q, k and v and
one matmul gives all three. o_proj is split by the same groups along its input.

MLP: gate and up rows are interleaved in chunks, so a rank's block is matching
gate and up rows (one matmul); down_proj is split by the same chunks along its
input. Each block ends with one sum across ranks.
"""

from __future__ import annotations

import math

import numpy as np

from ..core import quant as q
from ..errors import InputError
from .config import DecoderConfig


def group_step(cfg: DecoderConfig, quant: str | None) -> int:
    """KV groups per unit of the split: whole quantisation blocks of o_proj's input per rank."""
    width = cfg.group_size * cfg.head_dim
    return q.BLOCK // math.gcd(width, q.BLOCK) if quant else 1


def mlp_chunk(cfg: DecoderConfig, quant: str | None) -> int:
    """Rows of gate (and of up) per unit of the MLP split."""
    if cfg.intermediate_size % q.BLOCK == 0:
        return q.BLOCK
    if quant:
        raise InputError(f"quant={quant!r}: intermediate_size {cfg.intermediate_size} is not a multiple "
                         f"of {q.BLOCK}")
    return 1


def matrix_splits(cfg: DecoderConfig, quant: str | None) -> dict[str, tuple[tuple[int, int], int, int]]:
    """Each weight matrix of a layer ("qkv", "o", "gate_up", "down") and the LM head: its
    (shape, split axis, alignment of the split), as the decoder shards it."""
    step, chunk = group_step(cfg, quant), mlp_chunk(cfg, quant)
    hid, inter, heads = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim
    return {
        "qkv": ((heads + 2 * cfg.num_kv_heads * cfg.head_dim, hid), 0,
                step * (cfg.group_size + 2) * cfg.head_dim),
        "o": ((hid, heads), 1, step * cfg.group_size * cfg.head_dim),
        "gate_up": ((2 * inter, hid), 0, 2 * chunk),
        "down": ((hid, inter), 1, chunk),
        "lm_head": ((cfg.vocab_size, hid), 0, 1),
    }


def matrix_values(cfg: DecoderConfig, quant: str | None) -> int:
    """Weight values in every layer's matrices and the LM head (what the ranks hold in all)."""
    sizes = {part: rows * cols for part, ((rows, cols), _, _) in matrix_splits(cfg, quant).items()}
    return cfg.num_layers * (sum(sizes.values()) - sizes["lm_head"]) + sizes["lm_head"]


def check_quant(cfg: DecoderConfig, quant: str | None) -> None:
    if quant is None:
        return
    q.check_kind(quant)
    if cfg.hidden_size % q.BLOCK:
        raise InputError(f"quant={quant!r}: hidden_size {cfg.hidden_size} is not a multiple of {q.BLOCK}")
    mlp_chunk(cfg, quant)
    step = group_step(cfg, quant)
    if cfg.num_kv_heads % step:
        raise InputError(f"quant={quant!r}: {cfg.num_kv_heads} KV groups cannot be split in units of "
                         f"{step} (each rank's attention output must be whole {q.BLOCK}-value blocks)")


def fuse_qkv(qw: np.ndarray, kw: np.ndarray, vw: np.ndarray, cfg: DecoderConfig) -> np.ndarray:
    """q, k, v rows (or biases) regrouped by KV group: [q of group 0, k 0, v 0, q of group 1, ...];
    the rows of any run of whole groups give that run's fused rows."""
    d = cfg.head_dim
    g = kw.shape[0] // d
    tail = qw.shape[1:]
    parts = (qw.reshape(g, cfg.group_size * d, *tail), kw.reshape(g, d, *tail), vw.reshape(g, d, *tail))
    return np.ascontiguousarray(np.concatenate(parts, axis=1).reshape(-1, *tail))


def fuse_gate_up(gate: np.ndarray, up: np.ndarray, chunk: int) -> np.ndarray:
    """gate and up rows (or biases) interleaved in chunks: [gate 0, up 0, gate 1, up 1, ...]; the
    rows of any run of whole chunks give that run's fused rows."""
    tail = gate.shape[1:]
    n = gate.shape[0] // chunk
    both = np.stack([gate.reshape(n, chunk, *tail), up.reshape(n, chunk, *tail)], axis=1)
    return np.ascontiguousarray(both.reshape(-1, *tail))


def split_qkv(y: np.ndarray, cfg: DecoderConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A rank's fused (T, groups * (group_size + 2) * head_dim) output -> q (T, groups, group_size,
    head_dim), k and v (T, groups, head_dim)."""
    rep, d = cfg.group_size, cfg.head_dim
    y = y.reshape(y.shape[0], -1, rep + 2, d)
    return y[:, :, :rep], y[:, :, rep], y[:, :, rep + 1]


def split_gate_up(y: np.ndarray, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """A rank's interleaved (T, 2 * n) output -> gate and up, each (T, n)."""
    t = y.shape[0]
    y = y.reshape(t, -1, 2, chunk)
    return y[:, :, 0].reshape(t, -1), y[:, :, 1].reshape(t, -1)


def pack(vectors: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, tuple[int, int]]]:
    """Small float32 vectors in one buffer (one broadcast) and where each one lies."""
    where, offset = {}, 0
    for name, v in vectors.items():
        where[name] = (offset, v.size)
        offset += v.size
    buffer = np.empty(offset, dtype=np.float32)
    for name, v in vectors.items():
        start, size = where[name]
        buffer[start:start + size] = v.ravel()
    return buffer, where


def unpack(buffer: np.ndarray, where: dict[str, tuple[int, int]]) -> dict[str, np.ndarray]:
    return {name: buffer[start:start + size] for name, (start, size) in where.items()}

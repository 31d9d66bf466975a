"""One rank's part of the decoder: its KV groups, MLP rows and vocabulary rows.

Weights are resident blocks on the rank's backend (:class:`~cmatrix.backends.device.Device`);
activations are float32 numpy arrays of a few tokens, and the norms, rotary
embedding and attention over the rank's own K/V cache run on them in float32,
as transformers computes them. Each block writes the rank's partial sum of
the block's output; the caller sums them across ranks (this module never sees MPI).
ggml ranks run the same math as whole-block graphs: :mod:`.ggml_decoder`.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import numpy as np

from ..errors import CMatrixError
from .config import DecoderConfig
from .layout import split_gate_up, split_qkv
from .rank_part import RankPart


class KVCache:
    """One layer's keys and values for this rank's groups, grown as tokens arrive."""

    def __init__(self, groups: int, head_dim: int, limit: int) -> None:
        self.limit = limit
        self.length = 0
        self.k = np.empty((groups, 0, head_dim), dtype=np.float32)
        self.v = np.empty_like(self.k)

    def extend(self, start: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Keep positions [0, start), write (T, groups, head_dim) ``k``/``v`` at ``start``; return
        all keys and values so far, each (groups, start + T, head_dim)."""
        if start > self.length:
            raise CMatrixError(f"KV cache holds {self.length} positions; cannot continue at {start}")
        end = start + k.shape[0]
        if end > self.k.shape[1]:
            capacity = min(max(end, 2 * self.k.shape[1], 64), max(self.limit, end))
            for name in ("k", "v"):
                old = getattr(self, name)
                grown = np.empty((old.shape[0], capacity, old.shape[2]), dtype=np.float32)
                grown[:, :start] = old[:, :start]
                setattr(self, name, grown)
        self.k[:, start:end] = k.transpose(1, 0, 2)
        self.v[:, start:end] = v.transpose(1, 0, 2)
        self.length = end
        return self.k[:, :end], self.v[:, :end]


class RankDecoder(RankPart):
    """The blocks this rank holds and the math it runs on them (the protocol of a step:
    :mod:`cmatrix.llm.rank_part`).

    ``layers``: per layer a dict of resident weight blocks ("qkv", "o", "gate_up",
    "down"); ``vectors``: norms and this rank's slices of the biases.
    """

    def __init__(self, cfg: DecoderConfig, device: Any, layers: list[dict], lm_head: Any,
                 vectors: dict[str, np.ndarray], groups: int, chunk: int, first: int = 0) -> None:
        self.kind = f"numpy+{device.name}"
        self.cfg, self.dev, self.layers, self.lm_head = cfg, device, layers, lm_head
        self.vectors, self.groups, self.chunk, self.first = vectors, groups, chunk, first
        self.scale = np.float32(cfg.head_dim ** -0.5)
        self.inv_freq = cfg.inv_freq()
        self._angles: tuple = ((-1, 0), None, None)
        self.caches = [KVCache(groups, cfg.head_dim, cfg.max_positions) for _ in layers]
        self.x = np.zeros((0, cfg.hidden_size), dtype=np.float32)
        self.start = 0

    def kv_export(self, length: int) -> np.ndarray:
        """Positions [0, length) of every layer's K/V cache: (2 * layers, groups, length, head_dim),
        each layer's keys (rotated) then its values."""
        out = np.empty((2 * len(self.caches), self.groups, length, self.cfg.head_dim), dtype=np.float32)
        for i, c in enumerate(self.caches if self.groups else ()):  # no groups: the caches never grow
            out[2 * i], out[2 * i + 1] = c.k[:, :length], c.v[:, :length]
        return out

    def kv_import(self, kv: np.ndarray) -> None:
        """Take over a K/V cache as :meth:`kv_export` gives it (for this rank's groups)."""
        for i, c in enumerate(self.caches):
            c.k, c.v = np.array(kv[2 * i]), np.array(kv[2 * i + 1])
            c.length = kv.shape[2]

    def _timed(self, phase: str) -> Any:
        return nullcontext() if self.timing is None else self.timing.timed(phase)

    def _vec(self, name: str) -> np.ndarray | None:
        return self.vectors.get(name)

    def norm(self, x: np.ndarray, name: str) -> np.ndarray:
        with self._timed("norms/rotary/elementwise"):
            variance = np.mean(x * x, axis=-1, keepdims=True)
            inverse = np.float32(1.0) / np.sqrt(variance + np.float32(self.cfg.rms_norm_eps))
            return (x * inverse) * self.vectors[name]

    def _linear(self, h: np.ndarray, weight: Any, bias: np.ndarray | None = None) -> np.ndarray:
        """h @ weight.T on the backend, back as float32 (+ bias)."""
        dev = self.dev
        with self._timed("matmul"):
            a = dev.upload(np.ascontiguousarray(h, dtype=np.float32), "float32")
            y = dev.matmul(a, weight, transpose_b=True, partial=True)
            out = dev.download(y, "float32")
            dev.free(a)
            dev.free(y)
        if bias is not None:
            out = out + bias
        return out

    def _rotary(self, start: int, t: int) -> tuple[np.ndarray, np.ndarray]:
        """cos and sin of the rotary angles of positions [start, start + t), shared by every layer."""
        if self._angles[0] != (start, t):
            positions = np.arange(start, start + t, dtype=np.float32)
            freqs = positions[:, None] * self.inv_freq[None, :]
            angles = np.concatenate([freqs, freqs], axis=-1)
            self._angles = ((start, t), np.cos(angles), np.sin(angles))
        return self._angles[1], self._angles[2]

    def _rope(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        half = x.shape[-1] // 2
        rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return x * cos + rotated * sin

    def begin(self, x: np.ndarray, start: int) -> None:
        """A step of the new tokens' embeddings ``x`` (T, hidden) from position ``start``."""
        self.x, self.start = np.array(x, dtype=np.float32), start

    def _residual(self, total: np.ndarray | None, bias_name: str) -> None:
        """The residual connection: x += the previous block's summed output (+ its bias, once)."""
        if total is None:
            return
        self.x += total
        bias = self._vec(bias_name)
        if bias is not None:
            self.x += bias

    def attention(self, i: int, total: np.ndarray | None, out: np.ndarray) -> None:
        """Layer ``i``'s attention: this rank's heads' partial sum of its output into ``out``."""
        self._residual(total, f"{i - 1}.down_bias")
        x, start = self.x, self.start
        t = x.shape[0]
        if self.groups == 0:
            out[...] = 0
            return
        h = self.norm(x, f"{i}.attn_norm")
        w = self.layers[i - self.first]
        q, k, v = split_qkv(self._linear(h, w["qkv"], self._vec(f"{i}.qkv_bias")), self.cfg)
        with self._timed("norms/rotary/elementwise"):
            cos, sin = self._rotary(start, t)
            q = self._rope(q, cos[:, None, None, :], sin[:, None, None, :])
            k = self._rope(k, cos[:, None, :], sin[:, None, :])
        with self._timed("attention"):
            keys, values = self.caches[i - self.first].extend(start, k, v)
            attended = self._attend(q, keys, values, start, self.cfg.windows[i])
        out[...] = self._linear(attended, w["o"])

    def _attend(self, q: np.ndarray, keys: np.ndarray, values: np.ndarray, start: int,
                window: int | None) -> np.ndarray:
        t, g, rep, d = q.shape
        s = keys.shape[1]
        scores = q.transpose(1, 2, 0, 3) @ keys[:, None].transpose(0, 1, 3, 2) * self.scale  # (g, rep, t, s)
        query_pos = start + np.arange(t)[:, None]
        key_pos = np.arange(s)[None, :]
        allowed = key_pos <= query_pos
        if window is not None:
            allowed &= key_pos > query_pos - window
        scores = np.where(allowed, scores, -np.inf)
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs = scores / scores.sum(axis=-1, keepdims=True)
        out = probs @ values[:, None]  # (g, rep, t, d)
        return out.transpose(2, 0, 1, 3).reshape(t, g * rep * d)

    def mlp(self, i: int, total: np.ndarray, out: np.ndarray) -> None:
        """Layer ``i``'s MLP: this rank's rows' partial sum of its output into ``out``."""
        self._residual(total, f"{i}.o_bias")
        if self.layers[i - self.first]["down"].shape[1] == 0:
            out[...] = 0
            return
        h = self.norm(self.x, f"{i}.mlp_norm")
        w = self.layers[i - self.first]
        gate, up = split_gate_up(self._linear(h, w["gate_up"], self._vec(f"{i}.gate_up_bias")),
                                 self.chunk)
        with self._timed("norms/rotary/elementwise"), np.errstate(over="ignore"):
            act = gate / (np.float32(1.0) + np.exp(-gate)) * up
        out[...] = self._linear(act, self.layers[i - self.first]["down"])

    def logits(self, total: np.ndarray, all_rows: bool) -> np.ndarray:
        """This rank's vocabulary slice of the logits of the last row (or of every row)."""
        self._residual(total, f"{self.cfg.num_layers - 1}.down_bias")
        rows = self.x if all_rows else self.x[-1:]
        if self.lm_head.shape[0] == 0:
            return np.zeros((rows.shape[0], 0), dtype=np.float32)
        return self._linear(self.norm(rows, "final_norm"), self.lm_head)

"""One rank's part of the decoder in torch: the path of torch ranks (CPU, CUDA, ROCm, MPS).

:class:`TorchDecoder` has :class:`~cmatrix.llm.layers.RankDecoder`'s interface and
math, but the residual stream, the norms, the rotary embedding, the K/V cache and the
attention stay torch tensors on the rank's device next to its resident weights: per
block only the previous block's summed output comes in and this rank's partial sum goes
out (on the CPU both without a copy). The numpy path instead moved every matmul's input
and output across, three times per block, which on a GPU is most of a token's time.

Half-precision weights (a GPU holds them as they are) multiply float32 activations
rounded to the weight's type, accumulating in float32; everything else is float32.
"""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np
import torch

from ..backends.host_quant import QuantBlocks
from ..backends.torch import cpu_product
from ..backends.torch_quant import TorchBlocks
from .config import DecoderConfig
from .rank_part import RankPart, cache_capacity


class TorchDecoder(RankPart):
    """The blocks this rank holds, as torch operations on its device (see the module doc)."""

    kind = "torch"

    def __init__(self, cfg: DecoderConfig, device: Any, layers: list[dict], lm_head: Any,
                 vectors: dict[str, np.ndarray], groups: int, chunk: int, first: int = 0) -> None:
        self.cfg, self.groups, self.chunk, self.first = cfg, groups, chunk, first
        self.device = device.backend.torch_device
        self.kind = f"torch {self.device.type}"
        self.w = [{part: None if blk.empty else _tensor(blk.handle) for part, blk in parts.items()}
                  for parts in layers]
        self.mlp_rows = [parts["down"].shape[1] for parts in layers]
        self.head = None if lm_head.empty else _tensor(lm_head.handle)
        self.vocab_rows = lm_head.shape[0]
        self.vec = {name: torch.from_numpy(np.array(v, dtype=np.float32)).to(self.device)
                    for name, v in vectors.items()}
        self.inv_freq = cfg.inv_freq()
        self.scale = float(np.float32(cfg.head_dim ** -0.5))
        self.eps = float(np.float32(cfg.rms_norm_eps))
        self.capacity = 0
        self.caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.x = torch.zeros((0, cfg.hidden_size), device=self.device)
        self.start = 0
        self._cpu = self.device.type == "cpu"

    # ---- the step's state ----------------------------------------------------------------------

    def _grow(self, needed: int) -> None:
        cap = cache_capacity(self.capacity, needed, self.cfg.max_positions)
        shape = (self.groups, cap, self.cfg.head_dim)
        grown = []
        for old in self.caches or [None] * len(self.w):
            pair = (torch.zeros(shape, device=self.device), torch.zeros(shape, device=self.device))
            if old is not None:
                for new, have in zip(pair, old, strict=True):
                    new[:, :self.capacity] = have
            grown.append(pair)
        self.caches, self.capacity = grown, cap

    def kv_export(self, length: int) -> np.ndarray:
        """Positions [0, length) of every layer's K/V cache: (2 * layers, groups, length, head_dim)."""
        out = np.empty((2 * len(self.w), self.groups, length, self.cfg.head_dim), dtype=np.float32)
        if self.groups and length:
            for j, tensor in enumerate(t for pair in self.caches for t in pair):
                out[j] = tensor[:, :length].cpu().numpy()
        return out

    def kv_import(self, kv: np.ndarray) -> None:
        """Take over a K/V cache as :meth:`kv_export` gives it (for this rank's groups)."""
        length = kv.shape[2]
        if not self.groups or not length:
            return
        if length > self.capacity:
            self._grow(length)
        for j, tensor in enumerate(t for pair in self.caches for t in pair):
            tensor[:, :length] = torch.from_numpy(np.ascontiguousarray(kv[j])).to(self.device)

    def begin(self, x: np.ndarray, start: int) -> None:
        """A step of the new tokens' embeddings ``x`` (T, hidden) from position ``start``."""
        t = x.shape[0]
        if self.groups and start + t > self.capacity:
            self._grow(start + t)
        self.x = torch.from_numpy(np.array(x, dtype=np.float32)).to(self.device)
        self.start = start
        positions = np.arange(start, start + t, dtype=np.float32)
        freqs = positions[:, None] * self.inv_freq[None, :]
        angles = np.concatenate([freqs, freqs], axis=-1)
        self.cos = torch.from_numpy(np.cos(angles)).to(self.device)
        self.sin = torch.from_numpy(np.sin(angles)).to(self.device)
        query = start + np.arange(t)[:, None]
        self.masks = {}
        for w in set(self.cfg.windows):
            key = np.arange(start + t)[None, :]
            allowed = key <= query
            if w is not None:
                allowed &= key > query - w
            self.masks[w] = torch.from_numpy(allowed).to(self.device)

    def _tensor(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a) if self._cpu else torch.from_numpy(a).to(self.device)

    def _residual(self, total: np.ndarray | None, bias_name: str) -> None:
        if total is None:
            return
        self.x += self._tensor(total)
        bias = self.vec.get(bias_name)
        if bias is not None:
            self.x += bias

    def _timed(self, phase: str) -> Any:
        return nullcontext() if self.timing is None else self._timing(phase)

    @contextmanager
    def _timing(self, phase: str):
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        t = time.perf_counter()
        try:
            yield
        finally:
            sync()
            self.timing.add(phase, time.perf_counter() - t)

    def _put(self, y: torch.Tensor, out: np.ndarray) -> None:
        out[...] = y.numpy() if self._cpu else y.cpu().numpy()

    # ---- the math ------------------------------------------------------------------------------

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        variance = (x * x).mean(dim=-1, keepdim=True)
        return (x * (1.0 / torch.sqrt(variance + self.eps))) * self.vec[name]

    def _linear(self, h: torch.Tensor, w: Any) -> torch.Tensor:
        """h @ w.T in float32 (a half weight meets h rounded to its type, accumulating in float32;
        quantised blocks on the device are dequantised a tile at a time)."""
        with self._timed("matmul"):
            if isinstance(w, TorchBlocks):
                return w.product(h, False, True)
            if w.dtype == torch.float32:
                return h @ w.T
            if not h.is_cuda and w.device.type == "cpu":  # the CPU computes half in float32
                return cpu_product(h, w.T)
            if h.is_cuda:
                try:
                    return torch.mm(h.to(w.dtype), w.T, out_dtype=torch.float32)
                except (TypeError, RuntimeError, NotImplementedError):
                    pass  # an older torch or a ROCm build without the float32-output kernel
            return (h.to(w.dtype) @ w.T).float()

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin

    def attention(self, i: int, total: np.ndarray | None, out: np.ndarray) -> None:
        """Layer ``i``'s attention: this rank's heads' partial sum of its output into ``out``."""
        self._residual(total, f"{i - 1}.down_bias")
        if self.groups == 0:
            out[...] = 0
            return
        cfg, w, start = self.cfg, self.w[i - self.first], self.start
        t, rep, d = self.x.shape[0], cfg.group_size, cfg.head_dim
        y = self._linear(self._norm(self.x, f"{i}.attn_norm"), w["qkv"])
        bias = self.vec.get(f"{i}.qkv_bias")
        if bias is not None:
            y = y + bias
        y = y.view(t, self.groups, rep + 2, d)  # per group: its query heads, then k, then v
        q = self._rope(y[:, :, :rep], self.cos[:, None, None, :], self.sin[:, None, None, :])
        k = self._rope(y[:, :, rep], self.cos[:, None, :], self.sin[:, None, :])
        with self._timed("attention"):
            keys, values = self.caches[i - self.first]
            keys[:, start:start + t] = k.transpose(0, 1)
            values[:, start:start + t] = y[:, :, rep + 1].transpose(0, 1)
            s = start + t
            # (groups, rep, t, s), as the numpy path computes it
            scores = q.permute(1, 2, 0, 3) @ keys[:, None, :s].transpose(-1, -2) * self.scale
            scores = scores.masked_fill(~self.masks[cfg.windows[i]], float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            attended = (probs @ values[:, None, :s]).permute(2, 0, 1, 3).reshape(t, -1)  # (t, g * rep * d)
        self._put(self._linear(attended, w["o"]), out)

    def mlp(self, i: int, total: np.ndarray, out: np.ndarray) -> None:
        """Layer ``i``'s MLP: this rank's rows' partial sum of its output into ``out``."""
        self._residual(total, f"{i}.o_bias")
        if self.mlp_rows[i - self.first] == 0:
            out[...] = 0
            return
        t, c = self.x.shape[0], self.chunk
        y = self._linear(self._norm(self.x, f"{i}.mlp_norm"), self.w[i - self.first]["gate_up"])
        bias = self.vec.get(f"{i}.gate_up_bias")
        if bias is not None:
            y = y + bias
        y = y.view(t, -1, 2, c)  # gate and up rows interleaved in chunks
        gate, up = y[:, :, 0].reshape(t, -1), y[:, :, 1].reshape(t, -1)
        self._put(self._linear(gate / (1.0 + torch.exp(-gate)) * up, self.w[i - self.first]["down"]), out)

    def logits(self, total: np.ndarray, all_rows: bool) -> np.ndarray:
        """This rank's vocabulary slice of the logits of the last row (or of every row)."""
        self._residual(total, f"{self.cfg.num_layers - 1}.down_bias")
        rows = self.x if all_rows else self.x[-1:]
        if self.vocab_rows == 0:
            return np.zeros((rows.shape[0], 0), dtype=np.float32)
        y = self._linear(self._norm(rows, "final_norm"), self.head)
        return y.numpy() if self._cpu else y.cpu().numpy()


def _tensor(handle: Any) -> Any:
    """A weight as a tensor: quantised blocks a CPU torch rank keeps in host memory (this decoder
    runs there only when CMATRIX_DECODER=torch asks) become their float32 values; blocks on the
    device stay blocks."""
    if isinstance(handle, QuantBlocks):
        return torch.from_numpy(handle.values())
    return handle

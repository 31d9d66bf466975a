"""One rank's part of the decoder as ggml graphs: the fast path of ggml ranks.

:class:`GraphDecoder` has :class:`~cmatrix.llm.layers.RankDecoder`'s interface and
the same math, but each block (a layer's attention, a layer's MLP, the logits) is
one ggml graph over the weights already resident in ggml tensors, with the
rank's K/V cache kept in place in ggml tensors. The graphs for a given number of
tokens are built once and reused: a decode step only copies the new token's
activations in, computes, and copies the block's partial sum out. That removes
the per-layer Python cost of the numpy path (norms, rotary, attention and three
backend round trips per block) that dominated small and quantised models.

Every graph attends over the cache's whole capacity with a mask (positions not yet
written, or outside a sliding window, get -inf), so the graphs do not depend on the
position; the capacity doubles as the sequence grows, and the graphs are rebuilt
then. Rotary angles come from the same float32 cos/sin the numpy path uses, so
every rope variant in :class:`~cmatrix.llm.config.DecoderConfig` is covered.
"""

from __future__ import annotations

import ctypes
import time
import weakref
from typing import Any

import ggml
import numpy as np

from ..backends.ggml import Borrowed, GGMLBackend
from ..core.arrays import aligned
from ..errors import CMatrixError
from .config import DecoderConfig
from .rank_part import RankPart, cache_capacity

_NODES = 256          # tensors and nodes per graph: an attention block uses about 50
_F32 = ggml.GGML_TYPE_F32
_FREQ_FACTORS = "rope.freq_factors"


def _free_all(ctxs: list, bufs: list, gallocs: list) -> None:
    for g in gallocs:
        ggml.ggml_gallocr_free(g)
    for b in bufs:
        ggml.ggml_backend_buffer_free(b)
    for c in ctxs:
        ggml.ggml_free(c)


class _Memory:
    """ggml contexts, buffers and allocators this decoder owns; freed together."""

    def __init__(self) -> None:
        self.ctxs: list = []
        self.bufs: list = []
        self.gallocs: list = []
        self._finalizer = weakref.finalize(self, _free_all, self.ctxs, self.bufs, self.gallocs)

    def context(self, tensors: int, graph: bool = False):
        size = ggml.ggml_tensor_overhead() * tensors
        if graph:
            size += ggml.ggml_graph_overhead_custom(tensors, False)
        ctx = ggml.ggml_init(ggml.ggml_init_params(mem_size=size, mem_buffer=None, no_alloc=True))
        if not ctx:
            raise CMatrixError("ggml_init failed")
        self.ctxs.append(ctx)
        return ctx

    def allocate(self, ctx, backend, what: str):
        """Back every tensor of ``ctx`` with one zeroed backend buffer."""
        buf = ggml.ggml_backend_alloc_ctx_tensors(ctx, backend)
        if not buf:
            raise CMatrixError(f"ggml could not allocate {what}")
        ggml.ggml_backend_buffer_clear(buf, 0)
        self.bufs.append(buf)
        return buf

    def release(self, ctxs: list, bufs: list, gallocs: list) -> None:
        for lst, mine in ((ctxs, self.ctxs), (bufs, self.bufs), (gallocs, self.gallocs)):
            for x in lst:
                mine.remove(x)
        _free_all(ctxs, bufs, gallocs)

    def close(self) -> None:
        self._finalizer()


def _set(tensor, array: np.ndarray) -> None:
    array = np.ascontiguousarray(array)
    ggml.ggml_backend_tensor_set(tensor, array.ctypes.data, 0, array.nbytes)


#: how the profile files each ggml op (views, reshapes and permutes cost nothing)
_OP_PHASE = {"MUL_MAT": "matmul", "FLASH_ATTN_EXT": "attention", "SET_ROWS": "attention",
             "SOFT_MAX": "attention"}
_FREE_OPS = {"NONE", "VIEW", "RESHAPE", "PERMUTE", "TRANSPOSE"}


class _Graph:
    """One built graph: its float32 input (the previous block's summed output, or none),
    its output (or none: a block this rank holds nothing of only updates the residual)."""

    def __init__(self, memory: _Memory, backend, buffer_type, build, x_shape: tuple[int, int] | None) -> None:
        ctx = memory.context(_NODES, graph=True)
        self.x = None
        if x_shape is not None:
            self.x = ggml.ggml_new_tensor_2d(ctx, _F32, x_shape[1], x_shape[0])
            ggml.ggml_set_input(self.x)
        self.out, self.shape = build(ctx, self.x), None
        ggml.ggml_set_output(self.out)
        self.graph = ggml.ggml_new_graph_custom(ctx, _NODES, False)
        ggml.ggml_build_forward_expand(self.graph, self.out)
        galloc = ggml.ggml_gallocr_new(buffer_type)
        if not galloc:
            raise CMatrixError("ggml could not create a graph allocator")
        memory.gallocs.append(galloc)
        if not ggml.ggml_gallocr_alloc_graph(galloc, self.graph):
            raise CMatrixError("ggml could not allocate a graph's compute buffer")
        self.backend = backend
        self.shape = (ggml.ggml_nrows(self.out), self.out.contents.ne[0])
        self._phases: list | None = None

    def __call__(self, x: np.ndarray | None, out: np.ndarray | None, profile: Any = None) -> None:
        """Compute with input ``x``; copy the output into ``out`` (float32, its shape) if given."""
        if self.x is not None:
            ggml.ggml_backend_tensor_set(self.x, x.ctypes.data, 0, x.nbytes)
        if profile is not None:
            self._profiled(profile)
        elif ggml.ggml_backend_graph_compute(self.backend, self.graph) != ggml.GGML_STATUS_SUCCESS:
            raise CMatrixError("ggml graph compute failed")
        if out is not None:
            ggml.ggml_backend_tensor_get(self.out, out.ctypes.data, 0, out.nbytes)

    def _profiled(self, profile: Any) -> None:
        """Compute node by node, each one's time filed under its phase (slower than one call)."""
        if self._phases is None:
            self._phases = []
            for n in range(ggml.ggml_graph_n_nodes(self.graph)):
                op = ggml.ggml_op_name(ggml.ggml_graph_node(self.graph, n).contents.op).decode()
                if op not in _FREE_OPS:
                    self._phases.append((n, _OP_PHASE.get(op, "norms/rotary/elementwise")))
        for n, phase in self._phases:
            view = ggml.ggml_graph_view(self.graph, n, n + 1)
            t = time.perf_counter()
            status = ggml.ggml_backend_graph_compute(self.backend, ctypes.pointer(view))
            profile.add(phase, time.perf_counter() - t)
            if status != ggml.GGML_STATUS_SUCCESS:
                raise CMatrixError("ggml graph compute failed")


#: ggml's type of quantised blocks
_GTYPE = {"q8_0": ggml.GGML_TYPE_Q8_0, "q4_0": ggml.GGML_TYPE_Q4_0}
_HALF = {"torch.float16": ggml.GGML_TYPE_F16, "torch.bfloat16": ggml.GGML_TYPE_BF16}


def borrow(handle: Any) -> Borrowed:
    """A numpy or CPU torch rank's resident weight as a ggml tensor without a copy: quantised
    blocks as they lie, a CPU torch rank's 16-bit tensors as F16/BF16, float32 arrays as they are
    (the backends keep them aligned; an array
    that is not gets an aligned copy)."""
    blocks = handle.host_bytes() if hasattr(handle, "host_bytes") else None  # QuantBlocks, CPU TorchBlocks
    if blocks is not None:
        if handle.axis != 1:  # the decoder's weights are quantised along their input (rows)
            raise CMatrixError(f"a {handle.kind} weight quantised along axis 0 cannot be borrowed")
        return Borrowed(blocks if Borrowed.fits(blocks, any_type=True) else aligned(blocks),
                        _GTYPE[handle.kind], handle.width)
    if not isinstance(handle, np.ndarray) and str(handle.dtype) in _HALF:  # a CPU torch rank's half weight
        import torch  # the handle is a torch tensor, so torch is there

        kind = _HALF[str(handle.dtype)]
        array = (handle if handle.dtype == torch.float16 else handle.view(torch.int16)).numpy()
        if not Borrowed.fits(array, any_type=True):
            array = aligned(np.ascontiguousarray(array))
        return Borrowed(array, kind, array.shape[1])
    array = handle if isinstance(handle, np.ndarray) else handle.numpy()
    return Borrowed(array if Borrowed.fits(array) else aligned(np.asarray(array, dtype=np.float32)))


class GraphDecoder(RankPart):
    """The blocks this rank holds, each run as one cached ggml graph (see the module doc).
    On a numpy or CPU torch rank the graphs run over that backend's own arrays (float32, 16-bit, blocks),
    borrowed without a copy."""

    kind = "ggml graphs"
    _own = None  # the ggml backend this decoder started itself (on a non-ggml rank)

    def __init__(self, cfg: DecoderConfig, device: Any, layers: list[dict], lm_head: Any,
                 vectors: dict[str, np.ndarray], groups: int, chunk: int, first: int = 0) -> None:
        self.cfg, self.groups, self.chunk, self.first = cfg, groups, chunk, first
        self._borrowed: list[Any] = []
        if device.name == "ggml":
            gb = device.backend

            def weight(blk: Any) -> Any:
                return gb.weight_tensor(blk.handle, True)
        else:  # a CPU rank of another backend: ggml's kernels on that backend's float32 arrays
            gb = self._own = GGMLBackend(threads=device.backend.threads, accel=False)
            self.kind = f"ggml on {device.name}"

            def weight(blk: Any) -> Any:
                self._borrowed.append(borrow(blk.handle))
                return self._borrowed[-1].tensor
        self.backend = gb.ggml_backend
        self.buffer_type = ggml.ggml_backend_get_default_buffer_type(self.backend)
        self.inv_freq = cfg.inv_freq()
        self.scale = float(cfg.head_dim ** -0.5)
        self.memory = _Memory()
        # op(b).T of every weight block (b is used with transpose_b=True): ne0 = input width
        self.w = [{part: None if blk.empty else weight(blk) for part, blk in parts.items()}
                  for parts in layers]
        self.blocks = (layers, lm_head)  # keep the handles (and so the ggml tensors) alive
        self.head = None if lm_head.empty else weight(lm_head)
        self.mlp_rows = [parts["down"].shape[1] for parts in layers]
        self.vocab_rows = lm_head.shape[0]
        vectors = dict(vectors)
        if cfg.rope_scaling is not None:  # ggml's angles are position * base^(-2i/d) / factor[i]
            steps = np.arange(cfg.head_dim // 2, dtype=np.float64)
            plain = np.float64(cfg.rope_theta) ** (-2.0 * steps / cfg.head_dim)
            vectors[_FREQ_FACTORS] = (plain / self.inv_freq.astype(np.float64)).astype(np.float32)
        ctx = self.memory.context(len(vectors))
        self.vec = {name: ggml.ggml_new_tensor_1d(ctx, _F32, v.size) for name, v in vectors.items()}
        self.memory.allocate(ctx, self.backend, "the decoder's norms and biases")
        for name, v in vectors.items():
            _set(self.vec[name], v.astype(np.float32))
        self.freq_factors = self.vec.get(_FREQ_FACTORS)
        self.capacity = 0
        self.caches: list[tuple[Any, Any]] = []
        self._cache_memory: tuple[list, list] = ([], [])
        self._sets: dict[int, dict] = {}
        self._step: tuple[int, int] | None = None
        self._current: dict = {}

    # ---- K/V cache and per-step inputs ---------------------------------------------------------

    def _grow(self, needed: int) -> None:
        """Make the caches hold ``needed`` positions (doubling), keeping what they hold."""
        cfg = self.cfg
        cap = cache_capacity(self.capacity, needed, self.cfg.max_positions)
        width = self.groups * cfg.head_dim
        ctx = self.memory.context(2 * len(self.w))
        caches = [tuple(ggml.ggml_new_tensor_2d(ctx, _F32, width, cap) for _ in "kv")
                  for _ in self.w]
        buf = self.memory.allocate(ctx, self.backend, f"a K/V cache of {cap} positions")
        if self.capacity:
            old = np.empty((self.capacity, width), dtype=np.float32)
            for (ok, ov), (nk, nv) in zip(self.caches, caches, strict=True):
                for src, dst in ((ok, nk), (ov, nv)):
                    ggml.ggml_backend_tensor_get(src, old.ctypes.data, 0, old.nbytes)
                    ggml.ggml_backend_tensor_set(dst, old.ctypes.data, 0, old.nbytes)
        self._drop_graphs()
        self.memory.release(*self._cache_memory, [])
        self._cache_memory = ([ctx], [buf])
        self.caches, self.capacity = caches, cap

    def kv_export(self, length: int) -> np.ndarray:
        """Positions [0, length) of every layer's K/V cache: (2 * layers, groups, length, head_dim)."""
        g, d = self.groups, self.cfg.head_dim
        out = np.empty((2 * len(self.w), g, length, d), dtype=np.float32)
        if not g or not length:
            return out
        rows = np.empty((self.capacity, g * d), dtype=np.float32)
        for j, tensor in enumerate(t for pair in self.caches for t in pair):
            ggml.ggml_backend_tensor_get(tensor, rows.ctypes.data, 0, rows.nbytes)
            out[j] = rows[:length].reshape(length, g, d).transpose(1, 0, 2)
        return out

    def kv_import(self, kv: np.ndarray) -> None:
        """Take over a K/V cache as :meth:`kv_export` gives it (for this rank's groups)."""
        g, d, length = self.groups, self.cfg.head_dim, kv.shape[2]
        if not g or not length:
            return
        if length > self.capacity:
            self._grow(length)
        for j, tensor in enumerate(t for pair in self.caches for t in pair):
            rows = np.ascontiguousarray(kv[j].transpose(1, 0, 2).reshape(length, g * d))
            ggml.ggml_backend_tensor_set(tensor, rows.ctypes.data, 0, rows.nbytes)

    def _drop_graphs(self) -> None:
        for s in self._sets.values():
            self.memory.release(s["ctxs"], s["bufs"], s["gallocs"])
        self._sets.clear()
        self._step = None

    def _graph_set(self, t: int) -> dict:
        """Inputs shared by every graph of ``t`` tokens (the residual stream, positions, cache
        rows, masks) and the graphs built so far."""
        s = self._sets.get(t)
        if s is not None:
            return s
        if len(self._sets) > 1:  # keep the decode set (t == 1) and the latest other one
            for key in [k for k in self._sets if k != 1]:
                old = self._sets.pop(key)
                self.memory.release(old["ctxs"], old["bufs"], old["gallocs"])
        cfg = self.cfg
        windows = sorted({w for w in cfg.windows if w is not None})
        ctx = self.memory.context(4 + len(windows) + 1)
        s = {"t": t, "graphs": {}, "ctxs": [ctx], "gallocs": [],
             "residual": ggml.ggml_new_tensor_2d(ctx, _F32, cfg.hidden_size, t),
             "positions": ggml.ggml_new_tensor_1d(ctx, ggml.GGML_TYPE_I32, t),
             "rows": ggml.ggml_new_tensor_1d(ctx, ggml.GGML_TYPE_I64, t),
             "masks": {w: ggml.ggml_new_tensor_2d(ctx, ggml.GGML_TYPE_F16, max(self.capacity, 1), t)
                       for w in [None, *windows]}}
        s["bufs"] = [self.memory.allocate(ctx, self.backend, "a step's inputs")]
        self._sets[t] = s
        return s

    def begin(self, x: np.ndarray, start: int) -> None:
        """A step of the new tokens' embeddings ``x`` (T, hidden) from position ``start``:
        the residual stream starts as ``x``; positions, cache rows and masks are set."""
        self._current = {}  # until this step's inputs are in place, no block may run
        t = x.shape[0]
        if start + t > self.capacity and self.groups:
            self._grow(start + t)
        s = self._graph_set(t)
        _set(s["residual"], np.asarray(x, dtype=np.float32))
        if self.groups and self._step != (start, t):
            _set(s["positions"], np.arange(start, start + t, dtype=np.int32))
            _set(s["rows"], np.arange(start, start + t, dtype=np.int64))
            query = start + np.arange(t)[:, None]
            key = np.arange(self.capacity)[None, :]
            for w, tensor in s["masks"].items():
                allowed = key <= query
                if w is not None:
                    allowed &= key > query - w
                _set(tensor, np.where(allowed, np.float16(0), np.float16(-np.inf)).astype(np.float16))
            self._step = (start, t)
        self._current = s

    def _run(self, key: tuple, build, total: np.ndarray | None, out: np.ndarray | None) -> None:
        """Graph ``key`` of the current step on input ``total``. Decode graphs (one token) are
        built once and kept; a graph of many tokens (a prefill) is built, run and freed, so
        only one block's intermediate values are held at a time."""
        s = self._current
        g = s["graphs"].get(key)
        if g is not None:
            g(total, out, self.timing)
            return
        n_ctxs, n_gallocs = len(self.memory.ctxs), len(self.memory.gallocs)

        def release_new() -> None:  # the context and allocator this graph added
            self.memory.release(self.memory.ctxs[n_ctxs:], [], self.memory.gallocs[n_gallocs:])
        try:
            g = _Graph(self.memory, self.backend, self.buffer_type, build,
                       None if total is None else total.shape)
        except BaseException:
            release_new()
            raise
        if s["t"] == 1:
            s["ctxs"] += self.memory.ctxs[n_ctxs:]
            s["gallocs"] += self.memory.gallocs[n_gallocs:]
            s["graphs"][key] = g
            g(total, out, self.timing)
            return
        try:
            g(total, out, self.timing)
        finally:
            release_new()

    # ---- the blocks ----------------------------------------------------------------------------

    def _residual(self, ctx, total, bias_name: str):
        """The residual stream after adding ``total`` (+ its bias), updated in place."""
        r = self._current["residual"]
        if total is not None:
            r = ggml.ggml_add_inplace(ctx, r, total)
            if bias_name in self.vec:
                r = ggml.ggml_add_inplace(ctx, r, self.vec[bias_name])
        return r

    def _norm(self, ctx, x, name: str):
        return ggml.ggml_mul(ctx, ggml.ggml_rms_norm(ctx, x, self.cfg.rms_norm_eps), self.vec[name])

    def _rope(self, ctx, y):
        """Rotate-half (NEOX) rotary embedding of every head of ``y`` (head_dim, heads, t)."""
        cfg = self.cfg
        return ggml.ggml_rope_ext(ctx, y, self._current["positions"], self.freq_factors, cfg.head_dim,
                                  ggml.GGML_ROPE_TYPE_NEOX, cfg.max_positions, cfg.rope_theta,
                                  1.0, 0.0, 1.0, 0.0, 0.0)

    def attention(self, i: int, total: np.ndarray | None, out: np.ndarray) -> None:
        """Layer ``i``'s attention: this rank's heads' partial sum of its output into ``out``."""
        cfg, w, s = self.cfg, self.w[i - self.first], self._current
        d, rep, g, t, cap = cfg.head_dim, cfg.group_size, self.groups, s["t"], self.capacity
        bias = f"{i - 1}.down_bias"
        if g == 0:
            out[...] = 0
            if total is not None:
                self._run(("residual", i), lambda ctx, x: self._residual(ctx, x, bias), total, None)
            return

        def build(ctx, x):
            h = self._norm(ctx, self._residual(ctx, x, bias), f"{i}.attn_norm")
            y = ggml.ggml_mul_mat(ctx, w["qkv"], h)  # (t, g * (rep + 2) * d): [q of group, k, v] per group
            if f"{i}.qkv_bias" in self.vec:
                y = ggml.ggml_add(ctx, y, self.vec[f"{i}.qkv_bias"])
            # rotating v as well costs a few values and keeps every head one uniform view
            r = self._rope(ctx, ggml.ggml_reshape_3d(ctx, y, d, (rep + 2) * g, t))
            f = 4  # bytes per float32
            nb1, nb2, nb3 = d * f, (rep + 2) * d * f, (rep + 2) * g * d * f
            q = ggml.ggml_cont(ctx, ggml.ggml_view_4d(ctx, r, d, rep, g, t, nb1, nb2, nb3, 0))
            k = ggml.ggml_cont(ctx, ggml.ggml_view_4d(ctx, r, d, 1, g, t, nb1, nb2, nb3, rep * d * f))
            v = ggml.ggml_cont(ctx, ggml.ggml_view_4d(ctx, y, d, 1, g, t, nb1, nb2, nb3, (rep + 1) * d * f))
            k_cache, v_cache = self.caches[i - self.first]
            k_all = ggml.ggml_set_rows(ctx, k_cache, ggml.ggml_reshape_2d(ctx, k, d * g, t), s["rows"])
            v_all = ggml.ggml_set_rows(ctx, v_cache, ggml.ggml_reshape_2d(ctx, v, d * g, t), s["rows"])
            row = d * g * f
            keys = ggml.ggml_view_3d(ctx, k_all, d, cap, g, row, d * f, 0)      # (g, cap, d)
            values = ggml.ggml_view_3d(ctx, v_all, d, cap, g, row, d * f, 0)
            queries = ggml.ggml_permute(ctx, ggml.ggml_reshape_3d(ctx, q, d, rep * g, t), 0, 2, 1, 3)
            attended = ggml.ggml_flash_attn_ext(ctx, queries, keys, values, s["masks"][cfg.windows[i]],
                                                self.scale, 0.0, 0.0)
            return ggml.ggml_mul_mat(ctx, w["o"], ggml.ggml_reshape_2d(ctx, attended, d * rep * g, t))
        self._run(("attention", i), build, total, out)

    def mlp(self, i: int, total: np.ndarray, out: np.ndarray) -> None:
        """Layer ``i``'s MLP: this rank's rows' partial sum of its output into ``out``."""
        w, c, n, t = self.w[i - self.first], self.chunk, self.mlp_rows[i - self.first], self._current["t"]
        bias = f"{i}.o_bias"
        if n == 0:
            out[...] = 0
            self._run(("residual mlp", i), lambda ctx, x: self._residual(ctx, x, bias), total, None)
            return

        def build(ctx, x):
            h = self._norm(ctx, self._residual(ctx, x, bias), f"{i}.mlp_norm")
            y = ggml.ggml_mul_mat(ctx, w["gate_up"], h)  # (t, 2n): gate and up interleaved in chunks
            if f"{i}.gate_up_bias" in self.vec:
                y = ggml.ggml_add(ctx, y, self.vec[f"{i}.gate_up_bias"])
            nb1, nb2, nb3 = c * 4, 2 * c * 4, y.contents.nb[1]
            gate = ggml.ggml_cont(ctx, ggml.ggml_view_4d(ctx, y, c, 1, n // c, t, nb1, nb2, nb3, 0))
            up = ggml.ggml_cont(ctx, ggml.ggml_view_4d(ctx, y, c, 1, n // c, t, nb1, nb2, nb3, c * 4))
            act = ggml.ggml_mul(ctx, ggml.ggml_silu(ctx, gate), up)
            return ggml.ggml_mul_mat(ctx, w["down"], ggml.ggml_reshape_2d(ctx, act, n, t))
        self._run(("mlp", i), build, total, out)

    def logits(self, total: np.ndarray, all_rows: bool) -> np.ndarray:
        """This rank's vocabulary slice of the logits of the last row (or of every row)."""
        t = self._current["t"]
        rows = t if all_rows else 1
        out = np.empty((rows, self.vocab_rows), dtype=np.float32)
        if self.vocab_rows == 0:
            return out

        def build(ctx, x):
            r = self._residual(ctx, x, f"{self.cfg.num_layers - 1}.down_bias")
            if rows != t:
                r = ggml.ggml_view_2d(ctx, r, r.contents.ne[0], rows, r.contents.nb[1],
                                      (t - rows) * r.contents.nb[1])
            return ggml.ggml_mul_mat(ctx, self.head, self._norm(ctx, r, "final_norm"))
        self._run(("logits", all_rows), build, total, out)
        return out

    def close(self) -> None:
        """Free the caches, graphs and vectors (the weight blocks belong to the runtime)."""
        self._sets.clear()
        self.memory.close()
        self._borrowed.clear()
        if self._own is not None:
            self._own.close()

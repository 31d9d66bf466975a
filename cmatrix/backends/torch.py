"""PyTorch backend: CPU, CUDA (``cuda:i``), ROCm (through torch's CUDA API) and Apple MPS.

Blocks live as tensors on the rank's device between calls and are computed in
their own dtype (half-precision GEMMs on GPUs); in a matmul of two dtypes the
smaller operand is converted to the larger one's (a resident half weight is
never widened per call). On the CPU, half blocks stay half (half the memory) but
compute as float32: torch's CPU half kernels are slow and round every product, so a
product widens a few MiB of the half operand's rows at a time (:func:`cpu_product`).

Node-side operations (activations, softmax/RMSNorm pieces, rotary embeddings,
attention, ...) stay on the tensor's device and compute in float32 (half tensors
are widened first); only the host vectors they take or give cross to the host.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

from ..core.arrays import aligned
from ..core.dtypes import STORAGE
from .base import Backend
from .host_quant import HostBlocks
from .torch_quant import TorchDeviceBlocks

# Set per rank by launchers that hand each rank its own device.
_VISIBILITY = ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES")
_TORCH_DTYPE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pick_device(device_index: int, accel: bool) -> tuple[torch.device, str, str | None]:
    """(device, readable name, fallback reason) for the rank's ``device_index``-th accelerator."""
    if not accel:
        return torch.device("cpu"), "cpu", None
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        kind = "rocm" if getattr(torch.version, "hip", None) else "cuda"
        if count == 1 and any(os.environ.get(v) for v in _VISIBILITY):
            device_index = 0  # the launcher gave this rank a GPU of its own (e.g. Slurm --gpus-per-task)
        if device_index < count:
            name = f"cuda:{device_index} ({torch.cuda.get_device_name(device_index)}, {kind})"
            return torch.device("cuda", device_index), name, None
        return (torch.device("cpu"), "cpu",
                f"this host has {count} {kind} device(s), all taken by lower local ranks")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        if device_index == 0:
            return torch.device("mps"), "mps (Apple GPU)", None
        return torch.device("cpu"), "cpu", "the host's one MPS device is taken by a lower local rank"
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        return torch.device("cpu"), "cpu", "this torch build has no CUDA/ROCm and no MPS device was found"
    return torch.device("cpu"), "cpu", "torch sees no CUDA/ROCm device"


#: float32 bytes of a half operand widened at once by cpu_product
TILE_BYTES = 4 << 20


def cpu_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in float32 on the CPU, a half operand widened a tile of its lines at a time (its
    float32 copy never exists whole): the values of widening it first, the speed of float32."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return a @ b
    if b.dtype != torch.float32 and b.numel() >= a.numel():  # tile b's columns (rows of b.T)
        out = torch.empty((a.shape[0], b.shape[1]), dtype=torch.float32)
        af = a.float()
        step = max(1, TILE_BYTES // (4 * max(b.shape[0], 1)))
        for i in range(0, b.shape[1], step):
            torch.matmul(af, b[:, i:i + step].float(), out=out[:, i:i + step])
        return out
    if a.dtype != torch.float32:  # tile a's rows
        out = torch.empty((a.shape[0], b.shape[1]), dtype=torch.float32)
        bf = b.float()
        step = max(1, TILE_BYTES // (4 * max(a.shape[1], 1)))
        for i in range(0, a.shape[0], step):
            torch.matmul(a[i:i + step].float(), bf, out=out[i:i + step])
        return out
    return a @ b.float()


class TorchDense(Backend):
    name = "torch"

    def __init__(self, device_index: int = 0, threads: int = 1, accel: bool = True) -> None:
        super().__init__(device_index, threads, accel)
        torch.set_num_threads(threads)  # per process: one backend per rank
        self.torch_device, name, self.fallback = pick_device(device_index, accel)
        self.device = f"{name}, torch {torch.__version__}"
        if self.torch_device.type == "cpu":
            self.device = f"cpu (torch {torch.__version__})"

    def upload_dense(self, data: np.ndarray, dtype: str) -> torch.Tensor:
        host = np.ascontiguousarray(data)
        if self.torch_device.type == "cpu":
            # aligned: the LLM decoder's ggml graphs multiply CPU weights where they lie
            host = aligned(host)
        if dtype == "bfloat16":  # bits in uint16: reinterpret, never convert
            tensor = torch.from_numpy(host.view(np.int16)).view(torch.bfloat16)
        else:
            tensor = torch.from_numpy(host)
        return tensor.to(self.torch_device)

    def download(self, x: torch.Tensor, dtype: str) -> np.ndarray:
        y = x.to(_TORCH_DTYPE[dtype]).contiguous().cpu()
        if dtype == "bfloat16":
            return y.view(torch.int16).numpy().view(STORAGE["bfloat16"])
        return y.numpy()

    @staticmethod
    def _common(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if a.dtype != b.dtype or a.device.type == "cpu":  # the CPU computes half in float32
            return a.float(), b.float()
        return a, b

    def matmul(self, a, b, transpose_a=False, transpose_b=False) -> torch.Tensor:
        if self.torch_device.type == "cpu":
            return cpu_product(a.T if transpose_a else a, b.T if transpose_b else b)
        if a.dtype != b.dtype:
            # Meet in the larger operand's dtype (a resident half weight times a float32
            # activation computes in half, as GPU inference does) instead of widening the
            # weight on every call.
            if a.numel() >= b.numel():
                b = b.to(a.dtype)
            else:
                a = a.to(b.dtype)
        return torch.matmul(a.T if transpose_a else a, b.T if transpose_b else b)

    def matmul_float32(self, a, b, transpose_a=False, transpose_b=False) -> torch.Tensor:
        """A product left in float32 (a partial sum): half GEMMs accumulate in float32 but
        would round their output to half."""
        if a.dtype == b.dtype == torch.float32 or self.torch_device.type == "cpu":
            return self.matmul(a, b, transpose_a, transpose_b)
        a, b = (a.T if transpose_a else a), (b.T if transpose_b else b)
        if a.dtype == b.dtype and a.is_cuda:
            try:
                return torch.mm(a, b, out_dtype=torch.float32)  # half inputs, float32 output
            except (TypeError, RuntimeError, NotImplementedError):
                pass  # an older torch or a ROCm build without the float32-output kernel
        return torch.matmul(a.float(), b.float())

    def add(self, a, b) -> torch.Tensor:
        return torch.add(*self._common(a, b))

    def sub(self, a, b) -> torch.Tensor:
        return torch.sub(*self._common(a, b))

    # Node-side operations: semantics in cmatrix.backends.base.Backend.

    def _vec(self, values: np.ndarray) -> torch.Tensor:
        """A float32 host array on this backend's device."""
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(self.torch_device)

    def _shift(self, shift: np.ndarray, axis: int) -> torch.Tensor:
        """A softmax shift on the device, -inf (an all -inf slice) replaced by 0, broadcast along axis."""
        s = self._vec(shift)
        return torch.where(torch.isneginf(s), torch.zeros_like(s), s).unsqueeze(axis)

    def activation(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        """silu / gelu (exact) / gelu_tanh of ``x`` in float32, on its device."""
        xf = x.float()
        if kind == "silu":
            return F.silu(xf)
        if kind in ("gelu", "gelu_tanh"):
            return F.gelu(xf, approximate="none" if kind == "gelu" else "tanh")
        raise ValueError(f"unknown activation {kind!r}")

    def row_reduce(self, x: torch.Tensor, kind: str, axis: int,
                   shift: np.ndarray | None = None) -> np.ndarray:
        """max / sum / sumexp / sumsq of ``x`` along ``axis``, reduced on the device in float32."""
        xf = x.float()
        if kind == "max":
            out = xf.amax(dim=axis)
        elif kind == "sum":
            out = xf.sum(dim=axis)
        elif kind == "sumexp":
            out = torch.exp(xf if shift is None else xf - self._shift(shift, axis)).sum(dim=axis)
        elif kind == "sumsq":
            out = (xf if shift is None else xf - self._shift(shift, axis)).square().sum(dim=axis)
        else:
            raise ValueError(f"unknown reduction {kind!r}")
        return out.cpu().numpy()

    def softmax_finish(self, x: torch.Tensor, shift: np.ndarray, total: np.ndarray,
                       axis: int) -> torch.Tensor:
        """exp(x - shift) / total on the device; a slice whose total is 0 gives zeros."""
        t = self._vec(total)
        t = torch.where(t > 0, t, torch.full_like(t, float("inf")))
        return torch.exp(x.float() - self._shift(shift, axis)) / t.unsqueeze(axis)

    def rms_finish(self, x: torch.Tensor, mean_square: np.ndarray, weight: np.ndarray | None, eps: float,
                   axis: int) -> torch.Tensor:
        """x / sqrt(mean_square + eps) * weight on the device, in float32."""
        y = x.float() * torch.rsqrt(self._vec(mean_square) + eps).unsqueeze(axis)
        return y if weight is None else y * self._vec(weight).unsqueeze(1 - axis)

    def layer_finish(self, x: torch.Tensor, mean: np.ndarray, variance: np.ndarray, weight: np.ndarray | None,
                     bias: np.ndarray | None, eps: float, axis: int) -> torch.Tensor:
        """(x - mean) / sqrt(variance + eps) * weight + bias on the device, in float32."""
        inverse = torch.rsqrt(self._vec(variance) + eps).unsqueeze(axis)
        y = (x.float() - self._vec(mean).unsqueeze(axis)) * inverse
        if weight is not None:
            y = y * self._vec(weight).unsqueeze(1 - axis)
        return y if bias is None else y + self._vec(bias).unsqueeze(1 - axis)

    def rope(self, x: torch.Tensor, cos: np.ndarray, sin: np.ndarray, head_dim: int,
             interleaved: bool = False) -> torch.Tensor:
        """Rotary embedding of every head (rotate_half pairs, or interleaved pairs) on the device."""
        rows, cols = x.shape
        half = head_dim // 2
        c, s = self._vec(cos).unsqueeze(1), self._vec(sin).unsqueeze(1)  # (rows, 1, half)
        if interleaved:
            pairs = x.float().reshape(rows, cols // head_dim, half, 2)
            a, b = pairs[..., 0], pairs[..., 1]
            out = torch.stack((a * c - b * s, b * c + a * s), dim=-1)
        else:
            heads = x.float().reshape(rows, cols // head_dim, head_dim)
            a, b = heads[..., :half], heads[..., half:]
            out = torch.cat((a * c - b * s, b * c + a * s), dim=-1)
        return out.reshape(rows, cols)

    def repeat_kv(self, x: torch.Tensor, head_dim: int, n_rep: int) -> torch.Tensor:
        """Each head of ``x`` repeated ``n_rep`` times in place (float32, on the device)."""
        rows, cols = x.shape
        heads = x.float().reshape(rows, cols // head_dim, head_dim)
        return heads.repeat_interleave(n_rep, dim=1).reshape(rows, cols * n_rep)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dim: int, scale: float,
                  mask: np.ndarray | None = None, causal: bool = False) -> torch.Tensor:
        """Scaled dot-product attention through torch's SDPA, in float32 on the device; query
        rows that see no key (every score -inf) are set to zeros (SDPA may give NaN there)."""
        sq, sk = q.shape[0], k.shape[0]
        n_heads, n_kv = q.shape[1] // head_dim, k.shape[1] // head_dim
        # (1, heads, S, head_dim), as SDPA wants
        qh = q.float().reshape(sq, n_heads, head_dim).transpose(0, 1).unsqueeze(0)
        kh = k.float().reshape(sk, n_kv, head_dim).transpose(0, 1).unsqueeze(0)
        vh = v.float().reshape(sk, n_kv, head_dim).transpose(0, 1).unsqueeze(0)
        bias = None if mask is None else self._vec(mask)
        is_causal = causal and bias is None and sq == sk  # SDPA's causal is top-left aligned
        if causal and not is_causal and sq > 1:  # one query row sees every key
            keys = torch.arange(sk, device=self.torch_device)
            queries = torch.arange(sq, device=self.torch_device)
            allowed = keys[None, :] <= queries[:, None] + (sk - sq)
            blocked = torch.zeros((sq, sk), device=self.torch_device).masked_fill(~allowed, float("-inf"))
            bias = blocked if bias is None else bias + blocked
        if n_heads != n_kv:
            try:
                out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=bias, is_causal=is_causal,
                                                     scale=scale, enable_gqa=True)
            except TypeError:  # torch < 2.5: no enable_gqa, repeat the kv heads instead
                group = n_heads // n_kv
                out = F.scaled_dot_product_attention(qh, kh.repeat_interleave(group, dim=1),
                                                     vh.repeat_interleave(group, dim=1), attn_mask=bias,
                                                     is_causal=is_causal, scale=scale)
        else:
            out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=bias, is_causal=is_causal, scale=scale)
        out = out[0].transpose(0, 1)  # (Sq, heads, head_dim)
        if bias is not None:
            dead = torch.isneginf(bias).all(dim=-1)  # (Sq,): rows that see no key
            out = out.masked_fill(dead[:, None, None], 0.0)
        return out.reshape(sq, n_heads * head_dim)

    def transpose(self, x: torch.Tensor) -> torch.Tensor:
        """A contiguous transposed copy on the device, in ``x``'s own dtype (values exact)."""
        return x.T.clone(memory_format=torch.contiguous_format)  # a copy even for 1-row x

    def memory(self) -> int | None:
        if self.torch_device.type == "cuda":
            return int(torch.cuda.get_device_properties(self.torch_device).total_memory)
        if self.torch_device.type == "mps" and hasattr(torch.mps, "recommended_max_memory"):
            return int(torch.mps.recommended_max_memory())
        return super().memory()

    def memory_free(self) -> tuple[int | None, str]:
        if self.torch_device.type == "cuda":
            props = torch.cuda.get_device_properties(self.torch_device)
            ident = getattr(props, "uuid", None) or f"{props.name} #{self.torch_device.index or 0}"
            return int(torch.cuda.mem_get_info(self.torch_device)[0]), f"cuda {ident}"
        if self.torch_device.type == "mps" and hasattr(torch.mps, "recommended_max_memory"):
            return int(torch.mps.recommended_max_memory() - torch.mps.current_allocated_memory()), "mps"
        return super().memory_free()

    def memory_used(self) -> int | None:
        if self.torch_device.type == "cuda":
            return int(torch.cuda.memory_allocated(self.torch_device))
        if self.torch_device.type == "mps" and hasattr(torch.mps, "current_allocated_memory"):
            return int(torch.mps.current_allocated_memory())
        return super().memory_used()


class TorchBackend(TorchDeviceBlocks, HostBlocks, TorchDense):
    """The torch backend: dense blocks as tensors on its device; quantised ones as blocks, in
    the device's memory on a GPU (:mod:`.torch_quant`), in host memory on the CPU."""

    @property
    def keeps_blocks(self) -> bool:
        """Quantised weights stay blocks in host memory on the CPU (a GPU keeps them on the device)."""
        return self.torch_device.type == "cpu"

    def to_host(self, x: torch.Tensor) -> np.ndarray:
        return x.float().numpy()

    def from_host(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array)

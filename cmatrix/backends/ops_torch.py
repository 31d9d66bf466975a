"""PyTorch backend: CPU, CUDA (``cuda:i``), ROCm (through torch's CUDA API) and Apple MPS.

Blocks live as tensors on the rank's device between calls and are computed in
their own dtype (half-precision GEMMs on GPUs); in a matmul of two dtypes the
smaller operand is converted to the larger one's (a resident half weight is
never widened per call). On the CPU, half blocks are held as float32.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from ..dtypes import STORAGE
from .base import Backend

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


class TorchBackend(Backend):
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
        if dtype == "bfloat16":  # bits in uint16: reinterpret, never convert
            tensor = torch.from_numpy(host.view(np.int16)).view(torch.bfloat16)
        else:
            tensor = torch.from_numpy(host)
        if dtype != "float32" and self.torch_device.type == "cpu":
            # torch's CPU half kernels are slow (a 4096^2 float16 GEMV takes ~40x longer than
            # in float32, bfloat16 ~2x) and round every product to the half type: hold half
            # blocks widened once, as the numpy backend does.
            return tensor.float()
        return tensor.to(self.torch_device)

    def download(self, x: torch.Tensor, dtype: str) -> np.ndarray:
        y = x.to(_TORCH_DTYPE[dtype]).contiguous().cpu()
        if dtype == "bfloat16":
            return y.view(torch.int16).numpy().view(STORAGE["bfloat16"])
        return y.numpy()

    @staticmethod
    def _common(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if a.dtype != b.dtype:
            return a.float(), b.float()
        return a, b

    def matmul(self, a, b, transpose_a=False, transpose_b=False) -> torch.Tensor:
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
        if a.dtype == b.dtype == torch.float32:
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

    def memory(self) -> int | None:
        if self.torch_device.type == "cuda":
            return int(torch.cuda.get_device_properties(self.torch_device).total_memory)
        if self.torch_device.type == "mps" and hasattr(torch.mps, "recommended_max_memory"):
            return int(torch.mps.recommended_max_memory())
        return super().memory()

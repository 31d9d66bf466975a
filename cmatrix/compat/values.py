"""How the seed's API takes and gives data: 2-D matrices in, torch tensors out."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ..core.arrays import HostArray, is_torch
from ..errors import InputError
from ..io.store import from_user


def as_matrix(data: Any) -> HostArray:
    """The user's data as a 2-D host matrix (leading axes of length 1 dropped)."""
    host = from_user(data, "matrix_file_path")
    shape = host.shape
    while host.data.ndim > 2 and host.data.shape[0] == 1:
        host = HostArray(host.data.reshape(host.data.shape[1:]), host.dtype, host.kind)
    if host.data.ndim != 2 or 0 in host.data.shape:
        raise InputError(f"matrix_file_path: expected a non-empty 2-D matrix, got shape {shape}; as the "
                         "seed README says, reshape in torch first (e.g. x.unsqueeze(1) for a column)")
    return host


def heads_layout(data: Any, split: bool, dim: int) -> tuple[Any, int | None, int]:
    """The seed's attention layout: a tensor ``[H, T, D]`` or ``[1, H, T, D]`` (one sequence,
    H heads) becomes the (T, H*D) matrix cmatrix attends on, split by heads (``dim`` must
    name the heads axis then). Returns (data, head_dim, dim); 2-D data and paths pass through."""
    if isinstance(data, (str, os.PathLike)) or data is None or getattr(data, "ndim", 2) <= 2:
        return data, None, dim
    host = from_user(data, "matrix_file_path")
    x, lead = host.data, 0
    while x.ndim > 2 and x.shape[0] == 1:  # a batch of one; one head is a plain matrix
        x, lead = x.reshape(x.shape[1:]), lead + 1
    if x.ndim == 2:
        return HostArray(x, host.dtype, host.kind), None, dim
    if x.ndim != 3 or 0 in x.shape:
        raise InputError(f"matrix_file_path: a {host.data.ndim}-D tensor of shape {host.shape} is taken as "
                         "[batch, heads, tokens, head_dim] with batch 1, or [heads, tokens, head_dim]; "
                         "pass one sequence at a time")
    if split and dim != lead:
        raise InputError(f"dim: a [.., heads, tokens, head_dim] tensor is split by heads: dim={lead}, "
                         f"got {dim}")
    heads, tokens, head_dim = x.shape
    matrix = np.ascontiguousarray(x.transpose(1, 0, 2).reshape(tokens, heads * head_dim))
    return HostArray(matrix, host.dtype, host.kind), head_dim, 1


def seed_layout(x: Any, head_dim: int) -> Any:
    """(T, H*D) attention output -> the seed's ``[H*T, D]``: heads stacked along the rows."""
    tokens, width = x.shape
    heads = width // head_dim
    return x.reshape(tokens, heads, head_dim).permute(1, 0, 2).reshape(heads * tokens, head_dim)


def as_tensor(x: Any) -> Any:
    """A result as the seed returned it: a torch tensor when torch is installed."""
    if is_torch(x):
        return x
    try:
        import torch
    except ImportError:
        return x
    return torch.from_numpy(x)


def check_combined_result_values(c_ref_path: Any, combined: Any) -> bool:
    """The seed's check of a cluster result against a reference (a tensor or a ``.pt`` path):
    prints the shapes, dtypes and differences, and whether they agree within the seed's
    per-dtype tolerances; returns that verdict (the seed returned nothing)."""
    import torch

    ref = c_ref_path if torch.is_tensor(c_ref_path) else torch.load(c_ref_path, weights_only=True)
    if not torch.is_tensor(combined):
        combined = torch.from_numpy(combined)
    if tuple(ref.shape) != tuple(combined.shape):
        print(f"Shape mismatch! Reference: {tuple(ref.shape)}, combined: {tuple(combined.shape)}")
        return False
    print(f"Shapes match: {tuple(ref.shape)}; reference {ref.dtype}, combined {combined.dtype}")
    rtol, atol = {torch.float16: (1e-2, 1e-2), torch.bfloat16: (1e-2, 1e-2),
                  torch.float64: (1e-6, 1e-6)}.get(combined.dtype, (1e-3, 1e-3))
    ref32, got32 = ref.to(torch.float32), combined.to(device=ref.device, dtype=torch.float32)
    diff = (ref32 - got32).abs()
    rel = diff / ref32.abs().clamp_min(1e-12)
    print(f"Max absolute difference:  {diff.max().item():.6e}")
    print(f"Mean absolute difference: {diff.mean().item():.6e}")
    print(f"Max relative difference:  {rel.max().item():.6e}")
    bad = int((diff.isnan() | (diff > atol + rtol * got32.abs())).sum().item())
    ok = bad == 0
    print(f"{'Results match' if ok else 'Results differ'} within rtol={rtol} atol={atol}: "
          f"{bad}/{ref32.numel()} elements outside")
    return ok

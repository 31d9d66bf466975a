"""PyTorch modules whose weights live on the cluster: a drop-in for ``nn.Linear``.

    import cmatrix as cm
    cl = cm.init()
    swapped = cm.nn.shard_linears(model, cl)      # every Linear of the model, in place
    out = model(**inputs)                          # same outputs, linears computed by the ranks

A :class:`ClusterLinear` shards its weight by output features (each rank holds
whole rows of the (out, in) weight, in proportion to its share) once, keeps it
resident, and on every call sends the activation and gathers the output
columns. The bias is added once, on the driver. Inference only: no gradients
flow through the cluster.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .api.cluster import Cluster
from .core import quant as q
from .core.arrays import from_array
from .errors import InputError


class ClusterLinear(torch.nn.Module):
    """``y = x @ weight.T + bias`` with ``weight`` (out_features, in_features) sharded
    across the cluster by output features.

    ``weights``: per-rank shares (default the cluster's). ``quant``: "q8_0" or
    "q4_0" to store the weight in 32-value blocks along in_features (ggml ranks
    keep the blocks). ``name``/``cache``: as :meth:`Cluster.shard` (e.g.
    ``cache="save"`` writes each rank's rows to its node's disk).
    """

    def __init__(self, cluster: Cluster, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 weights: Sequence[float] | None = None, quant: str | None = None,
                 name: str | None = None, cache: str | None = None) -> None:
        super().__init__()
        if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
            raise InputError(f"weight: expected a 2-D (out_features, in_features) tensor, got "
                             f"{getattr(weight, 'shape', type(weight).__name__)}")
        if bias is not None and tuple(bias.shape) != (weight.shape[0],):
            raise InputError(f"bias: expected shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        self.cluster = cluster
        self.out_features, self.in_features = (int(n) for n in weight.shape)
        self.sharded = cluster.shard(weight.detach(), name=name, weights=weights, axis=0, quant=quant,
                                     quant_axis=1, cache=cache)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self._weight_dtype = weight.dtype

    @property
    def weight(self) -> torch.Tensor:
        """A stand-in with the weight's shape and dtype on the meta device (no data: the
        rows live on the ranks), for model code that reads ``layer.weight.dtype``."""
        return torch.empty(self.out_features, self.in_features, dtype=self._weight_dtype, device="meta")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise InputError(f"x: last dimension {x.shape[-1]} != in_features {self.in_features}")
        lead = x.shape[:-1]
        if x.numel() == 0:  # e.g. an expert that got no tokens
            return x.new_zeros(*lead, self.out_features)
        flat = x.detach().reshape(-1, self.in_features)
        y = self.cluster.matmul(flat, self.sharded, transpose_b=True)
        y = y.to(device=x.device, dtype=x.dtype).reshape(*lead, self.out_features)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def extra_repr(self) -> str:
        counts = list(self.sharded.counts)
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, rows per rank={counts}")


def _as_linear(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight as (out, in), bias) for a plain nn.Linear or a transformers Conv1D, else None.

    Subclasses of nn.Linear are left alone: quantised (int8/fp8) and LoRA layers hold
    weights this layer cannot take, and MultiheadAttention reads ``out_proj.weight``
    directly instead of calling it."""
    if type(module) is torch.nn.Linear:
        return module.weight, module.bias
    if type(module).__name__ == "Conv1D" and tuple(module.weight.shape) == (
            getattr(module, "nx", None), getattr(module, "nf", None)):  # GPT-2: weight is (in, out)
        return module.weight.T, module.bias
    return None


def _check(qualified: str, weight: torch.Tensor, cluster: Cluster, quant: str | None) -> None:
    """Refuse a layer that cannot be swapped, before any layer is."""
    if weight.is_meta:
        raise InputError(f"{qualified}: its weight is on the meta device (not loaded); load the model "
                         "first, e.g. without device_map/low_cpu_mem_usage")
    if quant is None:
        cluster.driver.check_dtype(from_array(weight[:0], qualified).dtype)
    else:
        q.check_kind(quant)
        q.check_row_length(weight.shape[1], quant, f"{qualified}: in_features")


def shard_linears(model: torch.nn.Module, cluster: Cluster, weights: Sequence[float] | None = None,
                  min_features: int = 0, quant: str | None = None, cache: str | None = None,
                  prefix: str = "") -> list[str]:
    """Replace, in place, every plain ``nn.Linear`` (and transformers' ``Conv1D``) of
    ``model`` whose in and out features are both at least ``min_features`` with a
    :class:`ClusterLinear`. Returns the qualified names of the replaced modules. Every
    layer is checked before any is swapped. The swapped weights live on the ranks: the
    model's ``state_dict`` no longer holds them (save a checkpoint before swapping).

    ``cache`` ("save"/"load"/"auto") caches each weight on the nodes under
    ``prefix + qualified name``; ``quant`` quantises every swapped weight.
    """
    if isinstance(min_features, bool) or not isinstance(min_features, int) or min_features < 0:
        raise InputError(f"min_features: an integer >= 0, got {min_features!r}")
    targets: dict[int, list[str]] = {}  # one module under several names is swapped once
    inside_mha = set()
    for qualified, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, torch.nn.MultiheadAttention):
            inside_mha.add(qualified)
        found = _as_linear(module)
        if found is None or min(found[0].shape) < min_features:
            continue
        if any(qualified.startswith(f"{p}.") for p in inside_mha):
            continue
        if id(module) not in targets:
            _check(qualified, found[0], cluster, quant)
        targets.setdefault(id(module), []).append(qualified)
    swapped = []
    for qualified_names in targets.values():  # names only: each weight is read as it is sent
        weight, bias = _as_linear(model.get_submodule(qualified_names[0]))
        name = f"{prefix}{qualified_names[0]}" if cache is not None else None
        replacement = ClusterLinear(cluster, weight, bias, weights=weights, quant=quant, name=name,
                                    cache=cache)
        del weight, bias
        for qualified in qualified_names:
            parent_name, _, attr = qualified.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, replacement)
            swapped.append(qualified)
    return swapped


__all__ = ["ClusterLinear", "shard_linears"]

"""Tensors of a local Hugging Face checkpoint: ``*.safetensors``, with or without
``model.safetensors.index.json``. Read one tensor at a time, never a pickle."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..core.dtypes import to_float32
from ..errors import InputError
from ..io import safetensors as st
from .config import DecoderConfig

_LOGICAL = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


class Checkpoint:
    """Name -> file of every tensor in a model folder; :meth:`get` reads one as float32."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        index_file = self.path / "model.safetensors.index.json"
        files: dict[str, Path] = {}
        if index_file.exists():
            try:
                weight_map = json.loads(index_file.read_text())["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError(f"weight_map is a {type(weight_map).__name__}, not an object")
            except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
                raise InputError(f"{index_file}: not a safetensors index "
                                 f"({type(exc).__name__}: {exc})") from None
            for name, file in weight_map.items():
                files[name] = self._inside(file)
        else:
            for file in sorted(self.path.glob("*.safetensors")):
                for name in st.read_index(file).entries:
                    files[name] = file
        if not files:
            raise InputError(f"{self.path}: no *.safetensors weights found (.bin/.pt checkpoints are not "
                             "read: they are pickles; convert them with transformers' save_pretrained)")
        self.files = files
        self._indexes: dict[Path, st.Index] = {}

    def _inside(self, file: str) -> Path:
        # Judged by the name, not by where symlinks lead: a hub cache links every file
        # of a snapshot to a blob outside the folder.
        if not isinstance(file, str) or not Path(file).parts or Path(file).is_absolute() \
                or ".." in Path(file).parts:
            raise InputError(f"{self.path}: index names a file outside the model folder: {file!r}")
        if not (self.path / file).is_file():
            raise InputError(f"{self.path}: the index names {file!r}, which is not there")
        return self.path / file

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def check(self, name: str, shape: tuple[int, ...] | None = None) -> dict:
        """Refuse a missing tensor, one of another dtype than F32/F16/BF16, or of another shape."""
        entry = self._entry(name)
        if entry["dtype"] not in _LOGICAL:
            raise InputError(f"{self.files[name]}: {name} is {entry['dtype']}; expected F32, F16 or BF16")
        if shape is not None and tuple(entry["shape"]) != tuple(shape):
            raise InputError(f"{self.files[name]}: {name} has shape {tuple(entry['shape'])}, the config "
                             f"implies {tuple(shape)}")
        return entry

    def get(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """Tensor ``name`` as float32, checked against ``shape`` when given."""
        entry = self.check(name, shape)
        file = self.files[name]
        data = self._indexes[file].read(file, name)
        return np.ascontiguousarray(to_float32(data, _LOGICAL[entry["dtype"]]), dtype=np.float32)

    def rows(self, name: str, shape: tuple[int, ...], lo: int, hi: int) -> np.ndarray:
        """Rows ``lo:hi`` of tensor ``name`` as float32, reading only their bytes."""
        entry = self.check(name, shape)
        file = self.files[name]
        data = self._indexes[file].read_rows(file, name, lo, hi)
        return np.ascontiguousarray(to_float32(data, _LOGICAL[entry["dtype"]]), dtype=np.float32)

    def columns(self, name: str, shape: tuple[int, int], lo: int, hi: int) -> np.ndarray:
        """Columns ``lo:hi`` of matrix ``name`` as float32, read a band of rows at a time."""
        return columns_in_bands(self.rows, name, shape, lo, hi)

    def _entry(self, name: str) -> dict:
        if name not in self.files:
            near = ", ".join(sorted(self.files)[:6])
            raise InputError(f"{self.path}: the checkpoint has no tensor {name!r} (it has e.g. {near})")
        file = self.files[name]
        if file not in self._indexes:
            self._indexes[file] = st.read_index(file)
        try:
            return self._indexes[file].entries[name]
        except KeyError:
            raise InputError(f"{file}: the index says it holds {name!r}, but it does not") from None


#: bytes of a matrix read at once when only some of its columns are wanted
BAND_BYTES = 8 << 20


def columns_in_bands(rows: Any, name: str, shape: tuple[int, int], lo: int, hi: int) -> np.ndarray:
    """Columns ``lo:hi`` of a matrix whose ``rows(name, shape, a, b)`` can be read, a band at a time."""
    out = np.empty((shape[0], hi - lo), dtype=np.float32)
    step = max(1, BAND_BYTES // (4 * max(shape[1], 1)))
    for a in range(0, shape[0], step):
        out[a:a + step] = rows(name, shape, a, min(a + step, shape[0]))[:, lo:hi]
    return out


def tensor_names(cfg: DecoderConfig, ckpt: Any) -> dict[str, tuple[str | None, tuple[int, ...]]]:
    """key -> (Hugging Face tensor name, expected shape) for everything the decoder reads from
    ``ckpt`` (a :class:`Checkpoint` or a GGUF file)."""
    hid, inter, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    nq, nkv = cfg.num_heads * d, cfg.num_kv_heads * d
    names: dict[str, tuple[str | None, tuple[int, ...]]] = {
        "embed": ("model.embed_tokens.weight", (cfg.vocab_size, hid)),
        "final_norm": ("model.norm.weight", (hid,)),
    }
    tied = cfg.tie_word_embeddings
    if not tied and "lm_head.weight" not in ckpt:
        raise InputError(f"{ckpt.path}: no lm_head.weight, and config.json does not tie it to the "
                         "embeddings (tie_word_embeddings)")
    names["lm_head"] = ("model.embed_tokens.weight" if tied else "lm_head.weight", (cfg.vocab_size, hid))
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        names.update({
            f"{i}.q": (p + "self_attn.q_proj.weight", (nq, hid)),
            f"{i}.k": (p + "self_attn.k_proj.weight", (nkv, hid)),
            f"{i}.v": (p + "self_attn.v_proj.weight", (nkv, hid)),
            f"{i}.o": (p + "self_attn.o_proj.weight", (hid, nq)),
            f"{i}.gate": (p + "mlp.gate_proj.weight", (inter, hid)),
            f"{i}.up": (p + "mlp.up_proj.weight", (inter, hid)),
            f"{i}.down": (p + "mlp.down_proj.weight", (hid, inter)),
            f"{i}.attn_norm": (p + "input_layernorm.weight", (hid,)),
            f"{i}.mlp_norm": (p + "post_attention_layernorm.weight", (hid,)),
        })
        if cfg.qkv_bias:
            names.update({f"{i}.q_bias": (p + "self_attn.q_proj.bias", (nq,)),
                          f"{i}.k_bias": (p + "self_attn.k_proj.bias", (nkv,)),
                          f"{i}.v_bias": (p + "self_attn.v_proj.bias", (nkv,))})
        if cfg.o_bias:
            names[f"{i}.o_bias"] = (p + "self_attn.o_proj.bias", (hid,))
        if cfg.mlp_bias:
            names.update({f"{i}.gate_bias": (p + "mlp.gate_proj.bias", (inter,)),
                          f"{i}.up_bias": (p + "mlp.up_proj.bias", (inter,)),
                          f"{i}.down_bias": (p + "mlp.down_proj.bias", (hid,))})
    return names

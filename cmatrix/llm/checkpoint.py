"""Tensors of a local Hugging Face checkpoint: ``*.safetensors``, with or without
``model.safetensors.index.json``. Read one tensor at a time, never a pickle."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..core.dtypes import to_float32
from ..errors import InputError
from ..io import safetensors as st

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

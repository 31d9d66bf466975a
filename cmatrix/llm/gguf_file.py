"""A GGUF model file (llama.cpp's and Ollama's format) read as a checkpoint.

``GgufCheckpoint`` answers the loader the way :class:`~cmatrix.llm.checkpoint.Checkpoint`
does, under Hugging Face tensor names: the config comes from the file's metadata, the
tokenizer from its vocabulary (:mod:`cmatrix.llm.gguf_vocab`), each tensor is read from the
memory-mapped file one at a time. The well-kept ``gguf`` package parses the file and
dequantises the block types cmatrix does not keep (K-quants and the older 5-bit ones).

llama.cpp's converter reorders the rows of every Llama ``attn_q``/``attn_k`` head from
Hugging Face's two halves to interleaved pairs (its rotary embedding rotates adjacent
values); :meth:`GgufCheckpoint.get` puts them back. Qwen2 files are not reordered.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from .checkpoint import columns_in_bands
from .config import DecoderConfig

MAGIC = b"GGUF"
#: GGUF architectures of the Llama family (Mistral's files say "llama")
ARCHITECTURES = ("llama", "qwen2", "mistral")
#: what each stored type becomes on the ranks when the caller names neither dtype nor quant
KEEP = {"F32": (None, None), "F16": ("float16", None), "BF16": ("bfloat16", None),
        "Q8_0": (None, "q8_0"), "Q4_0": (None, "q4_0")}
#: block types cmatrix converts, to the kept type that loses least (4-bit codes -> q4_0, wider -> q8_0)
CONVERT = {"Q4_1": "q8_0", "Q5_0": "q8_0", "Q5_1": "q8_0", "Q2_K": "q4_0", "Q3_K": "q4_0",
           "Q4_K": "q4_0", "Q5_K": "q8_0", "Q6_K": "q8_0"}

_LAYER = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
          "post_attention_layernorm": "ffn_norm"}
_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight"}


def is_gguf(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file that starts with GGUF's magic bytes."""
    p = Path(path)
    if not p.is_file():
        return False
    try:
        with p.open("rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def gguf_name(hf_name: str) -> str:
    """llama.cpp's name of a Hugging Face tensor name (``model.layers.3.mlp.up_proj.weight`` ->
    ``blk.3.ffn_up.weight``); names it does not know pass through."""
    if hf_name in _TOP:
        return _TOP[hf_name]
    parts = hf_name.split(".")
    if len(parts) >= 5 and parts[:2] == ["model", "layers"]:
        module, kind = ".".join(parts[3:-1]), parts[-1]
        if module in _LAYER:
            return f"blk.{parts[2]}.{_LAYER[module]}.{kind}"
    return hf_name


def _require_gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise InputError('reading .gguf files needs the gguf package: pip install "cmatrix[llm]"') from None
    return gguf


class GgufCheckpoint:
    """The tensors, config and tokenizer of one ``.gguf`` file."""

    def __init__(self, path: str | os.PathLike) -> None:
        gguf = _require_gguf()
        self.path = Path(path)
        try:
            self._reader = gguf.GGUFReader(str(self.path), "r")
        except Exception as exc:  # the reader raises ValueError, IndexError, struct errors... on bad files
            raise InputError(f"{self.path}: not a readable GGUF file ({type(exc).__name__}: {exc})") from None
        self._tensors = {t.name: t for t in self._reader.tensors}
        self.arch = self.value("general.architecture")
        if self.arch not in ARCHITECTURES:
            raise InputError(f"{self.path}: GGUF architecture {self.arch!r} is not supported by cmatrix.llm "
                             f"(supported: {', '.join(ARCHITECTURES)})")
        self.config = self._config()
        #: llama.cpp reordered q/k rows to pairs (Llama-architecture files)
        self._pairs = self.arch in ("llama", "mistral")

    # ---- metadata -----------------------------------------------------------------

    def value(self, key: str, default: Any = None) -> Any:
        """Metadata ``key`` (strings decoded, arrays as lists), or ``default``."""
        field = self._reader.get_field(key)
        if field is None:
            return default
        try:
            return field.contents()
        except (UnicodeDecodeError, ValueError, IndexError) as exc:
            raise InputError(f"{self.path}: metadata {key} is damaged ({exc})") from None

    def _config(self) -> DecoderConfig:
        a = self.arch
        tokens = self._reader.get_field("tokenizer.ggml.tokens")
        embed = self._tensors.get("token_embd.weight")
        vocab = self.value(f"{a}.vocab_size") or (int(embed.shape[-1]) if embed is not None else None) \
            or (len(tokens.data) if tokens is not None else None)
        heads = self.value(f"{a}.attention.head_count")
        hidden = self.value(f"{a}.embedding_length")
        raw: dict[str, Any] = {
            "model_type": "qwen2" if a == "qwen2" else "llama",
            "vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": self.value(f"{a}.block_count"),
            "intermediate_size": self.value(f"{a}.feed_forward_length"),
            "num_attention_heads": heads,
            "num_key_value_heads": self.value(f"{a}.attention.head_count_kv", heads),
            "rms_norm_eps": self.value(f"{a}.attention.layer_norm_rms_epsilon", 1e-5),
            "max_position_embeddings": self.value(f"{a}.context_length", 2048),
            "rope_theta": self.value(f"{a}.rope.freq_base", 10000.0),
            "tie_word_embeddings": "output.weight" not in self._tensors,
            "attention_bias": a != "qwen2" and "blk.0.attn_q.bias" in self._tensors,
            "mlp_bias": a != "qwen2" and "blk.0.ffn_up.bias" in self._tensors,
            "bos_token_id": self.value("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self.value("tokenizer.ggml.eos_token_id"),
        }
        key_length = self.value(f"{a}.attention.key_length")
        if key_length is not None:
            raw["head_dim"] = key_length
        rope_dims = self.value(f"{a}.rope.dimension_count")
        head_dim = key_length or (hidden // heads if isinstance(hidden, int) and isinstance(heads, int)
                                  and heads else None)
        if rope_dims is not None and head_dim is not None and rope_dims != head_dim:
            raise InputError(f"{self.path}: rotary embedding over {rope_dims} of {head_dim} head values "
                             "is not supported")
        scaling = self.value(f"{a}.rope.scaling.type", "none")
        if scaling == "linear":
            raw["rope_scaling"] = {"rope_type": "linear", "factor": self.value(f"{a}.rope.scaling.factor")}
        elif scaling not in ("none", None):
            raise InputError(f"{self.path}: rope scaling {scaling!r} is not supported (supported: linear, "
                             "and Llama 3's rope_freqs)")
        window = self.value(f"{a}.attention.sliding_window")
        if window:
            raw.update(sliding_window=window, use_sliding_window=True, max_window_layers=0)
        cfg = DecoderConfig.from_dict(raw, f"{self.path} (GGUF metadata)")
        if "rope_freqs.weight" in self._tensors:  # Llama 3.1+: per-frequency divisors, precomputed
            factors = self._plain("rope_freqs.weight", (cfg.head_dim // 2,))
            cfg = dataclasses.replace(cfg, rope_freq_factors=tuple(float(f) for f in factors))
        return cfg

    def has_vocabulary(self) -> bool:
        """Whether the file holds a tokenizer's vocabulary."""
        return self._reader.get_field("tokenizer.ggml.tokens") is not None

    def close(self) -> None:
        """Drop the file's mapping (arrays already read from it keep their pages)."""
        self._reader, self._tensors = None, {}

    def tokenizer(self) -> Any:
        """The file's tokenizer (:class:`~cmatrix.llm.tokenizer.Tokenizer`)."""
        from .gguf_vocab import tokenizer_from_gguf

        return tokenizer_from_gguf(self)

    # ---- tensors ------------------------------------------------------------------

    def __contains__(self, name: str) -> bool:
        return gguf_name(name) in self._tensors

    def stored_type(self, name: str) -> str:
        """The GGUF type name a tensor is stored in (``"Q4_K"``, ``"F16"``...)."""
        return self._tensor(name).tensor_type.name

    def matrix_types(self) -> Counter:
        """Values per stored type over the weight matrices (not embeddings or norms)."""
        counts: Counter = Counter()
        for t in self._reader.tensors:
            if t.name.startswith("blk.") and len(t.shape) == 2 or t.name == "output.weight":
                counts[t.tensor_type.name] += int(t.n_elements)
        return counts

    def check(self, name: str, shape: tuple[int, ...] | None = None) -> Any:
        """Refuse a missing tensor, an unsupported type or a shape other than ``shape``."""
        t = self._tensor(name)
        kind = t.tensor_type.name
        if kind not in KEEP and kind not in CONVERT:
            raise InputError(f"{self.path}: {t.name} is {kind}; cmatrix reads F32, F16, BF16, Q8_0, Q4_0 "
                             f"and converts {', '.join(CONVERT)}")
        have = tuple(int(n) for n in reversed(t.shape))  # GGUF lists the fastest dimension first
        if shape is not None and have != tuple(shape):
            raise InputError(f"{self.path}: {t.name} has shape {have}, the metadata implies {tuple(shape)}")
        return t

    def get(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """Tensor ``name`` (a Hugging Face name) as float32, rows in Hugging Face's order."""
        t = self.check(name, shape)
        return self._hf_rows(name, self._values(t))

    def rows(self, name: str, shape: tuple[int, ...], lo: int, hi: int) -> np.ndarray:
        """Rows ``lo:hi`` of tensor ``name`` as float32 (only those rows are read and dequantised);
        q/k ranges are whole heads."""
        t = self.check(name, shape)
        return self._hf_rows(name, self._values(t, lo, hi))

    def columns(self, name: str, shape: tuple[int, int], lo: int, hi: int) -> np.ndarray:
        """Columns ``lo:hi`` of matrix ``name`` as float32, read a band of rows at a time."""
        return columns_in_bands(self.rows, name, shape, lo, hi)

    def _hf_rows(self, name: str, values: np.ndarray) -> np.ndarray:
        short = gguf_name(name)
        if self._pairs and short.endswith((".attn_q.weight", ".attn_k.weight", ".attn_q.bias",
                                           ".attn_k.bias")):  # llama.cpp reorders biases too
            lines = values.reshape(values.shape[0], -1)
            values = halves_from_pairs(lines, lines.shape[0] // self.config.head_dim).reshape(values.shape)
        return np.ascontiguousarray(values, dtype=np.float32)

    def _plain(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        t = self._tensors[name]
        have = tuple(int(n) for n in reversed(t.shape))
        if have != shape or t.tensor_type.name != "F32":
            raise InputError(f"{self.path}: {name} is {t.tensor_type.name} {have}; expected F32 {shape}")
        return np.asarray(t.data, dtype=np.float32).reshape(shape)

    def _tensor(self, name: str) -> Any:
        short = gguf_name(name)
        if short not in self._tensors:
            near = ", ".join(sorted(self._tensors)[:6])
            raise InputError(f"{self.path}: the file has no tensor {short!r} (it has e.g. {near})")
        return self._tensors[short]

    def _values(self, t: Any, lo: int | None = None, hi: int | None = None) -> np.ndarray:
        from gguf.quants import dequantize

        shape = tuple(int(n) for n in reversed(t.shape))
        data = np.asarray(t.data)
        if lo is not None:  # GGUF rows (of any type) are independent: slice, then dequantise
            data = data.reshape(shape[0], -1)[lo:hi]
            shape = (data.shape[0], *shape[1:])
        kind = t.tensor_type.name
        try:
            if kind == "F32":
                return data.view(np.float32).reshape(shape)
            if kind == "F16":
                return data.view(np.float16).reshape(shape).astype(np.float32)
            return np.asarray(dequantize(data, t.tensor_type), dtype=np.float32).reshape(shape)
        except (ValueError, TypeError) as exc:
            raise InputError(f"{self.path}: {t.name} ({kind} {shape}) cannot be read: {exc}") from None

    def default_types(self, dtype: str | None,
                      quant: str | None) -> tuple[str | None, str | None, str | None]:
        """``(dtype, quant, note)``: the caller's choice, else what keeps the file's matrices as they
        are stored (the most common type by values), with a note when blocks must be converted."""
        if dtype is not None or quant is not None:
            return dtype, quant, None
        counts = self.matrix_types()
        if not counts:
            return None, None, None
        main = counts.most_common(1)[0][0]
        if main in KEEP:
            dtype, quant = KEEP[main]
        else:
            dtype, quant = None, CONVERT.get(main)
        converted = sorted(k for k in counts if k not in KEEP or KEEP[k] != (dtype, quant))
        note = None
        if converted:
            target = quant or dtype or "float32"
            note = (f"{self.path.name}: {', '.join(converted)} weights are stored on the ranks as {target} "
                    f"(cmatrix keeps F32, F16, BF16, Q8_0 and Q4_0 as they are; pass quant='q8_0' "
                    f"(--quant q8_0) to lose less precision)")
        return dtype, quant, note


def halves_from_pairs(w: np.ndarray, heads: int) -> np.ndarray:
    """Rows of each head from llama.cpp's interleaved pairs [x0, y0, x1, y1, ...] back to
    Hugging Face's halves [x0, x1, ..., y0, y1, ...]."""
    rows, cols = w.shape
    d = rows // heads
    return w.reshape(heads, d // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)

"""The decoder's shape and settings, read from a Hugging Face ``config.json``.

Llama 2/3 (including ``rope_scaling`` of type ``llama3`` and ``linear``), TinyLlama,
Mistral and Qwen2 share one layout: RMSNorm, rotary attention with grouped
key/value heads, and a SiLU-gated MLP. Both the ``rope_theta``/``rope_scaling``
keys of older files and the ``rope_parameters`` of newer ones are read.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")
#: sizes no real checkpoint comes near: a config beyond them is damaged or hostile (and per-layer
#: tables sized by it must not eat the driver's memory before the weights are checked)
LIMITS = {"num_hidden_layers": 4096, "hidden_size": 1 << 20, "intermediate_size": 1 << 22,
          "num_attention_heads": 1 << 14, "num_key_value_heads": 1 << 14, "vocab_size": 1 << 24,
          "max_position_embeddings": 1 << 24, "head_dim": 1 << 14}
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class DecoderConfig:
    """What the decoder needs to know about a Llama-family checkpoint."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_positions: int
    rope_theta: float
    rope_scaling: dict | None
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    #: per layer: attend to at most this many most recent positions (None: all)
    windows: tuple[int | None, ...]
    bos_token_id: Any = None
    eos_token_id: Any = None
    #: per rotary frequency, a divisor stored with the weights (GGUF's ``rope_freqs`` of Llama 3.1+)
    rope_freq_factors: tuple[float, ...] | None = None

    @property
    def group_size(self) -> int:
        """Query heads per key/value head."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> DecoderConfig:
        """Read ``config.json`` of a model folder; refuse what the decoder cannot run."""
        file = Path(path) / "config.json"
        try:
            raw = json.loads(file.read_text())
        except FileNotFoundError:
            raise InputError(f"{file}: not found; --model must be a local Hugging Face model folder "
                             "(config.json, *.safetensors, tokenizer.json)") from None
        except (OSError, ValueError, RecursionError) as exc:
            raise InputError(f"{file}: cannot read it as JSON ({exc})") from None
        return cls.from_dict(raw, str(file))

    @classmethod
    def from_dict(cls, raw: dict, where: str = "config") -> DecoderConfig:
        """The settings of a parsed ``config.json``; ``where`` names it in errors."""
        if not isinstance(raw, dict):
            raise InputError(f"{where}: expected a JSON object of settings, got {type(raw).__name__}")
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_TYPES:
            raise InputError(f"{where}: model_type {model_type!r} is not supported by cmatrix.llm "
                             f"(supported: {', '.join(SUPPORTED_TYPES)}); cm.nn.shard_linears runs any "
                             "PyTorch model")
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise InputError(f"{where}: hidden_act {act!r}; the Llama-family MLP here uses 'silu'")

        def positive(key: str, default: Any = None) -> int:
            value = raw.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{where}: {key} must be a positive integer, got {value!r}")
            if value > LIMITS.get(key, value):
                raise InputError(f"{where}: {key} {value} is beyond any real checkpoint (at most "
                                 f"{LIMITS[key]}); the file is damaged")
            return value

        hidden, heads = positive("hidden_size"), positive("num_attention_heads")
        kv_heads = positive("num_key_value_heads", heads) if raw.get("num_key_value_heads") is not None \
            else heads
        head_dim = positive("head_dim") if raw.get("head_dim") is not None else hidden // heads
        if heads % kv_heads:
            raise InputError(f"{where}: num_attention_heads {heads} is not a multiple of "
                             f"num_key_value_heads {kv_heads}")
        if raw.get("head_dim") is None and hidden % heads:
            raise InputError(f"{where}: hidden_size {hidden} is not a multiple of "
                             f"num_attention_heads {heads}")
        if head_dim % 2:
            raise InputError(f"{where}: head_dim {head_dim} must be even for rotary embeddings")
        def flag(key: str) -> bool:
            value = raw.get(key, False)
            if value is not None and not isinstance(value, bool):
                raise InputError(f"{where}: {key} must be true or false, got {value!r}")
            return bool(value)

        theta, scaling = _rope_settings(raw, where)
        layers = positive("num_hidden_layers")
        return cls(
            model_type=model_type, vocab_size=positive("vocab_size"), hidden_size=hidden,
            intermediate_size=positive("intermediate_size"), num_layers=layers, num_heads=heads,
            num_kv_heads=kv_heads, head_dim=int(head_dim),
            rms_norm_eps=_eps(raw.get("rms_norm_eps", 1e-6), where),
            max_positions=positive("max_position_embeddings", 2048), rope_theta=theta,
            rope_scaling=scaling, tie_word_embeddings=flag("tie_word_embeddings"),
            # transformers: Llama reads attention_bias (q/k/v/o) and mlp_bias; Qwen2 always has
            # q/k/v biases and nothing else; Mistral has none.
            qkv_bias=model_type == "qwen2" or model_type == "llama" and flag("attention_bias"),
            o_bias=model_type == "llama" and flag("attention_bias"),
            mlp_bias=model_type == "llama" and flag("mlp_bias"),
            windows=_windows(raw, model_type, layers),
            bos_token_id=raw.get("bos_token_id"), eos_token_id=raw.get("eos_token_id"),
        )

    def inv_freq(self) -> np.ndarray:
        """Rotary inverse frequencies (float32, head_dim/2), as transformers computes them."""
        steps = np.arange(0, self.head_dim, 2, dtype=np.int64).astype(np.float32)
        exponents = steps / np.float32(self.head_dim)
        base = (np.float32(1.0) / np.power(np.float32(self.rope_theta), exponents)).astype(np.float32)
        scaling = self.rope_scaling or {"rope_type": "default"}
        kind = scaling["rope_type"]
        if kind == "linear":
            base = (base / np.float32(scaling["factor"])).astype(np.float32)
        elif kind == "llama3":
            base = _llama3(base, scaling)
        if self.rope_freq_factors is not None:
            base = (base / np.asarray(self.rope_freq_factors, dtype=np.float32)).astype(np.float32)
        return base


def _rope_settings(raw: dict, where: str) -> tuple[float, dict | None]:
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and params:
        theta, scaling = params.get("rope_theta", raw.get("rope_theta", 10000.0)), dict(params)
    else:
        theta, scaling = raw.get("rope_theta", 10000.0), raw.get("rope_scaling")
        scaling = dict(scaling) if scaling else None
    if not isinstance(theta, int | float) or not theta > 0:
        raise InputError(f"{where}: rope_theta must be positive, got {theta!r}")
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind not in ROPE_TYPES:
            raise InputError(f"{where}: rope scaling {kind!r} is not supported (supported: "
                             f"{', '.join(ROPE_TYPES)})")
        if float(scaling.get("partial_rotary_factor", 1.0)) != 1.0:
            raise InputError(f"{where}: partial_rotary_factor is not supported")
        scaling["rope_type"] = kind
        needed = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                                    "original_max_position_embeddings")}.get(kind, ())
        missing = [k for k in needed if k not in scaling]
        if missing:
            raise InputError(f"{where}: rope scaling {kind!r} needs {', '.join(missing)}")
        for k in needed:
            v = scaling[k]
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
                raise InputError(f"{where}: rope scaling {k} must be a positive number, got {v!r}")
        if kind == "llama3" and scaling["low_freq_factor"] == scaling["high_freq_factor"]:
            raise InputError(f"{where}: rope scaling llama3 needs low_freq_factor != high_freq_factor")
        if kind == "default":
            scaling = None
    return float(theta), scaling


def _windows(raw: dict, model_type: str, layers: int) -> tuple[int | None, ...]:
    """Per layer, the attention window as transformers applies it (None: the whole context)."""
    window = raw.get("sliding_window", 4096 if model_type == "mistral" else None)
    if model_type == "mistral":  # every layer, whatever layer_types says
        return (int(window) if window else None,) * layers
    if model_type == "qwen2" and not raw.get("use_sliding_window"):
        return (None,) * layers
    types = raw.get("layer_types")
    if isinstance(types, list) and len(types) == layers:
        return tuple(window if t == "sliding_attention" and window else None for t in types)
    if model_type == "qwen2" and window:
        first = int(raw.get("max_window_layers", 28))  # transformers' Qwen2Config default
        return tuple(int(window) if i >= first else None for i in range(layers))
    return (None,) * layers


def _llama3(base: np.ndarray, s: dict) -> np.ndarray:
    """Llama 3.1's frequency-dependent rescaling of the rotary frequencies."""
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old = float(s["original_max_position_embeddings"])
    wavelen = (2 * math.pi / base).astype(np.float32)
    low_wavelen, high_wavelen = old / low, old / high
    scaled = np.where(wavelen > low_wavelen, base / np.float32(factor), base).astype(np.float32)
    smooth = ((old / wavelen - low) / (high - low)).astype(np.float32)
    smoothed = ((1 - smooth) * scaled / np.float32(factor) + smooth * scaled).astype(np.float32)
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _eps(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise InputError(f"{where}: rms_norm_eps must be a small number >= 0, got {value!r}")
    return float(value)

"""Write a Llama checkpoint folder (config.json + *.safetensors) as a GGUF file for llama.cpp.

    python jobs/gguf_export.py MODEL_DIR OUT.gguf [--type f32|f16|bf16|q8_0|q4_0]

Needs only numpy, safetensors and the `gguf` package, so it runs in the benchmark's
own environment (jobs/bench_llm.py) beside llama-cpp-python, and in the tests. Writes the
architecture's metadata (llama, mistral as llama, qwen2), the folder's tokenizer when it
has a tokenizer.json (byte-level BPE as "gpt2", SentencePiece-style BPE with byte fallback
as "llama"; otherwise a placeholder vocabulary of the config's size, for benchmarks that
feed token ids), and the tensors under llama.cpp's names. Llama q_proj and k_proj rows are
reordered: Hugging Face rotates each head's two halves (rotate_half), llama.cpp's Llama
rotates adjacent pairs, so each head's rows go from [first half, second half] to
interleaved pairs (Qwen2 files keep Hugging Face's order). Weight matrices are written in
--type; norms and the token embeddings stay float32 (as cmatrix keeps them).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")


def _tensors(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out: dict[str, np.ndarray] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    if not out:
        raise SystemExit(f"{folder}: no *.safetensors files")
    return out


def _pairs_from_halves(w: np.ndarray, heads: int) -> np.ndarray:
    """Rows of each head reordered from [x0..x(d/2-1), y0..] to [x0, y0, x1, y1, ...]."""
    rows, cols = w.shape
    d = rows // heads
    return w.reshape(heads, 2, d // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _write_vocab(w, folder: Path, vocab: int) -> None:
    """The folder's tokenizer.json as GGUF tokenizer metadata, or a placeholder vocabulary."""
    file = folder / "tokenizer.json"
    if not file.is_file():
        w.add_tokenizer_model("llama")
        w.add_token_list([b"<unk>", b"<s>", b"</s>"] + [f"<t{i}>".encode() for i in range(3, vocab)])
        w.add_token_scores([0.0] * vocab)
        w.add_token_types([2, 3, 3] + [1] * (vocab - 3))  # unknown, control, control, normal
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
        return
    data = json.loads(file.read_text(encoding="utf-8"))
    model = data["model"]
    if model.get("type") != "BPE":
        raise SystemExit(f"{file}: a {model.get('type')} model; this exporter writes BPE vocabularies only")
    ids = dict(model["vocab"])
    specials = {t["content"]: t for t in data.get("added_tokens", [])}
    for t in specials.values():
        ids[t["content"]] = t["id"]
    tokens = [""] * max(max(ids.values()) + 1, vocab)
    for t, i in ids.items():
        tokens[i] = t
    for i, t in enumerate(tokens):
        tokens[i] = t or f"<unused{i}>"
    sentencepiece = bool(model.get("byte_fallback"))
    types = []
    for t in tokens:
        if t in specials:
            types.append(2 if t == model.get("unk_token") else 3 if specials[t].get("special") else 4)
        elif t.startswith("<unused"):
            types.append(5)
        elif sentencepiece and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            types.append(6)
        else:
            types.append(1)
    w.add_token_scores([-float(i) for i in range(len(tokens))])  # trained BPE ids follow merge order
    if sentencepiece:
        w.add_tokenizer_model("llama")
    else:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")
        w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])])
    w.add_token_list(tokens)
    w.add_token_types(types)
    config = {}
    if (folder / "tokenizer_config.json").is_file():
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))

    def token_id(key: str) -> int | None:
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        return ids.get(value) if isinstance(value, str) else None

    if (bos := token_id("bos_token")) is not None:
        w.add_bos_token_id(bos)
    if (eos := token_id("eos_token")) is not None:
        w.add_eos_token_id(eos)
    if (unk := token_id("unk_token")) is not None:
        w.add_unk_token_id(unk)
    post = data.get("post_processor") or {}
    w.add_add_bos_token(post.get("type") == "TemplateProcessing" and bos is not None
                        and any(p.get("SpecialToken", {}).get("id") == config.get("bos_token")
                                or p.get("SpecialToken", {}).get("id") == tokens[bos]
                                for p in post.get("single", [])))
    if sentencepiece:
        w.add_add_space_prefix(True)
    if isinstance(config.get("chat_template"), str):
        w.add_chat_template(config["chat_template"])


def _llama3_divisors(s: dict, head_dim: int, theta: float) -> np.ndarray:
    """Llama 3.1's rope scaling as llama.cpp stores it: one divisor per rotary frequency."""
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old = s["original_max_position_embeddings"]
    wavelen = 2 * np.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
    smooth = (old / wavelen - low) / (high - low)
    divisors = np.where(wavelen < old / high, 1.0,
                        np.where(wavelen > old / low, factor, 1 / ((1 - smooth) / factor + smooth)))
    return divisors.astype(np.float32)


#: (name, float32 values) -> (array to write, its GGUF type), for matrices; tests pass their own
Encoder = Callable[[str, np.ndarray], tuple[np.ndarray, object]]


def encoder(kind: str) -> Encoder:
    """How --type writes one weight matrix."""
    import gguf

    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
             "q4_0": gguf.GGMLQuantizationType.Q4_0}[kind]

    def encode(name: str, value: np.ndarray) -> tuple[np.ndarray, object]:
        if kind == "f32":
            return value, qtype
        if kind == "f16":
            return value.astype(np.float16), qtype
        return gguf.quants.quantize(value, qtype), qtype

    return encode


def export(folder: Path, out: Path, kind: str = "f32", encode: Encoder | None = None,
           more: Callable[[object], None] | None = None) -> Path:
    """Write ``folder`` to ``out`` with weight matrices in ``kind`` (or as ``encode`` writes them);
    ``more(writer)`` adds metadata of its own (tests)."""
    import gguf

    cfg = json.loads((folder / "config.json").read_text())
    model_type = cfg.get("model_type")
    if model_type not in ("llama", "mistral", "qwen2"):
        raise SystemExit(f"{folder}: model_type {model_type!r}; this exporter writes llama, mistral, qwen2")
    scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}  # older, newer transformers
    theta = scaling.get("rope_theta", cfg.get("rope_theta", 10000.0))
    if scaling.get("rope_type", scaling.get("type", "default")) not in ("default", "llama3"):
        raise SystemExit(f"{folder}: rope scaling {scaling} is not exported (llama3's is)")
    arch = "qwen2" if model_type == "qwen2" else "llama"
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads", heads)
    head_dim = cfg.get("head_dim") or hidden // heads
    vocab, layers = cfg["vocab_size"], cfg["num_hidden_layers"]
    tensors = _tensors(folder)
    encode = encode or encoder(kind)

    w = gguf.GGUFWriter(str(out), arch)
    w.add_name(folder.name)
    w.add_context_length(cfg.get("max_position_embeddings", 2048))
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_rope_dimension_count(head_dim)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-6))
    w.add_rope_freq_base(theta)
    file_types = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
                  "q4_0": "MOSTLY_Q4_0"}
    w.add_file_type(getattr(gguf.LlamaFileType, file_types.get(kind, "ALL_F32")))
    _write_vocab(w, folder, vocab)
    if more is not None:
        more(w)

    def put(name: str, value: np.ndarray, matrix: bool = True) -> None:
        value = np.ascontiguousarray(value, dtype=np.float32)
        if not matrix:
            w.add_tensor(name, value)
            return
        data, qtype = encode(name, value)
        w.add_tensor(name, np.ascontiguousarray(data), raw_dtype=qtype)

    def get(name: str) -> np.ndarray:
        t = tensors[name]
        return t.astype(np.float32) if t.dtype != np.uint16 else \
            (t.astype(np.uint32) << 16).view(np.float32)

    def rows(w: np.ndarray, n: int) -> np.ndarray:
        return w if arch == "qwen2" else _pairs_from_halves(w, n)

    if scaling.get("rope_type", scaling.get("type")) == "llama3":
        put("rope_freqs.weight", _llama3_divisors(scaling, head_dim, theta), matrix=False)
    put("token_embd.weight", get("model.embed_tokens.weight"), matrix=False)  # cmatrix keeps it float32
    put("output_norm.weight", get("model.norm.weight"), matrix=False)
    if not cfg.get("tie_word_embeddings"):  # llama.cpp ties by leaving output.weight out
        put("output.weight", get("lm_head.weight"))
    for i in range(layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        put(b + "attn_norm.weight", get(p + "input_layernorm.weight"), matrix=False)
        put(b + "attn_q.weight", rows(get(p + "self_attn.q_proj.weight"), heads))
        put(b + "attn_k.weight", rows(get(p + "self_attn.k_proj.weight"), kv_heads))
        put(b + "attn_v.weight", get(p + "self_attn.v_proj.weight"))
        if arch == "qwen2" or cfg.get("attention_bias"):
            for part, heads_of in (("q", heads), ("k", kv_heads), ("v", None)):
                bias = get(p + f"self_attn.{part}_proj.bias")
                if heads_of:  # llama.cpp reorders q/k biases as their rows
                    bias = rows(bias[:, None], heads_of)[:, 0]
                put(b + f"attn_{part}.bias", bias, matrix=False)
        if cfg.get("attention_bias"):
            put(b + "attn_output.bias", get(p + "self_attn.o_proj.bias"), matrix=False)
        put(b + "attn_output.weight", get(p + "self_attn.o_proj.weight"))
        put(b + "ffn_norm.weight", get(p + "post_attention_layernorm.weight"), matrix=False)
        put(b + "ffn_gate.weight", get(p + "mlp.gate_proj.weight"))
        put(b + "ffn_up.weight", get(p + "mlp.up_proj.weight"))
        put(b + "ffn_down.weight", get(p + "mlp.down_proj.weight"))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--type", choices=TYPES, default="f32")
    a = ap.parse_args(argv)
    path = export(Path(a.model), Path(a.out), a.type)
    print(f"wrote {path} ({path.stat().st_size / 2**30:.2f} GiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

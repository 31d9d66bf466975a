"""Write a Llama checkpoint folder (config.json + *.safetensors) as a GGUF file for llama.cpp.

    python jobs/gguf_export.py MODEL_DIR OUT.gguf [--type f32|f16]

Needs only numpy, safetensors and the `gguf` package, so it runs in the benchmark's
own environment (jobs/bench_llm.py) beside llama-cpp-python. Writes the Llama
architecture's metadata, a placeholder vocabulary of the config's size (benchmarks
feed token ids, never text), and the tensors under llama.cpp's names. q_proj and
k_proj rows are reordered: Hugging Face rotates each head's two halves
(rotate_half), llama.cpp's Llama rotates adjacent pairs, so each head's rows go from
[first half, second half] to interleaved pairs. Weight matrices are written as
float32 or float16; norms and the token embeddings stay float32 (as cmatrix keeps them).
Quantise the result with llama.cpp.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


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


def export(folder: Path, out: Path, kind: str = "f32") -> Path:
    import gguf

    cfg = json.loads((folder / "config.json").read_text())
    if cfg.get("model_type") != "llama":
        raise SystemExit(f"{folder}: model_type {cfg.get('model_type')!r}; this exporter writes llama only")
    if cfg.get("rope_scaling"):
        raise SystemExit(f"{folder}: rope scaling is not exported")
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads", heads)
    head_dim = cfg.get("head_dim") or hidden // heads
    vocab, layers = cfg["vocab_size"], cfg["num_hidden_layers"]
    tensors = _tensors(folder)

    w = gguf.GGUFWriter(str(out), "llama")
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
    w.add_rope_freq_base(cfg.get("rope_theta", 10000.0))
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if kind == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    w.add_tokenizer_model("llama")
    w.add_token_list([b"<unk>", b"<s>", b"</s>"] + [f"<t{i}>".encode() for i in range(3, vocab)])
    w.add_token_scores([0.0] * vocab)
    w.add_token_types([2, 3, 3] + [1] * (vocab - 3))  # unknown, control, control, normal
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    def put(name: str, value: np.ndarray, matrix: bool = True) -> None:
        value = np.asarray(value, dtype=np.float32)
        if matrix and kind == "f16":
            value = value.astype(np.float16)
        w.add_tensor(name, np.ascontiguousarray(value))

    def get(name: str) -> np.ndarray:
        t = tensors[name]
        return t.astype(np.float32) if t.dtype != np.uint16 else \
            (t.astype(np.uint32) << 16).view(np.float32)

    put("token_embd.weight", get("model.embed_tokens.weight"), matrix=False)  # cmatrix keeps it float32
    put("output_norm.weight", get("model.norm.weight"), matrix=False)
    head = "model.embed_tokens.weight" if cfg.get("tie_word_embeddings") else "lm_head.weight"
    put("output.weight", get(head))
    for i in range(layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        put(b + "attn_norm.weight", get(p + "input_layernorm.weight"), matrix=False)
        put(b + "attn_q.weight", _pairs_from_halves(get(p + "self_attn.q_proj.weight"), heads))
        put(b + "attn_k.weight", _pairs_from_halves(get(p + "self_attn.k_proj.weight"), kv_heads))
        put(b + "attn_v.weight", get(p + "self_attn.v_proj.weight"))
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
    ap.add_argument("--type", choices=("f32", "f16"), default="f32")
    a = ap.parse_args(argv)
    path = export(Path(a.model), Path(a.out), a.type)
    print(f"wrote {path} ({path.stat().st_size / 2**30:.2f} GiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Build a random-weight Llama-family checkpoint in a local folder (no downloads).

    python jobs/tiny_llama.py OUT_DIR [--model-type llama|qwen2|mistral] [--hidden 256] ...

Writes what a Hugging Face model folder holds: config.json, model.safetensors,
generation_config.json, and a small byte-level BPE tokenizer (tokenizer.json,
tokenizer_config.json with a chat template) trained on this repository's README.
The weights are random, so the text it generates is nonsense; the point is that
everything around it (loading, splitting, caching, sampling, streaming) is real.
Needs transformers and tokenizers (installed by `make demo-llm` and `make test`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build(out: str | Path, model_type: str = "llama", vocab_size: int = 512, hidden_size: int = 256,
          intermediate_size: int = 512, num_hidden_layers: int = 4, num_attention_heads: int = 8,
          num_key_value_heads: int = 4, seed: int = 0, scale: float = 1.0, tokenizer: bool = True,
          save_dtype: str = "float32", **extra) -> Path:
    """Write a random checkpoint to ``out``; ``scale`` multiplies the initial weights (larger
    values give logits far from uniform, which makes comparisons meaningful); ``save_dtype``:
    the tensors' type in the file (e.g. "bfloat16", as most published models)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    settings = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                    num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                    num_key_value_heads=num_key_value_heads, bos_token_id=1, eos_token_id=2,
                    max_position_embeddings=extra.pop("max_position_embeddings", 512))
    settings.update(extra)
    config = AutoConfig.for_model(model_type, **settings)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.uniform_(-0.5, 0.5)
            else:
                p.mul_(scale)
    model.to(getattr(torch, save_dtype)).save_pretrained(out)
    if tokenizer:
        write_tokenizer(out, vocab_size)
    return out


def write_tokenizer(out: Path, vocab_size: int) -> None:
    """A byte-level BPE trained on the README, with <s>/</s> and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = (HERE.parent / "README.md").read_text(encoding="utf-8").splitlines()
    tok.train_from_iterator(text, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "chat_template": CHAT_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--model-type", default="llama", choices=["llama", "qwen2", "mistral"])
    for key, default in (("vocab-size", 512), ("hidden-size", 256), ("intermediate-size", 512),
                         ("num-hidden-layers", 4), ("num-attention-heads", 8), ("num-key-value-heads", 4)):
        ap.add_argument(f"--{key}", type=int, default=default)
    ap.add_argument("--seed", type=int, default=0)
    args = vars(ap.parse_args(argv))
    out = build(args.pop("out"), **{k: v for k, v in args.items()})
    print(f"wrote a random {args['model_type']} checkpoint to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

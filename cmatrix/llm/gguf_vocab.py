"""The tokenizer stored in a GGUF file's metadata, rebuilt as a ``tokenizers`` tokenizer.

Two vocabulary kinds cover the Llama family:

- ``gpt2``: byte-level BPE with merges (Llama 3, Qwen2). The text is first cut by the
  regular expression of the file's pre-tokenizer (``tokenizer.ggml.pre``).
- ``llama``: SentencePiece BPE (Llama 2, TinyLlama, Mistral). GGUF keeps the pieces and
  their scores, not merges: a merge of two pieces ranks by the score of the piece it makes,
  which is the order in which SentencePiece joins them; bytes without a piece fall back to
  ``<0xNN>`` tokens.

Token types (llama.cpp's): 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
Control tokens become special tokens (skipped when decoding), user-defined ones are matched
whole in the text.
"""

from __future__ import annotations

from typing import Any

from ..errors import InputError
from .tokenizer import Tokenizer, _require

NORMAL, UNKNOWN, CONTROL, USER, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer expressions of the BPE vocabularies, as the models' own tokenizer.json files
# give them (llama.cpp names them in tokenizer.ggml.pre).
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_NAMES = ("llama-bpe", "llama3", "llama-v3", "smaug-bpe")
PRE_TOKENIZERS = {**dict.fromkeys(LLAMA3_NAMES, _LLAMA3), "qwen2": _QWEN2,
                  "gpt-2": None}  # None: GPT-2's own expression
#: pieces longer than this are not split into merges (real vocabularies stay far below it;
#: the work of deriving merges grows with the square of a piece's length)
MAX_PIECE = 256


def tokenizer_from_gguf(ckpt: Any) -> Tokenizer:
    """The :class:`Tokenizer` of a :class:`~cmatrix.llm.gguf_file.GgufCheckpoint`."""
    tk = _require("tokenizers")
    where = f"{ckpt.path} (tokenizer metadata)"
    kind = ckpt.value("tokenizer.ggml.model")
    tokens = ckpt.value("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise InputError(f"{where}: the file holds no vocabulary (tokenizer.ggml.tokens); pass token ids")
    types = ckpt.value("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise InputError(f"{where}: {len(tokens)} tokens but {len(types)} token types")
    if kind == "gpt2":  # llama.cpp adds BOS by default for Llama 3's pre-tokenizer only
        backend = _byte_level(tk, ckpt, tokens, where)
        add_bos_default = ckpt.value("tokenizer.ggml.pre") in LLAMA3_NAMES
    elif kind == "llama":
        backend, add_bos_default = _sentencepiece(tk, ckpt, tokens, types, where), True
    else:
        raise InputError(f"{where}: vocabulary kind {kind!r} is not supported (gpt2, llama); use the "
                         "model's Hugging Face folder instead")
    specials = [tk.AddedToken(tokens[i], special=True, normalized=False)
                for i, t in enumerate(types) if t in (CONTROL, UNKNOWN)]
    user = [tk.AddedToken(tokens[i], special=False, normalized=False)
            for i, t in enumerate(types) if t == USER]
    backend.add_special_tokens(specials)
    backend.add_tokens(user)

    def token_of(key: str) -> str | None:
        i = ckpt.value(key)
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    bos, eos = token_of("tokenizer.ggml.bos_token_id"), token_of("tokenizer.ggml.eos_token_id")
    add_bos = ckpt.value("tokenizer.ggml.add_bos_token", add_bos_default)
    add_eos = ckpt.value("tokenizer.ggml.add_eos_token", False)
    template = ([bos] if add_bos and bos else []) + ["$A"] + ([eos] if add_eos and eos else [])
    used = {t for t in (bos if add_bos else None, eos if add_eos else None) if t}
    backend.post_processor = tk.processors.TemplateProcessing(
        single=" ".join(template), special_tokens=[(t, tokens.index(t)) for t in used])
    extra_eos = [i for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                               "tokenizer.ggml.eom_token_id")
                 if isinstance(i := ckpt.value(key), int) and 0 <= i < len(tokens)]
    return Tokenizer(backend, chat_template=ckpt.value("tokenizer.chat_template"), bos_token=bos,
                     eos_token=eos, extra_eos_ids=extra_eos)


def _byte_level(tk: Any, ckpt: Any, tokens: list[str], where: str) -> Any:
    pre = ckpt.value("tokenizer.ggml.pre")
    if pre not in PRE_TOKENIZERS:
        raise InputError(f"{where}: pre-tokenizer {pre!r} is not known here (known: "
                         f"{', '.join(PRE_TOKENIZERS)}); use the model's Hugging Face folder instead")
    merges = ckpt.value("tokenizer.ggml.merges") or []
    pairs = []
    for m in merges:
        left, sep, right = m.partition(" ")
        if not sep:
            raise InputError(f"{where}: merge {m!r} is not two tokens")
        pairs.append((left, right))
    vocab = {t: i for i, t in enumerate(tokens)}
    backend = tk.Tokenizer(tk.models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre in LLAMA3_NAMES))
    regex = PRE_TOKENIZERS[pre]
    if regex is None:
        backend.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        backend.pre_tokenizer = tk.pre_tokenizers.Sequence([
            tk.pre_tokenizers.Split(tk.Regex(regex), behavior="isolated"),
            tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = tk.decoders.ByteLevel()
    return backend


def _sentencepiece(tk: Any, ckpt: Any, tokens: list[str], types: list[int], where: str) -> Any:
    scores = ckpt.value("tokenizer.ggml.scores") or [-float(i) for i in range(len(tokens))]
    if len(scores) != len(tokens):
        raise InputError(f"{where}: {len(tokens)} tokens but {len(scores)} scores")
    vocab = {t: i for i, t in enumerate(tokens)}
    mergeable = {t: i for i, t in enumerate(tokens) if types[i] in (NORMAL, USER)}
    ranked = []
    for piece, i in mergeable.items():
        for cut in range(1, len(piece) if len(piece) <= MAX_PIECE else 0):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                ranked.append((-scores[i], i, vocab[left], vocab[right], left, right))
    ranked.sort()
    unk_id = ckpt.value("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if isinstance(unk_id, int) and 0 <= unk_id < len(tokens) else None
    backend = tk.Tokenizer(tk.models.BPE(vocab=vocab, merges=[(r[4], r[5]) for r in ranked],
                                         unk_token=unk, fuse_unk=True, byte_fallback=True))
    prefix = ckpt.value("tokenizer.ggml.add_space_prefix", True)
    backend.normalizer = tk.normalizers.Sequence(
        ([tk.normalizers.Prepend("▁")] if prefix else []) + [tk.normalizers.Replace(" ", "▁")])
    backend.decoder = tk.decoders.Sequence(
        [tk.decoders.Replace("▁", " "), tk.decoders.ByteFallback(), tk.decoders.Fuse()]
        + ([tk.decoders.Strip(" ", 1, 0)] if prefix else []))
    return backend

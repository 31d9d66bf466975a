"""Tests of cmatrix.llm.tokenizer on small tokenizers trained here (no downloads)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from cmatrix.errors import InputError
from cmatrix.llm.tokenizer import Tokenizer

tokenizers = pytest.importorskip("tokenizers")
pytest.importorskip("jinja2")
from tokenizers import decoders, models, pre_tokenizers, processors, trainers  # noqa: E402

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! Hello again, world.",
    "Café crème brûlée, naïve façade, déjà vu.",
    "東京は日本の首都です。北京は中国の首都です。",
    "Emoji time 😀 😀 🎉 party 🎉 and more text.",
    "Numbers 12345 and symbols #@$% & <tags>.",
] * 20

# Multi-byte text whose emoji/CJK never appear in CORPUS, so they split into byte tokens.
HARD_TEXT = "Hello 🦙 llama! naïve café — 漢字かな 🚀🚀 done. 𝔘nicode"

SIMPLE_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"
)

# Uses trim_blocks/lstrip_blocks, loop controls, tojson and raise_exception, like real templates.
RICH_TEMPLATE = """{{ bos_token }}
{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('Unknown role: ' + message['role']) }}
    {% endif %}
    {% if message['role'] == 'system' %}
<<SYS>>{{ message['content'] | trim }}<</SYS>>
        {% continue %}
    {% endif %}
<|{{ message['role'] }}|>
{{ message['content'] }}{% if message.meta is defined %} {{ message.meta | tojson }}{% endif %}{{ eos_token }}
{% endfor %}
{% if add_generation_prompt %}
<|assistant|>
{% endif %}"""

MESSAGES = [
    {"role": "system", "content": "  Be brief & kind.  "},
    {"role": "user", "content": "Hi <there> — ça va? 😀", "meta": {"lang": "fr", "tags": ["a<b", "é"]}},
    {"role": "assistant", "content": "Oui!"},
    {"role": "user", "content": "Encore"},
]


def _byte_level() -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return tok


def _sentencepiece_like() -> tokenizers.Tokenizer:
    """Llama-2 style: '▁' word marks, byte-fallback tokens <0x00>..<0xFF>, strip of the first space."""
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  show_progress=False)
    tok.train_from_iterator([line for line in CORPUS if line.isascii()], trainer)
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    data["model"]["byte_fallback"] = True
    tok = tokenizers.Tokenizer.from_str(json.dumps(data))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def _write_model(root: Path, backend: tokenizers.Tokenizer, template: str | None = SIMPLE_TEMPLATE,
                 eos: object = {"content": "</s>", "special": True}) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    backend.save(str(root / "tokenizer.json"))
    config: dict = {"bos_token": "<s>", "eos_token": eos}
    if template is not None:
        config["chat_template"] = template
    (root / "tokenizer_config.json").write_text(json.dumps(config))
    (root / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 11]}))
    (root / "config.json").write_text(json.dumps({"eos_token_id": 13, "bos_token_id": 0}))
    return root


@pytest.fixture(scope="module", params=["byte_level", "sentencepiece"])
def model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    backend = _byte_level() if request.param == "byte_level" else _sentencepiece_like()
    return _write_model(tmp_path_factory.mktemp(request.param), backend)


def test_roundtrip_and_bos(model_dir: Path) -> None:
    tok = Tokenizer.from_dir(model_dir)
    for text in [*CORPUS[:6], HARD_TEXT]:
        plain = tok.encode(text, add_special_tokens=False)
        with_bos = tok.encode(text)
        assert tok.bos_id is not None and plain[0] != tok.bos_id
        assert with_bos == [tok.bos_id, *plain]
        assert tok.decode(with_bos) == text
        shown = tok.decode(with_bos, skip_special_tokens=False)
        assert shown.startswith("<s>") and shown[3:].lstrip(" ") == text


def test_sentencepiece_uses_byte_fallback(tmp_path: Path) -> None:
    tok = Tokenizer.from_dir(_write_model(tmp_path, _sentencepiece_like()))
    ids = tok.encode("🦙", add_special_tokens=False)
    pieces = [tok._tok.id_to_token(i) for i in ids]
    assert pieces[-4:] == ["<0xF0>", "<0x9F>", "<0xA6>", "<0x99>"]


def test_special_ids(model_dir: Path) -> None:
    tok = Tokenizer.from_dir(model_dir)
    s, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    assert tok.bos_id == s
    # tokenizer_config eos_token, generation_config [7, 11] and config.json 13 together
    assert tok.eos_ids == frozenset({eos, 7, 11, 13})
    assert {s, eos} <= tok.special_ids
    assert tok.has_chat_template


def test_eos_as_plain_string_and_config_fallbacks(tmp_path: Path) -> None:
    root = _write_model(tmp_path, _byte_level(), eos="</s>")
    (root / "generation_config.json").unlink()
    (root / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    tok = Tokenizer.from_dir(root)
    assert tok.eos_ids == frozenset({tok.token_to_id("</s>"), 13})
    assert tok.bos_id == 0  # from config.json, as tokenizer_config.json names no bos_token
    assert not tok.has_chat_template


def _stream_all(tok: Tokenizer, ids: list[int], **kwargs: bool) -> tuple[list[str], str]:
    stream = tok.stream(**kwargs)
    return [stream.push(i) for i in ids], stream.flush()


def test_stream_matches_decode(model_dir: Path) -> None:
    tok = Tokenizer.from_dir(model_dir)
    eos = tok.token_to_id("</s>")
    ids = tok.encode(HARD_TEXT) + [eos] + tok.encode(" Next 🚀 line", add_special_tokens=False)
    pushes, rest = _stream_all(tok, ids)
    assert "".join(pushes) + rest == tok.decode(ids)
    assert "" in pushes[2:]  # some emoji byte was held back until its character was complete
    assert not any("\ufffd" in p for p in pushes)
    pushes, rest = _stream_all(tok, ids, skip_special_tokens=False)
    assert "".join(pushes) + rest == tok.decode(ids, skip_special_tokens=False)


def test_stream_flushes_incomplete_tail(model_dir: Path) -> None:
    tok = Tokenizer.from_dir(model_dir)
    ids = tok.encode("ok 🦙", add_special_tokens=False)[:-1]  # cut the emoji short
    pushes, rest = _stream_all(tok, ids)
    assert rest.endswith("\ufffd")
    assert "".join(pushes) + rest == tok.decode(ids)


def test_stream_decodes_short_windows(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tok = Tokenizer.from_dir(model_dir)
    ids = tok.encode(" ".join(CORPUS[:12]), add_special_tokens=False)
    assert len(ids) > 150
    widths: list[int] = []
    real_decode = tok.decode

    def spy(window: list[int], skip_special_tokens: bool = True) -> str:
        widths.append(len(window))
        return real_decode(window, skip_special_tokens)

    monkeypatch.setattr(tok, "decode", spy)
    pushes, rest = _stream_all(tok, ids)
    assert max(widths) <= 8
    monkeypatch.undo()
    assert "".join(pushes) + rest == tok.decode(ids)


def test_simple_template_by_hand(model_dir: Path) -> None:
    tok = Tokenizer.from_dir(model_dir)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    turns = "<s>[user] Hi</s>\n[assistant] Yo</s>\n"
    assert tok.apply_chat_template(messages) == turns + "[assistant] "
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == turns


def test_rich_template_like_transformers(tmp_path: Path) -> None:
    root = _write_model(tmp_path, _byte_level(), template=RICH_TEMPLATE)
    ours = Tokenizer.from_dir(root).apply_chat_template(MESSAGES)
    assert ours.startswith("<s>\n<<SYS>>Be brief & kind.<</SYS>>\n<|user|>\nHi <there>")
    assert '{"lang": "fr", "tags": ["a<b", "é"]}</s>' in ours
    assert ours.endswith("<|user|>\nEncore</s>\n<|assistant|>\n")
    pytest.importorskip("transformers")
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=str(root / "tokenizer.json"), bos_token="<s>",
                                 eos_token="</s>", chat_template=RICH_TEMPLATE)
    for gen in (True, False):
        want = hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=gen)
        assert Tokenizer.from_dir(root).apply_chat_template(MESSAGES, add_generation_prompt=gen) == want


def test_template_sources(tmp_path: Path) -> None:
    root = _write_model(tmp_path, _byte_level(), template=None)
    config = json.loads((root / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    (root / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer.from_dir(root).apply_chat_template([]) == "D"
    (root / "chat_template.jinja").write_text("{{ messages | length }} via file")
    assert Tokenizer.from_dir(root).apply_chat_template([{"role": "user", "content": "x"}]) == "1 via file"


def test_missing_template_raises(tmp_path: Path) -> None:
    tok = Tokenizer.from_dir(_write_model(tmp_path, _byte_level(), template=None))
    assert not tok.has_chat_template
    with pytest.raises(InputError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_raise_exception_in_template(tmp_path: Path) -> None:
    tok = Tokenizer.from_dir(_write_model(tmp_path, _byte_level(), template=RICH_TEMPLATE))
    with pytest.raises(InputError, match="Unknown role: robot"):
        tok.apply_chat_template([{"role": "robot", "content": "beep"}])


def test_bad_template_syntax(tmp_path: Path) -> None:
    tok = Tokenizer.from_dir(_write_model(tmp_path, _byte_level(), template="{% for m in messages %}"))
    with pytest.raises(InputError, match="chat template"):
        tok.apply_chat_template([])


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.system('touch {marker}') }}",
    "{{ raise_exception.__globals__['os'].system('touch {marker}') }}",
    "{{ messages.append({'role': 'x'}) }}",
    "{{ 9**(9**9) }}",                                     # unbounded arithmetic
    "{{ 'x' * 10**12 }}",                                  # a string beyond memory
    "{% for i in range(100000) %}{{ 'y' * 100 }}{% endfor %}",  # past the size budget
])
def test_sandbox_refuses_unsafe_templates(tmp_path: Path, template: str) -> None:
    marker = tmp_path / "pwned"
    tok = Tokenizer.from_dir(_write_model(tmp_path / "m", _byte_level(),
                                          template=template.replace("{marker}", str(marker))))
    messages = [{"role": "user", "content": "x"}]
    with pytest.raises(InputError, match="chat template"):
        tok.apply_chat_template(messages)
    assert not marker.exists()
    assert messages == [{"role": "user", "content": "x"}]


def test_missing_or_bad_files(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"no tokenizer\.json in .*nowhere"):
        Tokenizer.from_dir(tmp_path / "nowhere")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text("{not json")
    with pytest.raises(InputError, match="cannot read tokenizer .*bad"):
        Tokenizer.from_dir(bad)
    root = _write_model(tmp_path / "ok", _byte_level())
    (root / "generation_config.json").write_text("[1, 2")
    with pytest.raises(InputError, match="generation_config.json"):
        Tokenizer.from_dir(root)


def test_missing_tokenizers_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(InputError, match=r"cmatrix\[llm\]"):
        Tokenizer.from_dir(tmp_path)

"""The tokenizer of a local Hugging Face model directory, its chat template and streaming decode.

Needs the ``tokenizers`` and ``jinja2`` packages (the ``llm`` extra); both are
imported only when used, so this module imports without them.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from cmatrix.errors import InputError

_INSTALL_HINT = 'install the llm extra: pip install "cmatrix[llm]"'


def _require(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise InputError(f"the {module} package is needed to read tokenizers; {_INSTALL_HINT}") from e


def _read_json(path: Path) -> dict:
    """The JSON object in ``path``, or ``{}`` when the file does not exist."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: nested without end
        raise InputError(f"cannot read {path}: {type(e).__name__}: {e}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _token_text(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string or ``{"content": ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _id_list(value: Any) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _pick_template(value: Any) -> str | None:
    """``chat_template`` from tokenizer_config.json: a string, or named templates (use "default")."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
        return value if isinstance(value, str) else None
    return None


class Tokenizer:
    """Encodes, decodes and renders chats for one model; build it with :meth:`from_dir`."""

    def __init__(self, backend: Any, chat_template: str | None = None, bos_token: str | None = None,
                 eos_token: str | None = None, extra_eos_ids: Sequence[int] = (),
                 bos_id: int | None = None) -> None:
        """Wrap a ``tokenizers.Tokenizer``; ``bos_id`` is used when ``bos_token`` is not in its vocabulary."""
        self._tok = backend
        self.chat_template = chat_template
        self.bos_token = bos_token
        self.eos_token = eos_token
        eos = set(extra_eos_ids)
        if eos_token is not None and (found := backend.token_to_id(eos_token)) is not None:
            eos.add(found)
        self.eos_ids: frozenset[int] = frozenset(eos)
        found_bos = backend.token_to_id(bos_token) if bos_token is not None else None
        self.bos_id: int | None = found_bos if found_bos is not None else bos_id
        self.special_ids: frozenset[int] = frozenset(
            i for i, added in backend.get_added_tokens_decoder().items() if added.special
        )
        self._compiled: tuple[str, Any] | None = None  # (template source, compiled template)

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """Load ``path/tokenizer.json`` plus the optional tokenizer_config.json,
        chat_template.jinja, generation_config.json and config.json beside it."""
        tokenizers = _require("tokenizers")
        root = Path(path)
        tok_file = root / "tokenizer.json"
        if not tok_file.is_file():
            raise InputError(f"no tokenizer.json in {root} (a Hugging Face model directory is expected)")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tok_file))
        except Exception as e:  # tokenizers raises plain Exception on bad files
            raise InputError(f"cannot read tokenizer {tok_file}: {e}") from e
        tok_config = _read_json(root / "tokenizer_config.json")
        template_file = root / "chat_template.jinja"
        if template_file.is_file():  # the newer layout wins over tokenizer_config.json, as in transformers
            try:
                template = template_file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise InputError(f"cannot read {template_file}: {e}") from e
        else:
            template = _pick_template(tok_config.get("chat_template"))
        model_config = _read_json(root / "config.json")
        gen_config = _read_json(root / "generation_config.json")
        eos_ids = _id_list(gen_config.get("eos_token_id")) + _id_list(model_config.get("eos_token_id"))
        bos_ids = _id_list(model_config.get("bos_token_id")) or _id_list(gen_config.get("bos_token_id"))
        return cls(backend, chat_template=template, bos_token=_token_text(tok_config.get("bos_token")),
                   eos_token=_token_text(tok_config.get("eos_token")), extra_eos_ids=eos_ids,
                   bos_id=bos_ids[0] if bos_ids else None)

    @property
    def has_chat_template(self) -> bool:
        """Whether :meth:`apply_chat_template` can render chats."""
        return self.chat_template is not None

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        """The id of one token string (e.g. ``"</s>"``), or ``None`` if it is not in the vocabulary."""
        return self._tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` applies the post-processor (e.g. BOS)."""
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """The text of ``ids``."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **variables: Any) -> str:
        """Render ``messages`` with the model's Jinja chat template, as transformers does.

        Extra keyword ``variables`` (e.g. ``tools``) are passed to the template.
        """
        if self.chat_template is None:
            raise InputError("this tokenizer has no chat template (no chat_template in tokenizer_config.json "
                             "and no chat_template.jinja); format the prompt yourself")
        _require("jinja2")
        try:
            if self._compiled is None or self._compiled[0] != self.chat_template:
                self._compiled = (self.chat_template, _sandbox().from_string(self.chat_template))
            context = {"bos_token": self.bos_token, "eos_token": self.eos_token}
            context = {k: v for k, v in context.items() if v is not None}
            pieces = self._compiled[1].generate(messages=messages,
                                                add_generation_prompt=add_generation_prompt,
                                                **context, **variables)
            return _within_budget(pieces)
        except InputError:
            raise
        except Exception as e:  # syntax errors, sandbox refusals, and errors of the template's own code
            raise InputError(f"chat template failed: {type(e).__name__}: {e}") from e

    def stream(self, skip_special_tokens: bool = True) -> StreamDecoder:
        """A fresh :class:`StreamDecoder` turning ids into text one token at a time."""
        return StreamDecoder(self, skip_special_tokens)


#: a chat template may write this much text, for this long, before it is stopped
TEMPLATE_MAX_CHARS = 1 << 22
TEMPLATE_MAX_SECONDS = 10.0
#: the largest power or repetition a template may compute (real templates need small ones)
TEMPLATE_MAX_VALUE = 1 << 24


def _within_budget(pieces: Any) -> str:
    """The rendered text, stopped with an InputError past the time or size budget."""
    start, size, out = time.monotonic(), 0, []
    for piece in pieces:
        out.append(piece)
        size += len(piece)
        if size > TEMPLATE_MAX_CHARS or time.monotonic() - start > TEMPLATE_MAX_SECONDS:
            raise InputError(f"chat template ran past its budget ({TEMPLATE_MAX_CHARS} characters or "
                             f"{TEMPLATE_MAX_SECONDS:.0f} s): it is damaged or hostile")
    return "".join(out)


def _sandbox() -> Any:
    """A sandboxed Jinja environment set up the way transformers renders chat templates, with
    powers and repetitions bounded (the sandbox alone lets ``9**(9**9)`` run without end)."""
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

    class _Bounded(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"**", "*"})

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            if operator == "**" and isinstance(left, (int, float)) and isinstance(right, (int, float)) \
                    and abs(left) > 1 and right > 0 and right * math.log2(abs(left)) > 64:
                raise SecurityError(f"{left!r} ** {right!r} is too large for a chat template")
            if operator == "*":
                seq, count = (left, right) if isinstance(left, (str, list, tuple)) else (right, left)
                sequence = isinstance(seq, (str, list, tuple))
                if sequence and isinstance(count, int) and count > TEMPLATE_MAX_VALUE:
                    raise SecurityError(f"repeating a sequence {count} times is too much for a template")
            return super().call_binop(context, operator, left, right)

    class _Generation(Extension):
        # transformers' {% generation %} marks assistant text for masks; here it just renders its body
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise InputError(f"chat template refused the messages: {message}")

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        # Jinja's own tojson escapes HTML characters, which chat templates do not expect
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = _Bounded(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class StreamDecoder:
    """Incremental detokenizer: :meth:`push` returns the text each new token adds.

    Only a short window of recent ids is decoded per token: the text of
    ``ids[prefix:read]`` was already returned, so the new text is what
    ``ids[prefix:]`` adds to it. Text ending in an incomplete UTF-8 sequence
    (``'\\ufffd'``) is held back until later tokens complete it.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = frozenset(tokenizer.special_ids) if skip_special_tokens else frozenset()
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def push(self, token_id: int) -> str:
        """Add one token id; return the printable text it completes (may be '')."""
        # Special tokens are dropped before decoding, exactly as decode(skip_special_tokens=True) does;
        # keeping them in the window could hide a leading space that decode() would keep.
        token_id = int(token_id)
        if token_id in self._skip:
            return ""
        self._ids.append(token_id)
        before = self._tokenizer.decode(self._ids[self._prefix:self._read], skip_special_tokens=False)
        after = self._tokenizer.decode(self._ids[self._prefix:], skip_special_tokens=False)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            self._trim()
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """Text still held back (an incomplete sequence at the end), as decode() would show it."""
        if self._read == len(self._ids):
            return ""
        before = self._tokenizer.decode(self._ids[self._prefix:self._read], skip_special_tokens=False)
        after = self._tokenizer.decode(self._ids[self._prefix:], skip_special_tokens=False)
        self._prefix = self._read = len(self._ids)
        return after[len(before):]

    def _trim(self) -> None:
        # Drop ids no window can reach again, so memory stays bounded on long generations.
        if self._prefix > 1024:
            del self._ids[:self._prefix]
            self._read -= self._prefix
            self._prefix = 0

"""The OpenAI API's requests and responses, as ``cmatrix serve`` speaks them: request bodies
checked and turned into a :class:`Completion` (token ids and generate() options), results
turned into the API's JSON objects and stream chunks. No server and no MPI here.

Supported: ``POST /v1/chat/completions`` and ``/v1/completions`` with ``max_tokens``
(``max_completion_tokens``), ``temperature``, ``top_p``, ``stop``, ``seed``, ``stream``
(``stream_options.include_usage``) and ``n`` = 1. What cmatrix cannot honour
(``logprobs``, ``n`` > 1, penalties, tools, images) is refused with a 400, never ignored.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from ..errors import CMatrixError

#: max_tokens of a text completion that gives none (OpenAI's default)
DEFAULT_COMPLETION_TOKENS = 16

#: generate()'s stop reasons as the API's finish_reason
FINISH = {"stop_token": "stop", "stop_string": "stop", "max_new_tokens": "length",
          "max_positions": "length", "cancelled": "stop", "interrupted": "stop"}


class ApiError(Exception):
    """A request the server refuses: HTTP ``status`` and the API's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Completion:
    """One request, ready for the generation worker."""

    kind: str                           # "chat" or "text"
    ids: list[int]
    options: dict                       # generate()'s keyword options
    stream: bool = False
    include_usage: bool = False
    #: a chat's prompt as the template rendered it (the worker continues its transcript with it)
    text: str | None = None
    ident: str = field(default_factory=lambda: "")
    created: int = field(default_factory=lambda: int(time.time()))


#: fields accepted and ignored because their value changes nothing here
_HARMLESS = {"model", "user", "metadata", "store", "service_tier", "parallel_tool_calls", "stream_options",
             "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed", "stream", "n",
             "messages", "prompt", "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty",
             "echo", "best_of", "suffix", "logit_bias", "response_format", "tools", "tool_choice"}


def _number(body: dict, name: str, default: float, lo: float, hi: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise ApiError(400, f"{name}: a number in [{lo}, {hi}], got {value!r}", param=name)
    return float(value)


def _refuse_unsupported(body: dict) -> None:
    for name in ("n", "best_of"):
        if body.get(name) not in (None, 1):
            raise ApiError(400, f"{name}: cmatrix serve answers with one choice (1)", param=name)
    if body.get("logprobs") or body.get("top_logprobs"):
        raise ApiError(400, "logprobs: not supported by cmatrix serve", param="logprobs")
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name):
            raise ApiError(400, f"{name}: not supported by cmatrix serve (leave it out or 0)", param=name)
    if body.get("tools") or body.get("logit_bias") or body.get("echo") or body.get("suffix"):
        name = next(n for n in ("tools", "logit_bias", "echo", "suffix") if body.get(n))
        raise ApiError(400, f"{name}: not supported by cmatrix serve", param=name)
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise ApiError(400, "response_format: only {\"type\": \"text\"}", param="response_format")


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > 4 or any(not isinstance(s, str) or not s for s in stops):
        raise ApiError(400, "stop: a string or a list of at most 4 non-empty strings", param="stop")
    return stops


def _text_of(content: Any, where: str) -> str:
    """A message's content: a string, or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" \
                    or not isinstance(part.get("text"), str):
                raise ApiError(400, f"{where}: only text content parts are supported", param="messages")
            parts.append(part["text"])
        return "".join(parts)
    raise ApiError(400, f"{where}: content must be a string or a list of text parts", param="messages")


def chat_messages(body: dict) -> list[dict]:
    """``messages`` as [{"role", "content": str}], checked."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages: a non-empty list of {role, content} objects", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise ApiError(400, f"messages[{i}]: role must be system, developer, user or assistant",
                           param="messages")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": _text_of(m.get("content"), f"messages[{i}]")})
    return out


def parse(body: Any, kind: str, model: Any, max_positions: int) -> Completion:
    """Check a request body and tokenise its prompt (``kind``: "chat" or "text").
    Raises :class:`ApiError`; a prompt that fills the context is a 400."""
    from ..llm.generate import check_options, prompt_ids

    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - _HARMLESS)
    if unknown:
        raise ApiError(400, f"unsupported field(s): {', '.join(unknown)}", param=unknown[0])
    _refuse_unsupported(body)
    stream = body.get("stream") or False  # null: the default, as OpenAI takes it
    if not isinstance(stream, bool):
        raise ApiError(400, "stream: true or false", param="stream")
    usage_opt = body.get("stream_options") or {}
    if not isinstance(usage_opt, dict):
        raise ApiError(400, "stream_options: an object", param="stream_options")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ApiError(400, f"seed: an integer >= 0, got {seed!r}", param="seed")
    text = None
    try:
        if kind == "chat":
            messages = chat_messages(body)
            text = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            ids = model.tokenizer.encode(text, add_special_tokens=False)
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1:
                prompt = prompt[0]
            if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
                ids = prompt_ids(model, None, prompt, None, None)
                vocab = model.config.vocab_size
                if any(not 0 <= t < vocab for t in ids):
                    raise ApiError(400, f"prompt: token ids lie in [0, {vocab})", param="prompt")
            elif isinstance(prompt, str) and prompt:
                ids = prompt_ids(model, prompt, None, None, False)
            else:
                raise ApiError(400, "prompt: a non-empty string (or one list of token ids)", param="prompt")
    except CMatrixError as exc:  # no chat template, a template that failed, bad token ids
        raise ApiError(400, str(exc), param="messages" if kind == "chat" else "prompt") from None
    if not ids:
        raise ApiError(400, "the prompt has no tokens", param="messages" if kind == "chat" else "prompt")
    room = max_positions - len(ids)
    if room < 1:
        raise ApiError(400, f"the prompt has {len(ids)} tokens, and this model's context holds "
                       f"{max_positions}: shorten it (no room left to answer)",
                       param="messages" if kind == "chat" else "prompt", code="context_length_exceeded")
    limit = body.get("max_completion_tokens")
    limit = body.get("max_tokens") if limit is None else limit
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ApiError(400, f"max_tokens: a positive integer, got {limit!r}", param="max_tokens")
    if limit is None:  # OpenAI's defaults: a chat answers until it ends, a completion gives 16 tokens
        limit = room if kind == "chat" else DEFAULT_COMPLETION_TOKENS
    options = {"max_new_tokens": min(limit, room),
               "temperature": _number(body, "temperature", 1.0, 0.0, 2.0),
               # top_p 0 (OpenAI allows it) keeps only the likeliest token; the sampler wants > 0
               "top_p": _number(body, "top_p", 1.0, 0.0, 1.0) or 1e-9,
               "seed": seed, "stop_strings": _stops(body)}
    try:
        check_options(**options)
    except CMatrixError as exc:  # what generate() would refuse, refused here with a 400
        raise ApiError(400, str(exc), param=next((n for n in options if n in str(exc)), None)) from None
    prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
    return Completion(kind=kind, ids=ids, options=options, stream=stream, text=text,
                      include_usage=bool(usage_opt.get("include_usage")),
                      ident=prefix + secrets.token_hex(12))


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def response(c: Completion, model_name: str, text: str, result: Any) -> dict:
    """The whole answer (non-streaming)."""
    finish = FINISH.get(result.stop_reason, "stop")
    if c.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return {"id": c.ident, "object": "chat.completion" if c.kind == "chat" else "text_completion",
            "created": c.created, "model": model_name, "choices": [choice],
            "usage": usage(result.prompt_tokens, len(result.token_ids), result.cached_tokens)}


def chunk(c: Completion, model_name: str, text: str | None = None, finish: str | None = None,
          first: bool = False, usage_of: Any = None) -> dict:
    """One stream chunk: new text, the finish reason, or (``usage_of``) the usage."""
    head = {"id": c.ident, "object": "chat.completion.chunk" if c.kind == "chat" else "text_completion",
            "created": c.created, "model": model_name}
    if usage_of is not None:
        return {**head, "choices": [],
                "usage": usage(usage_of.prompt_tokens, len(usage_of.token_ids), usage_of.cached_tokens)}
    if c.kind == "chat":
        delta = {} if text is None else {"content": text}
        if first:
            delta = {"role": "assistant", **delta}
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
    return {**head, "choices": [choice]}

"""Text generation on a :class:`~cmatrix.llm.model.DecoderModel`: prefill the prompt once,
then one token at a time, each rank extending its own K/V cache."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import CMatrixError, InputError
from .sampling import Sampler, SamplingOptions


@dataclass
class GenerationResult:
    """What :func:`generate` produced and how fast."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    #: "max_new_tokens", "stop_token", "stop_string", "max_positions", "interrupted" (Ctrl-C)
    #: or "cancelled" (``cancel()`` said so)
    stop_reason: str
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    #: bytes of array data moved between ranks per decoded token (and for the whole prefill)
    bytes_per_token: float = 0.0
    prefill_bytes: int = 0
    decode_steps: int = field(default=0)
    #: per rank, the decode steps' time by phase (``generate(profile=True)``)
    profile: list[dict] | None = None
    #: leading prompt tokens already in the ranks' K/V caches (``reuse_cache=True``): not run again
    cached_tokens: int = 0
    #: per rank, mean milliseconds per decoded token it kept the others waiting (its compute, and
    #: the time the kernel held it back; None: no part in the steps), since the last re-plan
    rank_ms: list[float | None] = field(default_factory=list)
    #: the slowest rank's compute time over the mean of the ranks holding work (1.0: even)
    imbalance: float = 0.0
    #: one line per re-plan while generating (see :mod:`cmatrix.llm.rebalance`)
    rebalances: list[str] = field(default_factory=list)

    @property
    def prefill_tokens(self) -> int:
        """Prompt tokens run through the model (the rest came from the cache)."""
        return self.prompt_tokens - self.cached_tokens

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_steps / self.decode_seconds if self.decode_seconds else 0.0

    def summary(self) -> str:
        ms = 1000 * self.decode_seconds / self.decode_steps if self.decode_steps else 0.0
        cached = f" (+{self.cached_tokens} cached)" if self.cached_tokens else ""
        ranks = ""
        if any(m is not None for m in self.rank_ms):
            each = ", ".join(f"{r}: {m:.1f}" for r, m in enumerate(self.rank_ms) if m is not None)
            ranks = f" | rank compute ms/token {each} (imbalance {self.imbalance:.2f}x)"
        moves = f" | {len(self.rebalances)} re-plan(s)" if self.rebalances else ""
        return (f"prefill: {self.prefill_tokens} tokens{cached}, {self.prefill_tokens_per_s:.1f} tokens/s | "
                f"decode: {len(self.token_ids)} tokens, {self.decode_tokens_per_s:.2f} tokens/s "
                f"({ms:.1f} ms/token) | moved {self.bytes_per_token / 1024:.1f} KiB/token "
                f"(prefill {self.prefill_bytes / 1024:.1f} KiB){ranks}{moves} | stop: {self.stop_reason}")


def check_options(max_new_tokens: int, stop_strings: Sequence[str] = (),
                  stop_token_ids: Sequence[int] | None = None, **sampling: Any) -> SamplingOptions:
    """Refuse bad generation options (before anything is loaded or sent); the sampling options."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise InputError(f"max_new_tokens: a non-negative integer, got {max_new_tokens!r}")
    if isinstance(stop_strings, str) or not isinstance(stop_strings, Sequence) \
            or any(not isinstance(s, str) or not s for s in stop_strings):
        raise InputError(f"stop_strings: a list of non-empty strings, got {stop_strings!r}")
    if stop_token_ids is not None and (not isinstance(stop_token_ids, Sequence | set | frozenset) or any(
            isinstance(t, bool) or not isinstance(t, int | np.integer) for t in stop_token_ids)):
        raise InputError(f"stop_token_ids: a list of token ids, got {stop_token_ids!r}")
    options = SamplingOptions(**sampling)
    options.check()
    return options


def prompt_ids(model: Any, prompt: str | None, token_ids: Sequence[int] | None,
               messages: list[dict] | None, chat: bool | None, system: str | None = None) -> list[int]:
    """The prompt as token ids: given ids, a chat rendered with the model's template, or plain text."""
    given = [x is not None for x in (prompt, token_ids, messages)]
    if sum(given) != 1:
        raise InputError("give exactly one of prompt (text), token_ids or messages")
    if system is not None and token_ids is not None:
        raise InputError("system: needs a text prompt and a chat template, not token_ids")
    if token_ids is not None:
        if any(isinstance(t, bool) or not isinstance(t, int | np.integer) for t in token_ids):
            raise InputError("token_ids: a list of integer token ids")
        return [int(t) for t in token_ids]
    tok = model.tokenizer
    if system is not None and (messages is not None or chat is False or not tok.has_chat_template):
        raise InputError("system: needs a text prompt and a chat template (the tokenizer has "
                         f"{'one' if tok.has_chat_template else 'none'})")
    if messages is None and (chat is None and tok.has_chat_template or chat):
        messages = ([{"role": "system", "content": system}] if system else []) + \
                   [{"role": "user", "content": prompt}]
    if messages is not None:
        # The template writes the BOS text itself; encoding must not add another.
        return tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True),
                          add_special_tokens=False)
    return tok.encode(prompt)


def generate(model: Any, prompt: str | None = None, *, token_ids: Sequence[int] | None = None,
             messages: list[dict] | None = None, chat: bool | None = None, system: str | None = None,
             max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             repetition_penalty: float = 1.0, seed: int | None = None,
             stop_token_ids: Sequence[int] | None = None, stop_strings: Sequence[str] = (),
             stream: Callable[[str], Any] | None = None, profile: bool = False,
             reuse_cache: bool = False, cancel: Callable[[], bool] | None = None,
             on_token: Callable[[int], Any] | None = None) -> GenerationResult:
    """Generate up to ``max_new_tokens`` tokens after a prompt.

    The prompt is ``prompt`` (text; rendered with the tokenizer's chat template when it
    has one, unless ``chat=False``), ``messages`` (a chat: [{"role", "content"}, ...]) or
    ``token_ids``. Sampling: greedy when ``temperature`` is 0, else temperature, ``top_k``,
    ``top_p``, with ``repetition_penalty`` and ``seed``, as transformers applies them.
    Generation stops at ``stop_token_ids`` (default: the model's end-of-sequence ids) or
    ``stop_strings`` (the text is cut before it). ``stream`` receives the new text as it
    is decoded. ``profile``: every rank times its decode steps by phase (``result.profile``;
    ggml ranks then run their graphs node by node, which is slower). ``reuse_cache``: the
    leading prompt tokens the ranks' K/V caches already hold (an earlier turn of the same
    conversation) are not run again. ``cancel``: asked before each new token; True stops
    (``stop_reason`` "cancelled"). ``on_token`` receives each new token id, after ``stream``
    got the text it completed.
    """
    options = check_options(max_new_tokens, stop_strings, stop_token_ids, temperature=temperature,
                            top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty, seed=seed)
    sampler = Sampler(options)
    ids = prompt_ids(model, prompt, token_ids, messages, chat, system)
    if not ids:
        raise InputError("the prompt has no tokens")
    if len(ids) > model.config.max_positions:
        raise InputError(f"the prompt has {len(ids)} tokens; the model takes at most "
                         f"{model.config.max_positions}")
    stops = set(model.stop_ids() if stop_token_ids is None else (int(t) for t in stop_token_ids))
    need_text = bool(stream or stop_strings) or prompt is not None or messages is not None
    tok = model.tokenizer if need_text else None
    text = _TextOut(tok, stop_strings, stream)

    stats = model.cluster.stats
    moved = stats()["bytes_moved"]
    cached = common_prefix(model.cached_ids, ids) if reuse_cache else 0
    cached = min(cached, len(ids) - 1)  # the last prompt token runs again: its logits are needed
    t0 = time.perf_counter()
    logits = model.forward(ids[cached:], start=cached)
    prefill_seconds = time.perf_counter() - t0
    prefill_bytes = stats()["bytes_moved"] - moved
    generated: list[int] = []
    if profile:
        model.profile(True)
    reason, steps, t1 = "max_new_tokens", 0, time.perf_counter()
    planned = len(model.balancer.moves)
    try:
        while len(generated) < max_new_tokens:
            if cancel is not None and cancel():
                reason = "cancelled"
                break
            token = sampler.next_token(logits, ids + generated)
            if token in stops:
                reason = "stop_token"
                break
            generated.append(token)
            stopped = text.push(token)
            if on_token is not None:
                on_token(token)
            if stopped:
                reason = "stop_string"
                break
            if len(generated) == max_new_tokens:
                break
            if model.position >= model.config.max_positions:
                reason = "max_positions"
                break
            logits = model.forward([token])
            steps += 1
            model.balancer.check(max_new_tokens - len(generated))  # may move work off a slow rank
    except KeyboardInterrupt:  # Ctrl-C: the ranks are in step (see Driver.run); keep what came
        reason = "interrupted"
    finally:
        decode_seconds = time.perf_counter() - t1
        # stop profiling even when a rank failed: ggml ranks would stay in the slow mode
        reports = None
        if profile:
            with contextlib.suppress(CMatrixError):  # the failure in flight says more
                reports = model.profile(False)
    decode_bytes = stats()["bytes_moved"] - moved - prefill_bytes
    rank_ms = model.balancer.per_rank_ms(last=steps)
    return GenerationResult(
        text=text.finish(), token_ids=generated, prompt_tokens=len(ids), stop_reason=reason,
        prefill_seconds=prefill_seconds, decode_seconds=decode_seconds,
        bytes_per_token=decode_bytes / steps if steps else 0.0, prefill_bytes=prefill_bytes,
        decode_steps=steps, profile=reports, cached_tokens=cached, rank_ms=rank_ms,
        imbalance=model.balancer.imbalance(rank_ms), rebalances=model.balancer.moves[planned:],
    )


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading ids ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class _TextOut:
    """Decoded text as tokens arrive: streamed, and cut at the first stop string. Text that
    could be the start of a stop string is held back until it is known not to be one."""

    def __init__(self, tokenizer: Any, stop_strings: Sequence[str], stream: Callable[[str], Any] | None):
        self.decoder = tokenizer.stream() if tokenizer is not None else None
        self.stops, self.stream = list(stop_strings), stream
        self.text, self.sent, self.cut = "", 0, None

    def push(self, token: int) -> bool:
        """Add a token; True when a stop string has appeared."""
        if self.decoder is None:
            return False
        self.text += self.decoder.push(token)
        return self._emit(final=False)

    def _emit(self, final: bool) -> bool:
        found = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if found:
            self.cut = min(found)
            self.text = self.text[:self.cut]
        ready = len(self.text)
        if not found and not final:
            ready -= max((n for s in self.stops for n in range(len(s) - 1, 0, -1)
                          if self.text.endswith(s[:n])), default=0)
        if self.stream is not None and ready > self.sent:
            self.stream(self.text[self.sent:ready])
        self.sent = max(self.sent, ready)
        return bool(found)

    def finish(self) -> str:
        if self.decoder is not None and self.cut is None:
            self.text += self.decoder.flush()
            self._emit(final=True)
        return self.text

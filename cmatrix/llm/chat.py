"""A conversation with a model whose K/V caches stay on the ranks between turns, and the
``cmatrix chat`` loop around it.

    chat = ChatSession(model, system="You are brief.")
    result = chat.ask("Why is the sky blue?", stream=print)   # a turn
    chat.ask("And at sunset?")    # prefills only this turn's tokens, not the whole history

Each turn renders the whole conversation with the model's chat template; the text that
continues the previous turn is added as tokens to the previous turn's tokens (the
:class:`Transcript`), and only the tokens past the longest prefix the ranks already hold
are run (``reuse_cache``): for a conversation that goes on, the new user message and the
template around it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any, TextIO

from ..errors import CMatrixError, InputError
from .generate import GenerationResult, check_options


class Transcript:
    """The text and token ids of the conversation the ranks' K/V caches hold, so that a
    conversation that goes on is extended by tokens instead of tokenised again from the start
    (as llama.cpp's chat does): the model's own answer tokens stay, even where the answer's
    text would tokenise otherwise, and only the new text is encoded."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.text, self.ids = "", []

    def ids_for(self, text: str) -> list[int]:
        """Token ids of a rendered prompt ``text``: the transcript's plus the new text's when
        ``text`` continues the transcript, else all of ``text`` encoded."""
        if self.ids and text.startswith(self.text):
            return self.ids + self.tokenizer.encode(text[len(self.text):], add_special_tokens=False)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def record(self, text: str, ids: list[int], result: GenerationResult) -> None:
        """After a turn on prompt ``text`` (``ids``): the transcript is the prompt and the
        answer, when the answer's tokens are exactly its text (not cut at a stop string)."""
        answer = list(result.token_ids)
        if self.tokenizer.decode(answer) == result.text:
            self.text, self.ids = text + result.text, list(ids) + answer
        else:
            self.text, self.ids = "", []


class ChatSession:
    """The messages of one conversation with ``model``; ``options`` are generate()'s
    sampling and stopping options, used for every turn."""

    def __init__(self, model: Any, system: str | None = None, **options: Any) -> None:
        if not model.tokenizer.has_chat_template:
            raise InputError(f"{model.path}: the tokenizer has no chat template, so there is no chat "
                             "format; use `cmatrix generate --no-chat` for plain text")
        check_options(options.get("max_new_tokens", 64), options.get("stop_strings", ()),
                      **{k: v for k, v in options.items()
                         if k in ("temperature", "top_k", "top_p", "repetition_penalty", "seed")})
        self.model, self.options = model, options
        self.system = system
        self.messages: list[dict] = []
        self.transcript = Transcript(model.tokenizer)

    def reset(self) -> None:
        """Forget the conversation (the system message stays)."""
        self.messages = []

    def set_system(self, text: str | None) -> None:
        """A new system message, for a new conversation."""
        self.system = text or None
        self.reset()

    def history(self) -> list[dict]:
        """The conversation as the template sees it."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.messages

    def ask(self, text: str, stream: Callable[[str], Any] | None = None,
            cancel: Callable[[], bool] | None = None) -> GenerationResult:
        """One turn: the model's answer to ``text``, streamed as it comes. An answer cut short
        (Ctrl-C, ``cancel``) stays in the conversation as far as it went."""
        if not text.strip():
            raise InputError("an empty message")
        messages = [*self.history(), {"role": "user", "content": text}]
        prompt = self.model.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        ids = self.transcript.ids_for(prompt)
        if len(ids) >= self.model.config.max_positions:
            raise InputError(f"the conversation has grown to {len(ids)} tokens and the model's context holds "
                             f"{self.model.config.max_positions}: /reset starts a new one")
        result = self.model.generate(token_ids=ids, stream=stream or (lambda _: None), cancel=cancel,
                                     reuse_cache=True, **self.options)
        self.transcript.record(prompt, ids, result)
        self.messages += [messages[-1], {"role": "assistant", "content": result.text}]
        return result


HELP = "commands: /reset (new conversation), /system TEXT (new system message), /quit; Ctrl-D leaves, " \
       "Ctrl-C stops an answer"


def run(cluster: Any, ns: argparse.Namespace, stdin: TextIO | None = None, out: TextIO | None = None) -> int:
    """Load the model, then one turn per line read until end of input."""
    from .run import load_model

    stdin, out = stdin or sys.stdin, out or sys.stdout
    try:
        model = load_model(cluster, ns, need_chat=True)
        chat = ChatSession(model, system=ns.system, max_new_tokens=ns.max_new_tokens,
                           temperature=ns.temperature, top_k=ns.top_k, top_p=ns.top_p,
                           repetition_penalty=ns.repetition_penalty, seed=ns.seed, stop_strings=ns.stop,
                           stop_token_ids=[] if ns.ignore_eos else None)
    except CMatrixError as exc:
        print(f"cmatrix chat: {exc}", file=sys.stderr)
        return 2
    interactive = stdin.isatty()
    # The conversation, notes and figures all go to ``out``: one stream keeps them in order
    # (under mpiexec, stdout and stderr are relayed separately).
    def say(text: str) -> None:
        out.write(text + "\n")
        out.flush()

    say(f"cmatrix chat: {model.path.name} on {cluster.size} rank(s). {HELP}")
    while True:
        try:
            if interactive:
                line = input("> ")
            else:
                out.write("> ")
                out.flush()
                line = stdin.readline()
                if not line:
                    raise EOFError
        except EOFError:
            out.write("\n")
            return 0
        except KeyboardInterrupt:  # at the prompt: a fresh line, the session goes on
            out.write("\n")
            continue
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            command, _, arg = line.partition(" ")
            if command in ("/quit", "/exit", "/bye"):
                return 0
            if command == "/reset":
                chat.reset()
                say("(new conversation)")
            elif command == "/system":
                chat.set_system(arg.strip())
                say(f"(new conversation, system: {chat.system or 'none'})")
            else:
                say(f"unknown command {command}; {HELP}")
            continue
        _turn(chat, line, out, say)


def _turn(chat: ChatSession, line: str, out: TextIO, say: Callable[[str], None]) -> None:
    def stream(text: str) -> None:
        out.write(text)
        out.flush()

    try:
        result = chat.ask(line, stream=stream)
    except KeyboardInterrupt:  # during the prompt's prefill: nothing was said
        say("\n(stopped)")
        return
    except CMatrixError as exc:
        say(f"\ncmatrix chat: {exc}")
        return
    stopped = " (stopped)" if result.stop_reason == "interrupted" else ""
    say(f"\n[{result.summary()}]{stopped}")

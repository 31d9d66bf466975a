"""``cmatrix generate``: stream a model's answer to a prompt, then the speed.

    mpirun -n 2 python -m cmatrix generate --model DIR --prompt "Why is the sky blue?" \\
        [--weights 0.6,0.4] [--backends torch,ggml] [--quant q4_0] [--cache save|load|auto]

Shared by the CLI and ``jobs/llm_generate.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import CMatrixError, InputError


def add_arguments(ap: argparse.ArgumentParser, model_required: bool = True,
                  command: str = "generate") -> None:
    """The options of ``command`` ("generate", "chat" or "serve"): the model and its placement
    for all three; the prompt for generate; sampling for generate and chat (serve takes it
    per request)."""
    ap.add_argument("--model", required=model_required,
                    help="local Hugging Face model folder (config.json, *.safetensors, tokenizer.json) "
                         "or a .gguf file")
    if command == "generate":
        ap.add_argument("--prompt", default="Tell me about clusters of old computers.")
        ap.add_argument("--no-chat", action="store_true", help="send the prompt as plain text, "
                        "even if the tokenizer has a chat template")
    if command in ("generate", "chat"):
        ap.add_argument("--system", default=None, help="system message (with a chat template)")
    ap.add_argument("--weights", default=None, help="per-rank shares, e.g. 0.6,0.4 (default equal), or "
                    "'auto': from each rank's measured speed (see cmatrix bench), capped by its memory")
    ap.add_argument("--backends", default=None,
                    help="backend for all ranks or one per rank, e.g. torch,ggml (default numpy)")
    ap.add_argument("--quant", choices=("q8_0", "q4_0"), default=None,
                    help="quantise every weight matrix (default: none, or a .gguf file's own blocks)")
    ap.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                    help="keep the weight matrices in this type on the ranks (default float32, or a "
                         ".gguf file's own 16-bit type)")
    ap.add_argument("--wire", choices=("float32", "float16", "bfloat16"), default="float32",
                    help="type of the activations sent between ranks (16-bit: half the bytes)")
    ap.add_argument("--cache", choices=("save", "load", "auto"), default=None,
                    help="save shards to each node's disk, or load them from there")
    ap.add_argument("--local-weights", choices=("auto", "on", "off"), default="auto",
                    help="ranks whose host has the model at the same path (same files) read their "
                         "own part of it; 'on': every rank must, 'off': the driver reads for every rank "
                         "(default auto)")
    ap.add_argument("--rebalance", choices=("auto", "on", "off"), default="auto",
                    help="while generating, move work away from a rank that stays slower than its share "
                         "predicts (default auto: on with --weights auto)")
    ap.add_argument("--parallel", choices=("auto", "tp", "pp"), default="auto",
                    help="tp: every layer split across every rank; pp: each host runs a range of layers "
                         "(a token crosses each link once: for slow home networks); auto (default): "
                         "measure the links and pick the faster (tp on one host)")
    if command == "serve":
        return
    ap.add_argument("--max-new-tokens", type=int, default=64 if command == "generate" else 512)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--repetition-penalty", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    ap.add_argument("--ignore-eos", action="store_true",
                    help="go on past the end-of-sequence token (until --max-new-tokens or a stop string)")
    if command == "generate":
        ap.add_argument("--profile", action="store_true",
                        help="print where each rank's decode time goes (matmul, attention, norms, "
                             "collectives, other)")


def parse_list(text: str | None, kind: type) -> Any:
    """'0.6,0.4' or '[0.6, 0.4]' -> [0.6, 0.4]; a single name stays a string."""
    if text is None:
        return None
    try:
        items = json.loads(text) if text.lstrip().startswith("[") else text.split(",")
        values = [kind(x.strip()) if isinstance(x, str) else kind(x) for x in items]
    except (ValueError, TypeError, RecursionError):
        raise InputError(f"cannot read {text!r} as a comma-separated list") from None
    return values[0] if kind is str and len(values) == 1 else values


def parse_weights(text: str | None) -> Any:
    """--weights: 'auto' (shares from measured speed), or per-rank shares as :func:`parse_list` reads them."""
    if text is not None and text.strip().lower() == "auto":
        return "auto"
    return parse_list(text, float)


def load_model(cluster: Any, ns: argparse.Namespace, need_chat: bool = False) -> Any:
    """Check the sampling options and the tokenizer, load ``ns.model`` and say how it was placed.
    ``need_chat``: refuse a tokenizer without a chat template before any weight moves."""
    from .generate import check_options
    from .gguf_file import is_gguf
    from .model import load, read_tokenizer

    if hasattr(ns, "temperature"):  # serve takes these per request
        check_options(ns.max_new_tokens, ns.stop, temperature=ns.temperature, top_k=ns.top_k, top_p=ns.top_p,
                      repetition_penalty=ns.repetition_penalty, seed=ns.seed)
    tok = None
    if (Path(ns.model) / "config.json").exists() or is_gguf(ns.model):  # else load() says what is amiss
        tok = read_tokenizer(ns.model)
        if need_chat and not tok.has_chat_template:
            raise InputError(f"{ns.model}: the tokenizer has no chat template, so there is no chat "
                             "format; use `cmatrix generate --no-chat` for plain text")
    model = load(cluster, ns.model, weights=parse_weights(ns.weights), quant=ns.quant, cache=ns.cache,
                 dtype=getattr(ns, "dtype", None), wire=getattr(ns, "wire", "float32"),
                 local_weights=getattr(ns, "local_weights", "auto"),
                 rebalance={"on": True, "off": False}.get(getattr(ns, "rebalance", "auto")),
                 parallel=getattr(ns, "parallel", "auto"))
    if tok is not None:
        model._tokenizer = tok  # read once (a GGUF file's vocabulary takes a while to rebuild)
    if model.conversion_note:
        print(f"cmatrix: {model.conversion_note}", file=sys.stderr)
    if any(model.local_ranks):
        readers = [str(r) for r, ok in enumerate(model.local_ranks) if ok]
        print(f"cmatrix: rank{'s' * (len(readers) > 1)} {', '.join(readers)} read their weights from their "
              f"own copy of {model.path}", file=sys.stderr)
        for r, problem in enumerate(model.local_problems):
            if problem is not None:
                print(f"cmatrix: rank {r} was sent its weights ({problem})", file=sys.stderr)
    def placed_on(p: dict) -> str:
        layers = f"layers {p['layers'][0]}-{p['layers'][1] - 1}, " if model.stages else ""
        return f"rank {p['rank']}: {layers}{p['heads']} heads, {p['mlp_rows']} MLP rows"
    placed = ", ".join(placed_on(p) for p in model.layout())
    print(f"cmatrix: {model.config.model_type}, {model.config.num_layers} layers on {cluster.size} "
          f"rank(s) ({placed}); {model.layout_note}", file=sys.stderr)
    measured = model.speeds or [None] * cluster.size
    print("cmatrix: decoding with " + ", ".join(
        f"rank {r}: {k} ({held}" + (f", measured {gbps:.1f} GB/s, share {share:.3f})" if gbps else ")")
        for r, (k, held, gbps, share) in enumerate(zip(model.decoders, model.stored_types(), measured,
                                                        model.weights, strict=True))),
          file=sys.stderr, flush=True)
    return model


def run(cluster: Any, ns: argparse.Namespace, out: Any = None) -> int:
    """Load ``ns.model``, stream the answer to ``out`` (stdout), print the speed to stderr."""
    out = out or sys.stdout
    try:  # everything that can be checked is checked before the weights move
        model = load_model(cluster, ns)

        def stream(text: str) -> None:
            out.write(text)
            out.flush()

        result = model.generate(ns.prompt, system=ns.system, chat=False if ns.no_chat else None,
                                max_new_tokens=ns.max_new_tokens, temperature=ns.temperature,
                                top_k=ns.top_k, top_p=ns.top_p, repetition_penalty=ns.repetition_penalty,
                                seed=ns.seed, stop_strings=ns.stop, stream=stream,
                                stop_token_ids=[] if ns.ignore_eos else None,
                                profile=getattr(ns, "profile", False))
    except CMatrixError as exc:
        print(f"\ncmatrix generate: {exc}", file=sys.stderr)
        return 2
    out.write("\n")
    out.flush()
    if result.stop_reason == "interrupted":
        print(f"cmatrix: stopped by the user after {len(result.token_ids)} tokens", file=sys.stderr)
    print(result.summary(), file=sys.stderr)
    if result.profile is not None:
        from .rank_part import format_profile

        print(format_profile(result.profile), file=sys.stderr)
    return 130 if result.stop_reason == "interrupted" else 0

"""Choosing the next token from a logits vector (numpy only).

The steps and their order follow Hugging Face transformers' logits processors:
repetition penalty, then either greedy argmax (temperature ~0) or temperature,
top-k, top-p and a draw from the softmax.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cmatrix.errors import CMatrixError, InputError

# Temperatures below this are treated as greedy decoding.
GREEDY_TEMPERATURE = 1e-5


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass
class SamplingOptions:
    """How :class:`Sampler` picks the next token.

    ``temperature`` 0 (or below ``1e-5``) means greedy argmax; ``top_k`` 0,
    ``top_p`` 1.0 and ``repetition_penalty`` 1.0 each turn that step off.
    ``seed`` seeds the random draws (``None``: fresh entropy).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def check(self) -> None:
        """Raise :class:`InputError` naming the first bad option."""
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if not _is_real(value) or not math.isfinite(value):
                raise InputError(f"sampling option {name} must be a finite number, got {value!r}")
        if self.temperature < 0:
            raise InputError(f"sampling option temperature must be >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, numbers.Integral) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise InputError(f"sampling option top_k must be an integer >= 0 (0: off), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"sampling option top_p must be in (0, 1] (1: off), got {self.top_p!r}")
        if self.repetition_penalty <= 0:
            raise InputError(
                f"sampling option repetition_penalty must be > 0 (1: off), got {self.repetition_penalty!r}"
            )
        if self.seed is not None and (
            not isinstance(self.seed, numbers.Integral) or isinstance(self.seed, bool) or self.seed < 0
        ):
            raise InputError(f"sampling option seed must be an integer >= 0 or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        """True when the temperature is so low that decoding is argmax."""
        return self.temperature < GREEDY_TEMPERATURE


class Sampler:
    """Picks next tokens under fixed :class:`SamplingOptions`, with its own random generator."""

    def __init__(self, options: SamplingOptions) -> None:
        options.check()
        self.options = options
        self._rng = np.random.default_rng(options.seed)

    def next_token(self, logits: np.ndarray, previous: Sequence[int]) -> int:
        """The next token id for a 1-D ``logits`` vector over the vocabulary.

        ``previous`` holds every token id so far (prompt and generated), used
        by the repetition penalty. ``logits`` is not modified.
        """
        scores = self.processed_logits(logits, previous)
        if self.options.greedy:
            return int(np.argmax(scores))
        return self._draw(scores)

    def processed_logits(self, logits: np.ndarray, previous: Sequence[int]) -> np.ndarray:
        """A float64 copy of ``logits`` after every enabled step; removed tokens hold ``-inf``.

        With greedy options only the repetition penalty applies.
        """
        scores = _checked_logits(logits)
        opts = self.options
        if opts.repetition_penalty != 1.0:
            apply_repetition_penalty(scores, previous, opts.repetition_penalty)
        if opts.greedy:
            return scores
        scores /= opts.temperature
        if 0 < opts.top_k < scores.size:
            scores = top_k_filter(scores, opts.top_k)
        if opts.top_p < 1.0:
            scores = top_p_filter(scores, opts.top_p)
        return scores

    def _draw(self, scores: np.ndarray) -> int:
        kept = np.flatnonzero(np.isfinite(scores))
        weights = np.exp(scores[kept] - scores[kept].max())
        cumulative = np.cumsum(weights)
        pick = np.searchsorted(cumulative, self._rng.random() * cumulative[-1], side="right")
        return int(kept[min(pick, kept.size - 1)])


def _checked_logits(logits: np.ndarray) -> np.ndarray:
    scores = np.array(logits, dtype=np.float64, copy=True)
    if scores.ndim != 1 or scores.size == 0:
        raise InputError(f"logits must be a non-empty 1-D vector, got shape {scores.shape}")
    if np.isnan(scores).any() or np.isposinf(scores).any():
        raise CMatrixError("logits contain NaN or +inf values; the model output is broken (cannot sample)")
    if np.isneginf(scores).all():
        raise CMatrixError("every logit is -inf; there is no token left to choose")
    return scores


def apply_repetition_penalty(scores: np.ndarray, previous: Sequence[int], penalty: float) -> None:
    """In place: each distinct token of ``previous`` has a positive score divided by
    ``penalty`` and a negative one multiplied by it."""
    ids = np.unique(np.asarray(previous, dtype=np.int64))
    if ids.size == 0:
        return
    if ids[0] < 0 or ids[-1] >= scores.size:
        bad = int(ids[0]) if ids[0] < 0 else int(ids[-1])
        raise InputError(f"previous token ids must lie in [0, {scores.size}), got {bad}")
    seen = scores[ids]
    scores[ids] = np.where(seen < 0, seen * penalty, seen / penalty)


def top_k_filter(scores: np.ndarray, k: int) -> np.ndarray:
    """Scores below the k-th largest set to ``-inf`` (ties with it are kept)."""
    kth = np.partition(scores, scores.size - k)[scores.size - k]
    return np.where(scores < kth, -np.inf, scores)


def top_p_filter(scores: np.ndarray, top_p: float) -> np.ndarray:
    """Nucleus filtering: keep the most likely tokens whose probabilities sum past ``top_p``."""
    order = np.argsort(scores, kind="stable")
    ascending = scores[order]
    probs = np.exp(ascending - ascending[-1])
    cumulative = np.cumsum(probs / probs.sum())
    remove = cumulative <= 1.0 - top_p
    remove[-1] = False
    out = scores.copy()
    out[order[remove]] = -np.inf
    return out

"""Tests of cmatrix.llm.sampling: greedy, penalties, top-k/top-p, seeded draws, bad options."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cmatrix.errors import CMatrixError, InputError
from cmatrix.llm.sampling import Sampler, SamplingOptions


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def test_greedy_is_argmax() -> None:
    rng = np.random.default_rng(0)
    sampler = Sampler(SamplingOptions())
    for _ in range(20):
        logits = rng.normal(size=50).astype(np.float32)
        assert sampler.next_token(logits, []) == int(np.argmax(logits))


def test_tiny_temperature_is_greedy() -> None:
    logits = np.array([0.0, 2.0, 1.9, -1.0])
    sampler = Sampler(SamplingOptions(temperature=1e-7, seed=3))
    assert {sampler.next_token(logits, []) for _ in range(50)} == {1}


def test_repetition_penalty_hand_computed() -> None:
    logits = np.array([2.0, -1.0, 0.5, 3.0, -2.0])
    sampler = Sampler(SamplingOptions(repetition_penalty=2.0))
    # token 0 positive -> halved, token 1 negative -> doubled; repeats count once
    got = sampler.processed_logits(logits, [0, 1, 0, 0])
    np.testing.assert_array_equal(got, [1.0, -2.0, 0.5, 3.0, -2.0])
    # greedy after the penalty: token 3 penalized to 1.5, so token 0 (2.0, not seen) wins
    assert sampler.next_token(logits, [3]) == 0
    assert Sampler(SamplingOptions()).next_token(logits, [3]) == 3


def test_top_k_one_is_argmax() -> None:
    rng = np.random.default_rng(1)
    for seed in range(10):
        logits = rng.normal(size=30)
        sampler = Sampler(SamplingOptions(temperature=5.0, top_k=1, seed=seed))
        assert sampler.next_token(logits, []) == int(np.argmax(logits))


def test_top_k_keeps_ties_at_kth_value() -> None:
    logits = np.array([1.0, 3.0, 2.0, 2.0, 0.0])
    kept = np.isfinite(Sampler(SamplingOptions(temperature=1.0, top_k=2)).processed_logits(logits, []))
    assert kept.tolist() == [False, True, True, True, False]


def test_top_p_keeps_the_nucleus() -> None:
    probs = np.array([0.05, 0.5, 0.1, 0.3, 0.05])
    logits = np.log(probs)
    cases = {0.45: [1], 0.75: [1, 3], 0.85: [1, 3, 2], 0.97: [0, 1, 2, 3, 4], 1e-6: [1]}
    for top_p, expected in cases.items():
        out = Sampler(SamplingOptions(temperature=1.0, top_p=top_p)).processed_logits(logits, [])
        assert np.flatnonzero(np.isfinite(out)).tolist() == sorted(expected), top_p


def test_matches_transformers_processors() -> None:
    pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    rng = np.random.default_rng(7)
    cases = [(1.3, 0.7, 20, 0.8), (0.8, 1.5, 0, 0.6), (1.0, 1.0, 5, 1.0), (2.0, 0.5, 40, 0.95)]
    for penalty, temperature, top_k, top_p in cases:
        logits = rng.normal(scale=3.0, size=64)
        previous = rng.integers(0, 64, size=12).tolist()
        hf = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(penalty),
                                  TemperatureLogitsWarper(temperature)])
        if top_k:
            hf.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            hf.append(TopPLogitsWarper(top_p))
        want = hf(torch.tensor([previous]), torch.tensor(logits[None, :], dtype=torch.float64))[0].numpy()
        options = SamplingOptions(temperature, top_k, top_p, penalty)
        got = Sampler(options).processed_logits(logits, previous)
        kept = np.isfinite(want)
        assert 1 <= kept.sum() < 64 or (top_k == 0 and top_p == 1.0)
        np.testing.assert_array_equal(np.isfinite(got), kept)
        np.testing.assert_allclose(_softmax(got[kept]), _softmax(want[kept]), rtol=1e-12)


def test_seeded_draws_reproducible() -> None:
    logits = np.random.default_rng(2).normal(size=100)
    options = SamplingOptions(temperature=1.0, seed=1234)
    first, second = Sampler(options), Sampler(options)
    a = [first.next_token(logits, []) for _ in range(200)]
    b = [second.next_token(logits, []) for _ in range(200)]
    assert a == b
    assert len(set(a)) > 10  # really random, not stuck on one token
    other = Sampler(SamplingOptions(temperature=1.0, seed=4321))
    assert [other.next_token(logits, []) for _ in range(200)] != a


@pytest.mark.parametrize("temperature,top_k,top_p",
                         [(1.0, 0, 1.0), (0.6, 0, 1.0), (1.0, 3, 1.0), (1.0, 0, 0.7)])
def test_frequencies_match_probabilities(temperature: float, top_k: int, top_p: float) -> None:
    logits = np.array([1.0, 0.2, -0.5, 1.4, 0.0, -2.0])
    sampler = Sampler(SamplingOptions(temperature=temperature, top_k=top_k, top_p=top_p, seed=99))
    n = 5000
    counts = np.bincount([sampler.next_token(logits, []) for _ in range(n)], minlength=logits.size)
    # the expected distribution, computed independently of the sampler's own filters
    probs = _softmax(logits / temperature)
    if top_k:
        probs[np.argsort(probs)[:-top_k]] = 0.0
    if top_p < 1.0:
        order = np.argsort(probs)[::-1]
        needed = int(np.searchsorted(np.cumsum(probs[order]), top_p)) + 1
        probs[order[needed:]] = 0.0
    probs /= probs.sum()
    assert np.all(counts[probs == 0] == 0)
    stderr = np.sqrt(probs * (1 - probs) / n)
    assert np.all(np.abs(counts / n - probs) <= 4.5 * stderr + 1e-12), (counts / n, probs)


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("temperature", math.nan), ("temperature", math.inf), ("temperature", "1"),
    ("top_k", -1), ("top_k", 2.5), ("top_k", True),
    ("top_p", 0.0), ("top_p", 1.5), ("top_p", -0.2), ("top_p", math.nan),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", math.inf),
    ("seed", -5), ("seed", 1.5),
])
def test_bad_options_raise(field: str, value: object) -> None:
    options = SamplingOptions(**{field: value})
    with pytest.raises(InputError, match=field):
        options.check()
    with pytest.raises(InputError, match=field):
        Sampler(options)


def test_good_options_pass() -> None:
    SamplingOptions(temperature=0.7, top_k=40, top_p=0.9, repetition_penalty=1.1, seed=0).check()
    SamplingOptions(temperature=1, top_k=np.int64(5), top_p=1).check()


def test_nan_or_posinf_logits_raise() -> None:
    sampler = Sampler(SamplingOptions(temperature=1.0, seed=0))
    for bad in (np.array([0.0, np.nan, 1.0]), np.array([0.0, np.inf, 1.0]), np.full(3, -np.inf)):
        with pytest.raises(CMatrixError, match="logit"):
            sampler.next_token(bad, [])
    with pytest.raises(CMatrixError, match="logit"):
        Sampler(SamplingOptions()).next_token(np.array([np.nan, 1.0]), [])


def test_neg_inf_logits_are_never_chosen() -> None:
    logits = np.array([-np.inf, 0.0, -np.inf, 0.5])
    sampler = Sampler(SamplingOptions(temperature=2.0, seed=5))
    assert {sampler.next_token(logits, []) for _ in range(300)} == {1, 3}


def test_bad_shapes_and_ids_raise() -> None:
    sampler = Sampler(SamplingOptions(repetition_penalty=1.2))
    with pytest.raises(InputError, match="1-D"):
        sampler.next_token(np.zeros((2, 3)), [])
    with pytest.raises(InputError, match="previous"):
        sampler.next_token(np.zeros(4), [4])


def test_caller_logits_unchanged() -> None:
    logits = np.random.default_rng(3).normal(size=40).astype(np.float32)
    copy = logits.copy()
    sampler = Sampler(SamplingOptions(temperature=0.5, top_k=10, top_p=0.8, repetition_penalty=1.5, seed=1))
    for _ in range(5):
        sampler.next_token(logits, list(range(0, 40, 3)))
    np.testing.assert_array_equal(logits, copy)
    greedy = Sampler(SamplingOptions(repetition_penalty=3.0))
    greedy.next_token(logits, list(range(40)))
    np.testing.assert_array_equal(logits, copy)

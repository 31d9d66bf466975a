"""Shares from measured speed (cmatrix.core.shares): pure arithmetic, no MPI."""

from __future__ import annotations

import pytest

from cmatrix.core import shares as sh
from cmatrix.errors import InputError


def test_proportional_shares_follow_speed_and_sum_to_one():
    assert sh.proportional([3.0, 1.0]) == [0.75, 0.25]
    s = sh.proportional([1.0, 1.0, 1.0])
    assert sum(s) == pytest.approx(1.0, abs=1e-12) and max(s) - min(s) <= 0.001 + 1e-12
    assert sh.proportional([2.0, 0.0]) == [1.0, 0.0]


@pytest.mark.parametrize("speeds", [[], [0.0, 0.0], [1.0, -1.0], [float("nan"), 1.0]])
def test_proportional_refuses_speeds_that_say_nothing(speeds):
    with pytest.raises(InputError, match="speeds"):
        sh.proportional(speeds)


def test_balanced_equalises_proportional_ranks():
    # rank 1 takes 4x as long for the same share: it gets a fifth of the work
    costs = [sh.RankCost(0.0, 1.0), sh.RankCost(0.0, 4.0)]
    shares = sh.balanced(costs)
    assert shares == [0.8, 0.2]
    assert sh.makespan(costs, shares) == pytest.approx(0.8)
    assert sh.makespan(costs, shares) < sh.makespan(costs, [0.5, 0.5]) / 2.4


def test_balanced_drops_a_rank_whose_fixed_time_alone_is_too_long():
    # rank 1 stalls 0.9 s per step whatever it holds: the others finish sooner without it
    costs = [sh.RankCost(0.0, 1.0), sh.RankCost(0.9, 1.0), sh.RankCost(0.0, 1.0)]
    shares = sh.balanced(costs)
    assert shares[1] == 0.0 and shares[0] == shares[2] == 0.5
    # a small fixed time does not: the rank keeps a (smaller) share
    costs[1] = sh.RankCost(0.1, 1.0)
    shares = sh.balanced(costs)
    assert 0 < shares[1] < shares[0]
    assert sh.makespan(costs, shares) == pytest.approx((1 + 0.1) / 3, abs=2e-3)


def test_balanced_respects_ranks_that_may_take_nothing():
    costs = [sh.RankCost(0.0, 1.0), sh.RankCost(0.0, 1.0)]
    assert sh.balanced(costs, allowed=[False, True]) == [0.0, 1.0]
    with pytest.raises(InputError):
        sh.balanced(costs, allowed=[False, False])


def test_fit_finds_the_fixed_part_from_two_shares():
    # t = 0.02 + 0.1 * share, seen at shares 0.5 and 0.25
    cost = sh.fit([0.5, 0.25], [0.07, 0.045])
    assert cost.fixed == pytest.approx(0.02) and cost.per_share == pytest.approx(0.1)
    # one share: all of the time is taken as proportional
    cost = sh.fit([0.5], [0.07])
    assert cost.fixed == 0.0 and cost.per_share == pytest.approx(0.14)
    with pytest.raises(InputError):
        sh.fit([0.0], [0.1])


def test_rounded_keeps_zero_shares_zero_and_sums_to_one():
    r = sh.rounded([1 / 3, 1 / 3, 1 / 3, 0.0])
    assert r[3] == 0.0 and sum(r) == pytest.approx(1.0, abs=1e-12)


def _profile(rate: float, held: float | None) -> dict:
    return {"decode": {"float32": rate}, "held": held}


def test_decoding_leaves_out_ranks_much_slower_or_held_back_most_of_the_time():
    # proportional while every rank is free
    assert sh.decode_shares([_profile(3.0, 0.0), _profile(1.0, 0.01)]) == [0.75, 0.25]
    # another program took rank 1's core three quarters of the time: no share of decoding
    assert sh.decode_shares([_profile(4.0, 0.0), _profile(1.0, 0.75)]) == [1.0, 0.0]
    # every rank held alike (more ranks than cores): nobody is left out
    assert sh.decode_shares([_profile(1.0, 0.6), _profile(1.0, 0.6)]) == [0.5, 0.5]
    # a saved profile says nothing of the moment (held None): speed alone decides
    assert sh.decode_shares([_profile(4.0, None), _profile(1.0, None)]) == [0.8, 0.2]
    # 1/20 of the fastest is not worth a place in every step
    assert sh.decode_shares([_profile(100.0, 0.0), _profile(4.0, 0.0)]) == [1.0, 0.0]

"""The arithmetic of rebalancing (no MPI): what a step's time is charged to a rank, and how a
re-plan is described."""

from __future__ import annotations

import pytest

from cmatrix.llm.commands import busy_seconds
from cmatrix.llm.rebalance import describe_moves


def test_a_rank_is_charged_its_compute_and_the_time_it_was_held_back_outside_it():
    # 10 ms step, 6 ms of it waiting in collectives: 4 ms of compute
    assert busy_seconds(0.010, 0.006, 0.0) == pytest.approx(0.004)
    # held back 5 ms during the step: the share that fell in its waits (6/10) counts
    assert busy_seconds(0.010, 0.006, 0.005) == pytest.approx(0.004 + 0.003)
    # held back 80 ms between steps (a CPU quota stopped it while it waited for the command)
    assert busy_seconds(0.010, 0.006, 0.0, 0.080) == pytest.approx(0.084)
    assert busy_seconds(0.0, 0.0, 0.0) == 0.0


def test_moves_are_described_by_what_changed_hands():
    def rank(groups: int, rows: int) -> dict:
        return {"kv_groups": groups, "mlp_rows": rows, "vocab_rows": 500}

    before, after = [rank(2, 256), rank(2, 256)], [rank(3, 384), rank(1, 128)]
    text = describe_moves(before, after)
    assert text == "KV groups: rank 1 -1, rank 0 +1; MLP rows: rank 1 -128, rank 0 +128"
    assert describe_moves(before, before) == "nothing moved"

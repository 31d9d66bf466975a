import numpy as np
import pytest

from cmatrix.core.plan import Plan, split_counts, validate_weights
from cmatrix.errors import CMatrixError, InputError


@pytest.mark.parametrize("total", [1, 2, 3, 7, 10, 97, 4096])
@pytest.mark.parametrize("weights", [[1.0], [0.5, 0.5], [0.35, 0.35, 0.15, 0.15],
                                     [0.5, 0.3, 0.2, 0.0], [0.0, 1.0], [0.1] * 10])
def test_counts_are_exact_and_proportional(total, weights):
    counts = split_counts(total, weights)
    assert counts.sum() == total
    assert np.all(counts >= 0)
    ideal = np.asarray(weights) * total
    assert np.all(np.abs(counts - ideal) < 1.0 + 1e-9)  # largest remainder: within one item
    assert np.all(counts[np.asarray(weights) == 0] == 0)


def test_largest_remainder_examples():
    # 3.5, 3.5, 1.5, 1.5: all tie, the lower ranks get the two spare columns
    assert split_counts(10, [0.35, 0.35, 0.15, 0.15]).tolist() == [4, 4, 1, 1]
    assert split_counts(10, [0.15, 0.15, 0.35, 0.35]).tolist() == [2, 2, 3, 3]
    assert split_counts(4096, [0.5, 0.3, 0.2, 0.0]).tolist() == [2048, 1229, 819, 0]
    assert split_counts(3, [0.25] * 4).tolist() == [1, 1, 1, 0]
    assert split_counts(1, [0.0, 0.0, 1.0]).tolist() == [0, 0, 1]


def test_aligned_counts_are_block_multiples():
    counts = split_counts(100, [0.5, 0.25, 0.25, 0.0], align=32)
    assert counts.sum() == 100
    assert all(c % 32 == 0 for c in counts[:-2])
    assert counts[3] == 0


def test_plan_blocks_and_displacements():
    plan = Plan.from_weights(10, [0.5, 0.3, 0.2], axis=1)
    assert plan.counts == (5, 3, 2)
    assert plan.displs == (0, 5, 8)
    assert plan.block(1) == slice(5, 8)
    assert plan.block_shape((4, 10), 2) == (4, 2)


@pytest.mark.parametrize("weights, fragment", [
    ([0.5, 0.5, 0.0], "one share per rank"),
    ([0.5, 0.4], "sum to 1"),
    ([0.95], "sum to 1"),
    ([1.2, -0.2], ">= 0"),
    ([float("nan"), 1.0], "finite"),
    (["a", "b"], "list of numbers"),
])
def test_weight_validation_names_the_problem(weights, fragment):
    with pytest.raises(InputError, match="weights") as info:
        validate_weights(weights, 2 if len(weights) != 1 else 1)
    assert fragment in str(info.value)
    assert isinstance(info.value, CMatrixError)


def test_weights_within_tolerance_are_accepted():
    w = validate_weights([1 / 3, 1 / 3, 1 / 3 + 5e-7], 3)
    assert w.shape == (3,)

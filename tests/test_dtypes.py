import numpy as np
import pytest

from cmatrix.core import dtypes
from cmatrix.errors import InputError


def test_bf16_round_trip_of_representable_values():
    bits = np.array([0x3F80, 0xC000, 0x0000, 0x7F80, 0x4049], dtype=np.uint16)  # 1, -2, 0, inf, ~3.14
    assert np.array_equal(dtypes.float32_to_bf16(dtypes.bf16_to_float32(bits)), bits)


def test_bf16_rounds_to_nearest_even():
    # 1 + 2^-8 is halfway between two bf16 values; ties go to the even one (1.0).
    assert dtypes.float32_to_bf16(np.array([1 + 2**-8], np.float32))[0] == 0x3F80
    # 1 + 3*2^-8 is halfway too; the even neighbour is 1 + 2^-6.
    assert dtypes.float32_to_bf16(np.array([1 + 3 * 2**-8], np.float32))[0] == 0x3F82
    assert dtypes.float32_to_bf16(np.array([np.nan], np.float32))[0] == 0x7FC0


def test_bf16_matches_torch():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(1).standard_normal(10_000).astype(np.float32) * 100
    ours = dtypes.float32_to_bf16(x)
    theirs = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(ours, theirs)


def test_promotion_and_refusal():
    assert dtypes.promote("float16", "float16") == "float16"
    assert dtypes.promote("float16", "bfloat16") == "float32"
    with pytest.raises(InputError, match="float64"):
        dtypes.check("float64", "w")

"""Masks on the wire: row-major runs starting with zeros, decoded exactly; bad runs refused."""

from __future__ import annotations

import numpy as np
import pytest

from palettelink import rle
from palettelink.errors import InvalidStream


@pytest.mark.parametrize("seed", range(5))
def test_runs_round_trip_any_mask(seed: int) -> None:
    rng = np.random.default_rng(seed)
    mask = rng.random((17, 23)) < rng.uniform(0.05, 0.95)
    counts = rle.encode(mask)
    assert sum(counts) == mask.size
    np.testing.assert_array_equal(rle.decode(counts, 23, 17), mask)


def test_a_mask_that_starts_with_ones_begins_with_an_empty_run() -> None:
    assert rle.encode(np.array([[1, 1, 0, 1]], bool)) == [0, 2, 1, 1]
    assert rle.encode(np.zeros((2, 2), bool)) == [4]


def test_runs_that_do_not_cover_the_image_are_refused() -> None:
    with pytest.raises(InvalidStream, match="cover 3 pixels, not 2x2"):
        rle.decode([1, 2], 2, 2)
    with pytest.raises(InvalidStream):
        rle.decode([5, -1], 2, 2)

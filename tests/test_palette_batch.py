"""The batch encoder (palettelink/codecs/palette/batch.py) writes the same bytes as coding the layers
one by one, pass by pass (``encode_layer``, the decoder's mirror), on any palette and map shape.

The golden streams (test_palette_golden.py) re-encode through the batch path too; here random
palettes, odd and tiny shapes, level subsets and the layer-by-layer fallback are compared byte for
byte, and the streams decode.
"""

from __future__ import annotations

import numpy as np
import pytest

from palettelink.codecs import palette as pc
from palettelink.codecs.palette import batch, stream


def _one_by_one(fin: np.ndarray, tb: pc.PaletteTables, levels: list[int], model: str) -> list[bytes]:
    out = []
    for t in levels:
        above = tb.ids_at(fin, t + 1) if t + 1 < tb.n_levels else None
        out.append(pc.encode_layer(tb, t, tb.ids_at(fin, t), above, model))
    return out


@pytest.mark.parametrize("model", ["context", "static"])
@pytest.mark.parametrize("shape", [(16, 16), (1, 1), (3, 5), (7, 9), (13, 4), (2, 15)])
def test_batch_equals_layer_by_layer(palettes, model: str, shape: tuple[int, int]) -> None:  # noqa: ANN001
    rng = np.random.default_rng(shape[0] * 31 + shape[1])
    for tb, maps in palettes:
        assert batch.supported(tb)
        for m in maps[:2]:
            y, x = rng.integers(0, 16 - shape[0] + 1), rng.integers(0, 16 - shape[1] + 1)
            fin = np.ascontiguousarray(m[:, y: y + shape[0], x: x + shape[1]]).astype(np.int64)
            levels = list(range(tb.n_levels - 1, -1, -1))
            got = batch.encode_layers(tb, fin, levels, model)
            assert got == _one_by_one(fin, tb, levels, model)
            ids, lv = pc.decode_layers(got, tb, tb.n_levels - 1, fin.shape, model)
            assert lv == 0 and np.array_equal(ids, fin)


def test_random_maps_and_level_subsets(palettes) -> None:  # noqa: ANN001
    """Maps no smooth latent would give (every entry anywhere) and levels in any order."""
    rng = np.random.default_rng(0)
    for tb, _ in palettes:
        fin = rng.integers(0, int(tb.sizes[0]), (tb.n_groups, 11, 10)).astype(np.int64)
        for levels in ([0], [tb.n_levels - 1], [2, 1], [1, 3, 0]):
            for model in ("context", "static"):
                assert batch.encode_layers(tb, fin, levels, model) == _one_by_one(fin, tb, levels, model)


def test_slices_of_the_stream(palettes) -> None:  # noqa: ANN001
    """encode_levels_between gives the slices of encode_levels' list the edge extends on demand."""
    tb, maps = palettes[0]
    fin = maps[0].astype(np.int64)
    full = pc.encode_levels(fin, tb, 0)
    top = stream.encode_levels_between(fin, tb, tb.n_levels - 1, 2)
    rest = stream.encode_levels_between(fin, tb, 1, 0)
    assert top + rest == full and top == pc.encode_levels(fin, tb, 2)


def test_too_wide_a_palette_codes_layer_by_layer(palettes, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    tb, maps = palettes[1]
    fin = maps[0].astype(np.int64)
    fast = pc.encode_levels(fin, tb, 0)
    monkeypatch.setattr(batch, "_MAX_LUT", 1)
    assert not batch.supported(tb)
    monkeypatch.setattr(batch, "encode_layers", lambda *a: pytest.fail("batch path used"))
    assert pc.encode_levels(fin, tb, 0) == fast


def test_cache_is_built_once_per_tables(palettes) -> None:  # noqa: ANN001
    tb, maps = palettes[0]
    pc.encode_levels(maps[0].astype(np.int64), tb, 0)
    info = batch.cache_info(tb)
    assert info["built"] and info["lookup_entries"] == (max(tb.width(t) for t in range(tb.n_levels)) + 1) ** 4
    cache = tb.__dict__["_batch_cache"]
    pc.encode_levels(maps[1].astype(np.int64), tb, 0)
    assert tb.__dict__["_batch_cache"] is cache

"""The server's layer decoder (palettelink/codecs/palette/batch.py: decode_layer, the encoder's
strided-view contexts and float64 rows) decodes exactly what the pass-by-pass reference
(``stream.decode_layer``) decodes, on random palettes, odd shapes, both models, random and corrupt
bytes; decode_layers_full uses it wherever the batch encoder runs (issue 17: ~2× less CPU per frame).
"""

from __future__ import annotations

import numpy as np
import pytest

from palettelink.codecs import palette as pc
from palettelink.codecs.palette import batch, stream
from palettelink.errors import InvalidStream


def _both(tb: pc.PaletteTables, layers: list[bytes], shape: tuple[int, int], model: str) -> None:
    """Layer by layer, the fast decoder's ids equal the reference's (or both refuse alike)."""
    ref = fast = None
    for i, data in enumerate(layers):
        t = tb.n_levels - 1 - i
        try:
            want = stream.decode_layer(tb, t, data, ref, shape, model)
        except InvalidStream as e:
            with pytest.raises(InvalidStream) as got:
                batch.decode_layer(tb, t, data, stream._parents_of(tb, fast, shape), model)
            assert str(got.value) == str(e)
            return
        fast = batch.decode_layer(tb, t, data, stream._parents_of(tb, fast, shape), model)
        assert np.array_equal(fast, want), (model, t)
        ref = want


@pytest.mark.parametrize("model", ["context", "static"])
@pytest.mark.parametrize("shape", [(16, 16), (1, 1), (3, 5), (7, 9), (13, 4), (2, 15)])
def test_fast_decode_equals_reference(palettes, model: str, shape: tuple[int, int]) -> None:  # noqa: ANN001
    rng = np.random.default_rng(shape[0] * 31 + shape[1])
    for tb, maps in palettes:
        assert batch.supported(tb)
        for m in maps[:2]:
            y, x = rng.integers(0, 16 - shape[0] + 1), rng.integers(0, 16 - shape[1] + 1)
            fin = np.ascontiguousarray(m[:, y: y + shape[0], x: x + shape[1]]).astype(np.int64)
            layers = pc.encode_levels(fin, tb, 0, model)
            _both(tb, layers, shape, model)
            ids, lv = pc.decode_layers(layers, tb, tb.n_levels - 1, fin.shape, model)  # the fast path
            assert lv == 0 and np.array_equal(ids, fin)


def test_random_maps_and_junk_bytes(palettes) -> None:  # noqa: ANN001
    """Maps no smooth latent would give, and layers of random words: the same ids or the same refusal."""
    rng = np.random.default_rng(0)
    for tb, _ in palettes:
        fin = rng.integers(0, int(tb.sizes[0]), (tb.n_groups, 11, 10)).astype(np.int64)
        for model in ("context", "static"):
            layers = pc.encode_levels(fin, tb, 0, model)
            _both(tb, layers, (11, 10), model)
            for _ in range(5):
                junk = [rng.integers(1, 1 << 32, int(rng.integers(1, 40)), dtype=np.uint64)
                        .astype("<u4").tobytes() for _ in layers]
                _both(tb, junk, (11, 10), model)

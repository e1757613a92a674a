"""Committed palette streams decode to the committed index maps, and re-encode to the same bytes.

The tables, streams and maps under tests/golden/palette/ were written by
``tests/golden/make_golden.py --regenerate``; any machine must reproduce them exactly (integer
tables, exact table→probability division, constriction's deterministic ANS).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from palettelink import bitstream
from palettelink.codecs import palette as pc

GOLDEN = Path(__file__).resolve().parent / "golden" / "palette"
STREAMS = sorted(GOLDEN.glob("s*_*_l*.bin"))


@pytest.fixture(scope="module")
def tables() -> pc.PaletteTables:
    return pc.PaletteTables.load(GOLDEN / "tables.npz")


def test_golden_files_present() -> None:
    assert (GOLDEN / "tables.npz").is_file() and len(STREAMS) >= 8


@pytest.mark.parametrize("path", STREAMS, ids=lambda p: p.stem)
def test_golden_stream_decodes_and_reencodes_exactly(tables: pc.PaletteTables, path: Path) -> None:
    sample, model, lv = path.stem.split("_")
    level = int(lv[1:])
    data = path.read_bytes()
    assert data[4] == bitstream.FORMAT_VERSION  # regenerated on purpose when the container changes
    frame = bitstream.unpack(data)
    assert frame.codec_id == pc.WIRE_ID and frame.progressive and frame.param == tables.n_levels - 1
    ids, got = pc.decode_layers(frame.layers, tables, frame.param, frame.shapes[0], model)
    assert got == level
    expected = np.load(GOLDEN / f"{sample}_l{level}.npy").astype(np.int64)
    assert np.array_equal(ids, expected)
    finest = np.load(GOLDEN / f"{sample}_l0.npy").astype(np.int64)
    layers = pc.encode_levels(finest, tables, level, model)
    assert tuple(layers) == frame.layers
    # and every prefix of the stream is the coarser golden map
    for k in range(1, len(frame.layers)):
        ids_k, lv_k = pc.decode_layers(frame.layers[:k], tables, frame.param, frame.shapes[0], model)
        assert np.array_equal(ids_k, np.load(GOLDEN / f"{sample}_l{lv_k}.npy").astype(np.int64))

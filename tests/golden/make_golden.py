"""Write the palette codec's golden streams (tests/golden/palette/): run only on purpose.

    python tests/golden/make_golden.py --regenerate

A synthetic palette (K0 = 64, 6 levels, 4 groups, fitted context tables) is saved as ``tables.npz``;
three index maps are coded at a few levels with both entropy models. ``test_palette_golden.py``
decodes the committed streams and re-encodes the committed maps, comparing bytes and indices exactly,
so any change to the coder, the contexts or the table arithmetic, on any machine, shows up.
Regenerate only when the format changes on purpose (and say so in the commit); the container
(format version 2, CRC-32 per layer) changed in this way, the layers and index maps did not.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from palettelink.codecs.palette import PaletteTables

HERE = Path(__file__).resolve().parent / "palette"
CASES = (("context", 0), ("context", 2), ("context", 5), ("static", 0))
N_MAPS = 3
BUNDLE_ID = "golden/1"


def frame_bytes(tables: PaletteTables, layers: list[bytes], shape: tuple[int, ...]) -> bytes:
    """The full container (fixed bundle id, zero table hash) around ``layers``."""
    from palettelink import bitstream
    from palettelink.codecs.palette import WIRE_ID

    return bitstream.pack(bitstream.Frame(
        codec_id=WIRE_ID, param=tables.n_levels - 1, bundle_id=BUNDLE_ID, table_hash=bytes(8),
        image_size=(256, 256), shapes=((tables.channels, *shape[-2:]),), layers=tuple(layers),
        progressive=True))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--regenerate", action="store_true", help="really overwrite the committed files")
    args = ap.parse_args(argv)
    if not args.regenerate:
        print("refusing to overwrite golden streams without --regenerate", file=sys.stderr)
        return 2
    from palettelink.codecs import palette as pc
    from palettelink.train import context, palette

    z = palette.synthetic_latents(24, channels=16, h=16, w=16, seed=11)
    arrays = palette.build_palette(z[:20], 4, k0=64, n_levels=6, seed=0)
    maps = palette.index_maps(z, arrays)
    arrays.update(context.fit_context_tables(maps[:20], arrays))
    HERE.mkdir(parents=True, exist_ok=True)
    for old in HERE.glob("*"):
        old.unlink()
    np.savez_compressed(HERE / "tables.npz", **arrays)
    tb = pc.PaletteTables.load(HERE / "tables.npz")
    for i in range(N_MAPS):
        fin = maps[20 + i].astype(np.int64)
        for t in range(tb.n_levels):
            np.save(HERE / f"s{i}_l{t}.npy", tb.ids_at(fin, t).astype(np.int16))
        for model, t in CASES:
            layers = pc.encode_levels(fin, tb, t, model)
            (HERE / f"s{i}_{model}_l{t}.bin").write_bytes(frame_bytes(tb, layers, fin.shape))
    print(f"wrote {len(list(HERE.iterdir()))} files to {HERE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Sample images (bus.jpg, zidane.jpg) for every install, the edge-only one included.

Copies ship inside the package (``palettelink/data/samples/``, package data), so the edge's README
commands, ``palettelink loadtest`` and ``palettelink bench-edge`` work before a camera is attached.
Where ultralytics is installed (the server and training installs) the same two files are taken from
its wheel instead, found without importing it, so reports keep naming the paths they always named:
the bytes are identical (sha256 checked in the tests).

Importing ultralytics writes a settings file and prints a banner to stdout on first use, so anything
that captures stdout (the demo script did) must never import it to find a path. ``find_spec`` only
locates the package.

    python -m palettelink.samples            # one absolute path per line
    python -m palettelink.samples --face DIR # scikit-image's astronaut (a face) written to DIR

On the command line of ``palettelink-edge`` (and wherever inputs are expanded), ``samples:`` stands
for these images.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

SAMPLE_NAMES = ("bus.jpg", "zidane.jpg")
SHIPPED = Path(__file__).resolve().parent / "data" / "samples"


def assets_dir() -> Path | None:
    """ultralytics' ``assets`` folder, or None when the package is not installed."""
    try:
        spec = importlib.util.find_spec("ultralytics")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "assets"


def shipped_images() -> list[Path]:
    """The copies inside this package (those present), sorted."""
    return sorted(p for p in (SHIPPED / n for n in SAMPLE_NAMES) if p.is_file())


def sample_images() -> list[Path]:
    """bus.jpg and zidane.jpg, sorted: ultralytics' own when it is installed and has both, else the
    copies shipped in this package."""
    assets = assets_dir()
    found = [] if assets is None else sorted(p for p in (assets / n for n in SAMPLE_NAMES) if p.is_file())
    return found if len(found) == len(SAMPLE_NAMES) else shipped_images()


def face_sample(folder: Path) -> Path | None:
    """scikit-image's ``astronaut`` (a face, for the landmarks task) as DIR/astronaut.png; None when
    scikit-image is not installed."""
    try:
        from skimage import data
    except ImportError:
        return None
    from PIL import Image

    path = Path(folder) / "astronaut.png"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(data.astronaut()).save(path)
    return path


def main() -> int:
    try:
        return _main()
    except BrokenPipeError:  # `python -m palettelink.samples | head -1`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def _main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--face":
        face = face_sample(Path(sys.argv[2]))
        if face is None:
            print("palettelink.samples: scikit-image is not installed (no face sample)", file=sys.stderr)
            return 2
        print(face)
        return 0
    paths = sample_images()
    if not paths:
        print(f"palettelink.samples: no sample images (neither ultralytics' nor {SHIPPED})", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())

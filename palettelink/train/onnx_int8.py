"""Static int8 (onnxruntime QDQ) of an ONNX graph's convolutions: the one quantiser behind the
server's int8 feature decoder and tail (:mod:`palettelink.train.int8_serve`, run by build-bundle) and
the image codec's int8 generator (:mod:`palettelink.bench.int8_decoder`)."""

from __future__ import annotations

import contextlib
import io
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def int8_name(graph: str) -> str:
    """The file an int8 variant of ``graph`` is kept in (``edge.onnx`` → ``edge.int8.onnx``)."""
    return graph.removesuffix(".onnx") + ".int8.onnx"


CALIBRATIONS = ("minmax", "percentile")


def quantise(src: Path, dst: Path, feeds: list[dict[str, np.ndarray]], exclude: Sequence[str] = (),
             calibration: str = "minmax") -> None:
    """Static QDQ int8 of ``src``'s convolutions, calibrated on ``feeds`` (z and level vary);
    ``exclude``: names of nodes that stay fp32; ``calibration``: ``minmax`` (each activation's range
    as seen) or ``percentile`` (its 99.999th percentile: a rare outlier no longer widens the step for
    every other value; onnxruntime's histogram calibrator)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if calibration not in CALIBRATIONS:
        raise ValueError(f"calibration must be one of {CALIBRATIONS}, got {calibration!r}")
    method, extra = (CalibrationMethod.MinMax, {})
    if calibration == "percentile":
        method, extra = CalibrationMethod.Percentile, {"CalibPercentile": 99.999}

    class Reader:
        def __init__(self) -> None:
            self.it = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        out = Path(tmp) / "int8.onnx"
        with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators print their progress
            quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            op_types_to_quantize=["Conv"], nodes_to_exclude=list(exclude),
                            calibrate_method=method, extra_options=extra)
        shutil.copyfile(out, dst)


def fine_convolutions(graph: Any, max_stride: int) -> list[str]:
    """Names of the convolutions of ``graph`` (an ``onnx.GraphProto``) whose output is at a stride ≤
    ``max_stride`` of its image input (the network's first, high-resolution layers).

    Strides are followed through the graph in its (topological) order: a Conv or pooling node
    multiplies its input's stride by its own, every other node keeps the largest of its inputs' (a
    Resize, which would divide it, only comes after the layers this picks in our graphs)."""
    stride: dict[str, int] = {graph.input[0].name: 1}
    fine = []
    for node in graph.node:
        known = [stride[i] for i in node.input if i in stride]
        if not known:
            continue
        s = max(known)
        if node.op_type in ("Conv", "MaxPool", "AveragePool"):
            own = next((list(a.ints) for a in node.attribute if a.name == "strides"), [1])
            s *= max(own or [1])
            if node.op_type == "Conv" and s <= max_stride:
                fine.append(node.name)
        for o in node.output:
            stride[o] = s
    return fine

"""Static int8 (onnxruntime QDQ) of an ONNX graph's convolutions: the one quantiser behind the
server's int8 feature decoder and tail (:mod:`palettelink.train.int8_serve`, run by build-bundle) and
the image codec's int8 generator (:mod:`palettelink.bench.int8_decoder`)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def int8_name(graph: str) -> str:
    """The file an int8 variant of ``graph`` is kept in (``edge.onnx`` → ``edge.int8.onnx``)."""
    return graph.removesuffix(".onnx") + ".int8.onnx"


def quantise(src: Path, dst: Path, feeds: list[dict[str, np.ndarray]], exclude: Sequence[str] = ()) -> None:
    """Static QDQ int8 of ``src``'s convolutions, calibrated on ``feeds`` (z and level vary);
    ``exclude``: names of nodes that stay fp32."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader:
        def __init__(self) -> None:
            self.it = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        out = Path(tmp) / "int8.onnx"
        quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=["Conv"], nodes_to_exclude=list(exclude))
        shutil.copyfile(out, dst)

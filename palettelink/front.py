"""The edge half of a split network: the bundle's ONNX front run with onnxruntime."""

from __future__ import annotations

import time

import numpy as np
import onnxruntime as ort

from palettelink.bundle import Bundle
from palettelink.image import Letterbox, letterbox

# Process-wide session defaults, set by ``palettelink bench-edge --threads`` before any session exists
# (encoders build their own sessions): intra-op threads, and whether idle threads spin.
_DEFAULTS: dict[str, int | bool | None] = {"threads": None, "spinning": None}


def set_session_defaults(threads: int | None = None, spinning: bool | None = None) -> None:
    """Defaults for sessions made after this call: ``threads`` intra-op threads (None: onnxruntime's
    own choice), ``spinning`` False stops idle threads busy-waiting (None: onnxruntime's default, on)."""
    _DEFAULTS["threads"], _DEFAULTS["spinning"] = threads, spinning


def ort_session(path: str, threads: int | None = None) -> ort.InferenceSession:
    """CPU session (CUDA when the server has it and asks); deterministic graph optimisation."""
    so = ort.SessionOptions()
    threads = threads or _DEFAULTS["threads"]  # type: ignore[assignment]
    if threads:
        so.intra_op_num_threads = threads
    if _DEFAULTS["spinning"] is not None:
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if _DEFAULTS["spinning"] else "0")
    so.log_severity_level = 3
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                 if p in ort.get_available_providers()]
    return ort.InferenceSession(path, so, providers=providers)


class Front:
    """Image → the tensors that cross the split, in the bundle's order."""

    def __init__(self, bundle: Bundle, threads: int | None = None, file: str = "front.onnx") -> None:
        self.bundle = bundle
        self.session = ort_session(str(bundle.file(file)), threads)
        self.input_name = self.session.get_inputs()[0].name

    def run_tensor(self, x: np.ndarray) -> list[np.ndarray]:
        return self.session.run(None, {self.input_name: x})

    def run(self, rgb: np.ndarray) -> tuple[list[np.ndarray], Letterbox, float]:
        x, info = letterbox(rgb, self.bundle.input_size)
        t0 = time.perf_counter()
        out = self.run_tensor(x)
        return out, info, (time.perf_counter() - t0) * 1e3

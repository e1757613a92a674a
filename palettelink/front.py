"""The edge half of a split network: the bundle's ONNX front run with onnxruntime."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from palettelink.bundle import Bundle
from palettelink.cpu import usable_cpus
from palettelink.errors import BundleError, InvalidRequest
from palettelink.image import Letterbox, letterbox

# Process-wide session defaults, set by the edge client and ``palettelink bench-edge`` before any
# session exists (encoders build their own sessions): intra-op threads, and whether idle threads spin.
_DEFAULTS: dict[str, int | bool | str | None] = {"threads": None, "spinning": None, "precision": None}

# The int8 variant of an edge graph (``palettelink int8`` writes it and records its measurement in
# the manifest's ``int8`` entry) is run by default only where its measured agreement reaches this...
INT8_MIN_AGREEMENT = 0.97
# ... and, where the record has it, it keeps this share of the fp32 configuration's AP50 against the
# uncompressed fp32 pipeline (``retained``): int8 may cost at most 1 % relative, the usual acceptance
# criterion for a quantised model (Intel Neural Compressor's default tolerable loss). Agreement alone
# is lenient: int8 boxes are scored against fp32's confident ones, so an int8 graph that finds the same
# objects at shifted scores agreed 0.999 and still cost the edge 0.011 AP50 (the p15 codec).
INT8_MIN_RETAINED = 0.99
PRECISIONS = ("auto", "fp32", "int8")


def set_session_defaults(threads: int | None = None, spinning: bool | None = None,
                         precision: str | None = None) -> None:
    """Defaults for sessions made after this call: ``threads`` intra-op threads (None: the CPUs this
    process may use, :func:`palettelink.cpu.usable_cpus`), ``spinning`` False stops idle threads
    busy-waiting (None: onnxruntime's default, on), ``precision`` of the edge graphs
    (:func:`choose_graph`; None: ``auto``)."""
    if precision is not None and precision not in PRECISIONS:
        raise InvalidRequest(f"precision must be one of {PRECISIONS}, got {precision!r}")
    _DEFAULTS["threads"], _DEFAULTS["spinning"], _DEFAULTS["precision"] = threads, spinning, precision


def session_defaults() -> dict[str, int | bool | str | None]:
    """The current defaults (``set_session_defaults(**session_defaults())`` restores them)."""
    return dict(_DEFAULTS)


@dataclass(frozen=True)
class GraphChoice:
    """Which file runs an edge graph, at which precision, and why."""

    file: str
    precision: str  # "fp32" or "int8"
    reason: str
    agreement: float | None = None  # the int8 variant's measured agreement, where recorded


def int8_entry(bundle: Bundle, graph: str) -> dict[str, Any] | None:
    """The manifest's record of ``graph``'s int8 variant (``int8: {graph: {file, agreement, ...}}``)."""
    entry = (bundle.manifest.get("int8") or {}).get(graph)
    return entry if isinstance(entry, dict) and entry.get("file") else None


def int8_passes(entry: dict[str, Any], threshold: float = INT8_MIN_AGREEMENT,
                min_retained: float | None = INT8_MIN_RETAINED) -> bool:
    """Whether an int8 record reaches the rule: agreement ≥ ``threshold`` and, with ``min_retained``
    and where the record has one, retained ≥ that. The defaults are the edge's rule (the build
    records its verdict as ``default``); :func:`choose_variant` applies it with each caller's bounds."""
    agreement, retained = _number(entry.get("agreement")), _number(entry.get("retained"))
    return (agreement is not None and agreement >= threshold
            and (min_retained is None or retained is None or retained >= min_retained))


def choose_graph(bundle: Bundle, graph: str, precision: str | None = None) -> GraphChoice:
    """The file to run for ``graph`` (``edge.onnx``, ``front.onnx``): ``fp32`` the graph itself;
    ``int8`` its int8 variant (BundleError where the bundle has none); ``auto`` (the default) the int8
    variant where the bundle has one that passes :func:`int8_passes`."""
    return choose_variant(bundle, graph, int8_entry(bundle, graph), precision, INT8_MIN_AGREEMENT,
                          f"make one with `palettelink int8 --bundle {bundle.name}`",
                          min_retained=INT8_MIN_RETAINED)


def _number(raw: object) -> float | None:
    return float(raw) if isinstance(raw, int | float) and not isinstance(raw, bool) else None


def choose_variant(bundle: Bundle, graph: str, entry: dict[str, Any] | None, precision: str | None,
                   threshold: float, how_to_make: str, need_default: bool = False,
                   min_retained: float | None = None) -> GraphChoice:
    """The one rule for every graph with a measured int8 variant (the edge's ``int8`` records, the
    server's ``serve.int8``): ``fp32``/``int8`` force (``int8`` where the bundle has none: BundleError
    saying ``how_to_make``); ``auto`` runs the variant where its recorded agreement is ≥ ``threshold``,
    with ``min_retained`` its recorded ``retained`` (where there is one) is ≥ that, and with
    ``need_default`` the build kept it as the default; else the graph itself."""
    precision = precision or str(_DEFAULTS["precision"] or "auto")
    if precision not in PRECISIONS:
        raise InvalidRequest(f"precision must be one of {PRECISIONS}, got {precision!r}")
    agreement = _number(entry.get("agreement")) if entry else None
    retained = _number(entry.get("retained")) if entry else None
    if precision == "fp32":
        return GraphChoice(graph, "fp32", "fp32 asked for", agreement)
    if entry is None or not bundle.has_file(str(entry["file"])):
        if precision == "int8":
            raise BundleError(f"bundle {bundle.id} has no int8 variant of {graph} ({how_to_make})")
        return GraphChoice(graph, "fp32", f"the bundle has no int8 {graph}")
    file = str(entry["file"])
    if precision == "int8":
        return GraphChoice(file, "int8", "int8 asked for", agreement)
    kept = entry.get("default") is True or not need_default
    if kept and int8_passes(entry, threshold, min_retained):
        why = f"int8: measured agreement {agreement:.3f} ≥ {threshold}"
        if min_retained is not None and retained is not None:
            why += f", AP50 retained {retained:.3f} ≥ {min_retained}"
        return GraphChoice(file, "int8", why, agreement)
    if agreement is None:
        why = "the int8 variant's measured agreement is not recorded"
    elif agreement < threshold:
        why = f"the int8 variant's measured agreement is {agreement:.3f} < {threshold}"
    elif kept:  # agreement enough, the AP50 it keeps not
        why = (f"the int8 variant keeps {retained:.3f} of fp32's AP50 against the uncompressed pipeline "
               f"(< {min_retained})")
    else:
        why = (f"the int8 variant's measured agreement is {agreement:.3f} (the build did not keep it as the "
               "default)")
    return GraphChoice(graph, "fp32", f"fp32: {why}", agreement)


def session_settings(threads: int | None = None) -> dict[str, object]:
    """What :func:`ort_session` configures, for benches and logs: intra-op threads (``threads``, else
    the default, else the usable CPUs: affinity and cgroup quota, not the machine's count, which
    onnxruntime would take), one inter-op thread with sequential execution (these graphs are one
    chain: a second pool only competes for the same cores), all graph optimisations, spinning."""
    n = threads or _DEFAULTS["threads"] or usable_cpus()
    return {"intra_op_threads": int(n), "inter_op_threads": 1, "execution_mode": "sequential",
            "graph_optimization": "all", "spinning": _DEFAULTS["spinning"]}


def session_options(threads: int | None = None, spinning: bool | None = None) -> ort.SessionOptions:
    """:class:`onnxruntime.SessionOptions` as :func:`session_settings` describes; ``spinning`` True or
    False overrides the process default for this session."""
    cfg = session_settings(threads)
    if spinning is not None:
        cfg["spinning"] = spinning
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(cfg["intra_op_threads"])  # type: ignore[call-overload]
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if cfg["spinning"] is not None:
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if cfg["spinning"] else "0")
    so.log_severity_level = 3
    return so


def ort_session(path: str, threads: int | None = None, spinning: bool | None = None,
                cuda: bool = True) -> ort.InferenceSession:
    """CPU session (CUDA first where the installed onnxruntime has it and ``cuda``) with
    :func:`session_options`."""
    wanted = ("CUDAExecutionProvider", "CPUExecutionProvider") if cuda else ("CPUExecutionProvider",)
    providers = [p for p in wanted if p in ort.get_available_providers()]
    return ort.InferenceSession(path, session_options(threads, spinning), providers=providers)


class Front:
    """Image → the tensors that cross the split, in the bundle's order."""

    def __init__(self, bundle: Bundle, threads: int | None = None, file: str = "front.onnx",
                 precision: str | None = None) -> None:
        self.bundle = bundle
        self.graph = choose_graph(bundle, file, precision)
        self.session = ort_session(str(bundle.file(self.graph.file)), threads)
        self.input_name = self.session.get_inputs()[0].name

    def run_tensor(self, x: np.ndarray) -> list[np.ndarray]:
        return self.session.run(None, {self.input_name: x})

    def run(self, rgb: np.ndarray) -> tuple[list[np.ndarray], Letterbox, float]:
        x, info = letterbox(rgb, self.bundle.input_size)
        t0 = time.perf_counter()
        out = self.run_tensor(x)
        return out, info, (time.perf_counter() - t0) * 1e3

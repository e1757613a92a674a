"""Split any ONNX graph in two: the front (edge) ends at named cut tensors; every tensor the rest of
the graph reads from the front crosses, skips included.

The graph is data, as ultralytics' layer list is: a node belongs to the front when a cut tensor
depends on it; the crossing tensors are the front's outputs that tail nodes read. Both halves are cut
out with ``onnx.utils.extract_model`` (no model-specific code) and checked: front + tail == whole on
sample inputs. ``cut="auto"`` picks the point "after the backbone": of the cuts in the second half of
the graph (by node order), the one whose crossing tensors hold the fewest floats.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from palettelink.errors import BundleError

AUTO = "auto"


@dataclass(frozen=True)
class Crossing:
    name: str
    shape: tuple[int, ...]  # without the batch axis

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))


@dataclass(frozen=True)
class SplitPlan:
    cut: tuple[str, ...]
    crossing: tuple[Crossing, ...]
    input_name: str
    outputs: tuple[str, ...]
    front_nodes: int
    tail_nodes: int

    @property
    def floats(self) -> int:
        return sum(c.size for c in self.crossing)


def _load(model: str | Path | Any) -> Any:
    import onnx

    m = onnx.load(str(model)) if isinstance(model, str | Path) else model
    return onnx.shape_inference.infer_shapes(m)


def _shapes(m: Any) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for vi in [*m.graph.value_info, *m.graph.input, *m.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            out[vi.name] = tuple(int(d.dim_value) for d in dims)
    return out


def _producers(m: Any) -> dict[str, int]:
    return {o: i for i, n in enumerate(m.graph.node) for o in n.output if o}


def _inputs_of(m: Any) -> list[str]:
    inits = {t.name for t in m.graph.initializer}
    return [i.name for i in m.graph.input if i.name not in inits]


def candidate_tensors(model: str | Path | Any, limit: int = 40) -> list[str]:
    """Names of 4-D activations, in node order (what an error message offers as cut points)."""
    m = _load(model)
    shapes = _shapes(m)
    names = [o for n in m.graph.node for o in n.output if len(shapes.get(o, ())) == 4]
    if len(names) <= limit:
        return names
    step = len(names) / limit
    return [names[int(i * step)] for i in range(limit)]


def _plan(m: Any, cut: Sequence[str]) -> SplitPlan:
    prod = _producers(m)
    shapes = _shapes(m)
    inputs = _inputs_of(m)
    if len(inputs) != 1:
        raise BundleError(f"the model has {len(inputs)} inputs {inputs}; a split model takes one image")
    missing = [c for c in cut if c not in prod]
    if missing:
        raise BundleError(f"cut tensor(s) {missing} are not produced by any node of the model; "
                          f"candidates: {', '.join(candidate_tensors(m, 25))}")
    front = _front_of(m, cut)
    front_out = {o for i in front for o in m.graph.node[i].output}
    graph_outs = [o.name for o in m.graph.output]
    crossing: list[str] = []
    for i, node in enumerate(m.graph.node):
        if i in front:
            continue
        for t in node.input:
            if t in inputs:
                raise BundleError(f"tail node {node.name or node.op_type} reads the model input {t!r}: "
                                  "cut later, so the tail needs only what the front makes")
            if t in front_out and t not in crossing:
                crossing.append(t)
    crossing.extend(o for o in graph_outs if o in front_out and o not in crossing)
    crossing.sort(key=lambda t: prod[t])
    bad = [t for t in crossing if len(shapes.get(t, ())) < 2]
    if bad:
        raise BundleError(f"crossing tensor(s) {bad} have no static shape; export with a fixed input size")
    return SplitPlan(tuple(cut), tuple(Crossing(t, shapes[t][1:]) for t in crossing), inputs[0],
                     tuple(graph_outs), len(front), len(m.graph.node) - len(front))


def _absorb(m: Any, front: set[int], shapes: dict[str, tuple[int, ...]], min_tail_convs: int) -> set[int]:
    """Grow ``front`` by tail nodes that read only the front and make the crossing smaller (a lateral
    1×1 conv after a backbone stage: its narrower output crosses instead of the stage's), greedily,
    while the crossing shrinks and the tail keeps at least ``min_tail_convs`` convolutions (else the
    whole head would move to the edge: its outputs are the smallest tensors of all)."""
    nodes = m.graph.node
    tail_convs = sum(1 for i, n in enumerate(nodes) if i not in front and n.op_type == "Conv")
    prod = _producers(m)
    consumers: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
        for t in n.input:
            consumers.setdefault(t, []).append(i)
    outs = {o.name for o in m.graph.output}

    def size(t: str) -> int:
        return int(np.prod(shapes[t][1:])) if len(shapes.get(t, ())) >= 2 else 1 << 40

    front = set(front)
    while True:
        best, best_delta = -1, 0
        for i, n in enumerate(nodes):
            if i in front or any(t in prod and prod[t] not in front for t in n.input):
                continue
            if n.op_type == "Conv" and tail_convs <= min_tail_convs:
                continue
            grown = front | {i}
            gain = sum(size(t) for t in set(n.input) if t in prod and t not in outs
                       and all(c in grown for c in consumers.get(t, [])))
            cost = sum(size(t) for t in n.output if t and (t in outs or any(c not in grown for c in
                                                                            consumers.get(t, []))))
            if cost - gain < best_delta:
                best, best_delta = i, cost - gain
        if best < 0:
            return front
        front.add(best)
        tail_convs -= nodes[best].op_type == "Conv"


def _front_of(m: Any, cut: Sequence[str]) -> set[int]:
    prod = _producers(m)
    front: set[int] = set()
    stack = [prod[c] for c in cut]
    while stack:
        i = stack.pop()
        if i not in front:
            front.add(i)
            stack.extend(prod[t] for t in m.graph.node[i].input if t in prod)
    return front


def _crossing_of(m: Any, front: set[int]) -> list[str]:
    prod = _producers(m)
    out = []
    for i, n in enumerate(m.graph.node):
        if i not in front:
            out.extend(t for t in n.input if t in prod and prod[t] in front and t not in out)
    out.extend(o.name for o in m.graph.output
               if o.name in prod and prod[o.name] in front and o.name not in out)
    return sorted(out, key=lambda t: prod[t])


def plan_split(model: str | Path | Any, cut: Sequence[str] | str = AUTO, lo: float = 0.3,
               hi: float = 0.95, starts: int = 24, tail_share: float = 0.15) -> SplitPlan:
    """The split at ``cut`` (tensor names), or with ``"auto"`` the cheapest cut "after the backbone":
    prefix cuts of the (topological) node order between ``lo`` and ``hi``, each as it is and grown by
    :func:`_absorb` (laterals move to the edge when that shrinks what crosses), and the one whose
    crossing tensors hold the fewest floats wins, among cuts that leave ``tail_share`` of the
    convolutions on the server."""
    m = _load(model)
    if cut != AUTO:
        return _plan(m, [cut] if isinstance(cut, str) else list(cut))
    shapes = _shapes(m)
    n = len(m.graph.node)
    convs = [i for i, node in enumerate(m.graph.node) if node.op_type == "Conv"]
    min_tail = max(1, int(round(tail_share * len(convs))))
    best: SplitPlan | None = None
    grown = {int(v) for v in np.linspace(n * lo, n * hi, starts)}
    for k in range(int(n * lo), int(n * hi) + 1):
        if sum(1 for i in convs if i >= k) < min_tail:
            continue
        fronts = [set(range(k))] + ([_absorb(m, set(range(k)), shapes, min_tail)] if k in grown else [])
        for front in fronts:
            names = _crossing_of(m, front)
            if not names or len(front) >= n:
                continue
            try:
                p = _plan(m, names)
            except BundleError:
                continue
            if p.tail_nodes and (best is None or p.floats < best.floats):
                best = p
    if best is None:
        raise BundleError("found no cut with static shapes; name one with --cut; candidates: "
                          + ", ".join(candidate_tensors(m, 25)))
    return best


def split_model(model: str | Path, plan: SplitPlan, front_path: Path, tail_path: Path) -> None:
    """Write front.onnx (input → crossing tensors) and tail.onnx (crossing → the model's outputs)."""
    import onnx
    from onnx.utils import extract_model

    names = [c.name for c in plan.crossing]
    with tempfile.TemporaryDirectory() as td:  # extract_model wants a file with inferred shapes
        src = Path(td) / "inferred.onnx"
        onnx.save(_load(model), str(src))
        extract_model(str(src), str(front_path), [plan.input_name], names)
        extract_model(str(src), str(tail_path), names, list(plan.outputs))


def verify_split(model: str | Path, front_path: Path, tail_path: Path, inputs: Sequence[np.ndarray],
                 rtol: float = 1e-5) -> float:
    """Max difference between whole(x) and tail(front(x)) over ``inputs``, relative to each output's
    largest magnitude (box outputs are in pixels, scores in [0, 1]; onnxruntime fuses kernels across
    what is now the boundary differently, so float32 sums differ in their last bits); BundleError
    above ``rtol``."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    whole, front, tail = (ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"])
                          for p in (model, front_path, tail_path))
    worst = 0.0
    for x in inputs:
        feeds = {whole.get_inputs()[0].name: x}
        ref = whole.run(None, feeds)
        cross = front.run(None, {front.get_inputs()[0].name: x})
        got = tail.run(None, {i.name: t for i, t in zip(tail.get_inputs(), cross, strict=True)})
        for a, b in zip(ref, got, strict=True):
            if not np.size(a):
                continue
            a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
            scale = max(1.0, float(np.max(np.abs(a64))))
            worst = max(worst, float(np.max(np.abs(a64 - b64))) / scale)
    if worst > rtol:
        raise BundleError(f"front + tail differ from the whole model by {worst:.3g} of the output's "
                          f"magnitude (> {rtol:g})")
    return worst


def with_image_input(model: str | Path | Any, size: int, layout: str = "nchw", scale: float = 1.0,
                     name: str = "images") -> Any:
    """``model`` behind an input adapter taking the bundle's ``images`` [1,3,S,S] in [0, 1] (what
    every front gets from the edge's letterbox): × ``scale``, then NCHW → NHWC when ``layout`` is
    "nhwc". The model's own input must be static [1,S,S,3] / [1,3,S,S]."""
    import onnx
    from onnx import TensorProto, helper

    m = onnx.load(str(model)) if isinstance(model, str | Path) else model
    (orig,) = _inputs_of(m)
    if layout not in ("nchw", "nhwc"):
        raise BundleError(f"layout must be nchw or nhwc, not {layout!r}")
    nodes, cur = [], name
    if scale != 1.0:
        const = helper.make_tensor("images_scale", TensorProto.FLOAT, [], [float(scale)])
        m.graph.initializer.append(const)
        nodes.append(helper.make_node("Mul", [cur, "images_scale"], ["images_scaled"]))
        cur = "images_scaled"
    if layout == "nhwc":
        nodes.append(helper.make_node("Transpose", [cur], ["images_nhwc"], perm=[0, 2, 3, 1]))
        cur = "images_nhwc"
    nodes.append(helper.make_node("Identity", [cur], [orig]))
    keep = [i for i in m.graph.input if i.name != orig]
    del m.graph.input[:]
    m.graph.input.extend([helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 3, size, size]), *keep])
    old = list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend([*nodes, *old])
    onnx.checker.check_model(m)
    return m

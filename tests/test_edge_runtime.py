"""How the edge sets up its ONNX sessions (issue 17): threads from the CPUs the process may really use
(affinity, cgroup quota), one inter-op thread, every graph optimisation; and which graph it runs: the
bundle's int8 variant where its recorded agreement with fp32 is ≥ 0.97, else fp32 (``--precision``
overrides). Behaviour only: the speed itself is a benchmark (``palettelink bench-edge``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from palettelink import cpu, front
from palettelink.bundle import MANIFEST, Bundle
from palettelink.errors import BundleError, InvalidRequest

# -- CPUs ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, want", [("200000 100000", 2.0), ("150000 100000", 1.5), ("max 100000", None),
                                        ("junk", None)])
def test_cgroup_v2_quota(tmp_path: Path, text: str, want: float | None) -> None:
    (tmp_path / "cpu.max").write_text(text + "\n")
    assert cpu.cgroup_cpu_limit(tmp_path) == want


def test_cgroup_v1_quota(tmp_path: Path) -> None:
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu.cgroup_cpu_limit(tmp_path) == 3.0
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")  # no quota
    assert cpu.cgroup_cpu_limit(tmp_path) is None


def test_no_cgroup_files_means_no_limit(tmp_path: Path) -> None:
    assert cpu.cgroup_cpu_limit(tmp_path) is None


def test_usable_cpus_is_the_smaller_of_affinity_and_quota(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu, "affinity_cpus", lambda: 8)
    assert cpu.usable_cpus(tmp_path) == 8  # no quota
    (tmp_path / "cpu.max").write_text("150000 100000")
    assert cpu.usable_cpus(tmp_path) == 2  # 1.5 CPUs of time: two threads, not eight
    (tmp_path / "cpu.max").write_text("50000 100000")
    assert cpu.usable_cpus(tmp_path) == 1
    monkeypatch.setattr(cpu, "affinity_cpus", lambda: 1)
    (tmp_path / "cpu.max").write_text("400000 100000")
    assert cpu.usable_cpus(tmp_path) == 1  # pinned to one CPU


def test_describe_names_the_cpu() -> None:
    d = cpu.describe()
    assert d["cpu"] and d["usable_cpus"] >= 1 and d["affinity_cpus"] >= d["usable_cpus"]


# -- session options -------------------------------------------------------------------------------


@pytest.fixture()
def defaults():  # noqa: ANN201 - restores the process-wide session defaults
    yield
    front.set_session_defaults()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "tiny", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    onnx.save(model, str(path))
    return path


def test_sessions_take_threads_from_the_usable_cpus(tiny_model: Path, defaults: None,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(front, "usable_cpus", lambda: 3)
    front.set_session_defaults()
    cfg = front.session_settings()
    assert cfg["intra_op_threads"] == 3 and cfg["inter_op_threads"] == 1
    assert cfg["graph_optimization"] == "all" and cfg["execution_mode"] == "sequential"
    so = front.ort_session(str(tiny_model)).get_session_options()
    assert so.intra_op_num_threads == 3 and so.inter_op_num_threads == 1
    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert so.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL


def test_explicit_threads_and_spinning_win(tiny_model: Path, defaults: None) -> None:
    front.set_session_defaults(threads=2, spinning=False)
    assert front.session_settings()["intra_op_threads"] == 2
    assert front.session_settings(5)["intra_op_threads"] == 5
    so = front.session_options()
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    sess = front.ort_session(str(tiny_model), threads=1)
    assert sess.get_session_options().intra_op_num_threads == 1
    out = sess.run(None, {"x": np.array([[-1, 2, -3, 4]], np.float32)})[0]
    assert out.tolist() == [[0, 2, 0, 4]]


def test_unknown_precision_is_refused(defaults: None) -> None:
    with pytest.raises(InvalidRequest):
        front.set_session_defaults(precision="fp16")


# -- the int8 rule ---------------------------------------------------------------------------------


def _bundle(tmp_path: Path, int8: dict | None, edge_side: bool = True) -> Bundle:
    files = {"edge.onnx": "0" * 64, "edge.int8.onnx": "1" * 64}
    m = {"name": "b", "version": "1", "split": {"tensors": []}, "table_hash": "00" * 32, "files": files,
         "sides": {"edge": ["edge.onnx", *(["edge.int8.onnx"] if edge_side else [])]}}
    if int8 is not None:
        m["int8"] = {"edge.onnx": int8}
    return Bundle(tmp_path, m, side="edge")


@pytest.mark.parametrize("entry, precision, file, why", [
    (None, None, "edge.onnx", "no int8"),
    ({"file": "edge.int8.onnx", "agreement": 0.985}, None, "edge.int8.onnx", "≥ 0.97"),
    ({"file": "edge.int8.onnx", "agreement": 0.97}, "auto", "edge.int8.onnx", "≥ 0.97"),
    ({"file": "edge.int8.onnx", "agreement": 0.9699}, None, "edge.onnx", "0.970 < 0.97"),
    ({"file": "edge.int8.onnx"}, None, "edge.onnx", "not recorded"),
    # agreeing with fp32 is not enough where int8 costs over 1 % of the AP50 against the uncompressed
    # pipeline (the p15 codec's int8 edge graph: agreement 0.9986, retained 0.988)
    ({"file": "edge.int8.onnx", "agreement": 0.9986, "retained": 0.988}, None, "edge.onnx",
     "0.988 of fp32's"),
    ({"file": "edge.int8.onnx", "agreement": 0.9986, "retained": 0.99}, None, "edge.int8.onnx", "≥ 0.97"),
    ({"file": "edge.int8.onnx", "agreement": 0.9986, "retained": 0.988}, "int8", "edge.int8.onnx",
     "int8 asked"),
    ({"file": "edge.int8.onnx", "agreement": 0.99}, "fp32", "edge.onnx", "fp32 asked for"),
    ({"file": "edge.int8.onnx", "agreement": 0.90}, "int8", "edge.int8.onnx", "int8 asked for"),
])
def test_int8_selection_rule(tmp_path: Path, entry: dict | None, precision: str | None, file: str,
                             why: str) -> None:
    choice = front.choose_graph(_bundle(tmp_path, entry), "edge.onnx", precision)
    assert choice.file == file and why in choice.reason
    assert choice.precision == ("int8" if file.endswith(".int8.onnx") else "fp32")


def test_int8_asked_for_but_absent_is_a_bundle_error(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="palettelink int8"):
        front.choose_graph(_bundle(tmp_path, None), "edge.onnx", "int8")


def test_int8_file_outside_the_edge_part_is_not_used(tmp_path: Path) -> None:
    b = _bundle(tmp_path, {"file": "edge.int8.onnx", "agreement": 0.99}, edge_side=False)
    assert front.choose_graph(b, "edge.onnx").file == "edge.onnx"


def test_the_process_default_precision_applies(tmp_path: Path, defaults: None) -> None:
    b = _bundle(tmp_path, {"file": "edge.int8.onnx", "agreement": 0.99})
    front.set_session_defaults(precision="fp32")
    assert front.choose_graph(b, "edge.onnx").file == "edge.onnx"


def test_recorded_int8_graph_is_what_the_encoder_runs(bundle, tmp_path: Path, defaults: None) -> None:  # noqa: ANN001
    """``palettelink int8``'s record step (the graph here is a copy of the fp32 one: the rule reads
    the manifest): the manifest still verifies, the table hash (every stream) is unchanged, the file
    is on the edge side, and the palette encoder runs it by default."""
    from palettelink.codecs import make_encoder
    from palettelink.train.int8_edge import record

    copy = tmp_path / bundle.name / bundle.version
    shutil.copytree(bundle.path, copy)
    shutil.copyfile(copy / "edge.onnx", copy / "edge.int8.onnx")
    m = record(copy, "edge.onnx", "edge.int8.onnx", {"agreement": 0.981, "ap50_fp32": 0.9})
    assert m["table_hash"] == bundle.table_hash_hex
    assert "edge.int8.onnx" in m["sides"]["edge"] and "edge.int8.onnx" in m["codecs"]["palette"]["edge_files"]
    loaded = Bundle.load(copy, side="edge")
    enc = make_encoder(loaded, "palette")
    assert enc.graph.file == "edge.int8.onnx" and enc.graph.agreement == pytest.approx(0.981)
    front.set_session_defaults(precision="fp32")
    assert make_encoder(loaded, "palette").graph.file == "edge.onnx"
    # an edit of the recorded agreement is refused like any manifest edit
    raw = json.loads((copy / MANIFEST).read_text())
    raw["int8"]["edge.onnx"]["agreement"] = 0.999
    (copy / MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="edited"):
        Bundle.load(copy)


def test_palettelink_int8_quantises_measures_and_records(bundle, tmp_path: Path, capsys,  # noqa: ANN001
                                                         defaults: None) -> None:
    """The whole command, small: 2 calibration images, 2 held-out frames. It writes the int8 graph
    beside edge.onnx, records its measurement, and the edge's choice follows the recorded rule."""
    from palettelink.cli import main
    from palettelink.codecs import Decoder, make_encoder
    from palettelink.train import data

    if not data.training_images() or not data.eval_images():
        pytest.skip("no training images or held-out frames on this machine (opencv-doc, corpus)")
    root = tmp_path / "bundles"
    shutil.copytree(bundle.path, root / bundle.name / bundle.version)
    out = tmp_path / "int8.json"
    rc = main(["int8", "--bundles", str(root), "--frames", "2", "--calibration", "2", "--threads", "1",
               "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "agreement" in text and ("≥ 0.97" in text or "< 0.97" in text), text
    assert "recorded edge.int8.onnx" in text, text
    rec = json.loads(out.read_text())
    assert rec["graph"] == "edge.onnx" and rec["frames"] == 2 and rec["calibration_images"] == 2
    assert 0 <= rec["agreement"] <= 1 and rec["level"] == make_encoder(bundle, "palette").default_level()
    assert rec["canvas"] == "window"  # measured on what the edge codes for a server that decodes windows
    assert rec["default"] == front.int8_passes(rec) and rec["min_retained"] == front.INT8_MIN_RETAINED
    if rec["retained"] is not None:  # None where the fp32 configuration found nothing on these frames
        assert f"retained {rec['retained']}" in text, text
        lo, hi = rec["int8_minus_fp32_ci95"]  # int8's cost, paired over the frames, holds the point figure
        assert lo <= round(rec["ap50_int8"] - rec["ap50_fp32"], 4) <= hi
        assert rec["ap50_int8_ci95"][0] <= rec["ap50_int8"] <= rec["ap50_int8_ci95"][1]
    loaded = Bundle.load(root / bundle.name / bundle.version)  # every hash still verifies
    assert loaded.table_hash_hex == bundle.table_hash_hex and loaded.has_file("edge.int8.onnx")
    entry = loaded.manifest["int8"]["edge.onnx"]
    assert entry["file"] == "edge.int8.onnx" and entry["agreement"] == rec["agreement"]
    want = "edge.int8.onnx" if rec["default"] else "edge.onnx"
    assert make_encoder(loaded, "palette").graph.file == want
    # the high-resolution convolutions (YOLOv8's first three layers, stride 2 and 4) and the codec's
    # encoder (its rounding would become other codes) stay fp32; the rest of the front is int8
    quantised = _conv_weights_quantised(loaded.file("edge.int8.onnx"))
    fp32_convs = [n for n, q in quantised.items() if not q]
    fine = ("/front_layers.0/", "/front_layers.1/", "/front_layers.2/")
    assert rec["fp32_convolutions"] == len(fp32_convs) == 6 + 6, fp32_convs
    assert all(n.startswith((*fine, "/enc/")) for n in fp32_convs)
    assert sum(quantised.values()) == len(quantised) - 12 > 0
    front.set_session_defaults(precision="int8")
    enc = make_encoder(loaded, "palette")  # and the int8 graph codes a frame the server decodes
    assert enc.graph.precision == "int8"
    rgb = np.full((120, 160, 3), 90, np.uint8)
    payload = enc.encode(rgb).payload
    assert Decoder(loaded).decode(payload).tensors


def _conv_weights_quantised(path: Path) -> dict[str, bool]:
    """Each Conv node of the ONNX graph at ``path``: whether its weights come through a
    DequantizeLinear (int8) rather than straight from an fp32 initializer."""
    import onnx

    graph = onnx.load(str(path)).graph
    made_by = {o: n.op_type for n in graph.node for o in n.output}
    return {n.name: made_by.get(n.input[1]) == "DequantizeLinear" for n in graph.node if n.op_type == "Conv"}


def test_fine_convolutions_are_the_layers_at_stride_four_or_finer(bundle) -> None:  # noqa: ANN001
    """The quantiser keeps fp32 what runs at a quarter of the input's side or finer: YOLOv8n's stem
    (stride 2), its second conv (stride 4) and the C2f block at stride 4; the stride-8 conv after them
    and everything deeper is quantised."""
    import onnx

    from palettelink.train.onnx_int8 import fine_convolutions

    graph = onnx.load(str(bundle.file("front.onnx"))).graph
    fine = fine_convolutions(graph, 4)
    assert fine[:2] == ["/layers.0/conv/Conv", "/layers.1/conv/Conv"] and len(fine) == 6
    assert all(n.startswith("/layers.2/") for n in fine[2:])
    assert "/layers.3/conv/Conv" in fine_convolutions(graph, 8)
    assert fine_convolutions(graph, 1) == []


def test_build_bundles_edge_int8_step_keeps_only_what_reaches_the_rule(bundle, tmp_path: Path,  # noqa: ANN001
                                                                       defaults: None) -> None:
    """build-bundle's edge step, small (2 calibration images, 3 held-out frames), on a copy: each edge
    graph is measured; one reaching the rule (agreement 0.97, retained 0.99) is written and recorded
    (and is what the edge runs), one below is removed, so a bundle never carries an int8 graph its
    edge would not run."""
    from palettelink.train import data
    from palettelink.train.int8_edge import build

    if not data.training_images() or not data.eval_images():
        pytest.skip("no training images or held-out frames on this machine (opencv-doc, corpus)")
    copy = tmp_path / bundle.name / bundle.version
    shutil.copytree(bundle.path, copy)
    lines: list[str] = []
    made = build(copy, calibration=2, frames=3, threads=1, log=lines.append)
    assert set(made) == {"edge.onnx", "front.onnx"}, lines
    loaded = Bundle.load(copy)  # every hash verifies after the step rewrote the manifest
    assert loaded.table_hash_hex == bundle.table_hash_hex
    for graph, entry in made.items():
        file = graph.replace(".onnx", ".int8.onnx")
        assert entry["frames"] == 3 and entry["default"] == front.int8_passes(entry)
        assert (copy / file).is_file() == entry["default"] == (graph in loaded.manifest.get("int8", {}))
        assert front.choose_graph(loaded, graph).file == (file if entry["default"] else graph)
        assert any(graph in line and ("kept" in line or "dropped" in line) for line in lines), lines

"""``palettelink bench`` and ``palettelink info`` on the real bundle (one image, few rate points)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from palettelink.bench import methods
from palettelink.bench.methods import Context, Item, Output
from palettelink.bench.run import sample_images
from palettelink.cli import main
from palettelink.errors import InvalidRequest


def test_sample_images_are_found() -> None:
    assert {p.name for p in sample_images()} >= {"bus.jpg", "zidane.jpg"}


def test_bench_table_json_and_plot(bundles_root: Path, images: list[Path], tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench"
    rc = main(["bench", "--bundles", str(bundles_root), "--no-samples", "--images", str(images[0]),
               "--bits", "8,2", "--qualities", "50", "--out", str(out), "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "AP50:95" in printed and "baseline" in printed and "jpeg" in printed
    report = json.loads((out / "bench.json").read_text())
    assert (out / "rate_accuracy.png").stat().st_size > 10_000
    rows = {(r["method"], r["label"]): r for r in report["rows"]}
    assert "baseline" in report["bd_rate_ap50_vs_jpeg_percent"]  # None here: one JPEG point only
    assert set(rows) == {("bypass", "f32"), ("baseline", "8b"), ("baseline", "2b"), ("jpeg", "q50")}
    assert report["images"][0]["name"] == str(images[0]) and report["reference_boxes"] >= 3
    w, h = report["images"][0]["width"], report["images"][0]["height"]
    for r in rows.values():
        assert r["bpp"] == pytest.approx(8 * r["bytes_mean"] / (w * h))
        assert 0 <= r["ap50_95"] <= r["ap50"] <= 1
        lo, hi = r["ap50_ci95"]  # one picture: every resample is that picture, so no width
        assert lo == hi == pytest.approx(r["ap50"])
    # Uncompressed split features agree with the unsplit reference; 8 bits nearly so.
    assert rows[("bypass", "f32")]["ap50"] == 1.0
    assert rows[("baseline", "8b")]["ap50"] >= 0.95
    assert rows[("baseline", "2b")]["bpp"] < rows[("baseline", "8b")]["bpp"] < rows[("bypass", "f32")]["bpp"]
    # What a deployment sees at its threshold: the bypass row agrees box for box, class for class.
    bypass = rows[("bypass", "f32")]
    assert bypass["f1"] == 1.0 and bypass["class_flips"] == 0 and bypass["missed"] == 0
    assert sum(bypass["n_by_size"].values()) == report["reference_boxes"]
    assert "size bucket" in printed and "flips" in printed
    # The float pipeline is the reference unless asked otherwise, and the report names the graphs run.
    assert report["precision"] == "fp32" and report["edge_graphs"]["front.onnx"]["file"] == "front.onnx"
    md = (out / "bench.md").read_text()
    assert md.startswith("Edge graphs (--precision fp32): front.onnx → front.onnx")
    assert "| bypass | f32 |" in md and "AP50 95 % interval" in md


def test_a_new_method_is_one_registration(bundle, detector, images: list[Path],  # noqa: ANN001
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A row plugs in through the registry: here a 'downscale' image method next to the baseline."""
    import cv2

    from palettelink.bench.run import Runner
    from palettelink.front import Front
    from palettelink.image import load_image

    class Downscale:
        name, kind = "half", "image"

        def __init__(self, ctx: Context) -> None:
            self.ctx = ctx

        def points(self) -> list[int]:
            return [2]

        def label(self, point: int) -> str:
            return f"/{point}"

        def run(self, item: Item, point: int) -> Output:
            h, w = item.rgb.shape[:2]
            small = cv2.resize(item.rgb, (w // point, h // point), interpolation=cv2.INTER_AREA)
            return Output(small.nbytes, rgb=cv2.resize(small, (w, h)))

    monkeypatch.setitem(methods.METHODS, "half", Downscale)
    front = Front(bundle)
    ctx = Context(bundle, front, {"baseline_levels": [6]})
    runner = Runner(bundle, [methods.make_method("half", ctx), methods.make_method("baseline", ctx)],
                    0.25, 0.001, front, detector)
    runner.add_image("bus", load_image(images[0]))
    rows = {r["method"]: r for r in runner.summary()}
    assert rows["half"]["bytes_mean"] == np.prod(load_image(images[0]).shape) // 4
    assert rows["baseline"]["label"] == "6b" and rows["baseline"]["ap50"] >= 0.9


def test_unknown_method_and_missing_codec_are_clear(bundles_root: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from palettelink.train.build_bundle import build_bundle

    assert main(["bench", "--bundles", str(bundles_root), "--anchors", "gif", "--no-progress"]) == 2
    assert "unknown method" in capsys.readouterr().err
    build_bundle(out_root=tmp_path, codec_assets=tmp_path / "no-assets")  # a baseline-only bundle
    assert main(["bench", "--bundles", str(tmp_path), "--codec", "palette", "--no-progress"]) == 2
    assert "has no 'palette' codec" in capsys.readouterr().err


def test_info_lists_bundles_without_torch(bundles_root: Path, tmp_path: Path) -> None:
    code = ("import sys\nsys.argv = ['palettelink', 'info', '--json', '--bundles', sys.argv[1]]\n"
            "from palettelink.cli import main\nrc = main()\n"
            "assert not [m for m in sys.modules if m.split('.')[0] == 'torch'], 'info imported torch'\n"
            "sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, str(bundles_root)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    (b,) = doc["bundles"]
    assert b["id"] == "fall-yolov8/1" and "baseline" in b["codecs"]
    assert [lv["level"] for lv in b["codecs"]["baseline"]["levels"]] == list(range(2, 9))
    assert [t["shape"] for t in b["tensors"]] == [[128, 80, 80], [256, 40, 40], [512, 20, 20]]
    text = subprocess.run([sys.executable, "-m", "palettelink.cli", "info", "--bundles", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert text.returncode == 0 and "palettelink build-bundle" in text.stdout


def test_codec_levels_merge_per_level_numbers(bundle) -> None:  # noqa: ANN001
    from palettelink.bundle import Bundle
    from palettelink.levels import codec_levels

    m = json.loads(json.dumps(bundle.manifest))
    m["codecs"]["palette"] = {"levels": [0, {"level": 1, "mean_bpp": 0.05}], "level_sizes": [64, 8],
                              "mean_bits": {"1": 12.5}}
    got = codec_levels(Bundle(bundle.path, m), "palette")
    assert got == [{"level": 0, "palette_size": 64},
                   {"level": 1, "mean_bpp": 0.05, "palette_size": 8, "mean_bits": 12.5}]
    assert [lv["level"] for lv in codec_levels(bundle, "baseline")] == list(range(2, 9))


def test_server_precision_auto_runs_the_servers_own_graphs(bundles_root: Path, images: list[Path],
                                                           tmp_path: Path) -> None:
    """``--server-precision auto`` decodes and detects as the server does (its onnxruntime tail and its
    palette decoder at the precision the bundle's manifest chooses) and names the files in the report;
    the default, fp32, is the float pipeline (the torch tail). On a bundle without server int8 graphs
    the two are the same network in two runtimes, so they score alike."""
    from palettelink.bundle import find_bundle
    from palettelink.models.ultra_ort import choose_server_graph

    reports = {}
    for precision in ("fp32", "auto"):
        out = tmp_path / precision
        rc = main(["bench", "--bundles", str(bundles_root), "--no-samples", "--images", str(images[0]),
                   "--no-bypass", "--codec", "palette", "--levels", "1", "--anchors", "",
                   "--canvas", "window", "--server-precision", precision, "--out", str(out), "--no-progress"])
        assert rc == 0
        reports[precision] = json.loads((out / "bench.json").read_text())
        assert reports[precision]["server_precision"] == precision
        assert f"Server graphs (--server-precision {precision})" in (out / "bench.md").read_text()
    bundle = find_bundle("fall-yolov8", bundles_root)
    fp32, auto = reports["fp32"]["server_graphs"], reports["auto"]["server_graphs"]
    assert fp32["tail"]["file"] == "torch" and fp32["palette decoder"]["precision"] == "fp32"
    assert auto["tail"]["file"] == choose_server_graph(bundle, "tail.onnx").file
    assert auto["palette decoder"]["file"] == choose_server_graph(bundle, "decoder.onnx").file
    (a,), (b,) = reports["fp32"]["rows"], reports["auto"]["rows"]
    assert a["bytes_mean"] == b["bytes_mean"]  # the same stream, decoded on two paths
    assert abs(a["ap50"] - b["ap50"]) <= 0.05


def test_server_precision_is_checked() -> None:
    from palettelink.bench.run import server_tail

    with pytest.raises(InvalidRequest, match="server precision"):
        server_tail(None, "int4")  # type: ignore[arg-type]

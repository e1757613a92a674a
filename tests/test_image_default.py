"""Issue 16: the image bundle defaults to the AVIF codec because the palette image codec measured
worse on the image codec's leave-source-out set, and the committed measurement says so.

Through the real parts: the bundle built by ``build-bundle --image``, the real server (gRPC for the
edge client, HTTP for the dashboard's Try it), the real ``palettelink-edge`` and ``bench-tasks``. The
README's table is generated from the committed JSON (``bench-tasks --render``) and must match it; the
default codec must be the one that measurement's verdict names.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from palettelink import codecs
from palettelink.bench import heldout, tasks_report
from palettelink.bundle import Bundle
from palettelink.codecs import avif
from tests.helpers import env, script

pytestmark = pytest.mark.skipif(not avif.supported(), reason="this Pillow has no AVIF support")

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results" / "tasks-lso"


def _committed() -> dict[str, Any]:
    return json.loads((RESULTS / "bench-tasks.json").read_text())


def test_the_image_bundle_defaults_to_avif_and_still_offers_palette(image_bundle: Bundle,
                                                                     bundle: Bundle) -> None:
    offered = codecs.available(image_bundle)
    assert offered[0] == "avif" == codecs.default_codec(image_bundle) and "palette" in offered
    assert codecs.make_encoder(image_bundle).codec == "avif"
    assert codecs.make_encoder(image_bundle, "palette").codec == "palette"
    assert codecs.default_codec(bundle) == "palette"  # a split detector's default is unchanged


def test_the_default_is_what_the_committed_measurement_decided(image_bundle: Bundle) -> None:
    report = _committed()
    v = tasks_report.verdict(report)
    assert v["default"] == codecs.default_codec(image_bundle)
    # the evidence behind it: leave-source-out, at least 4 sources, 200 boxes, 20 people, 10 faces
    assert report["set"].startswith("leave-source-out") and len(report["sources"]) >= 4
    assert report["reference_counts"]["detect"] >= 200
    assert report["reference_counts"]["pose"] >= 20 and report["reference_counts"]["landmarks"] >= 10


def test_the_readme_table_is_generated_from_the_committed_json() -> None:
    report = _committed()
    assert not tasks_report.sync_readme(REPO / "README.md", report, "lso", write=False), \
        "README's bench-tasks:lso block is stale: palettelink bench-tasks --render " \
        "docs/results/tasks-lso/bench-tasks.json --readme README.md"
    assert (RESULTS / "bench-tasks.md").read_text() == tasks_report.full_markdown(report)


def test_verdict_names_palette_only_where_it_beats_every_avif_row() -> None:
    def row(method: str, label: str, bpp: float, ap: float, oks: float, iou: float) -> dict[str, Any]:
        return {"method": method, "label": label, "bpp": bpp, "detect": {"ap50": ap}, "pose": {"oks": oks},
                "segment": {"iou": iou}}

    rows = [row("palette", "L0", 0.10, 0.95, 0.96, 0.92), row("palette", "L3", 0.05, 0.91, 0.90, 0.80),
            row("avif-codec", "q30", 0.20, 0.97, 0.97, 0.95), row("avif-down4", "q0", 0.02, 0.5, 0.3, 0.4)]
    report = {"tasks": ["detect", "segment", "pose"], "rows": rows}
    v = tasks_report.verdict(report)
    assert v["palette_wins"] and v["default"] == "palette"
    assert [b["met"] for b in v["bars"]] == [True, True, True]
    rows.append(row("avif-down2", "q10", 0.04, 0.92, 0.96, 0.9))  # AVIF at half size: lower on both
    v = tasks_report.verdict(report)
    assert not v["palette_wins"] and v["default"] == "avif"
    assert v["bars"][0]["best_avif"] == {"method": "avif-down2", "bpp": 0.04, "label": "q10", "ap50": 0.92}
    assert "**not met**" in tasks_report.verdict_text(report)


def test_the_held_out_set_shares_no_source_with_the_codecs_training(image_bundle: Bundle) -> None:
    from palettelink.train import data

    trained = heldout.trained_files(image_bundle)
    held = heldout.held_out(image_bundle)
    names = {Path(f).name for f in trained}
    for src, items in held.sources.items():
        for i in items:
            p = Path(i[0] if isinstance(i, tuple) else i)
            assert str(p) not in trained and p.name not in names, (src, p)
            assert not heldout.reserved(i), p
    # the image codec trained on vtest.avi's first minutes: none of that camera is evaluated
    assert not any("vtest" in data.item_key(i) for i in held.items())
    assert any(k.startswith("vtest.avi") for k in held.left_out)
    assert len(held.sources) >= 3  # ultralytics, scikit-image, matplotlib; more with the corpus
    spread = heldout.held_out(image_bundle, per_source=2)
    assert all(len(v) <= 2 for v in spread.sources.values())


def test_bench_tasks_eval_set_writes_the_held_out_report(image_bundles_root: Path, tmp_path: Path) -> None:
    from palettelink import cli

    out = tmp_path / "lso"
    assert cli.main(["bench-tasks", "--bundles", str(image_bundles_root), "--eval-set", "--per-source", "1",
                     "--tasks", "detect", "--codecs", "avif", "--avif-levels", "9", "--anchors", "",
                     "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "bench-tasks.json").read_text())
    assert report["set"].startswith("leave-source-out") and set(report["sources"].values()) == {1}
    assert "vtest.avi" in report["left_out"] and len(report["images"]) == len(report["sources"])
    (row,) = report["rows"]
    assert set(row["per_source"]) == set(report["sources"])
    assert set(report["lowest_bpp_at_0.9"]) == set(report["lowest_bpp_at_0.95"]) == {"detect"}
    assert (out / "bench-tasks.md").read_text() == tasks_report.full_markdown(report)
    # --render: the markdown again from the JSON alone
    (out / "bench-tasks.md").unlink()
    assert cli.main(["bench-tasks", "--render", str(out / "bench-tasks.json")]) == 0
    assert (out / "bench-tasks.md").read_text() == tasks_report.full_markdown(report)


# -- the product: edge client and dashboard Try it on the image bundle, real server -------------------


@pytest.fixture(scope="module")
def image_server(image_bundles_root: Path) -> Iterator[Any]:
    from server.main import PaletteLinkServer
    from server.service import Service

    svc = Service(image_bundles_root, bundles=["vision-image"], max_batch=2, batch_wait_ms=5,
                  shed_latency_ms=0)
    srv = PaletteLinkServer(svc)
    srv.start()
    srv.load()
    yield srv
    srv.stop(grace=1.0)


def test_edge_sends_avif_to_the_image_bundle_unless_told_otherwise(image_server: Any,
                                                                   image_bundles_root: Path,
                                                                   images: list[Path]) -> None:
    import subprocess

    common = [*script("palettelink-edge"), "--server", image_server.grpc_address, "--bundle", "vision-image",
              "--bundles", str(image_bundles_root), "--task", "detect", "--json", str(images[0])]
    r = subprocess.run(common, capture_output=True, text=True, timeout=300, cwd=REPO, env=env())
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads(r.stdout)
    assert (rec["codec"], rec["level"], rec["error"]) == ("avif", avif.DEFAULT_LEVEL, None)
    assert sum(b["class_name"] == "person" for b in rec["boxes"]) >= 3, rec["boxes"]
    r = subprocess.run([*common, "--codec", "palette", "--level", "0"], capture_output=True, text=True,
                       timeout=300, cwd=REPO, env=env())
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["codec"] == "palette"


def test_try_it_leads_with_avif_on_the_image_bundle(image_server: Any, images: list[Path]) -> None:
    import httpx

    with httpx.Client(base_url=image_server.http_url, timeout=300) as http:
        info = http.get("/api/info").json()
        (b,) = [b for b in info["bundles"] if b["name"] == "vision-image"]
        assert [c["name"] for c in b["codecs"]][0] == "avif"  # the Try page's first (selected) option
        body = images[1].read_bytes()
        r = http.post("/api/try", params={"bundle": "vision-image", "task": "pose", "target_bpp": 0.1},
                      content=body)
        assert r.status_code == 200, r.text
        res = r.json()["result"]
        assert res["codec"] == "avif" and res["bpp"] <= 0.1 and not res.get("error"), res
        r = http.post("/api/try", params={"bundle": "vision-image", "task": "pose", "codec": "palette",
                                          "level": 2}, content=body)
        assert r.status_code == 200, r.text
        assert r.json()["result"]["codec"] == "palette"


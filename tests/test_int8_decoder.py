"""The image bundle's generator at int8 (issue 16, server cost): ``palettelink int8 --graph
decoder.onnx`` quantises the palette image codec's decoder.onnx, measures it through every task on the
codec's leave-source-out set and records it; the server's palette decoder runs it only where the
recorded agreement reaches the rule (``auto``), or when asked. Real bundle, real quantiser, real
task models; the timing target is a benchmark's business (``bench-serve``), not this test's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from palettelink import bitstream, codecs
from palettelink.bundle import find_bundle
from palettelink.codecs.palette import PaletteDecoder
from palettelink.front import INT8_MIN_AGREEMENT
from palettelink.image import load_image


def test_int8_generator_is_measured_recorded_and_chosen_by_the_rule(image_bundles_root: Path,
                                                                    images: list[Path],
                                                                    tmp_path: Path) -> None:
    from palettelink import cli

    root = tmp_path / "bundles"
    shutil.copytree(image_bundles_root / "vision-image", root / "vision-image")
    before = find_bundle("vision-image", root)
    out = tmp_path / "int8.json"
    assert cli.main(["int8", "--bundles", str(root), "--bundle", "vision-image", "--graph", "decoder.onnx",
                     "--calibration", "2", "--frames", "2", "--out", str(out)]) == 0
    b = find_bundle("vision-image", root)
    entry = b.manifest["int8"]["decoder.onnx"]
    written = json.loads(out.read_text())
    assert entry["file"] == "decoder.int8.onnx"
    assert set(entry) - {"file"} == set(written) - {"bundle", "graph"}
    assert (entry["agreement"], entry["int8_ms"]) == (written["agreement"], written["int8_ms"])
    assert set(entry["tasks"]) == {"detect", "segment", "landmarks", "pose"}
    assert entry["fp32_ms"] > 0 and entry["int8_ms"] > 0 and entry["psnr_int8_vs_fp32_db"] > 30
    assert "decoder.int8.onnx" in b.sides["server"] and "decoder.int8.onnx" not in b.sides["edge"]
    assert b.table_hash == before.table_hash  # streams coded for either decode alike

    auto = PaletteDecoder(b)
    agreement = entry["agreement"]
    want = "int8" if agreement is not None and agreement >= INT8_MIN_AGREEMENT else "fp32"
    assert auto.graph.precision == want and entry["default"] == (want == "int8")
    fp32, int8 = PaletteDecoder(b, precision="fp32"), PaletteDecoder(b, precision="int8")
    assert int8.graph.file == "decoder.int8.onnx"
    payload = codecs.make_encoder(b, "palette").encode(load_image(images[1]), 2).payload
    frame = bitstream.unpack(payload)
    x32 = fp32.decode_frame(frame, len(payload)).tensors[0]
    x8a, x8b = (int8.decode_frame(frame, len(payload)).tensors[0] for _ in range(2))
    assert np.array_equal(x8a, x8b)  # deterministic on one machine
    mse = float(np.mean((x32 - x8a) ** 2))
    assert 10 * np.log10(1.0 / max(mse, 1e-12)) > 30, mse
    assert codecs.Decoder(b).decode(payload).codec == "palette"  # the server's path takes the new manifest

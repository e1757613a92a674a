"""The committed gRPC/protobuf modules are exactly what protoc makes from protos/ today."""

from __future__ import annotations

from pathlib import Path

from helpers import REPO as ROOT
from helpers import load_script


def _gen_protos():  # noqa: ANN202 - the scripts/gen_protos.py module
    return load_script("gen_protos")


def test_generated_code_matches_the_proto() -> None:
    diffs = _gen_protos().differences(ROOT)
    assert not diffs, f"regenerate with `python scripts/gen_protos.py`: {diffs} differ from protos/"


def test_generation_into_a_temp_dir(tmp_path: Path) -> None:
    files = _gen_protos().generate(tmp_path)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in files) == [
        "palettelink/v1/palettelink_pb2.py", "palettelink/v1/palettelink_pb2.pyi",
        "palettelink/v1/palettelink_pb2_grpc.py"]

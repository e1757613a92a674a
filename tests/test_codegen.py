"""The committed gRPC/protobuf modules are exactly what protoc makes from protos/ today."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _gen_protos():  # noqa: ANN202 - the scripts/gen_protos.py module
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_generated_code_matches_the_proto() -> None:
    diffs = _gen_protos().differences(ROOT)
    assert not diffs, f"regenerate with `python scripts/gen_protos.py`: {diffs} differ from protos/"


def test_generation_into_a_temp_dir(tmp_path: Path) -> None:
    files = _gen_protos().generate(tmp_path)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in files) == [
        "palettelink/v1/palettelink_pb2.py", "palettelink/v1/palettelink_pb2.pyi",
        "palettelink/v1/palettelink_pb2_grpc.py"]

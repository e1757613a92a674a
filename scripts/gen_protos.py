#!/usr/bin/env python
"""Regenerate the checked-in gRPC/protobuf modules (``palettelink/v1/*_pb2*.py`` and ``.pyi``) from
``protos/`` with ``grpc_tools.protoc``.

The proto is the only wire schema; the generated code is committed so that the edge needs no
protoc. ``tests/test_codegen.py`` regenerates into a temporary folder and fails on any difference,
so the two cannot drift. Usage::

    python scripts/gen_protos.py              # rewrite palettelink/v1/ in place
    python scripts/gen_protos.py --out DIR    # write DIR/palettelink/v1/... instead (for diffing)
    python scripts/gen_protos.py --check      # exit 1 and list the files that differ
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTOS = ROOT / "protos"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files(protos: Path = PROTOS) -> list[Path]:
    return sorted(protos.rglob("*.proto"))


def generate(out: Path, protos: Path = PROTOS) -> list[Path]:
    """Run protoc on every ``.proto`` under ``protos``; return the generated files (under ``out``)."""
    from grpc_tools import protoc

    files = proto_files(protos)
    if not files:
        raise SystemExit(f"no .proto files under {protos}")
    out.mkdir(parents=True, exist_ok=True)
    args = ["grpc_tools.protoc", f"-I{protos}", f"--python_out={out}", f"--pyi_out={out}",
            f"--grpc_python_out={out}", *(str(f.relative_to(protos)) for f in files)]
    # protoc resolves relative proto paths against the working directory's -I entries; run from protos/
    # so the "source:" comments in the output do not depend on where the script was started.
    import os

    cwd = os.getcwd()
    os.chdir(protos)
    try:
        rc = protoc.main(args)
    finally:
        os.chdir(cwd)
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc}")
    return sorted(p for p in out.rglob("*") if p.name.endswith(GENERATED_SUFFIXES))


def committed(root: Path = ROOT, protos: Path = PROTOS) -> list[Path]:
    """The generated files that belong in the repository, one per proto and suffix."""
    out = []
    for f in proto_files(protos):
        stem = root / f.relative_to(protos).with_suffix("")
        out += [stem.with_name(stem.name + s) for s in GENERATED_SUFFIXES]
    return out


def differences(root: Path = ROOT) -> list[str]:
    """Relative paths whose committed bytes differ from a fresh generation (missing ones too)."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.relative_to(tmp).as_posix(): p.read_bytes() for p in generate(Path(tmp))}
        expected = {p.relative_to(root).as_posix() for p in committed(root)}
        diffs = []
        for rel in sorted(set(fresh) | expected):
            mine = root / rel
            if rel not in fresh or not mine.is_file() or mine.read_bytes() != fresh[rel]:
                diffs.append(rel)
        return diffs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--out", type=Path, help="write into this folder instead of the repository")
    g.add_argument("--check", action="store_true", help="only report files that differ")
    args = p.parse_args(argv)
    if args.check:
        diffs = differences()
        for d in diffs:
            print(f"differs: {d}")
        return 1 if diffs else 0
    if args.out:
        for f in generate(args.out):
            print(f)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        for f in generate(Path(tmp)):
            dest = ROOT / f.relative_to(tmp)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, dest)
            print(dest.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())

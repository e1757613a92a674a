"""The edge part of a bundle over HTTP: what the server lists, and the edge's verified, atomic download.

The server answers (bearer token when it has tokens, like ``/api/analyze``):

- ``GET /api/bundles`` → ``{"bundles": [{id, name, version, table_hash, edge}]}`` (``edge``: the
  listing's path);
- ``GET /api/bundles/{name}/{version}/edge`` → :func:`edge_listing`: ``{id, name, version,
  table_hash, files: [{path, sha256, size}]}`` — ``manifest.json`` and every file of the manifest's
  edge side, nothing else;
- ``GET /api/bundles/{name}/{version}/edge/{path}`` → the bytes of one listed file (404 otherwise).

:func:`fetch_bundle` downloads every listed file into a temporary folder beside the destination,
checks each one's size and sha256 while it arrives, loads the result with ``side="edge"`` (the
manifest's own sha256s and table hash), and only then renames it into ``<cache>/<name>/<version>``.
Any failure (a wrong sha256, a truncated body, an unknown bundle, a refused token) removes the
temporary folder, and the cache folders this fetch created, and leaves what the cache held before
untouched. Standard library only (urllib).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import ssl
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

from palettelink.bundle import MANIFEST, Bundle, sha256_file, version_key
from palettelink.errors import BundleError, BundleNotFound, PaletteLinkError, Unauthenticated

CHUNK = 1 << 20
DEFAULT_HTTP_PORT = 8000


class FetchError(PaletteLinkError):
    """The server could not be reached or answered something other than a bundle."""

    code = "UNAVAILABLE"


def default_cache() -> Path:
    """``$XDG_CACHE_HOME/palettelink/bundles``, else ``~/.cache/palettelink/bundles``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "palettelink" / "bundles"


def default_http_url(server: str, tls: bool = False) -> str:
    """The HTTP address beside a gRPC ``HOST:PORT``: the same host, port 8000 (the server's default
    ``--http-port``), ``https`` when the gRPC channel uses TLS."""
    host = server.rsplit(":", 1)[0] if server.count(":") == 1 or server.startswith("[") else server
    return f"{'https' if tls else 'http'}://{host or '127.0.0.1'}:{DEFAULT_HTTP_PORT}"


def edge_listing(bundle: Bundle) -> dict[str, Any]:
    """What the server lists for ``bundle``'s edge part (sha256s from the loaded manifest; the
    manifest's own from its file on disk)."""
    files = [{"path": MANIFEST, "sha256": sha256_file(bundle.path / MANIFEST),
              "size": (bundle.path / MANIFEST).stat().st_size}]
    for rel, digest in bundle.edge_files.items():
        p = bundle.path / rel
        files.append({"path": rel, "sha256": digest, "size": p.stat().st_size if p.is_file() else None})
    return {"id": bundle.id, "name": bundle.name, "version": bundle.version,
            "table_hash": bundle.table_hash_hex, "files": files}


def edge_file(bundle: Bundle, rel: str) -> Path:
    """The path of ``rel`` if it is ``manifest.json`` or in the edge part; BundleNotFound otherwise
    (only listed names are ever joined to the bundle folder, so no path can leave it)."""
    if rel != MANIFEST and rel not in bundle.sides["edge"]:
        raise BundleNotFound(f"bundle {bundle.id} has no edge file {rel!r}; its edge part: "
                             f"{[MANIFEST, *bundle.sides['edge']]}")
    p = bundle.path / rel
    if not p.is_file():
        raise BundleNotFound(f"bundle {bundle.id}: {rel} is missing on the server")
    return p


class Client:
    """Small JSON/bytes HTTP client: bearer token, optional CA for https, errors in the server's JSON
    shape turned back into typed errors."""

    def __init__(self, base_url: str, token: str | None = None, ca: str | os.PathLike[str] | None = None,
                 timeout: float = 30.0) -> None:
        if not base_url.startswith(("http://", "https://")):
            base_url = "http://" + base_url
        self.base = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.context = ssl.create_default_context(cafile=str(ca)) if ca else None

    def open(self, path: str) -> Any:
        req = urllib.request.Request(self.base + path)
        if self.token:
            req.add_header("authorization", f"Bearer {self.token}")
        try:
            return urllib.request.urlopen(req, timeout=self.timeout, context=self.context)  # noqa: S310
        except urllib.error.HTTPError as e:
            message = _error_message(e)
            if e.code == 401:
                raise Unauthenticated(f"{self.base} refused the bundle download: {message} "
                                      "(pass --token or set $PALETTELINK_TOKEN)") from None
            if e.code == 404:
                raise BundleNotFound(f"{self.base}: {message}") from None
            raise FetchError(f"{self.base}{path}: HTTP {e.code}: {message}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise FetchError(f"cannot reach {self.base} for the bundle ({reason}); "
                             "give the server's HTTP address with --http URL") from None

    def json(self, path: str) -> Any:
        with self.open(path) as r:
            try:
                return json.loads(r.read())
            except ValueError as e:
                raise FetchError(f"{self.base}{path} did not answer JSON: {e}") from None


def _error_message(e: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(e.read())["error"]["message"])
    except Exception:  # noqa: BLE001 - not our JSON shape: say what we know
        return e.reason or f"HTTP {e.code}"


def _safe_rel(rel: Any) -> str:
    """A listed path as a relative POSIX path inside the bundle folder; BundleError otherwise."""
    p = PurePosixPath(str(rel))
    if not rel or p.is_absolute() or any(part in ("", ".", "..") for part in p.parts) or "\\" in str(rel):
        raise BundleError(f"the server listed an unsafe file name {str(rel)[:80]!r}")
    return p.as_posix()


def resolve_version(client: Client, name: str) -> tuple[str, str]:
    """``name`` or ``name/version`` → (name, version); a bare name picks the server's highest."""
    if "/" in name:
        n, _, v = name.partition("/")
        if not n or not v or "/" in v:
            raise BundleError(f"bundle {name!r}: expected NAME or NAME/VERSION")
        return n, v
    listed = client.json("/api/bundles").get("bundles", [])
    versions = [str(b["version"]) for b in listed if b.get("name") == name]
    if not versions:
        raise BundleNotFound(f"{client.base} has no bundle {name!r}; it serves "
                             f"{sorted(str(b.get('id')) for b in listed)}")
    return name, max(versions, key=version_key)


def fetch_bundle(name: str, client: Client, cache: str | os.PathLike[str] | None = None,
                 log: Callable[[str], None] | None = None) -> Bundle:
    """Download ``name`` (``NAME`` or ``NAME/VERSION``)'s edge part into ``cache`` (default
    :func:`default_cache`) and return it loaded with ``side="edge"``. A copy already in the cache
    whose files match the server's listing is kept as it is (nothing downloaded)."""
    log = log or (lambda _msg: None)
    root = Path(cache) if cache is not None else default_cache()
    n, v = resolve_version(client, name)
    for part in (n, v):
        if "/" in _safe_rel(part):
            raise BundleError(f"bad bundle name or version {part[:80]!r}")
    quoted = f"/api/bundles/{urllib.parse.quote(n, safe='')}/{urllib.parse.quote(v, safe='')}/edge"
    listing = client.json(quoted)
    files = [(_safe_rel(f["path"]), str(f["sha256"]), f.get("size")) for f in listing.get("files", [])]
    if MANIFEST not in [f[0] for f in files]:
        raise BundleError(f"{client.base}: the edge listing of {n}/{v} has no {MANIFEST}")
    dest = root / n / v
    if _matches(dest, files):
        log(f"bundle {n}/{v} is up to date in {dest}")
        return Bundle.load(dest, side="edge")
    created = _make_dirs(dest.parent)
    try:
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{v}.fetch-"))
    except BaseException:
        _remove_empty(created)
        raise
    try:
        total = 0
        for rel, digest, size in files:
            total += _download(client, f"{quoted}/{urllib.parse.quote(rel)}", tmp / rel, digest, size, rel)
        bundle = Bundle.load(tmp, side="edge")  # the manifest's own sha256s and table hash
        if bundle.table_hash_hex != listing.get("table_hash", bundle.table_hash_hex) or \
                (bundle.name, bundle.version) != (n, v):
            raise BundleError(f"{client.base}: the manifest of {n}/{v} names {bundle.id} with table hash "
                              f"{bundle.table_hash_hex[:16]}, the listing said otherwise")
        tmp.chmod(0o755)
        old = None
        if dest.exists():
            old = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{v}.old-"))
            os.rename(dest, old / "x")
        os.rename(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)  # a first fetch that failed leaves no empty cache folders behind
        raise
    log(f"fetched bundle {n}/{v} ({len(files)} files, {total / 1e6:.1f} MB) into {dest}")
    return Bundle.load(dest, side="edge")


def _make_dirs(folder: Path) -> list[Path]:
    """``mkdir -p folder``; returns the folders it created, deepest first."""
    missing = []
    p = folder
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def _remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (deepest first) while they are empty."""
    for d in folders:
        try:
            d.rmdir()
        except OSError:
            return


def _matches(dest: Path, files: list[tuple[str, str, Any]]) -> bool:
    try:
        return all((dest / rel).is_file() and sha256_file(dest / rel) == digest for rel, digest, _ in files)
    except OSError:
        return False


def _download(client: Client, url: str, path: Path, digest: str, size: Any, rel: str) -> int:
    """Stream one file to ``path``, hashing as it arrives; BundleError on a wrong size or sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    n = 0
    try:
        with client.open(url) as r, open(path, "wb") as f:
            while chunk := r.read(CHUNK):
                h.update(chunk)
                f.write(chunk)
                n += len(chunk)
    except (http.client.HTTPException, ConnectionError) as e:
        raise BundleError(f"download of {rel} broke off after {n} bytes ({type(e).__name__}); "
                          "the cache was left as it was") from None
    if size is not None and n != int(size):
        raise BundleError(f"download of {rel} was truncated or padded: {n} bytes, the listing says {size}; "
                          "the cache was left as it was")
    if h.hexdigest() != digest:
        raise BundleError(f"downloaded {rel} does not match its sha256 ({h.hexdigest()[:16]}… ≠ "
                          f"{digest[:16]}…); refused, the cache was left as it was")
    return n

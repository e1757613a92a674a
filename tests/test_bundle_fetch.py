"""Bundles split by side, and served: an edge-only folder loads and encodes; the server lists and
serves exactly the edge part; the real ``palettelink-edge --fetch-bundle`` downloads it into a fresh
cache (verified, atomic) and streams with it; tampered or truncated downloads, unknown bundles and
missing tokens are refused and leave the cache as it was."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from helpers import script

from palettelink.bundle import MANIFEST, Bundle, write_manifest
from palettelink.errors import BundleError

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TOKEN = "fetch-test-token"


def env(**extra: str) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items()
         if k not in ("PALETTELINK_TOKEN", "PALETTELINK_TOKENS", "PALETTELINK_BUNDLES")}
    e.update(extra)
    return e


def edge(*args: str, cache: Path, pre: list[str] | None = None,
         timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run((pre or script("palettelink-edge")) + list(args), capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=env(XDG_CACHE_HOME=str(cache)))


def tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (dot-files and temp folders included) → sha256 of its bytes."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def edge_copy(bundle: Bundle, dest: Path) -> Path:
    """Only the edge part of ``bundle`` (and its manifest) copied into ``dest``."""
    dest.mkdir(parents=True)
    for rel in [MANIFEST, *bundle.sides["edge"]]:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(bundle.path / rel, dest / rel)
    return dest


# -- the split itself --------------------------------------------------------------------------


def test_real_bundle_records_its_sides(bundle) -> None:  # noqa: ANN001
    from palettelink.bundle import sides_of, table_hash_of

    sides = bundle.manifest["sides"]
    expected = {"front.onnx"} | ({"edge.onnx", "palette.npz"} if "palette" in bundle.codecs else set())
    assert set(sides["edge"]) == expected
    assert {"model.pt"} <= set(sides["server"]) and not set(sides["edge"]) & set(sides["server"])
    assert set(sides["edge"]) | set(sides["server"]) == set(bundle.manifest["files"])
    if "palette" in bundle.codecs:
        assert {"decoder.onnx", "codec/encoder.pt"} <= set(sides["server"])
    legacy = {k: v for k, v in bundle.manifest.items() if k != "sides"}
    assert table_hash_of(legacy) == bundle.table_hash_hex  # the stream header keeps naming the same hash
    assert sides_of(legacy) == sides


def test_edge_only_folder_loads_and_encodes(bundle, tmp_path: Path, images: list[Path]) -> None:  # noqa: ANN001
    from palettelink import codecs
    from palettelink.image import load_image

    d = edge_copy(bundle, tmp_path / "fall-yolov8" / "1")
    assert not (d / "model.pt").exists() and not (d / "decoder.onnx").exists()
    with pytest.raises(BundleError, match="missing"):
        Bundle.load(d)  # the server side needs everything
    b = Bundle.load(d, side="edge")
    assert b.table_hash == bundle.table_hash
    rgb = load_image(images[0])
    decoder = codecs.Decoder(bundle)  # the full bundle decodes what the edge-only copy coded
    offered = codecs.available(b)
    assert "baseline" in offered
    for name in offered:
        enc = codecs.make_encoder(b, name)
        level = enc.levels()[-1]
        coded = enc.encode(rgb, level)
        out = decoder.decode(coded.payload)
        assert (out.codec, out.level) == (name, level)
    with pytest.raises(BundleError, match="server part"):
        b.file("model.pt")


# -- the server's endpoints (in-process server, no tokens) --------------------------------------


@pytest.fixture()
def http(live_server):  # noqa: ANN001, ANN201
    with httpx.Client(base_url=live_server.http_url, timeout=30) as c:
        yield c


def test_endpoints_list_and_serve_exactly_the_edge_part(http: httpx.Client, bundle) -> None:  # noqa: ANN001
    listed = http.get("/api/bundles").json()["bundles"]
    assert [(b["id"], b["edge"]) for b in listed] == [("fall-yolov8/1", "/api/bundles/fall-yolov8/1/edge")]
    listing = http.get("/api/bundles/fall-yolov8/1/edge").json()
    assert listing["table_hash"] == bundle.table_hash_hex
    assert [f["path"] for f in listing["files"]] == [MANIFEST, *bundle.sides["edge"]]
    for f in listing["files"]:
        r = http.get(f"/api/bundles/fall-yolov8/1/edge/{f['path']}")
        assert r.status_code == 200 and len(r.content) == f["size"]
        assert hashlib.sha256(r.content).hexdigest() == f["sha256"]


@pytest.mark.parametrize("path", [
    "/api/bundles/nope/1/edge", "/api/bundles/fall-yolov8/99/edge", "/api/bundles/nope/1/edge/front.onnx",
    "/api/bundles/fall-yolov8/1/edge/model.pt", "/api/bundles/fall-yolov8/1/edge/decoder.onnx",
    "/api/bundles/fall-yolov8/1/edge/codec/encoder.pt", "/api/bundles/fall-yolov8/1/edge/%2e%2e/1/model.pt",
    "/api/bundles/fall-yolov8/1/edge/..%2F..%2F..%2Fetc%2Fpasswd",
    "/api/bundles/fall-yolov8/1/edge//etc/passwd",
    "/api/bundles/fall-yolov8/1/edge/%2Fetc%2Fpasswd",
])
def test_unknown_bundles_and_files_are_404_json(http: httpx.Client, path: str) -> None:
    r = http.get(path)
    assert r.status_code == 404, r.text
    err = r.json()["error"]
    assert err["status"] == "NOT_FOUND" and err["message"]
    assert "root:" not in r.text


# -- the real edge client against the in-process server ----------------------------------------


def test_edge_client_fetches_into_a_fresh_cache_and_streams(live_server, tmp_path: Path,  # noqa: ANN001
                                                             bundle, images: list[Path]) -> None:  # noqa: ANN001
    cache = tmp_path / "xdg"
    empty = tmp_path / "empty"
    pre = [sys.executable, "-X", "importtime", "-m", "edge.client"]
    r = edge("--fetch-bundle", "fall-yolov8", "--server", live_server.grpc_address, "--http",
             live_server.http_url, "--bundles", str(empty), "--codec", "baseline", "--bits", "8", "--json",
             str(images[0]), cache=cache, pre=pre)
    assert r.returncode == 0, r.stderr[-3000:]
    heavy = sorted({line.rsplit("|", 1)[1].strip() for line in r.stderr.splitlines()
                    if line.startswith("import time:") and "|" in line
                    and line.rsplit("|", 1)[1].strip().split(".")[0] in ("torch", "ultralytics")})
    assert not heavy, f"fetching imported {heavy[:5]}"
    rec = json.loads(r.stdout.splitlines()[0])
    assert rec["error"] is None and rec["boxes"] and rec["codec"] == "baseline"
    root = cache / "palettelink" / "bundles"
    dest = root / "fall-yolov8" / "1"
    assert sorted(tree(dest)) == sorted([MANIFEST, *bundle.sides["edge"]])  # no server file came
    assert [p.name for p in (root / "fall-yolov8").iterdir()] == ["1"]  # no temp folder left
    assert "fetched bundle fall-yolov8/1" in r.stderr

    # Next start: found in the cache, nothing fetched; the bundle's default codec streams.
    r = edge("--bundle", "fall-yolov8", "--server", live_server.grpc_address, "--bundles", str(empty),
             "--json", str(images[1]), cache=cache)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.splitlines()[0])["boxes"]
    # Fetch only (no PATH): up to date, nothing downloaded, prints where it is.
    r = edge("--fetch-bundle", "fall-yolov8/1", "--server", live_server.grpc_address, "--http",
             live_server.http_url, cache=cache)
    assert r.returncode == 0 and "up to date" in r.stderr
    assert r.stdout.split() == ["fall-yolov8/1", str(dest)]


def test_fetch_on_first_use_with_http(live_server, tmp_path: Path, images: list[Path]) -> None:  # noqa: ANN001
    cache = tmp_path / "xdg"
    r = edge("--bundle", "fall-yolov8/1", "--server", live_server.grpc_address, "--http",
             live_server.http_url.removeprefix("http://"), "--bundles", str(tmp_path / "empty"),
             "--codec", "baseline", "--bits", "4", str(images[0]), cache=cache)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "fetched bundle fall-yolov8/1" in r.stderr
    assert (cache / "palettelink" / "bundles" / "fall-yolov8" / "1" / MANIFEST).is_file()


def test_missing_bundle_without_http_names_fetch(live_server, tmp_path: Path, images: list[Path]) -> None:  # noqa: ANN001
    r = edge("--bundle", "fall-yolov8", "--server", live_server.grpc_address, "--bundles",
             str(tmp_path / "empty"), str(images[0]), cache=tmp_path / "xdg")
    assert r.returncode == 2 and "--fetch-bundle" in r.stderr and "Traceback" not in r.stderr


def test_unreachable_http_exits_3(live_server, tmp_path: Path) -> None:  # noqa: ANN001
    r = edge("--fetch-bundle", "fall-yolov8", "--server", live_server.grpc_address, "--http",
             "http://127.0.0.1:1", cache=tmp_path / "xdg", timeout=60)
    assert r.returncode == 3 and "cannot reach http://127.0.0.1:1" in r.stderr and "--http" in r.stderr
    assert not (tmp_path / "xdg").exists() or not any((tmp_path / "xdg").rglob("*.onnx"))


# -- a real server process with tokens, serving a copy we can tamper with -----------------------


@pytest.fixture(scope="module")
def served_copy(bundles_root: Path, tmp_path_factory: pytest.TempPathFactory,
                server_process) -> Iterator[dict[str, str]]:  # noqa: ANN001
    """``palettelink-server`` over a copy of the bundles root, with a token; yields ``grpc``, ``http``
    and ``root`` (the copy: files may be changed after the server verified them at start)."""
    root = tmp_path_factory.mktemp("served") / "bundles"
    shutil.copytree(bundles_root, root)
    cmd = [*script("palettelink-server"), "--bundles", str(root), "--grpc-port", "0", "--http-port", "0"]
    with server_process(cmd, env(PALETTELINK_TOKENS=f"cam={TOKEN}"), REPO, stop_timeout=30) as ready:
        yield {"grpc": ready["grpc"], "http": ready["http"], "root": str(root)}


def test_tokens_are_required(served_copy: dict[str, str], tmp_path: Path, images: list[Path]) -> None:
    base = f"http://{served_copy['http']}"
    for headers in ({}, {"authorization": "Bearer wrong"}):
        for path in ("/api/bundles", "/api/bundles/fall-yolov8/1/edge",
                     "/api/bundles/fall-yolov8/1/edge/front.onnx"):
            r = httpx.get(base + path, headers=headers, timeout=30)
            assert r.status_code == 401 and r.json()["error"]["status"] == "UNAUTHENTICATED", path
    cache = tmp_path / "xdg"
    r = edge("--fetch-bundle", "fall-yolov8", "--server", served_copy["grpc"], "--http", base, cache=cache)
    assert r.returncode == 4 and "--token" in r.stderr and "Traceback" not in r.stderr
    assert not any(cache.rglob("*.onnx")) if cache.exists() else True
    r = edge("--fetch-bundle", "fall-yolov8", "--server", served_copy["grpc"], "--http", base,
             "--token", TOKEN, "--bundles", str(tmp_path / "empty"), "--codec", "baseline", "--bits", "6",
             str(images[0]), cache=cache)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "1 box" in r.stdout or "box(es)" in r.stdout


def test_unknown_bundle_is_a_clear_error(served_copy: dict[str, str], tmp_path: Path) -> None:
    base = f"http://{served_copy['http']}"
    for name, says in (("nope", "no bundle 'nope'"), ("fall-yolov8/99", "fall-yolov8/99")):
        r = edge("--fetch-bundle", name, "--server", served_copy["grpc"], "--http", base, "--token", TOKEN,
                 cache=tmp_path / "xdg")
        assert r.returncode == 2 and says in r.stderr and "fall-yolov8/1" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr


def test_tampered_served_file_is_refused_and_the_old_cache_is_untouched(
        served_copy: dict[str, str], tmp_path: Path) -> None:
    base = f"http://{served_copy['http']}"
    cache = tmp_path / "xdg"
    args = ["--fetch-bundle", "fall-yolov8", "--server", served_copy["grpc"], "--http", base,
            "--token", TOKEN]
    assert edge(*args, cache=cache).returncode == 0
    dest = cache / "palettelink" / "bundles" / "fall-yolov8" / "1"
    # An older copy in the cache (its manifest's bytes differ from the server's): a fetch re-downloads.
    m = json.loads((dest / MANIFEST).read_text())
    (dest / MANIFEST).write_text(json.dumps(m, indent=1))
    before = tree(cache)
    served = Path(served_copy["root"]) / "fall-yolov8" / "1" / "front.onnx"
    original = served.read_bytes()
    try:
        flipped = bytearray(original)
        flipped[len(flipped) // 2] ^= 0xFF
        served.write_bytes(bytes(flipped))  # same size, other bytes: only the sha256 tells
        r = edge(*args, cache=cache)
        assert r.returncode == 2 and "front.onnx does not match its sha256" in r.stderr, r.stderr
        assert tree(cache) == before  # the old copy is as it was, no temp folder left
        served.write_bytes(original[:-100])  # cut short on the server's disk
        r = edge(*args, cache=cache)
        assert r.returncode == 2 and "front.onnx does not match its sha256" in r.stderr, r.stderr
        assert tree(cache) == before
        Bundle.load(dest, side="edge")  # still a usable edge copy
    finally:
        served.write_bytes(original)
    r = edge(*args, cache=cache)
    assert r.returncode == 0 and "fetched" in r.stderr
    assert tree(dest)[MANIFEST] != before[f"palettelink/bundles/fall-yolov8/1/{MANIFEST}"]


# -- truncation and hostile listings against a fake server (the stdlib's http.server) -----------


def _toy_bundle(folder: Path, tables: bytes) -> Path:
    folder.mkdir(parents=True)
    (folder / "front.onnx").write_bytes(b"front" * 100)
    (folder / "palette.npz").write_bytes(tables)
    (folder / "model.pt").write_bytes(b"server only")
    split = {"after_layer": 1, "tensors": [{"name": "t1", "layer": 1, "shape": [4, 2, 2]}]}
    write_manifest(folder, {"name": "toy", "version": "1", "tables": ["palette.npz"], "split": split,
                            "front": {"file": "front.onnx"},
                            "sides": {"edge": ["front.onnx", "palette.npz"]}})
    return folder


@pytest.fixture()
def fake_server(tmp_path: Path) -> Iterator[dict]:
    """Serves ``state["bundle"]``'s edge part the way the real server does, with ``state["cut"]``
    bytes cut off the end of ``state["cut_file"]`` (Content-Length still the full size) and
    ``state["extra"]`` listed on top."""
    from palettelink.fetch import edge_listing

    state: dict = {"bundle": Bundle.load(_toy_bundle(tmp_path / "served" / "toy" / "1", b"tables v2")),
                   "cut": 0, "cut_file": "palette.npz", "extra": []}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            b = state["bundle"]
            prefix = "/api/bundles/toy/1/edge"
            if self.path == "/api/bundles":
                body = json.dumps({"bundles": [{"id": b.id, "name": b.name, "version": b.version}]}).encode()
            elif self.path == prefix:
                listing = edge_listing(b)
                listing["files"] += state["extra"]
                body = json.dumps(listing).encode()
            elif self.path.startswith(prefix + "/"):
                data = (b.path / self.path[len(prefix) + 1:]).read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.path.endswith(state["cut_file"]) and state["cut"]:
                    data = data[: -state["cut"]]
                self.wfile.write(data)
                self.wfile.flush()
                self.close_connection = True
                return
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    state["url"] = f"http://127.0.0.1:{srv.server_address[1]}"
    yield state
    srv.shutdown()
    srv.server_close()


def test_truncated_download_is_refused_and_the_old_cache_kept(fake_server: dict, tmp_path: Path) -> None:
    from palettelink.fetch import Client, fetch_bundle

    cache = tmp_path / "cache"
    _toy_bundle(cache / "toy" / "1", b"tables v1")  # what the cache held before
    before = tree(cache)
    fake_server["cut"] = 3
    with pytest.raises(BundleError, match="palette.npz"):
        fetch_bundle("toy", Client(fake_server["url"]), cache)
    assert tree(cache) == before
    fake_server["cut"] = 0
    b = fetch_bundle("toy", Client(fake_server["url"]), cache)
    assert b.side == "edge" and (cache / "toy" / "1" / "palette.npz").read_bytes() == b"tables v2"
    assert sorted(tree(cache)) == ["toy/1/front.onnx", "toy/1/manifest.json", "toy/1/palette.npz"]


@pytest.mark.parametrize("bad", ["../escape", "/etc/passwd", "a/../../b", ""])
def test_a_listing_naming_paths_outside_the_bundle_is_refused(fake_server: dict, tmp_path: Path,
                                                               bad: str) -> None:
    from palettelink.fetch import Client, fetch_bundle

    fake_server["extra"] = [{"path": bad, "sha256": "0" * 64, "size": 1}]
    with pytest.raises(BundleError, match="unsafe file name"):
        fetch_bundle("toy/1", Client(fake_server["url"]), tmp_path / "cache")
    assert not (tmp_path / "escape").exists() and not any((tmp_path / "cache").rglob("*.onnx"))


def test_info_describes_an_edge_only_copy(bundle, tmp_path: Path) -> None:  # noqa: ANN001
    def info() -> dict:
        r = subprocess.run([sys.executable, "-m", "palettelink.cli", "info", "--bundles", str(tmp_path),
                            "--json"], capture_output=True, text=True, timeout=120, cwd=REPO, env=env())
        assert "Traceback" not in r.stderr
        return json.loads(r.stdout)

    edge_copy(bundle, tmp_path / "fall-yolov8" / "1")
    doc = info()
    assert [(b["id"], b["side"]) for b in doc["bundles"]] == [("fall-yolov8/1", "edge")]
    assert not doc["problems"]
    (tmp_path / "fall-yolov8" / "1" / "model.pt").write_bytes(b"half a server copy")
    doc = info()  # some server files but not all, or wrong: not an edge copy, a broken bundle
    assert not doc["bundles"] and "missing" in doc["problems"][0]


def test_a_failed_first_fetch_leaves_no_empty_cache_folder(fake_server: dict, tmp_path: Path) -> None:
    """A partial download into a cache that did not exist yet: exit 2, one line naming the file, and
    no folder left behind (it used to leave an empty <cache>/<name>/)."""
    fake_server["cut"] = 3
    xdg = tmp_path / "xdg"
    r = edge("--fetch-bundle", "toy", "--server", "127.0.0.1:1", "--http", fake_server["url"], cache=xdg)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert "palette.npz" in line and "truncated" in line, line
    assert not xdg.exists(), sorted(p.relative_to(tmp_path).as_posix() for p in xdg.rglob("*"))
    # and with a cache root that exists already: only what the fetch created goes
    (xdg / "palettelink" / "bundles").mkdir(parents=True)
    r = edge("--fetch-bundle", "toy", "--server", "127.0.0.1:1", "--http", fake_server["url"], cache=xdg)
    assert r.returncode == 2
    assert [p.name for p in xdg.rglob("*")] == ["palettelink", "bundles"]

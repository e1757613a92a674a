"""Shared fixtures: a real bundle built once per session from the installed detector weights."""

from __future__ import annotations

import contextlib
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from palettelink.models.ultra import setup_offline
from palettelink.samples import sample_images

setup_offline()


@pytest.fixture(scope="session")
def images() -> list[Path]:
    """The sample images that ship with ultralytics (bus.jpg, zidane.jpg)."""
    paths = sample_images()
    assert [p.name for p in paths] == ["bus.jpg", "zidane.jpg"]
    return paths


@pytest.fixture(scope="session")
def bundles_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundles root holding fall-yolov8/1, built with the real `build_bundle` (front ONNX + tail)."""
    from palettelink.train.build_bundle import build_bundle

    root = tmp_path_factory.mktemp("bundles")
    build_bundle(out_root=root)
    return root


@pytest.fixture(scope="session")
def bundle(bundles_root: Path):  # noqa: ANN201 - palettelink.bundle.Bundle
    from palettelink.bundle import find_bundle

    return find_bundle("fall-yolov8", bundles_root)


@pytest.fixture(scope="session")
def detector(bundle):  # noqa: ANN001, ANN201
    from palettelink.models.ultra import SplitDetector

    return SplitDetector.from_bundle(bundle)


@pytest.fixture(scope="session")
def image_bundles_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundles root holding vision-image/1 (the image bundle: the committed image codec
    assets/codecs/image-512 and the model zoo's task models) and centernet-split/1 (CenterNet cut
    after its backbone), built with the real builders."""
    from palettelink.train.build_bundle import build_image_bundle, build_onnx_bundle

    root = tmp_path_factory.mktemp("image-bundles")
    build_image_bundle(out_root=root)
    build_onnx_bundle("centernet", out_root=root)
    return root


@pytest.fixture(scope="session")
def image_bundle(image_bundles_root: Path):  # noqa: ANN201 - palettelink.bundle.Bundle
    from palettelink.bundle import find_bundle

    return find_bundle("vision-image", image_bundles_root)


@pytest.fixture(scope="session")
def palettes() -> list[tuple[Any, np.ndarray]]:
    """Two fitted palettes (4 groups K0 64, 6 levels; 2 groups K0 32, 4 levels) and their maps: the
    batch coder's tests code and decode them at random shapes against the layer-by-layer reference."""
    from palettelink.codecs.palette import PaletteTables
    from palettelink.train import context, palette

    out = []
    for seed, (groups, k0, n_levels, ch) in enumerate(((4, 64, 6, 16), (2, 32, 4, 6))):
        z = palette.synthetic_latents(20, channels=ch, h=16, w=16, seed=seed + 5)
        arrays = palette.build_palette(z[:16], groups, k0=k0, n_levels=n_levels, seed=seed)
        maps = palette.index_maps(z, arrays)
        arrays.update(context.fit_context_tables(maps[:16], arrays))
        out.append((PaletteTables.from_arrays(arrays), maps[16:]))
    return out


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--regenerate-golden", action="store_true",
                     help="rewrite committed golden streams (only when the format changes on purpose)")


@pytest.fixture(scope="session")
def regenerate(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--regenerate-golden"))


# -- server fixtures (tests/test_server_*.py; usable by any test that needs a live server) ---------


@pytest.fixture(scope="session")
def coded_frames(bundle, images: list[Path]) -> dict[str, bytes]:  # noqa: ANN001
    """Baseline-coded frames (4 bits) of the sample images: ``{"bus": payload, "zidane": payload}``."""
    from palettelink.codecs import make_encoder
    from palettelink.image import load_image

    enc = make_encoder(bundle, "baseline")
    return {p.stem: enc.encode(load_image(p), 4).payload for p in images}


@pytest.fixture(scope="session")
def server_service(bundles_root: Path):  # noqa: ANN201 - server.service.Service
    """A loaded :class:`server.service.Service` over ``bundles_root``. It batches up to 4 frames (20 ms
    window) so concurrent streams really share batches in the tests. Latency shedding is off (tests that
    count answers must not see refusals when the shared CPUs are slow); tests/test_server_limits.py
    tests it."""
    from server.service import Service

    svc = Service(bundles_root, max_batch=4, batch_wait_ms=20, shed_latency_ms=0)
    svc.load()
    yield svc
    svc.close()


@pytest.fixture(scope="session")
def live_server(server_service):  # noqa: ANN001, ANN201 - server.main.PaletteLinkServer
    """An in-process server (gRPC + HTTP, no auth, no TLS) on free 127.0.0.1 ports.
    ``live_server.grpc_address`` is ``host:port``; ``live_server.http_url`` is ``http://host:port``."""
    from server.main import PaletteLinkServer

    srv = PaletteLinkServer(server_service)
    srv.start()
    srv.load()
    yield srv
    srv.stop(grace=1.0, close_service=False)


@pytest.fixture(scope="session")
def grpc_stub(live_server):  # noqa: ANN001, ANN201 - palettelink_pb2_grpc.PaletteLinkStub
    import grpc

    from palettelink.v1 import palettelink_pb2_grpc

    with grpc.insecure_channel(live_server.grpc_address) as channel:
        yield palettelink_pb2_grpc.PaletteLinkStub(channel)


@contextlib.contextmanager
def _server_process(cmd: list[str], env: dict[str, str], cwd: Path, timeout: float = 180,
                    stop_timeout: float = 60) -> Iterator[dict[str, str]]:
    """Start ``cmd`` (a ``palettelink-server``), yield the fields of its READY line (``grpc``,
    ``http``, … ; bare words as "on") once it prints one, then SIGTERM it: it must exit 0. The log
    is in every failure message."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd,
                            env=env)
    lines: queue.Queue[str | None] = queue.Queue()
    log: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            log.append(line)
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    ready = None
    deadline = time.monotonic() + timeout
    while ready is None and time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            break
        if line is None:
            break
        if line.startswith("READY "):
            ready = dict(f.split("=", 1) if "=" in f else (f, "on") for f in line.split()[1:])
    try:
        if ready is None:
            pytest.fail("palettelink-server did not get READY:\n" + "".join(log))
        yield ready
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=stop_timeout) == 0, "".join(log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def server_process() -> Callable[..., contextlib.AbstractContextManager[dict[str, str]]]:
    """``with server_process(cmd, env, cwd) as ready:`` a real server process, READY fields yielded."""
    return _server_process

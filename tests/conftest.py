"""Shared fixtures: a real bundle built once per session from the installed detector weights."""

from __future__ import annotations

from pathlib import Path

import pytest

from palettelink.models.ultra import setup_offline

setup_offline()


def sample_images() -> list[Path]:
    """The sample images that ship with ultralytics (bus.jpg, zidane.jpg)."""
    import importlib.util

    spec = importlib.util.find_spec("ultralytics")
    assert spec and spec.origin
    assets = Path(spec.origin).parent / "assets"
    return [assets / "bus.jpg", assets / "zidane.jpg"]


@pytest.fixture(scope="session")
def images() -> list[Path]:
    return sample_images()


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


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--regenerate-golden", action="store_true",
                     help="rewrite committed golden streams (only when the format changes on purpose)")


@pytest.fixture(scope="session")
def regenerate(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--regenerate-golden"))

"""The model zoo: pretrained task models (ONNX, committed in ``assets/models/``) with numpy pre/post-
processing, one module per family. The server runs them on images the codec rebuilt.

Every model class has the same shape: ``Model(session_or_path=None, providers=None)``,
``preprocess(rgb) -> (feeds, meta)``, ``postprocess(outputs, meta) -> result``, ``run(rgb) -> result``
(HxWx3 uint8 RGB in, a small dataclass out, coordinates in original-image pixels). ``run`` keeps no
state between calls and onnxruntime sessions are thread-safe, so one instance serves many threads.

Where each file came from, its licence and its exact tensor contract: ``assets/models/zoo.json``
(written by ``tools/model_zoo/build.sh``) and ``MODELS.md``.
"""

from __future__ import annotations

import importlib
import json
import threading
from functools import cache
from pathlib import Path
from typing import Any

from palettelink.bundle import sha256_file
from palettelink.errors import BundleError

# registry: model name → (module, class, zoo.json entries it needs; the first is the main file)
REGISTRY: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "centernet": ("centernet", "CenterNet", ("centernet",)),
    "selfie": ("selfie", "Selfie", ("selfie",)),
    "meet": ("selfie", "Meet", ("meet",)),
    "movenet": ("movenet", "MoveNet", ("movenet-lightning",)),
    "movenet-lightning": ("movenet", "MoveNet", ("movenet-lightning",)),
    "movenet-multipose": ("movenet", "MoveNetMultiPose", ("movenet-multipose",)),
    "facemesh": ("facemesh", "FaceMesh", ("facemesh", "facemesh-detection-short")),
    "facemesh-detection-short": ("facemesh", "BlazeFace", ("facemesh-detection-short",)),
}


def zoo_dir() -> Path:
    """The repository's ``assets/models`` folder (ONNX files and ``zoo.json``)."""
    return Path(__file__).resolve().parents[3] / "assets" / "models"


@cache
def _manifest(folder: Path) -> dict[str, Any]:
    path = folder / "zoo.json"
    if not path.is_file():
        raise BundleError(f"model zoo manifest {path} is missing")
    return json.loads(path.read_text())


def manifest(folder: Path | None = None) -> dict[str, Any]:
    """``zoo.json`` of ``folder`` (default: :func:`zoo_dir`), parsed once."""
    return _manifest((folder or zoo_dir()).resolve())


def entry(name: str, folder: Path | None = None) -> dict[str, Any]:
    """The zoo.json entry of a file (``movenet`` and the other registry aliases resolve)."""
    key = REGISTRY[name][2][0] if name in REGISTRY else name
    models = manifest(folder)["models"]
    if key not in models:
        raise BundleError(f"model {name!r} is not in the model zoo (known: {sorted(models)})")
    return models[key]


_verified: dict[tuple[Path, int, int], str] = {}  # (path, size, mtime_ns) → sha256 already checked
_verified_lock = threading.Lock()


def verified_file(name: str, folder: Path | None = None) -> Path:
    """Path of the model's ONNX file after checking it against zoo.json; :class:`BundleError` naming
    the file when it is missing or its sha256 differs (a truncated download, a stale LFS pointer)."""
    e = entry(name, folder)
    path = (folder or zoo_dir()) / e["file"]
    if not path.is_file():
        raise BundleError(f"model file {path} is missing (see MODELS.md: tools/model_zoo/build.sh)")
    st = path.stat()
    key = (path.resolve(), st.st_size, st.st_mtime_ns)
    with _verified_lock:
        if _verified.get(key) == e["sha256"]:
            return path
    got = sha256_file(path)
    if got != e["sha256"]:
        raise BundleError(f"model file {path} has sha256 {got}, zoo.json says {e['sha256']}")
    with _verified_lock:
        _verified[key] = got
    return path


def files_of(name: str, folder: Path | None = None) -> list[Path]:
    """Every verified file the registry model needs (``facemesh`` needs its face detector too)."""
    return [verified_file(n, folder) for n in REGISTRY[name][2]]


def load_session(name: str, providers: list[str] | None = None, folder: Path | None = None) -> Any:
    """An onnxruntime session of the zoo file ``name`` (sha256 checked first)."""
    return session(verified_file(name, folder), providers)


def session(path: str | Path, providers: list[str] | None = None) -> Any:
    """An onnxruntime session of ``path`` on the asked providers that this build has (CPU last)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    avail = ort.get_available_providers()
    chosen = [p for p in (providers or []) if p in avail and p != "CPUExecutionProvider"]
    return ort.InferenceSession(str(path), so, providers=[*chosen, "CPUExecutionProvider"])


def as_session(session_or_path: Any, name: str, providers: list[str] | None) -> Any:
    """What a model class's ``__init__`` got → a session: None loads the zoo file, a path loads it
    as is (a bundle's copy, checked by the bundle's own manifest), a session is used as it is."""
    if session_or_path is None:
        return load_session(name, providers)
    if isinstance(session_or_path, (str, Path)):
        if not Path(session_or_path).is_file():
            raise BundleError(f"model file {session_or_path} is missing")
        return session(session_or_path, providers)
    return session_or_path


def model_class(name: str) -> type:
    if name not in REGISTRY:
        raise BundleError(f"no model-zoo model {name!r} (known: {sorted(REGISTRY)})")
    module, cls, _ = REGISTRY[name]
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def load(name: str, session_or_path: Any = None, providers: list[str] | None = None) -> Any:
    """The model object for ``name`` (registry name, e.g. ``movenet``), on the given file or session;
    ``None`` loads the zoo's own verified file when the model first runs."""
    return model_class(name)(session_or_path, providers=providers)


def class_names(name: str) -> list[str]:
    """Names of the class ids the model reports (COCO-80 for centernet)."""
    return list(model_class(name).CLASS_NAMES)


def input_spec(name: str) -> dict[str, Any] | None:
    """The input contract of a zoo model for code that feeds it a [0, 1] image tensor:
    ``size`` (square side, or None), ``layout`` ("nhwc"/"nchw"), ``scale``/``offset`` (model value =
    x01 * scale + offset), ``dtype``, ``name``, ``shape``. None for a name the zoo does not know."""
    try:
        i = entry(name)["input"]
    except (BundleError, KeyError):
        return None
    lo, hi = (float(v) for v in i["range"].split(".."))
    shape = list(i["shape"])
    size = shape[1] if shape[1] == shape[2] and shape[1] > 0 else None
    return {"name": i["name"], "shape": shape, "dtype": i["dtype"], "layout": i["layout"].split()[0].lower(),
            "size": size, "scale": hi - lo, "offset": lo}


class LazySession:
    """A session made on first use, once, under a lock: a model object built only for its
    ``postprocess`` (a split bundle's tail already ran the network) never loads the file."""

    def __init__(self, session_or_path: Any, name: str, providers: list[str] | None) -> None:
        self._src, self._name, self._providers = session_or_path, name, providers
        self._session: Any = None
        self._lock = threading.Lock()

    def get(self) -> Any:
        if self._session is None:
            with self._lock:
                if self._session is None:
                    self._session = as_session(self._src, self._name, self._providers)
        return self._session

    def run(self, feeds: dict[str, Any], outputs: list[str] | None = None) -> list[Any]:
        return self.get().run(outputs, feeds)

"""Task runners: name → class. A new task is one module that registers itself here (and one line in
``MODULES``); the service and both transports pick it up with no other change.

A runner owns the task model of one bundle. It is only ever called from that bundle's batching
worker thread (see :mod:`server.batching`), so it needs no locking of its own.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Protocol

from palettelink.bundle import Bundle
from palettelink.codecs import Decoded
from palettelink.errors import InvalidRequest
from server.results import TaskOutput

# task name → module that defines and registers its runner; imported on first use so a server that
# never runs a task never imports its model code.
MODULES: dict[str, str] = {
    "detect": "server.tasks.detect",
    "segment": "server.tasks.segment",
    "landmarks": "server.tasks.landmarks",
    "pose": "server.tasks.pose",
    "preview": "server.tasks.preview",
}


class TaskRunner(Protocol):
    name: str

    def run_batch(self, items: Sequence[Decoded], want_preview: bool = False) -> list[TaskOutput]:
        """Results for each decoded frame, in order. Items are all for this runner's bundle."""
        ...

    def warmup(self) -> None:
        """Run once on dummy input so the first real frame does not pay for lazy initialisation."""
        ...


class RunnerClass(Protocol):
    def __call__(self, bundle: Bundle, device: str) -> TaskRunner: ...

    def supports(self, bundle: Bundle) -> bool: ...


_REGISTRY: dict[str, RunnerClass] = {}


def register(name: str) -> Callable[[type], type]:
    """Class decorator: ``@register("detect")``. The class takes ``(bundle, device)`` and has a
    ``supports(bundle)`` classmethod."""

    def deco(cls: type) -> type:
        _REGISTRY[name] = cls  # type: ignore[assignment]
        cls.name = name  # type: ignore[attr-defined]
        return cls

    return deco


def runner_class(name: str) -> RunnerClass:
    if name not in _REGISTRY:
        if name not in MODULES:
            raise InvalidRequest(f"unknown task {name!r}; this server runs {sorted(MODULES)}")
        importlib.import_module(MODULES[name])
    return _REGISTRY[name]


def tasks_for(bundle: Bundle) -> list[str]:
    """The tasks this server can run on ``bundle``: the bundle's own task first."""
    names = [bundle.task] + [t for t in bundle.manifest.get("tasks", []) if t != bundle.task]
    return [t for t in names if t in MODULES and runner_class(t).supports(bundle)]


def make_runner(name: str, bundle: Bundle, device: str = "cpu") -> TaskRunner:
    cls = runner_class(name)
    if not cls.supports(bundle):
        raise InvalidRequest(f"bundle {bundle.id} does not support task {name!r}")
    return cls(bundle, device)

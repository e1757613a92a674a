"""The machinery every codec trainer shares, at the bottom of ``train/``: cached stages, seeding,
JSON-ready reports, the context-table stage. Trainers (``pipeline``, ``image_codec``) import it;
it imports no trainer, so the trainers never import each other for it."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Any, Self

import numpy as np


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Stage:
    """A cached step: ``done`` when its marker file exists."""

    def __init__(self, work: Path, name: str) -> None:
        self.dir = work / name
        self.marker = self.dir / "done.json"

    @property
    def done(self) -> bool:
        return self.marker.is_file()

    def finish(self, info: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.marker.write_text(json.dumps(info, indent=2, default=str))

    def info(self) -> dict[str, Any]:
        return json.loads(self.marker.read_text())


def jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    return x


class JsonConfig:
    """A dataclass config kept in codec.json (mixed into each trainer's config): tuples go out as JSON
    lists and come back as tuples, and keys this version does not know are dropped, so a codec.json
    written by a newer trainer still loads."""

    def to_dict(self) -> dict[str, Any]:
        return jsonable(dataclasses.asdict(self))  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Self:
        fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        known = {k: tuple(v) if isinstance(fields[k].default, tuple) else v
                 for k, v in d.items() if k in fields}
        return cls(**known)


def context_stage(work: Path, maps: np.ndarray, tables: dict[str, np.ndarray]) -> dict[str, Any]:
    """Stage g, cached: fit the context tables on ``maps`` and add them to ``tables`` (in place)."""
    from palettelink.train import context

    st = Stage(work, "context")
    if not st.done:
        fit: dict[str, Any] = {}
        ctx = context.fit_context_tables(maps, tables, report=fit)
        st.dir.mkdir(parents=True, exist_ok=True)
        np.savez(st.dir / "ctx.npz", **ctx)
        st.finish({"fit": fit})
    tables.update(dict(np.load(st.dir / "ctx.npz")))
    return st.info()

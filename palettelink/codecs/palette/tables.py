"""Frozen palette tables (``palette.npz``): validation and the hierarchy's derived maps.

The layout is in :mod:`palettelink.codecs.palette`'s docstring and docs/CONTRACTS.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from palettelink import entropy
from palettelink.errors import BundleError, InvalidRequest

TABLES_FILE = "palette.npz"
CTX_FORMAT = 3
PASSES = ("a", "e", "f", "d", "b")  # coding order within a layer (package docstring)
N_A = 25  # anchor contexts: n4 same-parent (0..4) + 5 * diagonal same-parent (0..4)
N_NC = 11  # (n same-parent neighbours, count of the mode) pairs, see _NC_INDEX
PROB_TOTAL = 1 << entropy.PROB_BITS
MODELS = ("static", "context")


@dataclass
class PaletteTables:
    """``palette.npz`` loaded, validated, with the hierarchy's derived maps.

    ``parent[t]`` [G, K_t]: id at level t+1 (zeros at t = L-1: the virtual root);
    ``rank[t]`` [G, K_t]: rank among the parent's children; ``nch[t]`` [G, K_{t+1}]: child counts;
    ``child[t]`` [G, K_{t+1}, M_t]: level-t id of each (parent, rank), -1 where none.
    """

    groups: np.ndarray
    sizes: np.ndarray
    ancestor: np.ndarray  # [G, L, K0]
    centroids: list[list[np.ndarray]]  # [g][t] → [K_t, Cg] float32
    search: list[np.ndarray]
    embed: list[tuple[np.ndarray, np.ndarray] | None]
    parent: list[np.ndarray]
    rank: list[np.ndarray]
    nch: list[np.ndarray]
    child: list[np.ndarray]
    static: list[np.ndarray]
    ctx: dict[str, list[np.ndarray]] | None  # pass → per-level tables (PASSES)
    arrays: dict[str, np.ndarray] = field(repr=False, default_factory=dict)

    @property
    def n_groups(self) -> int:
        return len(self.groups) - 1

    @property
    def n_levels(self) -> int:
        return len(self.sizes)

    @property
    def channels(self) -> int:
        return int(self.groups[-1])

    @property
    def default_model(self) -> str:
        return "context" if self.ctx is not None else "static"

    def width(self, t: int) -> int:
        """M_t: the widest sibling set at level t (row width of its tables)."""
        return int(self.child[t].shape[2])

    @classmethod
    def load(cls, path: str | Path) -> PaletteTables:
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError) as e:
            raise BundleError(f"cannot read palette tables {path}: {e}") from e
        return cls.from_arrays(arrays, str(path))

    @classmethod
    def from_arrays(cls, a: Mapping[str, np.ndarray], where: str = "palette tables") -> PaletteTables:
        """Validate every shape, dtype and range; derive the hierarchy maps. Raises BundleError."""

        def need(key: str) -> np.ndarray:
            if key not in a:
                raise BundleError(f"{where}: missing array {key!r}")
            return np.asarray(a[key])

        def bad(msg: str) -> BundleError:
            return BundleError(f"{where}: {msg}")

        groups = need("groups").astype(np.int64)
        sizes = need("level_sizes").astype(np.int64)
        if groups.ndim != 1 or len(groups) < 2 or groups[0] != 0 or (np.diff(groups) <= 0).any():
            raise bad(f"groups must be increasing channel offsets from 0, got {groups.tolist()}")
        if sizes.ndim != 1 or len(sizes) < 1 or (np.diff(sizes) >= 0).any() or sizes[-1] < 1 \
                or sizes[0] > 1 << 16:
            raise bad(f"level_sizes must strictly decrease, got {sizes.tolist()}")
        g_n, n_l, k0 = len(groups) - 1, len(sizes), int(sizes[0])
        anc: list[np.ndarray] = []
        cents: list[list[np.ndarray]] = []
        search: list[np.ndarray] = []
        embed: list[tuple[np.ndarray, np.ndarray] | None] = []
        for g in range(g_n):
            cg = int(groups[g + 1] - groups[g])
            an = need(f"g{g}_ancestor").astype(np.int64)
            if an.shape != (n_l, k0):
                raise bad(f"g{g}_ancestor has shape {an.shape}, expected {(n_l, k0)}")
            if (an[0] != np.arange(k0)).any():
                raise bad(f"g{g}_ancestor row 0 must be arange(K0)")
            for t in range(n_l):
                if an[t].min() < 0 or an[t].max() >= sizes[t] or len(np.unique(an[t])) != sizes[t]:
                    raise bad(f"g{g}_ancestor level {t} is not onto 0..{sizes[t] - 1}")
                if t + 1 < n_l:
                    par = np.full(sizes[t], -1, np.int64)
                    par[an[t]] = an[t + 1]
                    if (par[an[t]] != an[t + 1]).any():
                        raise bad(f"g{g}: levels {t} and {t + 1} are not nested")
            anc.append(an)
            cl = []
            for t in range(n_l):
                c = need(f"g{g}_centroids_{t}")
                if c.shape != (sizes[t], cg) or not np.isfinite(c).all():
                    raise bad(f"g{g}_centroids_{t} must be finite [{sizes[t]}, {cg}], got {c.shape}")
                cl.append(np.ascontiguousarray(c, dtype=np.float32))
            cents.append(cl)
            s = need(f"g{g}_search")
            if s.ndim != 2 or s.shape[0] != k0 or not np.isfinite(s).all():
                raise bad(f"g{g}_search must be finite [{k0}, D], got {s.shape}")
            search.append(s.astype(np.float32))
            if f"g{g}_embed_w" in a:
                w, b = need(f"g{g}_embed_w"), need(f"g{g}_embed_b")
                if w.shape != (s.shape[1], cg) or b.shape != (s.shape[1],):
                    raise bad(f"g{g}_embed_w/b shapes {w.shape}/{b.shape} do not fit D={s.shape[1]}, Cg={cg}")
                embed.append((w.astype(np.float32), b.astype(np.float32)))
            else:
                if s.shape[1] != cg:
                    raise bad(f"g{g}_search has D={s.shape[1]} but no embedding for Cg={cg}")
                embed.append(None)
        ancestor = np.stack(anc)
        parent, rank, nch, child = _hierarchy(ancestor, sizes)
        static = _level_tables(a, "ctx_static_t{t}", [(g_n, int(sizes[t + 1]) if t + 1 < n_l else 1,
                                                        child[t].shape[2]) for t in range(n_l)], bad)
        if static is None:
            static = [_uniform_rows(nch[t], child[t].shape[2]) for t in range(n_l)]
        ka = [int(sizes[t + 1]) if t + 1 < n_l else 1 for t in range(n_l)]
        wd = [child[t].shape[2] for t in range(n_l)]
        shapes = {p: [(g_n, ka[t], N_A if p == "a" else N_NC * wd[t], wd[t]) for t in range(n_l)]
                  for p in PASSES}
        found = {p: _level_tables(a, f"ctx_{p}_t{{t}}", shapes[p], bad) for p in PASSES}
        present = [p for p in PASSES if found[p] is not None]
        if present and len(present) != len(PASSES):
            raise bad(f"context tables for passes {present} only; need all of {list(PASSES)}")
        if "ctx_info" in a and int(np.asarray(a["ctx_info"]).ravel()[0]) != CTX_FORMAT:
            raise bad(f"ctx tables have format {int(np.asarray(a['ctx_info']).ravel()[0])}, "
                      f"this build reads {CTX_FORMAT}")
        ctx = {p: v for p, v in found.items() if v is not None} if present else None
        return cls(groups, sizes, ancestor, cents, search, embed, parent, rank, nch, child, static,
                   ctx, dict(a))

    # ---- lookups ----------------------------------------------------------------------------------

    def ids_at(self, finest: np.ndarray, level: int) -> np.ndarray:
        """Finest index maps [G, h, w] → ids at ``level`` (the forward diffusion, t steps at once)."""
        gi = np.arange(self.n_groups)[:, None, None]
        return self.ancestor[gi, level, finest]

    def coarsen(self, ids: np.ndarray, level: int, to: int) -> np.ndarray:
        """Ids at ``level`` → ids at a coarser level ``to`` ≥ level."""
        gi = np.arange(self.n_groups)[:, None, None]
        for t in range(level, to):
            ids = self.parent[t][gi, ids]
        return ids

    def dequantise(self, ids: np.ndarray, level: int) -> np.ndarray:
        """Index maps [G, h, w] at ``level`` → z-hat [1, C, h, w] float32 (each entry's mean latent)."""
        g_n, h, w = ids.shape
        out = np.empty((1, self.channels, h, w), np.float32)
        for g in range(g_n):
            c = self.centroids[g][level][ids[g]]  # [h, w, Cg]
            out[0, self.groups[g]:self.groups[g + 1]] = np.moveaxis(c, -1, 0)
        return out

    def assign(self, z: np.ndarray) -> np.ndarray:
        """z [C, h, w] or [1, C, h, w] → finest index maps [G, h, w] (nearest search entry, numpy)."""
        z = np.asarray(z, np.float32).reshape(self.channels, *np.shape(z)[-2:])
        out = []
        for g in range(self.n_groups):
            x = z[self.groups[g]:self.groups[g + 1]].reshape(int(self.groups[g + 1] - self.groups[g]), -1).T
            if self.embed[g] is not None:
                w, b = self.embed[g]  # type: ignore[misc]
                x = x @ w.T + b
            s = self.search[g]
            d = (s * s).sum(1)[None, :] - 2.0 * (x @ s.T)
            out.append(np.argmin(d, axis=1).astype(np.int64))
        return np.stack(out).reshape(self.n_groups, *z.shape[1:])


def _level_tables(a: Mapping[str, np.ndarray], key: str, shapes: Sequence[tuple[int, ...]],
                  bad: Any) -> list[np.ndarray] | None:
    """Read one integer table per level; None when the file has none; BundleError when malformed."""
    keys = [key.format(t=t) for t in range(len(shapes))]
    present = [k in a for k in keys]
    if not any(present):
        return None
    if not all(present):
        raise bad(f"{key} tables present for some levels only")
    out = []
    for k, shape in zip(keys, shapes, strict=True):
        arr = np.asarray(a[k])
        if arr.shape != shape or arr.dtype.kind not in "ui":
            raise bad(f"{k} must be integer {shape}, got {arr.dtype} {arr.shape}")
        arr = arr.astype(np.int64)
        if (arr < 1).any() or (arr.sum(-1) != PROB_TOTAL).any():
            raise bad(f"{k}: every row must be ≥ 1 and sum to {PROB_TOTAL}")
        out.append(arr)
    return out


def _hierarchy(ancestor: np.ndarray, sizes: np.ndarray) -> tuple[list[np.ndarray], ...]:
    """Parent, rank-among-siblings, child count and child id tables of every level."""
    g_n, n_l, _ = ancestor.shape
    parent, rank, nch, child = [], [], [], []
    for t in range(n_l):
        kt = int(sizes[t])
        kp = int(sizes[t + 1]) if t + 1 < n_l else 1
        par = np.zeros((g_n, kt), np.int64)
        for g in range(g_n):
            if t + 1 < n_l:
                par[g, ancestor[g, t]] = ancestor[g, t + 1]
        cnt = np.zeros((g_n, kp), np.int64)
        rk = np.zeros((g_n, kt), np.int64)
        for g in range(g_n):
            for k in range(kt):  # children sorted by id: rank = running count of the parent
                p = par[g, k]
                rk[g, k] = cnt[g, p]
                cnt[g, p] += 1
        m = int(cnt.max())
        ch = np.full((g_n, kp, m), -1, np.int64)
        for g in range(g_n):
            ch[g, par[g], rk[g]] = np.arange(kt)
        parent.append(par)
        rank.append(rk)
        nch.append(cnt)
        child.append(ch)
    return parent, rank, nch, child


def _uniform_rows(nch: np.ndarray, m: int) -> np.ndarray:
    """Static tables with every child of a parent equally likely (when none were trained)."""
    counts = (np.arange(m)[None, None, :] < nch[..., None]).astype(np.int64)
    return entropy.normalise_counts(counts)



def check_model(tb: PaletteTables, model: str | None) -> str:
    """The entropy model to code with: ``model``, else the tables' default; refused if absent."""
    model = model or tb.default_model
    if model not in MODELS:
        raise InvalidRequest(f"entropy model must be one of {MODELS}, got {model!r}")
    if model == "context" and tb.ctx is None:
        raise InvalidRequest("these palette tables carry no context model (ctx_*); use model='static'")
    return model

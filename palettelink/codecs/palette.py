"""Palette-diffusion codec runtime: nested index maps as an embedded, progressive stream (DESIGN §1, §3).

numpy + onnxruntime + constriction only (no torch): the edge and the server both import this module.

Levels: t = 0 is the finest palette (K0 entries per channel group), t = L-1 the coarsest. Every level-t
entry has exactly one parent at level t+1 (the Ward hierarchy), so a stream can be *embedded*:

- layer 0 codes the level L-1 index maps of all groups (as the refinement of a virtual one-entry
  root level L, so it shares the code below);
- layer i (i ≥ 1) codes level L-1-i given level L-i: per position the *rank* of its child among the
  parent's children (sorted by id; a parent has 1..M_t children, M_t the widest at that level).
  Positions whose parent has one child cost nothing and are not coded.

Any prefix of the layer list decodes exactly to a coarser level, and encoding level t directly gives
the same bytes as cutting the level-0 stream (each layer depends only on levels t and t+1).

Entropy models (integer tables frozen in ``palette.npz``, written by ``palettelink.train.context``):

- static: ``ctx_static_t{t}`` uint16 [G, K_{t+1}, M_t]: p(child rank | group, parent), the fallback;
- context (the backward diffusion p(level t | level t+1, decoded neighbours)): each layer is coded in
  five passes over a 4×4 lattice (coarse to fine, like a 2-level checkerboard), every pass
  conditioned on the parent map and on the passes before it:

  ====  ==========================  ======================================================
  pass  positions (y, x mod 4)      context (table ``ctx_{pass}_t{t}``)
  ====  ==========================  ======================================================
  a     (0, 0)              (1/16)  :func:`anchor_context`: 4- and diagonal neighbours sharing
                                    the parent ([G, K_{t+1}, N_A, M_t])
  e     (2, 2)              (1/16)  :func:`neighbour_context`, diagonal neighbours at distance 2
                                    (all pass a) ([G, K_{t+1}, N_NC·M_t, M_t], also f, d, b)
  f     (0, 2), (2, 0)      (1/8)   edge neighbours at distance 2 (passes a, e)
  d     (odd, odd)          (1/4)   diagonal neighbours (all even-even: passes a, e, f)
  b     y + x odd           (1/2)   edge neighbours (passes a, e, f, d)
  ====  ==========================  ======================================================

  ``neighbour_context``: among the decoded neighbours with the same parent, their number n, the mode
  child rank m and its count c (11 (n, c) pairs × m). Measured on bottleneck latents, blind positions
  cost ~0.97 bits, diagonal-context ones ~0.60, edge-context ones ~0.30: the fewer blind positions
  the better, so the plain checkerboard (half blind) became this lattice (1/16 blind).

Every row sums to 2**16 (``entropy.normalise_counts``); turning a row into probabilities is one exact
division, so decoding is bit-exact on any machine. Tables absent from the file fall back to uniform
static tables derived from the hierarchy, so a palette without ``ctx_*`` keys still codes.

One ANS stream per layer holds the passes of all groups in order (one flush per layer, not per pass).
Generative refinement (server, optional): the same models fill in unsent finer levels, by argmax or by
seeded sampling (integer CDFs and numpy's PCG64, so also reproducible everywhere).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from palettelink import bitstream, entropy
from palettelink.bundle import Bundle
from palettelink.codecs import Analysis, CodecSpec, Decoded, Encoded, register
from palettelink.errors import BundleError, InvalidRequest, InvalidStream
from palettelink.front import ort_session
from palettelink.image import Letterbox, letterbox

CODEC = "palette"
TABLES_FILE = "palette.npz"
CTX_FORMAT = 3
PASSES = ("a", "e", "f", "d", "b")  # coding order within a layer (module docstring)
N_A = 25  # anchor contexts: n4 same-parent (0..4) + 5 * diagonal same-parent (0..4)
N_NC = 11  # (n same-parent neighbours, count of the mode) pairs, see _NC_INDEX
PROB_TOTAL = 1 << entropy.PROB_BITS
MAX_POSITIONS = 1 << 16  # h*w a stream may ask for (640² at stride 16 is 1600)
MODELS = ("static", "context")
FLAG_STATIC = 0x01  # container codec flag: the layers use the static tables (else the context model)
GENERATE_MODES = ("argmax", "sample")

# (n, c) → context index: n = same-parent decoded neighbours (0..4), c = count of the mode (1..n)
_NC_INDEX = np.zeros((5, 5), dtype=np.int64)
_k = 1
for _n in range(1, 5):
    for _c in range(1, _n + 1):
        _NC_INDEX[_n, _c] = _k
        _k += 1
assert _k == N_NC


# --------------------------------------------------------------------------------------------------
# frozen tables


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


# --------------------------------------------------------------------------------------------------
# contexts (shared with palettelink.train.context, which fits the tables on the same definitions)


def pass_masks(h: int, w: int) -> list[np.ndarray]:
    """[h, w] masks of the passes, in :data:`PASSES` order (module docstring)."""
    y, x = np.arange(h)[:, None], np.arange(w)[None, :]
    y4, x4 = y % 4, x % 4
    return [(y4 == 0) & (x4 == 0), (y4 == 2) & (x4 == 2),
            ((y4 == 0) & (x4 == 2)) | ((y4 == 2) & (x4 == 0)),
            (y % 2 == 1) & (x % 2 == 1), (y + x) % 2 == 1]


_EDGE = ((-1, 0), (1, 0), (0, -1), (0, 1))
_DIAG = ((-1, -1), (-1, 1), (1, -1), (1, 1))


_PAD = 2  # the farthest neighbour a context reads


def _pad(a: np.ndarray) -> np.ndarray:
    return np.pad(a, ((0, 0), (_PAD, _PAD), (_PAD, _PAD)), constant_values=-1)


def _around(padded: np.ndarray, pos: tuple[np.ndarray, ...], offsets: tuple[tuple[int, int], ...],
            step: int = 1) -> np.ndarray:
    """Values of a -1-padded map at ``offsets`` × ``step`` around positions ``pos`` → [4, n]."""
    g, y, x = pos
    hp, wp = padded.shape[1:]
    flat = padded.ravel()
    base = (g * hp + y + _PAD) * wp + x + _PAD
    return np.stack([flat[base + step * (dy * wp + dx)] for dy, dx in offsets])


def anchor_context(parents: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Pass a context at ``mask`` positions: same-parent 4-neighbours + 5 × same-parent diagonals.

    Inside a region of one parent the child is the region's typical one; at a region border it is the
    child nearest the other parent: the counts separate the two cases.
    """
    pos = np.nonzero(mask)
    pp = _pad(parents)
    me = parents[pos]
    n4 = (_around(pp, pos, _EDGE) == me).sum(0)
    nd = (_around(pp, pos, _DIAG) == me).sum(0)
    return (n4 + 5 * nd).astype(np.int64)


def neighbour_context(parents: np.ndarray, ranks: np.ndarray, width: int, mask: np.ndarray,
                      diagonal: bool = False, step: int = 1) -> np.ndarray:
    """Context at ``mask`` positions from 4 already-decoded neighbours (edge or diagonal ones,
    ``step`` apart).

    Among neighbours with the same parent: n (0..4), the mode child rank m (ties → smaller rank) and
    its count c; context = _NC_INDEX[n, c] * width + m (m = 0 when n = 0).
    """
    pos = np.nonzero(mask)
    offs = _DIAG if diagonal else _EDGE
    same = _around(_pad(parents), pos, offs, step) == parents[pos]
    r = np.where(same, _around(_pad(ranks), pos, offs, step), -1)  # [4, n]
    valid = r >= 0
    n = valid.sum(0)
    cnt = ((r[:, None] == r[None, :]) & valid[None, :]).sum(1) * valid  # [4, n] count of each value
    key = np.where(valid, cnt * (width + 1) - r, -1)
    best = np.argmax(key, axis=0)[None]
    m = np.take_along_axis(r, best, 0)[0].clip(min=0)
    c = np.take_along_axis(cnt, best, 0)[0]
    return _NC_INDEX[n, c] * width + m


def pass_context(name: str, parents: np.ndarray, ranks: np.ndarray, width: int, mask: np.ndarray,
                 ) -> np.ndarray:
    """Contexts of pass ``name`` at ``mask`` positions, in C order (ranks need only be valid at
    earlier passes' positions)."""
    if name == "a":
        return anchor_context(parents, mask)
    return neighbour_context(parents, ranks, width, mask, diagonal=name in ("e", "d"),
                             step=2 if name in ("e", "f") else 1)


# --------------------------------------------------------------------------------------------------
# one refinement layer


@dataclass
class _Layer:
    """Where the symbols of one layer are (per pass), and their table rows."""

    t: int
    parents: np.ndarray
    gi: np.ndarray
    masks: list[np.ndarray]  # per pass: positions whose parent has ≥ 2 children
    model: str

    @classmethod
    def make(cls, tb: PaletteTables, t: int, parents: np.ndarray, model: str) -> _Layer:
        g_n, h, w = parents.shape
        gi = np.broadcast_to(np.arange(g_n)[:, None, None], parents.shape)
        multi = tb.nch[t][gi, parents] > 1
        return cls(t, parents, gi, [multi & m[None] for m in pass_masks(h, w)], model)

    def rows(self, tb: PaletteTables, k: int, ranks: np.ndarray) -> np.ndarray:
        """Integer table rows of pass ``k``'s symbols (ranks of earlier passes already filled in)."""
        m, p = self.masks[k], self.parents
        if self.model == "static":
            return tb.static[self.t][self.gi[m], p[m]]
        ctx = pass_context(PASSES[k], p, ranks, tb.width(self.t), m)
        return tb.ctx[PASSES[k]][self.t][self.gi[m], p[m], ctx]  # type: ignore[index]

    def n_children(self, tb: PaletteTables, k: int) -> np.ndarray:
        m = self.masks[k]
        return tb.nch[self.t][self.gi[m], self.parents[m]]


def _parents_of(tb: PaletteTables, ids_above: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray:
    if ids_above is None:
        return np.zeros((tb.n_groups, *shape), np.int64)
    return ids_above


def _check_model(tb: PaletteTables, model: str | None) -> str:
    model = model or tb.default_model
    if model not in MODELS:
        raise InvalidRequest(f"entropy model must be one of {MODELS}, got {model!r}")
    if model == "context" and tb.ctx is None:
        raise InvalidRequest("these palette tables carry no context model (ctx_*); use model='static'")
    return model


def encode_layer(tb: PaletteTables, t: int, ids: np.ndarray, ids_above: np.ndarray | None,
                 model: str | None = None) -> bytes:
    """Code level-t ids [G, h, w] given level t+1 ids (None for t = L-1: the root)."""
    model = _check_model(tb, model)
    gi = np.arange(tb.n_groups)[:, None, None]
    parents = _parents_of(tb, ids_above, ids.shape[1:])
    ranks = tb.rank[t][gi, ids]
    lay = _Layer.make(tb, t, parents, model)
    coder = entropy.RowEncoder()
    for k in range(len(PASSES)):  # one segment per pass, decoded in this order
        sym = ranks[lay.masks[k]]
        if sym.size:
            coder.add(sym, lay.rows(tb, k, ranks))
    return coder.to_bytes()


def decode_layer(tb: PaletteTables, t: int, data: bytes, ids_above: np.ndarray | None,
                 shape: tuple[int, int], model: str | None = None) -> np.ndarray:
    """Inverse of :func:`encode_layer` → level-t ids [G, h, w]. Malformed data → InvalidStream."""
    model = _check_model(tb, model)
    parents = _parents_of(tb, ids_above, shape)
    lay = _Layer.make(tb, t, parents, model)
    ranks = np.zeros(parents.shape, np.int64)
    try:
        coder = entropy.RowDecoder(data)
        for k, mask in enumerate(lay.masks):
            if not mask.any():
                continue
            sym = coder.take(lay.rows(tb, k, ranks)).astype(np.int64)
            if (sym >= lay.n_children(tb, k)).any():
                raise InvalidStream("it decodes to a child that does not exist (corrupt)")
            ranks[mask] = sym
        coder.finish()
    except InvalidStream as e:
        raise InvalidStream(f"layer for level {t}: {e}") from e
    gi = np.arange(tb.n_groups)[:, None, None]
    return tb.child[t][gi, parents, ranks]


def generate_layer(tb: PaletteTables, t: int, ids_above: np.ndarray | None, shape: tuple[int, int],
                   mode: str = "argmax", rng: np.random.Generator | None = None,
                   model: str | None = None) -> np.ndarray:
    """Backward diffusion without bits: fill level t from level t+1 with the entropy model itself."""
    model = _check_model(tb, model)
    if mode not in GENERATE_MODES:
        raise InvalidRequest(f"generation mode must be one of {GENERATE_MODES}, got {mode!r}")
    if mode == "sample" and rng is None:
        rng = np.random.default_rng(0)
    parents = _parents_of(tb, ids_above, shape)
    lay = _Layer.make(tb, t, parents, model)
    ranks = np.zeros(parents.shape, np.int64)
    for k, mask in enumerate(lay.masks):
        if not mask.any():
            continue
        rows = lay.rows(tb, k, ranks)
        nch = lay.n_children(tb, k)
        rows = np.where(np.arange(rows.shape[1])[None, :] < nch[:, None], rows, 0)
        if mode == "argmax":
            ranks[mask] = np.argmax(rows, axis=1)
        else:
            cdf = np.cumsum(rows, axis=1)
            u = rng.integers(0, cdf[:, -1], dtype=np.int64)  # type: ignore[union-attr]
            ranks[mask] = (cdf <= u[:, None]).sum(1)
    gi = np.arange(tb.n_groups)[:, None, None]
    return tb.child[t][gi, parents, ranks]


# --------------------------------------------------------------------------------------------------
# whole streams (pure functions: the benchmark, tests and training use these directly)


def _check_level(tb: PaletteTables, level: int) -> int:
    if isinstance(level, bool) or not isinstance(level, int | np.integer) or not 0 <= level < tb.n_levels:
        raise InvalidRequest(f"palette level must be an integer in 0..{tb.n_levels - 1}, got {level!r}")
    return int(level)


def encode_levels(indices_finest: np.ndarray, tables: PaletteTables, level: int = 0,
                  model: str | None = None) -> list[bytes]:
    """Finest index maps [G, h, w] → layers: level L-1, then one refinement per level down to ``level``."""
    level = _check_level(tables, level)
    fin = np.asarray(indices_finest, dtype=np.int64)
    if fin.ndim != 3 or fin.shape[0] != tables.n_groups:
        raise InvalidRequest(f"index maps must be [{tables.n_groups}, h, w], got {fin.shape}")
    if fin.min() < 0 or fin.max() >= tables.sizes[0]:
        raise InvalidRequest(f"finest indices must lie in 0..{tables.sizes[0] - 1}")
    layers = []
    above = None
    for t in range(tables.n_levels - 1, level - 1, -1):
        ids = tables.ids_at(fin, t)
        layers.append(encode_layer(tables, t, ids, above, model))
        above = ids
    return layers


@dataclass
class DecodedIndices:
    indices: np.ndarray  # [G, h, w] ids at ``level``
    level: int  # the level the index maps hold (after generation, if any)
    sent_level: int  # the finest level the bits carried


def decode_layers(layers: Sequence[bytes], tables: PaletteTables, coarsest: int, shape: Sequence[int],
                  model: str | None = None, generate_to: int | None = None, mode: str = "argmax",
                  seed: int = 0) -> tuple[np.ndarray, int]:
    """Layers → (index maps [G, h, w] at the final level, final level).

    The final level is ``coarsest - (len(layers) - 1)``, or ``generate_to`` when the server fills in
    finer levels with the backward model (argmax, or sampling seeded by ``seed``).
    """
    r = decode_layers_full(layers, tables, coarsest, shape, model, generate_to, mode, seed)
    return r.indices, r.level


def decode_layers_full(layers: Sequence[bytes], tables: PaletteTables, coarsest: int, shape: Sequence[int],
                       model: str | None = None, generate_to: int | None = None, mode: str = "argmax",
                       seed: int = 0) -> DecodedIndices:
    """:func:`decode_layers` that also says which level the bits carried."""
    if coarsest != tables.n_levels - 1:
        raise InvalidStream(f"stream starts at level {coarsest}; these tables start at {tables.n_levels - 1}")
    if not 0 < len(layers) <= tables.n_levels:
        raise InvalidStream(f"{len(layers)} layers for a palette of {tables.n_levels} levels")
    h, w = (int(v) for v in tuple(shape)[-2:])
    if not (0 < h and 0 < w and h * w <= MAX_POSITIONS):
        raise InvalidStream(f"latent size {h}x{w} out of range")
    above = None
    t = coarsest
    for i, data in enumerate(layers):
        t = coarsest - i
        above = decode_layer(tables, t, bytes(data), above, (h, w), model)
    assert above is not None
    sent = t
    if generate_to is not None:
        if isinstance(generate_to, bool) or not 0 <= int(generate_to) <= sent:
            raise InvalidRequest(f"generate_to must be a level in 0..{sent}, got {generate_to!r}")
        rng = np.random.default_rng(seed)
        for t in range(sent - 1, int(generate_to) - 1, -1):
            above = generate_layer(tables, t, above, (h, w), mode, rng, model)
        t = int(generate_to)
    return DecodedIndices(above, t, sent)


def layer_bits(indices_finest: np.ndarray, tables: PaletteTables, model: str | None = None) -> list[int]:
    """Bits of each layer of the full (level-0) stream; level t costs the sum of the first L-t."""
    return [8 * len(x) for x in encode_levels(indices_finest, tables, 0, model)]


def mean_level_bits(tables: PaletteTables, maps: np.ndarray | Sequence[np.ndarray],
                    model: str | None = None) -> dict[int, float]:
    """Mean coded bits (layers only, no header) of every level over finest index maps [N, G, h, w]
    (e.g. ``palettelink.train.palette.index_maps(latents, tables)``)."""
    if isinstance(maps, str | Path):
        raise TypeError("mean_level_bits takes index maps [N, G, h, w], not a folder: pass "
                        "palettelink.train.palette.index_maps(latents, tables)")
    maps = np.asarray(maps)
    if maps.ndim == 3:
        maps = maps[None]
    if maps.ndim == 4 and maps.shape[1] != tables.n_groups and maps.shape[0] == tables.n_groups:
        maps = maps.transpose(1, 0, 2, 3)  # [G, N, h, w] (one array per group) → [N, G, h, w]
    per = np.array([np.cumsum(layer_bits(m, tables, model)) for m in maps], dtype=np.float64)
    n_l = tables.n_levels
    return {t: float(per[:, n_l - 1 - t].mean()) for t in range(n_l)}


# --------------------------------------------------------------------------------------------------
# edge encoder and server decoder


def _tables_file(bundle: Bundle) -> Path:
    spec = bundle.codecs.get(CODEC, {})
    return bundle.file(str(spec.get("tables", TABLES_FILE)))


@dataclass
class PaletteAnalysis(Analysis):
    """One image run through edge.onnx once: every level's stream can be cut from it."""

    indices: np.ndarray  # [G, h, w] finest
    letterbox: Letterbox
    layers: list[bytes] | None = None  # the full progressive stream's layers, made on first use
    layer_ms: float = 0.0


class PaletteEncoder:
    """Edge: image → edge.onnx (level 0) → finest index maps → embedded stream cut at the level."""

    codec = CODEC

    def __init__(self, bundle: Bundle, threads: int | None = None, model: str | None = None) -> None:
        self.bundle = bundle
        self.tables = PaletteTables.load(_tables_file(bundle))
        self.model = _check_model(self.tables, model)
        self.session = ort_session(str(bundle.file("edge.onnx")), threads)
        self.input_name = self.session.get_inputs()[0].name
        names = [i.name for i in self.session.get_inputs()]
        if "level" not in names:
            raise BundleError(f"{bundle.id}: edge.onnx has inputs {names}, needs 'images' and 'level'")

    def levels(self) -> list[int]:
        return list(range(self.tables.n_levels))

    def analyse(self, rgb: np.ndarray) -> PaletteAnalysis:
        x, info = letterbox(rgb, self.bundle.input_size)
        t0 = time.perf_counter()
        feeds = {self.input_name: x, "level": np.asarray(0, dtype=np.int64)}
        (idx,) = self.session.run(["indices"], feeds)
        ms = (time.perf_counter() - t0) * 1e3
        idx = np.asarray(idx).astype(np.int64).reshape(self.tables.n_groups, *np.shape(idx)[-2:])
        if idx.min() < 0 or idx.max() >= self.tables.sizes[0]:
            raise BundleError(f"{self.bundle.id}: edge.onnx produced indices outside the palette")
        return PaletteAnalysis((info.width, info.height), ms, idx, info)

    def _layers(self, analysis: Analysis) -> list[bytes]:
        if not isinstance(analysis, PaletteAnalysis):
            raise InvalidRequest(f"the palette codec cuts its own analysis, not a {type(analysis).__name__}")
        if analysis.layers is None:
            t0 = time.perf_counter()
            analysis.layers = encode_levels(analysis.indices, self.tables, 0, self.model)
            analysis.layer_ms = (time.perf_counter() - t0) * 1e3
        return analysis.layers

    def _frame(self, analysis: PaletteAnalysis, layers: Sequence[bytes]) -> bitstream.Frame:
        _, h, w = analysis.indices.shape
        return bitstream.Frame(
            codec=CODEC, param=self.tables.n_levels - 1, bundle_id=self.bundle.id,
            table_hash=self.bundle.table_hash, image_size=analysis.image_size,
            shapes=((self.tables.channels, h, w),), layers=tuple(layers), progressive=True,
            codec_flags=FLAG_STATIC if self.model == "static" else 0)

    def encode_analysis(self, analysis: Analysis, level: int | None = None) -> Encoded:
        """The stream for ``level`` (default 0, the finest): a prefix of the full progressive stream."""
        level = _check_level(self.tables, 0 if level is None else level)
        layers = self._layers(analysis)[: self.tables.n_levels - level]
        assert isinstance(analysis, PaletteAnalysis)
        t0 = time.perf_counter()
        payload = bitstream.pack(self._frame(analysis, layers))
        ms = (time.perf_counter() - t0) * 1e3
        return Encoded(payload, CODEC, level, analysis.image_size,
                       {"front_ms": analysis.front_ms, "encode_ms": analysis.layer_ms + ms})

    def level_sizes(self, analysis: Analysis) -> dict[int, int]:
        """Exact payload bytes of every level (one progressive encode gives every prefix)."""
        layers = self._layers(analysis)
        assert isinstance(analysis, PaletteAnalysis)
        n_l = self.tables.n_levels
        return {t: len(bitstream.pack(self._frame(analysis, layers[: n_l - t]))) for t in range(n_l)}

    def encode(self, rgb: np.ndarray, level: int | None = None) -> Encoded:
        level = _check_level(self.tables, 0 if level is None else level)
        return self.encode_analysis(self.analyse(rgb), level)


class PaletteDecoder:
    """Server: stream → index maps (complete layers) → centroids → decoder.onnx(z, level) → tensors.

    ``generate_to``: fill finer levels than were sent with the backward model (``mode`` argmax or
    seeded sampling) before decoding; the decoder network then runs at that level.
    """

    codec = CODEC

    def __init__(self, bundle: Bundle, threads: int | None = None, generate_to: int | None = None,
                 mode: str = "argmax", seed: int = 0, model: str | None = None) -> None:
        self.bundle = bundle
        self.tables = PaletteTables.load(_tables_file(bundle))
        self.model = _check_model(self.tables, model)
        if mode not in GENERATE_MODES:
            raise InvalidRequest(f"generation mode must be one of {GENERATE_MODES}, got {mode!r}")
        self.generate_to, self.mode, self.seed = generate_to, mode, seed
        self.session = ort_session(str(bundle.file("decoder.onnx")), threads)
        outs = [o.name for o in self.session.get_outputs()]
        wanted = [t.name for t in bundle.tensors]
        self.outputs = wanted if set(wanted) <= set(outs) else outs
        zin = next((i for i in self.session.get_inputs() if i.name == "z"), None)
        if zin is None:
            raise BundleError(f"{bundle.id}: decoder.onnx lacks the input 'z'")
        dims = list(zin.shape)[-2:]
        latent = bundle.codecs.get(CODEC, {}).get("latent")
        self.latent_hw: tuple[int, int] | None = None
        if isinstance(latent, list | tuple) and len(latent) == 3:
            self.latent_hw = (int(latent[1]), int(latent[2]))
        elif all(isinstance(d, int) for d in dims):
            self.latent_hw = (int(dims[0]), int(dims[1]))

    def decode_indices(self, frame: bitstream.Frame, generate_to: int | None = None) -> DecodedIndices:
        """Validate the frame against the tables and decode its complete layers."""
        if frame.codec != CODEC:
            raise InvalidStream(f"frame codec {frame.codec!r} is not {CODEC!r}")
        if len(frame.shapes) != 1:
            raise InvalidStream(f"palette frame must describe one latent, got {len(frame.shapes)}")
        c, h, w = frame.shapes[0]
        if c != self.tables.channels:
            raise InvalidStream(f"latent has {c} channels; this bundle's palette codes "
                                f"{self.tables.channels}")
        if self.latent_hw is not None and (h, w) != self.latent_hw:
            raise InvalidStream(f"latent {h}x{w} does not match the bundle's {self.latent_hw}")
        gen = self.generate_to if generate_to is None else generate_to
        final = frame.param - (len(frame.layers) - 1)
        if gen is not None and gen > final:
            gen = None  # the bits already reach a finer level than asked for
        model = "static" if frame.codec_flags & FLAG_STATIC else self.model
        if frame.codec_flags & ~FLAG_STATIC:
            raise InvalidStream(f"unknown palette stream flags {frame.codec_flags:#x}")
        return decode_layers_full(frame.layers, self.tables, frame.param, (h, w), model, gen,
                                  self.mode, self.seed)

    def decode_frame(self, frame: bitstream.Frame, n_bytes: int, generate_to: int | None = None) -> Decoded:
        t0 = time.perf_counter()
        r = self.decode_indices(frame, generate_to)
        z = self.tables.dequantise(r.indices, r.level)
        t1 = time.perf_counter()
        outs = self.session.run(self.outputs, {"z": z, "level": np.asarray(r.level, dtype=np.int64)})
        t2 = time.perf_counter()
        tensors = [np.asarray(o, dtype=np.float32) for o in outs]
        return Decoded(tensors, CODEC, r.sent_level, frame.image_size, n_bytes, frame.truncated,
                       {"decode_ms": (t1 - t0) * 1e3, "decoder_ms": (t2 - t1) * 1e3,
                        "generated_level": float(r.level)})


def _manifest_levels(bundle: Bundle) -> list[int]:
    """Levels from the manifest (finest first) without loading the tables; the tables when it has none."""
    entry = bundle.codecs.get(CODEC, {})
    levels = entry.get("levels")
    if levels:
        return sorted(int(lv["level"]) if isinstance(lv, dict) else int(lv) for lv in levels)
    if entry.get("level_sizes"):
        return list(range(len(entry["level_sizes"])))
    return list(range(PaletteTables.load(_tables_file(bundle)).n_levels))


SPEC = register(CodecSpec(
    name=CODEC, wire_id=2, param="level", label="L{}", progressive=True, exact_sizes=True,
    cut="latent", levels=_manifest_levels, offered=lambda bundle: CODEC in bundle.codecs,
    encoder=PaletteEncoder, decoder=PaletteDecoder, preference=10,
))

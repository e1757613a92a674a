"""Refinement layers and whole embedded streams: pure functions the runtime, the bench, tests and
training share (no ONNX, no bundle)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import palettelink.codecs.palette.batch as batch
from palettelink import entropy
from palettelink.codecs.palette.context import pass_context, pass_masks
from palettelink.codecs.palette.tables import PASSES, PaletteTables, check_model
from palettelink.errors import InvalidRequest, InvalidStream

MAX_POSITIONS = 1 << 16  # h*w a stream may ask for (640² at stride 16 is 1600)
GENERATE_MODES = ("argmax", "sample")


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


def encode_layer(tb: PaletteTables, t: int, ids: np.ndarray, ids_above: np.ndarray | None,
                 model: str | None = None) -> bytes:
    """Code level-t ids [G, h, w] given level t+1 ids (None for t = L-1: the root)."""
    model = check_model(tb, model)
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
    model = check_model(tb, model)
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
    model = check_model(tb, model)
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



def check_level(tb: PaletteTables, level: int) -> int:
    if isinstance(level, bool) or not isinstance(level, int | np.integer) or not 0 <= level < tb.n_levels:
        raise InvalidRequest(f"palette level must be an integer in 0..{tb.n_levels - 1}, got {level!r}")
    return int(level)


def encode_levels(indices_finest: np.ndarray, tables: PaletteTables, level: int = 0,
                  model: str | None = None) -> list[bytes]:
    """Finest index maps [G, h, w] → layers: level L-1, then one refinement per level down to ``level``."""
    level = check_level(tables, level)
    fin = np.asarray(indices_finest, dtype=np.int64)
    if fin.ndim != 3 or fin.shape[0] != tables.n_groups:
        raise InvalidRequest(f"index maps must be [{tables.n_groups}, h, w], got {fin.shape}")
    if fin.min() < 0 or fin.max() >= tables.sizes[0]:
        raise InvalidRequest(f"finest indices must lie in 0..{tables.sizes[0] - 1}")
    return encode_levels_between(fin, tables, tables.n_levels - 1, level, model)


def encode_levels_between(fin: np.ndarray, tables: PaletteTables, coarsest: int, finest: int,
                          model: str | None = None) -> list[bytes]:
    """The layers of levels ``coarsest`` down to ``finest`` (coarsest first) of validated finest index
    maps: a slice of :func:`encode_levels`' list, so the edge codes only the levels it sends and adds
    finer layers when asked. All layers in a few array operations (:mod:`.batch`), byte-identical to
    coding them one by one with :func:`encode_layer`, which a palette too wide for it still does."""
    model = check_model(tables, model)
    levels = list(range(coarsest, finest - 1, -1))
    if batch.supported(tables):
        return batch.encode_layers(tables, fin, levels, model)
    return [encode_layer(tables, t, tables.ids_at(fin, t),
                         tables.ids_at(fin, t + 1) if t + 1 < tables.n_levels else None, model)
            for t in levels]


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
    if not any(len(x) for x in layers):
        # an empty ANS stream decodes as "first child everywhere": no encoder sends only that
        raise InvalidStream(f"all {len(layers)} palette layers are empty: the frame carries no coded bits")
    h, w = (int(v) for v in tuple(shape)[-2:])
    if not (0 < h and 0 < w and h * w <= MAX_POSITIONS):
        raise InvalidStream(f"latent size {h}x{w} out of range")
    above = None
    t = coarsest
    # the symbols as decode_layer decodes them, with the encoder's contexts (.batch), where it can
    fast, model = batch.supported(tables), check_model(tables, model)
    for i, data in enumerate(layers):
        t = coarsest - i
        if fast:
            above = batch.decode_layer(tables, t, bytes(data), _parents_of(tables, above, (h, w)), model)
        else:
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


"""Product palette over channel groups and its nested Ward levels (DESIGN §1.4: Markov forward diffusion).

Per channel group g (``groups`` = channel offsets into z):

1. K0 entries by K-means in the *search space*: the raw group vectors z_g, or a contrastive embedding
   W z_g + b (``heads`` from :mod:`palettelink.train.contrastive`). Both are supported: the benchmark
   compares them. The edge finds the nearest search entry; an entry *decodes* to the mean raw latent of
   its members (``g{g}_centroids_0``), so a semantic search space still decodes to faithful latents.
2. A Ward dendrogram over the K0 entries, *weighted by member counts* (an entry stands for n_i
   vectors, so merging costs n_i n_j / (n_i + n_j) ‖μ_i − μ_j‖²: the exact rise of the within-cluster
   sum of squares of the underlying vectors; scipy's ward treats every entry as one point, which merges
   big, important entries as readily as stray ones). Cut after K0 − K_t merges for every level size
   K_t: levels nest by construction. One forward diffusion step replaces each entry by its parent.
3. A level-t entry decodes to the count-weighted mean of its members' latents.

Optional ``weights`` (one per latent position, e.g. 1 + W·the teacher's best class score there) steer
only the hierarchy: Ward then counts an entry as the *summed weight* of its members instead of their
number, so entries that stand for objects are expensive to merge and survive to the coarse levels,
where plain counts let the many background positions claim the few entries (a coarse level of the
fall codec lost the rare Fall class on an unseen camera: AP50 0.61 vs 0.88 at the fine levels). What an
entry decodes to stays the plain mean of its members, so weighting never moves a background latent
towards an object's.

The arrays are exactly CONTRACTS' ``palette.npz``. ``quantise`` (numpy) and ``torch_quantiser``
(torch, for decoder fine-tuning) map z to the decoded z-hat of a level.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from palettelink.codecs.palette import PaletteTables

if TYPE_CHECKING:
    import torch

Head = tuple[np.ndarray, np.ndarray]  # (W [D, Cg], b [D]): the search map of one group


def group_bounds(channels: int, groups: int | Sequence[int] | np.ndarray) -> np.ndarray:
    """Channel offsets [G+1]: an int splits ``channels`` evenly; a sequence is taken as offsets."""
    if isinstance(groups, int | np.integer):
        return np.linspace(0, channels, int(groups) + 1).astype(np.int32)
    b = np.asarray(groups, dtype=np.int32)
    if b[0] != 0 or b[-1] != channels or (np.diff(b) <= 0).any():
        raise ValueError(f"group offsets {b.tolist()} do not partition {channels} channels")
    return b


def default_sizes(k0: int, n_levels: int) -> list[int]:
    """K0, K0/2, … (n_levels sizes), every one ≥ 2."""
    sizes = [k0 >> t for t in range(n_levels)]
    if sizes[-1] < 2:
        raise ValueError(f"K0={k0} cannot be halved into {n_levels} levels of ≥ 2 entries")
    return sizes


def group_vectors(latents: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """[N, C, h, w] → [N*h*w, hi-lo] float32, positions in (n, y, x) order."""
    x = np.asarray(latents[:, lo:hi], dtype=np.float32)
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1).reshape(-1, hi - lo))


def nearest(x: np.ndarray, entries: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """Index of the nearest entry for every row of ``x`` (‖e‖² − 2 x·e, as the edge computes it)."""
    e2 = (entries * entries).sum(1)[None, :]
    out = np.empty(len(x), np.int64)
    for i in range(0, len(x), chunk):
        out[i:i + chunk] = np.argmin(e2 - 2.0 * (x[i:i + chunk] @ entries.T), axis=1)
    return out


def weighted_ward(centres: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Ward merges [K-1, 2] of ``centres`` weighted by ``counts``, in merge order.

    A merge (i, j), i < j, puts the union in slot i; slot j dies. So a cluster's slot is its smallest
    member entry. With equal counts this is scipy's ward (same merge order up to ties).
    """
    mu = np.asarray(centres, np.float64).copy()
    n = np.maximum(np.asarray(counts, np.float64), 1e-3)
    k = len(mu)
    sq = (mu * mu).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * mu @ mu.T, 0.0)
    cost = (n[:, None] * n[None, :]) / (n[:, None] + n[None, :]) * d2
    np.fill_diagonal(cost, np.inf)
    merges = np.empty((k - 1, 2), np.int64)
    alive = np.ones(k, bool)
    for s in range(k - 1):
        flat = int(np.argmin(cost))
        i, j = divmod(flat, k)
        i, j = min(i, j), max(i, j)
        merges[s] = (i, j)
        mu[i] = (n[i] * mu[i] + n[j] * mu[j]) / (n[i] + n[j])
        n[i] += n[j]
        alive[j] = False
        cost[j, :] = np.inf
        cost[:, j] = np.inf
        d = ((mu - mu[i]) ** 2).sum(1)
        row = n[i] * n / (n[i] + n) * d
        row[~alive] = np.inf
        row[i] = np.inf
        cost[i, :] = row
        cost[:, i] = row
    return merges


def cut_levels(merges: np.ndarray, k0: int, sizes: Sequence[int]) -> np.ndarray:
    """Ancestor table [L, K0]: the level-t id of every finest entry (ids ordered by smallest member)."""
    slot = np.arange(k0)
    anc = np.empty((len(sizes), k0), np.int32)
    done = 0
    for t, kt in enumerate(sizes):
        for i, j in merges[done:k0 - kt]:
            slot[slot == j] = i
        done = k0 - kt
        anc[t] = np.unique(slot, return_inverse=True)[1]
    return anc


def level_centroids(raw_means: np.ndarray, counts: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    """Count-weighted mean of member latents for each of the ``k`` entries of one level."""
    w = np.maximum(counts.astype(np.float64), 1e-3)
    num = np.zeros((k, raw_means.shape[1]))
    np.add.at(num, ids, raw_means * w[:, None])
    den = np.bincount(ids, weights=w, minlength=k)
    return (num / den[:, None]).astype(np.float32)


def foreground_weights(scores: np.ndarray, grid: tuple[int, int], foreground: float) -> np.ndarray:
    """[N, h, w] weights 1 + ``foreground``·score for :func:`build_palette`, from the teacher's best
    class score per cell ``scores`` [N, gh, gw] (any grid: each latent position takes its nearest cell)."""
    scores = np.clip(np.asarray(scores, np.float64), 0.0, 1.0)
    h, w = grid
    gh, gw = scores.shape[1:]
    ys, xs = (np.arange(h) * gh) // h, (np.arange(w) * gw) // w
    return 1.0 + float(foreground) * scores[:, ys][:, :, xs]


def _kmeans(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    from sklearn.cluster import KMeans, MiniBatchKMeans

    if len(x) > 50_000:
        km: Any = MiniBatchKMeans(k, random_state=seed, batch_size=4096, n_init=3, max_iter=200,
                                  reassignment_ratio=0.01)
    else:
        km = KMeans(k, random_state=seed, n_init=1, max_iter=100)
    return km.fit(x).cluster_centers_.astype(np.float32)


def build_palette(latents: np.ndarray, groups: int | Sequence[int] | np.ndarray, k0: int = 256,
                  n_levels: int = 8, heads: Sequence[Head] | None = None, seed: int = 0,
                  sizes: Sequence[int] | None = None, max_samples: int = 200_000,
                  ward_space: str = "raw", weights: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The palette.npz arrays for latents [N, C, h, w] (see the module docstring).

    ``weights`` [N, h, w] (positive): how much each latent position counts in the Ward hierarchy;
    None counts every position once.

    ``ward_space``: "raw" builds the hierarchy on the decoded latents (rate-distortion in the space the
    decoder sees), "search" on the search vectors (semantic merges for a contrastive palette).
    """
    latents = np.asarray(latents)
    bounds = group_bounds(latents.shape[1], groups)
    sizes = list(sizes) if sizes is not None else default_sizes(k0, n_levels)
    if sizes[0] != k0 or any(b >= a for a, b in zip(sizes, sizes[1:], strict=False)) or sizes[-1] < 1:
        raise ValueError(f"level sizes must start at K0={k0} and strictly decrease: {sizes}")
    if ward_space not in ("raw", "search"):
        raise ValueError("ward_space is 'raw' or 'search'")
    if weights is not None:
        weights = np.asarray(weights, np.float64)
        want = (latents.shape[0], *latents.shape[2:])
        if weights.shape != want or not (weights > 0).all():
            raise ValueError(f"weights must be positive, one per latent position {want}: got {weights.shape}")
        weights = weights.reshape(-1)  # the (n, y, x) order of group_vectors
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {"groups": bounds.astype(np.int32),
                                  "level_sizes": np.asarray(sizes, np.int32)}
    for g in range(len(bounds) - 1):
        x = group_vectors(latents, int(bounds[g]), int(bounds[g + 1]))
        head = heads[g] if heads is not None else None
        s = x @ head[0].T + head[1] if head is not None else x
        sample = rng.choice(len(x), min(len(x), max_samples), replace=False) if len(x) > max_samples \
            else np.arange(len(x))
        search = _kmeans(s[sample], k0, seed + g)
        lab = nearest(s, search)
        counts = np.bincount(lab, minlength=k0)
        raw = np.zeros((k0, x.shape[1]))
        np.add.at(raw, lab, x)
        raw = raw / np.maximum(counts, 1)[:, None]
        empty = counts == 0
        if empty.any():  # an entry nobody uses decodes to its own position (raw) or the data mean
            raw[empty] = search[empty] if head is None else x.mean(0)
        ward_on = raw if ward_space == "raw" or head is None else search
        mass = counts if weights is None else np.bincount(lab, weights=weights, minlength=k0)
        anc = cut_levels(weighted_ward(ward_on, mass), k0, sizes)
        out[f"g{g}_search"] = search.astype(np.float32)
        if head is not None:
            out[f"g{g}_embed_w"] = np.asarray(head[0], np.float32)
            out[f"g{g}_embed_b"] = np.asarray(head[1], np.float32)
        out[f"g{g}_ancestor"] = anc
        for t, kt in enumerate(sizes):
            out[f"g{g}_centroids_{t}"] = level_centroids(raw.astype(np.float32), counts, anc[t], kt)
    return out


def _tables(tables: PaletteTables | dict[str, np.ndarray]) -> PaletteTables:
    return tables if isinstance(tables, PaletteTables) else PaletteTables.from_arrays(tables)


def index_maps(latents: np.ndarray, tables: PaletteTables | dict[str, np.ndarray]) -> np.ndarray:
    """Finest index maps [N, G, h, w] int32 of latents [N, C, h, w] (what edge.onnx computes)."""
    tb = _tables(tables)
    latents = np.asarray(latents)
    n, _, h, w = latents.shape
    out = np.empty((n, tb.n_groups, h, w), np.int32)
    for g in range(tb.n_groups):
        x = group_vectors(latents, int(tb.groups[g]), int(tb.groups[g + 1]))
        if tb.embed[g] is not None:
            wt, b = tb.embed[g]  # type: ignore[misc]
            x = x @ wt.T + b
        out[:, g] = nearest(x, tb.search[g]).reshape(n, h, w)
    return out


def quantise(z: np.ndarray, tables: PaletteTables | dict[str, np.ndarray], level: int) -> np.ndarray:
    """z [N, C, h, w] (or [C, h, w]) → the decoded z-hat at ``level`` (numpy)."""
    tb = _tables(tables)
    z = np.asarray(z, np.float32)
    single = z.ndim == 3
    zz = z[None] if single else z
    maps = index_maps(zz, tb)
    out = np.concatenate([tb.dequantise(tb.ids_at(m, level), level) for m in maps])
    return out[0] if single else out


class TorchQuantiser:
    """z [N, C, h, w] torch → z-hat at ``level`` (int, or LongTensor [N] for a level per sample).

    Not differentiable (the decoder is fine-tuned on palette outputs; z comes from a frozen encoder).
    """

    def __init__(self, tables: PaletteTables | dict[str, np.ndarray]) -> None:
        import torch

        tb = _tables(tables)
        self.tb = tb
        self.n_levels = tb.n_levels
        self.groups = [int(v) for v in tb.groups]
        self.search = [torch.from_numpy(s) for s in tb.search]
        self.embed = [None if e is None else (torch.from_numpy(e[0]), torch.from_numpy(e[1]))
                      for e in tb.embed]
        self.ancestor = torch.from_numpy(tb.ancestor.astype(np.int64))  # [G, L, K0]
        offs = np.concatenate([[0], np.cumsum(tb.sizes)[:-1]])
        self.offsets = torch.from_numpy(offs.astype(np.int64))
        self.flat = [torch.from_numpy(np.concatenate(tb.centroids[g])) for g in range(tb.n_groups)]

    def to(self, device: Any) -> TorchQuantiser:
        self.search = [s.to(device) for s in self.search]
        self.embed = [None if e is None else (e[0].to(device), e[1].to(device)) for e in self.embed]
        self.ancestor, self.offsets = self.ancestor.to(device), self.offsets.to(device)
        self.flat = [f.to(device) for f in self.flat]
        return self

    def indices(self, z: torch.Tensor) -> torch.Tensor:
        """Finest indices [N, G, h, w] (int64)."""
        import torch

        if self.search[0].device != z.device:
            self.to(z.device)
        out = []
        with torch.no_grad():
            for g in range(len(self.search)):
                x = z[:, self.groups[g]:self.groups[g + 1]].float().permute(0, 2, 3, 1)
                e = self.embed[g]
                if e is not None:
                    x = x @ e[0].T + e[1]
                s = self.search[g]
                d = (s * s).sum(1) - 2.0 * (x @ s.T)
                out.append(d.argmin(-1))
        return torch.stack(out, 1)

    def __call__(self, z: torch.Tensor, level: int | torch.Tensor | None) -> torch.Tensor:
        import torch

        if level is None:  # the decoder's unquantised path
            return z
        with torch.no_grad():
            idx = self.indices(z)  # [N, G, h, w]
            n = z.shape[0]
            lv = torch.as_tensor(level, device=z.device, dtype=torch.int64).expand(n) \
                if not torch.is_tensor(level) or level.ndim == 0 else level.to(z.device).long()
            parts = []
            for g in range(len(self.search)):
                anc = self.ancestor[g][lv[:, None, None], idx[:, g]]  # [N, h, w] ids at each level
                flat = self.flat[g][anc + self.offsets[lv][:, None, None]]  # [N, h, w, Cg]
                parts.append(flat.permute(0, 3, 1, 2))
            return torch.cat(parts, 1).to(z.dtype)


def torch_quantiser(tables: PaletteTables | dict[str, np.ndarray]) -> TorchQuantiser:
    """A callable ``(z, level) → z_hat`` for decoder fine-tuning (torch)."""
    return TorchQuantiser(tables)


def quantise_torch(z: torch.Tensor, tables: PaletteTables | dict[str, np.ndarray],
                   level: int | torch.Tensor) -> torch.Tensor:
    """Torch twin of :func:`quantise` (builds the quantiser each call: use ``torch_quantiser`` in loops)."""
    return TorchQuantiser(tables)(z, level)


def synthetic_latents(n: int, channels: int = 16, h: int = 16, w: int = 16, seed: int = 0,
                      prototypes: int = 12, regions: int = 6) -> np.ndarray:
    """Piecewise-smooth stand-in latents [n, C, h, w] (tests, smoke runs): Voronoi regions, each a
    prototype vector plus a smooth field and a little noise, so index maps have spatial structure."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    protos = rng.normal(0, 1.5, (prototypes, channels))
    yy, xx = np.mgrid[0:h, 0:w]
    out = np.empty((n, channels, h, w), np.float32)
    for i in range(n):
        cy, cx = rng.uniform(0, h, regions), rng.uniform(0, w, regions)
        lab = np.argmin((yy[..., None] - cy) ** 2 + (xx[..., None] - cx) ** 2, axis=-1)
        base = protos[rng.integers(0, prototypes, regions)][lab].transpose(2, 0, 1)
        smooth = gaussian_filter(rng.normal(0, 1, (channels, h, w)), (0, 2, 2)) * 2.0
        out[i] = base + smooth + rng.normal(0, 0.15, (channels, h, w))
    return out

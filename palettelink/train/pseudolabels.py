"""Texture-semantic pseudo-labels per latent position (DESIGN §1.2; the paper's Fig. 4).

For every stride-16 latent position, a fine-to-coarse pyramid of feature maps is cut into the patch
that covers the position's 16×16 pixel cell:

- the detector's own front stages (SplitDetector layers 0, 2, 4, 6, 9: strides 2, 4, 8, 16, 32), or
- VGG16 conv1_2 … conv5_3 when the user gives a local ``vgg16_weights`` state dict (never downloaded).

Per stage the channels are reduced by a fixed PCA (fitted once on the first images: a frozen linear
map, so a descriptor does not depend on the batch it is computed in), the patch's FFT magnitude is
taken per component and averaged over the 8 dihedral index maps (u, v) → (±u, ±v), (±v, ±u). A real
patch's flips and 90° rotations permute |F| by exactly those maps, so the descriptor is invariant to
them; the orbit representatives 0 ≤ u ≤ v ≤ n/2 are kept, log-compressed, plus the signed patch mean
per component (|F(0,0)| loses the sign). Stages are standardised and weighted equally, then
K-means runs for a range of K and K is taken at the elbow of the distortion curve (the point farthest
from the chord, as kneedle does); the curve is saved as a PNG.

Patch sizes: a stage of stride s covers the cell with k = 16/s cells; the patch is 2k wide (half a
cell of context on each side) for k ≥ 2, and 3×3 around the containing cell for s ≥ 16.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

CELL = 16
DETECTOR_STAGES = (0, 2, 4, 6, 9)
VGG_STAGES = {"conv1_2": 3, "conv2_2": 8, "conv3_3": 15, "conv4_3": 22, "conv5_3": 29}  # ReLU outputs
PCA_COMPONENTS = 4
DEFAULT_K = tuple(range(2, 41, 2))
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Extractor = Callable[["torch.Tensor"], list["torch.Tensor"]]


def detector_extractor(det: Any, layers: Sequence[int] = DETECTOR_STAGES) -> Extractor:
    """The detector's own front stages: outputs of ``layers`` (a plain chain up to the split)."""

    def run(x: torch.Tensor) -> list[torch.Tensor]:
        y: list[Any] = [None] * (max(layers) + 1)
        h: Any = x
        for i in range(max(layers) + 1):
            m = det.layers[i]
            if m.f != -1:
                h = y[m.f] if isinstance(m.f, int) else [h if j == -1 else y[j] for j in m.f]
            h = m(h)
            y[i] = h
        return [y[i] for i in layers]

    return run


def vgg_extractor(weights: str | os.PathLike[str], vgg_factory: Callable[[], Any] | None = None) -> Extractor:
    """torchvision VGG16 conv1_2 … conv5_3 from a local state-dict file (ImageNet normalisation)."""
    import torch
    import torchvision

    model = (vgg_factory or (lambda: torchvision.models.vgg16(weights=None)))()
    sd = torch.load(weights, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    model.load_state_dict(sd)
    feats = model.features.eval()
    idx = sorted(VGG_STAGES.values())
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def run(x: torch.Tensor) -> list[torch.Tensor]:
        x = (x - mean) / std
        out = []
        for i, m in enumerate(feats):
            if i > idx[-1]:
                break
            x = m(x)
            if i in idx:
                out.append(x)
        return out

    return run


def dihedral_spectrum(patches: np.ndarray) -> np.ndarray:
    """|FFT| of square patches [..., n, n], averaged over the 8 dihedral index maps, reduced to the
    orbit representatives 0 ≤ u ≤ v ≤ n/2 → [..., R]. Invariant to flips and 90° rotations."""
    n = patches.shape[-1]
    a = np.abs(np.fft.fft2(patches, axes=(-2, -1)))
    neg = (-np.arange(n)) % n
    flips = [a, a[..., neg, :], a[..., :, neg], a[..., neg, :][..., :, neg]]
    sym = np.sum([f + np.swapaxes(f, -1, -2) for f in flips], axis=0) / 8.0
    u, v = np.triu_indices(n // 2 + 1)
    return sym[..., u, v]


def _patches(f: np.ndarray, stride: float, h: int, w: int) -> np.ndarray:
    """[c, H, W] stage map → patches [h, w, c, n, n] covering each stride-16 cell (module docstring)."""
    c = f.shape[0]
    k = CELL / stride
    if k >= 2:
        k = int(round(k))
        n, pad = 2 * k, k // 2
        p = np.pad(f, ((0, 0), (pad, pad), (pad, pad)), mode="reflect")
        win = np.lib.stride_tricks.sliding_window_view(p, (n, n), axis=(1, 2))[:, ::k, ::k]
        win = win[:, :h, :w]
    else:  # the cell at this stride (shared by 1/k² positions), with its 3×3 neighbourhood
        p = np.pad(f, ((0, 0), (1, 1), (1, 1)), mode="reflect")
        win = np.lib.stride_tricks.sliding_window_view(p, (3, 3), axis=(1, 2))
        rep = int(round(1 / k))
        win = win.repeat(rep, axis=1).repeat(rep, axis=2)[:, :h, :w]
    return np.ascontiguousarray(win.transpose(1, 2, 0, 3, 4)).reshape(h, w, c, *win.shape[-2:])


class DescriptorModel:
    """Frozen channel PCA per stage + the patch descriptor (fit once, then apply to any image)."""

    def __init__(self, extractor: Extractor, size: int = 640, components: int = PCA_COMPONENTS) -> None:
        self.extractor = extractor
        self.size = size
        self.components = components
        self.pca: list[tuple[np.ndarray, np.ndarray]] | None = None

    def stages(self, x: np.ndarray) -> list[np.ndarray]:
        import torch

        with torch.inference_mode():
            outs = self.extractor(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
        res = []
        for o in outs:
            a = o[0].float()
            if self.size // a.shape[-1] < 2:  # stride 1 (VGG conv1_2): pool to stride 2
                a = torch.nn.functional.avg_pool2d(a[None], 2)[0]
            res.append(a.cpu().numpy())
        return res

    def fit(self, inputs: Iterable[np.ndarray], samples: int = 20000, seed: int = 0) -> DescriptorModel:
        """PCA per stage on pixel vectors of ``inputs`` (letterboxed 1x3xSxS arrays)."""
        rng = np.random.default_rng(seed)
        per: list[list[np.ndarray]] = []
        for x in inputs:
            for i, s in enumerate(self.stages(x)):
                v = s.reshape(s.shape[0], -1).T
                take = rng.choice(len(v), min(len(v), samples), replace=False)
                if len(per) <= i:
                    per.append([])
                per[i].append(v[take])
        self.pca = []
        for vs in per:
            v = np.concatenate(vs).astype(np.float64)
            mu = v.mean(0)
            _, _, vt = np.linalg.svd(v - mu, full_matrices=False)
            basis = vt[: self.components]
            basis *= np.sign(basis[:, np.argmax(np.abs(basis), axis=1)].diagonal())[:, None]  # fixed sign
            self.pca.append((mu.astype(np.float32), basis.astype(np.float32)))
        return self

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """One letterboxed image → descriptors [h*w, F] (positions in raster order)."""
        if self.pca is None:
            raise RuntimeError("DescriptorModel.fit first")
        h = w = self.size // CELL
        blocks = []
        for s, (mu, basis) in zip(self.stages(x), self.pca, strict=True):
            c, hh, ww = s.shape
            red = (basis @ (s.reshape(c, -1) - mu[:, None])).reshape(-1, hh, ww)
            pt = _patches(red, self.size / ww, h, w)  # [h, w, comp, n, n]
            spec = np.log1p(dihedral_spectrum(pt) / (pt.shape[-1] ** 2))
            blocks.append(spec.reshape(h * w, -1))
            blocks.append(pt.mean(axis=(-2, -1)).reshape(h * w, -1))
        return np.concatenate(blocks, axis=1).astype(np.float32)

    def block_sizes(self) -> list[int]:
        """Feature count of each stage block (spectrum + mean), for equal stage weighting."""
        x = np.zeros((1, 3, self.size, self.size), np.float32)
        sizes = []
        for s in self.stages(x):
            k = CELL / (self.size / s.shape[-1])
            n = 2 * int(round(k)) if k >= 2 else 3
            r = len(np.triu_indices(n // 2 + 1)[0])
            sizes.append(self.components * (r + 1))
        return sizes


def _inputs(items: Sequence[Any], size: int,
            load: Callable[[Any], np.ndarray] | None) -> Iterable[np.ndarray]:
    from palettelink.image import letterbox
    from palettelink.train.data import load_rgb

    for it in items:
        if isinstance(it, np.ndarray) and it.ndim == 4:
            yield it
        else:
            rgb = it if isinstance(it, np.ndarray) else (load or load_rgb)(it)
            yield letterbox(rgb, size)[0]


def make_model(det: Any = None, vgg16_weights: str | os.PathLike[str] | None = None, size: int = 640,
               vgg_factory: Callable[[], Any] | None = None) -> DescriptorModel:
    if vgg16_weights:
        return DescriptorModel(vgg_extractor(vgg16_weights, vgg_factory), size)
    if det is None:
        raise ValueError("pseudo-labels need the detector or a VGG16 weights file")
    return DescriptorModel(detector_extractor(det), size)


def descriptors(det: Any, items: Sequence[Any], vgg16_weights: str | os.PathLike[str] | None = None,
                size: int = 640, load: Callable[[Any], np.ndarray] | None = None, fit_items: int = 4,
                vgg_factory: Callable[[], Any] | None = None) -> np.ndarray:
    """Descriptors [N*h*w, F] of ``items`` (paths, (video, frame), RGB arrays or 1x3xSxS inputs)."""
    model = make_model(det, vgg16_weights, size, vgg_factory)
    items = list(items)
    model.fit(_inputs(items[:fit_items], size, load))
    return np.concatenate([model(x) for x in _inputs(items, size, load)])


def standardise(desc: np.ndarray, blocks: Sequence[int] | None = None) -> np.ndarray:
    """z-score every feature, then weight each stage block by 1/√size so stages count equally."""
    d = (desc - desc.mean(0)) / (desc.std(0) + 1e-6)
    if blocks:
        w = np.concatenate([np.full(b, 1.0 / np.sqrt(b)) for b in blocks])
        if len(w) == d.shape[1]:
            d = d * w
    return d.astype(np.float32)


def reduce_dims(x: np.ndarray, dims: int = 32, seed: int = 0, samples: int = 50000) -> np.ndarray:
    """Project onto the top principal directions (K-means cost scales with the dimension)."""
    if x.shape[1] <= dims:
        return x
    rng = np.random.default_rng(seed)
    s = x[rng.choice(len(x), samples, replace=False)] if len(x) > samples else x
    mu = s.mean(0)
    _, _, vt = np.linalg.svd(s - mu, full_matrices=False)
    return ((x - mu) @ vt[:dims].T).astype(np.float32)


def elbow(ks: Sequence[int], distortion: Sequence[float]) -> int:
    """K at the elbow: the point of the normalised curve farthest below the chord (kneedle)."""
    k = np.asarray(ks, np.float64)
    d = np.asarray(distortion, np.float64)
    if len(k) < 3:
        return int(k[0])
    x = (k - k[0]) / (k[-1] - k[0])
    y = (d - d.min()) / max(d.max() - d.min(), 1e-12)
    chord = y[0] + (y[-1] - y[0]) * x
    return int(k[int(np.argmax(chord - y))])


def distortion_curve(desc: np.ndarray, k_range: Sequence[int] = DEFAULT_K, seed: int = 0,
                     max_samples: int = 30000) -> tuple[list[int], list[float]]:
    """Mean squared distance to the nearest centre for each K (MiniBatchKMeans on a sample)."""
    from sklearn.cluster import MiniBatchKMeans

    rng = np.random.default_rng(seed)
    x = desc[rng.choice(len(desc), max_samples, replace=False)] if len(desc) > max_samples else desc
    ks, ds = [], []
    for k in k_range:
        km = MiniBatchKMeans(int(k), random_state=seed, batch_size=4096, n_init=1).fit(x)
        ks.append(int(k))
        ds.append(float(km.inertia_ / len(x)))
    return ks, ds


def save_curve(png: str | os.PathLike[str], ks: Sequence[int], ds: Sequence[float], k: int,
               title: str = "pseudo-label K-means distortion") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(ks, ds, "o-", ms=3)
    ax.axvline(k, color="r", ls="--", label=f"elbow K = {k}")
    ax.set_xlabel("K")
    ax.set_ylabel("mean squared distortion")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def pseudo_labels(desc: np.ndarray, k_range: Sequence[int] = DEFAULT_K,
                  png: str | os.PathLike[str] | None = None, seed: int = 0,
                  blocks: Sequence[int] | None = None) -> tuple[np.ndarray, int]:
    """Labels [len(desc)] int32 and K (at the elbow); the distortion curve goes to ``png``."""
    labels, k, _ = pseudo_labels_curve(desc, k_range, png, seed, blocks)
    return labels, k


def pseudo_labels_curve(desc: np.ndarray, k_range: Sequence[int] = DEFAULT_K,
                        png: str | os.PathLike[str] | None = None, seed: int = 0,
                        blocks: Sequence[int] | None = None) -> tuple[np.ndarray, int, dict[str, Any]]:
    """:func:`pseudo_labels` plus the curve ``{"k": [...], "distortion": [...], "elbow": K}``."""
    from sklearn.cluster import MiniBatchKMeans

    x = reduce_dims(standardise(desc, blocks), seed=seed)
    ks, ds = distortion_curve(x, k_range, seed)
    k = elbow(ks, ds)
    if png:
        save_curve(png, ks, ds, k)
    km = MiniBatchKMeans(k, random_state=seed, batch_size=4096, n_init=3).fit(x)
    return km.predict(x).astype(np.int32), k, {"k": ks, "distortion": ds, "elbow": k}


def pseudo_labels_for(det: Any, cache: Any, png: str | os.PathLike[str] | None = None,
                      vgg16_weights: str | os.PathLike[str] | None = None,
                      k_range: Sequence[int] = DEFAULT_K, seed: int = 0, max_entries: int | None = 160,
                      ) -> tuple[np.ndarray, int, dict[str, Any]]:
    """Labels [len(cache)*h*w] for the entries of a ``CrossingCache`` (same order as its latents).

    Descriptors cost a front pass per entry (~0.5–2 s on CPU), so at most ``max_entries`` evenly
    spaced entries are labelled; the others get -1, which :mod:`contrastive` ignores.
    """
    from tqdm import tqdm

    model = make_model(det, vgg16_weights, cache.size)
    n = len(cache)
    n_fit = min(n, 4)
    model.fit(cache.input_of(i)[0] for i in np.linspace(0, n - 1, n_fit).astype(int))
    chosen = np.arange(n) if not max_entries or n <= max_entries else \
        np.unique(np.linspace(0, n - 1, max_entries).astype(int))
    desc = np.concatenate([model(cache.input_of(int(i))[0]) for i in tqdm(chosen, desc="pseudo-labels")])
    lab, k, curve = pseudo_labels_curve(desc, k_range, png, seed, model.block_sizes())
    per = (cache.size // CELL) ** 2
    out = np.full(n * per, -1, np.int32)
    for j, i in enumerate(chosen):
        out[i * per:(i + 1) * per] = lab[j * per:(j + 1) * per]
    curve["entries_labelled"] = int(len(chosen))
    return out, k, curve

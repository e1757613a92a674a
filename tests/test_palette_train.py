"""Palette training stages: weighted Ward levels, palette.npz contract, quantisers, SupCon heads,
pseudo-label descriptors (dihedral invariance, elbow, detector and user-file VGG16 paths)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from palettelink.codecs import palette as pc
from palettelink.train import contrastive, palette, pseudolabels


@pytest.fixture(scope="module")
def latents() -> np.ndarray:
    return palette.synthetic_latents(12, channels=16, h=16, w=16, seed=5)


def test_weighted_ward_equals_scipy_ward_for_equal_counts() -> None:
    from scipy.cluster.hierarchy import fcluster, linkage

    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3))
    merges = palette.weighted_ward(x, np.ones(40))
    anc = palette.cut_levels(merges, 40, [40, 20, 10, 5, 2])
    z = linkage(x, method="ward")
    for t, k in enumerate([20, 10, 5, 2]):
        ours = anc[t + 1]
        theirs = fcluster(z, k, criterion="maxclust")
        # same partition (labels may differ): a bijection between the two labelings
        pairs = set(zip(ours.tolist(), theirs.tolist(), strict=True))
        assert len(pairs) == k == len(set(ours)) == len(set(theirs))


def test_weighted_ward_keeps_heavy_entries_apart() -> None:
    # two heavy entries close together, two light ones far apart: weights decide the first merge
    x = np.array([[0.0], [1.0], [10.0], [12.0]])
    heavy = palette.weighted_ward(x, np.array([1000, 1000, 1, 1]))
    assert tuple(heavy[0]) == (2, 3)
    light = palette.weighted_ward(x, np.array([1, 1, 1, 1]))
    assert tuple(light[0]) == (0, 1)


def _scene_with_a_rare_object() -> tuple[np.ndarray, np.ndarray]:
    """Latents [2, 2, 16, 16] of three big background clusters at (0,0), (10,0), (20,0) and one small
    object cluster at (0,12) (8 positions), and the teacher's score map [2, 16, 16] (1 on the object)."""
    rng = np.random.default_rng(3)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [20.0, 0.0], [0.0, 12.0]])
    which = rng.integers(0, 3, size=(2, 16, 16))
    which[0, 4:6, 4:8] = 3
    z = centres[which] + rng.normal(scale=0.1, size=(2, 16, 16, 2))
    return np.ascontiguousarray(z.transpose(0, 3, 1, 2)), (which == 3).astype(float)


def test_foreground_weights_keep_a_rare_object_entry_at_coarse_levels() -> None:
    z, score = _scene_with_a_rare_object()
    obj = score.astype(bool)
    for foreground, own_entry in ((0.0, False), (1000.0, True)):
        w = palette.foreground_weights(score, z.shape[2:], foreground) if foreground else None
        tb = pc.PaletteTables.from_arrays(palette.build_palette(z, 1, k0=4, sizes=[4, 3, 2], weights=w))
        zq = palette.quantise(z, tb, 1)  # three entries for four clusters: one merge
        at_object = zq.transpose(0, 2, 3, 1)[obj]
        # unweighted, the 8 object positions are the cheapest merge (into the (0,0) background);
        # weighted, two background clusters merge and the object keeps its own entry
        assert np.allclose(at_object, [0.0, 12.0], atol=0.2) == own_entry, (foreground, at_object[0])
        # an entry always decodes to the plain mean of its members, whatever the weights
        ids = tb.ancestor[0, 1][palette.index_maps(z, tb)[:, 0].ravel()]
        x = palette.group_vectors(z, 0, 2)
        for k in range(3):
            assert np.allclose(x[ids == k].mean(0), tb.centroids[0][1][k], atol=1e-4)


def test_foreground_weights_map_each_position_to_its_nearest_cell() -> None:
    score = np.array([[[0.0, 1.0], [0.5, 2.0]]])  # [1, 2, 2]; scores clip to [0, 1]
    w = palette.foreground_weights(score, (4, 4), 10.0)
    assert w.shape == (1, 4, 4)
    assert w[0].tolist() == [[1, 1, 11, 11], [1, 1, 11, 11], [6, 6, 11, 11], [6, 6, 11, 11]]
    with pytest.raises(ValueError, match="one per latent position"):
        palette.build_palette(np.zeros((1, 2, 4, 4)), 1, k0=2, sizes=[2, 1], weights=w[:, :2])


def test_build_palette_contract(latents: np.ndarray) -> None:
    a = palette.build_palette(latents, 4, k0=32, n_levels=5, seed=0)
    assert a["groups"].dtype == np.int32 and a["groups"].tolist() == [0, 4, 8, 12, 16]
    assert a["level_sizes"].dtype == np.int32 and a["level_sizes"].tolist() == [32, 16, 8, 4, 2]
    for g in range(4):
        assert a[f"g{g}_search"].shape == (32, 4) and a[f"g{g}_search"].dtype == np.float32
        assert a[f"g{g}_ancestor"].shape == (5, 32) and a[f"g{g}_ancestor"].dtype == np.int32
        assert (a[f"g{g}_ancestor"][0] == np.arange(32)).all()
        for t, k in enumerate([32, 16, 8, 4, 2]):
            assert a[f"g{g}_centroids_{t}"].shape == (k, 4) and a[f"g{g}_centroids_{t}"].dtype == np.float32
        assert f"g{g}_embed_w" not in a
    tb = pc.PaletteTables.from_arrays(a)  # validates nesting, ranges
    # each entry decodes to its members' mean latent (finest and coarser levels)
    maps = palette.index_maps(latents, tb)
    x = palette.group_vectors(latents, 0, 4)
    fin = maps[:, 0].ravel()
    for t in (0, 2):
        ids = tb.ancestor[0, t][fin]
        k = int(ids[0])
        assert np.allclose(x[ids == k].mean(0), tb.centroids[0][t][k], atol=1e-4)
    # distortion grows monotonically towards coarse levels
    err = [float(((palette.quantise(latents, tb, t) - latents) ** 2).mean()) for t in range(5)]
    assert all(a_ < b_ for a_, b_ in zip(err, err[1:], strict=False))


def test_torch_quantiser_matches_numpy(latents: np.ndarray) -> None:
    import torch

    a = palette.build_palette(latents, [0, 8, 16], k0=16, n_levels=4, seed=1)
    q = palette.torch_quantiser(a)
    zt = torch.from_numpy(latents[:3])
    for t in range(4):
        assert np.allclose(q(zt, t).numpy(), palette.quantise(latents[:3], a, t), atol=1e-6)
    per = q(zt, torch.tensor([0, 2, 3])).numpy()
    for i, t in enumerate([0, 2, 3]):
        assert np.allclose(per[i], palette.quantise(latents[i], a, t), atol=1e-6)
    assert q(zt, None) is zt
    ref = palette.quantise(latents[:3], a, 1)
    assert np.allclose(palette.quantise_torch(zt, a, 1).numpy(), ref, atol=1e-6)


def test_contrastive_heads_and_embedded_palette(latents: np.ndarray) -> None:
    # labels: which prototype region a position belongs to, approximated by K-means on the latents
    from sklearn.cluster import KMeans

    x = palette.group_vectors(latents, 0, 16)
    labels = KMeans(6, n_init=1, random_state=0).fit_predict(x).astype(np.int32)
    labels[::7] = -1  # unlabelled positions are ignored
    rep: dict[str, float] = {}
    heads = contrastive.train_heads(latents, labels, 4, dim=6, seed=0, steps=40, batch=128, report=rep)
    assert len(heads) == 4
    for w, b in heads:
        assert w.shape == (4 + 6, 4) and b.shape == (10,)
        assert np.allclose(w[:4], np.eye(4)) and np.allclose(b[:4], 0)
    assert rep["g0_loss_last"] < rep["g0_loss_first"]
    again = contrastive.train_heads(latents, labels, 4, dim=6, seed=0, steps=40, batch=128)
    assert all(np.array_equal(h[0], k[0]) for h, k in zip(heads, again, strict=True))  # reproducible
    a = palette.build_palette(latents, 4, k0=16, n_levels=4, heads=heads, seed=0)
    assert a["g0_search"].shape == (16, 10) and a["g0_embed_w"].shape == (10, 4)
    tb = pc.PaletteTables.from_arrays(a)
    z0 = latents[0]
    assert np.array_equal(tb.assign(z0), palette.index_maps(latents[:1], a)[0])
    bare = contrastive.train_heads(latents, labels, 4, dim=3, seed=0, steps=5, batch=64, keep_raw=False)
    assert bare[0][0].shape == (3, 4)


def test_supcon_loss_prefers_clustered_features() -> None:
    import torch

    labels = torch.tensor([0, 0, 1, 1])
    good = torch.tensor([[1.0, 0], [1, 0.1], [0, 1], [0.1, 1]])
    bad = torch.tensor([[1.0, 0], [0, 1], [1, 0.1], [0.1, 1]])
    assert contrastive.supcon_loss(good, labels) < contrastive.supcon_loss(bad, labels)


def test_dihedral_spectrum_is_invariant() -> None:
    rng = np.random.default_rng(0)
    for n in (3, 4, 8, 16):
        p = rng.normal(size=(2, n, n))
        ref = pseudolabels.dihedral_spectrum(p)
        for q in (p[:, ::-1], p[:, :, ::-1], np.rot90(p, 1, (1, 2)), np.rot90(p, 2, (1, 2)),
                  np.swapaxes(p, 1, 2)):
            assert np.allclose(pseudolabels.dihedral_spectrum(np.ascontiguousarray(q)), ref)
        assert ref.shape == (2, len(np.triu_indices(n // 2 + 1)[0]))


def test_patches_cover_the_cell() -> None:
    f = np.arange(2 * 32 * 32, dtype=np.float32).reshape(2, 32, 32)  # stride 4 map of a 128² image
    p = pseudolabels._patches(f, 4.0, 8, 8)
    assert p.shape == (8, 8, 2, 8, 8)
    assert np.array_equal(p[3, 5, 0, 2:6, 2:6], f[0, 12:16, 20:24])  # the cell, with a half-cell rim
    coarse = pseudolabels._patches(f[:, :4, :4], 32.0, 8, 8)  # stride 32: 3x3 around the shared cell
    assert coarse.shape == (8, 8, 2, 3, 3) and np.array_equal(coarse[2, 2], coarse[3, 3])


def test_elbow_finds_the_knee(tmp_path: Path) -> None:
    ks = list(range(2, 21, 2))
    curve = [100 / k if k <= 6 else 100 / 6 - (k - 6) * 0.3 for k in ks]
    assert pseudolabels.elbow(ks, curve) == 6
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 10, (5, 6))
    desc = (centres[rng.integers(0, 5, 3000)] + rng.normal(0, 0.5, (3000, 6))).astype(np.float32)
    png = tmp_path / "elbow.png"
    labels, k = pseudolabels.pseudo_labels(desc, range(2, 13), png)
    assert 4 <= k <= 6 and png.stat().st_size > 1000
    assert labels.shape == (3000,) and len(np.unique(labels)) == k


def test_descriptors_from_the_detector(detector, images: list[Path]) -> None:  # noqa: ANN001
    from palettelink.image import load_image

    rgb = load_image(images[0])
    d = pseudolabels.descriptors(detector, [rgb, rgb[:, ::-1].copy()], size=640, fit_items=1)
    assert d.shape[0] == 2 * 40 * 40 and np.isfinite(d).all()
    m = pseudolabels.make_model(detector)
    assert sum(m.block_sizes()) == d.shape[1]


def test_descriptors_from_a_user_vgg16_file(tmp_path: Path) -> None:
    import torch
    from torch import nn
    from torchvision.models.vgg import make_layers

    cfg = [4, 4, "M", 4, 4, "M", 4, 4, 4, "M", 4, 4, 4, "M", 4, 4, 4, "M"]  # vgg16's layout, 4 channels

    class TinyVGG(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = make_layers(cfg)

    torch.manual_seed(0)
    weights = tmp_path / "vgg16.pth"
    torch.save(TinyVGG().state_dict(), weights)
    rgb = np.random.default_rng(0).integers(0, 256, (96, 128, 3)).astype(np.uint8)
    d = pseudolabels.descriptors(None, [rgb], vgg16_weights=weights, size=128, vgg_factory=TinyVGG)
    assert d.shape[0] == 8 * 8 and np.isfinite(d).all()
    with pytest.raises(ValueError):
        pseudolabels.descriptors(None, [rgb], size=128)

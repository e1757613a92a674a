"""Training data sources, the crossing-tensor cache and the bottleneck's training loop, at toy sizes
(a handful of steps on 2 images at 320²): plumbing, resumability and interfaces, not quality."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from palettelink.errors import InvalidRequest
from palettelink.image import letterbox, load_image
from palettelink.train import augment, crossing_cache, data
from palettelink.train import bottleneck as bn
from palettelink.train.bottleneck_eval import ScalarQuantiser, evaluate_detection
from palettelink.train.bottleneck_training import finetune_decoder, same_run, train_bottleneck
from palettelink.train.distill import (
    head_of,
    measure_sensitivity,
    rank_loss,
    sensitivity_weights,
    task_loss,
)

SIZE = 320


def test_sources_are_disjoint_sorted_and_stable() -> None:
    """Leave-source-out: no eval picture or video shares a source with training; same-site frames
    (reported apart) come from a training video, well after its training frames."""
    train, ev, same = data.training_images(), data.eval_images(), data.same_site_images()
    assert train == data.training_images() and ev == data.eval_images()
    assert train == sorted(train, key=data.item_key) and ev == sorted(ev, key=data.item_key)

    def files(items: list[data.Item]) -> set[Path]:
        return {Path(i[0] if isinstance(i, tuple) else i) for i in items}

    def folders(items: list[data.Item]) -> set[Path]:
        return {f.parent for f in files(items) if f.parent != data.OPENCV_DATA}

    assert not files(train) & files(ev), "TRAIN and EVAL must not share a picture or a video"
    assert not folders(train) & folders(ev), "TRAIN and EVAL must not share a photo collection"
    assert not {f for f in files(ev) if f.parent == data.OPENCV_DATA} - {data.adaptation_footage()}
    for video in files(same):  # same site: a training video, evaluated on its later frames only
        tr = [i[1] for i in train if isinstance(i, tuple) and Path(i[0]) == video]
        assert tr, f"{video.name}: a same-site video is a training video"
        n = data.video_length(video)
        first = min(i[1] for i in same if isinstance(i, tuple) and Path(i[0]) == video)
        assert max(tr) + 0.1 * n < first, f"{video.name}: train and same-site frames too close in time"
    if not data.OPENCV_DATA.is_dir():
        pytest.skip("opencv-doc is not installed")
    assert len(train) >= 50 and len(ev) >= 40
    opencv_photos = [p for p in train if isinstance(p, Path) and p.parent == data.OPENCV_DATA]
    assert opencv_photos and not any(data._denied(p.name) for p in opencv_photos)
    video = next(i for i in ev if isinstance(i, tuple))
    rgb = data.load_rgb(video)
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    counts = data.describe_sources()
    assert sum(v for k, v in counts.items() if k.startswith("TRAIN: ")) == len(train)
    assert any(k.startswith("EVAL: vtest.avi") for k in counts)
    assert any(k.startswith("SAME SITE: Megamind.avi") for k in counts)
    assert sum(data.describe_sources(train[:7]).values()) == 7
    assert len(data.training_images(max_images=10)) == 10


def test_reserved_pictures_are_used_nowhere() -> None:
    from palettelink.train.corpus import RESERVED_NAMES

    every = data.training_images() + data.eval_images() + data.same_site_images()
    names = {Path(i[0] if isinstance(i, tuple) else i).name for i in every}
    assert not names & set(RESERVED_NAMES)
    assert not any("/html/" in str(i[0] if isinstance(i, tuple) else i) for i in every)


def test_augmentation_is_deterministic() -> None:
    rgb = (np.random.default_rng(0).random((200, 300, 3)) * 255).astype(np.uint8)
    plain, info = augment.augmented_input(rgb, 128, None)
    assert np.array_equal(plain, letterbox(rgb, 128)[0])
    a = augment.augmented_input(rgb, 128, np.random.default_rng((0, 1, 1)))[0]
    b = augment.augmented_input(rgb, 128, np.random.default_rng((0, 1, 1)))[0]
    c = augment.augmented_input(rgb, 128, np.random.default_rng((0, 1, 2)))[0]
    assert a.shape == (1, 3, 128, 128) and np.array_equal(a, b) and not np.array_equal(a, c)


@pytest.fixture(scope="module")
def cache(detector, images, tmp_path_factory: pytest.TempPathFactory) -> crossing_cache.CrossingCache:  # noqa: ANN001
    return crossing_cache.CrossingCache(detector, images, SIZE, augment=1, progress=False,
                                        cache_dir=tmp_path_factory.mktemp("crossing"))


def test_cache_holds_front_outputs_and_is_reused(detector, images, cache) -> None:  # noqa: ANN001
    assert len(cache) == 4 and cache.shapes == [(128, 40, 40), (256, 20, 20), (512, 10, 10)]
    x, _ = letterbox(load_image(images[1]), SIZE)
    with torch.inference_mode():
        want = [t[0].numpy() for t in detector.front(torch.from_numpy(x))]
    for got, w in zip(cache.tensors(2), want, strict=True):  # entry 2 = image 1, variant 0
        np.testing.assert_allclose(got, w, rtol=2e-3, atol=2e-3 * float(np.abs(w).max()))
    again = crossing_cache.CrossingCache(detector, images, SIZE, augment=1, progress=False,
                                         cache_dir=cache.dir.parent)
    assert again.dir == cache.dir
    assert all(np.array_equal(again.tensors(i)[0], cache.tensors(i)[0]) for i in range(len(cache)))
    ts = cache.batch([0, 3], crop=160, rng=np.random.default_rng(0))
    assert [tuple(t.shape) for t in ts] == [(2, 128, 20, 20), (2, 256, 10, 10), (2, 512, 5, 5)]


def _cfg(detector) -> bn.BottleneckConfig:  # noqa: ANN001
    return bn.BottleneckConfig.for_detector(detector, SIZE, crop=160, batch=2, warmup=1, n_levels=3,
                                            dec_width=64, enc_width=32, dec_blocks=1)


def test_default_sizes_match_the_design() -> None:
    cfg = bn.BottleneckConfig()
    assert 0.2e6 < bn.n_params(bn.Encoder(cfg)) < 0.4e6
    assert 2e6 < bn.n_params(bn.Decoder(cfg)) < 4e6
    z = bn.Encoder(cfg)([torch.zeros(1, c, 640 // s, 640 // s) for c, s in zip(cfg.in_channels,
                                                                             cfg.in_strides, strict=True)])
    assert tuple(z.shape) == (1, 32, 40, 40)


def test_decoder_levels(detector) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    dec = bn.Decoder(_cfg(detector)).eval()
    with torch.no_grad():
        dec.level_emb.weight.normal_()
        for p in dec.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    z = torch.randn(1, 32, 5, 5)
    with torch.inference_mode():
        none, minus, top, over = dec(z, None), dec(z, -1), dec(z, 2), dec(z, 9)
        lv0 = dec(z, torch.tensor(0))
        big = dec.resized(5)
        kept = big(z, 2)
    assert all(torch.equal(a, b) for a, b in zip(none, minus, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(top, over, strict=True))  # clamped
    assert not torch.equal(none[0], lv0[0])
    assert all(torch.allclose(a, b) for a, b in zip(top, kept, strict=True))
    assert [tuple(t.shape[1:]) for t in none] == [(128, 10, 10), (256, 5, 5), (512, 3, 3)]


def test_a_run_that_measured_its_sensitivity_weights_resumes_from_its_checkpoint(detector) -> None:  # noqa: ANN001
    """A run measures its tensor weights when it starts, so its checkpoint's config differs from the
    config a resumed call is given in those weights only: it is still the same run (before, every
    sensitivity-weighted run started over on resume), and any other difference is another run."""
    cfg = _cfg(detector)
    state = {"cfg": {**cfg.to_dict(), "tensor_weights": [0.47, 0.65, 1.88]}, "steps": 3}
    assert same_run(state, cfg, 3)
    assert not same_run(state, cfg, 4)
    assert not same_run({**state, "cfg": {**state["cfg"], "z_channels": cfg.z_channels * 2}}, cfg, 3)
    # a checkpoint written before a config field existed reads that field's default: the same run
    older = {k: v for k, v in state["cfg"].items() if k != "class_weights"}
    assert same_run({**state, "cfg": older}, cfg, 3)
    assert not same_run(state, bn.BottleneckConfig.from_dict({**cfg.to_dict(), "class_weights": [1, 4]}), 3)


def test_class_weights_scale_each_class_share_of_the_class_loss(detector) -> None:  # noqa: ANN001
    """``class_weights`` multiply one class's KL and leave the others' alone: a student that errs only
    on class 1 costs 4x with weights (1, 4); one that errs only on class 0 costs the same."""
    gen = torch.Generator().manual_seed(0)
    anchors = head_of(detector).strides.numel()  # the box term reads the head's anchor strides
    y_t = torch.rand(2, 6, anchors, generator=gen)
    for cls_k, factor in ((1, 4.0), (0, 1.0)):
        y_s = y_t.clone()
        y_s[:, 4 + cls_k] = torch.rand(2, anchors, generator=gen)
        plain, _ = task_loss(detector, y_s, y_t)
        weighted, _ = task_loss(detector, y_s, y_t, class_weights=[1.0, 4.0])
        assert plain > 0 and torch.allclose(weighted, factor * plain, rtol=1e-5)


def _tail_outputs(scores: list[tuple[float, float]], anchors: int) -> torch.Tensor:
    """Tail outputs [1, 4 + 2, anchors]: zero boxes, the given (class 0, class 1) scores on the first
    anchors, 0.01 on the rest."""
    y = torch.zeros(1, 6, anchors)
    y[0, 4:] = 0.01
    y[0, 4:, : len(scores)] = torch.tensor(scores).T
    return y


def test_the_class_order_term_sees_a_flipped_near_tie_that_the_class_kl_hardly_does(detector) -> None:  # noqa: ANN001
    """A box the teacher calls class 1 by a hair (0.28 vs 0.30) and the student calls class 0 by the
    same hair: the tail would report the other class (a miss and a false box). Against a student that
    keeps the order, the per-class KL rises by about 0.001, the class-order term by ten times more;
    and the class-order term ignores anchors the teacher would not report."""
    n = head_of(detector).strides.numel()  # the box term reads the head's anchor strides
    teacher = _tail_outputs([(0.28, 0.30)], n)
    right = _tail_outputs([(0.27, 0.31)], n)
    flipped = _tail_outputs([(0.30, 0.28)], n)
    kl_right, _ = task_loss(detector, right, teacher)
    kl_flipped, _ = task_loss(detector, flipped, teacher)
    kl_gap = float(kl_flipped - kl_right)
    rank_gap = float(rank_loss(flipped, teacher) - rank_loss(right, teacher))
    assert 0 < kl_gap < 0.005
    assert rank_gap > 10 * kl_gap
    quiet = _tail_outputs([(0.10, 0.05)], n)  # nothing the teacher would report
    assert float(rank_loss(_tail_outputs([(0.05, 0.10), (0.3, 0.2)], n), quiet)) == 0.0


def test_class_weights_must_match_the_detector_classes(detector, cache, tmp_path: Path) -> None:  # noqa: ANN001
    cfg = bn.BottleneckConfig.from_dict({**_cfg(detector).to_dict(), "class_weights": [1.0, 2.0, 3.0]})
    with pytest.raises(InvalidRequest, match="3 class weights for a detector of 2 classes"):
        train_bottleneck(detector, cache, cfg, steps=1, out=tmp_path / "bn", progress=False,
                         sensitivity=False)
    assert not (tmp_path / "bn").exists()  # refused before anything was written


def test_train_resume_encode_finetune_evaluate(detector, cache, tmp_path: Path) -> None:  # noqa: ANN001
    sens = measure_sensitivity(detector, cache, n=2)
    assert len(sens) == 3 and all(s > 0 for s in sens)
    w = sensitivity_weights(sens)
    assert abs(np.mean(w) - 1) < 1e-3

    out = tmp_path / "bn"
    enc, dec = train_bottleneck(detector, cache, _cfg(detector), steps=3, out=out, progress=False,
                                log_every=1, sensitivity=False)
    log = json.loads((out / "train_log.json").read_text())
    assert log["steps_done"] == 3 and all(np.isfinite(e["loss"]) for e in log["log"])
    assert log["log"][-1]["neck"] > 0  # the tail ran: neck + score distillation after the features-only start
    assert (out / "encoder.pt").is_file() and (out / "checkpoint.pt").is_file()
    # a second call with the same arguments resumes from the checkpoint: nothing left to do
    enc2, _ = train_bottleneck(detector, cache, _cfg(detector), steps=3, out=out, progress=False,
                               sensitivity=False)
    assert all(torch.equal(a, b) for a, b in zip(enc.state_dict().values(), enc2.state_dict().values(),
                                                  strict=True))
    warm, _ = train_bottleneck(detector, cache, _cfg(detector), steps=1, out=tmp_path / "warm",
                               progress=False, sensitivity=False, init=out)
    assert json.loads((tmp_path / "warm" / "train_log.json").read_text())["steps_done"] == 1
    enc3, dec3 = bn.load_models(out)
    assert all(torch.equal(a, b) for a, b in zip(dec.state_dict().values(), dec3.state_dict().values(),
                                                  strict=True))

    with torch.inference_mode():  # untrained levels start as the unquantised path
        zz = torch.randn(1, 32, 4, 4)
        assert all(torch.equal(a, b) for a, b in zip(dec(zz, 0), dec(zz, None), strict=True))
    z = bn.encode_latents(enc, cache)
    assert z.shape == (4, 32, SIZE // 16, SIZE // 16) and np.isfinite(z).all()

    q = ScalarQuantiser(z, 3)
    seen: list[int] = []

    def quantise(zt: torch.Tensor, level: int) -> torch.Tensor:
        seen.append(level)
        return q(zt, level)

    before = {k: v.clone() for k, v in enc.state_dict().items()}
    dec_ft = finetune_decoder(detector, enc, dec, cache, quantise, levels=[0, 1, 2, 3], steps=4,
                              latents=z, unquantised_frac=0.0, progress=False, out=tmp_path / "ft")
    assert sorted(set(seen)) == [0, 1, 2, 3] and dec_ft.n_levels >= 4  # grown to cover level 3
    assert dec_ft is not dec and dec.n_levels == 3
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())  # encoder frozen
    assert (tmp_path / "ft" / "decoder.pt").is_file()

    rows = evaluate_detection(detector, enc, dec_ft, cache, train_latents=z, bits=(4,))
    assert rows["split (uncompressed)"]["ap50"] == pytest.approx(1.0) or rows["n_reference_boxes"] == 0
    assert {"z unquantised", "z 4 bit"} <= set(rows) and rows["z 4 bit"]["bpp"] > 0


def test_a_step_budgeted_finetune_is_reproducible_and_takes_the_runs_seed_and_loss_mix(  # noqa: PLR0913
        detector, cache, tmp_path: Path) -> None:  # noqa: ANN001
    """The level fine-tune of a bottleneck trained earlier (seed 0, no class-order term) trains with
    the seed and loss mix it is given, not those recorded with the bottleneck: two runs with one seed
    and a step budget give the same decoder, another seed another one, and the decoder's config says
    the mix it was tuned with."""
    enc, dec = train_bottleneck(detector, cache, _cfg(detector), steps=1, out=tmp_path / "bn",
                                progress=False, sensitivity=False)
    assert dec.cfg.seed == 0 and dec.cfg.w_rank == 0
    z = bn.encode_latents(enc, cache)
    q = ScalarQuantiser(z, 3)

    def tune(seed: int, name: str) -> dict[str, torch.Tensor]:
        out = tmp_path / name
        finetune_decoder(detector, enc, dec, cache, q, levels=[0, 1], steps=2, latents=z, progress=False,
                         out=out, seed=seed, recipe={"w_rank": 0.5})
        log = json.loads((out / "finetune_log.json").read_text())
        assert log["steps"] == 2 and log["seed"] == seed
        assert json.loads((out / "config.json").read_text())["w_rank"] == 0.5
        return torch.load(out / "decoder.pt", map_location="cpu")

    first, again, other = tune(3, "a"), tune(3, "b"), tune(4, "c")
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)
    assert dec.cfg.w_rank == 0  # the decoder handed in is left as it was

    # --finetune-ema: the weights' moving average, here (decay 0.5, two steps) the mean of the weights
    # after the first step and after the second; the batch-norm statistics are the frozen ones
    one = finetune_decoder(detector, enc, dec, cache, q, levels=[0, 1], steps=1, latents=z, progress=False,
                           seed=3, recipe={"w_rank": 0.5}).state_dict()
    ema = finetune_decoder(detector, enc, dec, cache, q, levels=[0, 1], steps=2, latents=z, progress=False,
                           seed=3, recipe={"w_rank": 0.5}, ema=0.5).state_dict()
    params = {k for k, _ in dec.named_parameters()}
    assert all(torch.allclose(ema[k], (one[k] + first[k]) / 2, atol=1e-6) for k in params)
    assert all(torch.equal(ema[k], first[k]) for k in ema if k not in params)
    assert any(not torch.allclose(ema[k], first[k]) for k in params)


def test_training_keeps_snapshots_that_the_heldout_curve_scores_after_earlier_rows(  # noqa: PLR0913
        detector, cache, bundle, tmp_path: Path) -> None:  # noqa: ANN001
    """The trainer keeps its models now and then as ``snapshots/<stage>-cpu<seconds>.pt``; a run
    continued in a later session extends its held-out curve: the snapshots on disk are scored on
    leave-source-out items after the CPU minutes of earlier runs (--cpu-offset), and an earlier
    report's rows are kept without their files, in CPU order."""
    from palettelink.train import curve

    run = tmp_path / "run"
    train_bottleneck(detector, cache, _cfg(detector), steps=1, out=run / "continued", progress=False,
                     sensitivity=False, snapshot_every_s=1e-6)
    snaps = sorted((run / "snapshots").glob("continued-cpu*.pt"))
    assert len(snaps) == 1 and not list((run / "snapshots").glob("*.partial"))
    snap = torch.load(snaps[0], map_location="cpu", weights_only=False)
    ckpt = torch.load(run / "continued" / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert "opt" not in snap and snap["step"] == 1 and snap["cpu_s"] == ckpt["cpu_s"] > 0
    assert snaps[0].name == f"continued-cpu{int(ckpt['cpu_s'])}.pt"
    earlier = {"snapshot": "first-cpu60.pt", "stage": "first", "step": 9, "train_wall_minutes": 0.5,
               "process_cpu_minutes": 1.0, "ap50": 0.5}
    (tmp_path / "previous.json").write_text(json.dumps({"rows": [earlier]}))
    out = tmp_path / "curve"
    previous = str(tmp_path / "previous.json")
    assert curve.main([str(run / "snapshots"), "--out", str(out), "--every", "40", "--bundle",
                       str(bundle.path), "--previous", previous, "--cpu-offset", "10"]) == 0
    rows = json.loads((out / "heldout_curve.json").read_text())["rows"]
    assert rows[0] == earlier and [r["snapshot"] for r in rows] == ["first-cpu60.pt", snaps[0].name]
    assert rows[1]["stage"] == "continued" and rows[1]["step"] == 1
    assert rows[1]["process_cpu_minutes"] == round(round(int(ckpt["cpu_s"]) / 60, 1) + 10, 1)
    assert 0.0 <= rows[1]["ap50"] <= 1.0
    assert (out / "heldout_curve.png").stat().st_size > 0

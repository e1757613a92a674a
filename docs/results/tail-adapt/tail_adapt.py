"""Experiment (not shipped): adapt the detector's tail to the codec's decoded features.

The tail (YOLOv8 neck + head after the split, 6.05 M parameters) is trained to give, on the palette
codec's decoded tensors, the outputs the frozen teacher gives on the true crossing tensors (the
trainer's own task loss: class KL weighted to the objects, background term 2, class weights 1,4; box
L1). Levels drawn per step from the offered ones (10 % unquantised), whole 640² training views of the
corpus's teacher cache, cosine learning rate. With ``dec`` the decoder trains too (its BatchNorm
statistics frozen, learning rate 5e-5). Scored before and after on the whole leave-source-out set in
torch (the same AP50 the bench prints for the ONNX graphs: 0.9394 at L1 for p7 in both).

    python docs/results/tail-adapt/tail_adapt.py CODEC_DIR MINUTES LR OUT [dec]
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from palettelink.bundle import find_bundle
from palettelink.models.ultra import SplitDetector
from palettelink.scoring import evaluate
from palettelink.train import crossing_cache, data, palette
from palettelink.train.bottleneck import encode_latents
from palettelink.train.bottleneck_training import freeze_batchnorm
from palettelink.train.distill import reset_anchors, task_loss
from palettelink.train.export import load_codec_models

TEACHER_CACHE = Path(".cache/train-p9/crossing")  # the 466-item corpus, 4 augmented views each


def main() -> None:
    torch.set_num_threads(2)
    codec_dir, minutes, lr, out = Path(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), Path(sys.argv[4])
    train_dec = len(sys.argv) > 5 and sys.argv[5] == "dec"
    out.mkdir(parents=True, exist_ok=True)
    b = find_bundle("fall-yolov8")
    det_t = SplitDetector.from_bundle(b, "cpu")  # the teacher: frozen
    det_s = SplitDetector.from_bundle(b, "cpu")  # its tail adapts
    codec = json.loads((codec_dir / "codec.json").read_text())
    enc, dec, _ = load_codec_models(codec_dir, det_t, 640, codec)
    tables = dict(np.load(codec_dir / "palette.npz"))
    q = palette.torch_quantiser(tables)
    tail_params = [p for i, m in enumerate(det_s.layers) if i > det_s.split for p in m.parameters()]
    for p in tail_params:
        p.requires_grad_(True)
    ev = crossing_cache.CrossingCache(det_t, data.eval_images(), 640, augment=0,
                                      cache_dir=out / "eval-cache", progress=False)

    def score(tag: str) -> dict[str, float]:
        rows = {}
        with torch.inference_mode():
            views = [([t.float() for t in ev.batch([i])], ev.letterbox(i)) for i in range(len(ev))]
            refs = [det_t.postprocess(det_t.tail(ts), lb, conf=0.25) for ts, lb in views]
            zs = [enc(ts) for ts, _ in views]
            for lv in [None, 0, 1, 2, 3, 4, 5, 6]:
                preds = [det_s.postprocess(det_s.tail(dec(z if lv is None else q(z, lv), lv)), lb, conf=0.001)
                         for (_, lb), z in zip(views, zs, strict=True)]
                rows["zunq" if lv is None else f"L{lv}"] = round(float(evaluate(refs, preds).ap50), 4)
        reset_anchors(det_s)
        print(tag, rows, flush=True)
        return rows

    res: dict[str, object] = {"before": score("before")}
    cache = crossing_cache.CrossingCache(det_t, data.training_images(None, every=3), 640, augment=4,
                                         cache_dir=TEACHER_CACHE, seed=0, paste=0.4)
    lat = encode_latents(enc, cache)
    groups = [{"params": tail_params, "lr": lr, "base": lr}]
    if train_dec:
        dec.train()
        freeze_batchnorm(dec)
        groups.append({"params": list(dec.parameters()), "lr": 5e-5, "base": 5e-5})
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.Adam(groups)
    rng = np.random.default_rng(1)
    levels = list(range(len(tables["level_sizes"]) - 1))  # the coarsest level is not offered
    reset_anchors(det_s)
    reset_anchors(det_t)
    t0, step, losses = time.perf_counter(), 0, []
    while time.perf_counter() - t0 < minutes * 60:
        prog = (time.perf_counter() - t0) / (minutes * 60)
        for g in opt.param_groups:
            g["lr"] = g["base"] * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * prog)))
        idx = [int(i) for i in rng.integers(0, len(cache), 4)]
        ts = [t.float() for t in cache.batch(idx)]
        z = torch.from_numpy(lat[idx])
        lv = None if rng.random() < 0.1 else int(rng.choice(levels))
        with torch.no_grad():
            zq = z if lv is None else q(z, lv)
            y_t = det_t.tail(ts)
        with torch.set_grad_enabled(train_dec):
            feats = list(dec(zq, lv))
        cls, box = task_loss(det_s, det_s.tail(feats), y_t, 2.0, (1.0, 4.0))
        loss = 20 * cls + 0.2 * box
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        step += 1
        if step % 50 == 0:
            print(f"step {step} {time.perf_counter() - t0:.0f}s loss {np.mean(losses[-50:]):.4f}", flush=True)
    det_s.model.eval()
    dec.eval()
    res.update(steps=step, minutes=minutes, lr=lr, decoder_trained=train_dec,
               loss_first_50=round(float(np.mean(losses[:50])), 4),
               loss_last_50=round(float(np.mean(losses[-50:])), 4),
               after=score("after"))
    (out / "result.json").write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Experiment (not shipped): refine each frame's latent at the edge before it is quantised.

Amortised encoders leave a gap on content they never saw; the edge holds the true crossing tensors,
so it could descend on z itself: z ← argmin of the trainer's weighted feature loss (normalised MSE
of ``dec(z)`` per crossing tensor, weights ``tensor_weights``), starting from ``enc(tensors)``, Adam.
Scored on every ``EVERY``-th leave-source-out item, z unquantised and palette levels, in torch.

    python docs/results/tail-adapt/latent_refine.py CODEC_DIR STEPS LR EVERY
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from palettelink.bundle import find_bundle
from palettelink.models.ultra import SplitDetector
from palettelink.scoring import evaluate
from palettelink.train import crossing_cache, data, palette
from palettelink.train.distill import feature_losses
from palettelink.train.export import load_codec_models


def main() -> None:
    torch.set_num_threads(2)
    codec_dir, steps, lr, every = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
    b = find_bundle("fall-yolov8")
    det = SplitDetector.from_bundle(b, "cpu")
    enc, dec, cfg = load_codec_models(codec_dir, det, 640, json.loads((codec_dir / "codec.json").read_text()))
    for p in list(enc.parameters()) + list(dec.parameters()):
        p.requires_grad_(False)
    q = palette.torch_quantiser(dict(np.load(codec_dir / "palette.npz")))
    ev = crossing_cache.CrossingCache(det, data.eval_images(), 640, augment=0,
                                      cache_dir=Path(".cache/tailexp/eval-cache"), progress=False)
    weights = torch.tensor(cfg.tensor_weights)
    refs, views, z_enc, z_ref = [], [], [], []
    t0 = time.perf_counter()
    for i in range(0, len(ev), every):
        ts, lb = [t.float() for t in ev.batch([i])], ev.letterbox(i)
        with torch.inference_mode():
            refs.append(det.postprocess(det.tail(ts), lb, conf=0.25))
            z0 = enc(ts)
        views.append(lb)
        z_enc.append(z0.clone())
        z = z0.clone().requires_grad_(True)
        opt = torch.optim.Adam([z], lr=lr)
        for _ in range(steps):
            losses = feature_losses(dec.forward_normalised(z, None), ts, dec)
            loss = sum(w * f for w, f in zip(weights, losses, strict=True)) / len(losses)
            opt.zero_grad()
            loss.backward()
            opt.step()
        z_ref.append(z.detach())
    rows: dict[str, float] = {"seconds_per_frame": round((time.perf_counter() - t0) / len(views), 2)}
    with torch.inference_mode():
        for name, zs in (("encoder", z_enc), ("refined", z_ref)):
            for lv in [None, 0, 1, 2, 3, 5]:
                preds = [det.postprocess(det.tail(dec(z if lv is None else q(z, lv), lv)), lb, conf=0.001)
                         for lb, z in zip(views, zs, strict=True)]
                key = f"{name} {'z unquantised' if lv is None else f'L{lv}'}"
                rows[key] = round(float(evaluate(refs, preds).ap50), 4)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

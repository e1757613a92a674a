"""Weight averaging of one run's checkpoints (stochastic weight averaging, Izmailov et al. 2018).

Why: late in a CPU run the held-out AP50 of consecutive checkpoints swings by ±0.02 (the continued
candidate's curve, every third leave-source-out item: 0.905 … 0.951 over its last 1,300 steps) while
the loss is flat: the weights wander around a basin at the learning rate's noise level. The mean of
the weights along that stretch sits nearer the basin's centre than any one checkpoint, at no cost in
training. BatchNorm running statistics are averaged with the weights: the checkpoints come from the
same stretch of one run, so their activation statistics differ little (the z-unquantised AP50 of the
average is what says whether that holds).

    python -m palettelink.train.average CKPT [CKPT ...] --out DIR [--stage WORK]

writes ``DIR`` as :func:`palettelink.train.bottleneck.save_models` does (what ``train --init`` reads)
plus ``average.pt`` in checkpoint form (what the held-out curve scores); ``--stage WORK`` also
installs it as the finished bottleneck stage of the training work folder ``WORK``, so a ``train
--work WORK`` run continues from it with the palette, fine-tune and levels stages.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from palettelink.bundle import atomic_write_folder
from palettelink.errors import InvalidRequest


def average_states(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The mean of the checkpoints' encoder and decoder state dicts (floating tensors averaged, integer
    buffers such as BatchNorm's batch counters taken from the last); config, step and elapsed time of
    the last. The checkpoints must be of one architecture (the same config but measured fields)."""
    import torch

    from palettelink.train.bottleneck import SHAPE_FIELDS

    if not states:
        raise InvalidRequest("no checkpoints to average")
    keys = ("z_channels", *SHAPE_FIELDS, "in_channels", "n_levels")
    first = {k: states[0]["cfg"].get(k) for k in keys}
    for s in states[1:]:
        other = {k: s["cfg"].get(k) for k in keys}
        if other != first:
            diff = sorted(k for k in keys if other[k] != first[k])
            raise InvalidRequest(f"checkpoints of different architectures ({', '.join(diff)}) "
                                 "cannot be averaged")
    out: dict[str, Any] = {"cfg": states[-1]["cfg"], "step": states[-1]["step"],
                           "elapsed": states[-1]["elapsed"], "averaged": len(states)}
    for part in ("enc", "dec"):
        mean = {}
        for name, last in states[-1][part].items():
            if torch.is_floating_point(last):
                mean[name] = torch.stack([s[part][name].float() for s in states]).mean(0).to(last.dtype)
            else:
                mean[name] = last.clone()
        out[part] = mean
    return out


def write_average(paths: Sequence[Path], out: Path, stage_work: Path | None = None) -> dict[str, Any]:
    """Average the checkpoints at ``paths`` into ``out`` (see the module docstring); returns the record."""
    import torch

    from palettelink.train import bottleneck as bn
    from palettelink.train.stages import Stage

    stage = Stage(stage_work, "bottleneck") if stage_work is not None else None
    if stage is not None and stage.dir.exists():  # refused before any checkpoint is read
        raise InvalidRequest(f"{stage.dir} exists: a work folder's bottleneck stage is never overwritten")
    states = [torch.load(p, map_location="cpu", weights_only=False) for p in paths]
    avg = average_states(states)
    cfg = bn.BottleneckConfig.from_dict(avg["cfg"])
    enc, dec = bn.Encoder(cfg), bn.Decoder(cfg)
    enc.load_state_dict(avg["enc"])
    dec.load_state_dict(avg["dec"])
    bn.sync_level_rows(dec)
    record = {"recipe": f"average of {len(paths)} checkpoints (palettelink.train.average)",
              "checkpoints": [{"file": Path(p).name, "step": int(s["step"])} for p, s in zip(paths, states,
                                                                                            strict=True)]}
    def write(tmp: Path) -> None:
        bn.save_models(enc, dec, tmp, report=record)
        torch.save({k: avg[k] for k in ("cfg", "enc", "dec", "step", "elapsed")}, tmp / "average.pt")

    atomic_write_folder(out, write)  # whole or not at all
    if stage is not None:
        shutil.copytree(out, stage.dir)
        stage.finish({"minutes": None, "tiny": False, **record})
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+", type=Path, help="checkpoints of one run (checkpoint.pt copies)")
    p.add_argument("--out", type=Path, required=True, help="folder for the averaged models")
    p.add_argument("--stage", type=Path, metavar="WORK",
                   help="also install the average as WORK's finished bottleneck stage")
    a = p.parse_args(argv)
    missing = [str(c) for c in a.checkpoints if not c.is_file()]
    if missing:
        p.error(f"no such checkpoint: {', '.join(missing)}")
    try:
        record = write_average(a.checkpoints, a.out, a.stage)
    except InvalidRequest as e:
        p.exit(2, f"palettelink.train.average: error: {e}\n")
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

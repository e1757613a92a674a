"""Weight averaging of one run's checkpoints (palettelink/train/average.py): the mean of the weights,
integer buffers from the last checkpoint, refusals for mixed architectures, and an install as a
training work folder's finished bottleneck stage that never overwrites one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from palettelink.errors import InvalidRequest
from palettelink.train import bottleneck as bn
from palettelink.train.average import average_states, main, write_average


def _checkpoint(seed: int, **cfg_kw: object) -> dict:
    torch.manual_seed(seed)
    kw = {"in_channels": (8, 16, 32), "enc_width": 16, "dec_width": 16, "dec_blocks": 1, "z_channels": 8,
          "n_levels": 2, **cfg_kw}
    cfg = bn.BottleneckConfig(**kw)
    enc, dec = bn.Encoder(cfg), bn.Decoder(cfg)
    for p in [*enc.parameters(), *dec.parameters()]:
        p.data.normal_()
    for m in [*enc.modules(), *dec.modules()]:
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.num_batches_tracked.fill_(seed + 1)
    return {"cfg": cfg.to_dict(), "enc": enc.state_dict(), "dec": dec.state_dict(), "step": 10 * seed,
            "elapsed": float(seed)}


def test_the_average_is_the_mean_of_the_weights_with_counters_from_the_last() -> None:
    a, b = _checkpoint(1), _checkpoint(2)
    avg = average_states([a, b])
    for part in ("enc", "dec"):
        for name, v in avg[part].items():
            if torch.is_floating_point(v):
                assert torch.allclose(v, (a[part][name] + b[part][name]) / 2), name
            else:
                assert torch.equal(v, b[part][name]), name
    assert (avg["step"], avg["elapsed"], avg["averaged"]) == (20, 2.0, 2)
    assert average_states([a])["enc"].keys() == a["enc"].keys()


def test_checkpoints_of_different_architectures_are_refused() -> None:
    with pytest.raises(InvalidRequest, match="different architectures \\(enc_width\\)"):
        average_states([_checkpoint(1), _checkpoint(2, enc_width=24)])
    with pytest.raises(InvalidRequest, match="no checkpoints"):
        average_states([])


def test_the_average_loads_as_models_and_installs_as_a_finished_bottleneck_stage(tmp_path: Path) -> None:
    paths = []
    for seed in (1, 2, 3):
        paths.append(tmp_path / f"bottleneck-cpu{seed}.pt")
        torch.save(_checkpoint(seed), paths[-1])
    work = tmp_path / "work"
    record = write_average(paths, tmp_path / "avg", stage_work=work)
    assert [c["step"] for c in record["checkpoints"]] == [10, 20, 30]
    enc, dec = bn.load_models(work / "bottleneck")
    want = average_states([torch.load(p, weights_only=False) for p in paths])
    assert all(torch.equal(enc.state_dict()[k], v) for k, v in want["enc"].items())
    assert json.loads((work / "bottleneck" / "done.json").read_text())["recipe"].startswith("average of 3")
    assert torch.load(tmp_path / "avg" / "average.pt", weights_only=False)["step"] == 30
    with pytest.raises(InvalidRequest, match="never overwritten"):
        write_average(paths, tmp_path / "avg2", stage_work=work)


def test_the_command_line_refuses_missing_and_mixed_checkpoints(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    torch.save(_checkpoint(1), tmp_path / "a.pt")
    torch.save(_checkpoint(2, dec_width=24), tmp_path / "b.pt")
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "a.pt"), str(tmp_path / "nope.pt"), "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "no such checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "different architectures (dec_width)" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()

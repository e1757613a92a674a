"""A warm start may deepen the feature decoder (``train --init … --dec-blocks N``): the grown decoder
starts decoding exactly as the one it grew from, its new blocks learn from the first step, and a
warm start never removes blocks (palettelink/train/bottleneck.grow_decoder)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from palettelink.errors import InvalidRequest
from palettelink.train import bottleneck as bn
from palettelink.train.pipeline import TrainConfig, train_bottleneck_warm

REPO = Path(__file__).resolve().parents[1]
SMALL = {"in_channels": (8, 16, 32), "enc_width": 16, "dec_width": 16, "z_channels": 8, "n_levels": 3}


def _trained(blocks: int, norm: bool = True) -> bn.Decoder:
    """A decoder whose every weight and norm statistic is non-trivial, as after training."""
    torch.manual_seed(blocks)
    dec = bn.Decoder(bn.BottleneckConfig(dec_blocks=blocks, norm=norm, **SMALL))
    for p in dec.parameters():
        p.data.normal_(0, 0.2)
    for m in dec.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return dec.eval()


@pytest.mark.parametrize("norm", [True, False], ids=["batchnorm", "no-norm"])
def test_a_deeper_decoder_decodes_exactly_as_the_one_it_grew_from(norm: bool) -> None:
    small = _trained(2, norm)
    big = bn.Decoder(bn.BottleneckConfig(dec_blocks=4, norm=norm, **SMALL)).eval()
    bn.grow_decoder(big, small)
    z = torch.randn(2, 8, 6, 6)
    for level in (None, 0, 2):
        for a, b in zip(small(z, level), big(z, level), strict=True):
            assert torch.equal(a, b), level
    assert len(big.blocks) == 4


def test_the_new_blocks_learn_from_the_first_step() -> None:
    small = _trained(1)
    big = bn.Decoder(bn.BottleneckConfig(dec_blocks=2, **SMALL)).train()
    bn.grow_decoder(big, small)
    opt = torch.optim.SGD(big.parameters(), lr=0.1)
    loss = sum(t.square().mean() for t in big(torch.randn(2, 8, 6, 6), None))
    loss.backward()
    opt.step()
    assert big.blocks[1].n2.weight.abs().sum() > 0  # the zero scale moved: the block now acts


def test_a_decoder_never_shrinks_or_changes_width() -> None:
    with pytest.raises(ValueError, match="cannot shrink"):
        bn.grow_decoder(bn.Decoder(bn.BottleneckConfig(dec_blocks=1, **SMALL)), _trained(2))
    wider = bn.Decoder(bn.BottleneckConfig(dec_blocks=3, **{**SMALL, "dec_width": 24}))
    with pytest.raises((ValueError, RuntimeError)):
        bn.grow_decoder(wider, _trained(2))


def test_a_warm_start_with_fewer_blocks_than_the_codec_is_refused(tmp_path: Path) -> None:
    """Before any training starts (no detector, no cache needed): the message names both counts."""
    shipped = REPO / "assets/codecs/fall-yolov8"
    has = json.loads((shipped / "codec.json").read_text())["bottleneck"]["dec_blocks"]
    assert has >= 2
    with pytest.raises(InvalidRequest, match=rf"--dec-blocks 1: the codec warm-started from has {has}\b"):
        train_bottleneck_warm(None, None, tmp_path / "out", shipped, tmp_path / "init",
                              TrainConfig(dec_blocks=1))

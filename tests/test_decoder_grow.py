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


def _trained_encoder(z_channels: int) -> bn.Encoder:
    torch.manual_seed(z_channels)
    enc = bn.Encoder(bn.BottleneckConfig(**{**SMALL, "z_channels": z_channels}))
    for p in enc.parameters():
        p.data.normal_(0, 0.2)
    return enc.eval()


def _crossing() -> list[torch.Tensor]:
    """The three crossing tensors of a 64-pixel input (strides 8, 16, 32)."""
    return [torch.randn(2, c, 64 // s, 64 // s)
            for c, s in zip(SMALL["in_channels"], (8, 16, 32), strict=True)]


def test_a_wider_latent_keeps_its_first_channels_and_decodes_exactly_as_before() -> None:
    """``train --init … --latent-channels 12`` on an 8-channel codec: z's first 8 channels are the old
    z, the 4 new ones carry something (not zero), and the grown decoder all but ignores them at first
    (their stem weights are near zero, not zero: see the next test)."""
    enc8, dec8 = _trained_encoder(8), _trained(2)
    wide = {**SMALL, "z_channels": 12}
    enc12 = bn.Encoder(bn.BottleneckConfig(**wide)).eval()
    dec12 = bn.Decoder(bn.BottleneckConfig(dec_blocks=2, **wide)).eval()
    bn.grow_encoder(enc12, enc8)
    bn.grow_decoder(dec12, dec8)
    x = _crossing()
    z8, z12 = enc8(x), enc12(x)
    assert z12.shape[1] == 12
    assert torch.equal(z12[:, :8], z8)
    assert z12[:, 8:].abs().mean() > 0
    for level in (None, 1):
        for a, b in zip(dec8(z8, level), dec12(z12, level), strict=True):
            assert (a - b).abs().max() <= 0.05 * a.abs().max(), level


def test_the_new_latent_channels_and_their_encoder_filters_learn_from_the_first_step() -> None:
    wide = {**SMALL, "z_channels": 12}
    enc12 = bn.Encoder(bn.BottleneckConfig(**wide)).train()
    dec12 = bn.Decoder(bn.BottleneckConfig(dec_blocks=2, **wide)).train()
    bn.grow_encoder(enc12, _trained_encoder(8))
    bn.grow_decoder(dec12, _trained(2))
    loss = sum(t.square().mean() for t in dec12(enc12(_crossing()), None))
    loss.backward()
    assert dec12.stem[0].weight.grad[:, 8:].abs().sum() > 0
    # the new channels' encoder filters get a gradient too (a zero stem weight would pass none back)
    assert enc12.mix[-1].weight.grad[8:].abs().sum() > 0


def test_a_latent_never_shrinks() -> None:
    with pytest.raises(ValueError, match="latent cannot shrink"):
        bn.grow_encoder(bn.Encoder(bn.BottleneckConfig(**{**SMALL, "z_channels": 4})), _trained_encoder(8))
    with pytest.raises(ValueError, match="latent cannot shrink"):
        bn.grow_decoder(bn.Decoder(bn.BottleneckConfig(dec_blocks=2, **{**SMALL, "z_channels": 4})),
                        _trained(2))


def test_a_warm_start_with_fewer_latent_channels_than_the_codec_is_refused(tmp_path: Path) -> None:
    shipped = REPO / "assets/codecs/fall-yolov8"
    has = json.loads((shipped / "codec.json").read_text())["bottleneck"]["z_channels"]
    refused = rf"--latent-channels {has - 4}: the codec warm-started from has {has}\b"
    with pytest.raises(InvalidRequest, match=refused):
        train_bottleneck_warm(None, None, tmp_path / "out", shipped, tmp_path / "init",
                              TrainConfig(latent_channels=has - 4))

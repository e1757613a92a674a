"""The codec registry is the one place that knows codec names, wire ids and capabilities.

Every registered codec offered by the session bundle round-trips a frame at each of its levels,
lists its levels finest first, and, where its spec says ``exact_sizes``, reports exactly the sizes it
then sends. A new codec is one spec: registering it makes the bitstream, the decoder, rate control
and the bench take it without further edits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest

from palettelink import bitstream, codecs
from palettelink.bundle import Bundle
from palettelink.codecs import Analysis, CodecSpec, Decoded, Encoded
from palettelink.errors import InvalidRequest, InvalidStream
from palettelink.image import load_image
from palettelink.ratecontrol import FixedLevel, LevelCoder, TargetBytes

ROOT = Path(__file__).resolve().parents[1]
# modules that dispatch on codecs: they must ask the registry, never name a codec themselves
DISPATCHERS = ["palettelink/codecs/__init__.py", "palettelink/bitstream.py", "palettelink/ratecontrol.py",
               "edge/ratecontrol.py", "edge/client.py", "palettelink/bench/methods.py",
               "palettelink/levels.py", "palettelink/tools/info.py", "server/service.py", "server/info.py",
               "server/grpc_service.py", "server/grpc_convert.py"]
# Strings that look like a codec's name but are not a dispatch on it (none today).
NOT_A_CODEC: dict[str, list[str]] = {}


def test_names_and_wire_ids_are_unique_and_on_the_wire() -> None:
    specs = codecs.specs()
    assert len({s.name for s in specs}) == len({s.wire_id for s in specs}) == len(specs) >= 2
    for s in specs:
        frame = bitstream.Frame(codecs.wire_id(s.name), 0, "x/1", bytes(8), (4, 4), ((1, 1, 1),), (b"\x00",))
        data = bitstream.pack(frame)
        assert data[5] == s.wire_id and codecs.codec_of(bitstream.unpack(data)).name == s.name


def test_the_wire_ids_of_committed_streams_never_change() -> None:
    assert {s.name: s.wire_id for s in codecs.specs()} == {"baseline": 1, "palette": 2, "avif": 3}


def test_no_dispatcher_names_a_codec() -> None:
    names = "|".join(re.escape(s.name) for s in codecs.specs())
    for rel in DISPATCHERS:
        text = (ROOT / rel).read_text()
        for known in NOT_A_CODEC.get(rel, []):
            text = text.replace(known, "")
        assert not re.search(rf"[\"']({names})[\"']", text), f"{rel} names a codec; ask the registry"


def test_a_second_codec_cannot_take_a_name_or_wire_id() -> None:
    base = codecs.spec("baseline")
    with pytest.raises(ValueError, match="wire id"):
        codecs.register(replace(base, name="other"))
    with pytest.raises(ValueError, match="already registered"):
        codecs.register(replace(base, wire_id=200))
    with pytest.raises(InvalidRequest, match="unknown codec"):
        codecs.spec("nope")


@pytest.mark.parametrize("name", [s.name for s in codecs.specs()])
def test_every_codec_round_trips_every_level(bundle: Bundle, images: list[Path], name: str) -> None:
    if name not in codecs.available(bundle):
        pytest.skip(f"the session bundle has no {name} codec")
    spec = codecs.spec(name)
    enc, dec = codecs.make_encoder(bundle, name), codecs.Decoder(bundle)
    levels = enc.levels()
    assert levels == spec.levels(bundle) and len(levels) >= 2
    rgb = load_image(images[0])
    analysis = enc.analyse(rgb)
    payloads = {lv: enc.encode_analysis(analysis, lv).payload for lv in levels}
    sizes = [len(payloads[lv]) for lv in levels]
    assert all(a > b for a, b in zip(sizes, sizes[1:], strict=False)), f"{name}: not finest first {sizes}"
    if spec.exact_sizes:
        assert enc.level_sizes(analysis) == {lv: len(p) for lv, p in payloads.items()}
    for lv, payload in payloads.items():
        assert enc.encode(rgb, lv).payload == payload  # one analysis codes what a fresh encode does
        d = dec.decode(payload)
        assert (d.codec, d.level, d.image_size, d.n_bytes) == (name, lv, (810, 1080), len(payload))
        assert [t.shape for t in d.tensors] == [(1, *t.shape) for t in bundle.tensors]
    frames = [bitstream.unpack(payloads[lv]) for lv in levels]
    assert all(f.progressive == spec.progressive for f in frames)
    if spec.progressive:  # each coarser stream is a prefix of the finer one
        for fine, coarse in zip(frames, frames[1:], strict=False):
            assert fine.layers[: len(coarse.layers)] == coarse.layers


# -- a new codec is one spec -----------------------------------------------------------------------


@dataclass
class _TinyAnalysis(Analysis):
    value: int


class _TinyEncoder:
    """Codes one byte per frame, more of them at finer levels."""

    codec = "tiny"

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle

    def levels(self) -> list[int]:
        return [0, 1, 2]

    def analyse(self, rgb: np.ndarray) -> _TinyAnalysis:
        return _TinyAnalysis((rgb.shape[1], rgb.shape[0]), 0.0, int(rgb.mean()))

    def level_sizes(self, analysis: Analysis) -> dict[int, int]:
        return {lv: len(self.encode_analysis(analysis, lv).payload) for lv in self.levels()}

    def encode_analysis(self, analysis: Analysis, level: int | None = None) -> Encoded:
        assert isinstance(analysis, _TinyAnalysis)
        lv = 0 if level is None else level
        frame = bitstream.Frame(codecs.wire_id("tiny"), lv, self.bundle.id, self.bundle.table_hash,
                                analysis.image_size, ((1, 1, 1),), (bytes([analysis.value]) * (3 - lv) * 10,))
        return Encoded(bitstream.pack(frame), "tiny", lv, analysis.image_size)

    def encode(self, rgb: np.ndarray, level: int | None = None) -> Encoded:
        return self.encode_analysis(self.analyse(rgb), level)


class _TinyDecoder:
    codec = "tiny"

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle

    def decode_frame(self, frame: bitstream.Frame, n_bytes: int) -> Decoded:
        value = np.float32(frame.layers[0][0])
        return Decoded([np.full((1, 1, 1, 1), value)], "tiny", frame.param, frame.image_size, n_bytes)


@pytest.mark.parametrize("exact", [True, False])
def test_one_registered_spec_is_a_whole_codec(bundle: Bundle, monkeypatch: pytest.MonkeyPatch,
                                              exact: bool) -> None:
    tiny = CodecSpec(name="tiny", wire_id=250, param="level", label="T{}", progressive=False,
                     exact_sizes=exact, cut="crossing", levels=lambda b: [0, 1, 2], offered=lambda b: True,
                     encoder=_TinyEncoder, decoder=_TinyDecoder)
    codecs.specs()  # discover the real codecs first, then add one
    monkeypatch.setitem(codecs._REGISTRY, "tiny", tiny)
    assert "tiny" in codecs.available(bundle) and codecs.spec_for_wire_id(250) is tiny
    rgb = np.full((20, 30, 3), 7, np.uint8)
    enc = codecs.make_encoder(bundle, "tiny")
    got = LevelCoder(enc, TargetBytes(len(enc.encode(rgb, 1).payload))).encode(rgb)
    assert got.choice is not None and got.encoded.level == 1 and got.choice.warning is None
    d = codecs.Decoder(bundle).decode(got.encoded.payload)
    assert (d.codec, d.level, float(d.tensors[0].ravel()[0])) == ("tiny", 1, 7.0)
    assert LevelCoder(enc, FixedLevel(2)).encode(rgb).encoded.level == 2


def test_unregistered_wire_id_is_an_invalid_stream(bundle: Bundle) -> None:
    data = bitstream.pack(bitstream.Frame(251, 4, "x/1", bytes(8), (4, 4), ((1, 1, 1),), (b"\x00",)))
    assert data[5] == 251 and bitstream.unpack(data).codec_id == 251  # the container only carries it
    with pytest.raises(InvalidStream, match="unknown codec id 251"):
        codecs.unpack(data)
    with pytest.raises(InvalidStream, match="unknown codec id 251"):
        codecs.Decoder(bundle).decode(data)

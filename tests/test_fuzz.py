"""The fuzzer that ships (issue 10, item 3): ``palettelink fuzz``'s structure-aware mutator over real
frames of both codecs, in-process through the server's decode path and through the real gRPC server,
and property-based tests (hypothesis) of the container parser and both codecs' decoders.

Every outcome must be a decoded frame or a typed :class:`PaletteLinkError`; a crash is any other
exception in-process, INTERNAL/UNKNOWN from the server."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from palettelink import bitstream
from palettelink.errors import InvalidStream, PaletteLinkError
from palettelink.tools import fuzz
from palettelink.tools.fuzz_targets import InProcess, OverGrpc
from palettelink.tools.mutator import Mutator, Seed, seed_frames


@pytest.fixture(scope="module")
def seeds(bundle) -> list[Seed]:  # noqa: ANN001
    s = seed_frames(bundle, big=False)
    assert {x.codec for x in s} >= {"baseline"}
    return s


@pytest.fixture(scope="module")
def decoder(bundle):  # noqa: ANN001, ANN201
    from palettelink.codecs import Decoder

    return Decoder(bundle)


def test_ten_thousand_cases_in_process_no_crash_no_hang(bundle, seeds) -> None:  # noqa: ANN001
    """The cuts at every byte (every byte of each palette frame, the header and layer edges of the
    baseline's) plus 3,000 random mutations; the palette decoder network is skipped (it only sees
    validated index maps), the rest is the server's decode path."""
    mut = Mutator(seeds, seed=10)
    n = mut.systematic + 3000
    assert n >= 10_000
    t0 = time.perf_counter()
    rep = fuzz.fuzz(InProcess(bundle, skip_network=True), mut, n, time_limit=20)
    wall = time.perf_counter() - t0
    print(fuzz.format_report(rep))
    assert rep.cases == n
    assert not rep.crashes, rep.crashes[:3]
    assert not rep.hangs, rep.hangs[:3]
    assert rep.histogram["ok"] and rep.histogram["INVALID_ARGUMENT"]
    assert set(rep.histogram) <= {"ok", "INVALID_ARGUMENT", "FAILED_PRECONDITION"}
    # every operator ran, and the one that found the INTERNAL hole reached the entropy decoder
    assert len(rep.by_operator) == 15, sorted(rep.by_operator)
    assert rep.by_operator["zero-last-word+crc"]["INVALID_ARGUMENT"] > 0
    assert wall < 120, f"{n} cases took {wall:.0f} s"


def test_full_decode_path_with_the_decoder_network(bundle, seeds) -> None:  # noqa: ANN001
    rep = fuzz.fuzz(InProcess(bundle), Mutator(seeds, seed=11, every_byte=False), 300)
    assert not rep.crashes and not rep.hangs, rep.crashes[:3]
    assert rep.histogram["ok"] > 0


def test_two_hundred_cases_through_the_real_grpc_server(live_server, seeds) -> None:  # noqa: ANN001
    target = OverGrpc(live_server.grpc_address, "fall-yolov8", timeout=60)
    try:
        rep = fuzz.fuzz(target, Mutator(seeds, seed=12, every_byte=False), 200, time_limit=90)
    finally:
        target.close()
    print(fuzz.format_report(rep))
    assert not rep.crashes, rep.crashes[:3]
    assert not rep.hangs and "hang" not in rep.histogram
    assert rep.histogram["ok"] > 0 and rep.histogram["INVALID_ARGUMENT"] > 0
    assert "INTERNAL" not in rep.histogram and "UNKNOWN" not in rep.histogram


def test_cli_reports_and_writes_json(bundles_root: Path, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    from palettelink.cli import main

    out = tmp_path / "fuzz.json"
    rc = main(["fuzz", "--cases", "200", "--seed", "3", "--bundles", str(bundles_root), "--codec", "palette",
               "--codec", "baseline", "--skip-network", "--no-every-byte", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "crashes 0" in text and "hangs 0" in text and "status histogram" in text and "slowest case" in text
    rep = json.loads(out.read_text())
    assert rep["cases"] == 200 and rep["crashes"] == 0 and rep["hangs"] == 0
    assert sum(rep["histogram"].values()) == 200


def test_a_crash_is_reported_and_exits_non_zero(seeds) -> None:  # noqa: ANN001
    """The fuzzer itself: an untyped exception counts as a crash, a slow case as a hang."""
    def target(payload: bytes) -> str:
        if len(payload) % 7 == 0:
            raise ValueError("ANS compressed data never ends in a zero word")
        if len(payload) % 7 == 1:
            time.sleep(0.5)
        return "ok"

    rep = fuzz.fuzz(target, Mutator(seeds[:1], seed=1, every_byte=False), 40, time_limit=0.2)
    assert rep.crashes and rep.crashes[0]["outcome"] == "CRASH:ValueError"
    assert "zero word" in rep.crashes[0]["traceback"]
    assert rep.hangs and rep.histogram["hang"] == len(rep.hangs)


# -- property-based (hypothesis) -----------------------------------------------------------------------

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@SETTINGS
@given(st.binary(max_size=512))
def test_container_parser_takes_any_bytes(data: bytes) -> None:
    for cut in (False, True):
        try:
            f = bitstream.unpack(data, allow_truncated_layers=cut)
        except InvalidStream:
            continue
        assert 1 <= len(f.layers) <= bitstream.MAX_LAYERS


@SETTINGS
@given(st.binary(min_size=1, max_size=64), st.data())
def test_container_parser_after_a_valid_prefix(tail: bytes, data: st.DataObject) -> None:
    """A real header followed by anything (the cheapest way past the magic and version checks)."""
    head = bitstream.pack(bitstream.Frame(1, 2, "fall-yolov8/1", bytes(8), (640, 480),  # id 1: baseline
                                          ((3, 4, 4),), (b"abc",)))
    cut = data.draw(st.integers(0, len(head)))
    try:
        bitstream.unpack(head[:cut] + tail, allow_truncated_layers=True)
    except InvalidStream:
        pass


def _mutations() -> st.SearchStrategy:
    edit = st.one_of(
        st.tuples(st.just("set"), st.integers(0, 1 << 30), st.integers(0, 255)),
        st.tuples(st.just("flip"), st.integers(0, 1 << 30), st.integers(0, 7)),
        st.tuples(st.just("zero4"), st.integers(0, 1 << 30), st.just(0)),
        st.tuples(st.just("cut"), st.integers(0, 1 << 30), st.just(0)),
        st.tuples(st.just("insert"), st.integers(0, 1 << 30), st.integers(0, 255)),
    )
    return st.lists(edit, min_size=1, max_size=6)


def _apply(payload: bytes, edits: list[tuple[str, int, int]]) -> bytes:
    b = bytearray(payload)
    for kind, at, v in edits:
        if not b:
            break
        i = at % len(b)
        if kind == "set":
            b[i] = v
        elif kind == "flip":
            b[i] ^= 1 << v
        elif kind == "zero4":
            b[i : i + 4] = bytes(len(b[i : i + 4]))
        elif kind == "cut":
            del b[i:]
        else:
            b.insert(i, v)
    return bytes(b)


def _decode_is_clean(decoder, payload: bytes) -> None:  # noqa: ANN001
    from palettelink.codecs import Decoded

    try:
        out = decoder.decode(payload)
    except PaletteLinkError as e:
        assert e.code in ("INVALID_ARGUMENT", "FAILED_PRECONDITION"), e
        return
    assert isinstance(out, Decoded)


@pytest.mark.parametrize("codec", ["baseline", "palette"])
def test_decoders_take_arbitrary_mutations(decoder, seeds, codec: str) -> None:  # noqa: ANN001
    """Raw edits of a valid frame (the CRC refuses most), and the same edits inside a layer with the
    CRCs recomputed, so they reach the codec's own parser and entropy decoder."""
    mine = [s for s in seeds if s.codec == codec and len(s.payload) < 200_000]
    if not mine:
        pytest.skip(f"this bundle has no {codec} codec")

    @settings(max_examples=60 if codec == "palette" else 40, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.sampled_from(mine), _mutations(), st.integers(0, 63), st.booleans())
    def prop(seed: Seed, edits: list[tuple[str, int, int]], layer: int, recrc: bool) -> None:
        if not recrc:
            _decode_is_clean(decoder, _apply(seed.payload, edits))
            return
        raw = seed.raw.copy()
        i = layer % len(raw.layers)
        raw.layers[i] = _apply(raw.layers[i], edits)
        _decode_is_clean(decoder, raw.pack())

    prop()

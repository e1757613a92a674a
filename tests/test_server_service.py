"""The data plane without a transport: batching across callers, limits, manifest parsing."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import numpy as np
import pytest

from palettelink.bundle import Bundle
from palettelink.codecs import Decoded
from palettelink.errors import InvalidRequest, ResourceExhausted, ServiceUnavailable
from server.batching import Batcher
from server.info import LevelInfo, codec_info
from server.results import FrameResult, TaskOutput
from server.service import Service


class EchoRunner:
    """Stands in for a task model to test the queue alone: answers each frame with its level, fails
    on level 13, records batch sizes."""

    name = "echo"

    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[int] = []
        self.delay = delay

    def run_batch(self, items: Sequence[Decoded], want_preview: bool = False) -> list[TaskOutput]:
        self.batches.append(len(items))
        time.sleep(self.delay)
        if any(d.level == 13 for d in items):
            raise ValueError("unlucky frame")
        return [TaskOutput(preview_jpeg=bytes([d.level])) for d in items]

    def warmup(self) -> None:
        pass


def fake_decoded(level: int) -> Decoded:
    return Decoded([np.zeros((1, 1, 1, 1), np.float32)], "baseline", level, (8, 8), 10)


def run_concurrently(fn, args: list) -> list:  # noqa: ANN001
    out: list = [None] * len(args)

    def call(i: int) -> None:
        try:
            out[i] = fn(args[i])
        except Exception as e:  # returned for the asserts
            out[i] = e

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(args))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def test_batcher_batches_and_isolates_a_failing_frame() -> None:
    runner = EchoRunner()
    seen: list[int] = []
    b = Batcher(runner, name="t", max_batch=4, max_wait_ms=300, on_batch=seen.append)
    try:
        out = run_concurrently(lambda lv: b.submit(fake_decoded(lv)), [1, 2, 13, 4])
    finally:
        b.close()
    assert runner.batches[0] == 4  # all four met in one batch, which failed ...
    assert sorted(runner.batches[1:]) == [1, 1, 1, 1]  # ... so each ran alone
    assert isinstance(out[2], ValueError)
    assert [o.output.preview_jpeg for i, o in enumerate(out) if i != 2] == [b"\x01", b"\x02", b"\x04"]
    assert seen == [1, 1, 1]


def test_batcher_refuses_when_full_and_after_close() -> None:
    b = Batcher(EchoRunner(delay=0.5), name="t", max_batch=1, max_wait_ms=0, max_queue=1)
    try:
        out = run_concurrently(lambda lv: b.submit(fake_decoded(lv)), [1, 2, 3, 4])
    finally:
        b.close()
    assert any(isinstance(o, ResourceExhausted) for o in out)
    assert any(not isinstance(o, Exception) for o in out)
    with pytest.raises(ServiceUnavailable):
        b.submit(fake_decoded(1))


@pytest.fixture(scope="module")
def batching_service(bundles_root):  # noqa: ANN001, ANN201
    svc = Service(bundles_root, max_batch=3, batch_wait_ms=2000, max_streams=1, warmup=False,
                  shed_latency_ms=0)
    svc.load()
    yield svc
    svc.close()


def test_frames_from_concurrent_callers_share_one_batch(batching_service, server_service,  # noqa: ANN001
                                                        coded_frames) -> None:
    payloads = [coded_frames["bus"], coded_frames["zidane"], coded_frames["bus"]]
    got = run_concurrently(lambda p: batching_service.analyze("fall-yolov8", "detect", p), payloads)
    assert all(isinstance(r, FrameResult) for r in got), got
    assert [r.batch_size for r in got] == [3, 3, 3]
    for r, p in zip(got, payloads, strict=True):  # one batched tail pass == one frame at a time
        alone = server_service.analyze("fall-yolov8", "detect", p)
        assert len(r.output.boxes) == len(alone.output.boxes) >= 2
        np.testing.assert_allclose([[b.x1, b.y1, b.x2, b.y2, b.score] for b in r.output.boxes],
                                   [[b.x1, b.y1, b.x2, b.y2, b.score] for b in alone.output.boxes],
                                   atol=0.05, rtol=1e-3)
        assert r.timings.queue_ms > 0


def test_stream_limit_and_header_checks(batching_service) -> None:  # noqa: ANN001
    with batching_service.open_stream("fall-yolov8", "", "a") as s:
        assert (s.bundle, s.task) == ("fall-yolov8/1", "detect")
        assert batching_service.streams()[0]["client"] == "a"
        with pytest.raises(ResourceExhausted), batching_service.open_stream("fall-yolov8", "", "b"):
            pass
    assert batching_service.streams() == []
    with pytest.raises(InvalidRequest), batching_service.open_stream("fall-yolov8", "pose"):
        pass


def test_codec_info_reads_every_level_form(bundle) -> None:  # noqa: ANN001
    def with_codecs(codecs: dict) -> Bundle:
        return Bundle(bundle.path, dict(bundle.manifest, codecs=codecs))

    b = with_codecs({"baseline": {"levels": [2, 3], "param": "bits"},
                     "palette": {"levels": [0, 1, 2], "level_sizes": [1024, 256, 64],
                                 "mean_bits": {"0": 900.0, "2": 300.0}, "mean_bpp": [0.2, 0.1, 0.05],
                                 "progressive": True}})
    assert codec_info(b, "baseline").levels == [LevelInfo(2), LevelInfo(3)]
    c = codec_info(b, "palette")
    assert c.progressive and c.levels[0] == LevelInfo(0, 1024, 900.0, 0.2)
    assert c.levels[1] == LevelInfo(1, 256, 0.0, 0.1) and c.levels[2] == LevelInfo(2, 64, 300.0, 0.05)
    level = {"level": 3, "palette_size": 16, "mean_bits": 10, "mean_bpp": 0.01}
    d = with_codecs({"palette": {"levels": [level]}})
    assert codec_info(d, "palette").levels == [LevelInfo(3, 16, 10.0, 0.01)]
    assert [lv.level for lv in codec_info(with_codecs({}), "baseline").levels] == list(range(2, 9))

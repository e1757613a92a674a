"""The dashboard's server side: page shells (server-rendered HTML; the scripts and styles are files
under ``server/static/``, served by the app, nothing from a CDN), *Try it* (an uploaded image coded
with the edge's own encoder and answered by the same :class:`~server.service.Service`), and the
rate–accuracy curves of a bench JSON.

Pages: ``/`` Live (open streams over SSE with sparklines), ``/frame`` Frame view (the newest frame:
the picture the server rebuilt when the stream asked for a preview, else a neutral canvas, with its
masks, boxes, landmarks and keypoints), ``/try`` Try it, ``/rate`` Rate–accuracy. See the README's
*Dashboard* section.
"""

from __future__ import annotations

import html
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from palettelink import benchfile, codecs
from palettelink.codecs.palette.window import use_window
from palettelink.errors import ImageTooLarge, InvalidRequest, ResourceExhausted, ServiceUnavailable, TooLarge
from palettelink.image import decode_image
from palettelink.ratecontrol import FixedLevel, LevelCoder, TargetBpp
from server import __version__
from server.service import Service
from server.sessions import output_json

REPO_BENCH = Path(__file__).resolve().parents[1] / "docs" / "results" / "bench-eval.json"
REFERENCE = ("baseline", 8)  # "uncompressed": 8-bit features, what the bench's baseline/8 measures
TRY_CLIENT = "dashboard:try"

PAGES = [("/", "live", "Live"), ("/frame", "frame", "Frame view"), ("/try", "try", "Try it"),
         ("/rate", "rate", "Rate–accuracy")]


def page(name: str, title: str, body: str, logout: bool = False) -> str:
    """One page: header with navigation, ``body``, then ``/static/common.js`` and ``/static/NAME.js``.
    ``logout``: the server has tokens, so the header offers to end the browser's session."""
    # Logging out changes state: a form's POST, never a link (a GET of /logout only shows this button).
    out = (' · <form class="logout" method="post" action="/logout"><button type="submit" id="logout">log out'
           '</button></form>' if logout else "")
    nav = " ".join(f'<a href="{href}"{" class=on" if key == name else ""}>{html.escape(label)}</a>'
                   for href, key, label in PAGES)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>PaletteLink · {html.escape(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="/favicon.ico" type="image/svg+xml">
<link rel="stylesheet" href="/static/dashboard.css"></head><body data-page="{name}">
<header><h1>PaletteLink</h1><nav>{nav}</nav><span id="state">…</span><span id="meta"></span>
 <span class="right"><a href="/metrics">metrics</a> · <a href="/docs">API</a> ·
 v{html.escape(__version__)}{out}</span>
</header>
<main>
{body}
</main>
<script src="/static/common.js"></script><script src="/static/{name}.js"></script>
</body></html>
"""


LIVE = """<section><h2>Open streams <span class="muted" id="live-note">(live, server-sent events)</span></h2>
<div class="scroll"><table id="streams"><thead><tr><th>client</th><th>bundle</th><th>task</th>
<th>codec/level</th><th class="n">kbps</th><th class="n">fps</th><th class="n">p50 ms</th>
<th class="n">p95 ms</th><th class="n">frames</th><th class="n">errors</th><th>bitrate (kbit/frame)</th>
<th>level</th><th>since</th></tr></thead><tbody></tbody></table></div>
<p class="muted">Rates over the last 10 s; latency is the server's time per frame (decode + queue + task)
over the last 60 frames; sparklines show those 60 frames.</p></section>
<section><h2>Recently closed streams</h2><div class="scroll"><table id="closed"><thead><tr><th>client</th>
<th>bundle</th><th>task</th><th>codec/level</th><th class="n">frames</th><th class="n">bytes</th>
<th class="n">errors</th><th>closed</th></tr></thead><tbody></tbody></table></div></section>
<section><h2>Bundles</h2><div class="scroll"><table id="bundles"><thead><tr><th>bundle</th><th>tasks</th>
<th>classes</th><th>codecs and levels</th><th>table hash</th></tr></thead><tbody></tbody></table></div>
</section>
<section><h2>Recent frames</h2><div class="scroll"><table id="frames"><thead><tr><th>time</th><th>client</th>
<th>frame</th><th>bundle · task</th><th>codec/level</th><th class="n">bytes</th><th class="n">bpp</th>
<th class="n">boxes</th><th>detections</th><th class="n">decode</th><th class="n">queue</th>
<th class="n">task</th><th class="n">total ms</th><th>status</th></tr></thead><tbody></tbody></table></div>
</section>"""

FRAME = """<section><h2>Latest frame <select id="stream"></select></h2>
<p class="note">Feature streams carry no pixels: their results are drawn on a neutral canvas of the frame's
size. A stream of an image bundle that asks for a preview (<code>want_preview</code>, the edge's
<code>--preview</code>) shows the picture the server rebuilt from it, under its masks, boxes and
keypoints; the server keeps the last few such pictures in memory.</p>
<div class="frame-row"><svg id="frame" class="canvas" viewBox="0 0 640 360" role="img"
aria-label="latest frame with its boxes"></svg><div id="frame-info" class="muted">no stream yet</div></div>
</section>"""

TRY = """<section><h2>Try it</h2>
<form id="try-form"><label>image <input type="file" id="try-file" accept="image/*" required></label>
<label>bundle <select id="try-bundle"></select></label> <label>task <select id="try-task"></select></label>
<label>codec <select id="try-codec"></select></label>
<label>level <select id="try-level"></select></label>
<label>or target bpp <input type="number" id="try-bpp" min="0.001" step="any" placeholder="bpp"
size="6" title="bits per pixel: the finest level within this budget (empty: the level above)"></label>
<label title="show the picture the server rebuilt from the coded stream (image bundles)"><input
type="checkbox" id="try-preview"> preview</label>
<button type="submit">Encode and analyse</button>
</form>
<p class="muted">The server codes the image with the edge's own encoder (the bundle's front and codec),
decodes it and runs the task, and does the same at baseline 8 bits as the uncompressed reference.
Results are drawn over your upload, or with <i>preview</i> over the picture the server rebuilt (kept in
memory with the last few previews). Nothing is written to disk.</p>
<div id="try-error" class="err"></div>
<div id="try-out" class="pair"></div></section>"""

RATE = """<section><h2>Rate–accuracy <span class="muted" id="rate-source"></span></h2>
<div class="chart-row"><svg id="rate" class="chart" viewBox="0 0 900 460" role="img"
aria-label="AP50 against bits per pixel, per method"></svg><div id="rate-legend"></div></div>
<p class="muted" id="rate-metric"></p></section>"""

BODIES = {"live": ("Live", LIVE), "frame": ("Frame view", FRAME), "try": ("Try it", TRY),
          "rate": ("Rate–accuracy", RATE)}


def render(name: str, logout: bool = False) -> str:
    title, body = BODIES[name]
    return page(name, title, body, logout)


# -- rate–accuracy ---------------------------------------------------------------------------------


def bench_curves(path: Path | None) -> dict[str, Any]:
    """The curves of a bench JSON (``palettelink bench --json``): per method, (bpp, AP50) by bpp, as
    the core's reader of that file gives them (:mod:`palettelink.benchfile`)."""
    path = path or REPO_BENCH
    try:
        report = benchfile.read(path)
    except FileNotFoundError:
        raise ServiceUnavailable(f"no bench results at {path} (run `palettelink bench`, or pass "
                                 "--bench-json)") from None
    except (OSError, ValueError) as e:
        raise ServiceUnavailable(f"bench results at {path} unreadable: {e}") from None
    return benchfile.rate_summary(report, Path(path).name)


# -- try it ----------------------------------------------------------------------------------------


TRY_UPLOADS = 2  # Try-it uploads decoded and coded at once (--max-try-uploads)
TRY_MAX_PIXELS = 1 << 24  # the pixel budget of one upload (--try-max-pixels): 16.8 M, 4096², 50 MB decoded


class TryIt:
    """Codes uploads with the edge encoders of the server's bundles (built once per bundle and codec,
    one encode at a time each) and answers them through the service.

    An upload is admitted before anything is read or decoded: at most ``max_uploads`` at once (more are
    refused at once, RESOURCE_EXHAUSTED with a retry hint, like frames over admission control), and
    only while admission control would take a frame now; then its header's size is checked against
    ``max_pixels`` (413 beyond, from the header alone) before a pixel is decoded. So a burst of
    decompression bombs costs neither decodes nor memory."""

    def __init__(self, service: Service, max_uploads: int = TRY_UPLOADS,
                 max_pixels: int = TRY_MAX_PIXELS) -> None:
        self.service = service
        self.max_uploads = max(1, int(max_uploads))
        self.max_pixels = min(int(max_pixels), service.max_pixels)
        self.in_flight = 0  # uploads admitted and not answered yet
        self._lock = threading.Lock()
        self._encoders: dict[tuple[str, str], tuple[Any, threading.Lock]] = {}

    @contextmanager
    def admitted(self) -> Iterator[None]:
        """One upload's turn (held while its body is read, decoded, coded and answered), or
        :class:`ResourceExhausted` at once naming the limit; the server's admission control is asked
        too (a probe: each coded frame is admitted again when the service answers it)."""
        with self._lock:
            if self.in_flight >= self.max_uploads:
                refused = True
            else:
                refused, self.in_flight = False, self.in_flight + 1
        if refused:
            self.service.metrics.refused.labels("try_uploads").inc()
            ms = self.service.admission.retry_after_ms()
            raise ResourceExhausted(f"{self.max_uploads} Try-it uploads are being coded already "
                                    f"(--max-try-uploads); retry after {ms} ms", ms)
        try:
            admission = self.service.admission
            admission.admit(TRY_CLIENT)  # refused here (server full or shedding) before any work
            admission.done(client=TRY_CLIENT)
            yield
        finally:
            with self._lock:
                self.in_flight -= 1

    def decode(self, data: bytes) -> Any:
        """The upload as RGB, its size checked from the header against the pixel budget first
        (:class:`TooLarge`, HTTP 413) so that an over-budget image is never decoded."""
        try:
            return decode_image(data, "upload", self.max_pixels)
        except ImageTooLarge as e:
            raise TooLarge(f"{e} (this server's pixel budget for uploads, --try-max-pixels)") from None

    def _encoder(self, bundle: Any, codec: str) -> tuple[Any, threading.Lock]:
        key = (bundle.id, codec)
        with self._lock:
            if key not in self._encoders:
                enc = codecs.make_encoder(bundle, codec)
                use_window(enc)  # this server decodes windows: code the upload as an edge would
                self._encoders[key] = (enc, threading.Lock())
            return self._encoders[key]

    def _one(self, lb: Any, task: str, rgb: Any, codec: str, level: int | None,
             target_bpp: float | None = None, want_preview: bool = False) -> dict[str, Any]:
        """Code ``rgb`` at ``level``, or at the finest level within ``target_bpp`` (the edge's own rate
        control, :class:`~palettelink.ratecontrol.LevelCoder`), and answer it through the service
        (with ``want_preview`` the picture the server rebuilt goes to its preview store)."""
        enc, lock = self._encoder(lb.bundle, codec)
        if target_bpp is None and level not in enc.levels():
            raise InvalidRequest(f"codec {codec} of bundle {lb.bundle.id} has levels {enc.levels()}, "
                                 f"not {level}")
        control = TargetBpp(target_bpp) if target_bpp is not None else FixedLevel(int(level or 0))
        coder = LevelCoder(enc, control)
        t0 = time.perf_counter()
        with lock:
            coded = coder.encode(rgb)
        encode_ms = (time.perf_counter() - t0) * 1e3
        key, r = self.service.analyze_keyed(lb.bundle.id, task, coded.encoded.payload, want_preview,
                                            client=TRY_CLIENT)
        return {"codec": r.codec, "level": r.level, "bytes": r.payload_bytes, "bpp": r.bpp,
                "encode_ms": encode_ms, "server_ms": r.timings.total_ms, "target_bpp": target_bpp,
                "warning": coded.choice.warning if coded.choice else None,
                **output_json(r.output), "boxes": [asdict(b) for b in r.output.boxes],  # all boxes
                **(self.service.with_preview({"key": key}) or {})}  # key, preview, preview_url

    def run(self, data: bytes, bundle: str, task: str, codec: str, level: int | None,
            target_bpp: float | None = None, want_preview: bool = False) -> dict[str, Any]:
        if level is not None and target_bpp is not None:
            raise InvalidRequest("give a level or a target bpp, not both")
        lb = self.service.resolve(bundle)
        offered = codecs.available(lb.bundle)
        codec = codec or codecs.default_codec(lb.bundle)
        if codec not in offered:
            raise InvalidRequest(f"bundle {lb.bundle.id} offers codecs {offered}, not {codec!r}")
        task = task or lb.bundle.task
        if task not in lb.tasks:
            raise InvalidRequest(f"bundle {lb.bundle.id} serves tasks {lb.tasks}, not {task!r}")
        if not data:
            raise InvalidRequest("empty upload: send the image file as the request body")
        rgb = self.decode(data)
        if level is None and target_bpp is None:
            level = self._encoder(lb.bundle, codec)[0].levels()[0]
        result = self._one(lb, task, rgb, codec, level, target_bpp, want_preview)
        ref_codec, ref_level = REFERENCE
        if ref_codec in offered:
            reference = self._one(lb, task, rgb, ref_codec, ref_level, want_preview=want_preview)
        else:  # a bundle without the baseline codec: its finest level is the reference
            reference = self._one(lb, task, rgb, codec, self._encoder(lb.bundle, codec)[0].levels()[0],
                                  want_preview=want_preview)
        return {"bundle": lb.bundle.id, "task": task, "width": int(rgb.shape[1]), "height": int(rgb.shape[0]),
                "image_bytes": len(data), "result": result, "reference": reference}

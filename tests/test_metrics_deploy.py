"""Metrics for operators: a real server's /metrics scrape passes ``promtool check metrics``; the alert
rules pass ``promtool check rules``; every metric (and every ``by`` label) the Grafana dashboard and the
alert rules name exists in that scrape, so neither can drift from the code silently; the deploy files
load the rules (compose, Prometheus config, kustomize, the Prometheus Operator's PrometheusRule)."""

from __future__ import annotations

import json
import queue
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from palettelink.v1 import palettelink_pb2 as pb
from palettelink.v1.palettelink_pb2_grpc import PaletteLinkStub

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "palettelink.json"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (Debian package `prometheus`; scripts/setup.sh "
                             "installs it when run as root)")
BUNDLE = "fall-yolov8"
STREAM = "palettelink.v1.PaletteLink/Stream"
ANALYZE = "palettelink.v1.PaletteLink/Analyze"
# Series Prometheus makes itself (not in any scrape).
SYNTHETIC = {"up"}


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples]


def value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0 when none)."""
    return sum(v for n, lab, v in samples(text) if n == name and labels.items() <= lab.items())


def series_names(text: str) -> set[str]:
    """Every series name the scrape defines: sample names, and for families without samples yet
    (labelled metrics nothing has touched) the names their type gives them."""
    out = set()
    for f in text_string_to_metric_families(text):
        out |= {s.name for s in f.samples}
        suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
                    "summary": ("_count", "_sum", "_created")}.get(f.type, ("",))
        out |= {f.name + s for s in suffixes}
    return out


@pytest.fixture(scope="module")
def scrape(live_server, grpc_stub, coded_frames) -> str:  # noqa: ANN001
    """/metrics of the live server after good and bad frames on a Stream, a failed Analyze and a
    GetInfo, so the labelled metrics have samples."""
    good = coded_frames["bus"]
    payloads = [good, good[: len(good) // 2], coded_frames["zidane"]]

    def requests():  # noqa: ANN202
        yield pb.StreamRequest(header=pb.StreamHeader(bundle=BUNDLE, client_id="metrics-test"))
        for i, p in enumerate(payloads):
            yield pb.StreamRequest(frame=pb.Frame(frame_id=i + 1, payload=p, edge_front_ms=40.0,
                                                  edge_encode_ms=4.0,
                                                  capture_time_us=int(time.time() * 1e6)))

    answers = [r.result for r in grpc_stub.Stream(requests(), timeout=120)]
    assert [a.error.status for a in answers] == ["", "INVALID_ARGUMENT", ""]
    with pytest.raises(Exception, match="NOT_FOUND"):
        grpc_stub.Analyze(pb.AnalyzeRequest(bundle="no-such-bundle", payload=good), timeout=30)
    grpc_stub.GetInfo(pb.GetInfoRequest(), timeout=30)
    # A call is counted when its handler returns, which may be just after the client read its answer.
    deadline = time.monotonic() + 10
    while True:
        text = httpx.get(live_server.http_url + "/metrics", timeout=30).text
        if value(text, "palettelink_grpc_requests_total", method=STREAM, code="OK") >= 1 or \
                time.monotonic() > deadline:
            return text
        time.sleep(0.1)


# -- the scrape ------------------------------------------------------------------------------------


@needs_promtool
def test_scrape_passes_promtool_check_metrics(scrape: str) -> None:
    r = subprocess.run([PROMTOOL, "check", "metrics"], input=scrape, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), r.stdout + r.stderr


def test_scrape_has_process_build_and_grpc_metrics(scrape: str) -> None:
    from palettelink import __version__

    assert value(scrape, "process_cpu_seconds_total") > 0
    assert value(scrape, "process_resident_memory_bytes") > 1 << 20
    assert value(scrape, "process_start_time_seconds") > 0
    (build,) = [lab for n, lab, _ in samples(scrape) if n == "palettelink_build_info"]
    assert build["version"] == __version__ and re.fullmatch(r"3\.\d+\.\d+.*", build["python"])
    assert f"{BUNDLE}/1" in build["bundles"].split(",")
    assert value(scrape, "palettelink_ready") == 1
    assert value(scrape, "palettelink_grpc_requests_total", method=STREAM, code="OK") >= 1
    assert value(scrape, "palettelink_grpc_requests_total", method=ANALYZE, code="NOT_FOUND") >= 1
    assert value(scrape, "palettelink_grpc_request_seconds_count", method=STREAM) >= 1
    assert value(scrape, "palettelink_grpc_request_seconds_count",
                 method="palettelink.v1.PaletteLink/GetInfo") >= 1
    # Frame errors by bundle and codec: the bad frame of the stream (its header names the codec), and
    # an Analyze for a bundle not loaded here (a label of its own, never the name the client sent).
    assert value(scrape, "palettelink_frame_errors_total", bundle=f"{BUNDLE}/1", codec="baseline",
                 status="INVALID_ARGUMENT") >= 1
    assert value(scrape, "palettelink_frame_errors_total", bundle="unknown", codec="baseline",
                 status="NOT_FOUND") >= 1
    assert not any("no-such-bundle" in str(lab) for _, lab, _ in samples(scrape))


def test_readiness_metric_follows_draining() -> None:
    from server.metrics import Metrics

    class Fake:
        ready, draining = True, False

    m, svc = Metrics(), Fake()
    m.ready.set_function(lambda: float(svc.ready and not svc.draining))
    assert value(m.render().decode(), "palettelink_ready") == 1
    svc.draining = True
    assert value(m.render().decode(), "palettelink_ready") == 0


# -- what the dashboard and the rules name ---------------------------------------------------------

GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")


def promql_names(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, grouping labels) of a PromQL expression (Grafana variables allowed)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    labels = {x.strip() for _, inside in GROUPING.findall(e) for x in inside.split(",") if x.strip()}
    e = GROUPING.sub(" ", e)
    e = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\$\w+|\boffset\s+\w+", " ", e)
    e = re.sub(r"(?<![\w.])\d+(\.\d+)?([eE][+-]?\d+)?", " ", e)
    names = {m.group(1) for m in re.finditer(r"([A-Za-z_:][\w:]*)(\s*\()?", e) if not m.group(2)}
    return names - {"and", "or", "unless", "bool"}, labels


def dashboard_exprs() -> list[str]:
    d = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in d["panels"] for t in p.get("targets", [])]
    for v in d["templating"]["list"]:
        if v["type"] == "query":
            (metric,) = re.findall(r"label_values\((\w+)", v["definition"])
            exprs.append(metric)
    return exprs


def alert_exprs() -> list[str]:
    return [r["expr"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def label_names(service: Any, scrape: str) -> dict[str, set[str]]:
    """series name → its label names: from the server's own metric objects (also for those without
    samples yet) and from the scrape (process_*, python_*)."""
    out: dict[str, set[str]] = {}
    for m in vars(service.metrics).values():
        if isinstance(m, MetricWrapperBase):
            suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}.get(m._type, [""])
            for s in suffixes:
                out[m._name + s] = set(m._labelnames) | ({"le"} if s == "_bucket" else set())
    for name, lab, _ in samples(scrape):
        out.setdefault(name, set()).update(lab)
    return out


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_dashboard_and_alerts_name_only_scraped_metrics(source: str, scrape: str, server_service) -> None:  # noqa: ANN001
    exprs = dashboard_exprs() if source == "dashboard" else alert_exprs()
    have, labels_of = series_names(scrape), label_names(server_service, scrape)
    named: set[str] = set()
    for expr in exprs:
        names, grouping = promql_names(expr)
        assert names, expr
        missing = names - have - SYNTHETIC
        assert not missing, f"{source}: {sorted(missing)} not in the /metrics scrape: {expr}"
        known = set().union(*(labels_of.get(n, set()) for n in names)) | {"instance", "job", "le"}
        assert grouping <= known, \
            f"{source}: labels {sorted(grouping - known)} are on none of {names}: {expr}"
        named |= names
    if source == "dashboard":  # what the dashboard is for
        assert {"palettelink_frames_received_total", "palettelink_bytes_received_total",
                "palettelink_decode_seconds_bucket", "palettelink_task_seconds_bucket",
                "palettelink_queue_seconds_bucket", "palettelink_active_streams",
                "palettelink_frames_refused_total", "palettelink_errors_total",
                "palettelink_grpc_requests_total", "process_cpu_seconds_total",
                "process_resident_memory_bytes"} <= named
    else:
        assert {"up", "palettelink_ready", "palettelink_frame_errors_total",
                "palettelink_frame_seconds_bucket", "palettelink_frames_refused_total"} <= named


def test_promql_names_parses_what_the_files_use() -> None:
    names, labels = promql_names('histogram_quantile(0.95, sum by (le, bundle) (rate(a_bucket{job=~"$job", '
                                 'x="y{z}"}[$__rate_interval]))) > 1e-3 and on (instance) b_total offset 5m')
    assert names == {"a_bucket", "b_total"} and labels == {"le", "bundle", "instance"}


def test_dashboard_is_well_formed() -> None:
    d = json.loads(DASHBOARD.read_text())
    assert d["uid"] == "palettelink-server" and d["title"]
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert (variables["datasource"]["type"], variables["datasource"]["query"]) == ("datasource", "prometheus")
    for p in d["panels"]:
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert 'job=~"$job"' in t["expr"] and 'instance=~"$instance"' in t["expr"], \
                (p["title"], t["expr"])


# -- a fresh server: every queried series exists at 0 ----------------------------------------------

# Labels whose values depend on the deployment (the device a server runs on): a selector naming one
# needs the label on the series, not that value on this test machine.
DEPLOYMENT_LABELS = {"job", "instance", "device", "device_kind"}
MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')


def selectors(expr: str) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """Every series selector of a PromQL expression: (metric name, [(label, op, value)])."""
    e = re.sub(r"\[[^\]]*\]", " ", expr)
    out = [(m.group(1), MATCHER.findall(m.group(2)))
           for m in re.finditer(r"([A-Za-z_:][\w:]*)\s*\{([^}]*)\}", e)]
    braced = {name for name, _ in out}
    return out + [(n, []) for n in sorted(promql_names(expr)[0] - braced)]


def _matches(labels: dict[str, str], matchers: list[tuple[str, str, str]]) -> bool:
    for label, op, want in matchers:
        if label in DEPLOYMENT_LABELS:
            if label not in labels and label not in ("job", "instance"):
                return False
            continue
        have = labels.get(label, "")
        ok = {"=": have == want, "!=": have != want, "=~": re.fullmatch(want, have) is not None,
              "!~": re.fullmatch(want, have) is None}[op]
        if not ok:
            return False
    return True


@pytest.fixture(scope="module")
def fresh(bundles_root):  # noqa: ANN001, ANN201 - (server, the /metrics text before any call)
    """A server of its own, started and loaded like ``palettelink-server`` does, scraped before any
    call reached it; then used for the stream-outcome tests (2 streams per client, header in 1 s)."""
    from server.main import PaletteLinkServer
    from server.service import Service

    svc = Service(bundles_root, [BUNDLE], max_batch=4, batch_wait_ms=20, shed_latency_ms=0,
                  max_streams_per_client=2, header_timeout=1.0, verify=False)
    srv = PaletteLinkServer(svc)
    srv.start()
    srv.load()
    text = httpx.get(srv.http_url + "/metrics", timeout=30).text
    yield srv, text
    srv.stop(grace=1.0)


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_a_fresh_server_has_every_series_the_dashboard_and_alerts_query(source: str, fresh) -> None:  # noqa: ANN001
    """Scraped before any call: each selector of each panel and rule (its label matchers included)
    selects at least one sample, so panels show 0, not "No data", and rate() sees the first burst."""
    _, text = fresh
    have = samples(text)
    for expr in dashboard_exprs() if source == "dashboard" else alert_exprs():
        for name, matchers in selectors(expr):
            if name in SYNTHETIC:
                continue
            assert any(n == name and _matches(lab, matchers) for n, lab, _ in have), \
                f"{source}: no series {name}{{{matchers}}} on a fresh server: {expr}"


def test_a_fresh_server_has_each_known_label_value_at_zero(fresh) -> None:  # noqa: ANN001
    from server import metrics as m

    _, text = fresh
    b = f"{BUNDLE}/1"

    def zero(name: str, **labels: str) -> None:
        found = [v for n, lab, v in samples(text) if n == name and labels.items() <= lab.items()]
        assert found and all(v == 0 for v in found), (name, labels, found)

    for reason in m.FRAME_REFUSAL_REASONS:
        zero("palettelink_frames_refused_total", reason=reason)
    for reason in m.STREAM_REFUSAL_REASONS:
        zero("palettelink_streams_refused_total", reason=reason)
    for reason in m.IDLE_REASONS:
        zero("palettelink_streams_closed_idle_total", reason=reason)
    for outcome in m.STREAM_OUTCOMES:
        zero("palettelink_streams_total", outcome=outcome)
    for status in m.ERROR_STATUSES:
        zero("palettelink_errors_total", status=status)
    for codec in ("baseline", "palette", "unknown"):
        for status in m.FRAME_ERROR_STATUSES:
            zero("palettelink_frame_errors_total", bundle=b, codec=codec, status=status)
    zero("palettelink_frame_errors_total", bundle="unknown", codec="unknown", status="NOT_FOUND")
    for level in range(2, 9):
        zero("palettelink_frames_received_total", bundle=b, codec="baseline", level=str(level))
    zero("palettelink_frame_seconds_count", bundle=b, task="detect")
    zero("palettelink_decode_seconds_count", bundle=b, codec="palette")
    zero("palettelink_grpc_requests_total", method=STREAM, code="OK")
    zero("palettelink_grpc_requests_total", method="grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
         code="OK")
    (cost,) = [(lab, v) for n, lab, v in samples(text) if n == "palettelink_frame_cost_seconds"]
    assert cost[0] == {"bundle": b, "task": "detect", "device": "cpu", "device_kind": "cpu"}
    assert 0 < cost[1] < 60


def _outcomes(srv) -> dict[str, float]:  # noqa: ANN001
    text = httpx.get(srv.http_url + "/metrics", timeout=30).text
    return {o: value(text, "palettelink_streams_total", outcome=o)
            for o in ("ok", "cancelled", "deadline", "refused", "error")}


def _wait_outcome(srv, before: dict[str, float], outcome: str, n: int = 1) -> dict[str, float]:  # noqa: ANN001
    """The outcome counters once ``outcome`` grew by ``n`` (a call is counted as its handler ends)."""
    deadline = time.monotonic() + 30
    while True:
        now = _outcomes(srv)
        if now[outcome] >= before[outcome] + n or time.monotonic() > deadline:
            return now
        time.sleep(0.05)


class _Call:
    """A Stream call fed by the test (None half-closes the request side)."""

    def __init__(self, ch: Any, client: str = "outcomes", bundle: str = BUNDLE,
                 timeout: float | None = 60) -> None:
        self.q: queue.Queue[pb.StreamRequest | None] = queue.Queue()
        self.q.put(pb.StreamRequest(header=pb.StreamHeader(bundle=bundle, client_id=client)))

        def gen():  # noqa: ANN202
            while (item := self.q.get()) is not None:
                yield item

        self.call = PaletteLinkStub(ch).Stream(gen(), timeout=timeout)

    def send(self, frame_id: int, payload: bytes) -> None:
        self.q.put(pb.StreamRequest(frame=pb.Frame(frame_id=frame_id, payload=payload)))


def test_stream_outcomes_tell_a_clean_close_from_an_abort(fresh, coded_frames) -> None:  # noqa: ANN001
    """ok: the edge half-closes (also when it cancels right after its last answer, as the edge client
    does); cancelled: the client aborts with a frame unanswered; deadline: the client's deadline, or
    the server's header timeout; refused: the per-client stream limit; error: an unknown bundle. The
    gRPC call counter says the same (OK, not CANCELLED, for a clean close)."""
    import grpc

    srv, _ = fresh
    good = coded_frames["bus"]
    before = _outcomes(srv)
    calls_ok = value(httpx.get(srv.http_url + "/metrics", timeout=30).text, "palettelink_grpc_requests_total",
                     method=STREAM, code="OK")
    with grpc.insecure_channel(srv.grpc_address) as ch:
        # ok, half-closed: every answer, then the status
        c = _Call(ch)
        c.send(1, good)
        c.q.put(None)
        assert [r.result.frame_id for r in c.call] == [1]
        before = _wait_outcome(srv, before, "ok")
        assert before["ok"] >= 1
        # ok, the edge client's way: half-close and cancel as soon as the last answer is in
        for i in range(3):
            c = _Call(ch)
            c.send(i, good)
            assert next(iter(c.call)).result.frame_id == i
            c.q.put(None)
            c.call.cancel()
        now = _wait_outcome(srv, before, "ok", 3)
        assert now["ok"] == before["ok"] + 3 and now["cancelled"] == before["cancelled"], (before, now)
        before = now
        # cancelled: the client goes away while its frame is being analysed
        c = _Call(ch)
        c.send(9, good)
        time.sleep(0.05)
        c.call.cancel()
        c.q.put(None)
        now = _wait_outcome(srv, before, "cancelled")
        assert now["cancelled"] == before["cancelled"] + 1 and now["ok"] == before["ok"], (before, now)
        before = now
        # deadline: the client's own, while the stream waits for a frame; then the header timeout
        c = _Call(ch, timeout=0.5)
        with pytest.raises(grpc.RpcError) as e:
            list(c.call)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        c.q.put(None)
        before = _wait_outcome(srv, before, "deadline")
        def silent():  # noqa: ANN202 - no header, ever (the request side stays open 5 s)
            time.sleep(5)
            yield from ()

        mute = PaletteLinkStub(ch).Stream(silent(), timeout=30)
        with pytest.raises(grpc.RpcError) as e:
            list(mute)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "StreamHeader" in e.value.details()
        now = _wait_outcome(srv, before, "deadline")
        assert now["deadline"] == before["deadline"] + 1
        before = now
        # refused: a third stream of a client that holds its 2
        held = [_Call(ch, "holder"), _Call(ch, "holder")]
        until = time.monotonic() + 10
        while srv.service.slots.count("holder") < 2 and time.monotonic() < until:
            time.sleep(0.02)
        third = _Call(ch, "holder")
        with pytest.raises(grpc.RpcError) as e:
            list(third.call)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        third.q.put(None)
        before = _wait_outcome(srv, before, "refused")
        for h in held:
            h.q.put(None)
            list(h.call)
        # error: a header naming a bundle this server does not have
        bad = _Call(ch, bundle="no-such-bundle")
        with pytest.raises(grpc.RpcError) as e:
            list(bad.call)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        bad.q.put(None)
        now = _wait_outcome(srv, before, "error")
        assert now["error"] == before["error"] + 1
    text = httpx.get(srv.http_url + "/metrics", timeout=30).text
    assert value(text, "palettelink_grpc_requests_total", method=STREAM, code="OK") >= calls_ok + 6
    assert value(text, "palettelink_streams_closed_idle_total", reason="header") == 1


# -- the rules and the files that load them --------------------------------------------------------


@needs_promtool
def test_alert_rules_pass_promtool() -> None:
    r = subprocess.run([PROMTOOL, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    # The compose Prometheus config, with the rule file it names (relative to the config file).
    r = subprocess.run([PROMTOOL, "check", "config", str(DEPLOY / "prometheus.yml")], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "1 rule files found" in r.stdout + r.stderr, r.stdout + r.stderr


SERIES = {
    "up": "1 0 0 0 0",
    "palettelink_ready": "0x10",
    'palettelink_frames_refused_total{{reason="latency"}}': "0+120x20",
    'palettelink_frame_errors_total{{bundle="b/1", codec="baseline", status="INVALID_ARGUMENT"}}': "0+60x20",
    'palettelink_frame_seconds_count{{bundle="b/1", task="detect"}}': "0+60x20",
}
PROMTOOL_TESTS = """
rule_files: [{alerts}]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series: {series}
    alert_rule_test:
      - eval_time: 4m
        alertname: PaletteLinkServerDown
        exp_alerts:
          - exp_labels: {{severity: critical, job: palettelink-server, instance: "a:8000"}}
      - eval_time: 1m
        alertname: PaletteLinkServerDown
        exp_alerts: []
      - eval_time: 6m
        alertname: PaletteLinkNotReady
        exp_alerts:
          - exp_labels: {{severity: warning, job: palettelink-server, instance: "a:8000"}}
      - eval_time: 15m
        alertname: PaletteLinkFramesRefused
        exp_alerts:
          - exp_labels: {{severity: warning, instance: "a:8000"}}
      - eval_time: 10m
        alertname: PaletteLinkHighErrorRate
        exp_alerts:
          - exp_labels: {{severity: warning, instance: "a:8000"}}
"""


@needs_promtool
def test_alerts_fire_on_synthetic_series(tmp_path: Path) -> None:
    """``promtool test rules``: the rules fire on the series they are about (half the frames failing,
    2 refusals/s, a target down, readiness 0), and not before their ``for``."""
    # Without their annotations (free text, parsed by `promtool check rules`): promtool compares them whole.
    rules = yaml.safe_load(ALERTS.read_text())
    for g in rules["groups"]:
        for r in g["rules"]:
            r.pop("annotations", None)
    bare = tmp_path / "alerts.yml"
    bare.write_text(yaml.safe_dump(rules))
    tests = tmp_path / "alerts_test.yml"
    target = 'job="palettelink-server", instance="a:8000"'
    series = [{"series": (name.replace("}}", ", " + target + "}}") if "{{" in name else
                          name + "{{" + target + "}}").format(), "values": v} for name, v in SERIES.items()]
    tests.write_text(PROMTOOL_TESTS.format(alerts=json.dumps(str(bare)), series=json.dumps(series)))
    r = subprocess.run([PROMTOOL, "test", "rules", str(tests)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def _bucket_series(instance: str, bundle: str, lo: str, hi: str) -> list[dict[str, str]]:
    """palettelink_frame_seconds_bucket of 60 frames a minute, each taking between ``lo`` and ``hi`` s."""
    from server.metrics import LATENCY_BUCKETS

    out = []
    for le in [*(f"{b:g}" for b in LATENCY_BUCKETS), "+Inf"]:
        rate = 60 if le == "+Inf" or float(le) >= float(hi) else 0
        out.append({"series": f'palettelink_frame_seconds_bucket{{job="palettelink-server", '
                              f'instance="{instance}", bundle="{bundle}", task="detect", le="{le}"}}',
                    "values": f"0+{rate}x30"})
    assert any(s["series"].endswith(f'le="{hi}"}}') for s in out) and f"{float(lo):g}" in \
        [f"{b:g}" for b in LATENCY_BUCKETS]
    return out


# (instance, device_kind, measured cost): a 2-core CPU server and a GPU one.
PROFILES = {"cpu": ("cpu:8000", "cpu", "0.4"), "gpu": ("gpu:8000", "gpu", "0.012")}


@needs_promtool
def test_latency_alert_follows_the_device_and_the_measured_cost(tmp_path: Path) -> None:
    """``promtool test rules`` for two profiles. CPU, 0.4 s a frame: threshold max(10 × 0.4, 1) = 4 s,
    so p95 ≈ 2.4 s under ordinary load stays quiet (the old fixed 1 s fired here) and p95 ≈ 9.8 s
    fires. GPU, 12 ms a frame: threshold max(0.12, 0.25) = 0.25 s, so p95 ≈ 0.49 s fires and 0.1 s
    does not. Each alert needs 10 minutes above its threshold."""
    rules = yaml.safe_load(ALERTS.read_text())
    for g in rules["groups"]:
        g["rules"] = [r for r in g["rules"] if r["alert"] == "PaletteLinkLatencyP95High"]
        for r in g["rules"]:
            r.pop("annotations", None)
    bare = tmp_path / "alerts.yml"
    bare.write_text(yaml.safe_dump(rules))
    series = []
    for profile, (instance, kind, cost) in PROFILES.items():
        for bundle in ("slow/1", "fast/1"):
            device = "cuda:0" if kind == "gpu" else "cpu"
            series.append({"series": f'palettelink_frame_cost_seconds{{job="palettelink-server", '
                                     f'instance="{instance}", bundle="{bundle}", task="detect", '
                                     f'device="{device}", device_kind="{kind}"}}',
                           "values": f"{cost}x30"})
        slow, fast = {"cpu": (("5", "10"), ("1", "2.5")), "gpu": (("0.25", "0.5"), ("0.05", "0.1"))}[profile]
        series += _bucket_series(instance, "slow/1", *slow) + _bucket_series(instance, "fast/1", *fast)
    tests = {"rule_files": [str(bare)], "evaluation_interval": "1m", "tests": [{
        "interval": "1m", "input_series": series,
        "alert_rule_test": [
            {"eval_time": "8m", "alertname": "PaletteLinkLatencyP95High", "exp_alerts": []},
            {"eval_time": "20m", "alertname": "PaletteLinkLatencyP95High", "exp_alerts": [
                {"exp_labels": {"severity": "warning", "instance": instance, "bundle": "slow/1",
                                "task": "detect"}} for instance, _, _ in PROFILES.values()]},
        ],
        "promql_expr_test": [
            {"expr": "histogram_quantile(0.95, sum by (instance, bundle, le) "
                     "(rate(palettelink_frame_seconds_bucket[5m])))", "eval_time": "20m",
             "exp_samples": [{"labels": f'{{instance="{i}", bundle="{b}"}}', "value": v} for i, b, v in [
                 ("cpu:8000", "slow/1", 9.75), ("cpu:8000", "fast/1", 2.425),
                 ("gpu:8000", "slow/1", 0.4875), ("gpu:8000", "fast/1", 0.0975)]]},
        ],
    }]}
    path = tmp_path / "latency_test.yml"
    path.write_text(yaml.safe_dump(tests))
    r = subprocess.run([PROMTOOL, "test", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_rules_are_loaded_by_compose_kustomize_and_the_operator() -> None:
    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    assert prom["rule_files"] == ["prometheus/alerts.yml"]
    volumes = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["prometheus"]["volumes"]
    assert "./deploy/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in volumes
    # mounted where the config's relative path finds it
    assert "./deploy/prometheus/alerts.yml:/etc/prometheus/prometheus/alerts.yml:ro" in volumes
    k = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    gen = {g["name"]: g["files"] for g in k["configMapGenerator"]}
    assert gen["palettelink-prometheus-rules"] == ["prometheus/alerts.yml"]
    rule = yaml.safe_load((DEPLOY / "k8s" / "prometheusrule.yaml").read_text())
    assert rule["kind"] == "PrometheusRule" and rule["metadata"]["namespace"] == "palettelink"
    assert rule["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"], \
        "deploy/k8s/prometheusrule.yaml must hold the groups of deploy/prometheus/alerts.yml"


def test_grpc_calls_refused_by_auth_or_unknown_are_counted(server_service) -> None:  # noqa: ANN001
    """The metrics interceptor runs before the auth interceptor: a call without a token counts as
    UNAUTHENTICATED, a method this server lacks as ``unknown``, open health checks as OK."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from palettelink.v1 import palettelink_pb2_grpc
    from server.auth import TokenAuth
    from server.grpc_service import GrpcServer

    def now(name: str, **labels: str) -> float:
        return value(server_service.metrics.render().decode(), name, **labels)

    calls = "palettelink_grpc_requests_total"
    info, check = "palettelink.v1.PaletteLink/GetInfo", "grpc.health.v1.Health/Check"
    before = {"denied": now(calls, method=info, code="UNAUTHENTICATED"),
              "unknown": now(calls, method="unknown", code="UNIMPLEMENTED"),
              "health": now(calls, method=check, code="OK")}
    srv = GrpcServer(server_service, auth=TokenAuth({"s3cret": "cam-1"}))
    srv.start()
    srv.set_serving(True)
    try:
        with grpc.insecure_channel(srv.address) as ch:
            with pytest.raises(grpc.RpcError) as e:
                palettelink_pb2_grpc.PaletteLinkStub(ch).GetInfo(pb.GetInfoRequest(), timeout=10)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as e:
                ch.unary_unary("/palettelink.v1.PaletteLink/NoSuchMethod")(b"", timeout=10)
            assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
    finally:
        srv.stop(grace=1.0)
    assert now(calls, method=info, code="UNAUTHENTICATED") == before["denied"] + 1
    assert now(calls, method="unknown", code="UNIMPLEMENTED") == before["unknown"] + 1
    assert now(calls, method=check, code="OK") == before["health"] + 1

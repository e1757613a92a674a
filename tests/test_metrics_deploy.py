"""Metrics for operators: a real server's /metrics scrape passes ``promtool check metrics``; the alert
rules pass ``promtool check rules``; every metric (and every ``by`` label) the Grafana dashboard and the
alert rules name exists in that scrape, so neither can drift from the code silently; the deploy files
load the rules (compose, Prometheus config, kustomize, the Prometheus Operator's PrometheusRule)."""

from __future__ import annotations

import json
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

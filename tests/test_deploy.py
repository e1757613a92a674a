"""Deployment files hold together: compose validates, Kubernetes/Envoy/Prometheus YAML parses, and
every container command is a real console script that accepts the flags it is given."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def compose_file() -> dict[str, Any]:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def k8s_docs() -> dict[str, list[dict[str, Any]]]:
    """file name → its YAML documents."""
    return {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d]
            for p in sorted((DEPLOY / "k8s").glob("*.yaml"))}


def _k8s(kind: str, name: str) -> dict[str, Any]:
    for docs in k8s_docs().values():
        for d in docs:
            if d["kind"] == kind and d["metadata"]["name"] == name:
                return d
    raise AssertionError(f"no {kind} {name} in deploy/k8s")


def _named(items: list[dict[str, Any]], name: str) -> dict[str, Any]:
    (item,) = [i for i in items if i["name"] == name]
    return item


def _parse(script: str, args: list[str]) -> Any:
    """Parse ``args`` with the real argparse parser of ``script`` (exits on unknown flags)."""
    if script == "palettelink-server":
        from server.main import build_parser
    else:
        from edge.client import build_parser
    return build_parser().parse_args(args)


def test_docker_compose_config_is_valid() -> None:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed (scripts/setup.sh installs it with apt where it can)")
    r = subprocess.run([exe, "-f", str(REPO / "docker-compose.yml"), "config", "-q"], capture_output=True,
                       text=True, timeout=60, cwd=REPO)
    assert r.returncode == 0, r.stderr


def test_compose_services_and_commands() -> None:
    c = compose_file()
    s = c["services"]
    assert {"server", "envoy", "prometheus", "edge"} <= set(s)
    assert s["server"]["deploy"]["replicas"] >= 2
    assert "palettelink-server" in s["server"]["networks"]["default"]["aliases"]
    server_cmd = s["server"]["command"]
    assert server_cmd[0] in SCRIPTS
    args = _parse(server_cmd[0], server_cmd[1:])
    assert (args.host, args.grpc_port, args.http_port) == ("0.0.0.0", 50051, 8000)
    # The edge image's entrypoint is palettelink-edge; compose gives it the arguments.
    assert re.search(r'ENTRYPOINT \["palettelink-edge"\]', (DEPLOY / "Dockerfile.edge").read_text())
    edge = _parse("palettelink-edge", s["edge"]["command"])
    assert edge.server == "envoy:8080" and edge.bits in range(2, 9)
    for f in ("./deploy/envoy.yaml", "./deploy/prometheus.yml"):
        assert any(isinstance(v, str) and v.startswith(f + ":")
                   for svc in s.values() for v in svc.get("volumes", [])), f
        assert (REPO / f).is_file()
    for name in ("server", "edge"):
        assert (REPO / s[name]["build"]["dockerfile"]).is_file()


def test_dockerfiles_name_real_scripts_and_files() -> None:
    for df in ("Dockerfile.server", "Dockerfile.edge"):
        text = (DEPLOY / df).read_text()
        for m in re.finditer(r"^(CMD|ENTRYPOINT) (\[.*?\])\s*$", text.replace("\\\n", " "), re.M):
            cmd = json.loads(m.group(2))
            if m.group(1) == "ENTRYPOINT" or not cmd[0].startswith("-"):
                assert cmd[0] in SCRIPTS, f"{df}: {cmd[0]} is not a console script"
                if m.group(1) == "CMD":
                    _parse(cmd[0], cmd[1:])
        for m in re.finditer(r"^COPY (?!--from)(.+?) \S+$", text, re.M):
            for src in m.group(1).split():
                if "*" not in src:
                    assert (REPO / src).exists(), f"{df} copies missing {src}"
        assert "palettelink build-bundle" in text
    edge_runtime = (DEPLOY / "Dockerfile.edge").read_text().split("\nFROM ")[-1]
    assert "torch" not in edge_runtime.replace("'torch' not in", "").replace("pip show torch", ""), \
        "the edge runtime stage must not install torch"


def test_kubernetes_manifests_parse_and_agree() -> None:
    docs = k8s_docs()
    for name, ds in docs.items():
        for d in ds:
            assert {"apiVersion", "kind", "metadata"} <= set(d), name
            assert d["metadata"]["name"]
            if d["kind"] != "Namespace":
                assert d["metadata"]["namespace"] == "palettelink", name
    kinds = {d["kind"] for ds in docs.values() for d in ds}
    want = {"Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap", "Secret", "ServiceMonitor",
            "Job"}
    assert want <= kinds

    dep = _k8s("Deployment", "palettelink-server")
    pod = dep["spec"]["template"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    (container,) = pod["spec"]["containers"]
    assert container["command"][0] in SCRIPTS
    config = _k8s("ConfigMap", "palettelink-server")["data"]
    args = [re.sub(r"\$\((\w+)\)", lambda m: config[m.group(1)], a) for a in container["args"]]
    parsed = _parse(container["command"][0], args)
    assert parsed.grpc_port == 50051 and str(parsed.tokens_file).startswith("/etc/palettelink/tokens/")
    secret = _k8s("Secret", "palettelink-tokens")
    assert any(v["secret"]["secretName"] == secret["metadata"]["name"]
               for v in pod["spec"]["volumes"] if "secret" in v)
    assert Path(parsed.tokens_file).name in secret["stringData"]
    ports = {p["name"] for p in container["ports"]}
    for svc_name in ("palettelink-server", "palettelink-server-http"):
        svc = _k8s("Service", svc_name)
        assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= ports
    assert _k8s("Service", "palettelink-server")["spec"]["clusterIP"] == "None"  # Envoy needs every pod
    hpa = _k8s("HorizontalPodAutoscaler", "palettelink-server")
    assert hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    job = _k8s("Job", "palettelink-edge-demo")["spec"]["template"]["spec"]["containers"][0]
    assert job["command"][0] in SCRIPTS
    _parse(job["command"][0], job["args"])


def test_kustomization_lists_existing_files() -> None:
    k = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    for r in k["resources"]:
        assert (DEPLOY / r).is_file(), r
    for gen in k["configMapGenerator"]:
        for f in gen["files"]:
            assert (DEPLOY / f).is_file(), f
    envoy_dep = _k8s("Deployment", "palettelink-envoy")
    assert envoy_dep["spec"]["template"]["spec"]["volumes"][0]["configMap"]["name"] == "envoy-config"


def test_envoy_balances_grpc_over_the_server_name() -> None:
    e = yaml.safe_load((DEPLOY / "envoy.yaml").read_text())
    cluster = _named(e["static_resources"]["clusters"], "palettelink_grpc")
    # strict DNS: every address the name resolves to is a host (not one endpoint for all of them)
    dns = cluster["cluster_type"]
    assert dns["name"] == "envoy.cluster.dns" and dns["typed_config"]["@type"].endswith(".v3.DnsCluster")
    assert not dns["typed_config"].get("all_addresses_in_single_endpoint")
    assert "grpc_health_check" in cluster["health_checks"][0]
    assert "http2_protocol_options" in json.dumps(cluster["typed_extension_protocol_options"])
    addr = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    sock = addr["socket_address"]
    # the compose network alias of the server replicas = the headless Service in Kubernetes
    assert (sock["address"], sock["port_value"]) == ("palettelink-server", 50051)
    listener = _named(e["static_resources"]["listeners"], "grpc")
    assert listener["address"]["socket_address"]["port_value"] == 8080
    route = json.dumps(listener["filter_chains"])
    assert '"cluster": "palettelink_grpc"' in route and '"timeout": "0s"' in route


def test_prometheus_scrapes_every_replica() -> None:
    p = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in p["scrape_configs"]}
    sd = jobs["palettelink-server"]["dns_sd_configs"][0]
    assert sd["names"] == ["server"] and sd["port"] == 8000
    assert jobs["palettelink-server"]["metrics_path"] == "/metrics"


def test_shell_scripts_parse() -> None:
    scripts = [REPO / ".ci/run", *sorted((REPO / "scripts").glob("*.sh")),
               *sorted((DEPLOY / "scripts").glob("*.sh"))]
    for s in scripts:
        assert s.is_file()
        r = subprocess.run(["bash", "-n", str(s)], capture_output=True, text=True)
        assert r.returncode == 0, f"{s}: {r.stderr}"
    assert "set -euo pipefail" in (REPO / ".ci/run").read_text()


# -- pinned images, compose v2, Envoy admin, schema validation --------------------------------------

VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
OWN_IMAGES = ("palettelink-server", "palettelink-edge")
# A pinned tag names one release: X.Y.Z (optionally v-prefixed, optionally -variant) or a digest.
PINNED = re.compile(r"^v?\d+\.\d+\.\d+(-[a-z0-9.-]+)?$")


def _images() -> dict[str, str]:
    """where → image, for every image that compose, the Kubernetes manifests and the Dockerfiles use."""
    out = {f"compose {n}": svc["image"] for n, svc in compose_file()["services"].items() if "image" in svc}
    for fname, docs in k8s_docs().items():
        for d in docs:
            spec = d.get("spec", {})
            pod = spec.get("template", {}).get("spec", {})
            for c in pod.get("containers", []) + pod.get("initContainers", []):
                out[f"{fname} {d['metadata']['name']}/{c['name']}"] = c["image"]
    for df in ("Dockerfile.server", "Dockerfile.edge"):
        for i, m in enumerate(re.finditer(r"^FROM (\S+)", (DEPLOY / df).read_text(), re.M)):
            out[f"{df} FROM #{i}"] = m.group(1)
    return out


def _pinned(image: str) -> bool:
    if "@sha256:" in image:
        return True
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and "latest" not in tag and bool(PINNED.match(tag))


def test_every_image_tag_is_pinned() -> None:
    """No :latest, no floating tags (v1.31-latest, 3.11-slim): a rebuild or a pull next month must
    get the same bits. Our own images carry the package version."""
    images = _images()
    assert len([w for w in images if w.startswith("compose")]) == 4, images
    unpinned = {w: i for w, i in images.items() if not _pinned(i)}
    assert not unpinned, f"unpinned image tags: {unpinned}"
    for where, image in images.items():
        name, _, tag = image.rpartition(":")
        if name in OWN_IMAGES:
            assert tag == VERSION, f"{where}: {image} is not tagged with the package version {VERSION}"
    assert {i.rpartition(":")[0] for i in images.values()} >= set(OWN_IMAGES)
    assert not _pinned("envoyproxy/envoy:v1.31-latest") and not _pinned("python:3.11-slim")
    assert not _pinned("palettelink-server") and _pinned("python:3.11.9-slim-bookworm")


def test_compose_uses_the_compose_specification() -> None:
    """Compose v2 syntax: the top-level ``version:`` key is obsolete (``docker compose`` warns)."""
    c = compose_file()
    assert "version" not in c
    assert set(c) <= {"services", "networks", "volumes", "configs", "secrets", "name", "include"}, set(c)


def test_envoy_admin_listens_on_localhost_only() -> None:
    """The admin interface can drain or stop Envoy; only the read-only endpoints are exposed."""
    e = yaml.safe_load((DEPLOY / "envoy.yaml").read_text())
    admin = e["admin"]["address"]["socket_address"]
    assert admin["address"] == "127.0.0.1"
    stats = _named(e["static_resources"]["listeners"], "stats")
    port = stats["address"]["socket_address"]["port_value"]
    hcm = stats["filter_chains"][0]["filters"][0]["typed_config"]
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    assert sorted(r["match"]["path"] for r in routes) == ["/ready", "/stats/prometheus"]  # exact paths only
    admin_cluster = _named(e["static_resources"]["clusters"], "envoy_admin")
    sock = admin_cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    assert sock["socket_address"] == {"address": "127.0.0.1", "port_value": admin["port_value"]}

    envoy = compose_file()["services"]["envoy"]
    assert all(str(admin["port_value"]) not in str(p) for p in envoy.get("ports", [])), envoy["ports"]
    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    (job,) = [j for j in prom["scrape_configs"] if j["job_name"] == "envoy"]
    assert job["static_configs"][0]["targets"] == [f"envoy:{port}"]

    pod = _k8s("Deployment", "palettelink-envoy")["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert admin["port_value"] not in ports.values()
    assert ports[container["readinessProbe"]["httpGet"]["port"]] == port
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(port)


def test_server_has_a_pod_disruption_budget() -> None:
    pdb = _k8s("PodDisruptionBudget", "palettelink-server")
    pod_labels = _k8s("Deployment", "palettelink-server")["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"].get("maxUnavailable") == 1 or pdb["spec"].get("minAvailable", 0) >= 1
    hpa = _k8s("HorizontalPodAutoscaler", "palettelink-server")
    assert pdb["spec"].get("minAvailable", 0) < hpa["spec"]["minReplicas"], "a drain must be able to proceed"
    k = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    pdb_files = [f for f, docs in k8s_docs().items() if any(d["kind"] == "PodDisruptionBudget" for d in docs)]
    assert pdb_files and all(f"k8s/{f}" in k["resources"] for f in pdb_files)


# Custom resources that need their operator's CRD: no schema ships with Kubernetes.
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}
K8S_VERSION = "1.30"  # the oldest Kubernetes these manifests are meant for


def _validate(doc: dict[str, Any], where: str) -> None:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = ".".join(map(str, e.absolute_path))
        what = f"{doc['kind']} {doc['metadata']['name']}"
        raise AssertionError(f"{where}: {what}: {path}: {e.message}") from None


def test_kubernetes_manifests_validate_against_the_schema() -> None:
    """Every manifest against the Kubernetes OpenAPI schema (kubernetes-validate ships them, offline),
    strict: an unknown or misplaced field fails, not only a missing one."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    no_schema = set()
    n = 0
    for fname, docs in k8s_docs().items():
        for d in docs:
            if d["kind"] in CRD_KINDS:
                with pytest.raises(kubernetes_validate.SchemaNotFoundError):
                    kubernetes_validate.validate(d, K8S_VERSION, strict=True)
                no_schema.add(d["kind"])
                continue
            _validate(d, fname)
            n += 1
    assert n >= 12 and no_schema == CRD_KINDS

    broken = _k8s("PodDisruptionBudget", "palettelink-server")
    broken = {**broken, "spec": {**broken["spec"], "maxUnavailabel": 1}}
    with pytest.raises(AssertionError, match="maxUnavailabel"):
        _validate(broken, "a typo")


def test_kustomize_build_validates(tmp_path: Path) -> None:
    """What ``kubectl apply -k deploy/`` would send: the rendered objects (with the generated Envoy
    ConfigMap) validate too. The TLS Secrets come from deploy/certs (git-ignored), so this renders a
    copy of deploy/ in which deploy/scripts/make-certs.sh has run (tests/test_deploy_tls.py checks
    the README's certificate step, the mTLS Component and the Secrets in detail)."""
    pytest.importorskip("kubernetes_validate")
    exe = shutil.which("kubectl")
    if exe is None:
        pytest.skip("kubectl is not installed")
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    deploy = tmp_path / "deploy"
    shutil.copytree(DEPLOY, deploy, ignore=shutil.ignore_patterns("certs"))
    subprocess.run(["bash", str(deploy / "scripts/make-certs.sh"), str(deploy / "certs")], check=True,
                   capture_output=True, timeout=120)
    r = subprocess.run([exe, "kustomize", str(deploy)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    docs = [d for d in yaml.safe_load_all(r.stdout) if d]
    for d in docs:
        _validate(d, "kustomize build")
    kinds = sorted(d["kind"] for d in docs)
    assert kinds.count("PodDisruptionBudget") >= 1 and "Deployment" in kinds
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("envoy-config")]
    assert yaml.safe_load(cm["data"]["envoy.yaml"]) == yaml.safe_load((DEPLOY / "envoy.yaml").read_text())

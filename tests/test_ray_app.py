"""server.ray_app without a cluster: deployment options, refused options, the Serve config builder and the
replica header (the replicas themselves run in tests/test_ray_serve.py)."""

from __future__ import annotations

import asyncio
from unittest import mock

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

pytest.importorskip("ray", reason="needs the steerserve[ray] extra (make install)")

import ray  # noqa: E402
from ray.serve._private.api import call_user_app_builder_with_args_if_necessary  # noqa: E402

from server.config import ServerConfig  # noqa: E402
from server.ray_app import (  # noqa: E402
    CONTROL_SLACK,
    ReplicaHeader,
    app,
    check_proxy_options,
    deployment_options,
)


def test_cpus_are_split_between_the_replicas_on_a_cpu_cluster():
    options, threads = deployment_options(ServerConfig(replicas=2), {"CPU": 8.0})
    assert options["num_replicas"] == 2 and "autoscaling_config" not in options
    assert options["ray_actor_options"] == {
        "num_cpus": 4.0,
        "runtime_env": {"env_vars": {"OMP_NUM_THREADS": "4"}},
    }
    assert threads == 4
    # more replicas than CPUs: a share of a CPU each, one thread
    options, threads = deployment_options(ServerConfig(replicas=4), {"CPU": 2.0})
    assert options["ray_actor_options"]["num_cpus"] == 0.5 and threads == 1
    # an explicit share wins
    options, threads = deployment_options(ServerConfig(replicas=2, replica_cpus=1.0), {"CPU": 8.0})
    assert options["ray_actor_options"]["num_cpus"] == 1.0 and threads == 1


def test_one_gpu_per_replica_where_the_cluster_has_gpus():
    options, _ = deployment_options(ServerConfig(replicas=2), {"CPU": 16.0, "GPU": 2.0})
    assert options["ray_actor_options"]["num_gpus"] == 1
    options, _ = deployment_options(ServerConfig(replicas=2, device="cpu"), {"CPU": 16.0, "GPU": 2.0})
    assert "num_gpus" not in options["ray_actor_options"]
    with pytest.raises(ValueError, match="--device cuda: the Ray cluster has no GPU"):
        deployment_options(ServerConfig(replicas=2, device="cuda"), {"CPU": 4.0})
    with pytest.raises(ValueError, match="--device cuda:1: with --replicas each replica gets one GPU"):
        deployment_options(ServerConfig(replicas=2, device="cuda:1"), {"CPU": 4.0, "GPU": 2.0})


def test_ongoing_requests_fit_the_batch_and_the_queue():
    cfg = ServerConfig(replicas=2, max_batch_size=16, max_queue=32, drain_timeout=12.0)
    options, _ = deployment_options(cfg, {"CPU": 2.0})
    assert options["max_ongoing_requests"] == 16 + 32 + CONTROL_SLACK > 5  # Ray's default would starve
    assert options["max_queued_requests"] == 32
    assert options["backpressure_config"].status_code == 429
    assert options["graceful_shutdown_timeout_s"] == 17.0


def test_autoscaling_between_min_and_max_on_ongoing_requests():
    cfg = ServerConfig(replicas=2, min_replicas=1, max_replicas=4, max_batch_size=8)
    options, threads = deployment_options(cfg, {"CPU": 8.0})
    assert "num_replicas" not in options
    assert options["autoscaling_config"] == {
        "min_replicas": 1,
        "max_replicas": 4,
        "initial_replicas": 2,
        "target_ongoing_requests": 8,
    }
    assert options["ray_actor_options"]["num_cpus"] == 2.0 and threads == 2  # room for the most replicas


@pytest.mark.parametrize(
    ("option", "value"), [("header_timeout", 3.0), ("max_header_bytes", 1024), ("max_connections", 10)]
)
def test_connection_options_of_the_proxy_are_refused(option, value):
    check_proxy_options(ServerConfig(replicas=2))
    flag = "--" + option.replace("_", "-")
    with pytest.raises(ValueError, match=f"{flag}: not supported with --replicas"):
        check_proxy_options(ServerConfig(replicas=2, **{option: value}))


def test_the_serve_config_builder_reads_serve_options_by_name():
    args = {"replicas": 3, "vector-dir": "/data/vectors", "max_batch_size": 4, "quantization": "none"}
    with mock.patch.object(ray, "cluster_resources", return_value={"CPU": 6.0}):
        built = call_user_app_builder_with_args_if_necessary(app, args)
    deployment = built._bound_deployment
    config, threads = deployment.init_args
    assert (config.replicas, str(config.vector_dir), config.max_batch_size) == (3, "/data/vectors", 4)
    assert threads == 2 and deployment._deployment_config.num_replicas == 3
    with pytest.raises(ValueError, match="unknown serve option 'replica'"):
        app({"replica": 2})
    with pytest.raises(ValueError, match="--port"):
        app({"replicas": 2, "port": "eighty"})


def test_every_response_names_its_replica_and_carries_one_request_id():
    inner = FastAPI()

    @inner.get("/x")
    async def x() -> PlainTextResponse:
        return PlainTextResponse("ok", headers={"x-request-id": "from-the-app"})

    async def run() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=ReplicaHeader(inner, replica="r1"))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            same = await client.get("/x", headers={"x-request-id": "from-the-app"})  # the proxy's id
            other = await client.get("/x", headers={"x-request-id": "something else"})
            return [same, other]

    same, other = asyncio.run(run())
    assert same.headers["x-steerserve-replica"] == "r1"
    assert "x-request-id" not in same.headers  # the proxy adds its own copy
    assert other.headers.get_list("x-request-id") == ["from-the-app"]  # a different id is kept

"""`exitwise serve --ray`: the same app as a Ray Serve deployment, on a local Ray instance this test starts.

Skipped without the ray extra (`pip install 'exitwise[ray]'`). Ray takes tens of seconds to start here."""
import functools
import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import torch

import pytest

for module in ("fastapi", "uvicorn", "prometheus_client", "httpx", "onnxruntime", "onnxscript"):
    pytest.importorskip(module)
ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
import httpx

from exitwise.api import export
from exitwise.deploy.onnx_runner import OnnxRunner
from exitwise.deploy.onnx_runtime import OnnxEarlyExit
from exitwise.deploy.ray_serve import replica_options, start_on_ray
from exitwise.config import RayConfig, SchedulerConfig, ServeConfig, TierConfig
from exitwise.early_exit import EarlyExitModel
from exitwise.models import create_model
from exitwise.policies import get_policy

from conftest import random_image_set, self_signed, spread_thresholds
from test_tiers import Tier, _borderline, _stop_every_tier, digits  # noqa: F401 (fixtures)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance for this module's tests (each takes its Serve application down itself)."""
    tests = str(Path(__file__).resolve().parent)  # where the replicas import this module's helpers from
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")]))}})
    yield
    ray.shutdown()


def test_two_replicas_on_ray_serve_answer_as_the_onnx_runtime(tmp_path, local_ray):
    torch.manual_seed(0)
    network, data = create_model("digits-convnet"), random_image_set(16, seed=2)
    thresholds = spread_thresholds(network, data, get_policy("entropy"))  # every exit taken
    EarlyExitModel.create(network, "digits-convnet", "entropy", thresholds).save(tmp_path / "model")
    export(tmp_path / "onnx", source=tmp_path / "model", exporter="torchscript")
    images = data.images.numpy()
    expected = OnnxEarlyExit.load(tmp_path / "onnx").run(images)
    assert set(expected.exits.tolist()) == {0, 1, 2}
    try:
        url = start_on_ray(functools.partial(OnnxRunner.load, tmp_path / "onnx"), ServeConfig(port=free_port()),
                           RayConfig(replicas=(2, 2)))
        body = {"inputs": [{"name": "image", "datatype": "UINT8", "shape": list(images.shape),
                            "parameters": {"layout": "NHWC"}, "data": images.ravel().tolist()}]}
        for _ in range(3):  # any replica answers the same
            response = httpx.post(url + "/v2/models/digits-convnet/infer", json=body, timeout=60)
            assert response.status_code == 200, response.text
            out = {o["name"]: o["data"] for o in response.json()["outputs"]}
            assert out["class_index"] == expected.predictions.tolist() and out["exit"] == expected.exits.tolist()
        assert httpx.get(url + "/v2/health/ready", timeout=30).status_code == 200
        assert serve.status().applications["exitwise"].deployments["ExitwiseServer"].replica_states["RUNNING"] == 2
    finally:
        serve.shutdown()


def test_a_cloud_tier_on_ray_serve_over_https_takes_a_device_tiers_survivors(digits, tmp_path, local_ray):
    """The last tier as two Ray Serve replicas behind Ray's HTTPS proxy; the device tier (its own process) sends its
    survivors there, checking the certificate: the chain answers as single-process early exit does."""
    pytest.importorskip("cryptography")
    export_dir, images = digits
    cert, key = self_signed(tmp_path / "tls")
    expected = OnnxEarlyExit.load(export_dir).run(images[:60])
    cloud_config = ServeConfig(port=free_port(), ssl_certfile=cert, ssl_keyfile=key,
                               tier=TierConfig("cloud", 1, 2), scheduler=SchedulerConfig(first=1, last=2))
    device = None
    try:
        url = start_on_ray(functools.partial(OnnxRunner.load, export_dir), cloud_config, RayConfig(replicas=(2, 2)))
        assert url.startswith("https://")
        device = Tier(export_dir, "--stages", "0-0", "--next", url, "--next-ca", str(cert), "--tier", "device")
        body = {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [60, *images.shape[1:]],
                            "parameters": {"layout": "NHWC"}, "data": images[:60].ravel().tolist()}]}
        response = httpx.post(device.url + "/v2/models/digits-convnet/infer", json=body, timeout=60)
        assert response.status_code == 200, response.text
        doc = response.json()
        exits = np.array({o["name"]: o["data"] for o in doc["outputs"]}["exit"])
        assert not ((exits != expected.exits) & ~_borderline(export_dir, images[:60])).any()
        assert {0, 1} <= set(exits) and not any(doc["parameters"]["degraded"])
        assert doc["parameters"]["tier"] == [("device", "cloud", "cloud")[e] for e in exits]
    finally:
        if device is not None:
            device.stop()
        serve.shutdown()


def test_mutual_tls_on_ray_is_refused_in_one_line(tmp_path):
    """Ray Serve's proxy takes a CA file but asks clients for no certificate: refused, not left open."""
    from exitwise.errors import UserError
    cert, key = self_signed(tmp_path / "tls")
    config = ServeConfig(port=free_port(), ssl_certfile=cert, ssl_keyfile=key, ssl_ca_certs=cert)
    with pytest.raises(UserError, match="does not require client certificates"):
        start_on_ray(lambda: None, config)


def _replicas_running() -> int:
    return serve.status().applications["exitwise"].deployments["ExitwiseServer"].replica_states.get("RUNNING", 0)


def test_autoscaled_replicas_grow_under_load_and_shrink_when_idle(digits, local_ray):
    """--replicas 1-2: one replica while idle; with more requests in flight than the target, Ray Serve's autoscaler
    adds the second (timings shortened from Ray's 30 s / 600 s for the test); idle again, back to one. The load is
    4 client threads, each posting one request after another, bounded in count and time."""
    export_dir, images = digits
    body = {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [8, *images.shape[1:]],
                        "parameters": {"layout": "NHWC"}, "data": images[:8].ravel().tolist()}]}
    scaling = RayConfig(replicas=(1, 2), target_ongoing=1, upscale_delay_s=0.5, downscale_delay_s=1.0,
                        look_back_period_s=10.5)  # Ray wants it above its metrics interval, 10 s
    stop, statuses = threading.Event(), []

    def client(url: str) -> None:
        with httpx.Client(timeout=30) as http:
            for _ in range(3000):
                if stop.is_set():
                    return
                statuses.append(http.post(url + "/v2/models/digits-convnet/infer", json=body).status_code)

    try:
        url = start_on_ray(functools.partial(OnnxRunner.load, export_dir), ServeConfig(port=free_port()), scaling)
        assert _replicas_running() == 1
        threads = [threading.Thread(target=client, args=(url,)) for _ in range(4)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 90
        while _replicas_running() < 2 and time.monotonic() < deadline and any(t.is_alive() for t in threads):
            time.sleep(0.5)
        grown = _replicas_running()
        stop.set()
        for t in threads:
            t.join(60)
        assert grown == 2 and statuses and set(statuses) == {200}
        deadline = time.monotonic() + 90
        while _replicas_running() > 1 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _replicas_running() == 1
    finally:
        stop.set()
        serve.shutdown()


def test_replicas_fixed_or_a_range_for_ray_serves_autoscaler():
    """N: Ray's num_replicas. MIN-MAX: its autoscaler, aiming by default at a full first-stage batch per replica."""
    from exitwise.errors import UserError
    config = ServeConfig(scheduler=SchedulerConfig(max_batch=32, max_queue=100))
    assert replica_options(RayConfig(replicas=(3, 3)), config) == {"num_replicas": 3}
    scaled = replica_options(RayConfig(replicas=(1, 4), upscale_delay_s=5.0), config)["autoscaling_config"]
    assert scaled == {"min_replicas": 1, "initial_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 32,
                      "upscale_delay_s": 5.0}  # the other timings: Ray Serve's defaults
    assert replica_options(RayConfig(replicas=(1, 4), target_ongoing=8), config)["autoscaling_config"][
        "target_ongoing_requests"] == 8
    with pytest.raises(UserError, match="above --max-queue 100"):
        replica_options(RayConfig(replicas=(1, 4), target_ongoing=101), config)
    assert RayConfig(replicas=(1, 4)).describe() == "1-4 replicas, autoscaled"


def runner_named_by_its_malloc(export_dir):
    """A replica's runner whose model name tells how many separate mmaps a 4 MiB malloc made in the replica's process
    (0: the malloc thresholds raised there, as `exitwise serve` raises them in its own)."""
    from test_allocator import mmapped_by_a_large_malloc
    runner = OnnxRunner.load(export_dir)
    runner.name = f"mmapped-{mmapped_by_a_large_malloc()}"
    return runner


def test_each_replica_raises_the_malloc_thresholds_in_its_own_process(digits, local_ray, monkeypatch):
    from test_allocator import glibc_with_mallinfo2
    from exitwise import allocator
    if not glibc_with_mallinfo2():
        pytest.skip("glibc >= 2.33 only")
    for name in allocator.USER_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    try:
        url = start_on_ray(functools.partial(runner_named_by_its_malloc, digits[0]), ServeConfig(port=free_port()))
        assert httpx.get(url + "/v2/models/mmapped-0", timeout=30).status_code == 200
    finally:
        serve.shutdown()

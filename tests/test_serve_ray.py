"""`exitwise serve --ray`: the same app as a Ray Serve deployment, on a local Ray instance this test starts.

Skipped without the ray extra (`pip install 'exitwise[ray]'`). Ray takes tens of seconds to start here."""
import functools
import socket

import numpy as np

import pytest

for module in ("fastapi", "uvicorn", "prometheus_client", "httpx", "onnxruntime", "onnxscript"):
    pytest.importorskip(module)
ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
import httpx

from exitwise.api import export
from exitwise.deploy.onnx_runner import OnnxRunner
from exitwise.deploy.onnx_runtime import OnnxEarlyExit
from exitwise.deploy.ray_serve import start_on_ray
from exitwise.config import SchedulerConfig, ServeConfig, TierConfig
from exitwise.early_exit import EarlyExitModel
from exitwise.models import create_model

from conftest import random_image_set, self_signed
from test_tiers import Tier, _borderline, digits  # noqa: F401 (digits: the fixture)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance for this module's tests (each takes its Serve application down itself)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_two_replicas_on_ray_serve_answer_as_the_onnx_runtime(tmp_path, local_ray):
    model = EarlyExitModel.create(create_model("digits-convnet"), "digits-convnet", "entropy", [1.5, 2.0])
    model.save(tmp_path / "model")
    export(tmp_path / "onnx", source=tmp_path / "model", exporter="torchscript")
    images = random_image_set(16, seed=2).images.numpy()
    expected = OnnxEarlyExit.load(tmp_path / "onnx").run(images)
    try:
        url = start_on_ray(functools.partial(OnnxRunner.load, tmp_path / "onnx"), ServeConfig(port=free_port()),
                           replicas=2)
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
        url = start_on_ray(functools.partial(OnnxRunner.load, export_dir), cloud_config, replicas=2)
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

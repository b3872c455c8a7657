"""`exitwise serve --ray`: the same app as a Ray Serve deployment, on a local Ray instance this test starts.

Skipped without the ray extra (`pip install 'exitwise[ray]'`). Ray takes tens of seconds to start here."""
import functools
import socket

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
from exitwise.config import ServeConfig
from exitwise.early_exit import EarlyExitModel
from exitwise.models import create_model

from conftest import random_image_set


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_replicas_on_ray_serve_answer_as_the_onnx_runtime(tmp_path):
    model = EarlyExitModel.create(create_model("digits-convnet"), "digits-convnet", "entropy", [1.5, 2.0])
    model.save(tmp_path / "model")
    export(tmp_path / "onnx", source=tmp_path / "model", exporter="torchscript")
    images = random_image_set(16, seed=2).images.numpy()
    expected = OnnxEarlyExit.load(tmp_path / "onnx").run(images)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
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
        ray.shutdown()

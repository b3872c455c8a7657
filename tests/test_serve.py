"""`exitwise serve`: real HTTP on 127.0.0.1 (free ports), tiny digits models, every loop bounded in count and time.

Served answers equal the offline runs (`OnnxEarlyExit.run`, `EarlyExitModel.run`) on the same images; bad input
gets a one-line 4xx and the server keeps serving; overload gets 503 + Retry-After or 504, never silence;
SIGTERM drains; a client that leaves has its samples dropped; the ONNX server never imports torch.
"""
import asyncio
import base64
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

for module in ("fastapi", "uvicorn", "prometheus_client", "httpx", "onnxruntime", "onnxscript"):
    pytest.importorskip(module)
import httpx
import uvicorn

from exitwise.api import export
from exitwise.deploy.onnx_runner import OnnxRunner
from exitwise.deploy.onnx_runtime import OnnxEarlyExit
from exitwise.config import SchedulerConfig, ServeConfig
from exitwise.deploy.answers import Handoff, Slot, Waiting
from exitwise.deploy.oip import BadRequest, answered
from exitwise.deploy.metrics import Metrics
from exitwise.deploy.scheduler import Answer, Expired, Scheduler
from exitwise.deploy.server import _Call, _OneWrite, create_app, serve, uvicorn_config
from exitwise.early_exit import EarlyExitModel
from exitwise.models import create_model
from exitwise.policies import get_policy
from exitwise.runtime import all_exit_logits, prepare
from exitwise.errors import UserError
from exitwise.serve_torch import TorchRunner, make_runner

from conftest import random_image_set, read_http_answer, spread_thresholds, until

SRC = Path(__file__).resolve().parents[1] / "src"
NEAR = 1e-5  # fp32 rounding: a sample whose score is this close to a threshold may go either way
INFER = "/v2/models/digits-convnet/infer"


class Running:
    """An app served by uvicorn on a thread of this process, on a free port of 127.0.0.1."""

    def __init__(self, runner, config=ServeConfig(), as_exitwise_serve: bool = False):
        """`as_exitwise_serve`: uvicorn configured as `exitwise serve` runs it (its own protocol), else plainly, as
        another ASGI server would run the app."""
        self.app = create_app(runner, config)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn_config(self.app) if as_exitwise_serve
                                     else uvicorn.Config(self.app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        until(lambda: self.server.started, 20)
        self.client = httpx.Client(base_url=self.url, timeout=20)

    def metric(self, name: str, **labels) -> float:
        """One sample of /metrics (0 when absent)."""
        want = "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else ""
        for line in self.client.get("/metrics").text.splitlines():
            if line.startswith(name + want + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def stop(self) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(20)
        assert not self.thread.is_alive()


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """A random-weight digits-convnet whose thresholds use every exit, saved and exported to ONNX."""
    torch.manual_seed(0)
    net = create_model("digits-convnet")
    policy = get_policy("margin").with_temperatures([1.5, 0.7, 1.0])
    data = random_image_set(120, seed=1)
    model = EarlyExitModel(net, policy, np.array(spread_thresholds(net, data, policy)), "digits-convnet",
                           tuple("abcdefghij"))
    out = tmp_path_factory.mktemp("serve")
    model.save(out / "model")
    export(out / "onnx", source=out / "model", exporter="torchscript")
    return model, data, out


@pytest.fixture(scope="module")
def onnx_server(digits):
    server = Running(OnnxRunner.load(digits[2] / "onnx"), ServeConfig(scheduler=SchedulerConfig(max_batch=16)))
    yield server
    server.stop()


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0]).save(buffer, format="PNG")
    return buffer.getvalue()


def unreadable_dds() -> bytes:
    """A DDS file with its pixel format flags zeroed, on which PIL's reader raises NotImplementedError (not OSError)."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="DDS")
    return buffer.getvalue()[:80] + bytes(4) + buffer.getvalue()[84:]


def declaring(format: str, width: int, height: int) -> bytes:
    """An 8x8 grey PNG or JPEG whose header declares width x height pixels: a few hundred bytes that a decoder would
    allocate (and, for the JPEG, fill) width x height pixels for."""
    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, format=format)
    data = bytearray(buffer.getvalue())
    if format == "PNG":  # IHDR: width, height, then its CRC over type and data
        data[16:24] = struct.pack(">II", width, height)
        data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    else:  # SOF0: length, precision, height, width
        at = data.index(b"\xff\xc0")
        data[at + 5:at + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def test_an_image_of_another_size_is_refused_from_its_header_before_its_pixels_are_decoded(monkeypatch):
    """A decompression bomb under --max-body-mb (a 333-byte JPEG declaring 12000x12000 pixels took 0.45 s and a peak
    of 585 MB to be refused, decoded first; on the server that time is the event loop's): the server takes images of
    the model's size only, so it refuses one of another size as its header says, before either decoder runs (9000x9000:
    under PIL's bomb limit, where simplejpeg would decode it)."""
    from PIL import ImageFile
    import exitwise.images
    from exitwise.deploy.oip import decode_images
    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.format))
    if exitwise.images.simplejpeg is not None:
        monkeypatch.setattr(exitwise.images.simplejpeg, "decode_jpeg", lambda *a, **k: decoded.append("simplejpeg"))
    for format in ("PNG", "JPEG"):
        with pytest.raises(BadRequest, match=r"^image #0 is 9000x9000, but the model takes 8x8$"):
            decode_images([declaring(format, 9000, 9000)], (1, 8, 8))
    assert decoded == []


def infer_pixels(client, images: np.ndarray, layout="NHWC") -> dict:
    pixels = images if layout == "NHWC" else images.transpose(0, 3, 1, 2)
    tensor = {"name": "image", "datatype": "UINT8", "shape": list(pixels.shape), "data": pixels.ravel().tolist()}
    if layout == "NHWC":
        tensor["parameters"] = {"layout": "NHWC"}
    response = client.post(INFER, json={"id": "r1", "inputs": [tensor]})
    assert response.status_code == 200, response.text
    return response.json()


def infer_binary_bytes(client, blobs: list[bytes]) -> dict:
    """BYTES over the binary tensor extension, as tritonclient sends them."""
    data = b"".join(struct.pack("<I", len(b)) + b for b in blobs)
    header = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(blobs)],
                                     "parameters": {"binary_data_size": len(data)}}]}).encode()
    response = client.post(INFER, content=header + data, headers={"Inference-Header-Content-Length": str(len(header))})
    assert response.status_code == 200, response.text
    return response.json()


def columns(response: dict) -> dict:
    return {o["name"]: o["data"] for o in response["outputs"]}


def test_served_answers_equal_the_onnx_runtime_whatever_the_request_form(digits, onnx_server):
    _, data, out = digits
    images = data.images.numpy()
    expected = OnnxEarlyExit.load(out / "onnx").run(images)
    rows = {}

    def send(i: int) -> None:  # 12 requests of 10 images each, in four forms, four at a time
        part = images[10 * i:10 * i + 10]
        form = i % 4
        if form == 0:
            got = columns(infer_pixels(onnx_server.client, part, "NHWC"))
        elif form == 1:
            got = columns(infer_pixels(onnx_server.client, part, "NCHW"))
        elif form == 2:
            got = columns(infer_binary_bytes(onnx_server.client, [png(im) for im in part]))
        else:
            files = [("files", (f"{j}.png", png(im), "image/png")) for j, im in enumerate(part)]
            answer = onnx_server.client.post("/v1/predict", files=files).json()["predictions"]
            got = {"class_index": [a["class_index"] for a in answer], "exit": [a["exit"] for a in answer],
                   "probability": [a["probability"] for a in answer], "label": [a["class"] for a in answer]}
        for j in range(len(part)):
            rows[10 * i + j] = {k: v[j] for k, v in got.items()}

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(send, range(12)))
    order = sorted(rows)
    assert order == list(range(120))
    assert [rows[i]["exit"] for i in order] == expected.exits.tolist()
    assert [rows[i]["class_index"] for i in order] == expected.predictions.tolist()
    assert [rows[i]["label"] for i in order] == ["abcdefghij"[c] for c in expected.predictions]
    np.testing.assert_allclose([rows[i]["probability"] for i in order], expected.probabilities, atol=2e-6)
    assert set(expected.exits) == {0, 1, 2}


def test_a_raw_image_body_and_base64_json_bytes_are_served_too(digits, onnx_server):
    _, data, _ = digits
    image = data.images[0].numpy()
    raw = onnx_server.client.post("/v1/predict", content=png(image), headers={"content-type": "image/png"}).json()
    tensor = {"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(png(image)).decode()]}
    b64 = columns(onnx_server.client.post(INFER, json={"inputs": [tensor]}).json())
    assert raw["model"] == "digits-convnet" and raw["predictions"][0]["class_index"] == b64["class_index"][0]
    assert raw["predictions"][0]["exit"] == b64["exit"][0]
    nested = {"name": "image", "datatype": "UINT8", "shape": [1, 1, 8, 8],  # the protocol's nested row-major data
              "data": image.transpose(2, 0, 1)[None].tolist()}
    assert columns(onnx_server.client.post(INFER, json={"inputs": [nested]}).json()) == b64


def test_served_answers_equal_early_exit_model_run_on_torch(digits):
    model, data, _ = digits
    expected = model.run(data, precision="fp32", micro_batch=64)
    server = Running(TorchRunner(model, precision="fp32", micro_batch=64),
                     ServeConfig(scheduler=SchedulerConfig(max_batch=16)))
    try:
        images = data.images.numpy()
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda i: columns(infer_pixels(server.client, images[i:i + 6])), range(0, 120, 6)))
        exits = np.concatenate([a["exit"] for a in answers])
        predictions = np.concatenate([a["class_index"] for a in answers])
        assert server.metric("exitwise_batch_size_count", stage="1") >= 1
        for k in "012":  # every stage call timed
            assert server.metric("exitwise_stage_seconds_count", stage=k) == server.metric(
                "exitwise_batch_size_count", stage=k)
        assert server.metric("exitwise_stage_seconds_sum", stage="0") > 0
    finally:
        server.stop()
    assert_same_as_run(model, data, expected, exits, predictions)
    assert set(exits) == {0, 1, 2}


def test_a_stage_call_runs_on_its_workers_share_of_the_torch_threads(digits):
    model, data, _ = digits
    threads = torch.get_num_threads()
    runner = TorchRunner(model, precision="fp32", micro_batch=64, workers=2)
    assert runner.threads == max(1, threads // 2)
    images = data.images.numpy()
    try:
        for rows in (1, 40):
            runner.step(0, runner.to_input(images[:rows]), runner.init_state(rows))
            assert torch.get_num_threads() == runner.threads
        for call in (lambda: runner.stage(0, runner.to_input(images[:4])),  # a tier's recompute and degraded
                     lambda: runner.answer(0, runner.to_numpy(runner.stage(0, runner.to_input(images[:4]))))):
            torch.set_num_threads(threads)  # as a thread of a tier's forwarding pool starts
            call()
            assert torch.get_num_threads() == runner.threads
    finally:
        torch.set_num_threads(threads)


def test_a_prepared_model_is_served_in_the_precision_it_was_prepared_in(digits):
    model = digits[0].prepare("fp32")
    assert TorchRunner(model).precision == "fp32"
    with pytest.raises(ValueError, match="prepared in fp32: serve it in that precision"):  # was served fp32 silently
        TorchRunner(model, precision="bf16")


def test_pixels_straight_from_a_requests_bytes_are_taken_without_a_warning(digits, recwarn):
    model, data, _ = digits
    runner = TorchRunner(model, precision="fp32", micro_batch=64)
    pixels = np.ascontiguousarray(data.images.numpy()[:3].transpose(0, 2, 3, 1) * 255).astype(np.uint8)
    read_only = np.frombuffer(pixels.tobytes(), dtype=np.uint8).reshape(pixels.shape)  # NHWC bytes as oip reads them
    assert torch.equal(runner.to_input(read_only), runner.to_input(pixels))
    assert not [w for w in recwarn if "not writable" in str(w.message)]


def test_the_serving_line_and_the_model_info_metric_name_the_precision_and_micro_batch_the_runner_runs_in(digits):
    from exitwise.deploy.runner import describe
    model, _, out = digits
    torch_runner = TorchRunner(model, early_exit=False, precision="fp32", micro_batch=48)
    assert describe(torch_runner) == "digits-convnet (pytorch, fp32, micro-batch 48)"
    onnx = OnnxRunner.load(out / "onnx")
    assert describe(onnx) == f"digits-convnet (onnxruntime, micro-batch {onnx.micro_batch})"
    metrics, scheduler = Metrics(), Scheduler(torch_runner, SchedulerConfig(workers=2))
    metrics.serving(torch_runner, scheduler)
    assert ('exitwise_model_info{early_exit="false",micro_batch="48",model="digits-convnet",platform="pytorch",'
            'precision="fp32",stages="0-2",workers="2"} 1.0') in metrics.text().decode()


def test_the_served_runner_is_built_off_the_callers_thread_and_its_errors_reach_the_caller():
    with pytest.raises(UserError, match="no-such-model"):
        make_runner(model="no-such-model")


def assert_same_as_run(model, data, expected, exits, predictions) -> None:
    """Served exits and predictions equal `EarlyExitModel.run`'s, but where a score is within NEAR of a threshold."""
    scores = model.policy.scores(torch.from_numpy(all_exit_logits(prepare(model.network), data).logits)).numpy()[:-1]
    borderline = (np.abs(scores - model.thresholds.astype(np.float32)[:, None]) <= NEAR).any(0)
    differ = (exits != expected.exits) | (predictions != expected.predictions)
    assert not (differ & ~borderline).any()


def test_no_early_exit_serves_the_full_network(digits):
    _, data, out = digits
    expected = OnnxEarlyExit.load(out / "onnx").run_backbone(data.images.numpy())
    server = Running(OnnxRunner.load(out / "onnx", early_exit=False))
    try:
        got = columns(infer_pixels(server.client, data.images.numpy()[:40]))
        assert set(got["exit"]) == {2}
        assert got["class_index"] == expected.predictions[:40].tolist()
        assert server.metric("exitwise_exits_total", exit="0") == 0
    finally:
        server.stop()


def test_health_metadata_and_metrics(onnx_server):
    client = onnx_server.client
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").json() == {"ready": True}
    assert client.get("/v2/models/digits-convnet/ready").status_code == 200
    meta = client.get("/v2/models/digits-convnet").json()
    assert meta["name"] == "digits-convnet" and meta["platform"] == "onnxruntime"
    assert meta["inputs"][0]["datatype"] == "UINT8" and meta["inputs"][0]["shape"] == [-1, 1, 8, 8]
    assert [o["name"] for o in meta["outputs"]] == ["class_index", "label", "probability", "exit"]
    before = onnx_server.metric("exitwise_request_seconds_count", code="200", endpoint="infer")
    infer_pixels(client, np.zeros((3, 8, 8, 1), dtype=np.uint8))
    assert onnx_server.metric("exitwise_request_seconds_count", code="200", endpoint="infer") == before + 1
    text = client.get("/metrics").text
    for name in ("exitwise_exits_total", "exitwise_batch_size_bucket", "exitwise_stage_seconds_bucket",
                 "exitwise_queue_depth", "exitwise_request_seconds_bucket"):
        assert name in text
    assert ('exitwise_model_info{early_exit="true",micro_batch="%d",model="digits-convnet",platform="onnxruntime",'
            'precision="",stages="0-2",workers="1"} 1.0' % onnx_server.app.state.runner.micro_batch) in text
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "python_gc_collections_total"):
        assert name in text  # prometheus-client's standard process metrics, as ops dashboards expect
    for path in ("/openapi.json", "/docs"):  # no generated schema or pages beside the protocol's own routes
        assert client.get(path).status_code == 404


def test_a_server_that_no_longer_accepts_says_it_is_not_ready_as_probes_read_it(digits):
    server = Running(OnnxRunner.load(digits[2] / "onnx"))
    try:
        assert server.client.get("/v2/health/ready").json() == {"ready": True}
        assert server.app.state.scheduler.close(10)  # as when draining
        for path in ("/v2/health/ready", "/v2/models/digits-convnet/ready"):
            answer = server.client.get(path)
            assert answer.status_code == 503 and answer.json()["ready"] is False, path
        assert server.client.get("/v2/health/live").status_code == 200  # alive: no restart wanted
    finally:
        server.stop()


def test_an_app_made_for_several_processes_outside_serve_processes_still_answers_its_metrics(digits):
    server = Running(OnnxRunner.load(digits[2] / "onnx"), ServeConfig(processes=2))  # as Ray Serve's replicas make it
    try:
        scrape = server.client.get("/metrics")  # was a 500: multiprocess metrics without their folder
        assert scrape.status_code == 200 and "exitwise_model_info" in scrape.text
    finally:
        server.stop()
    with pytest.raises(ValueError, match="serve\\(\\) runs one process, not 2: serve_processes"):
        serve(OnnxRunner.load(digits[2] / "onnx"), ServeConfig(processes=2))  # had served one, silently


def test_bad_input_gets_a_one_line_4xx_and_the_server_keeps_serving(digits, tmp_path):
    _, data, out = digits
    server = Running(OnnxRunner.load(out / "onnx"), ServeConfig(max_body_mb=0.01))
    jpeg = io.BytesIO()
    Image.fromarray(data.images[0, :, :, 0].numpy()).save(jpeg, format="JPEG")
    pixels = lambda shape, datatype="UINT8": {"inputs": [{"name": "image", "datatype": datatype, "shape": shape,
                                                          "data": [0] * int(np.prod(shape))}]}
    sized_true = json.dumps({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 1, 8, 8],
                                         "parameters": {"binary_data_size": True}}]}).encode()  # true: no size
    cases = [
        ("/v1/predict", {"content": b"not an image"}, 400, "not an image format PIL reads"),
        ("/v1/predict", {"content": jpeg.getvalue()[:len(jpeg.getvalue()) // 2]}, 400, "cannot decode image"),
        ("/v1/predict", {"content": png(np.zeros((9, 8, 1), dtype=np.uint8))}, 400, "the model takes 8x8"),
        ("/v1/predict", {"content": unreadable_dds()}, 400, "cannot decode image #0: Unknown pixel format flags 0"),
        ("/v1/predict", {"content": declaring("PNG", 9000, 9000)}, 400, "is 9000x9000, but the model takes 8x8"),
        ("/v1/predict", {"content": b""}, 400, "empty request body"),
        ("/v1/predict", {"content": b"\x00" * 20_000}, 413, "over the limit"),
        ("/v1/predict", {"content": b"--x\r\n", "headers": {"content-type": "multipart/form-data; boundary=x"}},
         400, "multipart"),
        (INFER, {"content": b""}, 400, "empty request body"),
        (INFER, {"content": b"{not json"}, 400, "malformed JSON"),
        (INFER, {"content": b"[" * 5000 + b"]" * 5000}, 400, "malformed JSON: nested too deeply"),
        (INFER, {"content": b'{"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 1, 8, 8], "data": '
                            + b"[" * 2000 + b"0" + b"]" * 2000 + b"}]}"}, 400, "nested too deeply"),
        (INFER, {"json": pixels([1, 3, 8, 8])}, 400, "input shape [1, 3, 8, 8]"),
        (INFER, {"json": pixels([1, 1, 8, 8], "FP32")}, 400, "datatype 'FP32' is not served"),
        (INFER, {"json": {"inputs": [{**pixels([1, 1, 8, 8])["inputs"][0], "shape": [1] * 3000}]}}, 400,
         "1, 1 ... 1, 1, 1"),  # a message quoting a 9 KB shape, cut
        (INFER, {"json": {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 1, 8, 8],
                                      "data": [300] * 64}]}}, 400, "0..255"),
        (INFER, {"json": {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 1, 8, 8],
                                      "data": [0] * 63}]}}, 400, "63 values"),
        (INFER, {"json": {"inputs": []}}, 400, "exactly one input"),
        (INFER, {"json": pixels([True, 1, 8, 8])}, 400, "'shape' must be a list of non-negative integers"),
        (INFER, {"json": {"inputs": [{**pixels([1, 1, 8, 8])["inputs"][0], "data": [0.5] * 64}]}}, 400,
         "integers 0..255"),  # as Triton does: JSON floats or booleans are not UINT8 values, never truncated
        (INFER, {"json": {"inputs": [{**pixels([1, 1, 8, 8])["inputs"][0], "data": [True] * 64}]}}, 400,
         "integers 0..255"),
        (INFER, {"json": {"inputs": [{**pixels([1, 1, 8, 8])["inputs"][0], "parameters": []}]}}, 400,
         "parameters must be an object"),
        (INFER, {"json": {**pixels([1, 1, 8, 8]), "outputs": [5]}}, 400, "must be an object with a 'name'"),
        (INFER, {"json": {**pixels([1, 1, 8, 8]), "id": 5}}, 400, "'id' must be a string"),
        (INFER, {"json": {**pixels([1, 1, 8, 8]), "id": 0}}, 400, "'id' must be a string"),
        (INFER, {"content": json.dumps({**pixels([1, 1, 8, 8]), "id": "\ud800"}).encode()}, 400, "lone surrogate"),
        (INFER, {"json": {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["%%%"]}]}},
         400, "base64"),
        (INFER, {"content": sized_true + b"\0", "headers": {"Inference-Header-Content-Length": str(len(sized_true))}},
         400, "binary_data_size True but 1 bytes"),
        (INFER, {"content": json.dumps(pixels([1, 1, 8, 8])).encode(),  # int() would take "+1", "1_0", " 1"
                 "headers": {"Inference-Header-Content-Length": "+115"}}, 400, "Inference-Header-Content-Length is not"),
        ("/v2/models/other/infer", {"json": pixels([1, 1, 8, 8])}, 404, "unknown model 'other'"),
        ("/v2/nothing", {"content": b""}, 404, "Not Found"),
    ]
    try:
        for path, kwargs, status, message in cases:
            response = server.client.post(path, **kwargs)
            assert response.status_code == status, (path, response.text)
            assert response.text.count("\n") == 0 and message in response.json()["error"], response.text
            assert len(response.json()["error"]) <= 400  # whatever the request quoted
            assert server.client.post(INFER, json=pixels([1, 1, 8, 8])).status_code == 200  # still serving
        assert server.client.get("/v2/models/other").status_code == 404
        for path in ("/v1/predict", INFER):  # answered before FastAPI's routing: its refusals too
            response = server.client.get(path)
            assert response.status_code == 405 and "send POST" in response.json()["error"], response.text
            assert response.headers["allow"] == "POST"
        assert server.metric("exitwise_rejected_requests_total", reason="bad_request") >= 12
    finally:
        server.stop()


def test_a_full_queue_answers_503_with_retry_after_at_once_and_a_late_request_504(digits):
    _, _, out = digits
    config = ServeConfig(scheduler=SchedulerConfig(max_batch=64, max_wait_ms=60_000, max_queue=4, timeout_ms=1500))
    server = Running(OnnxRunner.load(out / "onnx"), config)
    try:
        too_many = server.client.post(INFER, json=zeros_request(5))  # more than --max-queue: never fits, no retry
        assert too_many.status_code == 413 and "retry-after" not in too_many.headers
        assert too_many.json() == {"error": "5 images in one request; this server holds at most 4 (--max-queue)"}
        with ThreadPoolExecutor(1) as pool:
            held = pool.submit(infer_status, server.client, 4)  # waits for a batch of 64 that never comes
            until(lambda: server.metric("exitwise_samples_inside") >= 4)
            refused = server.client.post(INFER, json=zeros_request(1))
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            assert "overloaded" in refused.json()["error"] and not held.done()  # at once: the queue is still full
            assert held.result(10) == 504
        assert server.metric("exitwise_rejected_requests_total", reason="timeout") == 1
    finally:
        server.stop()


def test_a_request_may_set_a_sooner_deadline_as_tritonclient_sends_it(digits):
    """Triton's request parameter `timeout` (microseconds): past it, 504, while the server's --timeout-ms is longer."""
    _, _, out = digits
    config = ServeConfig(scheduler=SchedulerConfig(max_batch=64, max_wait_ms=60_000, timeout_ms=60_000))
    server = Running(OnnxRunner.load(out / "onnx"), config)
    try:
        start = time.monotonic()
        late = server.client.post(INFER, json={**zeros_request(1), "parameters": {"timeout": 200_000}})
        assert late.status_code == 504 and late.json() == {"error": "not answered within 200 ms"}
        assert 0.19 <= time.monotonic() - start < 10
        for bad in (-1, 1.5, "200", True):
            refused = server.client.post(INFER, json={**zeros_request(1), "parameters": {"timeout": bad}})
            assert refused.status_code == 400 and "parameters.timeout" in refused.json()["error"], refused.text
        assert "'parameters' must be an object" in server.client.post(
            INFER, json={**zeros_request(1), "parameters": [1]}).json()["error"]
        httpclient = pytest.importorskip("tritonclient.http")
        from tritonclient.utils import InferenceServerException
        triton = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
        pixels = httpclient.InferInput("image", [1, 1, 8, 8], "UINT8")
        pixels.set_data_from_numpy(np.zeros((1, 1, 8, 8), dtype=np.uint8))
        with pytest.raises(InferenceServerException, match="not answered within 100 ms"):
            triton.infer("digits-convnet", [pixels], timeout=100_000)
        triton.close()
    finally:
        server.stop()


@pytest.mark.parametrize("why, outcomes, status", [
    ("gone", [None], 499), ("late", [None], 504), ("answered", [Answer(0, 1, 0.9), Expired()], 504),
    ("answered", [RuntimeError("stage 1 failed")], 500)])
def test_a_wait_that_did_not_end_in_answers_is_refused_with_its_status(why, outcomes, status):
    with pytest.raises(BadRequest) as refused:  # the same for the HTTP server's requests and a tier's features
        answered(why, outcomes, 250)
    assert refused.value.status == status
    assert answered("answered", [Answer(0, 1, 0.9)], 250) == [Answer(0, 1, 0.9)]


def test_past_max_queue_requests_in_flight_another_is_refused_before_its_body_is_read(digits):
    _, _, out = digits
    config = ServeConfig(scheduler=SchedulerConfig(max_batch=64, max_wait_ms=60_000, max_queue=2, timeout_ms=3000))
    server = Running(OnnxRunner.load(out / "onnx"), config)
    host, port = server.url.removeprefix("http://").split(":")
    try:
        with ThreadPoolExecutor(2) as pool:
            held = [pool.submit(infer_status, server.client, 1) for _ in range(2)]  # wait for a batch of 64
            until(lambda: server.metric("exitwise_samples_inside") >= 2)
            with socket.create_connection((host, int(port)), timeout=5) as raw:  # headers only: the body never comes
                raw.sendall(f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                            f"Content-Length: 100000\r\n\r\n".encode())
                answer = read_http_answer(raw).decode()  # one recv could end with the head alone
            assert answer.startswith("HTTP/1.1 503") and "retry-after: 1" in answer.lower()
            assert '{"error":"overloaded, try again: 2 requests in flight; at most 2"}' in answer
            assert [h.result(10) for h in held] == [504, 504]
        # each request's own timer answers 504 at its deadline; the scheduler drops its samples then too (a
        # moment later, on its thread), and that frees their places in the queue
        until(lambda: server.metric("exitwise_samples_inside") == 0)
        after = server.client.post(INFER, json=zeros_request(1))  # accepted, and it too waits for a batch that
        assert after.status_code == 504, after.text               # never fills
        assert server.metric("exitwise_rejected_requests_total", reason="overloaded") == 1
    finally:
        server.stop()


def zeros_request(n: int) -> dict:
    return {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [n, 1, 8, 8], "data": [0] * (64 * n)}]}


def infer_status(client, n: int) -> int:
    return client.post(INFER, json=zeros_request(n)).status_code


class SlowRunner:
    """The ONNX runner with every stage taking 20 ms more: a server of known, small capacity."""

    def __init__(self, runner):
        self.runner = runner

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def step(self, k, features, state):
        time.sleep(0.02)
        return self.runner.step(k, features, state)


def test_under_three_times_the_sustainable_load_every_request_gets_an_answer(digits):
    _, _, out = digits
    config = ServeConfig(scheduler=SchedulerConfig(max_batch=2, max_queue=8, timeout_ms=500))
    server = Running(SlowRunner(OnnxRunner.load(out / "onnx")), config)
    # at most 2 images per 20 ms stage call and up to 3 calls per image: about 33-100 images/s; offered: 150/s
    rate, count = 150.0, 150
    rng = np.random.default_rng(0)
    arrivals = np.cumsum(rng.exponential(1 / rate, count))
    start = time.monotonic()

    def one(t: float) -> int:
        time.sleep(max(0.0, start + t - time.monotonic()))
        return infer_status(server.client, 1)

    try:
        with ThreadPoolExecutor(48) as pool:
            statuses = list(pool.map(one, arrivals, timeout=60))
    finally:
        server.stop()
    counts = {s: statuses.count(s) for s in set(statuses)}
    assert set(counts) <= {200, 503, 504} and sum(counts.values()) == count, counts
    assert counts.get(200, 0) > 0 and counts.get(503, 0) + counts.get(504, 0) > 0, counts


class FirstStageSlow(SlowRunner):
    """Stage 0 waits for `release` (at most 10 s), so a test can act while a batch is inside it."""

    def __init__(self, runner):
        super().__init__(runner)
        self.in_stage_0, self.release = threading.Event(), threading.Event()

    def step(self, k, features, state):
        if k == 0:
            self.in_stage_0.set()
            self.release.wait(10)
        return self.runner.step(k, features, state)


@pytest.mark.parametrize("as_exitwise_serve", [True, False], ids=["told-by-the-connection", "watching-receive"])
def test_a_client_that_leaves_mid_request_has_its_samples_dropped_from_later_stages(digits, as_exitwise_serve):
    _, data, out = digits
    expected = OnnxEarlyExit.load(out / "onnx").run(data.images.numpy())
    deep = data.images.numpy()[expected.exits == 2][:3]  # these would run every stage
    slow = FirstStageSlow(OnnxRunner.load(out / "onnx"))
    server = Running(slow, as_exitwise_serve=as_exitwise_serve)
    try:
        body = json.dumps({"inputs": [{"name": "image", "datatype": "UINT8", "shape": list(deep.shape),
                                       "parameters": {"layout": "NHWC"}, "data": deep.ravel().tolist()}]}).encode()
        with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])), timeout=5) as s:
            s.sendall(b"POST " + INFER.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            assert slow.in_stage_0.wait(10)  # stage 0 is running their batch; then the client goes away
        until(lambda: server.metric("exitwise_rejected_requests_total", reason="disconnected") == 1)  # seen while
        slow.release.set()                                                                       # stage 0 runs
        until(lambda: server.metric("exitwise_samples_inside") == 0)
        assert server.metric("exitwise_batch_size_count", stage="0") == 1  # stage 0 ran them
        assert server.metric("exitwise_dropped_samples_total", reason="disconnected") == 3
        assert server.metric("exitwise_batch_size_count", stage="1") == 0  # and nothing after it did
    finally:
        slow.release.set()
        server.stop()


def test_a_batch_of_answers_wakes_the_event_loop_once_and_each_request_when_its_last_image_is_answered():
    loop = asyncio.new_event_loop()
    try:
        wakes = []
        handoff = Handoff(loop)
        deliver = handoff.deliver
        handoff.deliver = lambda: (wakes.append(len(handoff.settled)), deliver())
        requests = [Waiting(n, loop.create_future()) for n in (3, 2)]
        slots = [Slot(w, handoff) for w in requests for _ in range(w.left)]
        worker = threading.Thread(target=lambda: [s.set_result(i) for i, s in enumerate(slots[:4])])
        worker.start()
        worker.join()  # four answers from the scheduler's thread while the loop sleeps
        loop.run_until_complete(asyncio.sleep(0))
        assert wakes == [4]  # one wake-up delivered all four
        assert requests[0].ended.result() == "answered" and not requests[1].ended.done()
        slots[4].set_exception(ValueError("broken"))
        loop.run_until_complete(asyncio.sleep(0))
        assert wakes == [4, 1] and requests[1].ended.result() == "answered"
        assert [s.outcome for s in slots[:4]] == [0, 1, 2, 3] and isinstance(slots[4].outcome, ValueError)
        slots[0].set_result(99)  # settled once: a second answer changes nothing
        assert slots[0].outcome == 0 and not handoff.settled
    finally:
        loop.close()


def test_under_exitwise_serve_bytes_that_are_no_http_request_get_a_one_line_json_400(digits):
    """uvicorn answers what its parser refuses itself (a negative Content-Length, a malformed request line, a TLS
    hello on the plain port): under `exitwise serve` in the app's form, not uvicorn's text/plain."""
    server = Running(OnnxRunner.load(digits[2] / "onnx"), as_exitwise_serve=True)
    try:
        for request in (b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n", b"HELLO\r\n\r\n",
                        bytes.fromhex("160301002e010000")):
            with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])), timeout=10) as sock:
                sock.sendall(request)
                answer = b""
                while chunk := sock.recv(65536):  # the server closes the connection after its answer
                    answer += chunk
            head, body = answer.split(b"\r\n\r\n", 1)
            assert head.startswith(b"HTTP/1.1 400 ") and b"content-type: application/json" in head, answer
            assert json.loads(body) == {"error": "Invalid HTTP request received."} and b"\n" not in body
        assert server.client.post(INFER, json=zeros_request(1)).status_code == 200
    finally:
        server.stop()


@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_under_exitwise_serve_a_request_head_over_64_kib_is_refused_and_large_bodies_still_pass(digits, parser,
                                                                                             monkeypatch):
    """httptools would hold a head of any length in memory: the head is cut at HEAD_BYTES (431),
    as h11 cuts it itself (400); a body is not a head, however it arrives."""
    from uvicorn.protocols.http import auto
    from exitwise.deploy.server import HEAD_BYTES
    if parser == "h11":  # what uvicorn runs where httptools is not installed
        from uvicorn.protocols.http.h11_impl import H11Protocol
        monkeypatch.setattr(auto, "AutoHTTPProtocol", H11Protocol)
    else:
        pytest.importorskip("httptools")
    server = Running(OnnxRunner.load(digits[2] / "onnx"), as_exitwise_serve=True)
    try:
        port = int(server.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n")
            sent = 0
            try:
                while sent < 4 * HEAD_BYTES:  # bounded: the server closes once past the limit
                    sock.sendall(b"X-Filler: " + b"a" * 1000 + b"\r\n")
                    sent += 1012
            except OSError:
                pass  # closed by the server while sending
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        head, body = answer.split(b"\r\n\r\n", 1)
        status = b"431 " if parser == "httptools" else b"400 "
        assert head.startswith(b"HTTP/1.1 " + status) and b"\n" not in body and json.loads(body)["error"], answer
        big = json.dumps(zeros_request(8)).encode() + b" " * (5 * HEAD_BYTES)  # a body, not a head, however long
        response = server.client.post(INFER, content=big, headers={"content-type": "application/json"})
        assert response.status_code == 200, response.text
        assert server.client.get("/v2/health/ready").status_code == 200
    finally:
        server.stop()


def test_a_body_trickled_past_the_timeout_is_a_408_and_frees_its_place(digits):
    server = Running(OnnxRunner.load(digits[2] / "onnx"), ServeConfig(scheduler=SchedulerConfig(timeout_ms=300)),
                     as_exitwise_serve=True)
    try:
        body = json.dumps(zeros_request(1)).encode()
        for sent in (body[:10], b""):  # part of the body, or none of it; the rest never comes
            with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])), timeout=10) as sock:
                sock.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n" % (INFER.encode(), len(body)) + sent)
                start = time.monotonic()
                answer = read_http_answer(sock)
            assert answer.startswith(b"HTTP/1.1 408 ") and time.monotonic() - start < 5, answer
            assert b"did not arrive within 300 ms" in answer
        assert server.metric("exitwise_rejected_requests_total", reason="slow_body") == 2
        assert server.app.front.inflight == 0  # its place among the requests in flight is free again
        assert server.client.post(INFER, json=zeros_request(1)).status_code == 200
    finally:
        server.stop()


def test_under_exitwise_serve_the_connection_tells_a_request_that_its_client_left():
    class Transport:
        closing = False

        def is_closing(self):
            return self.closing

    class Cycle:  # uvicorn's request cycle: `receive` is its method, `transport` the connection's
        def __init__(self, transport):
            self.transport = _OneWrite(transport)

        async def receive(self):
            raise AssertionError("no task waits on receive")

    async def check():
        told = []
        cycle = Cycle(Transport())
        stop = _Call({"headers": []}, cycle.receive).on_disconnect(told.append)
        assert told == []
        cycle.transport.lost()  # the client went away
        assert told == ["gone"]
        stop()
        cycle.transport.lost()
        assert told == ["gone"]  # stopped watching: told once
        closed = Transport()
        closed.closing = True  # gone while its body was read
        _Call({"headers": []}, Cycle(closed).receive).on_disconnect(told.append)
        assert told == ["gone", "gone"]

    asyncio.run(check())


def test_the_app_answers_under_one_event_loop_after_another(digits):
    _, data, out = digits
    app = create_app(OnnxRunner.load(out / "onnx"), ServeConfig(scheduler=SchedulerConfig(timeout_ms=3000)))

    async def predict(blob: bytes) -> list[dict]:
        sent, given = [], [False]

        async def receive():
            if not given[0]:
                given[0] = True
                return {"type": "http.request", "body": blob, "more_body": False}
            await asyncio.sleep(3600)  # the client stays

        async def send(message):
            sent.append(message)

        await app({"type": "http", "method": "POST", "path": "/v1/predict", "query_string": b"",
                   "headers": [(b"content-type", b"image/png")]}, receive, send)
        return sent

    try:
        for image in data.images[:2].numpy():  # asyncio.run: a new event loop each time
            assert asyncio.run(predict(png(image)))[0]["status"] == 200
    finally:
        app.state.scheduler.close(5)


CLI = "from exitwise.cli import main\nsys.exit(main(sys.argv[1:]))"


def next_line(process: subprocess.Popen, seconds: float = 120) -> str:
    """The next line the process prints on stdout, waited for at most `seconds` ("" if it printed none)."""
    import select
    ready, _, _ = select.select([process.stdout], [], [], seconds)
    return process.stdout.readline() if ready else ""


def start_cli_server(args: list[str], block_torch: bool = False, code: str = CLI,
                     env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """`exitwise serve ARGS --port 0` in its own process; returns it and its URL (from the line it prints)."""
    code = "import sys\n" + ("sys.modules['torch'] = None\n" if block_torch else "") + code
    process = subprocess.Popen([sys.executable, "-c", code, "serve", *args, "--port", "0"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(SRC), **(env or {})})
    line = next_line(process)
    if "serving" not in line:
        process.kill()
        raise AssertionError(f"server did not start: {line} {process.stderr.read()}")
    return process, line.split(" on ")[1].strip()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])  # SIGINT: Ctrl-C (had exited 130 once drained)
def test_sigterm_answers_what_was_accepted_refuses_new_requests_and_exits_0(digits, sig):
    _, _, out = digits
    process, url = start_cli_server(["--export", str(out / "onnx"), "--max-wait-ms", "1500"])
    try:
        client = httpx.Client(base_url=url, timeout=20)
        with ThreadPoolExecutor(3) as pool:
            accepted = [pool.submit(infer_status, client, 1) for _ in range(3)]
            until(lambda: "exitwise_samples_inside 3.0" in client.get("/metrics").text)
            process.send_signal(sig)
            refused = False
            for _ in range(100):  # bounded: the listening socket closes at once
                try:
                    httpx.get(url + "/v2/health/live", timeout=1)
                except httpx.TransportError:
                    refused = True
                    break
                time.sleep(0.02)
            assert refused
            assert [f.result(20) for f in accepted] == [200, 200, 200]
        assert process.wait(30) == 0
    finally:
        process.kill()


def test_access_log_writes_one_line_per_request_only_when_asked(digits):
    _, data, out = digits
    logged = {}
    for flags in ([], ["--access-log"]):
        process, url = start_cli_server(["--export", str(out / "onnx"), *flags])
        try:
            assert httpx.post(url + "/v1/predict", content=png(data.images[0].numpy()), timeout=20).status_code == 200
            assert httpx.post(url + "/v1/predict", content=b"", timeout=20).status_code == 400
            process.send_signal(signal.SIGTERM)
            assert process.wait(30) == 0
            logged[bool(flags)] = process.stdout.read()  # after the serving line
        finally:
            process.kill()
    assert "/v1/predict" not in logged[False]
    lines = [line for line in logged[True].splitlines() if "/v1/predict" in line]
    assert len(lines) == 2 and '"POST /v1/predict HTTP/1.1" 200' in lines[0] and " 400" in lines[1], logged[True]


def test_processes_share_one_port_count_in_one_metrics_and_drain_on_sigterm(digits, tmp_path):
    model, data, out = digits
    onnx = OnnxEarlyExit.load(out / "onnx")
    expected = onnx.run(data.images[:40].numpy()).predictions
    process, url = start_cli_server(["--export", str(out / "onnx"), "--processes", "2"],
                                    env={"TMPDIR": str(tmp_path)})  # where the metrics' folder goes
    try:
        got = [httpx.post(url + "/v1/predict", content=png(image), timeout=20).json()["predictions"][0]["class_index"]
               for image in data.images[:40].numpy()]  # a connection each: the kernel spreads them
        assert got == list(expected)
        folder, = tmp_path.glob("exitwise-metrics-*")
        assert len(list(folder.glob("counter_*.db"))) == 2  # exits were counted in both processes
        for _ in range(4):  # whichever process answers the scrape counts every request
            scrape = httpx.get(url + "/metrics", timeout=20).text
            assert 'exitwise_request_seconds_count{code="200",endpoint="predict"} 40.0' in scrape
            assert sum(float(line.rsplit(" ", 1)[1]) for line in scrape.splitlines()
                       if line.startswith("exitwise_exits_total{")) == 40
            info = [line for line in scrape.splitlines() if line.startswith("exitwise_model_info{")]
            assert len(info) == 1 and info[0].endswith(" 1.0") and 'workers="1"' in info[0]  # one line, not one each
            assert "process_cpu_seconds_total" not in scrape  # it would be the answering process's alone
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
        assert not folder.exists()
    finally:
        process.kill()


def test_processes_after_the_first_build_their_runners_with_the_precision_and_micro_batch_it_chose():
    from exitwise.deploy.processes import Started, as_first

    def make_runner(precision="auto", micro_batch=None):
        return precision, micro_batch

    assert as_first(make_runner, Started("m (pytorch, bf16, micro-batch 128)", precision="bf16", micro_batch=128))() \
        == ("bf16", 128)
    assert as_first(make_runner, Started("m (onnxruntime, micro-batch 64)", micro_batch=64)) is make_runner


def test_a_torch_tier_runs_in_processes_and_answers_degraded_while_its_next_tier_is_down(digits):
    model, data, out = digits
    process, url = start_cli_server(["--from", str(out / "model"), "--stages", "0-1", "--next", "http://127.0.0.1:9",
                                     "--processes", "2"])
    images = data.images.numpy()
    deep = images[OnnxEarlyExit.load(out / "onnx").run(images).exits == 2][:4]  # these would reach the next tier
    try:
        answers = [httpx.post(url + "/v1/predict", content=png(image), timeout=20).json()["predictions"][0]
                   for image in deep]
        assert len(answers) == 4 and all(a["exit"] == 1 and a["degraded"] for a in answers)  # its own last exit
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        process.kill()


def test_server_processes_stop_when_their_supervisor_is_killed_and_leave_no_metrics_folder(digits, tmp_path):
    process, _ = start_cli_server(["--export", str(digits[2] / "onnx"), "--processes", "2"],
                                  env={"TMPDIR": str(tmp_path)})  # where the metrics' folder goes
    children = [int(c) for c in Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()]
    try:
        assert len(children) >= 2  # the two servers (and multiprocessing's resource tracker)
        assert len(list(tmp_path.glob("exitwise-metrics-*"))) == 1
        process.kill()  # SIGKILL: nothing is passed on
        process.wait(10)

        def running(pid: int) -> bool:
            try:
                return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
            except FileNotFoundError:
                return False

        until(lambda: not any(running(c) for c in children), 15, every=0.1)
        assert list(tmp_path.glob("exitwise-metrics-*")) == []  # the last process out removed it
    finally:
        for c in children:
            try:
                os.kill(c, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_server_process_that_dies_while_serving_stops_the_others_in_one_line_with_its_exit_code(digits):
    process, _ = start_cli_server(["--export", str(digits[2] / "onnx"), "--processes", "2"])
    try:
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
        server = next(c for c in children  # a spawned server process, not multiprocessing's resource tracker
                      if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes())
        os.kill(int(server), signal.SIGKILL)
        assert process.wait(30) == 2
        err = process.stderr.read()
        assert err.count("\n") == 1 and f"(pid {server}) exited with code -9" in err, err  # not "code None"
    finally:
        process.kill()


def test_a_server_process_that_cannot_start_stops_the_others_in_one_line(tmp_path, capsys):
    from exitwise.cli import main
    (tmp_path / "empty").mkdir()
    assert main(["serve", "--export", str(tmp_path / "empty"), "--processes", "2", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "manifest" in err, err


def test_the_onnx_server_runs_without_torch(digits):
    _, data, out = digits
    process, url = start_cli_server(["--export", str(out / "onnx")], block_torch=True)
    try:
        answer = httpx.post(url + "/v1/predict", content=png(data.images[0].numpy()), timeout=20)
        assert answer.status_code == 200 and answer.json()["predictions"][0]["exit"] in (0, 1, 2)
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        process.kill()


def test_what_was_loaded_before_serving_is_out_of_the_collectors_reach():
    import gc

    from exitwise.deploy.server import settle_heap
    loaded = [{"a": [1]} for _ in range(100)]
    settle_heap()
    try:
        assert gc.get_freeze_count() >= len(loaded)
        assert not any(o is loaded for o in gc.get_objects())  # full collections no longer walk it
        later = [[]]
        assert any(o is later for o in gc.get_objects())  # what requests make later still is collected
    finally:
        gc.unfreeze()


def test_serve_refuses_bad_flags_in_one_line(digits, capsys):
    from exitwise.cli import main
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = str(taken.getsockname()[1])
    for argv, message in [(["serve"], "give one of --model NAME, --from DIR or --export DIR"),
                          (["serve", "--export", str(digits[2] / "onnx"), "--port", "99999"], "--port must be 0-65535"),
                          (["serve", "--export", str(digits[2] / "onnx"), "--port", port],
                           f"cannot listen on 127.0.0.1:{port}"),
                          (["serve", "--export", str(digits[2] / "onnx"), "--max-body-mb", "0"],
                           "--max-body-mb must be above 0"),
                          (["serve", "--export", str(digits[2] / "onnx"), "--max-body-mb", "inf"],
                           "--max-body-mb must be above 0 and finite, got inf"),  # before: a traceback
                          (["serve", "--export", str(digits[2] / "onnx"), "--timeout-ms", "inf"],
                           "--timeout-ms must be above 0 and finite, got inf"),  # before: served, failed at SIGTERM
                          (["serve", "--relay", "--next", "http://127.0.0.1:9", "--forward-timeout-ms", "inf"],
                           "--forward-timeout-ms must be above 0 and finite, got inf"),  # before: a 500 per request
                          (["serve", "--export", str(digits[2] / "onnx"), "--precision", "bf16", "--micro-batch", "8"],
                           "--precision, --micro-batch: for torch models"),  # before: served, both silently unused
                          (["serve", "--export", str(digits[2] / "onnx"), "--schedule", "random"], "unknown schedule"),
                          (["serve", "--export", str(digits[2] / "onnx"), "--workers", "0"], "workers must be at least 1"),
                          (["serve", "--export", str(digits[2] / "onnx"), "--processes", "0"],
                           "--processes must be at least 1"),
                          (["serve", "--export", str(digits[2] / "onnx"), "--ray", "--processes", "2"],
                           "drop --processes"),
                          (["serve", "--export", str(digits[2] / "onnx"), "--ray", "--access-log"],
                           "Ray Serve logs every request itself"),
                          (["serve", "--relay", "--next", "http://127.0.0.1:9", "--processes", "2"],
                           "drop --processes"),
                          (["serve", "--export", str(digits[2] / "onnx"), "--replicas", "2"],
                           "--replicas goes with --ray"),
                          (["serve", "--export", str(digits[2] / "onnx"), "--ray", "--replicas", "0"],
                           "expected 1 <= MIN <= MAX, got '0'"),
                          (["serve", "--export", str(digits[2] / "onnx"), "--ray", "--replicas", "3-1"],
                           "expected 1 <= MIN <= MAX, got '3-1'"),
                          (["serve", "--export", str(digits[2] / "onnx"), "--ray", "--replicas", "two"],
                           "expected N or MIN-MAX, got 'two'"),
                          (["serve", "--export", str(digits[2] / "onnx"), "--ray", "--replicas", "3-"],
                           "expected N or MIN-MAX, got '3-'"),
                          (["serve", "--export", str(digits[2] / "onnx"), "--ray", "--replicas", "2",
                            "--target-ongoing", "8"], "give --replicas MIN-MAX"),
                          (["serve", "--export", str(digits[2] / "onnx"), "--ray", "--replicas", "1-4",
                            "--target-ongoing", "0"], "--target-ongoing must be at least 1, got 0"),
                          (["serve", "--model", "digits-convnet", "--weights", "x.safetensors"], "weights file not found"),
                          (["serve", "--model", "digits-convnet"], "no calibrated setting")]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    taken.close()


def cifar_test_jpegs(n: int, every: int = 10) -> tuple[list[bytes], list[int], tuple[str, ...]]:
    """Every `every`-th CIFAR-10 test image of the shared archive as its JPEG bytes (the first n), with labels."""
    from conftest import CIFAR_JPG
    from exitwise.images import read_tar
    if not CIFAR_JPG.is_file():
        pytest.skip("../shared/data/cifar10-jpg.tar.gz not present")
    files = read_tar(CIFAR_JPG)
    names = sorted(name for name in files.names if name.startswith("test/"))
    classes = tuple(sorted({name.split("/")[1] for name in names}))
    chosen = names[::every][:n]
    return [files.read(name) for name in chosen], [classes.index(name.split("/")[1]) for name in chosen], classes


@pytest.mark.cifar
def test_shipped_b_resnet11_serves_its_cards_calibrated_setting_as_early_exit_model_run():
    from exitwise.data import ImageSet
    from exitwise.deploy.oip import decode_images
    from exitwise.models import shipped_card
    from exitwise.serve_torch import load_early_exit
    blobs, labels, classes = cifar_test_jpegs(200)
    model = load_early_exit(model="b-resnet11")
    setting = shipped_card("b-resnet11").calibrated
    assert model.policy.name == setting.policy and tuple(model.thresholds) == setting.thresholds
    data = ImageSet(torch.from_numpy(decode_images(blobs, (3, 32, 32))), torch.tensor(labels), classes)
    expected = model.run(data, precision="fp32")
    server = Running(TorchRunner(model, precision="fp32", micro_batch=64))
    try:
        def send(i):
            files = [("files", (f"{j}.jpg", b, "image/jpeg")) for j, b in enumerate(blobs[i:i + 20])]
            return server.client.post("/v1/predict", files=files).json()["predictions"]
        with ThreadPoolExecutor(4) as pool:
            rows = [r for part in pool.map(send, range(0, 200, 20)) for r in part]
    finally:
        server.stop()
    exits, predictions = np.array([r["exit"] for r in rows]), np.array([r["class_index"] for r in rows])
    assert_same_as_run(model, data, expected, exits, predictions)
    assert rows[0]["class"] in classes and (predictions == np.array(labels)).mean() > 0.8
    assert len(set(exits)) >= 3  # the calibrated setting lets samples out early


def test_tritonclient_speaks_to_the_server(digits, onnx_server):
    """docs/serve.md's tritonclient example, binary tensors both ways (skipped without tritonclient[http])."""
    httpclient = pytest.importorskip("tritonclient.http")
    _, data, out = digits
    images = data.images.numpy()[:5]
    expected = OnnxEarlyExit.load(out / "onnx").run(images)
    client = httpclient.InferenceServerClient(onnx_server.url.removeprefix("http://"))
    try:
        assert client.is_server_ready() and client.get_model_metadata("digits-convnet")["name"] == "digits-convnet"
        encoded = httpclient.InferInput("image", [5], "BYTES")
        encoded.set_data_from_numpy(np.array([png(im) for im in images], dtype=np.object_))
        pixels = httpclient.InferInput("image", [5, 1, 8, 8], "UINT8")
        pixels.set_data_from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
        for tensor in (encoded, pixels):
            result = client.infer("digits-convnet", [tensor])
            assert result.as_numpy("exit").tolist() == expected.exits.tolist()
            assert result.as_numpy("class_index").tolist() == expected.predictions.tolist()
            assert [label.decode() if isinstance(label, bytes) else label for label in result.as_numpy("label")] == [
                "abcdefghij"[c] for c in expected.predictions]
    finally:
        client.close()


def test_the_models_one_version_is_served_under_its_version_path_too(onnx_server):
    """The protocol's optional `/versions/{version}` paths, which tritonclient takes when given a model_version."""
    client, model = onnx_server.client, "/v2/models/digits-convnet"
    assert client.get(model).json()["versions"] == ["1"]
    assert client.get(f"{model}/versions/1").json() == client.get(model).json()
    assert client.get(f"{model}/versions/1/ready").json() == {"name": "digits-convnet", "ready": True}
    plain, versioned = (client.post(path, json=zeros_request(2)).json() for path in (INFER, f"{model}/versions/1/infer"))
    assert versioned == plain and plain["model_version"] == "1"
    for path in (f"{model}/versions/2", f"{model}/versions/2/ready"):
        assert client.get(path).status_code == 404 and "version 1 only, not '2'" in client.get(path).json()["error"]
    wrong = client.post(f"{model}/versions/2/infer", json=zeros_request(1))
    assert wrong.status_code == 404 and wrong.json() == {"error": "model 'digits-convnet' has version 1 only, not '2'"}
    assert client.post(f"{model}/versions//infer", json=zeros_request(1)).status_code == 404
    httpclient = pytest.importorskip("tritonclient.http")
    triton = httpclient.InferenceServerClient(onnx_server.url.removeprefix("http://"))
    try:
        pixels = httpclient.InferInput("image", [2, 1, 8, 8], "UINT8")
        pixels.set_data_from_numpy(np.zeros((2, 1, 8, 8), dtype=np.uint8))
        assert triton.is_model_ready("digits-convnet", "1")
        assert triton.get_model_metadata("digits-convnet", "1")["name"] == "digits-convnet"
        result = triton.infer("digits-convnet", [pixels], model_version="1")
        assert result.as_numpy("exit").tolist() == [o["data"] for o in plain["outputs"] if o["name"] == "exit"][0]
    finally:
        triton.close()


def test_null_fields_are_absent_fields(onnx_server):
    """A client that serializes unset fields sends them as null: parameters (of the request or its input), id, outputs."""
    request = zeros_request(1)
    request["parameters"], request["inputs"][0]["parameters"], request["id"], request["outputs"] = None, None, None, None
    assert onnx_server.client.post(INFER, json=request).status_code == 200


def test_an_infer_request_may_name_the_outputs_it_wants(onnx_server):
    request = {**zeros_request(2), "id": "x7", "outputs": [{"name": "exit"}, {"name": "label"}]}
    answer = onnx_server.client.post(INFER, json=request).json()
    assert answer["id"] == "x7" and [o["name"] for o in answer["outputs"]] == ["label", "exit"]
    wrong = onnx_server.client.post(INFER, json={**zeros_request(1), "outputs": [{"name": "logits"}]})
    assert wrong.status_code == 400 and "unknown output 'logits'" in wrong.json()["error"]

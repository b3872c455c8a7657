"""`exitwise serve --grpc-port`: the Open Inference Protocol over gRPC (KServe V2's GRPCInferenceService), spoken by
tritonclient.grpc, beside HTTP on 127.0.0.1, tiny digits models, every loop bounded in count and time.

Its messages are KServe's, field for field; its answers are the HTTP routes' (and so the offline runtime's); a bad
request gets the gRPC status of its HTTP refusal with a one-line message and the server keeps serving; overload
and lateness are UNAVAILABLE and DEADLINE_EXCEEDED; SIGTERM drains; the ONNX server still never imports torch.
"""
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

grpc = pytest.importorskip("grpc")
grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

from exitwise.config import SchedulerConfig, ServeConfig  # noqa: E402
from exitwise.deploy import oip_grpc  # noqa: E402
from exitwise.deploy.onnx_runner import OnnxRunner  # noqa: E402
from exitwise.deploy.onnx_runtime import OnnxEarlyExit  # noqa: E402

from conftest import until  # noqa: E402
from test_serve import (SRC, FirstStageSlow, Running, digits, next_line, png, start_cli_server,  # noqa: E402,F401
                        unreadable_dds)  # (digits: the fixture)

MODEL = "digits-convnet"


def grpc_client(server: Running):
    return grpcclient.InferenceServerClient(f"127.0.0.1:{server.app.state.grpc_port}")


@pytest.fixture(scope="module")
def grpc_server(digits):
    server = Running(OnnxRunner.load(digits[2] / "onnx"),
                     ServeConfig(grpc_port=0, max_body_mb=0.01, scheduler=SchedulerConfig(max_batch=16)))
    yield server
    server.stop()


def pixels_input(images: np.ndarray, layout: str = "NCHW"):
    pixels = np.ascontiguousarray(images.transpose(0, 3, 1, 2) if layout == "NCHW" else images)
    tensor = grpcclient.InferInput("image", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels)
    if layout == "NHWC":  # tritonclient.grpc has no setter for an input's parameters: its message's
        tensor._get_tensor().parameters["layout"].string_param = "NHWC"
    return tensor


def encoded_input(blobs: list[bytes]):
    tensor = grpcclient.InferInput("image", [len(blobs)], "BYTES")
    tensor.set_data_from_numpy(np.array(blobs, dtype=np.object_))
    return tensor


def refusal(call) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as refused:
        call()
    return refused.value


def test_the_messages_are_kserve_v2s_field_for_field_as_tritonclient_has_them():
    from google.protobuf import descriptor_pb2
    from tritonclient.grpc import service_pb2

    def fields(descriptor) -> list:
        proto = descriptor_pb2.DescriptorProto()
        descriptor.CopyToProto(proto)
        inside = {n.name: [(f.name, f.number, f.label, f.type) for f in n.field] for n in proto.nested_type}
        return [(f.name, f.number, f.label, f.type, inside.get(f.type_name.rsplit(".", 1)[-1])) for f in proto.field]

    for name in oip_grpc.SCHEMA:
        theirs = service_pb2.DESCRIPTOR.pool.FindMessageTypeByName(f"inference.{name}")
        assert fields(oip_grpc.message(name).DESCRIPTOR) == fields(theirs), name


def test_tritonclient_grpc_gets_what_http_answers_whatever_the_input_form(digits, grpc_server):
    _, data, out = digits
    images = data.images.numpy()[:6]
    expected = OnnxEarlyExit.load(out / "onnx").run(images)
    client = grpc_client(grpc_server)
    try:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
        meta = client.get_model_metadata(MODEL, as_json=True)
        assert meta["platform"] == "onnxruntime" and meta["inputs"][0]["shape"] == ["-1", "1", "8", "8"]
        assert [o["name"] for o in meta["outputs"]] == ["class_index", "label", "probability", "exit"]
        assert client.get_server_metadata(as_json=True)["name"] == "exitwise"
        http = grpc_server.client.post("/v1/predict", files=[("f", png(im)) for im in images]).json()["predictions"]
        for tensor in (pixels_input(images), pixels_input(images, "NHWC"), encoded_input([png(im) for im in images])):
            result = client.infer(MODEL, [tensor], request_id="r9")
            assert result.get_response().id == "r9"
            assert result.as_numpy("exit").tolist() == expected.exits.tolist() == [p["exit"] for p in http]
            assert result.as_numpy("class_index").tolist() == expected.predictions.tolist()
            assert [b.decode() for b in result.as_numpy("label")] == [p["class"] for p in http]
            np.testing.assert_allclose(result.as_numpy("probability"), [p["probability"] for p in http], atol=1e-6)
        wanted = client.infer(MODEL, [pixels_input(images[:2])], outputs=[grpcclient.InferRequestedOutput("exit")])
        assert [o.name for o in wanted.get_response().outputs] == ["exit"]
        versioned = client.infer(MODEL, [pixels_input(images)], model_version="1")
        assert versioned.get_response().model_version == "1" and versioned.as_numpy("exit").tolist() == [
            p["exit"] for p in http]
    finally:
        client.close()


def test_a_bad_call_gets_the_status_of_its_http_refusal_in_one_line_and_the_server_keeps_serving(grpc_server):
    client = grpc_client(grpc_server)
    zeros = np.zeros((2, 8, 8, 1), dtype=np.uint8)
    try:
        before = grpc_server.metric("exitwise_rejected_requests_total", reason="bad_request")
        cases = [  # (the call, its status, words of its message)
            (lambda: client.infer("nope", [pixels_input(zeros)]), "StatusCode.NOT_FOUND", "unknown model 'nope'"),
            (lambda: client.infer(MODEL, [pixels_input(zeros).set_shape([1] * 6000)]), "StatusCode.INVALID_ARGUMENT",
             "1, 1 ... 1, 1, 1"),  # its message cut, else too long for a gRPC header
            (lambda: client.is_model_ready("nope"), "StatusCode.NOT_FOUND", "unknown model"),
            (lambda: client.infer(MODEL, [pixels_input(zeros)], model_version="2"), "StatusCode.NOT_FOUND",
             "version 1 only, not '2'"),
            (lambda: client.infer(MODEL, [pixels_input(np.zeros((2, 9, 8, 1), np.uint8), "NHWC")]),
             "StatusCode.INVALID_ARGUMENT", "the model takes UINT8"),
            (lambda: client.infer(MODEL, [encoded_input([b"not an image"])]), "StatusCode.INVALID_ARGUMENT",
             "cannot decode image"),
            (lambda: client.infer(MODEL, [encoded_input([unreadable_dds()])]), "StatusCode.INVALID_ARGUMENT",
             "cannot decode image #0: Unknown pixel format flags 0"),
            (lambda: client.infer(MODEL, [pixels_input(zeros), pixels_input(zeros)]), "StatusCode.INVALID_ARGUMENT",
             "exactly one input"),
            (lambda: client.infer(MODEL, [pixels_input(zeros)], outputs=[grpcclient.InferRequestedOutput("logits")]),
             "StatusCode.INVALID_ARGUMENT", "unknown output 'logits'"),
            (lambda: client.infer(MODEL, [pixels_input(np.zeros((200, 8, 8, 1), np.uint8))]),  # over --max-body-mb
             "StatusCode.RESOURCE_EXHAUSTED", ""),
        ]
        float_input = grpcclient.InferInput("image", [1, 1, 8, 8], "FP32")
        float_input.set_data_from_numpy(np.zeros((1, 1, 8, 8), np.float32))
        cases.append((lambda: client.infer(MODEL, [float_input]), "StatusCode.INVALID_ARGUMENT",
                      "datatype 'FP32' is not served"))
        for call, status, words in cases:
            refused = refusal(call)
            assert refused.status() == status and words in refused.message() and "\n" not in refused.message()
        assert grpc_server.metric("exitwise_rejected_requests_total", reason="bad_request") == before + 7
        assert client.infer(MODEL, [pixels_input(zeros)]).as_numpy("exit").shape == (2,)
    finally:
        client.close()


def test_a_malformed_message_is_invalid_argument_in_one_line_and_ends_no_stream(grpc_server):
    """Bytes that are not the method's protobuf message: refused as malformed JSON is over HTTP, where gRPC itself
    answered UNKNOWN ('Unexpected <class ...DecodeError'>') and ended a whole stream for one such message."""
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_server.app.state.grpc_port}")
    as_bytes = {"request_serializer": lambda data: data, "response_deserializer": lambda data: data}
    good = oip_grpc.message("ModelInferRequest")(model_name=MODEL, id="good", inputs=[
        {"name": "image", "datatype": "UINT8", "shape": [1, 1, 8, 8]}], raw_input_contents=[bytes(64)])
    try:
        for method in ("ModelInfer", "ModelReady", "ModelMetadata"):
            with pytest.raises(grpc.RpcError) as refused:
                channel.unary_unary(f"/{oip_grpc.SERVICE}/{method}", **as_bytes)(b"\xff\xff\xff", timeout=10)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()
            assert refused.value.details().startswith(f"malformed {method}Request: not a protobuf message")
        stream = channel.stream_stream(f"/{oip_grpc.SERVICE}/ModelStreamInfer", request_serializer=lambda data: data,
                                       response_deserializer=oip_grpc.message("ModelStreamInferResponse").FromString)
        answers = list(stream(iter([b"\xff\xff\xff", good.SerializeToString()]), timeout=10))
        assert sorted((a.infer_response.id, a.error_message[:28]) for a in answers) == [
            ("", "malformed ModelInferRequest:"), ("good", "")]
    finally:
        channel.close()


def streamed(client, calls: list[tuple[str, list, str]]) -> tuple[dict, list[str]]:
    """`calls` ((model, inputs, id) each) sent on one ModelStreamInfer stream, then the stream closed once all are
    answered: (each answer by its id, the error messages)."""
    answers, errors, lock = {}, [], threading.Lock()

    def received(result, error):
        with lock:
            if error is not None:
                errors.append(error.message())
            else:
                answers.setdefault(result.get_response().id, []).append(result)

    client.start_stream(callback=received)
    for model, inputs, request_id in calls:
        client.async_stream_infer(model, inputs, request_id=request_id)
    client.stop_stream()  # returns once every call is answered
    return answers, errors


def test_a_stream_of_calls_is_answered_call_by_call_and_a_refused_call_does_not_end_it(digits, grpc_server):
    _, data, out = digits
    images = data.images.numpy()[:6]
    expected = OnnxEarlyExit.load(out / "onnx").run(images)
    client = grpc_client(grpc_server)
    try:
        before = grpc_server.metric("exitwise_rejected_requests_total", reason="unknown_model")
        calls = [(MODEL, [pixels_input(images[i:i + 1])], f"r{i}") for i in range(6)]
        calls[3:3] = [("nope", [pixels_input(images[:1])], "bad-model"),
                      (MODEL, [encoded_input([b"not an image"])], "bad-image")]
        calls.append((MODEL, [pixels_input(images, "NHWC")], "all"))
        answers, errors = streamed(client, calls)
        assert sorted(answers) == ["all"] + [f"r{i}" for i in range(6)]  # each good call answered once
        assert all(len(a) == 1 for a in answers.values())
        for i in range(6):
            assert answers[f"r{i}"][0].as_numpy("exit").tolist() == [expected.exits[i]]
            assert answers[f"r{i}"][0].as_numpy("class_index").tolist() == [expected.predictions[i]]
        assert answers["all"][0].as_numpy("exit").tolist() == expected.exits.tolist()
        assert len(errors) == 2 and all("\n" not in e for e in errors)
        assert any("unknown model 'nope'" in e for e in errors) and any("cannot decode image" in e for e in errors)
        assert grpc_server.metric("exitwise_rejected_requests_total", reason="unknown_model") == before + 1
    finally:
        client.close()


def test_a_stream_the_client_cancels_has_its_samples_dropped_from_later_stages(digits):
    _, data, out = digits
    expected = OnnxEarlyExit.load(out / "onnx").run(data.images.numpy())
    deep = data.images.numpy()[expected.exits == 2][:3]  # these would run every stage
    slow = FirstStageSlow(OnnxRunner.load(out / "onnx"))
    server = Running(slow, ServeConfig(grpc_port=0))
    client = grpc_client(server)
    try:
        client.start_stream(callback=lambda result, error: None)
        client.async_stream_infer(MODEL, [pixels_input(deep)], request_id="deep")
        assert slow.in_stage_0.wait(10)  # stage 0 is running their batch; then the client goes away
        client.stop_stream(cancel_requests=True)
        until(lambda: server.metric("exitwise_rejected_requests_total", reason="disconnected") == 1)
        slow.release.set()  # the cancel was seen while stage 0 ran
        until(lambda: server.metric("exitwise_samples_inside") == 0)
        assert server.metric("exitwise_dropped_samples_total", reason="disconnected") == 3
        assert server.metric("exitwise_batch_size_count", stage="1") == 0  # nothing after stage 0 ran them
        assert server.metric("exitwise_request_seconds_count", code="499", endpoint="grpc") == 1
    finally:
        slow.release.set()
        client.close()
        server.stop()


def test_a_full_queue_is_unavailable_at_once_and_a_late_call_past_its_deadline(digits):
    _, _, out = digits
    config = ServeConfig(grpc_port=0, scheduler=SchedulerConfig(max_batch=64, max_wait_ms=60_000, max_queue=4,
                                                                timeout_ms=1500))
    server = Running(OnnxRunner.load(out / "onnx"), config)
    client = grpc_client(server)
    zeros = np.zeros((4, 8, 8, 1), dtype=np.uint8)
    try:
        too_many = refusal(lambda: client.infer(MODEL, [pixels_input(np.zeros((5, 8, 8, 1), np.uint8))]))
        assert too_many.status() == "StatusCode.RESOURCE_EXHAUSTED" and "at most 4 (--max-queue)" in too_many.message()
        with ThreadPoolExecutor(1) as pool:
            held = pool.submit(refusal, lambda: client.infer(MODEL, [pixels_input(zeros)]))  # no batch of 64 comes
            until(lambda: server.metric("exitwise_samples_inside") >= 4)
            full = refusal(lambda: client.infer(MODEL, [pixels_input(zeros[:1])]))
            assert full.status() == "StatusCode.UNAVAILABLE" and "overloaded" in full.message()
            assert not held.done()  # at once: the queue is still full
            assert held.result(10).status() == "StatusCode.DEADLINE_EXCEEDED"
        assert server.metric("exitwise_rejected_requests_total", reason="timeout") == 1
        # a call's own deadline (Triton's `timeout` parameter, microseconds), sooner than the server's 1500 ms
        hurried = refusal(lambda: client.infer(MODEL, [pixels_input(zeros[:1])], timeout=100_000))
        assert hurried.status() == "StatusCode.DEADLINE_EXCEEDED" and "within 100 ms" in hurried.message()
        assert server.metric("exitwise_request_seconds_count", code="503", endpoint="grpc") == 1
    finally:
        client.close()
        server.stop()


def test_exitwise_serve_grpc_port_without_torch_and_sigterm_drains_it(digits):
    _, data, out = digits
    process, url = start_cli_server(["--export", str(out / "onnx"), "--grpc-port", "0", "--max-wait-ms", "1500"],
                                    block_torch=True)
    try:
        line = next_line(process)  # printed as the app starts
        assert "gRPC" in line, line
        client = grpcclient.InferenceServerClient(line.split(" on ")[1].strip())
        images = data.images.numpy()[:3]
        with ThreadPoolExecutor(3) as pool:
            accepted = [pool.submit(client.infer, MODEL, [pixels_input(images[i:i + 1])]) for i in range(3)]
            until(lambda: "exitwise_samples_inside 3.0" in httpx.get(url + "/metrics").text)
            process.send_signal(signal.SIGTERM)
            assert [f.result(20).as_numpy("exit").shape for f in accepted] == [(1,)] * 3
        assert process.wait(30) == 0
        client.close()
    finally:
        process.kill()


def test_sigterm_closes_the_grpc_port_at_once_while_http_requests_still_drain(digits):
    """uvicorn answers the HTTP requests in flight before the app's shutdown; the gRPC port must not go on taking new
    calls (and reporting SERVING) meanwhile: it drains from SIGTERM on, as the HTTP port does."""
    _, data, out = digits
    process, url = start_cli_server(["--export", str(out / "onnx"), "--grpc-port", "0", "--max-wait-ms", "3000"])
    try:
        line = next_line(process)  # printed as the app starts
        client = grpcclient.InferenceServerClient(line.split(" on ")[1].strip())
        assert client.is_server_ready()
        with ThreadPoolExecutor(1) as pool:  # an HTTP request waiting (3 s) for its batch to fill
            waiting = pool.submit(httpx.post, url + "/v1/predict", content=png(data.images[0].numpy()), timeout=20)
            until(lambda: "exitwise_samples_inside 1.0" in httpx.get(url + "/metrics").text)
            process.send_signal(signal.SIGTERM)

            def draining() -> bool:  # the gRPC port stops answering as ready once SIGTERM has arrived
                try:
                    return not client.is_server_ready()
                except InferenceServerException:
                    return True

            until(draining, 5)  # (was a 0.5 s sleep)
            late = refusal(lambda: client.infer(MODEL, [pixels_input(data.images.numpy()[:1])], client_timeout=10))
            assert late.status() == "StatusCode.UNAVAILABLE", late
            assert not waiting.done()  # the HTTP request is still draining (its batch waits 3 s)
            assert waiting.result(20).status_code == 200
        assert process.wait(30) == 0
        client.close()
    finally:
        process.kill()


@pytest.mark.parametrize("flags, words", [
    (["--grpc-port", "70000"], "--grpc-port must be 0-65535"),
    (["--grpc-port", "0", "--processes", "2"], "--grpc-port 0 with --processes"),
    (["--grpc-port", "9", "--ray"], "--grpc-port with --ray"),
])
def test_grpc_flags_that_cannot_work_are_refused_in_one_line(digits, flags, words):
    _, _, out = digits
    done = subprocess.run([sys.executable, "-m", "exitwise", "serve", "--export", str(out / "onnx"), *flags],
                          capture_output=True, text=True, timeout=60, env={"PYTHONPATH": str(SRC), "PATH": ""})
    assert done.returncode == 2 and words in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_a_grpc_port_in_use_is_refused_before_serving(digits):
    import socket
    _, _, out = digits
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "exitwise", "serve", "--export", str(out / "onnx"), "--port", "0",
                               "--grpc-port", str(port)], capture_output=True, text=True, timeout=60,
                              env={"PYTHONPATH": str(SRC), "PATH": ""})
    assert done.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in done.stderr, done.stderr


def test_a_grpc_port_taken_after_it_was_checked_stops_the_server_in_one_line(digits):
    import socket
    from exitwise.deploy.server import create_app, listen, run_app
    from exitwise.errors import UserError
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = ServeConfig(port=0, grpc_port=taken.getsockname()[1])
        sock = listen(config)  # as `serve` does, past its check of the gRPC port: the port is taken in between
        try:
            with pytest.raises(UserError, match=f"cannot listen on 127.0.0.1:{config.grpc_port} for gRPC"):
                run_app(create_app(OnnxRunner.load(digits[2] / "onnx"), config), config, sock)  # was exit 3 and a
        finally:                                                                             # traceback
            sock.close()


def test_server_processes_all_listen_on_the_grpc_port_and_drain_on_sigterm(digits):
    import socket
    _, data, out = digits
    with socket.socket() as free:  # a port free just now, for every process to listen on
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    process, url = start_cli_server(["--export", str(out / "onnx"), "--processes", "2", "--grpc-port", str(port)])
    try:
        clients = [grpcclient.InferenceServerClient(f"127.0.0.1:{port}") for _ in range(6)]  # a connection each
        images = data.images.numpy()[:1]
        assert all(c.infer(MODEL, [pixels_input(images)]).as_numpy("exit").shape == (1,) for c in clients)
        count = 'exitwise_request_seconds_count{code="200",endpoint="grpc"} 6.0'
        until(lambda: count in httpx.get(url + "/metrics").text)  # both processes' counts, added up
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
        for c in clients:
            c.close()
    finally:
        process.kill()


def test_grpc_health_check_answers_as_grpc_health_v1_says_serving_then_not_serving_while_draining(digits):
    """Raw bytes of grpc/health/v1/health.proto, as Kubernetes' gRPC probes send them: a HealthCheckRequest is field
    1, the service name; the answer's field 1 is the ServingStatus (1 SERVING, 2 NOT_SERVING)."""
    import grpc
    server = Running(OnnxRunner.load(digits[2] / "onnx"), ServeConfig(grpc_port=0))
    channel = grpc.insecure_channel(f"127.0.0.1:{server.app.state.grpc_port}")
    check = channel.unary_unary("/grpc.health.v1.Health/Check")  # bytes in, bytes out
    try:
        service = b"inference.GRPCInferenceService"
        assert check(b"", timeout=10) == b"\x08\x01" == check(b"\x0a" + bytes([len(service)]) + service, timeout=10)
        with pytest.raises(grpc.RpcError) as unknown:
            check(b"\x0a\x04nope", timeout=10)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND and "unknown service 'nope'" in unknown.value.details()
        server.app.state.scheduler.close(10)  # what SIGTERM starts: the scheduler refuses new samples
        assert check(b"", timeout=10) == b"\x08\x02"
    finally:
        channel.close()
        server.stop()


def test_grpc_health_watch_streams_serving_then_not_serving_and_does_not_hold_the_drain(digits):
    """Watch (what gRPC clients' own health checking streams) sends the status at once and again when it changes; an
    unknown service gets SERVICE_UNKNOWN (3) and the stream stays open. On SIGTERM the server's own stream sends
    NOT_SERVING and both end, so the process exits at once, not after the gRPC server's grace period (15 s here)."""
    import grpc
    _, _, out = digits
    process, url = start_cli_server(["--export", str(out / "onnx"), "--grpc-port", "0"])
    try:
        line = next_line(process)  # printed as the app starts
        channel = grpc.insecure_channel(line.split(" on ")[1].strip())
        watch = channel.unary_stream("/grpc.health.v1.Health/Watch")  # raw health.proto bytes, as in the test above
        ours, other = watch(b"", timeout=30), watch(b"\x0a\x04nope", timeout=30)
        assert next(ours) == b"\x08\x01" and next(other) == b"\x08\x03"
        stopped = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert list(ours) == [b"\x08\x02"] and list(other) == []
        assert process.wait(30) == 0 and time.monotonic() - stopped < 10
        channel.close()
    finally:
        process.kill()

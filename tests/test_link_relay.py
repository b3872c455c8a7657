"""The emulated link of the tier benchmarks adds its round trip and holds to its rate (lower bounds only: a busy
machine may always be slower)."""
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from link_relay import LinkRelay  # noqa: E402
from test_serve import digits  # noqa: E402,F401  (the fixture: a digits-convnet export)


def _echo_server() -> tuple[socket.socket, int]:
    """An echo server on 127.0.0.1 (a port the OS picks) serving connections in daemon threads."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(30)

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=lambda c=conn: [c.sendall(d) for d in iter(lambda: c.recv(65536), b"")],
                             daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return server, server.getsockname()[1]


def _round_trip(port: int, payload: bytes) -> tuple[float, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        start = time.perf_counter()
        s.sendall(payload)
        got = b""
        while len(got) < len(payload) and (chunk := s.recv(65536)):  # a peer that closed: b"", not a spin
            got += chunk
        return time.perf_counter() - start, got


def test_the_relay_adds_its_round_trip_and_passes_bytes_unchanged():
    server, port = _echo_server()
    with LinkRelay(port, rtt_ms=100, max_seconds=30) as relay:
        seconds, got = _round_trip(relay.port, b"ping")
        assert got == b"ping" and seconds >= 0.095  # the echo crosses the link both ways: one RTT
        assert relay.bytes_forwarded == 4
    server.close()


def test_the_relay_caps_the_rate():
    server, port = _echo_server()
    payload = bytes(range(256)) * 800  # 200 KiB: at 8 Mbit/s (1 MB/s) each way, >= 0.18 s after the 16 KiB burst
    with LinkRelay(port, mbps=8, max_seconds=30) as relay:
        seconds, got = _round_trip(relay.port, payload)
    assert got == payload and seconds >= (len(payload) - 16 * 1024) / 1e6 * 0.95
    server.close()


def test_the_relay_stops_by_itself():
    server, port = _echo_server()
    relay = LinkRelay(port, max_seconds=0.2).start()
    relay._thread.join(5)
    assert not relay._thread.is_alive()
    server.close()


def _netns_works() -> bool:
    from link_relay import NetnsLink
    if not NetnsLink.available():
        return False
    try:
        NetnsLink(8, index=49).close()
        return True
    except (RuntimeError, OSError):
        return False


def test_a_namespace_link_holds_to_its_tbf_rate_and_is_removed_on_close():
    import pytest
    import subprocess
    from link_relay import NetnsLink
    if not _netns_works():
        pytest.skip("needs root, iproute2 and network namespaces")
    ns = NetnsLink(8, index=48)
    echo = ("import socket\ns = socket.create_server(('%s', 7777)); s.settimeout(30)\nc, _ = s.accept()\n"
            "while d := c.recv(65536): c.sendall(d)\n" % ns.host)
    proc = subprocess.Popen(ns.command(["timeout", "30", sys.executable, "-c", echo]))
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                conn = socket.create_connection((ns.host, 7777), timeout=30)
                break
            except OSError:
                assert time.monotonic() < deadline, "the echo server in the namespace did not start"
                time.sleep(0.05)
        payload = bytes(range(256)) * 800  # 200 KiB at 8 Mbit/s (1 MB/s): >= 0.2 s less one packet's burst
        with conn:
            start = time.perf_counter()
            conn.sendall(payload)
            got = b""
            while len(got) < len(payload) and (chunk := conn.recv(65536)):
                got += chunk
            seconds = time.perf_counter() - start
        assert got == payload and seconds >= (len(payload) - NetnsLink.BURST_BYTES) / 1e6 * 0.95
    finally:
        proc.kill()
        proc.wait(10)
        ns.close()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert ns.name not in listed.split()


def test_stretch_follows_every_onnx_runtime_call_with_a_sleep_of_its_duration_times_the_factor(monkeypatch):
    ort = __import__("pytest").importorskip("onnxruntime")
    from onnx import TensorProto, helper
    from link_relay import Stretch, stretch_onnxruntime
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    monkeypatch.setattr(ort.InferenceSession, "run", ort.InferenceSession.run)  # put back after the test
    ticks, slept = iter([10.0, 10.002, 20.0, 20.005]), []
    stretch_onnxruntime(3.0, clock=lambda: next(ticks), sleep=slept.append)
    import numpy as np
    for _ in range(2):
        assert session.run(None, {"x": np.array([-1.0, 2.0], np.float32)})[0].tolist() == [0.0, 2.0]
    assert np.allclose(slept, [0.006, 0.015])  # three times each call's 2 ms and 5 ms
    argv = ["ip", "netns", "exec", "ns", sys.executable, "-m", "exitwise", "serve", "--port", "0"]
    command = Stretch(0.25, cpu=1).command(argv)
    assert command[:8] == ["ip", "netns", "exec", "ns", "taskset", "-c", "1", sys.executable]
    assert command[8] == "-c" and "stretch_onnxruntime(3.0)" in command[9] and command[10:] == ["serve", "--port", "0"]


def test_pace_pads_every_onnx_runtime_call_to_its_rows_times_its_files_pace(monkeypatch, digits):
    ort = __import__("pytest").importorskip("onnxruntime")
    import json
    from link_relay import Stretch, pace_command, pace_onnxruntime
    export = digits[2] / "onnx"
    argv, env = pace_command(export, None)
    costs = json.loads(subprocess.run(argv, env=env, capture_output=True, text=True, check=True, timeout=120).stdout)
    assert sorted(costs) == sorted(p.name for p in export.glob("*.onnx")) and all(0 < v < 0.1 for v in costs.values())
    session = ort.InferenceSession(str(export / "stage0.onnx"), providers=["CPUExecutionProvider"])
    monkeypatch.setattr(ort.InferenceSession, "run", ort.InferenceSession.run)  # put back after the test
    ticks, slept = iter([10.0, 10.002, 20.0, 20.005, 30.0, 30.05]), []
    pace_onnxruntime(4.0, {"stage0.onnx": 0.001}, clock=lambda: next(ticks), sleep=slept.append)
    import numpy as np
    for rows in (1, 3, 1):  # 4 ms a row: 2 ms taken, then 5 ms of 12, then 50 ms (slower than the pace: no sleep)
        assert len(session.run(None, {"x": np.ones((rows, 1, 8, 8), np.float32)})[0]) == rows
    assert np.allclose(slept, [0.002, 0.007, 0.0])
    command = Stretch(0.25, cpu=1, paced={"stage0.onnx": 0.001}).command([sys.executable, "-m", "exitwise", "serve"])
    assert "pace_onnxruntime(4.0, {'stage0.onnx': 0.001})" in command[5]

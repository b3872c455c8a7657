"""Tiers on 127.0.0.1: a chain of `exitwise serve` processes answers as single-process early exit does, degrades
to its own last exit when the next tier dies (and forwards again when it is back), and refuses bad chains."""
import contextlib
import dataclasses
import json
import struct
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from exitwise.api import export
from exitwise.cli import main
from exitwise.config import NextURL, SchedulerConfig, ServeConfig, TierConfig
from exitwise.errors import UserError
from exitwise.deploy.onnx_runtime import OnnxEarlyExit
from exitwise.deploy.plan import Link, NetworkCosts, Tier as PlanTier, plan as make_plan
from exitwise.early_exit import EarlyExitModel
from exitwise.models import create_model
from exitwise.policies import get_policy
from exitwise.runtime import all_exit_logits, prepare

from conftest import random_image_set, read_http_answer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from link_relay import LinkRelay, ServeProcess  # noqa: E402

_STARTED: list = []


class Tier(ServeProcess):
    """An `exitwise serve` tier process, also stopped when its test ends, whatever happened (a later tier that
    failed to start had left the earlier ones running: they were made before the `try` that stops them)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _STARTED.append(self)


@pytest.fixture(autouse=True)
def _stop_every_tier():
    yield
    while _STARTED:
        _STARTED.pop().stop()  # stop() twice is fine: a stopped process is left alone

def write_plan(path: Path, stages: tuple) -> Path:
    """A plan.json for 3 stages whose chosen placement is `stages` (one (first, last) or None per tier; the tiers
    named device, edge, cloud as many as there are)."""
    names = ("device", "edge", "cloud") if len(stages) == 3 else ("device", "cloud")
    made = make_plan(tuple(PlanTier(n) for n in names), tuple(Link(a, b, 100, 1) for a, b in zip(names, names[1:])),
                     NetworkCosts((0.001,) * 3, (1.0, 0.5, 0.2), (10, 10), 64))
    chosen = next(i for i, c in enumerate(made.candidates) if c.stages == stages)
    path.write_text(json.dumps(dataclasses.replace(made, chosen=chosen).to_json()))
    return path


NEAR = 1e-5  # fp32 rounding across batch sizes: a score this close to its threshold may go either way


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """A random-weight digits-convnet (three stages), thresholds that let a third out at each side exit, exported."""
    torch.manual_seed(0)
    net, policy = create_model("digits-convnet"), get_policy("entropy")
    data = random_image_set(120, seed=3)
    scores = policy.scores(torch.from_numpy(all_exit_logits(prepare(net), data).logits)).numpy()
    thresholds = np.array([np.quantile(scores[0], 0.33), np.quantile(scores[1], 0.5)])
    out = tmp_path_factory.mktemp("tiers")
    EarlyExitModel(net, policy, thresholds, "digits-convnet", tuple("0123456789")).save(out / "model")
    export(out / "onnx", source=out / "model")
    return out / "onnx", data.images.numpy()


def _infer(url: str, images: np.ndarray, context=None) -> dict:
    """The V2 answer to `images` (`context`: the `ssl.SSLContext` of an https `url`)."""
    body = json.dumps({"inputs": [{"name": "image", "datatype": "UINT8", "shape": list(images.shape),
                                   "parameters": {"layout": "NHWC"}, "data": images.reshape(-1).tolist()}]})
    request = urllib.request.Request(f"{url}/v2/models/digits-convnet/infer", body.encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60, context=context) as response:
        doc = json.loads(response.read())
    out = {o["name"]: o["data"] for o in doc["outputs"]}
    return {"exit": np.array(out["exit"]), "class": np.array(out["class_index"]), **doc.get("parameters", {})}


def _borderline(export: Path, images: np.ndarray) -> np.ndarray:
    """Images with a side-exit score within NEAR of its threshold (their exit may differ by batch composition)."""
    model = OnnxEarlyExit.load(export)
    x, state = images.transpose(0, 3, 1, 2).astype(np.float32) / 255, model.policy.init_state(len(images))
    near = np.zeros(len(images), dtype=bool)
    for k in range(model.num_exits - 1):
        x, logits = model.run_stage(k, x)
        scores, state = model.policy.step(k, logits, state)
        near = near | (np.abs(scores - np.float32(model.thresholds[k])) <= NEAR)
    return near


def test_a_tiers_stages_are_given_once_and_its_scheduler_runs_them():
    config = ServeConfig(tier=TierConfig("edge", 1, 2, "http://127.0.0.1:9"))
    assert (config.scheduler.first, config.scheduler.last) == (1, 2)  # before: 0 to the end, never forwarding
    assert ServeConfig(tier=TierConfig("edge", 1, 2), scheduler=SchedulerConfig(first=1, last=2)).scheduler.last == 2
    with pytest.raises(UserError, match="the scheduler's stages 0-1 are not tier edge's 1-2"):
        ServeConfig(tier=TierConfig("edge", 1, 2), scheduler=SchedulerConfig(first=0, last=1))


def test_a_forwarder_answers_every_sample_whatever_fails(monkeypatch):
    from concurrent.futures import Future
    from exitwise.deploy.scheduler import Sample
    from exitwise.deploy.tiers import Forwarder

    class LastExit:  # this tier's last exit: class 7 for every row
        num_exits = 3

        def answer(self, k, features):
            return np.full(len(features), 7), np.full(len(features), 0.5)

    def send(values: np.ndarray) -> list[Sample]:
        samples = [Sample(Future(), 0.0, 1e9) for _ in values]
        forwarder._send(values, np.zeros((len(values), 1), np.int64), samples)
        return samples

    def fails(body, rows):
        raise MemoryError()  # a message-less error: its log line had raised IndexError, the samples left hanging

    forwarder = Forwarder(LastExit(), TierConfig("edge", 0, 0, "http://127.0.0.1:9", wire="fp16"))
    try:
        monkeypatch.setattr(forwarder, "_post", lambda body, rows: pytest.fail("values fp16 cannot hold were sent"))
        answers = [s.future.result(0) for s in send(np.full((2, 3), 1e6, np.float32))]
        assert [(a.prediction, a.degraded) for a in answers] == [(7, True)] * 2
        assert forwarder.down_until == 0  # this batch's values, not the next tier's fault: it is not rested
        monkeypatch.setattr(forwarder, "_post", fails)
        assert all(s.future.result(0).degraded for s in send(np.ones((2, 3), np.float32)))
        assert forwarder.down_until > 0
        monkeypatch.setattr(forwarder, "_degraded", lambda features: 1 / 0)  # a broken model: failed at once
        with pytest.raises(ZeroDivisionError):
            send(np.ones((1, 3), np.float32))[0].future.result(0)
    finally:
        forwarder.pool.shutdown()


def test_a_three_tier_chain_answers_as_single_process_early_exit(digits):
    export_dir, images = digits
    expected = OnnxEarlyExit.load(export_dir).run(images)
    cloud = Tier(export_dir, "--stages", "2-2", "--tier", "cloud")
    edge = Tier(export_dir, "--stages", "1-1", "--next", cloud.url, "--tier", "edge")
    device = Tier(export_dir, "--stages", "0-0", "--next", edge.url, "--tier", "device", "--max-wait-ms", "5")
    try:
        got = [_infer(device.url, images[i:i + 40]) for i in range(0, len(images), 40)]
        metrics = urllib.request.urlopen(f"{device.url}/metrics", timeout=30).read().decode()
    finally:
        for tier in (device, edge, cloud):
            tier.stop()
    exits = np.concatenate([g["exit"] for g in got])
    classes = np.concatenate([g["class"] for g in got])
    tiers = sum((g["tier"] for g in got), [])
    differ = (exits != expected.exits) | (classes != expected.predictions)
    assert not (differ & ~_borderline(export_dir, images)).any()
    assert set(exits) == {0, 1, 2}  # every tier answers some
    assert [("device", "edge", "cloud")[e] for e in exits] == tiers  # each tier answers at its own exit
    assert not any(sum((g["degraded"] for g in got), []))
    assert "exitwise_forwarded_samples_total" in metrics


def _counter(url: str, name: str) -> float:
    text = urllib.request.urlopen(f"{url}/metrics", timeout=30).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def test_the_next_tier_killed_mid_run_gives_degraded_answers_then_forwarding_resumes(digits):
    export_dir, images = digits
    expected = OnnxEarlyExit.load(export_dir).run(images)
    cloud = Tier(export_dir, "--stages", "1-2", "--tier", "cloud")
    device = Tier(export_dir, "--stages", "0-0", "--next", cloud.url, "--tier", "device",
                  "--forward-timeout-ms", "2000")
    try:
        before = _infer(device.url, images[:40])
        assert not any(before["degraded"]) and "cloud" in before["tier"]
        cloud.stop()  # the next tier is gone: every request is still answered, by the device's exit 0
        during = _infer(device.url, images[40:80])
        assert len(during["exit"]) == 40
        stayed = expected.exits[40:80] > 0
        assert all(during["degraded"][i] == bool(stayed[i]) for i in range(40))
        assert set(during["exit"][stayed]) == {0} and {during["tier"][i] for i in np.flatnonzero(stayed)} == {"device"}
        assert _counter(device.url, "exitwise_degraded_samples_total") == stayed.sum()
        cloud = Tier(export_dir, "--stages", "1-2", "--tier", "cloud", port=cloud.port)  # back on its port
        time.sleep(0.6)  # past the pause after a failure (500 ms)
        after = _infer(device.url, images[80:120])
        assert not any(after["degraded"]) and "cloud" in after["tier"]
    finally:
        device.stop()
        cloud.stop()


def test_the_first_tier_answers_over_grpc_too_saying_which_tier_answered_and_degrades_there_as_over_http(digits):
    grpcclient = pytest.importorskip("tritonclient.grpc")
    import socket
    export_dir, images = digits
    expected = OnnxEarlyExit.load(export_dir).run(images)
    with socket.socket() as s:  # a free port for the device's gRPC
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cloud = Tier(export_dir, "--stages", "1-2", "--tier", "cloud")
    device = Tier(export_dir, "--stages", "0-0", "--next", cloud.url, "--tier", "device", "--grpc-port", str(port),
                  "--forward-timeout-ms", "2000")
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")

    def infer(batch: np.ndarray) -> tuple[np.ndarray, list, list]:
        tensor = grpcclient.InferInput("image", list(batch.shape), "UINT8")
        tensor.set_data_from_numpy(np.ascontiguousarray(batch))
        tensor._get_tensor().parameters["layout"].string_param = "NHWC"
        result = client.infer("digits-convnet", [tensor], client_timeout=60)
        params = result.get_response().parameters
        return (result.as_numpy("exit"), json.loads(params["tier"].string_param),
                json.loads(params["degraded"].string_param))

    try:
        exits, tiers, degraded = infer(images[:40])
        http = _infer(device.url, images[:40])
        assert (exits == http["exit"]).all() and tiers == http["tier"] and degraded == http["degraded"]
        differ = exits != expected.exits[:40]
        assert not (differ & ~_borderline(export_dir, images[:40])).any()
        assert {0, 1} <= set(exits) and tiers == [("device", "cloud", "cloud")[e] for e in exits]
        assert not any(degraded)
        cloud.stop()  # the next tier gone: the device answers at its own exit, marked degraded, over gRPC too
        exits, tiers, degraded = infer(images[40:80])
        stayed = expected.exits[40:80] > 0
        assert degraded == stayed.tolist() and set(exits) == {0} and set(tiers) == {"device"}
    finally:
        client.close()
        device.stop()
        cloud.stop()


def test_a_relay_takes_no_grpc_port(capsys):
    assert main(["serve", "--relay", "--next", "http://127.0.0.1:9", "--grpc-port", "9"]) == 2
    err = capsys.readouterr().err.strip()
    assert "a relay runs no model" in err and len(err.splitlines()) == 1


def test_a_relay_refuses_the_options_of_a_model_it_does_not_run(capsys):
    for flags in (["--weights", "w.pt"], ["--no-early-exit"], ["--precision", "bf16"], ["--micro-batch", "8"]):
        assert main(["serve", "--relay", "--next", "http://127.0.0.1:9", "--port", "0", *flags]) == 2, flags
        err = capsys.readouterr().err.strip()
        assert f"runs no model: drop {flags[0]}" in err and len(err.splitlines()) == 1, (flags, err)


def test_a_relay_refuses_batching_options_it_has_no_queue_for(capsys):
    assert main(["serve", "--relay", "--next", "http://127.0.0.1:9", "--tier", "edge/1"]) == 2
    assert "tier name 'edge/1': use letters, digits and _ only" in capsys.readouterr().err
    for flags in (["--max-batch", "8"], ["--timeout-ms", "100", "--workers", "2"], ["--schedule", "oldest"]):
        assert main(["serve", "--relay", "--next", "http://127.0.0.1:9", "--port", "0", *flags]) == 2, flags
        err = capsys.readouterr().err.strip()
        named = ", ".join(f for f in flags if f.startswith("--"))
        assert f"(no batches, no queue): drop {named};" in err and len(err.splitlines()) == 1, (flags, err)


def test_bad_tiers_exit_2_in_one_line(digits, tmp_path, capsys):
    export_dir = str(digits[0])
    plan = write_plan(tmp_path / "plan.json", (None, (0, 2)))
    torn = tmp_path / "torn.json"
    torn.write_text(json.dumps({"format": "exitwise.tier-plan/1", "tiers": [{"name": "device"}], "chosen": 0}))
    cases = [(["--stages", "0-1", "--next", "localhost:8001"], "not a URL"),
             (["--stages", "0-1", "--next", "ftp://127.0.0.1:1"], "not a URL"),
             (["--stages", "2-1", "--next", "http://127.0.0.1:1"], "out of order"),
             (["--stages", "0-5"], "stages 0-2"),
             (["--stages", "0-1"], "give --next"),
             (["--stages", "1-2", "--next", "http://127.0.0.1:1"], "nothing to send"),
             (["--plan", str(plan), "--tier", "device"], "forwards to the next tier: give --next"),
             (["--plan", str(plan), "--tier", "edge"], "not in"),
             (["--plan", str(torn), "--tier", "device"], "is not a whole tier plan"),
             (["--stages", ""], "FIRST-LAST"),
             (["--stages", "0-1", "--next", "http://127.0.0.1:1", "--tier", "edge 1"], "tier name 'edge 1': use "),
             (["--stages", "0-1", "--next", "http://127.0.0.1:1", "--forward-timeout-ms", "900", "--timeout-ms",
               "500"], "below --timeout-ms"),
             # options of a tier that forwards, on one that does not: refused, never silently unused
             (["--stages", "1-2", "--wire", "int8"], "--wire goes with --next"),
             (["--stages", "1-2", "--send-images"], "--send-images goes with --next"),
             (["--wire", "fp16", "--forward-timeout-ms", "100"], "--wire, --forward-timeout-ms go with --next")]
    for args, message in cases:
        assert main(["serve", "--export", export_dir, "--port", "0", *args]) == 2, args
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (args, err)


def test_a_tier_takes_its_stages_and_wire_format_from_the_plan(digits, tmp_path):
    from exitwise.cli import _tier_config, build_parser
    from exitwise.deploy.plan import Link, NetworkCosts, Tier as PlanTier, WireCost, plan
    # a slow last stage that a 10x faster cloud takes; 10 values cross after stage 1 (int8 changes nothing)
    costs = NetworkCosts((0.001, 0.001, 0.5), (1.0, 0.1, 0.05), (10, 10), 1000, WireCost(100, {"int8": (0.0, 0.0)}))
    doc = plan((PlanTier("device"), PlanTier("cloud", 10)), (Link("device", "cloud", 1, 10),), costs).to_json()
    assert doc["choice"]["stages"] == [[0, 1], [2, 2]] and doc["choice"]["wire"] == "int8"
    (tmp_path / "plan.json").write_text(json.dumps(doc))
    args = build_parser().parse_args(["serve", "--export", str(digits[0]), "--plan", str(tmp_path / "plan.json"),
                                      "--tier", "device", "--next", "http://127.0.0.1:9"])
    config = _tier_config(args)
    assert (config.name, config.first, config.last, config.wire) == ("device", 0, 1, "int8")


def test_features_requests_round_trip_and_malformed_ones_are_refused():
    from exitwise.deploy.tiers import decode_features, encode_features
    x, state = np.arange(24, dtype=np.float32).reshape(2, 3, 4), np.array([[1, 2], [3, 4]])
    stage, y, s = decode_features(encode_features(1, x, state, "fp32"), 2)
    assert stage == 1 and np.array_equal(x, y) and np.array_equal(state, s)
    with pytest.raises(UserError, match="state"):
        decode_features(encode_features(1, x, state, "fp32"), 3)
    with pytest.raises(UserError, match="malformed"):
        decode_features(b"\x05\x00\x00\x00{bad}", 0)
    deep = b"[" * 5000 + b"]" * 5000  # nested past Python's recursion: the client's mistake, not a 500
    with pytest.raises(UserError, match="malformed features request: its header"):
        decode_features(struct.pack("<I", len(deep)) + deep, 0)


def test_int8_features_on_the_wire_keep_almost_every_answer(digits):
    export_dir, images = digits
    expected = OnnxEarlyExit.load(export_dir).run(images)
    cloud = Tier(export_dir, "--stages", "1-2", "--tier", "cloud")
    device = Tier(export_dir, "--stages", "0-0", "--next", cloud.url, "--tier", "device", "--wire", "int8")
    try:
        got = _infer(device.url, images)
        sent = _counter(device.url, "exitwise_forwarded_bytes_total")
    finally:
        device.stop()
        cloud.stop()
    same = (got["exit"] == expected.exits) & (got["class"] == expected.predictions)
    assert same.mean() >= 0.95 and not any(got["degraded"])
    values = int(np.prod(OnnxEarlyExit.load(export_dir).manifest.stages[0].output_shape[1:]))  # 16x8x8
    survivors = (expected.exits > 0).sum()
    assert survivors * values <= sent < survivors * values * 1.5  # a byte per value and headers (fp32 takes 4)


def test_the_first_tier_may_send_images_and_the_next_recomputes(digits):
    export_dir, images = digits
    expected = OnnxEarlyExit.load(export_dir).run(images)
    cloud = Tier(export_dir, "--stages", "2-2", "--tier", "cloud")
    device = Tier(export_dir, "--stages", "0-1", "--next", cloud.url, "--tier", "device", "--send-images")
    try:
        got = _infer(device.url, images)
        sent = _counter(device.url, "exitwise_forwarded_bytes_total")
    finally:
        device.stop()
        cloud.stop()
    differ = (got["exit"] != expected.exits) | (got["class"] != expected.predictions)
    assert not (differ & ~_borderline(export_dir, images)).any() and not any(got["degraded"])
    survivors = (expected.exits == 2).sum()
    assert survivors * 64 <= sent < survivors * 64 + 2000  # 8x8 uint8 pixels each, and one header per batch


def test_the_image_crosses_the_second_link_too_and_the_chain_answers_as_single_process_early_exit(digits):
    """The device sends the survivors' images to the edge, which forwards the images it got (not its features) to
    the cloud; each recomputes the stages before its own. fp32: the answers equal single-process early exit."""
    from exitwise.deploy.tiers import ENDPOINT, encode_features
    export_dir, images = digits
    expected = OnnxEarlyExit.load(export_dir).run(images)
    cloud = Tier(export_dir, "--stages", "2-2", "--tier", "cloud")
    edge = Tier(export_dir, "--stages", "1-1", "--next", cloud.url, "--tier", "edge", "--send-images")
    device = Tier(export_dir, "--stages", "0-0", "--next", edge.url, "--tier", "device", "--send-images",
                  "--max-wait-ms", "5")
    try:
        got = [_infer(device.url, images[i:i + 40]) for i in range(0, len(images), 40)]
        sent = _counter(edge.url, "exitwise_forwarded_bytes_total")
        features = encode_features(1, np.zeros((1, 16, 8, 8), np.float32), np.zeros((1, 0), np.int64), "fp32")
        with pytest.raises(urllib.error.HTTPError) as refused:  # it sends images on: it cannot take features
            urllib.request.urlopen(urllib.request.Request(edge.url + ENDPOINT, features), timeout=30)
    finally:
        for tier in (device, edge, cloud):
            tier.stop()
    exits = np.concatenate([g["exit"] for g in got])
    classes = np.concatenate([g["class"] for g in got])
    differ = (exits != expected.exits) | (classes != expected.predictions)
    assert not (differ & ~_borderline(export_dir, images)).any()
    assert set(exits) == {0, 1, 2} and not any(sum((g["degraded"] for g in got), []))
    assert sum((g["tier"] for g in got), []) == [("device", "edge", "cloud")[e] for e in exits]
    survivors = (expected.exits == 2).sum()
    assert survivors * 64 <= sent < survivors * 64 + 2000  # 8x8 uint8 pixels each (features: 512 B), a header a batch
    assert refused.value.code == 409 and "send it the images" in json.loads(refused.value.read())["error"]


def test_a_tier_whose_next_refuses_what_it_sends_answers_degraded_and_logs_the_next_tiers_reason(digits):
    """The edge sends images on, so it takes images only; a device sending it features (no --send-images) is
    refused, answers at its own exit, and its log says why in the edge's words."""
    export_dir, images = digits
    cloud = Tier(export_dir, "--stages", "2-2", "--tier", "cloud")
    edge = Tier(export_dir, "--stages", "1-1", "--next", cloud.url, "--tier", "edge", "--send-images")
    device = Tier(export_dir, "--stages", "0-0", "--next", edge.url, "--tier", "device")
    try:
        got = _infer(device.url, images[:40])
    finally:
        for tier in (device, edge, cloud):
            tier.stop()
    degraded = np.array(got["degraded"])
    assert degraded.any() and set(got["exit"][degraded]) == {0}  # the survivors answered at the device's exit
    log = device.log
    assert "the next tier answered 409" in log and "--send-images on the tier before" in log, log[-2000:]


def test_a_plan_that_sends_the_image_across_the_second_link_makes_the_middle_tier_send_images(digits, tmp_path):
    from exitwise.cli import _tier_config, build_parser
    from exitwise.deploy.plan import HttpBytes, Link, NetworkCosts, Tier as PlanTier, plan
    # 64 B images, 1024 B (stage 0) and 512 B (stage 1) of fp32 features; each tier slow (1 s) at the stages after
    # its own: one stage each, and on 0.1 Mbit/s links the image crosses both (no HTTP bytes here)
    costs = NetworkCosts((0.001,) * 3, (1.0, 0.5, 0.2), (256, 128), 64, infer_http=HttpBytes(0, 0),
                         tier_http=HttpBytes(0, 0))
    tiers = (PlanTier("device", stage_seconds=(0.001, 1, 1)), PlanTier("edge", stage_seconds=(0.001, 0.001, 1)),
             PlanTier("cloud", stage_seconds=(0.001,) * 3))
    doc = plan(tiers, (Link("device", "edge", 0.1, 1), Link("edge", "cloud", 0.1, 1)), costs).to_json()
    assert doc["choice"]["stages"] == [[0, 0], [1, 1], [2, 2]]
    assert [x["payload"] for x in doc["choice"]["links"]] == ["input", "input"]
    (tmp_path / "plan.json").write_text(json.dumps(doc))
    for name, after in (("device", "edge"), ("edge", "cloud")):
        args = build_parser().parse_args(["serve", "--export", str(digits[0]), "--plan", str(tmp_path / "plan.json"),
                                          "--tier", name, "--next", "http://127.0.0.1:9"])
        assert _tier_config(args).send_images, name


def test_the_planners_http_bytes_are_what_a_chain_sends(digits):
    """`INFER_HTTP` and `TIER_HTTP`, the bytes the planner adds to a crossing's payload (headers, framing, the answer
    back), within 10% of what crosses counting links: one-image V2 requests passed on by a relay, and one-row
    features requests with their answers."""
    from exitwise.deploy.measure import _round_trips
    from exitwise.deploy.plan import INFER_HTTP, TIER_HTTP
    export_dir, images = digits
    cloud = Tier(export_dir, "--stages", "1-2", "--tier", "cloud")
    to_cloud = LinkRelay(cloud.port, max_seconds=120).start()
    device = Tier(export_dir, "--stages", "0-0", "--next", f"http://127.0.0.1:{to_cloud.port}", "--tier", "device")
    to_device = LinkRelay(device.port, max_seconds=120).start()
    relay = Tier(None, "--relay", "--next", f"http://127.0.0.1:{to_device.port}", "--tier", "gateway")
    try:
        # 30 binary V2 requests, one at a time:
        _round_trips(NextURL(False, "127.0.0.1", relay.port), "digits-convnet", images, 27)
        crossed = _counter(device.url, "exitwise_forwarded_samples_total")  # every features request holds one row
    finally:
        for tier in (relay, device, cloud):
            tier.stop()
        to_cloud.stop()
        to_device.stop()
    image, features = 8 * 8, 16 * 8 * 8 * 4  # the payloads: the image's pixels, stage 0's output in fp32
    measured = {"infer": (to_device.bytes_forwarded / 30 - image, to_device.bytes_returned / 30),
                "tier": (to_cloud.bytes_forwarded / crossed - features, to_cloud.bytes_returned / crossed)}
    assert crossed >= 5
    for (request, answer), http in zip(measured.values(), (INFER_HTTP, TIER_HTTP)):
        assert abs(request - http.request) <= 0.1 * http.request and abs(answer - http.answer) <= 0.1 * http.answer, \
            measured


def test_relays_hold_no_stages_and_pass_images_and_features_on_unchanged(digits):
    """A relay before the first tier with stages carries the images, one between two tiers the features; the
    answers equal single-process early exit and say which tier gave them (never the relay)."""
    export_dir, images = digits
    expected = OnnxEarlyExit.load(export_dir).run(images)
    cloud = Tier(export_dir, "--stages", "2-2", "--tier", "cloud")
    edge = Tier(None, "--relay", "--next", cloud.url, "--tier", "edge")
    device = Tier(export_dir, "--stages", "0-1", "--next", edge.url, "--tier", "device")
    gateway = Tier(None, "--relay", "--next", device.url, "--tier", "gateway")
    try:
        got = [_infer(gateway.url, images[i:i + 40]) for i in range(0, len(images), 40)]
        relayed = _counter(edge.url, 'exitwise_relayed_requests_total{code="200"}')
    finally:
        for tier in (gateway, device, edge, cloud):
            tier.stop()
    exits = np.concatenate([g["exit"] for g in got])
    classes = np.concatenate([g["class"] for g in got])
    differ = (exits != expected.exits) | (classes != expected.predictions)
    assert not (differ & ~_borderline(export_dir, images)).any()
    assert set(exits) == {0, 1, 2} and relayed >= 1  # the cloud's answers came through the edge relay
    assert sum((g["tier"] for g in got), []) == [("device", "device", "cloud")[e] for e in exits]
    assert not any(sum((g["degraded"] for g in got), []))


def test_a_relay_whose_next_tier_is_down_or_silent_answers_an_error_at_once_and_the_tier_before_degrades(digits):
    import socket
    export_dir, images = digits
    silent = socket.socket()  # accepts connections and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    cloud = Tier(export_dir, "--stages", "1-2", "--tier", "cloud")
    edge = Tier(None, "--relay", "--next", cloud.url, "--tier", "edge")
    slow_edge = Tier(None, "--relay", "--next", f"http://127.0.0.1:{silent.getsockname()[1]}",
                     "--forward-timeout-ms", "300")
    device = Tier(export_dir, "--stages", "0-0", "--next", edge.url, "--tier", "device")
    try:
        cloud.stop()
        for relay, status in ((edge, 502), (slow_edge, 504)):
            start = time.monotonic()
            with pytest.raises(urllib.error.HTTPError) as refused:
                _infer(relay.url, images[:4])
            assert refused.value.code == status and time.monotonic() - start < 5
            assert "the next tier" in json.loads(refused.value.read())["error"]
        during = _infer(device.url, images[:40])  # the device degrades to its own exit, as when its next tier is down
        assert len(during["exit"]) == 40 and set(during["exit"]) == {0} and any(during["degraded"])
        assert _counter(edge.url, 'exitwise_relay_failures_total{reason="unreachable"}') >= 2
    finally:
        for tier in (device, slow_edge, edge):
            tier.stop()
        silent.close()


def test_bad_relays_exit_2_in_one_line(digits, tmp_path, capsys):
    plan = write_plan(tmp_path / "plan.json", ((0, 2), None))
    cases = [(["--relay"], "give --next"),
             (["--relay", "--next", "http://127.0.0.1:1", "--export", str(digits[0])], "drop --export"),
             (["--relay", "--next", "http://127.0.0.1:1", "--stages", "0-1"], "drop --stages"),
             (["--relay", "--next", "http://127.0.0.1:1", "--wire", "int8"], "drop --wire"),
             (["--relay", "--next", "localhost:1"], "not a URL"),
             (["--plan", str(plan), "--tier", "cloud", "--next", "http://127.0.0.1:1"], "after the network ends")]
    for args, message in cases:
        assert main(["serve", "--port", "0", *args]) == 2, args
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (args, err)


def test_a_tier_the_plan_gives_no_stages_is_served_as_a_relay(tmp_path):
    from exitwise.cli import _relay_config, build_parser
    from exitwise.config import RelayConfig
    plan = write_plan(tmp_path / "plan.json", ((0, 0), None, (1, 2)))
    args = build_parser().parse_args(["serve", "--export", "x", "--plan", str(plan), "--tier", "edge",
                                      "--next", "http://127.0.0.1:9"])
    assert _relay_config(args, ["--export"]) == RelayConfig("edge", "http://127.0.0.1:9")
    args = build_parser().parse_args(["serve", "--export", "x", "--plan", str(plan), "--tier", "device",
                                      "--next", "http://127.0.0.1:9"])
    assert _relay_config(args, ["--export"]) is None  # it holds stage 0


def test_a_torch_chain_answers_as_single_process_early_exit_and_degrades_on_torch_too(digits):
    """`--from DIR` tiers (PyTorch): fp32 features across the links, the first tier sending images (the next
    recomputes stage 0 on torch), answers equal to `EarlyExitModel.run`; the last tier gone, the middle one answers
    at its own exit, degraded."""
    from exitwise.data import ImageSet
    export_dir, images = digits
    folder = str(Path(export_dir).parent / "model")
    model = EarlyExitModel.load(folder)
    data = ImageSet(torch.from_numpy(images), torch.zeros(len(images), dtype=torch.int64), tuple("0123456789"))
    expected = model.run(data, precision="fp32", micro_batch=64)
    torch_tier = ("--from", folder, "--precision", "fp32", "--micro-batch", "64")
    cloud = Tier(None, *torch_tier, "--stages", "2-2", "--tier", "cloud")
    edge = Tier(None, *torch_tier, "--stages", "1-1", "--next", cloud.url, "--tier", "edge")
    device = Tier(None, *torch_tier, "--stages", "0-0", "--next", edge.url, "--tier", "device", "--send-images")
    try:
        got = _infer(device.url, images)
        cloud.stop()
        during = _infer(device.url, images)
    finally:
        for tier in (device, edge, cloud):
            tier.stop()
    differ = (got["exit"] != expected.exits) | (got["class"] != expected.predictions)
    assert not (differ & ~_borderline(export_dir, images)).any()
    assert set(got["exit"]) == {0, 1, 2} and not any(got["degraded"])
    assert got["tier"] == [("device", "edge", "cloud")[e] for e in got["exit"]]
    assert set(during["exit"]) <= {0, 1} and any(during["degraded"])
    assert all(t == "edge" for t, d in zip(during["tier"], during["degraded"]) if d)


@contextlib.contextmanager
def fake_next_tier(answer, on_connect=lambda address: None):
    """A plain HTTP/1.1 server on 127.0.0.1 standing in for a next tier: every GET or POST gets a 200 whose body is
    `answer(path, body)`; its URL. `on_connect` is told of each TCP connection it accepts."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive

        def setup(self):
            on_connect(self.client_address)
            super().setup()

        def do_POST(self):
            out = answer(self.path, self.rfile.read(int(self.headers.get("Content-Length", 0))))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        do_GET = do_POST

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_tier_keeps_its_connection_to_the_next_one_and_reopens_it_when_the_next_tier_closed_it():
    from exitwise.deploy.connections import KeptConnections
    accepted = []
    with fake_next_tier(lambda path, body: body, on_connect=accepted.append) as url:
        kept = KeptConnections(NextURL(False, "127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=5)
        assert [kept.request("POST", "/", b"x%d" % i, {})[:2] for i in range(3)] == [(200, b"x0"), (200, b"x1"),
                                                                                      (200, b"x2")]
        assert len(accepted) == 1  # three crossings, one TCP connection
        kept.local.conn.sock.shutdown(2)  # as if the next tier had closed it while idle
        assert kept.request("POST", "/", b"again", {})[:2] == (200, b"again")
        assert len(accepted) == 2


def _post_features(url: str, body: bytes) -> tuple[int, dict]:
    import httpx  # urllib's write of a body the server refused before reading it breaks its pipe
    response = httpx.post(f"{url}/v2/tiers/features", content=body, timeout=60,
                          headers={"Content-Type": "application/octet-stream"})
    return response.status_code, response.json()


def test_a_tier_refuses_features_of_the_wrong_shape_or_range_and_bodies_past_its_limit_and_keeps_serving(digits):
    """Features not of stage 0's output shape were run: a 500 alone, and where two such batches met at the stage's
    queue the scheduler's worker died and the tier answered nothing more (504s); features far out of range gave a
    NaN answer (500); the body limit did not apply to this route; rows past --max-queue were a 503 to retry."""
    import threading
    from exitwise.deploy.tiers import encode_features
    export_dir, _ = digits
    # --max-queue 24 holds every good row of the concurrent burst below (12 requests of 2), so no 503 can race in
    cloud = Tier(export_dir, "--stages", "1-2", "--tier", "cloud", "--max-body-mb", "1", "--max-queue", "24")
    rng = np.random.default_rng(0)

    def body(shape, value=None):
        x = rng.normal(size=shape).astype(np.float32) if value is None else np.full(shape, value, np.float32)
        return encode_features(1, x, np.zeros((len(x), 0), np.int64), "fp32")

    try:
        assert _post_features(cloud.url, body((2, 16, 8, 8)))[0] == 200
        status, doc = _post_features(cloud.url, body((2, 16, 4, 4)))
        assert status == 400 and "features of shape [16, 4, 4]; stage 1 takes [16, 8, 8]" in doc["error"]
        assert _post_features(cloud.url, body((2, 1024)))[0] == 400
        assert _post_features(cloud.url, body((2, 16, 8, 8), 3e38))[0] == 400
        assert _post_features(cloud.url, body((25, 16, 8, 8)))[0] == 413
        status, doc = _post_features(cloud.url, body((0, 16, 8, 8)))  # was a 200 with no answers
        assert status == 400 and "no rows" in doc["error"]
        assert _post_features(cloud.url, b"\0" * (2**20 + 1))[0] == 413
        statuses = []
        sent = [threading.Thread(target=lambda b: statuses.append(_post_features(cloud.url, b)[0]),
                                 args=(body((2, 16, 8, 8) if i % 2 else (2, 16, 4, 4)),)) for i in range(24)]
        for t in sent:
            t.start()
        for t in sent:
            t.join()
        assert sorted(statuses) == [200] * 12 + [400] * 12
        assert _post_features(cloud.url, body((2, 16, 8, 8)))[0] == 200
    finally:
        cloud.stop()
    assert "Traceback" not in cloud.log, cloud.log[-2000:]


def _withheld(port: int, sent: bytes) -> bytes:
    """The answer to a features request whose body stops after `sent` (of 100 bytes announced)."""
    import socket
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /v2/tiers/features HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + sent)
        return read_http_answer(sock)


def test_a_tier_or_relay_whose_tier_before_withholds_the_body_answers_408_within_its_timeout(digits):
    """A tier before that stalled mid-body held a place of --max-queue at a tier, and a relay's thread, for ever."""
    from exitwise.deploy.tiers import encode_features
    export_dir, _ = digits
    cloud = Tier(export_dir, "--stages", "1-2", "--tier", "cloud", "--timeout-ms", "300")
    relay = Tier(None, "--relay", "--next", cloud.url, "--tier", "edge", "--forward-timeout-ms", "300")
    try:
        for tier in (cloud, relay):
            for sent in (b"", b"\x05\x00"):
                start = time.monotonic()
                answer = _withheld(tier.port, sent)
                flag = b"--forward-timeout-ms" if tier is relay else b"--timeout-ms"
                assert answer.startswith(b"HTTP/1.1 408 ") and b"within 300 ms (%s)" % flag in answer, answer
                assert time.monotonic() - start < 5
        assert _post_features(cloud.url, encode_features(1, np.zeros((1, 16, 8, 8), np.float32),
                                                         np.zeros((1, 0), np.int64), "fp32"))[0] == 200
    finally:
        relay.stop()
        cloud.stop()


def test_a_next_tier_answering_nan_or_out_of_range_rows_gives_degraded_answers_not_a_500(digits):
    export_dir, images = digits

    def rows(path: str, body: bytes) -> bytes:
        count = len(json.loads(body[4:4 + struct.unpack("<I", body[:4])[0]])["state"])
        row = b'[2, 1, NaN, "cloud", false]' if path.startswith("/nan") else b'[99, 1, 0.5, "cloud", false]'
        return b'{"tier": "cloud", "answers": [' + b",".join([row] * count) + b"]}"

    with fake_next_tier(rows) as next_url:
        devices = [Tier(export_dir, "--stages", "0-0", "--next", f"{next_url}{prefix}", "--tier", "device")
                   for prefix in ("/nan", "/exit")]
        try:
            for device in devices:
                got = _infer(device.url, images[:40])
                degraded = np.array(got["degraded"])
                assert degraded.any() and set(got["exit"][degraded]) == {0}
        finally:
            for device in devices:
                device.stop()
    for device in devices:
        assert "out of range" in device.log and "Traceback" not in device.log, device.log[-2000:]


def test_a_relay_refuses_a_chunked_body_past_its_limit_as_it_arrives():
    """A body with no Content-Length (chunked) was read whole, however long, and passed on."""
    import httpx
    relay = Tier(None, "--relay", "--next", "http://127.0.0.1:9", "--tier", "edge", "--max-body-mb", "1")
    try:
        chunks = (b"\0" * 2**16 for _ in range(40))  # 2.5 MiB; the next tier is down: passed on, it was a 502
        response = httpx.post(f"{relay.url}/v2/tiers/features", content=chunks, timeout=60)
        assert response.status_code == 413 and "over the limit of 1048576 bytes" in response.json()["error"]
        assert httpx.get(f"{relay.url}/v2/health/ready", timeout=10).status_code == 200
    finally:
        relay.stop()


def test_a_relay_passes_the_path_on_as_it_came_and_answers_its_own_refusals_in_one_line_json():
    """The relay passed the decoded path on: a %2F went on as a /, a %20 failed in http.client (a 502 blamed on the
    next tier), a non-ASCII one raised (500, text/plain); its own 405 was FastAPI's {"detail": ...}."""
    import httpx
    with fake_next_tier(lambda path, body: json.dumps({"path": path}).encode()) as next_url:
        relay = Tier(None, "--relay", "--next", next_url, "--tier", "edge")
        try:
            with httpx.Client(base_url=relay.url, timeout=30) as client:
                for path in ("/v2/models/a%2Fb/infer", "/v2/models/a%20b/infer",
                             "/v2/models/caf%C3%A9/infer?q=%C3%A9"):
                    response = client.get(path)
                    assert response.status_code == 200 and response.json() == {"path": path}, (path, response.text)
                refused = client.delete("/v2/models/m/infer")
                assert refused.status_code == 405 and refused.json() == {"error": "Method Not Allowed"}
        finally:
            relay.stop()
    assert "Traceback" not in relay.log, relay.log[-2000:]

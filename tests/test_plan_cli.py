"""`exitwise plan` on a tiny study and its ONNX export: the reach shares, feature sizes and wire costs it plans from."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from exitwise.api import export, plan_tiers
from exitwise.cli import main
from exitwise.deploy.measure import measure_wire
from exitwise.deploy.plan import Link, Tier, parse_tier
from exitwise.early_exit import EarlyExitModel
from exitwise.study.logits_cache import ExitLogits, save_logits
from exitwise.study.results import Measurements
from exitwise.models import create_model
from exitwise.deploy.onnx_runtime import OnnxEarlyExit
from exitwise.policies import get_policy
from exitwise.runtime import all_exit_logits, prepare

from conftest import random_image_set

TIERS = ["--tier", "device:speed=0.25", "--tier", "cloud", "--link", "device-cloud:mbps=20,rtt-ms=40"]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A study folder (early_exit.json, logits.safetensors with made-up stage times) of a random-weight
    digits-convnet whose thresholds let about a third of the validation images out at each side exit, its
    export, and its validation images as PNG files."""
    torch.manual_seed(0)
    net, policy = create_model("digits-convnet"), get_policy("entropy")
    val = random_image_set(300, seed=1)
    logits = all_exit_logits(prepare(net), val).logits
    scores = policy.scores(torch.from_numpy(logits)).numpy()
    thresholds = [float(np.quantile(scores[0], 0.33)), float(np.quantile(scores[1], 0.5))]
    out = tmp_path_factory.mktemp("plan-study")
    EarlyExitModel(net, policy, np.array(thresholds), "digits-convnet", tuple("0123456789")).save(out / "study")
    save_logits(ExitLogits(logits, val.labels.numpy(), logits.copy(), val.labels.numpy().copy(), np.array([1, 2, 3]),
                           np.array([1e-4, 2e-4, 4e-4]), Measurements()), out / "study" / "logits.safetensors")
    export(out / "onnx", source=out / "study")
    (out / "images").mkdir()
    for i, pixels in enumerate(val.images.numpy()):
        Image.fromarray(pixels[:, :, 0]).save(out / "images" / f"{i:03d}.png")
    return out, val, scores, thresholds


def test_plan_from_a_study_and_its_export(study, capsys):
    out, val, scores, thresholds = study
    assert main(["plan", "--from", str(out / "study"), "--export", str(out / "onnx"), *TIERS,
                 "--images", str(out / "images"), "--out", str(out / "plan.json")]) == 0
    doc = json.loads((out / "plan.json").read_text())
    runner = OnnxEarlyExit.load(out / "onnx")
    shares = np.bincount(runner.run(val.images.numpy()).exits, minlength=3)
    reach = shares[::-1].cumsum()[::-1] / len(val.images)
    assert np.allclose(doc["costs"]["reach"], reach, atol=2 / 300)  # the export's run, but for borderline scores
    assert doc["costs"]["feature_values"] == [int(np.prod(g.output_shape[1:])) for g in runner.manifest.stages[:2]]
    assert doc["costs"]["input_bytes"] == 64 and len(doc["candidates"]) == 4
    assert set(doc["costs"]["wire"]["disagreement"]) == {"fp16", "int8"}
    assert doc["choice"] == doc["candidates"][doc["chosen"]]
    table = capsys.readouterr().out
    assert table.count("\n*") == 1 and "written:" in table


def test_the_feature_sizes_from_the_model_equal_the_exports(study):
    out = study[0]
    args = ["plan", "--from", str(out / "study"), *TIERS]
    assert main([*args, "--out", str(out / "a.json")]) == 0
    assert main([*args, "--export", str(out / "onnx"), "--out", str(out / "b.json")]) == 0
    a, b = (json.loads((out / f).read_text())["costs"] for f in ("a.json", "b.json"))
    assert a["feature_values"] == b["feature_values"] and a["input_bytes"] == b["input_bytes"]


def test_the_python_api_plans_what_the_command_writes(study, tmp_path):
    out = study[0]
    made = plan_tiers(out / "study", [Tier("device", 0.25), Tier("cloud")], [Link("device", "cloud", 20, 40)],
                      export=out / "onnx")
    assert main(["plan", "--from", str(out / "study"), "--export", str(out / "onnx"), *TIERS,
                 "--out", str(tmp_path / "p.json")]) == 0
    assert json.loads(json.dumps(made.to_json())) == json.loads((tmp_path / "p.json").read_text())


def test_fp32_on_the_wire_changes_nothing_and_int8_little(study):
    out, val = study[0], study[1]
    cost = measure_wire(OnnxEarlyExit.load(out / "onnx"), val.images.numpy(), ("fp32", "fp16", "int8"),
                        labels=val.labels.numpy())
    assert cost.disagreement["fp32"] == (0.0, 0.0) and cost.accuracy_change_points["fp32"] == (0.0, 0.0)
    assert max(cost.disagreement["fp16"]) <= 0.02 and max(cost.disagreement["int8"]) <= 0.1


@pytest.mark.parametrize("extra,message", [
    (["--tier", "edge:speed=x"], "not a number"),
    (["--link", "device-edge:mbps=1,rtt-ms=1"], "no tier named 'edge'"),
    (["--minimize", "cost"], "latency or traffic"),
    (["--images", "nowhere"], "give --export too"),
    (["--max-latency-ms", "0"], "--max-latency-ms must be positive, got 0"),
    (["--max-latency-ms", "nan"], "--max-latency-ms must be positive, got nan"),
])
def test_bad_tiers_and_links_exit_2_in_one_line(study, tmp_path, capsys, extra, message):
    out = study[0]
    assert main(["plan", "--from", str(out / "study"), *TIERS, *extra, "--out", str(tmp_path / "p.json")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not (tmp_path / "p.json").exists()


def test_a_missing_link_exits_2(study, tmp_path, capsys):
    out = study[0]
    assert main(["plan", "--from", str(out / "study"), "--tier", "device", "--tier", "cloud",
                 "--out", str(tmp_path / "p.json")]) == 2
    assert "no link device-cloud" in capsys.readouterr().err


def test_measure_prints_this_machines_stage_times_and_request_costs_as_a_tiers_options(study, capsys):
    for module in ("fastapi", "uvicorn", "prometheus_client"):  # the serve extra: it times a request too
        pytest.importorskip(module)
    out = study[0]
    assert main(["plan", "--measure", "--export", str(out / "onnx")]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("stage-ms=")
    tier = parse_tier(f"edge:{line}")
    assert len(tier.stage_seconds) == 3 and all(s > 0 for s in tier.stage_seconds) and tier.request_seconds > 0
    assert ",relay-ms=" in line  # a relay's own time (a hop more than straight to the server: 0 or more)


def test_measure_with_a_certificate_times_the_request_over_tls_as_the_tier_will_serve_it(study, tmp_path, capsys,
                                                                                           monkeypatch):
    for module in ("fastapi", "uvicorn", "prometheus_client", "cryptography"):
        pytest.importorskip(module)
    import exitwise.deploy.connections as connections
    from conftest import self_signed
    cert, key = self_signed(tmp_path / "tls")
    connect, spoken = connections.connect, []
    monkeypatch.setattr(connections, "connect", lambda url, *args: spoken.append(url.tls) or connect(url, *args))
    export = str(study[0] / "onnx")
    assert main(["plan", "--measure", "--export", export, "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]) == 0
    tier = parse_tier(f"edge:{capsys.readouterr().out.strip()}")
    assert tier.request_seconds > 0 and True in spoken  # a TLS client got its answers: the server spoke TLS
    for args, message in ((["--measure", "--export", export, "--ssl-certfile", str(cert)], "go together"),
                          ([*TIERS, "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)], "go with --measure")):
        assert main(["plan", *args]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_measure_needs_an_export_and_planning_needs_a_study_tiers_and_out(study, tmp_path, capsys):
    assert main(["plan", "--measure"]) == 2
    assert "give --export" in capsys.readouterr().err
    assert main(["plan", *TIERS, "--out", str(tmp_path / "p.json")]) == 2
    assert "needs --from" in capsys.readouterr().err


def test_options_that_would_be_silently_ignored_or_meaningless_are_refused_in_one_line(study, tmp_path, capsys):
    out = ["--from", str(study[0] / "study"), "--out", str(tmp_path / "p.json")]
    for args, message in (([*TIERS, *out, "--measure-batch", "8"], "--measure-batch, --ssl-certfile and --ssl-keyfile "
                                                                     "go with --measure"),
                          ([*TIERS, *out, "--wire-tolerance", "-1", "--export", str(study[0] / "onnx"),
                            "--images", str(study[0] / "images")], "--wire-tolerance is in percentage points"),
                          ([*TIERS, *out, "--wire-tolerance", "101", "--export", str(study[0] / "onnx"),
                            "--images", str(study[0] / "images")], "0-100, got 101"),
                          ([*TIERS, *out, "--wire-tolerance", "0.5"], "--wire-tolerance goes with --images"),
                          (["--measure", "--export", str(study[0] / "onnx"), *TIERS, *out],  # before: timed, printed,
                           "drop --from, --tier, --link, --out (they plan)")):  # no plan and no --out written
        assert main(["plan", *args]) == 2, args
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "p.json").exists()


def test_an_export_of_other_weights_than_the_studys_is_refused_in_one_line(study, tmp_path, capsys):
    """Its thresholds on the study's logits would predict exit shares the served network never gives."""
    from exitwise.deploy.manifest import read_manifest
    from exitwise.refs import ModelRef
    from exitwise.study.logits_cache import load_logits
    out, cached = study[0], load_logits(study[0] / "study")
    served = read_manifest(out / "onnx").source_weights_sha256
    for sha256, status in (("0" * 64, 2), (served, 0)):
        ran = ModelRef("digits-convnet", "w.safetensors", sha256, False, 3)
        save_logits(ExitLogits(cached.val_logits, cached.val_labels, cached.test_logits, cached.test_labels,
                               cached.exit_macs, cached.stage_seconds_per_sample, Measurements(model=ran)),
                    tmp_path / "logits.safetensors")
        assert main(["plan", "--from", str(tmp_path), "--export", str(out / "onnx"), *TIERS,
                     "--out", str(tmp_path / "p.json")]) == status
        err = capsys.readouterr().err
        assert status == 0 or ("is of other weights than the study" in err and err.count("\n") == 1), err
    assert (tmp_path / "p.json").is_file()

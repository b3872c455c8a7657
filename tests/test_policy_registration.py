"""A new exit policy is one `register_policy` call: the study's arrays, the torch runtime, the export and the ONNX
runner all take it by name; one without a numpy twin is refused by `export` up front, in one line."""
import numpy as np
import pytest
import torch

from conftest import random_image_set
from exitwise import exit_rule, policies
from exitwise.cli import main
from exitwise.early_exit import EarlyExitModel
from exitwise.exit_rule import NumpyScore
from exitwise.models import create_model
from exitwise.policies import ExitPolicy, exit_arrays, register_policy
from exitwise.runtime import all_exit_logits, prepare, run_early_exit

pytest.importorskip("onnxruntime")


def logit_gap(logits: torch.Tensor) -> torch.Tensor:
    """-(top logit - second logit): lower is more confident."""
    top2 = logits.float().topk(2, dim=-1).values
    return top2[..., 1] - top2[..., 0]


def logit_gap_numpy(logits: np.ndarray) -> np.ndarray:
    top2 = np.sort(logits, -1)[:, -2:]
    return top2[:, 0] - top2[:, 1]


@pytest.fixture
def registries():
    """Registrations made in a test are undone after it."""
    saved = [(registry, dict(registry)) for registry in (policies.POLICIES, exit_rule.SCORES)]
    yield
    for registry, before in saved:
        registry.clear()
        registry.update(before)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return create_model("digits-convnet"), random_image_set(300, seed=2)


def test_a_new_policy_runs_in_the_study_the_runtime_and_onnx_after_one_registration(registries, model, tmp_path):
    net, data = model
    register_policy(ExitPolicy("logit-gap", logit_gap, lambda c: 0.0, "-(logit lead)",
                               "leave when the top logit leads the second by >= -t",
                               numpy=NumpyScore("logit-gap", logit_gap_numpy)))
    logits = all_exit_logits(prepare(net), data).logits
    scores = exit_arrays(logits, data.labels.numpy(), "logit-gap").scores  # the study's arrays
    thresholds = [float(np.quantile(scores[k], 0.3)) for k in range(2)]
    early_exit = EarlyExitModel.create(net, "digits-convnet", "logit-gap", thresholds)
    torch_run = run_early_exit(prepare(net), data, early_exit.thresholds, early_exit.policy)
    assert set(torch_run.exits) == {0, 1, 2}
    early_exit.save(tmp_path / "model")
    assert main(["export", "--from", str(tmp_path / "model"), "--out", str(tmp_path / "onnx"),
                 "--exporter", "torchscript", "--micro-batch", "32"]) == 0
    from exitwise.deploy.onnx_runtime import OnnxEarlyExit
    runner = OnnxEarlyExit.load(tmp_path / "onnx")
    assert runner.manifest.policy == "logit-gap" and runner.micro_batch == 32
    onnx_run = runner.run(data.images.numpy())
    near = (np.abs(scores[:-1] - np.asarray(thresholds)[:, None]) <= 1e-5).any(0)  # may go either way
    assert ((onnx_run.exits == torch_run.exits) | near).all()


def test_a_policy_without_a_numpy_score_is_refused_by_export_up_front(registries, model, tmp_path, capsys):
    net, _ = model
    register_policy(ExitPolicy("torch-only", logit_gap, lambda c: 0.0, "-(logit lead)", "as logit-gap"))
    EarlyExitModel.create(net, "digits-convnet", "torch-only", [-1.0, -1.0]).save(tmp_path / "model")
    code = main(["export", "--from", str(tmp_path / "model"), "--out", str(tmp_path / "onnx")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "no numpy score" in err
    assert not (tmp_path / "onnx").exists()


def test_the_export_records_the_micro_batch_measured_here_and_the_runner_uses_it(model, tmp_path):
    net, data = model
    EarlyExitModel.create(net, "digits-convnet", "entropy", [0.5, 0.5]).save(tmp_path / "model")
    assert main(["export", "--from", str(tmp_path / "model"), "--out", str(tmp_path / "onnx"),
                 "--exporter", "torchscript"]) == 0
    from exitwise.deploy.onnx_runtime import OnnxEarlyExit
    runner = OnnxEarlyExit.load(tmp_path / "onnx")
    probe = runner.manifest.micro_batch_probe
    assert runner.micro_batch == runner.manifest.micro_batch == probe.micro_batch
    assert str(runner.micro_batch) in probe.ms_per_image and probe.precision == "fp32"


def test_register_policy_given_a_bare_score_function_says_it_takes_an_exit_policy(registries):
    with pytest.raises(TypeError, match="register_policy takes an ExitPolicy .*, got function"):
        register_policy(logit_gap)
    assert "logit-gap" not in policies.POLICIES

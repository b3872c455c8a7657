"""Real early exit must make exactly the decisions the cached all-exit logits predict."""
import numpy as np
import pytest
import torch

from exitwise.study import analysis
from exitwise.models import create_model
from exitwise.policies import entropy, get_policy
from exitwise.config import DEFAULT_MICRO_BATCH as MICRO_BATCH
from exitwise.runtime import fold_batch_norms, all_exit_logits, prepare, run_backbone, run_early_exit

from conftest import random_image_set


def test_entropy_is_zero_for_certain_and_ln_c_for_uniform():
    logits = torch.tensor([[100.0, 0, 0, 0], [1.0, 1, 1, 1]])
    torch.testing.assert_close(entropy(logits), torch.tensor([0.0, np.log(4)], dtype=torch.float32))


@pytest.mark.parametrize("batch_size", [7, 64, 256])  # 256: survivors of several micro-batches run together
def test_compaction_gives_the_same_exits_and_predictions_as_all_logits_plus_the_rule(batch_size):
    torch.manual_seed(0)
    model = prepare(create_model("digits-convnet"))
    data = random_image_set(300)
    policy = get_policy("entropy")
    full = all_exit_logits(model, data, batch_size=batch_size)
    scores = policy.scores(torch.from_numpy(full.logits)).numpy()
    for thresholds in (np.quantile(scores[:-1], 0.3, axis=1), np.array([2.0, -np.inf]), np.full(2, np.inf)):
        run = run_early_exit(model, data, thresholds, policy, batch_size=batch_size)
        expected_exits = analysis.exit_points(scores, thresholds)
        assert (run.exits == expected_exits).all()
        assert (run.predictions == full.logits[expected_exits, np.arange(len(data))].argmax(-1)).all()
        assert len(run.stage_seconds) == model.num_exits


def test_all_exit_logits_match_the_models_forward():
    torch.manual_seed(0)
    model = prepare(create_model("digits-convnet"))
    data = random_image_set(50)
    run = all_exit_logits(model, data, batch_size=16)
    images = next(data.batches(50))[0]
    with torch.no_grad():
        expected = torch.stack(model(images)).numpy()
    np.testing.assert_allclose(run.logits, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("precision", ["bf16", "mixed", "fp32"])
def test_every_precision_runs_every_path_and_stays_close_to_fp32(precision):
    torch.manual_seed(0)
    model = create_model("seed-branchynet")
    data = random_image_set(40, shape=(32, 32, 3))
    exact = all_exit_logits(prepare(model, "fp32"), data, batch_size=16).logits
    model = prepare(model, precision)
    run = all_exit_logits(model, data, batch_size=16)
    assert run.logits.dtype == np.float32
    np.testing.assert_allclose(run.logits, exact, atol=0.25, rtol=0.1)
    policy = get_policy("entropy")  # thresholds that let about a fifth out at each side exit: every path runs
    scores = policy.scores(torch.from_numpy(run.logits)).numpy()
    thresholds = [float(np.quantile(scores[k], 0.2)) for k in range(5)]
    early = run_early_exit(model, data, np.array(thresholds), policy, batch_size=16)
    assert len(set(early.exits.tolist())) >= 4
    # where the rule on the all-exits logits puts them (bf16 may move a sample on a threshold's edge: compaction
    # changes its batch's shapes)
    assert (early.exits == analysis.exit_points(scores, thresholds)).mean() >= 0.9


@pytest.mark.parametrize("negative_scale, folded", [(False, True), (True, False)])
def test_a_batch_norm_after_max_pool_is_folded_only_where_every_scale_is_positive(negative_scale, folded):
    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.MaxPool2d(2), torch.nn.BatchNorm2d(8))
    bn = block[2]
    bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2.0), bn.weight.data.uniform_(0.5, 2)
    if negative_scale:  # max(-x) != -max(x): this one cannot move before the pool
        bn.weight.data[3] = -1.0
    block.eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        expected = block(x)
        fold_batch_norms(block)
        assert any(isinstance(m, torch.nn.BatchNorm2d) for m in block) != folded
        torch.testing.assert_close(block(x), expected, rtol=1e-4, atol=1e-5)


def test_prepare_folds_batch_norms_and_micro_batches_without_changing_the_fp32_logits():
    torch.manual_seed(0)
    model = create_model("b-resnet11").eval()  # convs followed by batch norms, the ones folded
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # non-trivial statistics, so a wrong fold would show
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0), m.weight.data.uniform_(-2, 2)
    data = random_image_set(MICRO_BATCH + 9, shape=(32, 32, 3))  # one full micro-batch and a remainder
    prepared = prepare(model, "fp32")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in prepared.stages[2].modules())  # a residual block
    images = next(data.batches(len(data)))[0]
    with torch.no_grad():
        expected = torch.stack(model(images)).numpy()
    run = all_exit_logits(prepared, data, batch_size=len(data))
    np.testing.assert_allclose(run.logits, expected, rtol=1e-3, atol=1e-4)
    assert (run_backbone(prepared, data, batch_size=len(data)).predictions == expected[-1].argmax(-1)).all()
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # the original is untouched

"""Exit policies: their meaning on hand-made logits, real early exit equal to the analysis, temperatures."""
import numpy as np
import pytest
import torch
from torch import nn

from exitwise.study import analysis, calibration
from exitwise.errors import UserError
from exitwise.models import create_model
from exitwise.models.base import MultiExitNetwork
from exitwise.policies import get_policy
from exitwise.runtime import all_exit_logits, prepare, run_early_exit

from conftest import random_image_set


def probabilities_to_logits(p) -> torch.Tensor:
    return torch.tensor(p, dtype=torch.float64).log().float()


def test_max_prob_and_margin_thresholds_mean_what_the_docs_say():
    logits = probabilities_to_logits([[0.95, 0.04, 0.01], [0.5, 0.3, 0.2], [0.45, 0.45, 0.1]])
    max_prob = get_policy("max-prob").score(logits)
    margin = get_policy("margin").score(logits)
    torch.testing.assert_close(max_prob, torch.tensor([0.05, 0.5, 0.55]))
    torch.testing.assert_close(margin, torch.tensor([0.09, 0.8, 1.0]))
    assert (max_prob <= 0.1).tolist() == [True, False, False]  # threshold 0.1: leave when max prob >= 0.9


def test_confident_scores_keep_their_precision():
    logits = torch.tensor([[30.0, 0.0], [40.0, 0.0]])
    s = get_policy("max-prob").score(logits)
    assert 0 < s[1] < s[0] < 1e-12  # 1 - p in float32 would be 0 for both


@pytest.mark.parametrize("name", ["entropy", "max-prob", "margin", "patience"])
def test_scores_of_all_exits_at_once_equal_the_runtimes_step_by_step_scores_bit_for_bit(name):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 3000, 10, generator=g) * torch.tensor([0.5, 1.0, 2.0, 4.0, 8.0])[:, None, None]
    for policy in (get_policy(name), get_policy(name).with_temperatures([0.7, 1.3, 2.9, 0.4, 1.0])):
        for z in (logits, logits.double()):
            state, expected = policy.init_state(z.shape[1]), []
            for k in range(len(z)):
                s, state = policy.step(k, z[k], state)
                expected.append(s)
            assert torch.equal(policy.scores(z), torch.stack(expected))


def test_patience_counts_agreeing_exits_in_a_row():
    # predictions at 4 exits: sample 0: 1 1 1 2, sample 1: 0 2 2 2, sample 2: 3 3 0 0
    predictions = torch.tensor([[1, 0, 3], [1, 2, 3], [1, 2, 0], [2, 2, 0]])
    logits = torch.nn.functional.one_hot(predictions, 4).float() * 5
    scores = get_policy("patience").scores(logits)
    assert scores.tolist() == [[0, 0, 0], [-1, 0, -1], [-2, -1, 0], [0, -2, -1]]
    # threshold -1 (patience 1): leave once 2 exits in a row agree
    assert analysis.exit_points(scores.numpy(), np.full(3, -1.0)).tolist() == [1, 2, 1]
    # threshold -2 (patience 2): 3 in a row; sample 2 never gets there and takes the final exit
    assert analysis.exit_points(scores.numpy(), np.full(3, -2.0)).tolist() == [2, 3, 3]
    assert analysis.exit_points(scores.numpy(), np.zeros(3)).tolist() == [0, 0, 0]  # 0: everyone leaves first


@pytest.fixture(scope="module")
def convnet():
    """The small untrained digits model, random images and every exit's logits on them."""
    torch.manual_seed(0)
    model = prepare(create_model("digits-convnet"))
    data = random_image_set(150, seed=3)
    return model, data, all_exit_logits(model, data, batch_size=16).logits


def agreeing_net() -> MultiExitNetwork:
    """Five linear exits on the raw pixels, each a noisy copy of one classifier: they often agree, not always."""
    torch.manual_seed(0)
    shared = torch.randn(4, 64)
    heads = [nn.Linear(64, 4) for _ in range(5)]
    with torch.no_grad():
        for head in heads:
            head.weight.copy_(shared + 0.7 * torch.randn(4, 64))
            head.bias.copy_(-0.5 * head.weight.sum(1))  # pixels are in [0, 1]: centre them
    return prepare(MultiExitNetwork([nn.Flatten()] + [nn.Identity()] * 4, heads, 4, (1, 8, 8)))


def between_scores(scores: np.ndarray, q: float) -> np.ndarray:
    """Per exit, a threshold halfway between two neighbouring scores near quantile q: no sample sits on it,
    so float noise of a different batch composition (last-bit differences) cannot flip a decision."""
    ordered = np.sort(scores, axis=1)
    i = int(q * (scores.shape[1] - 1))
    return (ordered[:, i] + ordered[:, i + 1]) / 2


def check_runtime_equals_analysis(model, data, logits, policy, settings) -> None:
    scores = policy.scores(torch.from_numpy(logits)).numpy()
    for thresholds in settings:
        expected = analysis.exit_points(scores, thresholds)
        last = len(logits) - 1
        assert (expected < last).any() and (expected == last).any()  # some leave early, some run on (compaction)
        run = run_early_exit(model, data, thresholds, policy, batch_size=16)
        assert (run.exits == expected).all()
        assert (run.predictions == logits[expected, np.arange(len(data))].argmax(-1)).all()


@pytest.mark.parametrize("name", ["entropy", "max-prob", "margin"])
def test_real_early_exit_makes_the_decisions_the_analysis_predicts(convnet, name):
    model, data, logits = convnet
    # temperatures are part of the policy, in the analysis and the runtime alike (fitted ones would sit at
    # the cap on this untrained net, squeezing every score into a few float32 steps: decisions on ties)
    policy = get_policy(name).with_temperatures([0.05, 0.1, 1.0])
    scores = policy.scores(torch.from_numpy(logits)).numpy()
    check_runtime_equals_analysis(model, data, logits, policy, [
        between_scores(scores[:-1], 0.4), np.array([-np.inf, np.median(scores[1])])])


def test_real_early_exit_with_patience_carries_each_samples_history_through_compaction():
    model, data = agreeing_net(), random_image_set(150, num_classes=4, seed=3)
    logits = all_exit_logits(model, data, batch_size=16).logits
    settings = [np.full(4, -1.0), np.array([-np.inf, -np.inf, -2.0, -1.0]), np.array([-1.0, -1.0, -2.0, -3.0])]
    check_runtime_equals_analysis(model, data, logits, get_policy("patience"), settings)


def test_temperature_scaling_repairs_overconfident_and_underconfident_exits():
    g = torch.Generator().manual_seed(0)
    true_logits = 2 * torch.randn(4000, 10, generator=g)
    labels = torch.distributions.Categorical(logits=true_logits).sample()
    logits = torch.stack([3.0 * true_logits, 0.5 * true_logits]).numpy()  # an over- and an underconfident exit
    t = calibration.fit_temperatures(logits, labels.numpy())
    np.testing.assert_allclose(t, [3.0, 0.5], rtol=0.1)
    for row in calibration.temperature_report(logits, labels.numpy(), t):
        assert row.nll_after < row.nll_before and row.ece_after < row.ece_before
        assert row.ece_after < 0.03


def test_ece_is_zero_when_confidence_matches_accuracy():
    logits = probabilities_to_logits([[0.75, 0.25]] * 4).numpy()
    assert calibration.expected_calibration_error(logits, np.array([0, 0, 0, 1])) == pytest.approx(0.0, abs=1e-7)
    assert calibration.expected_calibration_error(logits, np.array([1, 1, 1, 1])) == pytest.approx(0.75)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_logits_are_refused(bad):
    logits = torch.zeros(3, 5, 4)
    logits[1, 2, 0] = bad
    with pytest.raises(UserError, match="NaN or infinite"):
        get_policy("entropy").scores(logits)
    with pytest.raises(UserError, match="NaN or infinite"):
        calibration.fit_temperatures(logits.numpy(), np.zeros(5, dtype=np.int64))


def test_bad_policy_inputs_are_user_errors():
    with pytest.raises(UserError):
        get_policy("nope")
    with pytest.raises(UserError):
        get_policy("entropy").with_temperatures([1.0, 0.0])
    with pytest.raises(UserError):
        get_policy("entropy").with_temperatures([1.0, 2.0]).scores(torch.zeros(3, 2, 4))
    model = prepare(create_model("digits-convnet"))
    with pytest.raises(UserError):
        run_early_exit(model, random_image_set(4), [0.1], get_policy("margin"))

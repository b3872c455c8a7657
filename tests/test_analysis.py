"""The exit rule and the metrics, on small hand-made score tables."""
import numpy as np
import pytest

from exitwise.study import analysis
from exitwise.errors import UserError

# 3 exits x 4 samples; lower score = more confident
SCORES = np.array([[0.1, 0.9, 0.5, 2.0],
                   [0.0, 0.2, 0.7, 2.0],
                   [0.0, 0.0, 0.0, 0.0]])
CORRECT = np.array([[1, 0, 1, 0],
                     [1, 1, 0, 0],
                     [1, 1, 1, 0]], dtype=bool)
MACS = [10, 30, 100]


def test_sample_leaves_at_first_exit_at_or_below_its_threshold():
    exits = analysis.exit_points(SCORES, np.array([0.5, 0.2]))
    assert exits.tolist() == [0, 1, 0, 2]  # 0.5 <= 0.5 leaves (at or below), 0.7 > 0.2 goes on


def test_minus_infinity_never_leaves_and_final_exit_takes_the_rest():
    assert analysis.exit_points(SCORES, np.array([-np.inf, -np.inf])).tolist() == [2, 2, 2, 2]


def test_evaluate_weights_accuracy_by_samples_leaving_each_exit():
    r = analysis.evaluate(SCORES, CORRECT, np.array([0.5, 0.2]), MACS, stage_seconds_per_sample=[1.0, 2.0, 4.0])
    assert r.exit_counts == (2, 1, 1)
    assert r.exit_accuracy == (1.0, 1.0, 0.0)
    assert r.accuracy == pytest.approx(3 / 4)
    assert r.exit_shares == (0.5, 0.25, 0.25)
    assert r.mean_cost == pytest.approx((10 + 30 + 10 + 100) / 4)
    # 4 samples run stage 0, 2 run stage 1, 1 runs stage 2
    assert r.predicted_seconds == pytest.approx(4 * 1.0 + 2 * 2.0 + 1 * 4.0)


def test_reach_counts():
    assert analysis.reach_counts(np.array([0, 1, 0, 2]), 3).tolist() == [4, 2, 1]


def test_oracle_takes_first_correct_exit_and_pays_full_network_when_wrong_everywhere():
    r = analysis.oracle(CORRECT, MACS)
    assert r.accuracy == pytest.approx(3 / 4)
    assert r.cost == pytest.approx((10 + 30 + 10 + 100) / 4)


def test_sweep_is_monotone_in_exit_shares_of_the_final_exit():
    rng = np.random.default_rng(0)
    scores = rng.uniform(0, 2.3, size=(4, 500))
    correct = rng.uniform(size=(4, 500)) < 0.7
    rows = analysis.sweep(scores, correct, np.linspace(0, 2.3, 20), [1, 2, 3, 4])
    finals = [r.exit_shares[-1] for r in rows]
    assert finals[0] == 1.0 and finals[-1] == 0.0
    assert all(a >= b for a, b in zip(finals, finals[1:]))
    assert all(sum(r.exit_shares) == pytest.approx(1.0) for r in rows)


def test_thresholds_json_round_trip_keeps_never_as_none():
    thr = analysis.as_thresholds([None, 0.3], 3)
    assert np.isneginf(thr[0]) and analysis.thresholds_to_json(thr) == [None, 0.3]


@pytest.mark.parametrize("bad", [[0.1], [0.1, 0.2, 0.3], [float("nan"), 0.1]])
def test_bad_thresholds_are_refused(bad):
    with pytest.raises(UserError):
        analysis.as_thresholds(bad, 3)


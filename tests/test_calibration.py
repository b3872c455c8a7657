"""Both calibration methods on small generated tables."""
import numpy as np
import pytest

from exitwise.study import analysis, calibration
from exitwise.errors import UserError


def test_largest_accurate_threshold_is_the_largest_cut_with_enough_accuracy():
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.5])
    correct = np.array([1, 1, 0, 1, 0], dtype=bool)
    # leavers at t=0.2: 2/2, t=0.3: 2/3, t=0.4: 3/4, t=0.5: 3/5
    assert calibration.largest_accurate_threshold(scores, correct, 0.75) == 0.4
    assert calibration.largest_accurate_threshold(scores, correct, 0.6) == 0.5
    assert calibration.largest_accurate_threshold(scores, correct, 1.0) == 0.2


def test_ties_leave_together_so_a_tie_cannot_sneak_below_target():
    scores = np.array([0.1, 0.2, 0.2])
    correct = np.array([1, 1, 0], dtype=bool)
    # t=0.2 lets both 0.2 samples out: 2/3 accurate; only t=0.1 gives 100%
    assert calibration.largest_accurate_threshold(scores, correct, 0.9) == 0.1


def test_no_threshold_reaches_target_means_never_leave():
    assert np.isneginf(calibration.largest_accurate_threshold(np.array([0.1, 0.2]), np.array([0, 0], bool), 0.5))


def test_per_exit_leavers_meet_the_target_on_the_split_they_were_chosen_on():
    rng = np.random.default_rng(1)
    k, n = 4, 3000
    scores = rng.uniform(0, 2.3, size=(k, n))
    # lower score -> more likely correct, better at later exits
    correct = rng.uniform(size=(k, n)) < (1 - scores / 2.3 * 0.6 + 0.1 * np.arange(k)[:, None]).clip(0, 1)
    for desired in (0.6, 0.75, 0.9):
        thr = calibration.per_exit(scores, correct, desired)
        r = analysis.evaluate(scores, correct, thr, [1, 2, 3, 4])
        for acc, count in zip(r.exit_accuracy[:-1], r.exit_counts[:-1]):
            assert count == 0 or acc >= desired


def test_seed_percentile_uses_max_score_when_an_exit_is_accurate_enough_else_the_percentile():
    scores = np.array([np.linspace(0, 1, 101), np.linspace(0, 2, 101), np.zeros(101)])
    correct = np.array([np.ones(101, bool), np.arange(101) < 50, np.ones(101, bool)])
    thr = calibration.seed_percentile(scores, correct, 0.8, max_score=2.3)
    assert thr[0] == 2.3  # exit 0 is 100% accurate: everyone may leave
    assert thr[1] == pytest.approx(np.percentile(scores[1], 20))


@pytest.mark.parametrize("desired", [0.0, -0.1, 1.01, float("nan")])
def test_desired_accuracy_outside_0_1_is_refused(desired):
    with pytest.raises(UserError):
        calibration.per_exit(np.zeros((2, 3)), np.ones((2, 3), bool), desired)

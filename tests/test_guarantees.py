"""Thresholds a user can trust, checked on generated exits whose distribution is known.

A sample's latent difficulty u ~ U(0, 1) drives both its scores (u plus noise: lower = more
confident) and its chance of being right at exit k (1 - u (1 - 0.15 k)); later exits are better.
"""
import numpy as np
import pytest

from exitwise.study.results import NEVER
from exitwise.study import analysis, calibration
from exitwise.errors import UserError

COSTS = np.array([1.0, 2.0, 3.0, 4.0])  # cumulative cost of leaving at each exit


def generate(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(scores, correct), each (4, n)."""
    u = rng.uniform(size=n)
    k = np.arange(4)[:, None]
    scores = u + 0.2 * rng.normal(size=(4, n))
    correct = rng.uniform(size=(4, n)) < 1 - u * (1 - 0.15 * k)
    return scores, correct


def accuracy_and_cost(scores, correct, thresholds) -> tuple[float, float]:
    r = analysis.evaluate(scores, correct, analysis.as_thresholds(thresholds, len(COSTS)), COSTS)
    return r.accuracy, r.mean_cost


def best_shared_cutoff_cost(scores, correct, target) -> float:
    """Exhaustive: the cost of every distinct shared cutoff (one per observed side-exit score) meeting the target."""
    costs = [r.mean_cost for r in analysis.sweep(scores, correct, np.unique(scores[:-1]), COSTS)
             if r.accuracy >= target]
    return min(costs)


@pytest.mark.parametrize("target", [0.6, 0.68, 0.72])
def test_empirical_meets_its_target_on_the_split_it_saw_and_beats_every_shared_cutoff(target):
    scores, correct = generate(2000, np.random.default_rng(0))
    r = calibration.empirical_thresholds(scores, correct, COSTS, target)
    assert r.status == "ok"
    accuracy, cost = accuracy_and_cost(scores, correct, r.thresholds)
    assert accuracy >= target and (accuracy, cost) == (r.accuracy, r.mean_cost)
    assert cost <= best_shared_cutoff_cost(scores, correct, target)
    assert cost >= analysis.oracle_cost_at(correct, COSTS, target)  # nothing beats hindsight


def test_empirical_reports_an_unreachable_target_with_what_is_reachable():
    scores, correct = generate(1000, np.random.default_rng(1))
    r = calibration.empirical_thresholds(scores, correct, COSTS, 0.99)
    assert r.status == "unreachable" and r.thresholds is None
    best = r.closest
    assert r.reachable["max_accuracy"] == best.accuracy < 0.99
    assert accuracy_and_cost(scores, correct, best.thresholds)[0] == best.accuracy
    assert best.accuracy >= correct[-1].mean()  # at least as accurate as no early exit


def test_guaranteed_accuracy_over_a_new_test_set_misses_the_target_at_most_delta_of_the_time():
    """Over 200 draws of (calibration, test) the test accuracy falls below the target in at most delta
    of them (plus Monte Carlo slack), while the empirical method, fitted to its split, misses far more."""
    rng = np.random.default_rng(2)
    target, delta, n, m = 0.66, 0.1, 600, 600
    missed, empirical_missed, costs = 0, 0, []
    for seed in range(200):
        scores, correct = generate(n, rng)
        test_scores, test_correct = generate(m, rng)
        r = calibration.guaranteed_thresholds(scores, correct, COSTS, target, delta, test_size=m, levels=24, seed=seed)
        if r.status == "ok":
            accuracy, cost = accuracy_and_cost(test_scores, test_correct, r.thresholds)
            missed += accuracy < target
            costs.append(cost)
        e = calibration.empirical_thresholds(scores, correct, COSTS, target, levels=24) if seed < 40 else None
        if e is not None:
            empirical_missed += accuracy_and_cost(test_scores, test_correct, e.thresholds)[0] < target
    assert missed / 200 <= delta + 0.04
    assert len(costs) >= 150 and np.mean(costs) < COSTS[-1] - 0.5  # not vacuous: it exits early, a lot
    assert empirical_missed / 40 > 0.25


def test_guaranteed_expected_accuracy_holds_at_the_promised_rate():
    """The expected accuracy (test_size None), measured on 100k fresh samples, is >= target in >= 1 - delta."""
    rng = np.random.default_rng(3)
    population = generate(100_000, rng)
    target, delta = 0.66, 0.2
    missed = 0
    for seed in range(120):
        scores, correct = generate(600, rng)
        r = calibration.guaranteed_thresholds(scores, correct, COSTS, target, delta, levels=24, seed=seed)
        missed += r.status == "ok" and accuracy_and_cost(*population, r.thresholds)[0] < target
    assert missed / 120 <= delta + 0.06


def test_guaranteed_says_what_it_promises_and_reports_an_uncertifiable_target():
    scores, correct = generate(2000, np.random.default_rng(4))
    r = calibration.guaranteed_thresholds(scores, correct, COSTS, 0.65, 0.1, test_size=1000)
    assert r.status == "ok" and r.certifiable_target >= 0.65
    assert "exchangeable" in r.assumption and "1000 new samples" in r.guarantee
    assert r.samples == {"ordering": 1000, "testing": 1000}
    final = correct[-1].mean()
    r = calibration.guaranteed_thresholds(scores, correct, COSTS, final, 0.1)  # no margin left for sampling error
    assert r.status == "unreachable" and r.thresholds is None
    assert r.reachable["max_certifiable_target"] < final
    assert r.closest.thresholds == (NEVER, NEVER, NEVER)


def test_p_values_are_exact_tails():
    # 2 errors of 10 at error rate 0.5: P(Binomial(10, 0.5) <= 2) = 56 / 1024
    assert calibration.accuracy_p_value(2, 10, 0.5) == pytest.approx(56 / 1024)
    # 4 samples, 1 test sample: it misses target 1.0 with c = 1 error; 0 errors among the 3 calibration
    # samples when the 4 hold 1 error: the error is the test sample, chance 1/4
    assert calibration.accuracy_p_value(0, 3, 1.0, test_size=1) == pytest.approx(1 / 4)
    bound = calibration.certifiable_target(20, 100, 0.1)
    assert calibration.accuracy_p_value(20, 100, bound - 1e-6) <= 0.1
    assert calibration.accuracy_p_value(20, 100, bound + 1e-3) > 0.1


def test_relative_target_is_points_below_the_final_exit():
    correct = np.array([[True, False, False, False], [True, True, True, False]])
    assert calibration.relative_target(correct, 5) == pytest.approx(0.70)
    with pytest.raises(UserError):
        calibration.relative_target(correct, 80)
    with pytest.raises(UserError):
        calibration.relative_target(correct, -1)


def test_budget_is_respected_and_more_budget_never_costs_accuracy():
    scores, correct = generate(1500, np.random.default_rng(5))
    previous = 0.0
    for budget in (1.0, 1.5, 2.0, 2.5, 3.0, 4.0):
        r = calibration.budget_thresholds(scores, correct, COSTS, budget)
        accuracy, cost = accuracy_and_cost(scores, correct, r.thresholds)
        assert r.status == "ok" and cost <= budget + 1e-12 and accuracy == r.accuracy >= previous
        previous = accuracy
    assert calibration.budget_thresholds(scores, correct, COSTS, 1.0).exit_shares[0] == 1.0
    with pytest.raises(UserError, match="cheapest exit's cost 1"):
        calibration.budget_thresholds(scores, correct, COSTS, 0.99)


def test_frontier_is_non_dominated_monotone_and_beats_shared_cutoffs_up_to_its_grid():
    scores, correct = generate(1500, np.random.default_rng(6))
    front = calibration.pareto_frontier(scores, correct, COSTS)
    cost = np.array([p.cost for p in front])
    accuracy = np.array([p.accuracy for p in front])
    assert (np.diff(cost) > 0).all() and (np.diff(accuracy) > 0).all()
    for p in front[::10]:
        assert accuracy_and_cost(scores, correct, p.thresholds) == (p.accuracy, p.cost)
    shared = analysis.sweep(scores, correct, np.linspace(-0.5, 1.5, 50), COSTS)
    for s in shared:  # within a shared cutoff's cost the frontier is as accurate, up to its grid of thresholds
        assert accuracy[cost <= s.mean_cost].max() >= s.accuracy - 0.002


def test_oracle_cost_and_overthinking_on_a_hand_made_table():
    correct = np.array([[1, 0, 0, 1],
                        [1, 1, 0, 0],
                        [0, 1, 0, 0]], dtype=bool)
    costs = [1.0, 2.0, 4.0]
    # the oracle: samples 0, 3 at exit 0, sample 1 at exit 1, sample 2 (never right) leaves first
    assert analysis.oracle_cost_at(correct, costs, 0.5) == pytest.approx(1.0)
    assert analysis.oracle_cost_at(correct, costs, 0.75) == pytest.approx((1 + 2 + 1 + 1) / 4)
    assert np.isnan(analysis.oracle_cost_at(correct, costs, 1.0))
    gap = analysis.gap_to_oracle(0.75, 2.0, correct, costs)
    assert gap.extra_macs == pytest.approx(0.75)
    o = analysis.overthinking(correct, costs)  # the full network: everyone runs to exit 2
    assert o.correct_earlier_wrong_final == 2  # samples 0 and 3
    assert o.wasted_macs_per_sample == pytest.approx((3 + 2 + 0 + 3) / 4)
    policy = analysis.overthinking(correct, costs, exits=np.array([0, 2, 2, 1]))
    assert policy.correct_earlier_wrong_at_exit == 1  # sample 3 left at exit 1, wrong, after exit 0 was right
    assert policy.wasted_macs_per_sample == pytest.approx((0 + 2 + 0 + 1) / 4)


@pytest.mark.parametrize("call", [
    lambda s, c: calibration.empirical_thresholds(s, c, COSTS, 0.0),
    lambda s, c: calibration.empirical_thresholds(s, c, COSTS, 1.2),
    lambda s, c: calibration.guaranteed_thresholds(s, c, COSTS, float("nan"), 0.1),
    lambda s, c: calibration.guaranteed_thresholds(s, c, COSTS, 0.7, 0.0),
    lambda s, c: calibration.guaranteed_thresholds(s, c, COSTS, 0.7, 1.0),
    lambda s, c: calibration.guaranteed_thresholds(s, c, COSTS, 0.7, 0.1, test_size=0),
    lambda s, c: calibration.budget_thresholds(s, c, COSTS, float("nan")),
    lambda s, c: calibration.budget_thresholds(s, c, COSTS, 0.5),
    lambda s, c: calibration.empirical_thresholds(s, c, COSTS[:3], 0.7),
    lambda s, c: calibration.empirical_thresholds(s, c, COSTS[::-1], 0.7),
    lambda s, c: analysis.as_thresholds([0.1, 0.2], 4),
], ids=["target 0", "target 1.2", "target nan", "delta 0", "delta 1", "test size 0", "budget nan",
        "budget below cheapest", "costs too short", "costs decreasing", "thresholds too short"])
def test_bad_input_is_a_user_error(call):
    scores, correct = generate(100, np.random.default_rng(7))
    with pytest.raises(UserError):
        call(scores, correct)


def reference_outcome(scores, correct, costs, thresholds) -> tuple[float, float]:
    exits = analysis.exit_points(scores, thresholds)
    return float(costs[exits].mean()), float(correct[exits, np.arange(len(exits))].mean())


def reference_path(scores, correct, costs, levels) -> list[np.ndarray]:
    """`calibration.threshold_path` the slow way: every move evaluated alone."""
    grid = calibration.candidate_thresholds(scores, levels)
    pos, top = np.zeros(len(grid), dtype=int), np.array([len(g) - 1 for g in grid])
    path = [np.array([g[i] for g, i in zip(grid, pos)])]
    cost, accuracy = reference_outcome(scores, correct, costs, path[0])
    while (pos < top).any():
        moves = []
        for k in np.flatnonzero(pos < top):
            p = pos.copy()
            p[k] += 1
            c, a = reference_outcome(scores, correct, costs, np.array([g[i] for g, i in zip(grid, p)]))
            lost, saved = accuracy - a, cost - c
            moves.append((lost / saved if saved > 0 else np.copysign(np.inf, lost) if lost else 0.0, k, c, a))
        _, k, cost, accuracy = min(moves)
        pos[k] += 1
        path.append(np.array([g[i] for g, i in zip(grid, pos)]))
    return path


def reference_starts(scores, correct, costs, levels) -> list[np.ndarray]:
    """The greedy path, then every shared cutoff on the grid."""
    shared = np.unique(np.concatenate(calibration.candidate_thresholds(scores, levels)))
    return reference_path(scores, correct, costs, levels) + [np.full(len(scores) - 1, v) for v in shared]


def reference_search(scores, correct, costs, key, feasible, levels) -> np.ndarray | None:
    """`calibration._search` the slow way: candidates and coordinate descent, one setting at a time."""
    grid = calibration.candidate_thresholds(scores, levels)
    found = [(key(c, a), t) for t in reference_starts(scores, correct, costs, levels)
             for c, a in [reference_outcome(scores, correct, costs, t)] if feasible(c, a)]
    if not found:
        return None
    best, thresholds = min(found, key=lambda f: f[0])
    changed = True
    while changed:
        changed = False
        for k, values in enumerate(grid):
            for v in values:
                trial = thresholds.copy()
                trial[k] = v
                c, a = reference_outcome(scores, correct, costs, trial)
                if feasible(c, a) and key(c, a) < best:
                    best, thresholds, changed = key(c, a), trial, True
    return thresholds


@pytest.mark.parametrize("costs", [COSTS, np.array([0.31, 0.83, 1.47, 2.09])], ids=["whole", "fractional"])
def test_fast_searches_equal_the_slow_one_setting_at_a_time_reference(costs):
    """Bit for bit: batched evaluation, raising one threshold from known exits, and the search space reused
    across calls change no threshold, cost or accuracy."""
    scores, correct = generate(700, np.random.default_rng(8))
    scores = np.round(scores, 1)  # coarse: many exact ties in cost and accuracy, so tie-breaking is checked
    json = lambda t: tuple(t.tolist())  # noqa: E731  (the one form of thresholds: floats, -inf never)
    path = calibration.threshold_path(scores, correct, costs, 24)
    assert len(path) > 40 and all((a == b).all() for a, b in zip(path, reference_path(scores, correct, costs, 24)))
    for target in (0.6, 0.66, 0.7, 0.99):
        r = calibration.empirical_thresholds(scores, correct, costs, target, levels=24)
        slow = reference_search(scores, correct, costs, lambda c, a: (c, -a), lambda c, a: a >= target, 24)
        assert r.thresholds == (None if slow is None else json(slow))
    for budget in (1.3 * costs[0], costs[1], 0.5 * (costs[2] + costs[3])):
        r = calibration.budget_thresholds(scores, correct, costs, budget, levels=24)
        limit = budget * (1 + 1e-12)
        slow = reference_search(scores, correct, costs, lambda c, a: (-a, c), lambda c, a: c <= limit, 24)
        assert r.thresholds == json(slow)
    slow_front = analysis.non_dominated(analysis.cost_accuracy_points(
        scores, correct, costs, reference_starts(scores, correct, costs, 24)))
    assert calibration.pareto_frontier(scores, correct, costs, levels=24) == slow_front
    learn, test = np.split(np.random.default_rng(0).permutation(700), [350])
    slow_path = reference_path(scores[:, learn], correct[:, learn], costs, 24)
    for target in (0.55, 0.6, 0.65, 0.99):
        r = calibration.guaranteed_thresholds(scores, correct, costs, target, 0.1, test_size=500, levels=24)
        assert (r.status == "ok") == (target < 0.9)
        certified = None
        for t in slow_path:
            errors = round(350 * (1 - reference_outcome(scores[:, test], correct[:, test], costs, t)[1]))
            if calibration.accuracy_p_value(errors, 350, target, 500) > 0.1:
                break
            certified = t
        assert r.thresholds == (None if certified is None else json(certified))


def test_p_values_agree_with_exact_rational_arithmetic():
    from fractions import Fraction
    from math import comb

    for x, n, p in [(0, 10, 0.5), (2, 10, 0.5), (30, 300, 0.2), (90, 300, 0.35), (5, 5, 0.0), (3, 40, 0.0)]:
        q = Fraction(p)
        exact = sum(comb(n, k) * q ** k * (1 - q) ** (n - k) for k in range(x + 1))
        assert calibration.binomial_cdf(x, n, p) == pytest.approx(float(exact), rel=1e-10)
    for x, total, marked, draws in [(0, 4, 1, 3), (40, 600, 120, 300), (300, 12500, 1500, 2500), (9, 30, 25, 12)]:
        ways = sum(comb(marked, k) * comb(total - marked, draws - k) for k in range(x + 1))
        exact = Fraction(ways, comb(total, draws))
        assert calibration.hypergeometric_cdf(x, total, marked, draws) == pytest.approx(float(exact), rel=1e-10)


def test_a_search_space_is_reused_only_for_the_arrays_it_was_built_from():
    scores, correct = generate(600, np.random.default_rng(11))
    space = calibration.SearchSpace.build(scores, correct, COSTS)
    assert calibration.empirical_thresholds(scores, correct, COSTS, 0.7, space=space) == \
        calibration.empirical_thresholds(scores, correct, COSTS, 0.7)
    with pytest.raises(ValueError, match="built from other"):
        calibration.budget_thresholds(scores[:, ::-1], correct, COSTS, 50, space=space)

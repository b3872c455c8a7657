"""Per-exit thresholds chosen on a calibration split, and softmax temperatures per exit.

Everything reads cached arrays: scores (K, N) (lower = more confident), correctness (K, N), and a
cumulative cost per exit (K,) - MACs, or milliseconds per sample - and returns K - 1 thresholds
(-inf: the exit never lets a sample leave). Searches cost a fraction of a second on 5000 x 6.

* `per_exit`, `seed_percentile`: per-exit accuracy rules (the founding system's and a fixed one).
* `empirical_thresholds`: the cheapest setting whose accuracy on the calibration split meets a target.
* `guaranteed_thresholds`: Learn then Test - accuracy on new data >= target with probability >= 1 - delta.
* `budget_thresholds`: the most accurate setting whose mean cost fits a budget.
* `pareto_frontier`: the non-dominated (cost, accuracy) settings.
Results are `results.SearchResult`s with a `status`: "ok", or "unreachable" with what is reachable and the
closest setting; an unreachable target is never silently replaced by another. Thresholds leave here in the one
form used between functions: a tuple of floats, -inf for "never leave" (null only in JSON). The searches on one
split share its `SearchSpace` (most of their work): build it once and pass it as `space=`.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from . import analysis
from ..policies import check_finite_logits
from ..config import DEFAULT_DELTA
from ..errors import UserError
from .results import CostPoint, ExitTemperature, Found, SearchResult

ASSUMPTION = ("calibration samples and future samples are exchangeable (for example i.i.d. from one "
              "distribution, or a random split of one data set)")
PROCEDURE = ("Learn then Test (Angelopoulos, Bates et al. 2021): settings from no early exit to the cheapest are "
             "ordered on one random part of the calibration split; on the other part each gets an exact p-value "
             "for 'accuracy < target' (binomial for the expected accuracy, hypergeometric for the accuracy over "
             "test_size new samples); they are tested in that order at level delta (fixed-sequence testing) and "
             "the cheapest setting before the first one not certified is returned")


# ---- input checks: every user mistake is a one-line UserError

def check_desired_accuracy(desired: float) -> float:
    if not (0.0 < desired <= 1.0):  # also false for NaN
        raise UserError(f"desired accuracy must be in (0, 1], got {desired}")
    return float(desired)


def check_delta(delta: float) -> float:
    if not (0.0 < delta < 1.0):
        raise UserError(f"delta (the allowed failure probability) must be in (0, 1), got {delta}")
    return float(delta)


def check_goal(target: float | None, budget: float | None, guarantee: bool, delta: float,
               within_points: float | None = None) -> None:
    """The checks a goal allows before any data is read (the budget's range needs the costs)."""
    if guarantee and budget is not None:
        raise UserError("a guarantee certifies an accuracy target (target or within points), not a budget")
    check_delta(delta)
    if target is not None:
        check_desired_accuracy(target)
    if within_points is not None:
        check_points(within_points)


def check_costs(costs: Sequence[float], num_exits: int) -> np.ndarray:
    """One finite, non-negative cost per exit, non-decreasing: the cost of leaving at exit k includes stages 0..k."""
    c = np.asarray(costs, dtype=np.float64)
    if c.shape != (num_exits,):
        raise UserError(f"expected {num_exits} exit costs, got {c.size}")
    if not (np.isfinite(c).all() and (c >= 0).all() and (np.diff(c) >= 0).all()):
        raise UserError(f"exit costs must be finite, non-negative and cumulative (non-decreasing), got {c.tolist()}")
    return c


def check_budget(budget: float, costs: np.ndarray) -> float:
    if not np.isfinite(budget):
        raise UserError(f"budget must be a finite number, got {budget}")
    if budget < costs[0]:
        raise UserError(f"budget {budget:g} is below the cheapest exit's cost {costs[0]:g} (all samples leaving first)")
    return float(budget)


def check_points(points: float) -> float:
    """Percentage points below the final exit's accuracy (a study's and calibrate's `within_points`): >= 0, finite."""
    if not (np.isfinite(points) and points >= 0):
        raise UserError(f"within points (below the final exit's accuracy) must be a non-negative number, got {points}")
    return points


def relative_target(correct: np.ndarray, points: float) -> float:
    """The final exit's accuracy on the calibration split minus `points` percentage points."""
    check_points(points)
    final = float(correct[-1].mean())
    target = final - points / 100
    if not (0.0 < target <= 1.0):
        raise UserError(f"final-exit accuracy {final:.4f} minus {points:g} points is {target:.4f}, not in (0, 1]")
    return target


# ---- temperature scaling

def _nll(logits: torch.Tensor, labels: torch.Tensor, temperatures: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood per exit of (K, N, C) logits divided by (K,) temperatures."""
    log_p = torch.log_softmax(logits / temperatures[:, None, None], dim=-1)
    return -log_p.gather(-1, labels.expand(logits.shape[:2])[..., None]).squeeze(-1).mean(1)


def fit_temperatures(logits: np.ndarray, labels: np.ndarray, iterations: int = 40) -> np.ndarray:
    """Per exit, the softmax temperature in [0.05, 20] minimizing NLL on these (calibration) logits.

    NLL is convex in 1/T, hence unimodal in log T, so golden-section search on log T finds the minimum.
    """
    check_finite_logits(logits)
    z, y = torch.as_tensor(logits, dtype=torch.float64), torch.as_tensor(labels, dtype=torch.int64)
    lo = torch.full((z.shape[0],), math.log(0.05), dtype=torch.float64)
    hi = torch.full((z.shape[0],), math.log(20.0), dtype=torch.float64)
    g = (math.sqrt(5) - 1) / 2
    for _ in range(iterations):
        a, b = hi - g * (hi - lo), lo + g * (hi - lo)
        left = _nll(z, y, a.exp()) < _nll(z, y, b.exp())  # the minimum lies in [lo, b]
        lo, hi = torch.where(left, lo, a), torch.where(left, b, hi)
    return ((lo + hi) / 2).exp().numpy()


def expected_calibration_error(logits: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Top-label ECE of (N, C) logits: over equal-width confidence bins, the share-weighted |accuracy - confidence|."""
    p = torch.softmax(torch.as_tensor(logits, dtype=torch.float64), dim=-1)
    confidence, prediction = (t.numpy() for t in p.max(-1))
    right = prediction == np.asarray(labels)
    bin_of = np.minimum((confidence * bins).astype(int), bins - 1)
    gap = np.bincount(bin_of, weights=right - confidence, minlength=bins)
    return float(np.abs(gap).sum() / len(right))


def temperature_report(logits: np.ndarray, labels: np.ndarray, temperatures: np.ndarray) -> tuple[ExitTemperature, ...]:
    """Per exit: the temperature, and NLL and ECE on these logits before and after dividing by it."""
    z, y = torch.as_tensor(logits, dtype=torch.float64), torch.as_tensor(labels, dtype=torch.int64)
    t = torch.as_tensor(np.asarray(temperatures), dtype=torch.float64)
    before, after = _nll(z, y, torch.ones_like(t)), _nll(z, y, t)
    return tuple(ExitTemperature(k, float(t[k]), float(before[k]), float(after[k]), expected_calibration_error(z[k], y),
                                 expected_calibration_error(z[k] / t[k], y)) for k in range(len(t)))


# ---- per-exit accuracy rules

def largest_accurate_threshold(scores: np.ndarray, correct: np.ndarray, desired: float) -> float:
    """The largest t such that the samples with score <= t are at least `desired` accurate (-inf if none)."""
    order = np.argsort(scores, kind="stable")
    s, c = scores[order], correct[order]
    accuracy = np.cumsum(c) / np.arange(1, len(s) + 1)
    # a threshold lets out every sample with an equal score, so only the end of a tie group counts
    group_end = np.append(s[1:] != s[:-1], True)
    ok = np.flatnonzero(group_end & (accuracy >= desired))
    return float(s[ok[-1]]) if len(ok) else -np.inf


def per_exit(scores: np.ndarray, correct: np.ndarray, desired: float) -> np.ndarray:
    """exitwise's rule: at each side exit in turn, the largest threshold whose leavers (of the samples
    still reaching that exit) are at least `desired` accurate on the validation split."""
    check_desired_accuracy(desired)
    reaching = np.ones(scores.shape[1], dtype=bool)
    thresholds = np.full(scores.shape[0] - 1, -np.inf)
    for k in range(scores.shape[0] - 1):
        if reaching.any():
            thresholds[k] = largest_accurate_threshold(scores[k, reaching], correct[k, reaching], desired)
        reaching &= ~analysis.leaves(scores[k], thresholds[k])
    return thresholds


def seed_percentile(scores: np.ndarray, correct: np.ndarray, desired: float, max_score: float) -> np.ndarray:
    """The founding system's rule, with the exit comparison the right way round: if an exit is at least
    `desired` accurate over all validation samples, everyone may leave there (threshold = max score: all but a sample
    whose softmax is uniform to float32 precision, whose score can round a few ulps above it);
    otherwise the threshold is the (1 - desired) percentile of that exit's scores."""
    check_desired_accuracy(desired)
    thresholds = np.empty(scores.shape[0] - 1)
    for k in range(scores.shape[0] - 1):
        if correct[k].mean() >= desired:
            thresholds[k] = max_score
        else:
            thresholds[k] = np.percentile(scores[k], 100 * (1 - desired))
    return thresholds


METHODS: dict[str, Callable[..., np.ndarray]] = {
    "per-exit": lambda scores, correct, desired, max_score: per_exit(scores, correct, desired),
    "seed-percentile": seed_percentile,
}


# ---- searching over per-exit thresholds

def candidate_thresholds(scores: np.ndarray, levels: int = 64) -> list[np.ndarray]:
    """Per side exit: -inf (never leave) and up to `levels` quantiles of its scores, each an observed score
    (so the runtime's float32 comparison agrees), the largest letting every sample out."""
    q = np.linspace(0, 1, levels)
    return [np.concatenate(([-np.inf], np.unique(np.quantile(s, q, method="inverted_cdf")))) for s in scores[:-1]]


def _exit_points(scores: np.ndarray, correct: np.ndarray, settings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each of S settings (S, K - 1): every sample's exit (S, N) and whether it is right there."""
    exits = analysis.exit_points(scores, settings)
    return exits, correct[exits, np.arange(scores.shape[1])]


def _raise(exits: np.ndarray, right: np.ndarray, k: int | np.ndarray, score: np.ndarray, correct: np.ndarray,
           values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exits and rightness (S, N) after raising exit k's threshold to each of S values, from the (N,) ones of a
    setting with a threshold no higher at k: only samples running past k change, leaving at k if their score
    allows. score and correct are exit k's (N,) rows; with k (S, 1) they are (S, N), one exit per setting."""
    leave = (exits > k) & analysis.leaves(score, values[:, None])
    return np.where(leave, k, exits), np.where(leave, correct, right)


def _totals(costs: np.ndarray, exits: np.ndarray, right: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of (S, N) exits and rightness: the mean cost, bit for bit what `analysis.evaluate` gives (a row is
    averaged like a 1-D array), and the number of correct samples (accuracy: count / N, again bit for bit)."""
    return costs[exits].mean(1), np.count_nonzero(right, axis=1)


def _outcomes(scores: np.ndarray, correct: np.ndarray, costs: np.ndarray,
              settings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`_totals` of S settings (S, K - 1), a chunk of settings at a time to bound the memory."""
    step = max(1, 2**22 // scores.size)
    parts = [_totals(costs, *_exit_points(scores, correct, settings[i:i + step]))
             for i in range(0, len(settings), step)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def threshold_path(scores: np.ndarray, correct: np.ndarray, costs: np.ndarray, levels: int = 64) -> list[np.ndarray]:
    """Settings from the safest (no early exit) to the cheapest (all leave at the first exit), cost never rising.

    Greedy: each step raises one exit's threshold by one candidate level, the one losing the least
    accuracy per unit of cost saved (moves that gain accuracy first; ties to the earliest exit).
    """
    n = scores.shape[1]
    grid = candidate_thresholds(scores, levels)
    top = np.array([len(g) - 1 for g in grid])
    pos = np.zeros(len(grid), dtype=int)
    path = [np.array([g[0] for g in grid])]
    (exits,), (right,) = _exit_points(scores, correct, path[0][None])
    cost, accuracy = float(costs[exits].mean()), np.count_nonzero(right) / n
    while (pos < top).any():
        ks = np.flatnonzero(pos < top)
        raised = np.array([grid[k][pos[k] + 1] for k in ks])
        trial_exits, trial_right = _raise(exits, right, ks[:, None], scores[ks], correct[ks], raised)
        c, r = _totals(costs, trial_exits, trial_right)
        moves = []
        for i, (k, c_k, a_k) in enumerate(zip(ks, c.tolist(), (r / n).tolist())):
            lost, saved = accuracy - a_k, cost - c_k  # saved is 0 only if no sample moved or exits cost the same
            rate = lost / saved if saved > 0 else math.copysign(math.inf, lost) if lost else 0.0
            moves.append((rate, k, c_k, a_k, i))
        _, k, cost, accuracy, i = min(moves)
        pos[k] += 1
        exits, right = trial_exits[i], trial_right[i]
        path.append(path[-1].copy())
        path[-1][k] = raised[i]
    return path


@dataclass(frozen=True)
class SearchSpace:
    """Where every search on one split starts: per-exit grids, the greedy path, and the candidates (the path
    then every shared cutoff on the grid) with their mean cost and accuracy. Building it is most of a search's
    work: build it once per split and cost (`build`) and pass it to each search on that split."""
    scores: np.ndarray = field(repr=False)
    correct: np.ndarray = field(repr=False)
    costs: np.ndarray
    levels: int
    grid: list[np.ndarray] = field(repr=False)
    path: list[np.ndarray] = field(repr=False)
    candidates: np.ndarray = field(repr=False)
    cost: list[float] = field(repr=False)
    accuracy: list[float] = field(repr=False)

    @classmethod
    def build(cls, scores: np.ndarray, correct: np.ndarray, costs: Sequence[float], levels: int = 64) -> SearchSpace:
        costs = check_costs(costs, scores.shape[0])
        grid = candidate_thresholds(scores, levels)
        path = threshold_path(scores, correct, costs, levels)
        shared = np.unique(np.concatenate(grid))
        candidates = np.vstack(path + [np.full(scores.shape[0] - 1, v) for v in shared])
        cost, right = _outcomes(scores, correct, costs, candidates)
        return cls(scores, correct, costs, levels, grid, path, candidates, cost.tolist(),
                   (right / scores.shape[1]).tolist())

    def of(self, scores: np.ndarray, correct: np.ndarray, costs: np.ndarray, levels: int) -> SearchSpace:
        """This space, after checking it was built from these very arrays."""
        if not (levels == self.levels and np.array_equal(costs, self.costs) and np.array_equal(scores, self.scores)
                and np.array_equal(correct, self.correct)):
            raise ValueError("this search space was built from other scores, correctness, costs or levels")
        return self


def _space(scores: np.ndarray, correct: np.ndarray, costs: np.ndarray, levels: int,
           space: SearchSpace | None) -> SearchSpace:
    return SearchSpace.build(scores, correct, costs, levels) if space is None else space.of(scores, correct,
                                                                                                 costs, levels)


def _search(space: SearchSpace, key: Callable, feasible: Callable) -> np.ndarray | None:
    """The setting minimizing key(cost, accuracy) among feasible(cost, accuracy) ones, None if no start is feasible.

    Starts from the best candidate (so never worse than the best shared cutoff), then coordinate
    descent: one exit's threshold at a time over its grid, until a whole pass changes nothing. Ties go
    to the earliest candidate or grid value.
    """
    scores, correct, costs = space.scores, space.correct, space.costs
    found = [(key(c, a), i) for i, (c, a) in enumerate(zip(space.cost, space.accuracy)) if feasible(c, a)]
    if not found:
        return None
    best, i = min(found, key=lambda f: f[0])
    thresholds = space.candidates[i].copy()
    changed = True
    while changed:
        changed = False
        for k, values in enumerate(space.grid):
            closed = thresholds.copy()  # exit k letting no one out, then raised to each of its grid values
            closed[k] = -np.inf
            (exits,), (right,) = _exit_points(scores, correct, closed[None])
            cost, count = _totals(costs, *_raise(exits, right, k, scores[k], correct[k], values))
            accuracy = count / scores.shape[1]
            found = [(key(c, a), j) for j, (c, a) in enumerate(zip(cost.tolist(), accuracy.tolist())) if feasible(c, a)]
            if found:
                option, j = min(found, key=lambda f: f[0])
                if option < best:
                    best, thresholds[k], changed = option, values[j], True
    return thresholds


def _setting(scores: np.ndarray, correct: np.ndarray, costs: np.ndarray, thresholds: np.ndarray,
             certifiable_target: float | None = None) -> Found:
    r = analysis.evaluate(scores, correct, thresholds, costs)
    return Found(tuple(thresholds.tolist()), r.accuracy, r.mean_cost, r.exit_shares, certifiable_target)


def _found(found: Found) -> dict:
    """A found setting as SearchResult fields."""
    return {"thresholds": found.thresholds, "accuracy": found.accuracy, "mean_cost": found.mean_cost,
            "exit_shares": found.exit_shares, "certifiable_target": found.certifiable_target}


def _most_accurate(space: SearchSpace) -> np.ndarray:
    return _search(space, lambda c, a: (-a, c), lambda c, a: True)


def empirical_thresholds(scores: np.ndarray, correct: np.ndarray, costs: Sequence[float], target: float,
                         levels: int = 64, space: SearchSpace | None = None) -> SearchResult:
    """The cheapest thresholds (mean cost) whose accuracy on this split is >= target. No promise for new data.

    Status "ok" with `target`, `thresholds`, `accuracy`, `mean_cost`, `exit_shares`; or "unreachable" with
    `message`, `reachable` {"max_accuracy"} and `closest` (the most accurate setting). `space`: this split's, if
    built already.
    """
    target = check_desired_accuracy(target)
    costs = check_costs(costs, scores.shape[0])
    space = _space(scores, correct, costs, levels, space)
    thresholds = _search(space, lambda c, a: (c, -a), lambda c, a: a >= target)
    if thresholds is None:
        closest = _setting(scores, correct, costs, _most_accurate(space))
        return SearchResult("empirical", "unreachable", target=target,
                            message=f"accuracy {target:.4f} is not reachable on the calibration split: "
                                    f"the most accurate thresholds reach {closest.accuracy:.4f}",
                            reachable={"max_accuracy": closest.accuracy}, closest=closest)
    return SearchResult("empirical", "ok", target=target, **_found(_setting(scores, correct, costs, thresholds)))


@functools.lru_cache(maxsize=None)
def _log_factorials(size: int) -> np.ndarray:
    """log k! for k < size, a power of two (a search asks for thousands of p-values, so tables are kept)."""
    return np.array([math.lgamma(i + 1) for i in range(size)])


def _log_choose(n: int, k: np.ndarray) -> np.ndarray:
    """log (n choose k) for integers 0 <= k <= n (plain numpy: no torch per call)."""
    f = _log_factorials(1 << int(n).bit_length())
    return f[n] - f[k] - f[n - k]


def _xlogy(x: np.ndarray, y: float) -> np.ndarray:
    """x log y, and 0 where x is 0 (even for y = 0)."""
    return np.where(x == 0, 0.0, x * math.log(y) if y > 0 else -np.inf)


def _sum_exp(log_terms: np.ndarray) -> float:
    """sum(exp(log_terms)) without overflow, capped at 1 (a probability)."""
    top = log_terms.max(initial=-np.inf)
    return 0.0 if top == -np.inf else min(1.0, math.exp(top) * float(np.exp(log_terms - top).sum()))


def binomial_cdf(x: int, n: int, p: float) -> float:
    """P(Binomial(n, p) <= x), summed in log space (exact; no scipy needed)."""
    k = np.arange(min(x, n) + 1)
    return _sum_exp(_log_choose(n, k) + _xlogy(k, p) + _xlogy(n - k, 1 - p))


def hypergeometric_cdf(x: int, total: int, marked: int, draws: int) -> float:
    """P(X <= x) for X the marked items among `draws` drawn without replacement from `total` holding `marked`."""
    k = np.arange(max(0, draws - (total - marked)), min(x, marked, draws) + 1)
    return _sum_exp(_log_choose(marked, k) + _log_choose(total - marked, draws - k) - _log_choose(total, draws))


def accuracy_p_value(errors: int, n: int, target: float, test_size: int | None = None) -> float:
    """p-value for 'accuracy < target' after `errors` of `n` calibration samples were wrong.

    test_size None: the expected accuracy on new data; exact binomial tail at error rate 1 - target.
    test_size m: the accuracy over m new samples exchangeable with the n. The m miss the target when they
    hold at least c = floor(m (1 - target)) + 1 errors; the chance of at most `errors` calibration errors
    is largest when the n + m samples hold exactly errors + c, a hypergeometric tail.
    """
    if test_size is None:
        return binomial_cdf(errors, n, 1.0 - target)
    c = math.floor(round(test_size * (1.0 - target), 9)) + 1
    return hypergeometric_cdf(errors, n + test_size, min(errors + c, n + test_size), n) if c <= test_size else 0.0


def certifiable_target(errors: int, n: int, delta: float, test_size: int | None = None) -> float:
    """The highest target that `errors` of `n` certify at level delta: a lower confidence bound on accuracy
    (Clopper-Pearson for the expected accuracy)."""
    lo, hi = 0.0, 1.0  # the p-value rises with the target
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if accuracy_p_value(errors, n, mid, test_size) <= delta else (lo, mid)
    return lo


def ordering_split(n: int, path_fraction: float = 0.5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Learn then Test's random split of n calibration samples: (ordering, testing) indices."""
    m = int(round(path_fraction * n))
    if not (0 < m < n):
        raise UserError(f"need calibration samples both to order and to test settings; got {n} samples")
    order = np.random.default_rng(seed).permutation(n)
    return order[:m], order[m:]


def guaranteed_thresholds(scores: np.ndarray, correct: np.ndarray, costs: Sequence[float], target: float,
                          delta: float, test_size: int | None = None, levels: int = 64, path_fraction: float = 0.5,
                          seed: int = 0, ordering: SearchSpace | None = None) -> SearchResult:
    """Thresholds whose accuracy on new data is >= target with probability >= 1 - delta (Learn then Test).

    The accuracy guaranteed is the expected one (test_size None) or the one measured over `test_size` new
    samples (pass the size of the test set the thresholds will be judged on). A random `path_fraction` of
    the calibration samples orders the settings (`threshold_path`); the rest test them (`accuracy_p_value`).
    `seed` draws that split: keep it independent of any random draw that made the calibration and test
    sets (numpy generators seeded alike draw related permutations). `ordering`: the search space of the
    ordering samples (`ordering_split`), if built already for another target.
    Status "ok" with `target`, `delta`, `test_size`, `thresholds`, `accuracy`, `mean_cost`, `exit_shares` (these
    three on the whole calibration split), `certifiable_target` (the highest target the returned setting passes),
    `samples` {"ordering", "testing"}, `guarantee`, `assumption`, `procedure`; or "unreachable" (`message`) when even
    no early exit is not certified, with `reachable` {"max_certifiable_target"} and `closest` (no early exit).
    """
    target, delta = check_desired_accuracy(target), check_delta(delta)
    costs = check_costs(costs, scores.shape[0])
    if test_size is not None and not (isinstance(test_size, (int, np.integer)) and test_size >= 1):
        raise UserError(f"test size must be a positive whole number of samples, got {test_size}")
    learn, test = ordering_split(scores.shape[1], path_fraction, seed)
    m = len(learn)
    path = _space(scores[:, learn], correct[:, learn], costs, levels, ordering).path
    _, right = _outcomes(scores[:, test], correct[:, test], costs, np.vstack(path))
    all_errors = (len(test) - right).tolist()
    certified = None
    for thresholds, errors in zip(path, all_errors):  # fixed-sequence testing: stop at the first setting not certified
        if accuracy_p_value(errors, len(test), target, test_size) > delta:
            break
        certified = (thresholds, errors)
    over = "expected accuracy on new data" if test_size is None else f"accuracy over {test_size} new samples"
    base = {"target": target, "delta": delta,
            "test_size": None if test_size is None else int(test_size),
            "samples": {"ordering": int(m), "testing": len(test)},
            "guarantee": f"with probability >= {1 - delta:g}, the {over} is >= {target:g}",
            "assumption": ASSUMPTION, "procedure": PROCEDURE}
    if certified is None:
        bound = certifiable_target(all_errors[0], len(test), delta, test_size)
        return SearchResult("guaranteed", "unreachable", **base,
                            message=f"accuracy {target:.4f} cannot be guaranteed at delta {delta:g} from {len(test)} "
                                    f"testing samples: even without early exit the most that can be certified is "
                                    f"{bound:.4f}",
                            reachable={"max_certifiable_target": bound},
                            closest=_setting(scores, correct, costs, path[0], bound))
    thresholds, errors = certified
    bound = certifiable_target(errors, len(test), delta, test_size)
    return SearchResult("guaranteed", "ok", **base, **_found(_setting(scores, correct, costs, thresholds, bound)))


def budget_thresholds(scores: np.ndarray, correct: np.ndarray, costs: Sequence[float], budget: float,
                      levels: int = 64, space: SearchSpace | None = None) -> SearchResult:
    """The most accurate thresholds whose mean cost on this split is within `budget` (same unit as costs).

    Status "ok" with `budget`, `thresholds`, `accuracy`, `mean_cost`, `exit_shares`.
    A budget below the first exit's cost is a UserError; any other budget is reachable (all leave first).
    """
    costs = check_costs(costs, scores.shape[0])
    budget = check_budget(budget, costs)
    limit = budget * (1 + 1e-12)  # a mean of equal costs may round one ulp above them
    thresholds = _search(_space(scores, correct, costs, levels, space), lambda c, a: (-a, c), lambda c, a: c <= limit)
    return SearchResult("budget", "ok", budget=budget, **_found(_setting(scores, correct, costs, thresholds)))


def pareto_frontier(scores: np.ndarray, correct: np.ndarray, costs: Sequence[float], levels: int = 64,
                    space: SearchSpace | None = None) -> list[CostPoint]:
    """The non-dominated settings on this split among the greedy path and all shared cutoffs (cost, accuracy and
    thresholds), by rising cost (and so rising accuracy). Re-evaluate the thresholds on another split with
    `analysis.cost_accuracy_points`."""
    costs = check_costs(costs, scores.shape[0])
    space = _space(scores, correct, costs, levels, space)
    return analysis.non_dominated([CostPoint(c, a, tuple(t.tolist()))
                                   for c, a, t in zip(space.cost, space.accuracy, space.candidates)])


def thresholds_for_goal(scores: np.ndarray, correct: np.ndarray, costs: Sequence[float], *,
                        target: float | None = None, within_points: float | None = None, budget: float | None = None,
                        guarantee: bool = False, delta: float = DEFAULT_DELTA,
                        test_size: int | None = None) -> SearchResult:
    """One goal's search on this split: a `budget`, else an accuracy `target` (or the final exit's accuracy minus
    `within_points` points), met empirically or, with `guarantee`, by Learn then Test at `delta`."""
    if budget is not None:
        return budget_thresholds(scores, correct, costs, budget)
    goal = target if target is not None else relative_target(correct, within_points)
    if guarantee:
        return guaranteed_thresholds(scores, correct, costs, goal, delta, test_size=test_size)
    return empirical_thresholds(scores, correct, costs, goal)

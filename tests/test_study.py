"""The study's choices, on small generated score tables (the end-to-end runs are in test_cli and test_study_cifar)."""
import numpy as np

from exitwise import analysis
from exitwise.study import ExitArrays, latency_frontier

MACS = [10, 30, 100]


def test_latency_frontier_gives_each_policys_non_dominated_settings_and_an_informative_score_saves_time():
    rng = np.random.default_rng(0)
    k, n = 3, 400
    correct = rng.random((k, n)) < np.array([[0.6], [0.75], [0.9]])
    val = {"informative": ExitArrays(scores=rng.random((k, n)) + ~correct, correct=correct, logits=None),
           "noise": ExitArrays(scores=rng.random((k, n)), correct=correct, logits=None)}
    seconds = np.array([1e-3, 2e-3, 3e-3])
    settings = latency_frontier(val, seconds)
    fastest_at_full_accuracy = {}
    for name, arrays in val.items():
        points = [analysis.evaluate(arrays.scores, correct, thr, MACS, seconds) for _, p, thr in settings if p == name]
        times, accuracies = [p["seconds"] for p in points], [p["overall_accuracy"] for p in points]
        assert len(points) > 1 and times == sorted(times) and accuracies == sorted(set(accuracies))
        fastest_at_full_accuracy[name] = min(p["seconds"] for p in points if p["overall_accuracy"] >= correct[-1].mean())
    assert fastest_at_full_accuracy["informative"] < min(0.8 * seconds.sum() * n, fastest_at_full_accuracy["noise"])

"""End to end on the shared CIFAR-10 copy with the founding system's weights."""
import json

import numpy as np
import pytest
import torch

from exitwise.study import analysis
from exitwise.cli import main
from exitwise.study.logits_cache import load_logits
from exitwise.policies import get_policy

from conftest import CIFAR_JPG, SEED_WEIGHTS

# measured by this study on the JPEG copy; the founding README's printout shows the same per-exit figures
SEED_TEST_ACCURACY = [0.5919, 0.6806, 0.7020, 0.7285, 0.7573, 0.7742]

pytestmark = pytest.mark.cifar


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    if not (CIFAR_JPG.is_file() and SEED_WEIGHTS.is_file()):
        pytest.skip("../shared CIFAR-10 copy or seed weights not present")
    out = tmp_path_factory.mktemp("study")
    code = main(["study", "--dataset", "cifar10", "--data-dir", str(CIFAR_JPG), "--model", "seed-branchynet",
                 "--weights", str(SEED_WEIGHTS), "--out", str(out), "--no-progress"])
    assert code == 0
    return out


def test_per_exit_test_accuracy_of_the_founding_weights(study_dir):
    results = json.loads((study_dir / "results.json").read_text())
    measured = [e["accuracy"] for e in results["exits"]]
    np.testing.assert_allclose(measured, SEED_TEST_ACCURACY, atol=0.003)
    assert results["dataset"]["sizes"] == {"train": 45000, "val": 5000, "test": 10000}
    assert results["precision_check"]["agreement_with_fp32"] >= 0.99
    assert max(measured) <= results["oracle"]["accuracy"] <= 1


def test_fixed_cutoff_is_the_weighted_mean_of_the_exits(study_dir):
    fixed = json.loads((study_dir / "results.json").read_text())["fixed_cutoff"]
    counts = np.array([e["count"] for e in fixed["per_exit"]])
    accuracy = np.array([e["accuracy"] or 0.0 for e in fixed["per_exit"]])
    assert counts.sum() == 10000
    assert fixed["test"]["accuracy"] == pytest.approx((counts * accuracy).sum() / 10000)
    assert counts[0] > 0  # low entropy leaves early: the founding system had this backwards


def test_sweep_covers_zero_to_ln10_and_trades_accuracy_for_compute(study_dir):
    sweep = json.loads((study_dir / "results.json").read_text())["sweep"]
    assert len(sweep) == 100
    assert sweep[0]["cutoff"] == 0 and sweep[-1]["cutoff"] == pytest.approx(np.log(10))
    first, last = sweep[0]["test"], sweep[-1]["test"]
    assert last["exit_shares"][0] == pytest.approx(1.0)  # every entropy is <= ln(10)
    assert first["mean_macs"] > last["mean_macs"]
    assert first["accuracy"] > last["accuracy"]


def test_per_exit_calibration_holds_on_the_validation_split_it_was_chosen_on(study_dir):
    results = json.loads((study_dir / "results.json").read_text())
    cache = load_logits(study_dir)
    scores = get_policy("entropy").scores(torch.from_numpy(cache.val_logits)).numpy()
    correct = cache.val_logits.argmax(-1) == cache.val_labels
    for entry in (c for c in results["calibration"] if c["method"] == "per-exit"):
        thr = analysis.as_thresholds(entry["thresholds"], 6)
        r = analysis.evaluate(scores, correct, thr, cache.exit_macs)
        for acc, count in zip(r.exit_accuracy[:-1], r.exit_counts[:-1]):
            assert count == 0 or acc >= entry["desired_accuracy"] - 1e-12
        assert entry["val_accuracy"] == pytest.approx(r.accuracy)


def test_reports_and_real_runs(study_dir):
    results = json.loads((study_dir / "results.json").read_text())
    for name in ("report.html", "report.md", "accuracy_vs_cutoff.png", "time_vs_cutoff.png",
                 "time_vs_accuracy.png", "exit_shares.png", "calibration.png", "logits.safetensors"):
        assert (study_dir / name).is_file(), name
    assert len(results["timing_model"]["checks"]) >= 5
    assert all(c["measured_seconds"] > 0 for c in results["timing_model"]["checks"])
    for key in ("founding_rule", "fastest_within_points"):
        best = results["best"][key]
        assert 0 < best["test"]["accuracy"] <= 1 and best["timed"]["measured_seconds"] > 0


def test_the_fastest_setting_is_scored_with_its_own_policy_and_stays_within_half_a_point_on_validation(study_dir):
    results = json.loads((study_dir / "results.json").read_text())
    cache = load_logits(study_dir)
    fastest = results["best"]["fastest_within_points"]
    policy = get_policy(fastest["setting"]["policy"])
    thr = analysis.as_thresholds(fastest["setting"]["thresholds"], 6)
    on = {}
    for split, logits, labels in (("val", cache.val_logits, cache.val_labels), ("test", cache.test_logits,
                                                                                  cache.test_labels)):
        scores = policy.scores(torch.from_numpy(logits)).numpy().astype(np.float64)
        on[split] = analysis.evaluate(scores, logits.argmax(-1) == labels, thr, cache.exit_macs)
    assert on["test"].accuracy == fastest["test"]["accuracy"]
    assert list(on["test"].exit_shares) == fastest["test"]["exit_shares"]
    final_val = (cache.val_logits[-1].argmax(-1) == cache.val_labels).mean()
    assert on["val"].accuracy >= final_val - 0.005

"""The study's choices, on small generated score tables (the end-to-end runs are in test_cli and test_study_cifar)."""
import dataclasses
import json

import numpy as np
import pytest
import torch

from exitwise.study import analysis
from exitwise.api import calibrate, load_model
from exitwise.data import load_splits
from exitwise.early_exit import EarlyExitModel
from exitwise.errors import UserError
from exitwise.study.logits_cache import load_logits, save_logits
from exitwise.policies import exit_arrays
from exitwise.study.results import StudyResults
from exitwise.study import StudyConfig, analyse, measure, timing_subset
from exitwise.study.frontiers import latency_frontier
from exitwise.policies import ExitArrays

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
        points = [analysis.evaluate(arrays.scores, correct, analysis.as_thresholds(s.thresholds, k), MACS, seconds)
                  for s in settings if s.policy == name]
        times, accuracies = [p.predicted_seconds for p in points], [p.accuracy for p in points]
        assert len(points) > 1 and times == sorted(times) and accuracies == sorted(set(accuracies))
        fastest_at_full_accuracy[name] = min(p.predicted_seconds for p in points if p.accuracy >= correct[-1].mean())
    assert fastest_at_full_accuracy["informative"] < min(0.8 * seconds.sum() * n, fastest_at_full_accuracy["noise"])


@pytest.fixture(scope="module")
def digits():
    """The shipped digits model measured once (fp32): its splits, the study settings and the cached logits."""
    net, info = load_model("digits-convnet")
    splits = load_splits("digits", progress=False)
    config = StudyConfig(precision="fp32", progress=False)
    return net, splits, config, measure(net, splits, config, info)


def test_analyse_is_a_pure_function_of_the_cached_logits(tmp_path, digits):
    _, _, config, cache = digits
    save_logits(cache, tmp_path / "logits.safetensors")
    first = analyse(cache, config)
    again = analyse(load_logits(tmp_path), config)  # through the file, as `exitwise calibrate` reads it
    assert json.dumps(first.to_json()) == json.dumps(again.to_json())
    assert StudyResults.from_json(json.loads(json.dumps(first.to_json()))) == first
    assert [e.accuracy for e in first.exits] == (cache.test_logits.argmax(-1) == cache.test_labels).mean(1).tolist()


def test_the_measurements_are_typed_and_stored_under_the_keys_they_always_had(tmp_path, digits):
    from safetensors import safe_open
    _, splits, config, cache = digits
    m = cache.measurements
    assert m.precision == "fp32" and m.batch_size == config.batch_size and m.dataset == splits.describe()
    assert m.measured.fixed_cutoff.cutoff == config.cutoff and len(m.measured.fixed_cutoff.stage_seconds) == 3
    save_logits(cache, tmp_path / "logits.safetensors")
    with safe_open(str(tmp_path / "logits.safetensors"), framework="np") as f:
        stored = json.loads(f.metadata()["info"])
    assert list(stored) == ["model", "dataset", "precision", "batch_size", "micro_batch", "machine", "created",
                            "software", "precision_check", "micro_batch_probe", "backbone_macs", "measured"]
    assert list(stored["measured"]) == ["machine_load_at_start", "all_exits_seconds", "full_network_seconds",
                                        "fixed_cutoff"]
    assert list(stored["measured"]["fixed_cutoff"]) == ["policy", "cutoff", "images", "seconds", "stage_seconds"]
    assert list(stored["model"]) == ["name", "weights", "weights_sha256", "shipped", "num_exits"]
    assert stored["dataset"] == {"name": "digits", "source": "scikit-learn digits", "classes": list("0123456789"),
                                 "sizes": {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)},
                                 "split_seed": splits.split_seed, "val_size": len(splits.val)}
    assert load_logits(tmp_path).measurements == m
    old = {k: v for k, v in stored.items() if k not in ("backbone_macs", "measured")}  # a cache from before them
    assert type(m).from_json(old).measured.fixed_cutoff is None
    unnamed = type(m).from_json({**old, "model": {}, "dataset": {}})  # what a cache measured without them holds
    assert unnamed.model is unnamed.dataset is None and unnamed.precision == m.precision


def test_calibrate_writes_an_early_exit_model_that_runs_what_it_reports(tmp_path, digits):
    _, splits, _, cache = digits
    (tmp_path / "study").mkdir()
    save_logits(cache, tmp_path / "study" / "logits.safetensors")
    doc = calibrate(tmp_path / "study", tmp_path / "cal", within_points=1.0, policy="max-prob")
    model = EarlyExitModel.load(tmp_path / "cal")
    assert model.policy.name == "max-prob" and tuple(model.thresholds.tolist()) == doc.result.thresholds
    run = model.run(splits.test, precision="fp32")
    assert run.exits.tolist() == analysis.exit_points(
        exit_arrays(cache.test_logits, cache.test_labels, "max-prob").scores, model.thresholds).tolist()
    assert (run.predictions == splits.test.labels.numpy()).mean() == doc.test.accuracy


def test_calibrate_re_times_the_stages_on_a_device_and_predicts_time_from_those(tmp_path, digits):
    _, _, _, cache = digits
    (tmp_path / "study").mkdir()
    save_logits(cache, tmp_path / "study" / "logits.safetensors")
    doc = calibrate(tmp_path / "study", tmp_path / "cal", within_points=1.0, cost="latency", device="cpu",
                    micro_batch=32)
    written = json.loads((tmp_path / "cal" / "calibration.json").read_text())
    assert written == doc.to_json() and type(doc).from_json(written) == doc  # re-timing evidence reads back too
    timing = doc.timing
    assert (timing.device, timing.precision, timing.micro_batch) == ("cpu", "fp32", 32)  # the study's fp32
    assert timing.machine.cpu and timing.images > 0
    per_sample = np.array(timing.stage_seconds_per_sample)
    assert (per_sample > 0).all() and per_sample.tolist() != cache.stage_seconds_per_sample.tolist()
    test = exit_arrays(cache.test_logits, cache.test_labels, "entropy")
    exits = analysis.exit_points(test.scores, analysis.as_thresholds(doc.result.thresholds, len(per_sample)))
    assert doc.test.ms_per_sample == pytest.approx(
        1e3 * analysis.reach_counts(exits, len(per_sample)) @ per_sample / len(exits))


def test_calibrate_writes_no_early_exit_model_for_an_unreachable_target_and_leaves_no_earlier_one(tmp_path, digits):
    _, _, _, cache = digits
    (tmp_path / "study").mkdir()
    save_logits(cache, tmp_path / "study" / "logits.safetensors")
    doc = calibrate(tmp_path / "study", tmp_path / "cal", target=1.0, guarantee=True)
    assert doc.result.status == "unreachable" and not (tmp_path / "cal" / "early_exit.json").exists()
    calibrate(tmp_path / "study", tmp_path / "cal", within_points=1.0)
    assert (tmp_path / "cal" / "early_exit.json").exists()
    doc = calibrate(tmp_path / "study", tmp_path / "cal", target=1.0, guarantee=True)  # the same folder again
    assert doc.result.status == "unreachable" and not (tmp_path / "cal" / "early_exit.json").exists()
    with pytest.raises(UserError, match="the calibration there wrote none .*goal was not met"):
        EarlyExitModel.load(tmp_path / "cal")  # what `export --from cal` and `serve --from cal` say


def test_real_runs_time_the_first_images_while_accuracy_counts_every_test_image(digits):
    net, splits, config, _ = digits
    config = dataclasses.replace(config, timing_check_images=100)
    fixed = analyse(measure(net, splits, config, load_model("digits-convnet")[1]), config).fixed_cutoff
    assert fixed.timed_images == 100 and len(splits.test) > 100
    assert fixed.ms_per_image == pytest.approx(1e3 * fixed.measured_seconds / 100)
    assert sum(e.count for e in fixed.per_exit) == len(splits.test)
    assert torch.equal(timing_subset(splits.test, config).images, splits.test.images[:100])


def test_every_real_early_exit_run_is_timed_on_its_second_pass(monkeypatch, digits):
    """A first pass sets up kernels for each survivor count (6x a later one on a GPU): the study reports the second."""
    import exitwise.runtime
    import exitwise.study.run as study_run
    from exitwise.study import verify
    net, splits, config, _ = digits
    config = dataclasses.replace(config, timing_check_images=100)
    calls = []

    def counted(real):
        def run(*args, **kwargs):
            result = real(*args, **kwargs)
            result = dataclasses.replace(result, seconds=float(len(calls) + 1))  # the n-th call takes n seconds
            calls.append(result.seconds)
            return result
        return run

    monkeypatch.setattr(study_run, "run_early_exit", counted(study_run.run_early_exit))
    monkeypatch.setattr(exitwise.runtime, "run_early_exit", counted(exitwise.runtime.run_early_exit))
    results = analyse(measure(net, splits, config, load_model("digits-convnet")[1]), config)
    assert calls == [1.0, 2.0] and results.fixed_cutoff.measured_seconds == 2.0
    checks = verify(net, splits.test, results, config).timing_model.checks
    real = [c.measured_seconds for c in checks if "images)" in c.label]
    assert len(calls) == 2 + 2 * len(real) and real == calls[3::2]  # each setting's second pass, never its first


def test_a_logits_cache_that_names_no_model_is_refused_in_one_line():
    from exitwise.study.logits_cache import ExitLogits
    from exitwise.study.results import Measurements
    rng = np.random.default_rng(0)
    logits = lambda n: rng.normal(size=(3, n, 4)).astype(np.float32)  # noqa: E731
    cache = ExitLogits(logits(20), rng.integers(0, 4, 20), logits(30), rng.integers(0, 4, 30),
                       np.array([1e4, 2e4, 4e4]), np.array([1e-4, 2e-4, 4e-4]), Measurements())
    with pytest.raises(UserError, match="does not name the model"):
        analyse(cache, StudyConfig())


@pytest.mark.parametrize("settings, message", [
    ({"desired_accuracies": 0.9}, r"desired_accuracies takes a list, e.g. \[0.9\], got 0.9"),
    ({"methods": "per-exit"}, r"methods takes a list, e.g. \['per-exit'\], got 'per-exit'"),
])
def test_a_list_setting_given_as_one_value_is_refused_when_the_config_is_made(settings, message):
    """Before, a string was read as its characters ('unknown calibration method 'p'') and a number failed in tuple()."""
    with pytest.raises(UserError, match=message):
        StudyConfig(**settings)


@pytest.mark.parametrize("settings, message", [
    ({"within_points": float("nan")}, "within points .* must be a non-negative number, got nan"),
    ({"within_points": -1}, "within points .* must be a non-negative number, got -1"),
    ({"num_cutoffs": 0}, "num_cutoffs and timing_check_images must be at least 1, got 0 and 1000"),
    ({"timing_check_images": 0}, "num_cutoffs and timing_check_images must be at least 1, got 100 and 0"),
    ({"methods": ()}, "give at least one calibration method"),  # was max() of nothing after the whole measuring
    ({"methods": ("per-exit", "nope")}, "unknown calibration method 'nope'; known: per-exit, seed-percentile"),
])
def test_a_study_setting_that_cannot_work_is_refused_when_the_config_is_made(settings, message):
    """Each of these once failed only after the measurement: min() of an empty sequence, an IndexError in the report,
    a ZeroDivisionError."""
    with pytest.raises(UserError, match=message):
        StudyConfig(**settings)


@pytest.mark.parametrize("points", [float("nan"), -0.5])
def test_calibrate_refuses_impossible_within_points_when_the_config_is_made(points):
    from exitwise.study import CalibrateConfig
    with pytest.raises(UserError, match="within points .* must be a non-negative number"):
        CalibrateConfig(within_points=points)

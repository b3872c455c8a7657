"""`exitwise calibrate`: thresholds from a study's cached logits, end to end on a small generated cache."""
import json

import numpy as np
import pytest
import torch

from exitwise.study import analysis
from exitwise.study.logits_cache import ExitLogits, save_logits
from exitwise.study.results import CalibrationReport, Measurements, SearchResult
from exitwise.policies import get_policy

from test_cli import assert_user_error, run_cli

EXIT_MACS = [100, 250, 400]
STAGE_SECONDS = [1e-4, 1e-4, 2e-4]  # leaving at each exit: 0.1, 0.2, 0.4 ms per sample


def split(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(3 exits, n, 4 classes) logits and labels: the true class stands out more at later exits and on easy samples."""
    labels = rng.integers(0, 4, n)
    logits = rng.normal(size=(3, n, 4)).astype(np.float32)
    logits[:, np.arange(n), labels] += np.outer(np.arange(1, 4), 2.2 * (1 - rng.uniform(size=n)))
    return logits, labels


def make_cache(path, nan: bool = False):
    rng = np.random.default_rng(0)
    (val_logits, val_labels), (test_logits, test_labels) = split(400, rng), split(400, rng)
    if nan:
        test_logits[1, 7, 2] = np.nan
    save_logits(ExitLogits(val_logits, val_labels, test_logits, test_labels, np.array(EXIT_MACS),
                           np.array(STAGE_SECONDS), Measurements(batch_size=64)), path)
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return make_cache(tmp_path_factory.mktemp("cache") / "logits.safetensors")


def calibrate(capsys, cache, out, *args):
    code, stdout, err = run_cli(capsys, "calibrate", "--from", cache, "--out", out, *args)
    assert code == 0, err
    return json.loads((out / "calibration.json").read_text()), stdout


def on_test(cache, doc) -> analysis.Evaluation:
    """The written thresholds re-applied to the cached test logits, independently of the command."""
    from exitwise.study.logits_cache import load_logits
    c = load_logits(cache)
    policy = get_policy(doc["policy"])
    if doc["temperatures"]:
        policy = policy.with_temperatures(doc["temperatures"])
    scores = policy.scores(torch.from_numpy(c.test_logits)).numpy().astype(np.float64)
    thresholds = analysis.as_thresholds(doc["result"]["thresholds"], 3)
    return analysis.evaluate(scores, c.test_logits.argmax(-1) == c.test_labels, thresholds, EXIT_MACS)


@pytest.mark.parametrize("args, check", [
    (["--target", "0.6"], lambda r: r["accuracy"] >= 0.6),
    (["--target", "0.6", "--policy", "margin", "--cost", "latency"], lambda r: r["accuracy"] >= 0.6),
    (["--within-points", "2"], lambda r: r["accuracy"] >= r["target"]),
    (["--budget-macs", "180"], lambda r: r["mean_cost"] <= 180),
    (["--budget-ms", "0.3", "--policy", "patience"], lambda r: r["mean_cost"] <= 0.3),
    (["--target", "0.55", "--policy", "max-prob", "--temperature-scaling"], lambda r: r["accuracy"] >= 0.55),
])
def test_each_goal_is_met_on_the_calibration_split_and_evaluated_on_test(tmp_path, capsys, cache, args, check):
    out = tmp_path / "out"
    doc, stdout = calibrate(capsys, cache, out, *args)
    r = doc["result"]
    assert r["status"] == "ok" and check(r)
    assert r["accuracy"] == doc["calibration_split"]["accuracy"]
    recomputed = on_test(cache, doc)
    assert doc["test"]["accuracy"] == recomputed.accuracy and doc["test"]["samples"] == 400
    assert doc["test"]["mean_macs"] == pytest.approx(recomputed.mean_cost)
    assert set(doc["frontier"]["policies"]) == {doc["policy"]} and doc["frontier"]["oracle"]
    assert (out / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    assert "status: ok" in stdout and f"{100 * doc['test']['accuracy']:.2f}%" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["calibration.json", "frontier.png"]


def test_costs_are_in_the_unit_the_goal_asks_for(tmp_path, capsys, cache):
    by_ms, _ = calibrate(capsys, cache, tmp_path / "a", "--budget-ms", "0.15")
    latency, _ = calibrate(capsys, cache, tmp_path / "b", "--target", "0.6", "--cost", "latency")
    for doc in (by_ms, latency):
        assert doc["cost"] == {"unit": "ms", "batch_size": 64} and doc["frontier"]["unit"] == "ms"
        assert doc["result"]["mean_cost"] == pytest.approx(doc["calibration_split"]["ms_per_sample"])


def test_temperature_scaling_reports_calibration_error_before_and_after(tmp_path, capsys, cache):
    doc, stdout = calibrate(capsys, cache, tmp_path / "out", "--target", "0.55", "--temperature-scaling")
    assert len(doc["temperatures"]) == 3 and all(t > 0 for t in doc["temperatures"])
    for split_report in doc["temperature_report"].values():
        assert [e["exit"] for e in split_report] == [0, 1, 2]
        assert all(e["nll_after"] <= e["nll_before"] + 1e-9 for e in doc["temperature_report"]["val"])
    assert "ECE" in stdout


def test_guarantee_states_its_assumption_and_holds_where_it_was_certified(tmp_path, capsys, cache):
    doc, stdout = calibrate(capsys, cache, tmp_path / "out", "--target", "0.55", "--guarantee", "--delta", "0.2")
    r = doc["result"]
    assert r["method"] == "guaranteed" and r["status"] == "ok" and r["delta"] == 0.2 and r["test_size"] == 400
    assert r["certifiable_target"] >= 0.55
    assert "exchangeable" in r["assumption"] and "assumption:" in stdout and "exchangeable" in stdout


@pytest.mark.parametrize("args, reachable", [
    (["--target", "0.999"], "max accuracy"),
    (["--target", "0.999", "--guarantee"], "max certifiable target"),
])
def test_an_unreachable_target_is_reported_with_what_is_reachable_and_the_closest_setting(tmp_path, capsys, cache,
                                                                                           args, reachable):
    doc, stdout = calibrate(capsys, cache, tmp_path / "out", *args)
    r = doc["result"]
    assert r["status"] == "unreachable" and r["thresholds"] is None and r["target"] == 0.999
    assert doc["evaluated"] == "closest setting" and doc["test"]["accuracy"] < 0.999
    best = r["closest"]["accuracy"]
    assert best == doc["calibration_split"]["accuracy"]
    assert "status: unreachable" in stdout and reachable in stdout and "closest setting" in stdout


@pytest.mark.parametrize("args", [
    ["--target", "0.55", "--guarantee", "--temperature-scaling", "--policy", "max-prob"],
    ["--target", "0.999"],
    ["--budget-ms", "0.3", "--cost", "latency"],
])
def test_calibration_json_is_the_typed_report_and_reads_back_to_what_was_written(tmp_path, capsys, cache, args):
    doc, _ = calibrate(capsys, cache, tmp_path / "out", *args)
    report = CalibrationReport.from_json(doc)
    assert report.to_json() == doc
    assert isinstance(report.result, SearchResult) and report.result.status in ("ok", "unreachable")
    assert report.study.batch_size == 64 and report.cost.batch_size == 64


@pytest.mark.parametrize("args, words", [
    (["--budget-macs", "50"], ["budget", "below the cheapest exit"]),
    (["--budget-ms", "0.05"], ["budget", "below the cheapest exit"]),
    (["--target", "0.6", "--guarantee", "--delta", "1"], ["delta"]),
    (["--target", "0.6", "--guarantee", "--delta", "0"], ["delta"]),
    (["--target", "0"], ["desired accuracy"]),
    (["--target", "1.5"], ["desired accuracy"]),
    (["--target", "nan"], ["desired accuracy"]),
    (["--within-points", "-1"], ["points"]),
    (["--target", "0.6", "--budget-macs", "200"], ["not allowed"]),
    ([], ["required"]),
    (["--budget-macs", "200", "--guarantee"], ["guarantee", "not a budget"]),
    (["--target", "0.6", "--policy", "vibes"], ["vibes"]),
    (["--target", "0.6", "--cost", "joules"], ["joules"]),
    (["--target", "0.6", "--delta", "0.2"], ["--delta", "--guarantee"]),  # without --guarantee: was unused, silently
    (["--budget-macs", "200", "--cost", "latency"], ["--budget-ms"]),  # the budget's MACs were used, silently
    (["--target", "0.6", "--precision", "fp32"], ["--device"]),
    (["--target", "0.6", "--device", "tpu"], ["unknown device"]),
    (["--target", "0.6", "--device", "cpu", "--micro-batch", "0"], ["micro-batch"]),
    (["--target", "0.6", "--device", "cpu", "--precision", "fp8"], ["unknown precision"]),
    (["--target", "0.6", "--device", "cpu"], ["does not name the model"]),  # a cache without its model: no re-timing
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, cache, args, words):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "calibrate", "--from", cache, "--out", out, *args)
    assert_user_error(code, err, *words)
    assert not out.exists()


def test_a_cache_holding_nan_logits_is_refused(tmp_path, capsys):
    broken = make_cache(tmp_path / "logits.safetensors", nan=True)
    code, _, err = run_cli(capsys, "calibrate", "--from", broken, "--out", tmp_path / "out", "--target", "0.6")
    assert_user_error(code, err, "NaN")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("edit, words", [
    (lambda c: {"val_logits": c.val_logits[:, :0], "val_labels": c.val_labels[:0]}, "0 validation"),
    (lambda c: {"test_logits": c.test_logits[:, :0], "test_labels": c.test_labels[:0]}, "0 test samples"),
    (lambda c: {"val_logits": c.val_logits[:1], "test_logits": c.test_logits[:1], "exit_macs": c.exit_macs[:1],
                "stage_seconds_per_sample": c.stage_seconds_per_sample[:1]}, "has 1 exits"),
    (lambda c: {"stage_seconds_per_sample": c.stage_seconds_per_sample[:1]}, "disagree in shape"),
    (lambda c: {"stage_seconds_per_sample": -c.stage_seconds_per_sample}, "finite and non-negative"),
])
@pytest.mark.parametrize("goal", [["--target", "0.6"], ["--within-points", "1"]])
def test_a_cache_without_samples_side_exits_or_sound_stage_times_is_refused(tmp_path, capsys, cache, edit, words,
                                                                            goal):
    import dataclasses
    from exitwise.study.logits_cache import load_logits
    whole = load_logits(cache)
    save_logits(dataclasses.replace(whole, **edit(whole)), tmp_path / "logits.safetensors")
    code, _, err = run_cli(capsys, "calibrate", "--from", tmp_path / "logits.safetensors", "--out", tmp_path / "o",
                           *goal)
    assert_user_error(code, err, words)
    assert not (tmp_path / "o").exists()


def test_a_missing_or_foreign_cache_is_refused(tmp_path, capsys):
    code, _, err = run_cli(capsys, "calibrate", "--from", tmp_path / "nowhere", "--out", tmp_path / "o", "--target", "0.6")
    assert_user_error(code, err, "no logits file")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    code, _, err = run_cli(capsys, "calibrate", "--from", tmp_path / "junk.safetensors", "--out", tmp_path / "o",
                           "--target", "0.6")
    assert_user_error(code, err, "cannot read")
    assert not (tmp_path / "o").exists()


def test_a_study_directory_works_as_the_source(tmp_path, capsys, cache):
    study = tmp_path / "study"
    study.mkdir()
    (study / "logits.safetensors").write_bytes(cache.read_bytes())
    doc, _ = calibrate(capsys, study, tmp_path / "out", "--target", "0.6")
    assert doc["result"]["status"] == "ok"


def test_calibrating_into_a_study_folder_is_refused_leaving_the_study_as_it_was(tmp_path, capsys, cache):
    study = tmp_path / "study"
    study.mkdir()
    (study / "logits.safetensors").write_bytes(cache.read_bytes())
    (study / "early_exit.json").write_text("{}")  # the study's chosen setting
    before = {p.name: p.read_bytes() for p in study.iterdir()}
    code, _, err = run_cli(capsys, "calibrate", "--from", study, "--out", study, "--target", "0.6")
    assert_user_error(code, err, "holds a study")
    assert {p.name: p.read_bytes() for p in study.iterdir()} == before

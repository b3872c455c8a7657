"""The report: plots, report.md, self-contained report.html and the terminal summary, from a synthetic study."""
import dataclasses
import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from exitwise.study.report import PLOTS, format_calibration, format_summary, frontier_png, write_report
from exitwise.study import results as results_module
from exitwise.errors import UserError
from exitwise.study.results import CalibrationReport, Frontiers, StudyResults, from_json, to_json

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EXIT_ACCURACY = [0.5912, 0.7034, 0.7718]


def gap(accuracy: float, cost: float, oracle_cost: float) -> dict:
    return {"accuracy": accuracy, "mean_macs": cost, "oracle_macs": oracle_cost, "extra_macs": cost - oracle_cost,
            "cost_ratio": cost / oracle_cost}


def overthinking(wrong_final: int, wrong_at_exit: int, wasted: float, share: float) -> dict:
    return {"samples": 1000, "correct_somewhere": 861, "correct_earlier_wrong_final": wrong_final,
            "correct_earlier_wrong_at_exit": wrong_at_exit, "wasted_macs_per_sample": wasted, "wasted_share": share}


ORACLE = {"accuracy": 0.8612, "mean_macs": 2.9e6,
          "overthinking_full_network": overthinking(87, 87, 4.1e6, 0.4184),
          "overthinking_fixed_cutoff": overthinking(31, 54, 1.3e6, 0.2133),
          "gap_at_full_network": gap(0.7718, 9.8e6, 2.2e6), "gap_at_fixed_cutoff": gap(0.6931, 6.1e6, 1.6e6),
          "gap_at_founding_rule": gap(0.71, 7.1e6, 1.7e6), "gap_at_fastest_within_points": gap(0.7701, 7.1e6, 3e6)}


def synthetic_frontiers(macs: list[int], unit: str = "MACs") -> Frontiers:
    """Shaped like `frontiers.policy_frontiers`: a rising frontier per policy, founding points, an oracle curve."""
    def curve(lo: float, hi: float, n: int = 12) -> list[dict]:
        return [{"cost": macs[0] + (macs[-1] - macs[0]) * (i / (n - 1)) ** 2, "accuracy": lo + (hi - lo) * i / (n - 1),
                 "thresholds": [1.0 - i / n, None]} for i in range(n)]
    return from_json(Frontiers, {
        "unit": unit,
        "policies": {name: [{**p, "val_cost": p["cost"], "val_accuracy": p["accuracy"] + 0.01}
                            for p in curve(0.59 + 0.01 * i, 0.775)]
                     for i, name in enumerate(("entropy", "max-prob", "margin", "patience"))},
        "shared_cutoffs": curve(0.6, 0.77, 20),
        "founding_percentile": [{**p, "desired_accuracy": d} for p, d in zip(curve(0.62, 0.76, 3), (0.7, 0.74, 0.77))],
        "oracle": [{"cost": p["cost"] / 3, "accuracy": p["accuracy"] + 0.05} for p in curve(0.5912, 0.8112)],
        "marks": [{"label": "fixed cutoff 0.6", "cost": 6.1e6, "accuracy": 0.6931}]})


def synthetic_doc(num_points: int = 20, dataset: str = "cifar10") -> dict:
    """A realistic results.json (schema 2) for a 3-exit model on 1000 test images."""
    n, max_cutoff, macs = 1000, math.log(10), [1_200_000, 3_500_000, 9_800_000]
    stage = [2e-5, 4e-5, 8e-5]
    full_seconds = sum(stage) * n

    def at(cutoff: float) -> dict:
        f = cutoff / max_cutoff
        shares = [0.6 * f, 0.3 * f, 1 - 0.9 * f]
        reach = [1.0, 1 - shares[0], shares[2]]
        return {"accuracy": 0.7718 - 0.15 * f ** 2, "exit_shares": shares,
                "mean_macs": sum(s * m for s, m in zip(shares, macs)),
                "predicted_seconds": n * sum(r * s for r, s in zip(reach, stage))}

    sweep = [{"cutoff": c, "test": at(c)} for c in (max_cutoff * i / (num_points - 1) for i in range(num_points))]
    fixed = at(0.6)
    counts = [round(s * n) for s in fixed["exit_shares"]]
    calibration = [{"method": method, "desired_accuracy": d, "status": "ok",
                    "thresholds": [0.3 + d - 0.7, None if d > 0.75 else 0.2], "val_accuracy": d + 0.004,
                    "delta": 0.1 if method == "guaranteed" else None,
                    "test": {"accuracy": d - 0.003 + 0.002 * j, "mean_macs": 6e6 + 3e7 * (d - 0.7),
                             "predicted_seconds": full_seconds * (0.5 + 2 * (d - 0.7)), "exit_shares": [0.4, 0.2, 0.4]}}
                   for j, method in enumerate(("per-exit", "seed-percentile", "empirical", "guaranteed"))
                   for d in (0.70, 0.74, 0.77)]
    best = {"setting": {"label": "cutoff 0.485", "policy": "entropy", "thresholds": [0.485, 0.485]},
            "test": {"accuracy": 0.7701, "mean_macs": 7.1e6, "exit_shares": [0.2, 0.1, 0.7]},
            "timed": {"images": n // 4, "measured_seconds": 0.09, "predicted_seconds": 0.093},
            "speedup": full_seconds / 0.36}
    founding = {**best, "setting": {**best["setting"], "label": "cutoff 1.200", "thresholds": [1.2, 1.2]},
                "test": {**best["test"], "accuracy": 0.71}}
    return json.loads(json.dumps({
        "schema_version": 2, "exitwise_version": "0.1.0", "created": "2026-11-23T22:00:00Z",
        "software": {"exitwise": "0.1.0", "python": "3.11.9", "torch": "2.13.0", "numpy": "2.4.6",
                     "platform": "Linux-x86_64", "cpu_threads": 2},
        "dataset": {"name": dataset, "source": "/data/cifar10-jpg.tar.gz", "classes": [f"c{i}" for i in range(10)],
                    "sizes": {"train": 4000, "val": 1000, "test": n}, "split_seed": 0, "val_size": 1000},
        "model": {"name": "tiny-3exit", "weights": "/w/tiny.safetensors", "weights_sha256": "ab" * 32,
                  "shipped": False, "num_exits": 3},
        "machine": {"cpu": "Test CPU 9000", "capability": "AVX512", "native_bf16": True, "threads": 2,
                    "torch": "2.13.0", "device": "cpu"},
        "precision": "bf16", "precision_check": {
            "precision": "bf16", "agreement_with_fp32": 0.998, "images": 1000, "required": 0.995,
            "tried": [{"precision": "bf16", "ms_per_image": 0.05, "agreement_per_exit": [1.0, 0.999, 0.998],
                       "agreement_with_fp32": 0.998}, {"precision": "fp32", "ms_per_image": 0.2,
                                                       "agreement_with_fp32": 1.0}]},
        "batch_size": 256, "micro_batch": 64, "micro_batch_probe": None, "policy": "entropy", "max_cutoff": max_cutoff,
        "exits": [{"index": k, "accuracy": a, "val_accuracy": a + 0.01, "macs": m}
                  for k, (a, m) in enumerate(zip(EXIT_ACCURACY, macs))],
        "oracle": ORACLE,
        "full_network": {"accuracy": 0.7718, "measured_seconds": full_seconds, "ms_per_image": 1e3 * full_seconds / n,
                         "mean_macs": macs[-1]},
        "fixed_cutoff": {"cutoff": 0.6, "test": {**fixed, "accuracy": 0.6931}, "measured_seconds": 0.081,
                         "ms_per_image": 0.081,
                         "per_exit": [{"index": k, "count": c, "accuracy": 0.9 - 0.1 * k,
                                       "measured_seconds": 0.02 + 0.01 * k} for k, c in enumerate(counts)]},
        "sweep": sweep,
        "timing_model": {"stage_seconds_per_sample": stage,
                         "checks": [{"label": "cutoff 0.6", "predicted_seconds": 0.077, "measured_seconds": 0.081},
                                    {"label": "all exits, no early exit", "predicted_seconds": 0.14,
                                     "measured_seconds": 0.135}],
                         "machine_load_at_start": {"load_average": 0.2, "cpus": 2, "busy": False}},
        "calibration": calibration,
        "frontiers": to_json(synthetic_frontiers(macs)),
        "best": {"founding_rule": founding, "fastest_within_points": best, "within_points": 0.5},
    }))


def synthetic_results(num_points: int = 20, dataset: str = "cifar10", **changes) -> StudyResults:
    """`synthetic_doc` read as typed results, with top-level fields replaced by `changes`."""
    return dataclasses.replace(StudyResults.from_json(synthetic_doc(num_points, dataset)), **changes)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    results = synthetic_results(dataset="<script>alert(1)</script>cifar")
    return results, out, write_report(results, out)


def test_writes_every_plot_and_both_reports_and_nothing_else(report):
    _, out, paths = report
    expected = {*PLOTS, "report.md", "report.html"}
    assert {p.name for p in paths} == expected == {"accuracy_vs_cutoff.png", "time_vs_cutoff.png",
                                                   "time_vs_accuracy.png", "exit_shares.png", "calibration.png",
                                                   "per_exit.png", "frontier.png", "report.md", "report.html"}
    assert {p.name for p in out.iterdir()} == expected  # no temporary files left behind


def test_plots_are_real_pngs(report):
    _, out, _ = report
    for name in PLOTS:
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC
        width, height = struct.unpack(">II", data[16:24])
        assert width >= 600 and height >= 400 and len(data) > 20_000


def test_html_is_self_contained_and_escaped(report):
    _, out, _ = report
    page = (out / "report.html").read_text()
    assert 'src="http' not in page and 'href="http' not in page and "<link" not in page and "<script" not in page
    assert page.count("data:image/png;base64,") == len(PLOTS)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;cifar" in page
    assert "69.31%" in page and "never" in page


def test_markdown_has_the_numbers_and_links_the_images(report):
    results, out, _ = report
    md = (out / "report.md").read_text()
    assert "69.31%" in md  # fixed-cutoff overall accuracy
    assert "86.12%" in md  # oracle
    assert "-4.9%" in md  # a timing-model check
    for name in PLOTS:
        assert f"({name})" in md
    for c in results.calibration:
        assert f"{100 * c.test.accuracy:.2f}%" in md


def test_never_leaving_thresholds_render_as_never(report):
    _, out, _ = report
    md = (out / "report.md").read_text()
    assert "0.370, never" in md  # desired 0.77: the second side exit lets no sample leave
    assert "None" not in md


def test_summary_lists_each_exit_accuracy_in_fixed_width_columns():
    text = format_summary(synthetic_results(precision_check=None))
    for a in EXIT_ACCURACY:
        assert f"{100 * a:.2f}%" in text
    table = text.split("\n\n")[1].splitlines()
    assert table[0].startswith("exit") and set(table[1]) <= {"-", " "}
    assert len({len(line) for line in table[:2]}) == 1  # header and rule line up


def test_a_busy_machine_is_called_out_in_the_summary_and_the_report(tmp_path):
    assert "busy" not in format_summary(synthetic_results())
    doc = synthetic_doc()
    doc["timing_model"]["machine_load_at_start"] = {"load_average": 3.1, "cpus": 2, "busy": True}
    results = StudyResults.from_json(doc)
    assert "busy when the study started (1-minute load average 3.1 on 2 CPUs)" in format_summary(results)
    write_report(results, tmp_path)
    assert "load average 3.1 on 2 CPUs" in (tmp_path / "report.md").read_text()
    doc["timing_model"]["machine_load_at_start"] = {"load_average": 0.1, "cpus": 2, "busy_share": 0.55, "busy": True}
    assert "other work used 55% of the CPUs' time" in format_summary(StudyResults.from_json(doc))


def test_the_setup_names_the_precision_checked_the_machine_and_the_software_unless_not_measured(tmp_path):
    write_report(synthetic_results(), tmp_path / "checked")
    setup = (tmp_path / "checked" / "report.md").read_text()
    assert "bf16 (agrees with fp32 on 99.80% of 1000 images; ms per image here: bf16 0.050, fp32 0.200)" in setup
    assert "| Test CPU 9000 (AVX512, native bf16), device cpu |" in setup  # and where, with what, it was measured
    assert "| exitwise 0.1.0, python 3.11.9, torch 2.13.0, numpy 2.4.6, 2 CPU threads |" in setup
    write_report(synthetic_results(precision_check=None), tmp_path / "given")
    assert "agrees with fp32" not in (tmp_path / "given" / "report.md").read_text()


def test_results_json_round_trips_through_the_typed_results():
    doc = synthetic_doc()
    results = StudyResults.from_json(doc)
    assert StudyResults.from_json(results.to_json()) == results
    assert results.to_json()["timing_model"]["mean_abs_relative_error"] == pytest.approx((0.0494 + 0.037) / 2, abs=1e-3)
    assert (results.model.name, results.dataset.sizes.test) == ("tiny-3exit", 1000)
    assert [results.to_json()[k] for k in ("model", "dataset")] == [doc["model"], doc["dataset"]]  # as written
    with pytest.raises(UserError, match="schema 1"):
        StudyResults.from_json({k: v for k, v in doc.items() if k != "schema_version"})  # results.json before 2


def test_results_json_reads_without_torch(tmp_path):
    """The typed results, with their `model` and `dataset` (`exitwise.refs`), need no torch to read."""
    (tmp_path / "results.json").write_text(json.dumps(synthetic_doc()))
    code = ("import json, sys; sys.modules['torch'] = None\n"  # `import torch` now raises
            "from exitwise.study.results import StudyResults\n"
            f"r = StudyResults.from_json(json.loads(open({str(tmp_path / 'results.json')!r}).read()))\n"
            "print(type(r.model).__name__, type(r.dataset).__name__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={"PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ModelRef", "DatasetRef"]


def test_oracle_and_overthinking_table_in_both_reports_and_the_summary(report):
    _, out, _ = report
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    text = format_summary(synthetic_results())
    for doc in (md, page, text):
        assert "oracle: first correct exit" in doc
        assert "4.45x" in doc  # no early exit pays 9.8 M MACs where the oracle needs 2.2 M at its accuracy
        assert "3.81x" in doc  # the fixed cutoff: 6.1 M vs 1.6 M
        assert "4.10 M (42%)" in doc  # MACs spent after the first correct exit, no early exit
    assert "| 31 | 54 |" in md  # fixed cutoff: right earlier, wrong at final; right earlier, wrong where it left
    assert "(frontier.png)" in md


def test_unreachable_targets_render_as_unreachable_not_as_numbers(tmp_path):
    doc = synthetic_doc()
    doc["calibration"].append({"method": "guaranteed", "desired_accuracy": 0.95, "status": "unreachable",
                               "thresholds": None, "val_accuracy": None, "test": None, "delta": 0.1})
    write_report(StudyResults.from_json(doc), tmp_path)
    row = next(line for line in (tmp_path / "report.md").read_text().splitlines() if "95.00%" in line)
    assert "unreachable" in row and "None" not in row and "nan" not in row


def test_frontier_plot_takes_milliseconds_too():
    data = frontier_png(synthetic_frontiers([0.4, 0.7, 1.4], unit="ms"))
    assert data[:8] == PNG_MAGIC and len(data) > 20_000


def calibration_doc(result: dict, within_points: float | None = None) -> dict:
    """Shaped like what `api.calibrate` returns."""
    split = {"samples": 1000, "accuracy": 0.7512, "mean_macs": 5.6e6, "ms_per_sample": 0.5442,
             "exit_shares": [0.78, 0.1, 0.12]}
    return CalibrationReport.from_json(
        {"policy": "entropy", "meaning": "leave when the entropy is <= t nats", "within_points": within_points,
         "cost": {"unit": "MACs", "batch_size": 256}, "temperatures": None, "temperature_report": None,
         "result": result, "calibration_split": split, "test": {**split, "accuracy": 0.7388}})


def test_calibration_summary_states_the_guarantee_and_its_assumption():
    text = format_calibration(calibration_doc(
        {"method": "guaranteed", "status": "ok", "target": 0.7, "thresholds": [1.076, None], "accuracy": 0.7512,
         "guarantee": "with probability >= 0.9, the accuracy over 1000 new samples is >= 0.7",
         "assumption": "calibration samples and future samples are exchangeable"}))
    assert "status: ok" in text and "1.076, never" in text
    assert "probability >= 0.9" in text and "exchangeable" in text
    assert "75.12%" in text and "73.88%" in text and "0.5442" in text


def test_calibration_summary_of_an_unreachable_target_says_what_is_reachable():
    text = format_calibration(calibration_doc(
        {"method": "empirical", "status": "unreachable", "target": 0.9, "thresholds": None,
         "message": "accuracy 0.9000 is not reachable on the calibration split", "reachable": {"max_accuracy": 0.8234},
         "closest": {"thresholds": [0.123, 0.204], "accuracy": 0.8234, "mean_cost": 5.6e6,
                     "exit_shares": [0.78, 0.1, 0.12]}}, within_points=1.0))
    assert "status: unreachable" in text and "max accuracy 0.8234" in text
    assert "closest setting: thresholds 0.123, 0.204" in text and "1 point below" in text


def test_every_results_field_is_documented_in_the_schema():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "results-schema.md").read_text()
    kinds = [v for v in vars(results_module).values() if dataclasses.is_dataclass(v) and v.__module__ == results_module.__name__]
    assert StudyResults in kinds and len(kinds) > 10
    missing = [f"{kind.__name__}.{name}" for kind in kinds
               for name in [f.name for f in dataclasses.fields(kind)] + [n for n, a in vars(kind).items()
                                                                          if isinstance(a, property)]
               if f"`{name}`" not in doc]
    assert not missing


def test_an_older_files_evidence_reads_with_what_it_lacks_left_empty():
    from exitwise.study.results import Measurements, from_json
    doc = {"precision_check": {  # from before every candidate was timed
        "precision": "bf16", "agreement_with_fp32": 0.999, "images": 2000, "required": 0.995,
        "tried": [{"precision": "bf16", "agreement_per_exit": [1.0, 0.999], "agreement_with_fp32": 0.999}]},
        "machine": {"cpu": "Old CPU"}}  # a record short of a field it cannot do without reads as null
    old = from_json(Measurements, doc)
    assert old.precision_check.tried[0].ms_per_image is None and old.precision_check.agreement_given == ()
    assert old.machine is None and old.model is None
    results = synthetic_doc()
    results["timing_model"]["machine_load_at_start"] = {"load_average": 0.5, "cpus": 2, "busy": False}  # no share
    assert StudyResults.from_json(results).timing_model.machine_load_at_start.busy_share is None

"""The report: plots, report.md, self-contained report.html and the terminal summary, from a synthetic study."""
import json
import math
import struct

import pytest

from exitwise.report import PLOTS, format_summary, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EXIT_ACCURACY = [0.5912, 0.7034, 0.7718]


def synthetic_results(num_points: int = 20, dataset: str = "cifar10") -> dict:
    """A realistic results dict for a 3-exit model on 1000 test images, shaped like results.json."""
    n, max_cutoff, macs = 1000, math.log(10), [1_200_000, 3_500_000, 9_800_000]
    stage = [2e-5, 4e-5, 8e-5]
    full_seconds = sum(stage) * n

    def at(cutoff: float) -> dict:
        f = cutoff / max_cutoff
        shares = [0.6 * f, 0.3 * f, 1 - 0.9 * f]
        reach = [1.0, 1 - shares[0], shares[2]]
        return {"cutoff": cutoff, "overall_accuracy": 0.7718 - 0.15 * f ** 2, "exit_shares": shares,
                "mean_macs": sum(s * m for s, m in zip(shares, macs)),
                "seconds": n * sum(r * s for r, s in zip(reach, stage))}

    sweep = [at(max_cutoff * i / (num_points - 1)) for i in range(num_points)]
    fixed = at(0.6)
    counts = [round(s * n) for s in fixed["exit_shares"]]
    calibration = [{"method": method, "desired_accuracy": d, "thresholds": [0.3 + d - 0.7, None if d > 0.75 else 0.2],
                    "val_accuracy": d + 0.004, "test_accuracy": d - 0.003 + 0.002 * j,
                    "mean_macs": 6e6 + 3e7 * (d - 0.7), "seconds": full_seconds * (0.5 + 2 * (d - 0.7)),
                    "exit_shares": [0.4, 0.2, 0.4]}
                   for j, method in enumerate(("per-exit", "seed-percentile")) for d in (0.70, 0.74, 0.77)]
    best = {"label": "cutoff 0.485", "thresholds": [0.485, 0.485], "test_accuracy": 0.7701, "mean_macs": 7.1e6,
            "exit_shares": [0.2, 0.1, 0.7], "seconds": 0.09, "predicted_seconds": 0.093, "speedup": full_seconds / 0.09}
    return json.loads(json.dumps({
        "exitwise_version": "0.1.0", "created": "2026-11-23T22:00:00Z",
        "software": {"python": "3.11.9", "torch": "2.13.0", "numpy": "2.4.6", "platform": "Linux-x86_64",
                     "cpu_threads": 2},
        "dataset": {"name": dataset, "source": "/data/cifar10-jpg.tar.gz", "classes": [f"c{i}" for i in range(10)],
                    "sizes": {"train": 4000, "val": 1000, "test": n}, "split_seed": 0, "val_size": 1000},
        "model": {"name": "tiny-3exit", "weights": "/w/tiny.safetensors", "weights_sha256": "ab" * 32,
                  "num_exits": 3},
        "precision": "bf16", "batch_size": 256, "policy": "entropy", "max_cutoff": max_cutoff,
        "exits": [{"index": k, "accuracy": a, "val_accuracy": a + 0.01, "macs": m}
                  for k, (a, m) in enumerate(zip(EXIT_ACCURACY, macs))],
        "oracle_accuracy": 0.8612, "oracle_mean_macs": 2.9e6,
        "full_network": {"accuracy": 0.7718, "seconds": full_seconds, "mean_macs": macs[-1]},
        "fixed_cutoff": {"cutoff": 0.6, "overall_accuracy": 0.6931, "seconds": 0.081, "mean_macs": fixed["mean_macs"],
                         "per_exit": [{"index": k, "count": c, "accuracy": 0.9 - 0.1 * k, "seconds": 0.02 + 0.01 * k}
                                      for k, c in enumerate(counts)]},
        "sweep": sweep,
        "timing_model": {"stage_seconds_per_sample": stage,
                         "checks": [{"label": "cutoff 0.6", "predicted_seconds": 0.077, "measured_seconds": 0.081,
                                     "relative_error": -0.0494},
                                    {"label": "all exits, no early exit", "predicted_seconds": 0.14,
                                     "measured_seconds": 0.135, "relative_error": 0.037}],
                         "mean_abs_relative_error": 0.0432},
        "calibration": calibration,
        "best": {"founding_rule": {**best, "label": "cutoff 1.200", "thresholds": [1.2, 1.2], "test_accuracy": 0.71},
                 "fastest_within_0.5_points": best},
        "precision_check": {"agreement_with_fp32": 0.998, "images": 1000, "required": 0.995},
    }))


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
                                                   "per_exit.png", "report.md", "report.html"}
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
    for c in results["calibration"]:
        assert f"{100 * c['test_accuracy']:.2f}%" in md


def test_never_leaving_thresholds_render_as_never(report):
    _, out, _ = report
    md = (out / "report.md").read_text()
    assert "0.370, never" in md  # desired 0.77: the second side exit lets no sample leave
    assert "None" not in md


def test_summary_lists_each_exit_accuracy_in_fixed_width_columns():
    results = synthetic_results()
    del results["precision_check"]
    text = format_summary(results)
    for a in EXIT_ACCURACY:
        assert f"{100 * a:.2f}%" in text
    table = text.split("\n\n")[1].splitlines()
    assert table[0].startswith("exit") and set(table[1]) <= {"-", " "}
    assert len({len(line) for line in table[:2]}) == 1  # header and rule line up


def test_optional_precision_check_may_be_absent_or_none(tmp_path):
    results = synthetic_results()
    results["precision_check"] = None
    write_report(results, tmp_path / "a")
    del results["precision_check"]
    write_report(results, tmp_path / "b")
    assert "agrees with fp32" not in (tmp_path / "b" / "report.md").read_text()

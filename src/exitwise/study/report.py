"""Plots, report.md, a self-contained report.html and a terminal summary from a study's `StudyResults`.

Every table is built once as a header and rows of strings, then rendered as Markdown, HTML or
fixed-width text, so the three outputs cannot disagree.
"""
from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..io import atomic_write_bytes
from .results import NEVER, CalibrationReport, Frontiers, Gap, Overthinking, StudyResults

DPI = 120
Table = tuple[list[str], list[list[str]]]

# -----------------------------------------------------------------------------
# formatting


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _sec(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _macs(x: float | None) -> str:
    if x is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f}"


def _thresholds(values: list[float | None] | None) -> str:
    """None (JSON) or -inf (in memory): the exit never lets a sample leave."""
    return "-" if not values else ", ".join("never" if t is None or t == NEVER else f"{t + 0.0:.3f}" for t in values)


def _shares(values: list[float] | None) -> str:
    return "-" if values is None else "/".join(f"{100 * s:.0f}" for s in values)


def _exit_name(k: int, num_exits: int) -> str:
    return f"{k} (final)" if k == num_exits - 1 else str(k)


def _n_test(r: StudyResults) -> int:
    return r.dataset.sizes.test


def _cutoff_label(r: StudyResults) -> str:
    if r.policy == "entropy":
        return f"entropy cutoff (nats; ln {len(r.dataset.classes)} = {r.max_cutoff:.3f})"
    return f"{r.policy} cutoff"


# -----------------------------------------------------------------------------
# tables: one (header, rows) each, shared by Markdown, HTML and the terminal


def setup_table(r: StudyResults) -> Table:
    ds, model, sw = r.dataset, r.model, r.software
    sizes = f"train {ds.sizes.train}, val {ds.sizes.val}, test {ds.sizes.test}"
    check = r.precision_check
    tried = [t for t in check.tried if t.ms_per_image is not None] if check else []
    timed = "; ms per image here: " + ", ".join(f"{t.precision} {t.ms_per_image:.3f}" for t in tried) if tried else ""
    precision = r.precision + (f" (agrees with fp32 on {_pct(check.agreement_with_fp32)} of "
                               f"{check.images} images{timed})" if check else "")
    host = r.machine
    rows = [["dataset", f"{ds.name}: {len(ds.classes)} classes; {sizes}; split seed {ds.split_seed}"],
            ["source", str(ds.source)],
            ["model", f"{model.name}, {model.num_exits} exits"],
            ["weights", f"{model.weights} (sha256 {model.weights_sha256[:16]})"],
            ["exit policy", f"{r.policy}: leave at the first exit whose score is at or below its threshold"],
            ["precision", precision],
            ["batch size", str(r.batch_size) + (f", micro-batch {r.micro_batch}" if r.micro_batch else "")],
            *([["machine", f"{host.cpu} ({host.capability}, {'native' if host.native_bf16 else 'no native'} "
                           f"bf16), device {host.device}"]] if host else []),
            *([["software", sw.describe()], ["platform", sw.platform]] if sw else []),
            ["created", r.created]]
    return ["item", "value"], rows


def exits_table(r: StudyResults) -> Table:
    k = len(r.exits)
    rows = [[_exit_name(e.index, k), _macs(e.macs), _pct(e.accuracy), _pct(e.val_accuracy)] for e in r.exits]
    return ["exit", "MACs per sample", "test accuracy", "val accuracy"], rows


def fixed_cutoff_table(r: StudyResults) -> Table:
    fixed, n, k = r.fixed_cutoff, _n_test(r), len(r.exits)
    rows = [[_exit_name(e.index, k), str(e.count), _pct(e.count / n), _pct(e.accuracy), _sec(e.measured_seconds)]
            for e in fixed.per_exit]
    rows.append(["all", str(n), _pct(1.0), _pct(fixed.test.accuracy), _sec(fixed.measured_seconds)])
    timed = f"stage time, first {fixed.timed_images} images (s)" if fixed.timed_images else "stage time (s)"
    return ["exit", "samples leaving", "share", "their accuracy", timed], rows


def calibration_table(r: StudyResults) -> Table:
    rows = [[c.method + (f" (delta {c.delta:g})" if c.delta is not None else ""), _pct(c.desired_accuracy),
             _thresholds(c.thresholds) if c.status == "ok" else c.status, _pct(c.val_accuracy),
             *([_pct(c.test.accuracy), _macs(c.test.mean_macs), _sec(c.test.predicted_seconds),
                _shares(c.test.exit_shares)] if c.test else ["-"] * 4)]
            for c in r.calibration]
    return ["method", "desired", "thresholds", "val accuracy", "test accuracy", "mean MACs",
            "time (s, predicted)", "exit shares (%)"], rows


def configurations_table(r: StudyResults) -> Table:
    full, fixed = r.full_network, r.fixed_cutoff
    k = len(r.exits)

    def time(ms: float | None) -> list[str]:
        if ms is None or full.ms_per_image is None:
            return ["-", "-"]
        return [f"{ms:.4f}", f"{full.ms_per_image / ms:.2f}x"]

    rows = [["full network", "no early exit", _thresholds((NEVER,) * (k - 1)), _pct(full.accuracy),
             _macs(full.mean_macs), *time(full.ms_per_image)],
            ["fixed cutoff", f"cutoff {fixed.cutoff:.3f}", _thresholds([fixed.cutoff] * (k - 1)),
             _pct(fixed.test.accuracy), _macs(fixed.test.mean_macs), *time(fixed.ms_per_image)]]
    rows += [[name, f"{c.setting.policy}: {c.setting.label}", _thresholds(c.setting.thresholds), _pct(c.test.accuracy),
              _macs(c.test.mean_macs), *time(c.timed.ms_per_image if c.timed else None)] for name, c in r.best.items()]
    rows.append(["oracle", "first correct exit (bound)", "-", _pct(r.oracle.accuracy), _macs(r.oracle.mean_macs),
                 "-", "-"])
    return ["configuration", "setting", "thresholds", "test accuracy", "mean MACs", "ms per image (measured)",
            "speedup"], rows


def oracle_table(r: StudyResults) -> Table:
    o, fixed, final = r.oracle, r.fixed_cutoff, r.exits[-1]

    def row(name: str, accuracy: float, macs: float, gap: Gap | None, over: Overthinking | None) -> list[str]:
        cells = [name, _pct(accuracy), _macs(macs)]
        cells += ["-", "-"] if gap is None else [_macs(gap.oracle_macs), f"{gap.cost_ratio:.2f}x"]
        cells += ["-"] * 3 if over is None else [
            str(over.correct_earlier_wrong_final), str(over.correct_earlier_wrong_at_exit),
            f"{_macs(over.wasted_macs_per_sample)} ({over.wasted_share:.0%})"]
        return cells

    best = r.best
    rows = [row("oracle: first correct exit", o.accuracy, o.mean_macs, None, None),
            row("no early exit (final exit)", final.accuracy, final.macs, o.gap_at_full_network,
                o.overthinking_full_network),
            row(f"fixed cutoff {fixed.cutoff:g}", fixed.test.accuracy, fixed.test.mean_macs, o.gap_at_fixed_cutoff,
                o.overthinking_fixed_cutoff)]
    rows += [row(name, c.test.accuracy, c.test.mean_macs, gap, None)
             for (name, c), gap in zip(best.items(), (o.gap_at_founding_rule, o.gap_at_fastest_within_points))]
    return ["setting", "test accuracy", "mean MACs", "oracle MACs at that accuracy", "cost / oracle",
            "right earlier, wrong at final", "right earlier, wrong where it left",
            "MACs after first correct exit"], rows


def timing_table(r: StudyResults) -> Table:
    rows = [[c.label, _sec(c.predicted_seconds), _sec(c.measured_seconds), f"{c.relative_error:+.1%}"]
            for c in r.timing_model.checks]
    return ["configuration", "predicted (s)", "measured (s)", "relative error"], rows


# -----------------------------------------------------------------------------
# plots: each builds its own Figure on an Agg canvas (no pyplot state)


def _figure(width: float = 7.5, height: float = 4.6, right: float = 0.2, top: float = 0.4) -> Figure:
    """A figure on an Agg canvas with fixed margins in inches (`right` for a colorbar or outside legend, `top` for
    the title): saving it takes 40% less time than with a layout engine, which lays every figure out twice."""
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.75 / width, right=1 - right / width, bottom=0.6 / height, top=1 - top / height,
                        wspace=0.3)
    return fig


def _style(ax, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)


def _sweep(r: StudyResults) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Cutoffs, accuracy (%), predicted seconds and exit shares (points x exits) of the sweep."""
    s = r.sweep
    return (np.array([p.cutoff for p in s]), 100 * np.array([p.test.accuracy for p in s]),
            np.array([p.test.predicted_seconds for p in s], dtype=float), np.array([p.test.exit_shares for p in s]))


def _time_label(r: StudyResults) -> str:
    return f"time for {_n_test(r)} test images (s)"


def _mark_full_network(ax, r: StudyResults, x: float | None = None) -> None:
    """The full network's measured time: a star at its accuracy, or a horizontal line (when measured)."""
    seconds = r.full_network.measured_seconds
    if seconds is None:
        return
    if x is None:
        ax.axhline(seconds, color="tab:gray", ls="--", label=f"full network, measured ({seconds:.2f} s)")
    else:
        ax.plot(x, seconds, "*", color="tab:red", ms=12, label="full network, measured")


def plot_accuracy_vs_cutoff(r: StudyResults) -> Figure:
    cut, acc, _, _ = _sweep(r)
    fixed, final = r.fixed_cutoff, r.exits[-1]
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot(cut, acc, lw=2, color="tab:blue", label="early exit, one cutoff for every side exit")
    ax.axhline(100 * final.accuracy, color="tab:gray", ls="--", label=f"final exit only ({_pct(final.accuracy)})")
    ax.axhline(100 * r.oracle.accuracy, color="tab:green", ls=":", lw=2,
               label=f"oracle, first correct exit ({_pct(r.oracle.accuracy)})")
    ax.plot(fixed.cutoff, 100 * fixed.test.accuracy, "o", color="tab:red", ms=7,
            label=f"fixed cutoff {fixed.cutoff:.2f}, measured ({_pct(fixed.test.accuracy)})")
    ax.set_xlim(0, r.max_cutoff)
    _style(ax, "Test accuracy vs exit cutoff", _cutoff_label(r), "test accuracy (%)")
    ax.legend(loc="best", fontsize=8)
    return fig


def plot_time_vs_cutoff(r: StudyResults) -> Figure:
    cut, _, sec, _ = _sweep(r)
    fixed = r.fixed_cutoff
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot(cut, sec, lw=2, color="tab:blue", label="early exit (per-stage timing model)")
    _mark_full_network(ax, r)
    if fixed.ms_per_image is not None:  # measured on the timed images, at that rate for the whole test split
        ax.plot(fixed.cutoff, fixed.ms_per_image * _n_test(r) / 1e3, "o", color="tab:red", ms=7,
                label=f"fixed cutoff {fixed.cutoff:.2f}, measured ({fixed.ms_per_image:.3f} ms/image "
                      f"on {fixed.timed_images or _n_test(r)} images)")
    ax.set_xlim(0, r.max_cutoff)
    ax.set_ylim(bottom=0)
    _style(ax, "Inference time vs exit cutoff", _cutoff_label(r), _time_label(r))
    ax.legend(loc="best", fontsize=8)
    return fig


def plot_time_vs_accuracy(r: StudyResults) -> Figure:
    cut, acc, sec, _ = _sweep(r)
    fig = _figure(right=0.1)
    ax = fig.add_subplot()
    points = ax.scatter(acc, sec, c=cut, cmap="viridis", s=18, label="cutoff sweep (predicted time)")
    _mark_full_network(ax, r, 100 * r.full_network.accuracy)
    fig.colorbar(points, ax=ax, label=_cutoff_label(r))
    ax.set_ylim(bottom=0)
    _style(ax, "Time vs accuracy over the cutoff sweep", "test accuracy (%)", _time_label(r))
    ax.legend(loc="upper left", fontsize=8)
    return fig


def plot_exit_shares(r: StudyResults) -> Figure:
    cut, _, _, shares = _sweep(r)
    k = shares.shape[1]
    colors = [f"C{i % 10}" for i in range(k)]
    fig = _figure(right=1.35)
    ax = fig.add_subplot()
    ax.stackplot(cut, 100 * shares.T, colors=colors, alpha=0.85,
                 labels=[f"exit {_exit_name(i, k)}" for i in range(k)])
    ax.set_xlim(0, r.max_cutoff)
    ax.set_ylim(0, 100)
    _style(ax, "Where test samples leave vs exit cutoff", _cutoff_label(r), "share of test samples (%)")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    return fig


def plot_calibration(r: StudyResults) -> Figure:
    _, acc, sec, _ = _sweep(r)
    fig = _figure(top=0.6)
    ax = fig.add_subplot()
    ax.plot(acc, sec, color="0.8", lw=2, zorder=0, label="single cutoff sweep (reference)")
    reached = [c for c in r.calibration if c.test is not None]
    methods = list(dict.fromkeys(c.method for c in reached))
    for i, method in enumerate(methods):
        runs = sorted((c for c in reached if c.method == method), key=lambda c: c.desired_accuracy)
        x = [100 * c.test.accuracy for c in runs]
        y = [c.test.predicted_seconds for c in runs]
        ax.plot(x, y, "o-", color=f"C{i}", ms=5, label=method)
        for c, xi, yi in zip(runs, x, y):
            ax.annotate(f"{100 * c.desired_accuracy:g}%", (xi, yi), textcoords="offset points",
                        xytext=(5, 5 if i % 2 == 0 else -12), fontsize=7, color=f"C{i}")
    _mark_full_network(ax, r, 100 * r.full_network.accuracy)
    ax.set_ylim(bottom=0)
    _style(ax, "Calibrated thresholds: time vs test accuracy\n(each point labelled with its desired accuracy)",
           "test accuracy (%)", f"{_time_label(r)}, predicted")
    ax.legend(loc="upper left", fontsize=8)
    return fig


def plot_per_exit(r: StudyResults) -> Figure:
    k = len(r.exits)
    idx = np.arange(k)
    fixed = r.fixed_cutoff
    fig = _figure(11, 4.4)
    left, right = fig.subplots(1, 2)
    test = left.bar(idx - 0.2, [100 * e.accuracy for e in r.exits], 0.4, color="tab:blue", label="test")
    left.bar(idx + 0.2, [100 * e.val_accuracy for e in r.exits], 0.4, color="tab:cyan", label="validation")
    left.bar_label(test, fmt="%.1f", fontsize=7)
    left.set_ylim(0, 118)
    _style(left, "Accuracy of each exit on every sample", "exit (index)", "accuracy (%)")
    left.legend(loc="upper center", ncols=2, fontsize=8)
    counts = right.bar(idx, [e.count for e in fixed.per_exit], 0.6, color="tab:orange",
                       label="samples leaving (labels: their accuracy)")
    right.bar_label(counts, labels=[_pct(e.accuracy) for e in fixed.per_exit], fontsize=7)
    right.set_ylim(0, 1.2 * max(e.count for e in fixed.per_exit) + 1)
    _style(right, f"Fixed cutoff {fixed.cutoff:.2f}: where test samples leave", "exit (index)",
           "test samples leaving (count)")
    right.legend(loc="upper center", fontsize=8)
    for ax in (left, right):
        ax.set_xticks(idx, [_exit_name(i, k) for i in idx])
    return fig


def plot_frontier(f: Frontiers) -> Figure:
    """`f` as built by `frontiers.policy_frontiers`: per policy its frontier (chosen on validation) evaluated on test
    as a line, the founding methods as markers, the hindsight oracle dashed, and any marks as labelled points."""
    scale, unit = (1e6, "million MACs") if f.unit == "MACs" else (1.0, "ms")

    def xy(points) -> tuple[list[float], list[float]]:
        return [p.cost / scale for p in points], [100 * p.accuracy for p in points]

    fig = _figure()
    ax = fig.add_subplot()
    for i, (name, points) in enumerate(f.policies.items()):
        ax.plot(*xy(points), ".-", color=f"C{i}", lw=1.5, ms=4, label=f"{name}: Pareto frontier chosen on validation")
    ax.plot(*xy(f.shared_cutoffs), "x", color="0.5", ms=4, label="one shared entropy cutoff (founding)")
    ax.plot(*xy(f.founding_percentile), "s", color="tab:brown", mfc="none", ms=7,
            label="seed percentile rule, entropy (founding)")
    ax.plot(*xy(f.oracle), "--", color="black", lw=1.5, label="oracle: least cost at each accuracy (hindsight)")
    for mark, symbol in zip(f.marks, "*PXD"):
        ax.plot(mark.cost / scale, 100 * mark.accuracy, symbol, color="black", ms=9, label=mark.label)
    _style(ax, "Cost vs test accuracy: exit policies, founding methods and the oracle", f"mean {unit} per sample",
           "test accuracy (%)")
    ax.legend(loc="lower right", fontsize=7)
    return fig


def frontier_png(frontiers: Frontiers) -> bytes:
    return _png(plot_frontier(frontiers))


PLOTS: dict[str, tuple[Callable[[StudyResults], Figure], str]] = {
    "accuracy_vs_cutoff.png": (plot_accuracy_vs_cutoff, "Overall test accuracy vs the shared exit cutoff"),
    "time_vs_cutoff.png": (plot_time_vs_cutoff, "Inference time vs the shared exit cutoff"),
    "time_vs_accuracy.png": (plot_time_vs_accuracy, "Time vs accuracy over the cutoff sweep"),
    "exit_shares.png": (plot_exit_shares, "Share of test samples leaving at each exit vs cutoff"),
    "calibration.png": (plot_calibration, "Calibrated per-exit thresholds: time vs test accuracy"),
    "per_exit.png": (plot_per_exit, "Accuracy per exit, and where samples leave at the fixed cutoff"),
    "frontier.png": (lambda r: plot_frontier(r.frontiers),
                     "Mean MACs vs test accuracy: each policy's frontier, the founding methods and the oracle"),
}


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, pil_kwargs={"compress_level": 1})  # 8% larger, 10% faster than 6
    return buf.getvalue()


# -----------------------------------------------------------------------------
# documents


@dataclass
class Section:
    title: str
    text: str
    table: Table | None = None
    images: tuple[str, ...] = ()


def _sections(r: StudyResults) -> list[Section]:
    full, fixed, tm = r.full_network, r.fixed_cutoff, r.timing_model
    n = _n_test(r)
    stage_ms = " / ".join(f"{1e3 * s:.4f}" for s in tm.stage_seconds_per_sample)
    timed = r.best.fastest_within_points.timed
    error = tm.mean_abs_relative_error
    return [
        Section("Setup", f"Test split: {n} images. Accuracies are over the whole test split; predicted times are for the whole "
                         f"test split, real early-exit runs time its first {fixed.timed_images or n} images.", setup_table(r)),
        Section("Exits", "Accuracy of each exit when every sample runs through every exit; MACs are cumulative "
                         f"for a sample leaving there. Oracle (each sample at its first correct exit): "
                         f"{_pct(r.oracle.accuracy)}.", exits_table(r), ("per_exit.png",)),
        Section("Fixed cutoff", f"Every side exit uses cutoff {fixed.cutoff:.3f}: overall accuracy "
                                f"{_pct(fixed.test.accuracy)} and mean {_macs(fixed.test.mean_macs)} MACs per sample, "
                                f"vs {_pct(full.accuracy)} for the full network; run with real early exit on "
                                f"{fixed.timed_images or n} test images: {_sec(fixed.ms_per_image)} ms per image, vs "
                                f"{_sec(full.ms_per_image)} for the full network.", fixed_cutoff_table(r)),
        Section("Cutoff sweep", f"{len(r.sweep)} shared cutoffs from 0 to {r.max_cutoff:.3f}; times from the "
                                "per-stage timing model.",
                images=("accuracy_vs_cutoff.png", "time_vs_cutoff.png", "time_vs_accuracy.png", "exit_shares.png")),
        Section("Calibration", "Per-exit thresholds chosen on the validation split for each desired accuracy, "
                               "evaluated on test. 'never' means no sample leaves at that exit. 'empirical': the "
                               "cheapest setting meeting the target on validation, no promise for new data; "
                               "'guaranteed': Learn then Test, the test accuracy is at or above the target with "
                               "probability at least 1 - delta if validation and test samples are exchangeable; "
                               "'unreachable': no setting meets the target (nothing is clamped).",
                calibration_table(r), ("calibration.png",)),
        Section("Best configurations", "Settings chosen on validation, then run on test with real early exit; "
                                       "time per image measured on all test images for the full network (in the "
                                       "all-exits pass, side heads' time removed) and the fixed cutoff, on the first "
                                       f"{timed.images if timed else '-'} for the best settings; speedup is against "
                                       "the full network.",
                configurations_table(r)),
        Section("Frontiers, oracle and overthinking",
                "The oracle sends each test sample to its first correct exit (samples wrong everywhere pay the full "
                f"network): {_pct(r.oracle.accuracy)} at {_macs(r.oracle.mean_macs)} MACs per sample, a "
                "bound no policy reaches. 'Oracle MACs at that accuracy' is the least mean cost at which any exit "
                "assignment, knowing the labels, reaches a setting's accuracy. Overthinking: samples an earlier exit "
                "got right but the final exit (or the exit where they left) got wrong, and the MACs spent after each "
                "sample's first correct exit, per test sample.", oracle_table(r), ("frontier.png",)),
        Section("Timing model", f"Time per sample for each stage (ms): {stage_ms}. Mean absolute relative error "
                                f"against real runs: {'-' if error is None else f'{error:.1%}'}. {busy_warning(r)}",
                timing_table(r)),
    ]


def _title(r: StudyResults) -> str:
    return f"exitwise report: {r.model.name} on {r.dataset.name}"


def _words(table: Table) -> set[int]:
    """Columns of words rather than numbers: left-aligned in every rendering."""
    header, rows = table
    return {i for i in range(len(header)) if i == 0 or any(row[i][:1].isalpha() for row in rows)}


def _md_table(table: Table) -> str:
    header, rows = table
    line = lambda cells: "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
    words = _words(table)
    rule = "|" + "".join(":---|" if i in words else "---:|" for i in range(len(header)))
    return "\n".join([line(header), rule, *map(line, rows)])


def _markdown(r: StudyResults, sections: list[Section]) -> str:
    parts = [f"# {_title(r)}", f"exitwise {r.exitwise_version}, created {r.created} (results schema {r.schema_version})"]
    for s in sections:
        parts += [f"## {s.title}", s.text]
        parts += [_md_table(s.table)] if s.table else []
        parts += [f"![{PLOTS[name][1]}]({name})" for name in s.images]
    return "\n\n".join(parts) + "\n"


CSS = """
body { font-family: system-ui, sans-serif; max-width: 1150px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
.w { text-align: left; }
th { background: #f0f0f0; }
tr:nth-child(even) td { background: #fafafa; }
figure { margin: 1.5em 0; }
img { max-width: 100%; }
figcaption { color: #555; font-size: 0.9em; }
"""


def _html_table(table: Table) -> str:
    header, rows = table
    words = _words(table)
    cell = lambda i, c, tag: f"<{tag} class={'w' if i in words else 'n'}>{html.escape(str(c))}</{tag}>"
    row = lambda cells, tag: "<tr>" + "".join(cell(i, c, tag) for i, c in enumerate(cells)) + "</tr>"
    return f"<table><thead>{row(header, 'th')}</thead><tbody>{''.join(row(r, 'td') for r in rows)}</tbody></table>"


def _html(r: StudyResults, sections: list[Section], pngs: dict[str, bytes]) -> str:
    esc = html.escape
    body = [f"<h1>{esc(_title(r))}</h1>", f"<p>exitwise {esc(r.exitwise_version)}, created {esc(r.created)}</p>"]
    for s in sections:
        body += [f"<h2>{esc(s.title)}</h2>", f"<p>{esc(s.text)}</p>"]
        body += [_html_table(s.table)] if s.table else []
        for name in s.images:
            data = base64.b64encode(pngs[name]).decode("ascii")
            body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{esc(PLOTS[name][1])}">'
                        f"<figcaption>{esc(PLOTS[name][1])}</figcaption></figure>")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(_title(r))}</title>'
            f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_report(results: StudyResults, out_dir: Path) -> list[Path]:
    """Write the PNG plots, report.md and a self-contained report.html into `out_dir`; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pngs = {name: _png(plot(results)) for name, (plot, _) in PLOTS.items()}
    sections = _sections(results)
    files = {**pngs, "report.md": _markdown(results, sections).encode(),
             "report.html": _html(results, sections, pngs).encode()}
    for name, data in files.items():
        atomic_write_bytes(out_dir / name, data)
    return [out_dir / name for name in files]


# -----------------------------------------------------------------------------
# terminal


def _text_table(table: Table) -> str:
    header, rows = table
    widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header))]
    words = _words(table)
    line = lambda cells: "  ".join(str(c).ljust(w) if i in words else str(c).rjust(w)
                                   for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def busy_warning(r: StudyResults) -> str:
    """A warning when the CPUs were busy as the study started (its times are then slow and noisy), else ''."""
    load = r.timing_model.machine_load_at_start
    if load is None or not load.busy:
        return ""
    share = "" if load.busy_share is None else f"other work used {load.busy_share:.0%} of the CPUs' time, "
    average = "" if load.load_average is None else f"1-minute load average {load.load_average:.1f} on "
    return (f"warning: the machine was busy when the study started ({share}{average}{load.cpus} CPUs); if other work "
            f"ran beside it, its measured times are slow and noisy")


def format_summary(results: StudyResults) -> str:
    """A plain-text summary for the terminal: the exits and the main configurations, fixed-width columns."""
    r = results
    error = r.timing_model.mean_abs_relative_error
    host = f", on {r.machine.cpu}" if r.machine else ""
    head = (f"{r.model.name} on {r.dataset.name} ({_n_test(r)} test images, {r.precision}{host}), "
            f"timing model error {'-' if error is None else f'{error:.1%}'}")
    if warning := busy_warning(r):
        head += f"\n{warning}"
    return "\n\n".join([head, _text_table(exits_table(r)), _text_table(configurations_table(r)),
                        _text_table(oracle_table(r))])


def calibration_split_table(doc: CalibrationReport) -> Table:
    rows = [[name, _pct(e.accuracy), _macs(e.mean_macs), f"{e.ms_per_sample:.4f}", _shares(e.exit_shares)]
            for name, e in (("calibration (validation)", doc.calibration_split), ("test", doc.test))]
    return ["split", "accuracy", "mean MACs", f"ms per sample (batch {doc.cost.batch_size})",
            "exit shares (%)"], rows


def format_calibration(doc: CalibrationReport) -> str:
    """What `exitwise calibrate` prints: the goal, the status, the thresholds (or what is reachable and the closest
    setting), and accuracy and cost on the calibration and test splits."""
    r, unit = doc.result, doc.cost.unit
    points = doc.within_points
    if r.budget is not None:
        goal = f"most accurate within {r.budget:g} {unit} per sample"
    else:
        goal = f"target accuracy {r.target:.4f}" + (
            f" ({points:g} point{'s' * (points != 1)} below the final exit's calibration accuracy)"
            if points is not None else "") + f", least mean {unit}"
    lines = [f"{doc.policy} policy ({doc.meaning}), {r.method}: {goal}", f"status: {r.status}"]
    if r.status == "ok":
        lines.append(f"thresholds: {_thresholds(r.thresholds)}")
    else:
        reachable = ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in r.reachable.items())
        lines += [r.message, f"reachable: {reachable}",
                  f"closest setting: thresholds {_thresholds(r.closest.thresholds)} (evaluated below)"]
    if r.guarantee is not None:
        lines += [f"guarantee: {r.guarantee}", f"assumption: {r.assumption}"]
    if doc.temperatures is not None:
        ece = "; ".join(f"{e.ece_before:.3f} -> {e.ece_after:.3f}" for e in doc.temperature_report.test)
        lines += [f"temperatures per exit: {', '.join(f'{t:.3f}' for t in doc.temperatures)}",
                  f"test calibration error (ECE) per exit, before -> after: {ece}"]
    if doc.timing is not None and doc.timing.machine:
        lines.append(f"stage times re-timed: {doc.timing.machine.describe()}, "
                     f"{doc.timing.precision}, micro-batch {doc.timing.micro_batch}")
    return "\n".join(lines) + "\n\n" + _text_table(calibration_split_table(doc))

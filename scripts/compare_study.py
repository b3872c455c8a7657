"""Check that a study's figures are unchanged: every non-timing figure of an old results.json (schema 1 or 2)
against this code's `analyse` of the same cached logits, or against another study's results.json.

    python scripts/compare_study.py OLD_STUDY_DIR            # re-analyse OLD_STUDY_DIR/logits.safetensors
    python scripts/compare_study.py OLD_STUDY_DIR NEW_STUDY_DIR

Compared: per-exit accuracies, the fixed cutoff's outcome and leavers, the sweep, every calibration entry, the oracle
and overthinking, the frontiers, the two chosen settings and their test outcomes; with the same logits also the cost
model's predicted seconds (they come from the cached stage times). Not compared: anything measured by a clock.
Prints each difference and exits 1 if there is one.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from exitwise.study.logits_cache import load_logits
from exitwise.study.results import StudyResults, to_json
from exitwise.study import StudyConfig, analyse


def _outcome(accuracy, mean_macs, shares, seconds=None) -> dict:
    return {"accuracy": accuracy, "mean_macs": mean_macs, "exit_shares": shares, "predicted_seconds": seconds}


def figures_v1(r: dict) -> dict:
    """The comparable figures of a schema-1 results.json, under schema 2's names."""
    fixed, o = r["fixed_cutoff"], r["oracle"]
    best = {key if key == "founding_rule" else "fastest_within_points": b for key, b in r["best"].items()}
    cal = [{"method": c["method"], "desired_accuracy": c["desired_accuracy"], "status": c.get("status", "ok"),
            "thresholds": c["thresholds"], "val_accuracy": c["val_accuracy"],
            "test": None if c["test_accuracy"] is None else
            _outcome(c["test_accuracy"], c["mean_macs"], c["exit_shares"], c["seconds"])} for c in r["calibration"]]
    rename = {"wasted_cost_per_sample": "wasted_macs_per_sample"}
    gap = lambda g: {"accuracy": g["accuracy"], "mean_macs": g["cost"], "oracle_macs": g["oracle_cost"],
                     "extra_macs": g["extra_cost"], "cost_ratio": g["cost_ratio"]}
    frontiers = {k: v for k, v in r["frontiers"].items() if k != "marks"}
    return {
        "exits": [{"index": e["index"], "macs": e["macs"], "accuracy": e["accuracy"], "val_accuracy": e["val_accuracy"]}
                  for e in r["exits"]],
        "full_network.accuracy": r["full_network"]["accuracy"], "full_network.mean_macs": r["full_network"]["mean_macs"],
        "fixed_cutoff.test": _outcome(fixed["overall_accuracy"], fixed["mean_macs"],
                                      [e["count"] / r["dataset"]["sizes"]["test"] for e in fixed["per_exit"]]),
        "fixed_cutoff.leavers": [(e["count"], e["accuracy"]) for e in fixed["per_exit"]],
        "sweep": [{"cutoff": s["cutoff"], "test": _outcome(s["overall_accuracy"], s["mean_macs"], s["exit_shares"],
                                                           s["seconds"])} for s in r["sweep"]],
        "calibration": cal,
        "oracle": {"accuracy": o["accuracy"], "mean_macs": o["mean_macs"],
                   "overthinking_full_network": {rename.get(k, k): v for k, v in o["overthinking"]["full_network"].items()},
                   "overthinking_fixed_cutoff": {rename.get(k, k): v for k, v in o["overthinking"]["fixed_cutoff"].items()},
                   "gap_at_full_network": gap(o["gap_at_full_network"]), "gap_at_fixed_cutoff": gap(o["gap_at_fixed_cutoff"]),
                   "gap_at_founding_rule": gap(o["gap_at_best"]["founding_rule"]),
                   "gap_at_fastest_within_points": gap(next(g for k, g in o["gap_at_best"].items()
                                                            if k != "founding_rule"))},
        "frontiers": frontiers,
        "best": {key: {"label": b["label"], "policy": b["policy"], "thresholds": b["thresholds"],
                       "test": _outcome(b["test_accuracy"], b["mean_macs"], b["exit_shares"])}
                 for key, b in best.items()},
        "stage_seconds_per_sample": r["timing_model"]["stage_seconds_per_sample"],
    }


def figures_v2(r: dict) -> dict:
    """The same figures of a schema-2 results.json."""
    fixed, best = r["fixed_cutoff"], r["best"]
    frontiers = {k: v for k, v in r["frontiers"].items() if k not in ("marks", "unit")}
    point = lambda p: {k: v for k, v in p.items() if v is not None}
    return {
        "exits": r["exits"],
        "full_network.accuracy": r["full_network"]["accuracy"], "full_network.mean_macs": r["full_network"]["mean_macs"],
        "fixed_cutoff.test": {**fixed["test"], "predicted_seconds": None},
        "fixed_cutoff.leavers": [(e["count"], e["accuracy"]) for e in fixed["per_exit"]],
        "sweep": r["sweep"],
        "calibration": [{k: v for k, v in c.items() if k != "delta"} for c in r["calibration"]],
        "oracle": r["oracle"],
        "frontiers": {"unit": r["frontiers"]["unit"],
                      **{k: ({n: [point(p) for p in ps] for n, ps in v.items()} if k == "policies" else
                             [point(p) for p in v]) for k, v in frontiers.items()}},
        "best": {key: {**best[key]["setting"], "test": {**best[key]["test"], "predicted_seconds": None}}
                 for key in ("founding_rule", "fastest_within_points")},
        "stage_seconds_per_sample": r["timing_model"]["stage_seconds_per_sample"],
    }


def figures(r: dict) -> dict:
    return figures_v2(r) if r.get("schema_version") == 2 else figures_v1(r)


def differences(a, b, path: str = "") -> list[str]:
    """Every place two JSON values differ (exactly: lists and tuples alike, ints equal to floats)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in
                (differences(a.get(k), b.get(k), f"{path}.{k}") if k in a and k in b else [f"{path}.{k}: only in one"])]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path}: {len(a)} vs {len(b)} items"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


def config_of(r: dict) -> StudyConfig:
    """The study settings a results.json was made with."""
    founding = [c for c in r["calibration"] if c["method"] in ("per-exit", "seed-percentile")]
    within = r["best"].get("within_points") or next(float(k.split("_")[2]) for k in r["best"] if k != "founding_rule")
    return StudyConfig(cutoff=r["fixed_cutoff"]["cutoff"], num_cutoffs=len(r["sweep"]), policy=r["policy"],
                       desired_accuracies=tuple(dict.fromkeys(c["desired_accuracy"] for c in founding)),
                       methods=tuple(dict.fromkeys(c["method"] for c in founding)), within_points=within,
                       batch_size=r["batch_size"], progress=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old", type=Path, help="a study's output folder (results.json, logits.safetensors)")
    parser.add_argument("new", type=Path, nargs="?", help="another study's folder (default: re-analyse OLD's logits)")
    args = parser.parse_args()
    old_dir = args.old
    old = json.loads((old_dir / "results.json").read_text())
    if args.new is not None:
        new, what = json.loads((args.new / "results.json").read_text()), f"{args.new}/results.json"
    else:
        new = to_json(analyse(load_logits(old_dir), config_of(old)))
        StudyResults.from_json(new)  # and the typed results read back
        what = "this code's analyse of the same logits"
    a, b = figures(old), figures(new)
    if args.new is not None:  # a separate run measured its own stage times: predicted seconds differ by design
        for f in (a, b):
            f.pop("stage_seconds_per_sample")
            for item in [*f["sweep"], *(c for c in f["calibration"] if c["test"])]:
                item["test"]["predicted_seconds"] = None
            f.pop("best")  # the fastest setting is chosen by predicted time
            f["oracle"].pop("gap_at_fastest_within_points")
            f["oracle"].pop("gap_at_founding_rule")
    found = differences(a, b)
    count = len(json.dumps(a))
    print(f"{old_dir}/results.json (schema {old.get('schema_version', 1)}) vs {what}: "
          f"{len(found)} differences over {len(a)} groups ({count} characters of figures)")
    for d in found[:50]:
        print("  " + d)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())

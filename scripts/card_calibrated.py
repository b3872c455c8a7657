"""Record a study's chosen setting ("fastest within 0.5 points", chosen on validation) in a shipped model's card.

    exitwise study --dataset cifar10 --data-dir ../shared/data/cifar10-jpg.tar.gz --model b-resnet11 --out /tmp/s11
    python scripts/card_calibrated.py /tmp/s11

writes the card's `calibrated` key (policy, temperatures, thresholds, validation and test accuracy, mean MACs),
which `exitwise serve --model NAME` serves. Only a study of the shipped weights is accepted.
"""
import argparse
import json
from dataclasses import replace
from pathlib import Path

from exitwise import records
from exitwise.exit_rule import as_thresholds
from exitwise.io import atomic_write_json
from exitwise.policies import exit_arrays, get_policy
from exitwise.study.analysis import evaluate
from exitwise.study.logits_cache import load_logits
from exitwise.models import CalibratedSetting, shipped_card
from exitwise.models.weights import SHIPPED_WEIGHTS_DIR


def calibrated(study: Path) -> tuple[str, CalibratedSetting]:
    results = json.loads((study / "results.json").read_text())
    model = json.loads((study / "early_exit.json").read_text())
    best = results["best"]["fastest_within_points"]
    setting = best["setting"]
    if setting["thresholds"] != model["thresholds"] or setting["policy"] != model["policy"]:
        raise SystemExit("early_exit.json is not the study's fastest setting within its points")
    if not results["model"].get("shipped"):
        raise SystemExit("the study did not run the shipped weights")
    logits = load_logits(study / "logits.safetensors")
    policy = get_policy(model["policy"])
    if model["temperatures"]:
        policy = policy.with_temperatures(model["temperatures"])
    val = exit_arrays(logits.val_logits, logits.val_labels, policy)
    thresholds = as_thresholds(model["thresholds"], len(val.scores))
    val_accuracy = evaluate(val.scores, val.correct, thresholds, logits.exit_macs).accuracy
    return results["model"]["name"], records.from_json(CalibratedSetting, {  # the card's JSON, typed
        "rule": f"fastest within {results['best']['within_points']:g} points of the final exit, chosen on validation",
        "policy": model["policy"], "temperatures": model["temperatures"], "thresholds": model["thresholds"],
        "val_accuracy": val_accuracy, "test_accuracy": best["test"]["accuracy"], "mean_macs": best["test"]["mean_macs"],
        "exit_shares": best["test"]["exit_shares"], "study_precision": results["precision"],
        "exitwise_version": results["exitwise_version"]})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", type=Path, help="a study of a shipped model's shipped weights")
    name, setting = calibrated(parser.parse_args().study)
    atomic_write_json(SHIPPED_WEIGHTS_DIR / f"{name}.json", replace(shipped_card(name), calibrated=setting).to_json())
    print(f"{name}: {setting.policy} {records.to_json(setting.thresholds)}, val {setting.val_accuracy:.2%}, "
          f"test {setting.test_accuracy:.2%}")

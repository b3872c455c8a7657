"""The Python API behind the CLI: each function does one user-level job from names and paths."""
from __future__ import annotations

import dataclasses
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np

from . import __version__
from .study import analysis, calibration
from .data import Splits, load_splits
from .io import atomic_write_bytes, atomic_write_json, check_writable_dir, file_sha256, staged_output
from .errors import UserError
from .study.logits_cache import ExitLogits, load_logits
from .early_exit import EarlyExitModel
from .study.frontiers import policy_frontiers
from .config import check_micro_batch, check_precision
from .device import resolve_device
from .models import (MODELS, check_fits, check_unchanged, create_model, load_weights, shipped_card, shipped_weights,
                     weight_files)
from .models.base import MultiExitNetwork
from .policies import ExitArrays, exit_arrays, get_policy
from .study.results import Mark, StudyResults, to_json
from .study import StudyConfig, run_study, time_stages, write_study


def load_model(name: str | Path, weights: str | Path | None = None) -> tuple[MultiExitNetwork, dict]:
    """A registered model with its weights (given, or shipped with the package), or the attached model in a folder
    `exitwise attach` wrote (its own weights), and a description of either."""
    from .models.attach import is_model_dir
    if weights is None and is_model_dir(name):
        model = create_model(name)
        path = Path(name) / "model.safetensors"
        return model, {"name": str(Path(name).resolve()), "weights": str(path), "weights_sha256": file_sha256(path),
                       "shipped": False, "num_exits": model.num_exits}
    model = create_model(name)
    path = Path(weights) if weights is not None else shipped_weights(name)
    if path is None:
        raise UserError(f"no weights ship with model {name!r}: pass --weights FILE")
    load_weights(model, path)
    return model, {"name": name, "weights": str(path), "weights_sha256": file_sha256(*weight_files(path)),
                   "shipped": weights is None, "num_exits": model.num_exits}


def study(*, dataset: str, data_dir: str | Path | None, model: str, out: str | Path,
          weights: str | Path | None = None, download: bool = False, val_size: int | None = None,
          split_seed: int = 0, image_size: int | None = None, **settings) -> StudyResults:
    """Run the whole early-exit study and write results.json, logits, early_exit.json, plots and reports into
    `out`; `settings` are `StudyConfig` fields (its defaults otherwise). `model`: a registered name or a folder
    `exitwise attach` wrote."""
    config = StudyConfig(**settings)
    check_writable_dir(out)  # fail before the long work, not after it
    net, info = load_model(model, weights)
    splits = load_splits(dataset, data_dir, download=download, val_size=val_size,
                         split_seed=split_seed, progress=config.progress, image_size=image_size)
    check_fits(net, splits.test, splits.dataset)
    done = run_study(net, splits, config, info)
    write_study(done, out)
    return done.results


# digits are 8x8 and not mirror-symmetric: a 1-pixel crop jitter and no flips; 30 epochs take seconds
TRAIN_DEFAULTS = {"digits": {"crop_padding": 1, "flip": False, "epochs": 30, "batch_size": 64, "lr": 0.05}}


def train(*, dataset: str, data_dir: str | Path | None, model: str, out: str | Path,
          resume: str | Path | None = None, download: bool = False, val_size: int | None = None,
          split_seed: int = 0, progress: bool = True, device: str = "auto", image_size: int | None = None,
          **recipe) -> dict | None:
    """Train a registered model on a dataset's train split; returns the model card (None on ranks > 0)."""
    from .device import resolve_device
    from .train import TrainConfig, train as run_training
    check_writable_dir(out)
    resolve_device(device)
    net = create_model(model)
    splits = load_splits(dataset, data_dir, download=download, val_size=val_size, split_seed=split_seed,
                         progress=progress, image_size=image_size)
    config = None if resume is not None and not recipe else TrainConfig(**{**TRAIN_DEFAULTS.get(dataset, {}), **recipe})
    return run_training(net, splits, config, out, resume=resume, progress=progress, model_name=model, device=device)


# heads on a frozen network learn in a few epochs
ATTACH_DEFAULTS = {"epochs": 10, "lr": 0.05, "label_smoothing": 0.0}


def train_exits(network: MultiExitNetwork, splits, out: str | Path, *, freeze_backbone: bool = True,
                resume: str | Path | None = None, progress: bool = True, model_name: str = "attached",
                **recipe) -> dict | None:
    """Train an attached network's exits on `splits` (see `attach`), with the backbone frozen (the final exit stays
    the user's model; only the side heads' weights are written) or, with `freeze_backbone=False`, jointly with the
    network (add `distill=...` to learn from the final exit). Checkpoints, resume, DDP and the model card are
    `exitwise train`'s. `recipe`: TrainConfig fields over ATTACH_DEFAULTS (digits: TRAIN_DEFAULTS' augmentation)."""
    from .train import TrainConfig, train as run_training
    if resume is not None and not recipe:
        config = None
    else:
        config = TrainConfig(**{**TRAIN_DEFAULTS.get(splits.dataset, {}), **ATTACH_DEFAULTS,
                                "freeze_backbone": freeze_backbone, **recipe})
    return run_training(network, splits, config, out, resume=resume, progress=progress, model_name=model_name)


def attach_model(*, model_file: str, exits: Sequence[str], dataset: str, data_dir: str | Path | None,
                 out: str | Path, weights: str | Path | None = None, image_size: int | None = None,
                 freeze_backbone: bool = True, max_head_fraction: float = 0.25, token_pool: str = "mean",
                 head: str | Sequence[str] = "auto", output_key: str | None = None, resume: str | Path | None = None,
                 download: bool = False, val_size: int | None = None, split_seed: int = 0, progress: bool = True,
                 splits: Splits | None = None, **recipe) -> dict | None:
    """`exitwise attach`: build the user's model from FILE:FUNCTION (running their code), load their weights, attach
    exits, train them, and write into `out` the heads' weights, the card and `attach.json` (what rebuilds it).
    `splits` (from Python) replaces the data set named by `dataset` and `data_dir`. `head`: one kind for every
    exit or one per exit; attach.json records what `auto` chose."""
    from .models.attach import ATTACH_FILE, attach, attach_spec, build_user_model, load_user_weights
    from .models.heads import check_head_options
    check_writable_dir(out)
    check_head_options(token_pool, head)  # before any work
    model = build_user_model(model_file)
    if weights is not None:
        load_user_weights(model, weights)
    splits = splits or load_splits(dataset, data_dir, download=download, val_size=val_size, split_seed=split_seed,
                                   progress=progress, image_size=image_size)
    n, h, w, c = splits.train.images.shape
    network = attach(model.eval(), exits, len(splits.train.classes), (c, h, w), max_head_fraction=max_head_fraction,
                     token_pool=token_pool, head=head, output_key=output_key)
    spec = attach_spec(model_file, weights, exits, len(splits.train.classes), (c, h, w), max_head_fraction,
                       token_pool, output_key, freeze_backbone, network.head_kinds)
    card = train_exits(network, splits, out, freeze_backbone=freeze_backbone, resume=resume, progress=progress,
                       model_name=spec["model_file"], **recipe)
    if card is not None:
        atomic_write_json(Path(out) / ATTACH_FILE, spec)
    return card


COSTS = ("macs", "latency")


def calibrate(source: str | Path, out: str | Path, *, policy: str = "entropy", target: float | None = None,
              within_points: float | None = None, budget_macs: float | None = None, budget_ms: float | None = None,
              guarantee: bool = False, delta: float = calibration.DEFAULT_DELTA, cost: str = "macs",
              temperature_scaling: bool = False, device: str | None = None, precision: str | None = None,
              micro_batch: int | None = None) -> dict:
    """Exit thresholds from a study's cached logits, in seconds: chosen on its validation split for exactly one goal
    (an accuracy target, a target `within_points` of the final exit's accuracy, or a budget in MACs or milliseconds
    per sample), then evaluated on its test split. Writes calibration.json, frontier.png and (when the cache names
    its model and weights, and the goal was met) early_exit.json with the chosen thresholds into `out`.

    `cost` is what a target search minimizes: "macs", or "latency" (the study's measured milliseconds per sample
    at its batch size). `guarantee` certifies a target by Learn then Test at `delta` for the accuracy over as many
    new samples as the test split holds. An unreachable target is reported with what is reachable and the closest
    setting, never replaced by another.

    Times come from the study's cost model; given a `device`, the stages are re-timed there first
    (`study.time_stages`, in `precision`, default the study's, and `micro_batch`, default measured), so latency goals
    hold for that device or machine. calibration.json's "timing" says which times were used.
    """
    goals = {"target": target, "within_points": within_points, "budget_macs": budget_macs, "budget_ms": budget_ms}
    given = [name for name, v in goals.items() if v is not None]
    if len(given) != 1:
        raise UserError(f"give exactly one of {', '.join(goals)}; got {', '.join(given) or 'none'}")
    if cost not in COSTS:
        raise UserError(f"unknown cost {cost!r}; choose one of {', '.join(COSTS)}")
    budget = budget_macs if budget_macs is not None else budget_ms
    calibration.check_goal(target, budget, guarantee, delta)
    exit_policy = get_policy(policy)
    if device is not None:
        resolve_device(device)
    elif precision is not None or micro_batch is not None:
        raise UserError("--precision and --micro-batch are for re-timing the stages: give --device too")
    check_precision(precision or "auto")
    check_micro_batch(micro_batch)
    check_writable_dir(out)
    cache = load_logits(source)
    timing = {"source": "the study's cost model", "device": (cache.info.get("machine") or {}).get("device"),
              "stage_seconds_per_sample": cache.stage_seconds_per_sample.tolist()}
    if device is not None:
        per_sample, retimed = time_stages(_study_network(cache, source), device, precision or
                                          cache.info.get("precision") or "auto", micro_batch,
                                          batch_size=cache.info.get("batch_size") or 256)
        cache = dataclasses.replace(cache, stage_seconds_per_sample=per_sample)
        timing = {"source": "re-timed (study.time_stages)", **retimed}

    temperatures, temperature_report = None, None
    if temperature_scaling:
        temperatures = calibration.fit_temperatures(cache.val_logits, cache.val_labels)
        exit_policy = exit_policy.with_temperatures(temperatures)
        temperature_report = {split: calibration.temperature_report(getattr(cache, f"{split}_logits"),
                                                                    getattr(cache, f"{split}_labels"), temperatures)
                              for split in ("val", "test")}
    val = exit_arrays(cache.val_logits, cache.val_labels, exit_policy)
    test = exit_arrays(cache.test_logits, cache.test_labels, exit_policy)
    unit = "ms" if budget_ms is not None or (cost == "latency" and budget is None) else "MACs"
    costs = analysis.latency_costs(cache.stage_seconds_per_sample) if unit == "ms" else cache.exit_macs
    result = calibration.thresholds_for_goal(val.scores, val.correct, costs, target=target,
                                             within_points=within_points, budget=budget, guarantee=guarantee,
                                             delta=delta, test_size=test.scores.shape[1])
    ok = result["status"] == "ok"
    thresholds = analysis.as_thresholds(result["thresholds"] if ok else result["closest"]["thresholds"],
                                        cache.exit_macs.size)
    on_test = _evaluation(test, thresholds, cache)
    founding = (val, test) if exit_policy is get_policy("entropy") else tuple(
        exit_arrays(getattr(cache, f"{split}_logits"), getattr(cache, f"{split}_labels"), "entropy")
        for split in ("val", "test"))
    frontier = policy_frontiers({policy: (val, test)}, founding, costs, unit, StudyConfig.desired_accuracies)
    mark = Mark(f"{'chosen' if ok else 'closest'} setting ({result['method']})",
                on_test["ms_per_sample" if unit == "ms" else "mean_macs"], on_test["accuracy"])
    frontier = dataclasses.replace(frontier, marks=(mark,))
    doc = {"exitwise_version": __version__, "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
           "source": str(source), "study": cache.info, "policy": policy, "meaning": exit_policy.meaning,
           "cost": {"unit": unit, "batch_size": cache.info.get("batch_size")}, "timing": timing,
           "within_points": within_points,
           "temperatures": None if temperatures is None else temperatures.tolist(),
           "temperature_report": temperature_report, "result": result,
           "evaluated": "thresholds" if ok else "closest setting",
           "calibration_split": _evaluation(val, thresholds, cache), "test": on_test, "frontier": to_json(frontier)}
    early_exit = _early_exit_model(cache, exit_policy, thresholds) if ok else None
    from .study.report import frontier_png
    with staged_output(out) as stage:
        atomic_write_json(stage / "calibration.json", doc)
        atomic_write_bytes(stage / "frontier.png", frontier_png(frontier))
        if early_exit is not None:
            model = cache.info["model"]
            early_exit.write(stage, weights=model["weights"], weights_sha256=model.get("weights_sha256"))
    return doc


def _study_network(cache: ExitLogits, source: str | Path) -> MultiExitNetwork:
    """The network a study's logits came from, with the weights it names (checked unchanged by SHA-256)."""
    from .models.attach import is_model_dir
    model = cache.info.get("model") or {}
    if not model.get("name") or not model.get("weights"):
        raise UserError(f"{str(source)!r} does not name the model and weights it came from: cannot re-time its stages")
    if model.get("weights_sha256"):
        check_unchanged(model["weights"], model["weights_sha256"], str(source))
    return load_model(model["name"], None if is_model_dir(model["name"]) else model["weights"])[0]


def _early_exit_model(cache: ExitLogits, policy, thresholds: np.ndarray) -> EarlyExitModel | None:
    """The calibrated thresholds on the study's network (weights named, not loaded), if the cache says which."""
    model = cache.info.get("model") or {}
    if model.get("name") not in MODELS or not model.get("weights"):
        return None
    return EarlyExitModel(create_model(model["name"]), policy, thresholds, model["name"],
                          tuple((cache.info.get("dataset") or {}).get("classes") or ()) or None)


def _evaluation(arrays: ExitArrays, thresholds: np.ndarray, cache: ExitLogits) -> dict:
    """Accuracy, mean MACs, predicted milliseconds per sample (from the study's stage times) and exit shares."""
    r = analysis.evaluate(arrays.scores, arrays.correct, thresholds, cache.exit_macs, cache.stage_seconds_per_sample)
    n = arrays.scores.shape[1]
    return {"samples": n, "accuracy": r["accuracy"], "mean_macs": r["mean_cost"],
            "ms_per_sample": 1000 * r["predicted_seconds"] / n, "exit_shares": r["exit_shares"]}



def export(out: str | Path, *, source: str | Path | None = None, model: str | None = None,
           weights: str | Path | None = None, thresholds: str | Path | None = None,
           exporter: str = "dynamo") -> dict:
    """An early-exit model as one ONNX graph per stage and per head plus manifest.json in `out` (docs/deploy.md).

    The model is `source`, a saved EarlyExitModel (a study's or calibration's output folder, or its
    early_exit.json); or the registered `model` with `weights` (default: shipped) and `thresholds`, a JSON
    file with `policy`, `thresholds` and optional `temperatures` and `class_names` (an early_exit.json is one)."""
    from .early_exit import saved_weights_sha256
    from .export import export_onnx
    if (source is None) == (model is None):
        raise UserError("give --from DIR (a saved early-exit model), or --model NAME with --thresholds FILE")
    if source is not None:
        if weights is not None or thresholds is not None:
            raise UserError("--from DIR brings its own weights and thresholds: drop --weights and --thresholds")
        early_exit, sha256 = EarlyExitModel.load(source), saved_weights_sha256(source)
    else:
        if thresholds is None:
            raise UserError("--model needs --thresholds FILE (JSON with policy and thresholds, e.g. an early_exit.json)")
        setting = _read_setting(thresholds, model)
        net, info = load_model(model, weights)
        classes = setting.get("class_names") or (shipped_card(model)["dataset"].get("classes")
                                                 if weights is None and shipped_weights(model) else None)
        early_exit = EarlyExitModel.create(net, model, setting["policy"], setting["thresholds"],
                                           setting.get("temperatures"), classes)
        sha256 = info["weights_sha256"]
    check_writable_dir(out)
    return export_onnx(early_exit, out, weights_sha256=sha256, exporter=exporter)


def _read_setting(path: str | Path, model: str) -> dict:
    """A thresholds file: {policy, thresholds, [temperatures], [class_names], [model]}; refused if it names
    another model or lacks a key."""
    import json
    try:
        setting = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read thresholds file {str(path)!r}: {e}") from None
    missing = [k for k in ("policy", "thresholds") if not isinstance(setting, dict) or k not in setting]
    if missing:
        raise UserError(f"thresholds file {str(path)!r} lacks {' and '.join(missing)}")
    if setting.get("model", model) != model:
        raise UserError(f"thresholds file {str(path)!r} is for model {setting['model']!r}, not {model!r}")
    return setting

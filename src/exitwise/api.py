"""The Python API behind the CLI: each function does one user-level job from names and paths."""
from __future__ import annotations

import dataclasses
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np

from .config import ATTACH_DEFAULTS, TRAIN_DEFAULTS, AttachConfig, DataConfig, TrainConfig, __version__
from .data import Splits, load_splits
from .deploy.manifest import Manifest
from .deploy.plan import WIRE_TOLERANCE_POINTS, FeatureShapes, Link, Plan, Tier
from .early_exit import CALIBRATION_FILE, CONFIG_FILE as EARLY_EXIT_FILE, EarlyExitModel, check_setting
from .errors import UserError
from .io import atomic_write_bytes, atomic_write_json, check_writable_dir, staged_output
from .models import (ModelCard, check_fits, create_model, load_model, load_network, model_key,
                     shipped_classes)
from .models.base import MultiExitNetwork
from .policies import ExitArrays, exit_arrays, get_policy
from .study import CalibrateConfig, StudyConfig, analysis, calibration, run_study, time_stages, write_study
from .study.frontiers import policy_frontiers
from .study.logits_cache import FILENAME as LOGITS_FILE, ExitLogits, load_logits
from .study.results import (CalibrationReport, CostUnit, Mark, SplitOutcome, StageTimes, StudyResults,
                            TemperatureReport)


def study(*, model: str | Path, out: str | Path, data: DataConfig = DataConfig(), weights: str | Path | None = None,
          **settings) -> StudyResults:
    """Run the whole early-exit study and write results.json, logits, early_exit.json, plots and reports into
    `out`; `settings` are `StudyConfig` fields (its defaults otherwise). `model`: a registered name or a folder
    `exitwise attach` wrote."""
    config = StudyConfig(**settings)
    check_writable_dir(out)  # fail before the long work, not after it
    _not_over(out, CALIBRATION_FILE, "a calibration")
    net, ref = load_model(model, weights)
    splits = _splits(data, config.progress)
    check_fits(net, splits.test, splits.dataset)
    done = run_study(net, splits, config, ref)
    write_study(done, out)
    return done.results


def _not_over(out: str | Path, file: str, holder: str) -> None:
    """Refuse an `out` folder that holds the other command's output (`file` marks it): a study and a calibration
    each write early_exit.json and frontier.png, so one written over the other leaves a folder that contradicts
    itself."""
    if (Path(out) / file).exists():
        raise UserError(f"--out {str(out)!r} holds {holder}, whose early_exit.json and frontier.png this would "
                        "replace: give another folder")


def _splits(data: DataConfig, progress: bool) -> Splits:
    return load_splits(data.dataset, data.data_dir, download=data.download, val_size=data.val_size,
                       split_seed=data.split_seed, progress=progress, image_size=data.image_size)


def train(*, model: str, out: str | Path, data: DataConfig = DataConfig(), resume: str | Path | None = None,
          progress: bool = True, device: str = "auto", **recipe) -> ModelCard | None:
    """Train a registered model on a dataset's train split; returns the model card (`model.json`'s, as a
    `ModelCard`; None on ranks > 0). `recipe`:
    `TrainConfig` fields over TRAIN_DEFAULTS for the data set."""
    from .device import resolve_device
    from .train import train as run_training
    check_writable_dir(out)
    resolve_device(device)
    config = None if resume is not None and not recipe else TrainConfig(**{**TRAIN_DEFAULTS.get(data.dataset, {}),
                                                                           **recipe})
    net = _seeded((config or TrainConfig()).seed, create_model, model)  # a resumed run's weights: the checkpoint's
    splits = _splits(data, progress)
    return run_training(net, splits, config, out, resume=resume, progress=progress, model_name=model, device=device)


def _seeded(seed: int, build, *args, **kwargs):
    """`build(*args, **kwargs)` with torch's random numbers seeded by `seed`: a model's initialisation, as `--seed`
    promises; the caller's random state is left as it was."""
    import torch
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build(*args, **kwargs)


def train_exits(network: MultiExitNetwork, splits, out: str | Path, *, freeze_backbone: bool = True,
                resume: str | Path | None = None, progress: bool = True, model_name: str = "attached",
                **recipe) -> ModelCard | None:
    """Train an attached network's exits on `splits` (see `attach`), with the backbone frozen (the final exit stays
    the user's model; only the side heads' weights are written) or, with `freeze_backbone=False`, jointly with the
    network (add `distill=...` to learn from the final exit). Checkpoints, resume, DDP and the model card are
    `exitwise train`'s; returns the card (None on ranks > 0). `recipe`: TrainConfig fields over ATTACH_DEFAULTS
    (digits: TRAIN_DEFAULTS' augmentation)."""
    from .train import train as run_training
    if resume is not None and not recipe:
        config = None
    else:
        config = TrainConfig(**{**TRAIN_DEFAULTS.get(splits.dataset, {}), **ATTACH_DEFAULTS,
                                "freeze_backbone": freeze_backbone, **recipe})
    return run_training(network, splits, config, out, resume=resume, progress=progress, model_name=model_name)


def attach_model(spec: AttachConfig, out: str | Path, *, data: DataConfig = DataConfig(), splits: Splits | None = None,
                 resume: str | Path | None = None, progress: bool = True, **recipe) -> ModelCard | None:
    """`exitwise attach`: build the user's model from `spec.model_file` (running their code), load their weights,
    attach exits, train them, and write into `out` the heads' weights, the card and `attach.json` (what rebuilds it);
    returns the card (None on ranks > 0).
    `splits` (from Python) replaces the data set `data` names. `spec.head`: one kind for every exit or one per exit;
    attach.json records what `auto` chose. `recipe`: TrainConfig fields (see `train_exits`). Without `spec.weights`, heads
    on a frozen backbone would learn from FUNCTION()'s random initialisation: refused unless `spec.random_init` (or
    `spec.freeze_backbone` is False, which trains the whole network)."""
    from .models.attach import ATTACH_FILE, attach, attach_spec, build_user_model, load_user_weights
    from .models.heads import check_head_options
    if spec.weights is None and spec.freeze_backbone and not spec.random_init:
        raise UserError("no --weights: the exits would train on a frozen, randomly initialised backbone; give "
                        "--weights FILE, --joint to train the whole network, or --random-init to mean it")
    check_writable_dir(out)
    check_head_options(spec.token_pool, spec.head)  # before any work
    model = build_user_model(spec.model_file)
    if spec.weights is not None:
        load_user_weights(model, spec.weights)
    splits = splits or _splits(data, progress)
    n, h, w, c = splits.train.images.shape
    network = _seeded(recipe.get("seed", TrainConfig.seed), attach, model.eval(), spec.exits,  # the heads' init
                      len(splits.train.classes), (c, h, w), max_head_fraction=spec.max_head_fraction,
                      token_pool=spec.token_pool, head=spec.head, output_key=spec.output_key)
    record = attach_spec(spec.model_file, spec.weights, spec.exits, len(splits.train.classes), (c, h, w),
                         spec.max_head_fraction, spec.token_pool, spec.output_key, spec.freeze_backbone,
                         network.head_kinds)
    card = train_exits(network, splits, out, freeze_backbone=spec.freeze_backbone, resume=resume, progress=progress,
                       model_name=record.model_file, **recipe)
    if card is not None:
        atomic_write_json(Path(out) / ATTACH_FILE, record.to_json())
    return card


def calibrate(source: str | Path, out: str | Path, config: CalibrateConfig | None = None,
              **options) -> CalibrationReport:
    """Exit thresholds from a study's cached logits, in seconds: chosen on its validation split for exactly one goal
    (an accuracy target, a target `within_points` of the final exit's accuracy, or a budget in MACs or milliseconds
    per sample), then evaluated on its test split. Writes calibration.json, frontier.png and (when the cache names
    its model and weights, and the goal was met) early_exit.json with the chosen thresholds into `out`.
    `options`: `CalibrateConfig` fields (or give `config`).

    `cost` is what a target search minimizes: "macs", or "latency" (the study's measured milliseconds per sample
    at its batch size). `guarantee` certifies a target by Learn then Test at `delta` for the accuracy over as many
    new samples as the test split holds. An unreachable target is reported with what is reachable and the closest
    setting, never replaced by another.

    Times come from the study's cost model; given a `device`, the stages are re-timed there first
    (`study.time_stages`, in `precision`, default the study's, and `micro_batch`, default measured), so latency goals
    hold for that device or machine. calibration.json's "timing" says which times were used.
    """
    c = config or CalibrateConfig(**options)  # checks the goal, policy, device and precision before any work
    policy, target, within_points, budget_ms, budget = c.policy, c.target, c.within_points, c.budget_ms, c.budget
    guarantee, delta, cost, micro_batch = c.guarantee, c.delta, c.cost, c.micro_batch
    device, precision = c.device, c.precision
    exit_policy = get_policy(policy)
    check_writable_dir(out)
    _not_over(out, LOGITS_FILE, "a study")
    cache = load_logits(source)
    info = cache.measurements
    timing = StageTimes("the study's cost model", info.machine.device if info.machine else None,
                        tuple(cache.stage_seconds_per_sample.tolist()))
    if device is not None:
        per_sample, timing = time_stages(_study_network(cache, source), device, precision or
                                         info.precision or "auto", micro_batch, batch_size=info.batch_size or 256)
        cache = dataclasses.replace(cache, stage_seconds_per_sample=per_sample)

    temperatures, temperature_report = None, None
    if c.temperature_scaling:
        temperatures = calibration.fit_temperatures(cache.val_logits, cache.val_labels)
        exit_policy = exit_policy.with_temperatures(temperatures)
        temperature_report = TemperatureReport(
            calibration.temperature_report(cache.val_logits, cache.val_labels, temperatures),
            calibration.temperature_report(cache.test_logits, cache.test_labels, temperatures))
    val = exit_arrays(cache.val_logits, cache.val_labels, exit_policy)
    test = exit_arrays(cache.test_logits, cache.test_labels, exit_policy)
    unit = "ms" if budget_ms is not None or (cost == "latency" and budget is None) else "MACs"
    costs = analysis.latency_costs(cache.stage_seconds_per_sample) if unit == "ms" else cache.exit_macs
    result = calibration.thresholds_for_goal(val.scores, val.correct, costs, target=target,
                                             within_points=within_points, budget=budget, guarantee=guarantee,
                                             delta=delta, test_size=test.scores.shape[1])
    ok = result.status == "ok"
    thresholds = np.asarray(result.thresholds if ok else result.closest.thresholds, dtype=np.float64)
    on_test = _evaluation(test, thresholds, cache)
    founding = (val, test) if exit_policy is get_policy("entropy") else tuple(
        exit_arrays(getattr(cache, f"{split}_logits"), getattr(cache, f"{split}_labels"), "entropy")
        for split in ("val", "test"))
    frontier = policy_frontiers({policy: (val, test)}, founding, costs, unit, StudyConfig.desired_accuracies)
    mark = Mark(f"{'chosen' if ok else 'closest'} setting ({result.method})",
                on_test.ms_per_sample if unit == "ms" else on_test.mean_macs, on_test.accuracy)
    frontier = dataclasses.replace(frontier, marks=(mark,))
    doc = CalibrationReport(
        exitwise_version=__version__, created=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        source=str(source), study=info, policy=policy, meaning=exit_policy.meaning,
        cost=CostUnit(unit, info.batch_size), timing=timing, within_points=within_points,
        temperatures=None if temperatures is None else tuple(temperatures.tolist()),
        temperature_report=temperature_report, result=result, evaluated="thresholds" if ok else "closest setting",
        calibration_split=_evaluation(val, thresholds, cache), test=on_test, frontier=frontier)
    early_exit = _early_exit_model(cache, exit_policy, thresholds) if ok else None
    from .study.report import frontier_png
    with staged_output(out) as stage:
        atomic_write_json(stage / CALIBRATION_FILE, doc.to_json())
        atomic_write_bytes(stage / "frontier.png", frontier_png(frontier))
        if early_exit is not None:
            early_exit.write(stage, weights=info.model.weights, weights_sha256=info.model.weights_sha256)
    if early_exit is None:  # once the new files are in: an earlier run's early_exit.json in `out` would pass for
        (Path(out) / EARLY_EXIT_FILE).unlink(missing_ok=True)  # this result's (`export --from` takes it)
    return doc


def _study_network(cache: ExitLogits, source: str | Path) -> MultiExitNetwork:
    """The network a study's logits came from, with the weights it names (checked unchanged by SHA-256)."""
    ref = cache.measurements.model
    if ref is None:
        raise UserError(f"{str(source)!r} does not name the model and weights it came from")
    return load_network(ref, str(source))


def _early_exit_model(cache: ExitLogits, policy, thresholds: np.ndarray) -> EarlyExitModel | None:
    """The calibrated thresholds on the study's network (weights named, not loaded), if the cache says which: a
    registered model, or a folder `exitwise attach` wrote (rebuilt with its own weights, as the study's is)."""
    ref, dataset = cache.measurements.model, cache.measurements.dataset
    if ref is None:
        return None
    try:
        network = create_model(ref.name)  # resolves a name or an attached folder, or says it can't
    except UserError:
        return None
    return EarlyExitModel(network, policy, thresholds, ref.name, (dataset.classes or None) if dataset else None)


def _evaluation(arrays: ExitArrays, thresholds: np.ndarray, cache: ExitLogits) -> SplitOutcome:
    """Accuracy, mean MACs, predicted milliseconds per sample (from the study's stage times) and exit shares."""
    r = analysis.evaluate(arrays.scores, arrays.correct, thresholds, cache.exit_macs, cache.stage_seconds_per_sample)
    n = arrays.scores.shape[1]
    return SplitOutcome(n, r.accuracy, r.mean_cost, 1000 * r.predicted_seconds / n, r.exit_shares)



def export(out: str | Path, *, source: str | Path | None = None, model: str | None = None,
           weights: str | Path | None = None, thresholds: str | Path | None = None,
           exporter: str = "dynamo", micro_batch: int | None = None) -> Manifest:
    """An early-exit model as one ONNX graph per stage and per head plus manifest.json in `out` (docs/deploy.md);
    returns the manifest.

    The model is `source`, a saved EarlyExitModel (a study's or calibration's output folder, or its
    early_exit.json); or the registered `model` with `weights` (default: shipped) and `thresholds`, a JSON
    file with `policy`, `thresholds` and optional `temperatures` and `class_names` (an early_exit.json is one;
    default, for shipped weights: the calibrated setting their card carries, as `exitwise serve --model` serves).
    `micro_batch`: the runner's, recorded in the manifest (default: measured fastest here)."""
    from .early_exit import saved_weights_sha256
    from .export import export_onnx
    if source is not None and model is not None:
        raise UserError("give --from DIR or a model (--model/--model-dir), not both: --from brings its own model")
    if source is None and model is None:
        raise UserError("give --from DIR (a saved early-exit model), --model NAME (with --thresholds FILE unless it "
                        "ships a calibrated setting) or --model-dir DIR with --thresholds FILE")
    if source is not None:
        if weights is not None or thresholds is not None:
            raise UserError("--from DIR brings its own weights and thresholds: drop --weights and --thresholds")
        early_exit, sha256 = EarlyExitModel.load(source), saved_weights_sha256(source)
    else:
        net, ref = load_model(model, weights)  # an unknown name or unreadable weights are refused first
        if thresholds is not None:
            early_exit = _thresholds_file(thresholds, net, model, shipped_classes(model) if weights is None else None)
        elif (early_exit := EarlyExitModel.calibrated(net, model, weights)) is None:
            why = "other weights than the shipped ones" if weights is not None else "no calibrated setting shipped"
            raise UserError(f"model {model!r} with {why}: give --thresholds FILE (JSON with policy and thresholds, "
                            "e.g. an early_exit.json)")
        sha256 = ref.weights_sha256
    check_writable_dir(out)
    return export_onnx(early_exit, out, weights_sha256=sha256, exporter=exporter, micro_batch=micro_batch)


def _thresholds_file(path: str | Path, network: MultiExitNetwork, model: str,
                     classes: Sequence[str] | None) -> EarlyExitModel:
    """`network` with the setting of a thresholds file: {policy, thresholds, [temperatures], [class_names],
    [model]} (an early_exit.json is one); refused if it names another model or lacks a key."""
    import json
    try:
        setting = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read thresholds file {str(path)!r}: {e}") from None
    if not isinstance(setting, dict):
        raise UserError(f"thresholds file {str(path)!r} lacks policy and thresholds")
    check_setting(setting, f"thresholds file {str(path)!r}", ("policy", "thresholds"))
    if model_key(setting.get("model", model)) != model_key(model):
        raise UserError(f"thresholds file {str(path)!r} is for model {setting['model']!r}, not {model!r}")
    return EarlyExitModel.create(network, model, setting["policy"], setting["thresholds"],
                                 setting.get("temperatures"), setting.get("class_names") or classes)


def plan_tiers(source: str | Path, tiers: Sequence[Tier], links: Sequence[Link], *, export: str | Path | None = None,
               images: Sequence[str | Path] | None = None, minimize: str = "latency",
               max_latency_ms: float | None = None, wire_tolerance_points: float = WIRE_TOLERANCE_POINTS) -> Plan:
    """`exitwise plan`: every placement of a study's stages on `tiers` (in order, joined by `links`), predicted from
    the study's stage times and validation logits (`source`: its folder) at the exit setting the tiers will serve,
    and the best one (docs/tiers.md). That setting and the feature shapes come from `export` (an ONNX export's
    folder, what the tiers serve) or else from the study's early_exit.json; with `export`, `images` (image files,
    folders, .tar.gz) measure what the lossy wire formats change, so the plan may choose them."""
    from .deploy import measure, plan as planning
    from .images import read_images
    if images is not None and export is None:
        raise UserError("--images measures the wire formats on an ONNX export: give --export too")
    planning.check_chain(tiers, links)  # before the logits and the export are read (`plan` checks it again)
    study, wire = load_logits(source), None
    if export is not None:
        from .deploy.onnx_runtime import OnnxEarlyExit
        runner = OnnxEarlyExit.load(export)
        m = runner.manifest
        ran = study.measurements.model  # None: a logits file that does not say (older, or made by hand)
        if ran is not None and m.source_weights_sha256 and m.source_weights_sha256 != ran.weights_sha256:
            raise UserError(f"--export {str(export)!r} is of other weights than the study {str(source)!r} ran "
                            "(SHA-256 differs): give the export of the study's model")
        shapes, policy, thresholds, temperatures = planning.export_shapes(m), m.policy, m.thresholds, m.temperatures
        if images is not None:
            wire = measure.measure_wire(runner, read_images(images, runner.input_shape)[1])
    else:
        from .models.attach import feature_shapes
        model = EarlyExitModel.load(source)
        net = model.network
        shapes = FeatureShapes.of(net.input_shape, feature_shapes(net.stages[:-1], net.input_shape))
        policy, thresholds, temperatures = model.policy.name, tuple(model.thresholds), model.policy.temperatures
    costs = planning.study_costs(study.val_logits, study.stage_seconds_per_sample, shapes, policy=policy,
                                 thresholds=thresholds, temperatures=temperatures, wire=wire)
    return planning.plan(tiers, links, costs, minimize=minimize, max_latency_ms=max_latency_ms,
                         wire_tolerance_points=wire_tolerance_points)


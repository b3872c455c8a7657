"""Command line: a thin layer over the Python API. User mistakes print one line and exit 2."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from dataclasses import fields
from pathlib import Path

from .config import (AGREEMENT_REQUIRED, ATTACH_DEFAULTS, TRAIN_DEFAULTS, AttachConfig, DataConfig, TrainConfig, flags,
                     float_list, given)
from .errors import UserError
from .study.config import CALIBRATION_METHODS, CalibrateConfig, StudyConfig

# torch-free at the top: `exitwise --help` and `exitwise predict` never load it; each command imports its work
STUDY_DEFAULTS = {f.name: f.default for f in fields(StudyConfig)}
STUDY_MODEL = "seed-branchynet"  # `exitwise study` without --model or --model-dir: the founding system's network
CALIBRATE_DEFAULTS = {f.name: f.default for f in fields(CalibrateConfig)}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, like every other user mistake
        if message.endswith("expected one argument"):  # argparse reads a value such as -1,1,1 as another flag
            message += " (a value that starts with '-' goes after '=': --flag=-1,1,1)"
        raise UserError(f"{self.prog}: {message}")


def _add_flags(p: argparse.ArgumentParser, cls, defaults: dict | None = None,
               per_dataset: dict | None = None) -> None:
    """One flag per field of the options dataclass `cls` that has a help text (`config.option`); `defaults`: the
    command's own in place of some of the dataclass's, `per_dataset`: a data set's own beside them, for the help."""
    for flag, kwargs in flags(cls, defaults, per_dataset):
        p.add_argument(flag, **kwargs)


def _add_data_args(p: argparse.ArgumentParser) -> None:
    _add_flags(p, DataConfig)
    p.add_argument("--no-progress", action="store_true", help="no progress bars (they show only on a terminal)")


def _add_machine_args(p: argparse.ArgumentParser, micro_batch: bool = True) -> None:
    p.add_argument("--device", default="auto",
                   help="auto (default: cuda, else mps, else cpu), cpu, cuda, cuda:N or mps")
    if micro_batch:
        p.add_argument("--micro-batch", type=int, help="rows that run through the network together (default: the "
                                                       "fastest size, measured once per model and machine)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="exitwise", description="Early-exit inference with multi-exit networks.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    study = sub.add_parser("study", help="the early-exit study: per-exit accuracy, cutoff sweep, calibration, "
                                         "timing; writes results.json, plots and an HTML report")
    _add_data_args(study)
    study.add_argument("--model", help=f"a registered model (see `exitwise models`; default {STUDY_MODEL})")
    study.add_argument("--model-dir", type=Path, help="a folder written by `exitwise attach` (instead of --model)")
    study.add_argument("--weights", type=Path, help="checkpoint (.safetensors, a shard index NAME.safetensors"
                       ".index.json, or a PyTorch state_dict); default: the weights shipped for --model")
    study.add_argument("--out", type=Path, required=True, help="output directory")
    d = STUDY_DEFAULTS  # every default below is StudyConfig's; a flag not given leaves it
    study.add_argument("--policy", help=f"exit score: entropy (nats), max-prob or margin (default {d['policy']}); "
                                        "every policy's frontier is in the results anyway")
    study.add_argument("--cutoff", type=float, help=f"the fixed cutoff (entropy: nats; default {d['cutoff']:g})")
    study.add_argument("--desired-accuracies", type=float_list, help="comma-separated targets for calibration "
                       f"(default {','.join(f'{a:.2f}' for a in d['desired_accuracies'])})")
    study.add_argument("--method", action="append", dest="methods", help="founding calibration method, repeatable: "
                       f"{' and/or '.join(CALIBRATION_METHODS)} (default: {', '.join(d['methods'])}); the accuracy-"
                       "target searches (empirical, guaranteed) always run")
    study.add_argument("--batch-size", type=int, help=f"images per batch (default {d['batch_size']})")
    study.add_argument("--precision", help=f"auto (the fastest of fp32, bf16 and mixed, timed on this machine, whose "
                       f"predictions agree with fp32 on >= {AGREEMENT_REQUIRED:.0%} of the first "
                       f"{STUDY_DEFAULTS['precision_check_images']:,} validation images at every exit), "
                       f"bf16, mixed or fp32 (default {d['precision']})".replace("%", "%%"))
    _add_machine_args(study)

    train = sub.add_parser("train", help="joint multi-exit training (BranchyNet); checkpoints every epoch, "
                                         "--resume continues; runs under torchrun as DDP")
    _add_data_args(train)
    train.add_argument("--model", required=True, help="a registered model (see `exitwise models`)")
    train.add_argument("--out", type=Path, required=True, help="output directory: checkpoint.pt, "
                                                               "model.safetensors, model.json")
    train.add_argument("--resume", type=Path, help="continue from this checkpoint.pt exactly")
    _add_flags(train, TrainConfig, per_dataset=TRAIN_DEFAULTS)
    _add_machine_args(train, micro_batch=False)

    att = sub.add_parser("attach", help="exits on your own PyTorch model: builds it from --model-file (running that "
                                        "file), attaches exits at --exits, trains them, writes a model folder")
    _add_data_args(att)
    _add_flags(att, AttachConfig)
    att.add_argument("--out", type=Path, required=True, help="output folder: attach.json, model.safetensors (the "
                                                             "heads), model.json (the card), checkpoint.pt")
    att.add_argument("--joint", action="store_true", help="train the whole network with the heads (default: the "
                                                          "backbone is frozen and the final exit stays your model)")
    att.add_argument("--resume", type=Path, help="continue from this checkpoint.pt exactly")
    _add_flags(att, TrainConfig, ATTACH_DEFAULTS, per_dataset={  # a data set's own, where attach's do not win
        name: {k: v for k, v in own.items() if k not in ATTACH_DEFAULTS} for name, own in TRAIN_DEFAULTS.items()})

    cal = sub.add_parser("calibrate", help="exit thresholds from a study's cached logits in seconds: chosen on its "
                                           "validation split, evaluated on its test split; writes calibration.json "
                                           "and frontier.png")
    cal.add_argument("--from", dest="source", type=Path, required=True,
                     help="a study's output directory or its logits.safetensors")
    cal.add_argument("--out", type=Path, required=True, help="output directory")
    cal.add_argument("--policy", default=CALIBRATE_DEFAULTS["policy"], help="entropy, max-prob, margin or patience "
                     f"(default {CALIBRATE_DEFAULTS['policy']})")
    cal.add_argument("--temperature-scaling", action="store_true",
                     help="divide each exit's logits by a temperature fitted on the validation split")
    goal = cal.add_mutually_exclusive_group(required=True)
    goal.add_argument("--target", type=float, help="accuracy in (0, 1] at the least mean cost")
    goal.add_argument("--within-points", type=float, metavar="X",
                      help="target: the final exit's validation accuracy minus X percentage points")
    goal.add_argument("--budget-macs", type=float, metavar="N", help="most accurate within N MACs per sample")
    goal.add_argument("--budget-ms", type=float, metavar="MS",
                      help="most accurate within MS milliseconds per sample (the study's measured stage times)")
    cal.add_argument("--guarantee", action="store_true", help="certify the target on new samples with probability "
                                                              ">= 1 - delta (Learn then Test; assumes exchangeability)")
    cal.add_argument("--delta", type=float,
                     help=f"allowed failure probability of --guarantee, in (0, 1) (default {CALIBRATE_DEFAULTS['delta']:g})")
    cal.add_argument("--cost", help="what a target search minimizes: macs or "
                     f"latency (ms per sample at the study's batch size; default {CALIBRATE_DEFAULTS['cost']})")
    cal.add_argument("--device", help="re-time the stages on this device first (auto, cpu, cuda or mps), so "
                                      "latency goals hold there; default: the study's measured times")
    cal.add_argument("--precision", help="with --device: auto, fp32, bf16 or mixed (default: the study's)")
    cal.add_argument("--micro-batch", type=int, help="with --device: rows per micro-batch (default: measured there)")

    export = sub.add_parser("export", help="an early-exit model as one ONNX graph per stage and per head plus "
                                           "manifest.json, for exitwise.deploy.onnx_runtime and `exitwise predict`")
    export.add_argument("--from", dest="source", type=Path,
                        help="a saved early-exit model: a study's or calibration's output folder (early_exit.json)")
    export.add_argument("--model", help="or a registered model (see `exitwise models`): its shipped weights with the "
                        "calibrated setting their card carries, or --thresholds")
    export.add_argument("--model-dir", type=Path, help="or a folder written by `exitwise attach`, with --thresholds")
    export.add_argument("--weights", type=Path, help="checkpoint for --model (default: its shipped weights)")
    export.add_argument("--thresholds", type=Path, help="JSON with policy, thresholds (null: never leave there) "
                                                        "and optional temperatures; an early_exit.json works")
    export.add_argument("--out", type=Path, required=True, help="output directory")
    export.add_argument("--exporter", default="dynamo", help="dynamo (default: torch.export, falling back to "
                                                             "torchscript per graph where it fails) or torchscript")
    export.add_argument("--micro-batch", type=int, help="rows the runner sends through the graphs together, recorded "
                                                        "in the manifest (default: the fastest, measured here)")

    pred = sub.add_parser("predict", help="classify images with an ONNX export (early exit on ONNX Runtime, no torch)")
    pred.add_argument("--export", type=Path, required=True, help="a folder written by `exitwise export`")
    pred.add_argument("images", nargs="+", type=Path, help="image files, folders of them, or .tar.gz archives")
    pred.add_argument("--out", type=Path, help="write the predictions to a .csv or .json file instead of printing")
    pred.add_argument("--batch-size", type=int, default=256, help="images per batch (default %(default)s)")
    pred.add_argument("--no-progress", action="store_true", help="no progress bars (they show only on a terminal)")

    _add_serve_parser(sub)
    models = sub.add_parser("models", help="list the registered models: input, exits, cost, and for shipped weights "
                            "their test accuracy and calibrated early-exit setting")
    models.add_argument("--json", action="store_true", help="print the list as JSON instead of a table")
    cache = sub.add_parser("cache", help="list the decoded data sets cached to start runs fast (EXITWISE_CACHE_DIR "
                                         "or the user cache dir)")
    cache.add_argument("--clear", action="store_true", help="delete them (they are decoded again when needed)")
    _add_plan_parser(sub)
    return parser


def _model_or_dir(args: argparse.Namespace) -> str | None:
    """--model NAME or --model-dir DIR (a folder `exitwise attach` wrote), never both (the folder had won, silently)."""
    if args.model and args.model_dir:
        raise UserError("give --model or --model-dir, not both")
    return str(args.model_dir) if args.model_dir else args.model


def cmd_study(args: argparse.Namespace) -> None:
    from .api import study
    from .study.report import format_summary
    settings = given(args, StudyConfig)
    results = study(model=_model_or_dir(args) or STUDY_MODEL, weights=args.weights, out=args.out,
                    data=DataConfig(**given(args, DataConfig)), **{**settings, "progress": not args.no_progress})
    print(format_summary(results))
    print(f"\nreport: {(args.out / 'report.html').resolve()}")


def cmd_train(args: argparse.Namespace) -> None:
    from .api import train
    card = train(model=args.model, out=args.out, data=DataConfig(**given(args, DataConfig)), resume=args.resume,
                 progress=not args.no_progress, device=args.device, **given(args, TrainConfig))
    if card is not None:
        accuracy = ", ".join(f"{a:.2%}" for a in card.test_accuracy or [])
        print(f"trained {card.model} in {card.train_seconds:.0f} s; test accuracy per exit: {accuracy}")
        print(f"weights: {(args.out / 'model.safetensors').resolve()}")


def cmd_attach(args: argparse.Namespace) -> None:
    from .api import attach_model
    spec = AttachConfig(**given(args, AttachConfig), freeze_backbone=not args.joint)
    card = attach_model(spec, args.out, data=DataConfig(**given(args, DataConfig)), resume=args.resume,
                        progress=not args.no_progress, **given(args, TrainConfig))
    if card is not None:
        accuracy = ", ".join(f"{a:.2%}" for a in card.test_accuracy or [])
        print(f"trained the exits in {card.train_seconds:.0f} s; test accuracy per exit: {accuracy}")
        for h in card.heads:
            kind = f" ({h.kind})" if h.kind else ""
            print(f"  head after {h.exit}{kind}: {h.head_macs:,} MACs, {h.fraction:.1%} of its stage")
        print(f"model folder: {args.out.resolve()} (exitwise study --model-dir {args.out})")


def cmd_calibrate(args: argparse.Namespace) -> None:
    from .api import calibrate
    from .early_exit import CALIBRATION_FILE, CONFIG_FILE
    from .study.report import format_calibration
    doc = calibrate(args.source, args.out, CalibrateConfig(**given(args, CalibrateConfig)))
    print(format_calibration(doc))
    early_exit = f", {CONFIG_FILE}" if (args.out / CONFIG_FILE).is_file() else ""
    print(f"\nwritten: {(args.out / CALIBRATION_FILE).resolve()}, frontier.png{early_exit}")


def cmd_export(args: argparse.Namespace) -> None:
    from .api import export
    manifest = export(args.out, source=args.source, model=_model_or_dir(args), weights=args.weights,
                      thresholds=args.thresholds, exporter=args.exporter, micro_batch=args.micro_batch)
    graphs = manifest.graphs()
    exporters = sorted({g.exporter for g in graphs})
    thresholds = json.dumps(manifest.to_json()["thresholds"])  # as the file has them: null for never
    print(f"exported {manifest.model} ({len(manifest.stages)} stages, {len(manifest.heads)} heads; "
          f"policy {manifest.policy}, thresholds {thresholds}) with {', '.join(exporters)}; "
          f"largest difference from torch {max(g.max_error for g in graphs):.1e}")
    print(f"written: {args.out.resolve()}")


def cmd_predict(args: argparse.Namespace) -> None:
    from .deploy.predict import check_output, format_predictions, predict, write_predictions
    if args.out is not None:
        check_output(args.out)
    rows = predict(args.export, args.images, batch_size=args.batch_size, progress=not args.no_progress)
    if args.out is None:
        print(format_predictions(rows))
        return
    write_predictions(rows, args.out)
    shares = [sum(r.exit == k for r in rows) for k in range(max(r.exit for r in rows) + 1)]
    print(f"{len(rows)} images; images per exit: {shares}; written: {args.out.resolve()}")


def cmd_models(args: argparse.Namespace) -> None:
    from .models.catalog import catalog, format_catalog
    entries = catalog()
    if args.json:
        print(json.dumps([e.to_json() for e in entries], indent=2))
        return
    print(format_catalog(entries))
    print("\nM MACs: per image, the network without its side exits; weights: the data set the shipped weights were "
          "trained on (none: pass --weights FILE); test acc.: the final exit's")


def cmd_cache(args: argparse.Namespace) -> None:
    from .data import cache_entries, clear_cache
    entries = clear_cache() if args.clear else cache_entries()
    for e in entries:
        print(f"{e.bytes / 2**20:8.1f} MiB  {e.path}  ({e.source or 'unfinished entry'})")
    total = sum(e.bytes for e in entries) / 2**20
    print(f"{'deleted' if args.clear else 'cached'}: {len(entries)} decoded data sets, {total:.1f} MiB")
    from .tune import probe_cache
    measured = probe_cache()
    if measured.is_file():
        print(f"{'deleted' if args.clear else 'cached'}: precision and micro-batch measurements {measured}")
        if args.clear:
            measured.unlink(missing_ok=True)


# `exitwise plan`: where to cut the network across tiers (exitwise.deploy.plan, docs/tiers.md)

def _add_plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="place a study's stages on tiers (device, edge, cloud) from measured costs: "
                                    "every placement's predicted latency and bytes per link; writes the best")
    p.add_argument("--from", dest="source", type=Path, help="a study's output folder (logits, thresholds, "
                                                             "stage times)")
    p.add_argument("--export", type=Path, help="its ONNX export (feature shapes; its thresholds are served); "
                                               "default: the shapes from the study's model (needs torch)")
    p.add_argument("--tier", action="append", default=[],
                   help="NAME[:speed=S] (S x the speed of the machine the study timed on) or NAME:stage-ms=a/b/.. "
                        "(measured there), either with ,request-ms=R,relay-ms=Q (a request's cost there, with stages "
                        "or as a relay); in order, first the one the images arrive at")
    p.add_argument("--link", action="append", default=[], help="FROM-TO:mbps=M,rtt-ms=R, one per consecutive pair")
    p.add_argument("--minimize", help="latency (default) or traffic")
    p.add_argument("--max-latency-ms", type=float, help="only placements predicted within this latency per image")
    p.add_argument("--images", nargs="+", type=Path, help="with --export: images (files, folders, .tar.gz) to "
                                                          "measure fp16 and int8 features' cost; without, fp32 only")
    p.add_argument("--wire-tolerance", type=float, help="most answers (percentage points) a cheaper wire format "
                                                        "may change, summed over its cuts (default 0.1)")
    p.add_argument("--out", type=Path, help="plan.json to write")
    p.add_argument("--measure", action="store_true", help="instead of planning: time each stage of --export here "
                   "(ONNX Runtime), a request through its server and through a relay, and print them as a tier's "
                   "stage-ms=...,request-ms=...,relay-ms=...; run it on the tier's machine")
    p.add_argument("--measure-batch", type=int, help="with --measure: images per timed call (default 1: an image's "
                                                      "latency on a lightly loaded tier)")
    p.add_argument("--ssl-certfile", type=Path, help="with --measure: time the request over TLS with this PEM "
                   "certificate, as the tier will serve it (with --ssl-keyfile)")
    p.add_argument("--ssl-keyfile", type=Path, help="with --measure: the PEM private key of --ssl-certfile")


def cmd_plan(args: argparse.Namespace) -> None:
    from .deploy import plan as planning
    if args.measure:
        if not args.export:
            raise UserError("--measure times the stages of an ONNX export: give --export")
        planning_flags = [f for f, v in (("--from", args.source), ("--tier", args.tier), ("--link", args.link),
                                         ("--minimize", args.minimize), ("--max-latency-ms", args.max_latency_ms),
                                         ("--images", args.images), ("--wire-tolerance", args.wire_tolerance),
                                         ("--out", args.out)) if v not in (None, [])]
        if planning_flags:
            raise UserError(f"--measure only times --export on this machine and prints it: drop "
                            f"{', '.join(planning_flags)} (they plan)")
        from .config import ServerTLS, check_pair
        from .deploy.measure import MEASURE_BATCH, measure_tier
        check_pair(args.ssl_certfile, args.ssl_keyfile, "--ssl-certfile", "--ssl-keyfile")
        tier = measure_tier(args.export, batch=MEASURE_BATCH if args.measure_batch is None else args.measure_batch,
                            tls=None if args.ssl_certfile is None else ServerTLS(args.ssl_certfile, args.ssl_keyfile))
        print(tier.options())
        return
    if args.ssl_certfile or args.ssl_keyfile or args.measure_batch is not None:
        raise UserError("--measure-batch, --ssl-certfile and --ssl-keyfile go with --measure")
    missing = [flag for flag, v in (("--from", args.source), ("--tier", args.tier), ("--out", args.out)) if not v]
    if missing:
        raise UserError(f"exitwise plan needs {', '.join(missing)} (or --measure with --export)")
    if args.wire_tolerance is not None and args.images is None:
        raise UserError("--wire-tolerance goes with --images (without them only fp32 crosses the links)")
    from .io import atomic_write_json, check_writable_file
    check_writable_file(args.out, "--out")
    from .api import plan_tiers
    result = plan_tiers(args.source, [planning.parse_tier(t) for t in args.tier],
                        [planning.parse_link(l) for l in args.link], export=args.export, images=args.images,
                        max_latency_ms=args.max_latency_ms,
                        **{k: v for k, v in (("minimize", args.minimize),
                                             ("wire_tolerance_points", args.wire_tolerance)) if v is not None})
    print(planning.format_candidates(result))
    wire = result.costs.wire
    if wire is not None:
        for fmt, shares in wire.disagreement.items():
            print(f"{fmt}: answers changed per cut (after stage 0, 1, ...) on {wire.images} images: "
                  + ", ".join(f"{100 * s:.2f}%" for s in shares))
    atomic_write_json(args.out, result.to_json())
    c = result.choice
    print(f"chosen (*): {c.latency_ms:.1f} ms and {c.traffic_bytes:,.0f} B over the links per image, wire {c.wire}; "
          f"written: {args.out.resolve()}")


COMMANDS = {"study": cmd_study, "train": cmd_train, "attach": cmd_attach, "calibrate": cmd_calibrate,
            "export": cmd_export, "predict": cmd_predict, "models": cmd_models, "cache": cmd_cache,
            "plan": cmd_plan}


def _add_serve_parser(sub) -> None:
    from .config import RayConfig, SchedulerConfig, ServeConfig
    p = sub.add_parser("serve", help="an HTTP inference server (Open Inference Protocol, /v1/predict, /metrics) whose "
                                     "batches re-form at every exit; needs `pip install 'exitwise[serve]'`")
    p.add_argument("--model", help="a registered model with its shipped weights and calibrated setting")
    p.add_argument("--weights", type=Path, help="other weights for --model (then with --no-early-exit)")
    p.add_argument("--from", dest="source", type=Path, help="a study's or calibration's folder (early_exit.json)")
    p.add_argument("--export", type=Path, help="an `exitwise export` folder: served on ONNX Runtime, without torch")
    _add_flags(p, ServeConfig)
    _add_flags(p, SchedulerConfig)
    p.add_argument("--no-early-exit", action="store_true", help="the same network without side exits: the baseline")
    p.add_argument("--precision", default="auto", help="torch models: auto (timed here), fp32, bf16 or mixed")
    p.add_argument("--micro-batch", type=int, help="torch models: rows per network call (default: measured)")
    p.add_argument("--ray", action="store_true", help="run as a Ray Serve deployment (`pip install 'exitwise[ray]'`)")
    _add_flags(p, RayConfig)
    _add_tier_args(p)


def cmd_serve(args: argparse.Namespace) -> None:
    import dataclasses
    import functools
    from .config import RayConfig, SchedulerConfig, ServeConfig, check_micro_batch, check_precision
    ray_flags = given(args, RayConfig)
    scaling = RayConfig(**ray_flags)
    if ray_flags and not args.ray:
        raise UserError(f"{', '.join('--' + k.replace('_', '-') for k in ray_flags)} goes with --ray")
    given_models = [f for f, v in (("--model", args.model), ("--from", args.source), ("--export", args.export)) if v]
    relay = _relay_config(args, given_models)
    if relay is not None:
        try:
            import fastapi, prometheus_client, uvicorn  # noqa: F401,E401
        except ImportError as e:
            raise UserError(f"serving needs {e.name}: pip install 'exitwise[serve]'") from None
        from .deploy.server import serve
        serve(None, ServeConfig(**given(args, ServeConfig, skip=("scheduler", "tier", "relay")), relay=relay))
        return
    if len(given_models) != 1:
        raise UserError("give one of --model NAME, --from DIR or --export DIR")
    if args.weights and not args.model:
        raise UserError("--weights goes with --model")
    torch_flags = [f for f, on in (("--precision", args.precision != "auto"), ("--micro-batch", args.micro_batch))
                   if on]
    if args.export and torch_flags:
        raise UserError(f"{', '.join(torch_flags)}: for torch models; an --export runs in fp32 at the micro-batch "
                        "its manifest records (exitwise export --micro-batch): drop it")
    check_precision(args.precision)
    check_micro_batch(args.micro_batch)
    try:
        import fastapi, prometheus_client, uvicorn  # noqa: F401,E401
    except ImportError as e:
        raise UserError(f"serving needs {e.name}: pip install 'exitwise[serve]'") from None
    scheduling = SchedulerConfig(**given(args, SchedulerConfig))  # the flags checked before the model loads
    serving = ServeConfig(**given(args, ServeConfig, skip=("scheduler", "tier", "relay")))
    if serving.grpc_port is not None:
        try:
            import grpc, google.protobuf  # noqa: F401,E401
        except ImportError as e:
            raise UserError(f"--grpc-port needs {e.name}: pip install 'exitwise[grpc]'") from None
    if args.export:
        from .deploy.onnx_runner import OnnxRunner
        make_runner = functools.partial(OnnxRunner.load, args.export, early_exit=not args.no_early_exit,
                                        workers=scheduling.workers)
    else:
        from .serve_torch import make_runner as torch_runner
        make_runner = functools.partial(torch_runner, model=args.model, weights=args.weights, source=args.source,
                                        early_exit=not args.no_early_exit, precision=args.precision,
                                        micro_batch=args.micro_batch, workers=scheduling.workers)
    runner, exits = None, None
    if _is_tier(args) and not args.export:
        if args.next is not None:
            from .config import check_url
            check_url(args.next)  # before the model loads
        if serving.processes > 1 or args.ray:  # a torch tier's stages counted on the model; each process (or
            # replica) builds its own runner
            from .serve_torch import load_early_exit
            exits = load_early_exit(model=args.model, weights=args.weights, source=args.source,
                                    early_exit=not args.no_early_exit).network.num_exits
        else:
            runner = make_runner()
            exits = runner.num_exits
    tier = _tier_config(args, exits)
    config = dataclasses.replace(serving, tier=tier, scheduler=scheduling)  # the scheduler runs the tier's stages
    if args.ray:
        if config.processes > 1:
            raise UserError("--ray spreads the server over --replicas: drop --processes")
        if config.access_log:
            raise UserError("--access-log: under --ray, Ray Serve logs every request itself (its logs folder, "
                            "/tmp/ray/session_latest/logs/serve): drop it")
        from .deploy.ray_serve import serve_on_ray
        serve_on_ray(make_runner, config, scaling)
        return
    if config.processes > 1:  # each process builds its own runner, on its share of the CPUs' threads
        from .deploy.processes import serve_processes
        serve_processes(functools.partial(make_runner, workers=scheduling.workers * config.processes), config)
        return
    from .deploy.server import serve
    serve(runner or make_runner(), config)


# `exitwise serve` as one tier of a chain (exitwise.deploy.tiers, docs/tiers.md)

def _add_tier_args(p) -> None:
    p.add_argument("--stages", help="serve only stages FIRST-LAST (a tier); samples still in after LAST go to --next")
    p.add_argument("--next", help="the next tier's URL (http://HOST:PORT or https://HOST:PORT), where survivors go")
    p.add_argument("--plan", type=Path, help="a plan.json of `exitwise plan`: take this --tier's stages and wire "
                                             "format from its choice")
    p.add_argument("--tier", help="this tier's name, letters, digits and _ (in --plan; in answers and in its log's "
                                  "warnings)")
    p.add_argument("--wire", help="features to --next as fp32, fp16 or int8 (default: the plan's, else fp32)")
    p.add_argument("--send-images", action="store_true", help="send the survivors' images instead of their features "
                   "(smaller for small images); the next tier recomputes the stages before its own. A tier after the "
                   "first must be sent the images then (the tier before it sends images too)")
    p.add_argument("--next-ca", type=Path, help="with --next https://...: a PEM file of the certificates that verify "
                   "the next tier's (its own, when self-signed; default: the system's)")
    p.add_argument("--next-cert", type=Path, help="with --next https://...: the PEM certificate this tier shows the "
                   "next one (which asks for it with --ssl-ca-certs); with --next-key")
    p.add_argument("--next-key", type=Path, help="the PEM private key of --next-cert")
    p.add_argument("--forward-timeout-ms", type=float, help="the next tier not answering by then: answer at this "
                   "tier's last exit, marked degraded (default 5000; below --timeout-ms); a relay answers 504 "
                   "(default 10000)")
    p.add_argument("--relay", action="store_true", help="a tier that holds no stages: forward every request to --next "
                   "unchanged (images or features) and its answer back; runs no model (--plan does this by itself "
                   "for a tier it gives no stages)")


def _relay_config(args: argparse.Namespace, given_models: list[str]):
    """The RelayConfig of a tier that holds no stages (`--relay`, or `--plan` giving `--tier` none); else None."""
    from .config import RelayConfig, SchedulerConfig
    if args.relay:
        model_flags = given_models + [f for f, on in (  # a model's own options too: never silently dropped
            ("--weights", args.weights is not None), ("--no-early-exit", args.no_early_exit),
            ("--precision", args.precision != "auto"), ("--micro-batch", args.micro_batch is not None)) if on]
        if model_flags or args.stages is not None or args.plan is not None:
            flags = model_flags + [f for f, v in (("--stages", args.stages), ("--plan", args.plan)) if v is not None]
            raise UserError(f"--relay holds no stages and runs no model: drop {', '.join(flags)}")
        batching = given(args, SchedulerConfig)
        if batching:  # a relay has no queue of its own: these would be silently ignored (with --plan, the tiers'
            flags = ", ".join("--" + k.replace("_", "-") for k in batching)  # one command line, they are not used)
            raise UserError(f"a relay forwards each request at once (no batches, no queue): drop {flags}; "
                            "--forward-timeout-ms sets how long it waits")
    elif args.plan is not None and args.tier and args.stages is None:
        plan, at = _plan_tier(args)
        held = plan.choice.stages
        if held[at]:
            return None
        if not any(held[at + 1:]):
            raise UserError(f"tier {args.tier!r} comes after the network ends in {str(args.plan)!r} (no tier after it "
                            "holds stages): nothing to serve there")
    else:
        return None
    if not args.next:
        raise UserError("a relay (a tier with no stages) forwards to the next tier: give --next URL")
    if args.ray or args.wire or args.send_images:
        flags = [f for f, v in (("--ray", args.ray), ("--wire", args.wire), ("--send-images", args.send_images)) if v]
        raise UserError(f"a relay forwards what it gets as it is: drop {', '.join(flags)}")
    return RelayConfig(args.tier or "relay", args.next, next_tls=_next_tls(args),
                       **({} if args.forward_timeout_ms is None else {"timeout_ms": args.forward_timeout_ms}))


def _next_tls(args: argparse.Namespace):
    from .config import ClientTLS
    return ClientTLS(args.next_ca, args.next_cert, args.next_key)


def _plan_tier(args: argparse.Namespace):
    """`--plan` (a `deploy.plan.Plan`) and `--tier`'s place in it (one line, exit 2, when the plan has no such tier)."""
    from .deploy.plan import read_plan
    plan = read_plan(args.plan)
    names = [t.name for t in plan.tiers]
    if args.tier not in names:
        raise UserError(f"tier {args.tier!r} is not in {str(args.plan)!r} (its tiers: {', '.join(names)})")
    return plan, names.index(args.tier)


def _is_tier(args: argparse.Namespace) -> bool:
    return any(v is not None for v in (args.stages, args.next, args.plan, args.tier))


def _tier_config(args: argparse.Namespace, num_stages: int | None = None):
    """The TierConfig that --stages/--plan/--tier/--next ask for (None: the whole network), checked. `num_stages`:
    the model's (None: read from the --export's manifest)."""
    if not args.next and not args.plan:  # with --plan, one command line for every tier: the plan's last ignores them
        unused = [f for f, on in (("--wire", args.wire is not None), ("--send-images", args.send_images),
                                  ("--forward-timeout-ms", args.forward_timeout_ms is not None)) if on]
        if unused:
            raise UserError(f"{', '.join(unused)} go{'es' * (len(unused) == 1)} with --next (a tier that forwards)")
    if not _is_tier(args):
        _next_tls(args).check(None)
        return None
    from .deploy.manifest import read_manifest
    from .config import TierConfig, check_url
    from .deploy.tiers import parse_stages
    if args.next is not None:
        check_url(args.next)
    k = len(read_manifest(args.export).stages) if num_stages is None else num_stages
    wire = args.wire
    if args.plan:
        if args.stages is not None or not args.tier:
            raise UserError("--plan takes this tier's stages from the plan: give --tier NAME, not --stages")
        plan, at = _plan_tier(args)
        if plan.costs.num_stages != k:
            raise UserError(f"{str(args.plan)!r} plans {plan.costs.num_stages} stages; the model has {k}")
        first, last = plan.choice.stages[at]  # a tier with none is a relay (`_relay_config`)
        wire = wire or plan.choice.wire
        links = plan.choice.links
        if at < len(links) and links[at].payload == "input" and links[at].cut > 0:
            args.send_images = True  # the plan sends the image on, not the features
    elif args.stages is not None:
        first, last = parse_stages(args.stages, k)
    else:
        raise UserError("a tier needs its stages: --stages FIRST-LAST, or --plan plan.json --tier NAME")
    if last < k - 1 and not args.next:
        raise UserError(f"stages {first}-{last} end before the final exit (stage {k - 1}): give --next URL")
    if last == k - 1 and args.next:
        raise UserError(f"stages {first}-{last} end the network: this tier has nothing to send to --next")
    from .config import SchedulerConfig
    tier = TierConfig(args.tier or f"stages{first}_{last}", first, last, args.next, wire or "fp32",
                      send_images=args.send_images and bool(args.next), next_tls=_next_tls(args),
                      **({} if args.forward_timeout_ms is None else {"forward_timeout_ms": args.forward_timeout_ms}))
    timeout_ms = args.timeout_ms if args.timeout_ms is not None else SchedulerConfig().timeout_ms
    if tier.next_url and not tier.forward_timeout_ms < timeout_ms:
        raise UserError(f"--forward-timeout-ms {tier.forward_timeout_ms:g} must be below --timeout-ms {timeout_ms:g}, "
                        f"so a degraded answer comes before the request's deadline")
    return tier


COMMANDS["serve"] = cmd_serve


# the commands that run models: glibc's malloc thresholds raised first (exitwise.allocator)
RUN_MODELS = ("study", "train", "attach", "calibrate", "export", "serve")

# a package a command needs and this install lacks (a slim one, e.g. `pip install --no-deps exitwise` for ONNX
# serving, docs/serve.md): what brings it
CORE = ("torch", "safetensors", "matplotlib", "numpy", "PIL", "simplejpeg", "tqdm", "platformdirs")
INSTALLS = {**dict.fromkeys(CORE, "pip install exitwise (with its dependencies)"),
            **dict.fromkeys(("onnx", "onnxruntime", "onnxscript"), "pip install 'exitwise[onnx]'"),
            **dict.fromkeys(("fastapi", "starlette", "uvicorn", "prometheus_client", "multipart"),
                            "pip install 'exitwise[serve]'"),
            "ray": "pip install 'exitwise[ray]'", "sklearn": "pip install 'exitwise[demo]'",
            "transformers": "pip install 'exitwise[hf]'"}


def _terminated(signum, frame):
    print("exitwise: terminated", file=sys.stderr)
    raise SystemExit(128 + signum)  # unwinds like Ctrl-C: a staged output is removed, nothing half-written stays


def main(argv: list[str] | None = None) -> int:
    args, before = None, None
    try:
        args = build_parser().parse_args(argv)
        if args.command != "serve" and threading.current_thread() is threading.main_thread():  # a server drains
            before = signal.signal(signal.SIGTERM, _terminated)
        if args.command in RUN_MODELS:
            from .allocator import keep_freed_memory
            keep_freed_memory()
        COMMANDS[args.command](args)
    except UserError as e:
        print(f"exitwise: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("exitwise: interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as e:
        package = (e.name or "").split(".")[0]
        if package not in INSTALLS:
            raise
        print(f"exitwise: error: exitwise {args.command if args else ''} needs {package}, which is not installed here: "
              f"{INSTALLS[package]}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the output piped into a reader that stopped early (`| head`): end quietly, as other tools do; stdout goes to
        # devnull so the interpreter's last flush raises no second error (the recipe of Python's signal docs)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    finally:
        if before is not None:  # the caller's handler back (main may run inside another program, a test)
            signal.signal(signal.SIGTERM, before)
    return 0

"""`TorchRunner`: an `EarlyExitModel` as a `deploy.runner.Runner`, on the offline runtime's pieces.

The network is `runtime.prepare`d in the precision `tune.tune` chooses (as `EarlyExitModel.run` does) and
runs in the micro-batch it measures; a stage is `runtime.run_stage`, the exit decision the policy's own `step`
and `exit_rule.leaves`, compaction `runtime.keep_rows`. So a served sample leaves where `EarlyExitModel.run`
lets it leave. `early_exit=False` is the baseline: the same network, side heads skipped, nobody leaves early.

A stage call uses torch's threads as set when the runner was made, shared out among the scheduler's `workers`
(threads running stage calls at once: each gets its share). `make_runner` builds the runner in a thread of its
own, so that only the threads running stage calls hold teams of OpenMP threads (see there).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .config import threads_per_worker
from .deploy.runner import StepOut, model_name
from .early_exit import EarlyExitModel
from .errors import UserError
from .exit_rule import leaves
from .models.base import device_of
from .runtime import keep_rows, run_stage
from .tune import Agreement, tune

TUNE_IMAGES = 256  # random images the precision and micro-batch are chosen on (a server has no data set)


class TorchRunner:
    platform = "pytorch"

    def __init__(self, model: EarlyExitModel, *, early_exit: bool = True, precision: str = "auto",
                 micro_batch: int | None = None, name: str | None = None, workers: int = 1,
                 agreement: Agreement | None = None):
        self.threads = threads_per_worker(torch.get_num_threads(), workers)
        if model.precision is None:
            from .data import ImageSet
            c, h, w = model.network.input_shape
            g = torch.Generator().manual_seed(0)
            data = ImageSet(torch.randint(0, 256, (TUNE_IMAGES, h, w, c), dtype=torch.uint8, generator=g),
                            torch.zeros(TUNE_IMAGES, dtype=torch.int64), tuple(model.class_names or ()))
            everyone = torch.get_num_threads()
            torch.set_num_threads(self.threads)  # measured on the threads a stage call will run on (this thread's
            try:                                 # count only: OpenMP's is per thread)
                tuned = tune(model.network, data, precision, micro_batch, check_images=TUNE_IMAGES,
                             agreement=agreement)
            finally:
                torch.set_num_threads(everyone)
            self.network, self.precision, self.micro_batch = tuned.network, tuned.precision, tuned.micro_batch
        else:  # prepared already: served in the precision it was prepared in
            from .config import DEFAULT_MICRO_BATCH
            if precision not in ("auto", model.precision):
                raise ValueError(f"this early-exit model is prepared in {model.precision}: serve it in that precision "
                                 f"(precision='auto') or give the model unprepared, not {precision!r}")
            self.network, self.precision = model.network, model.precision
            self.micro_batch = micro_batch or DEFAULT_MICRO_BATCH
        self.model, self.early_exit = model, early_exit
        self.policy = model.policy
        self._state_row = self.policy.init_state(1).numpy()
        self.device = device_of(self.network)
        self.num_exits = self.network.num_exits
        self.input_shape = tuple(self.network.input_shape)
        self.class_names = tuple(model.class_names) if model.class_names else None
        self.name = name or model_name(model.model_name)
        thr = torch.as_tensor(np.asarray(model.thresholds, dtype=np.float64), dtype=torch.float32)
        self.thresholds = list(thr.to(self.device).unbind())  # as `runtime.run_early_exit` makes them

    def to_input(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (N, H, W, C) to float32 (N, C, H, W) in [0, 1], channels_last: what `ImageSet.batches` yields.
        A read-only array (a request's own bytes, `np.frombuffer`) is copied: torch warns on one, and never writes."""
        images = images if images.flags.writeable else images.copy()
        return torch.from_numpy(images).to(self.device).permute(0, 3, 1, 2).float().div_(255)

    def init_state(self, n: int) -> np.ndarray:
        return np.repeat(self._state_row, n, axis=0)  # no torch call on the server's event loop

    def _own_threads(self) -> None:
        """The calling thread's OpenMP team at a worker's share of the threads (the count is per thread: any other
        thread, a tier's forwarding or the event loop's executor, would run a full team beside the workers')."""
        if self.threads != torch.get_num_threads():
            torch.set_num_threads(self.threads)

    @torch.inference_mode()
    def step(self, k: int, features: torch.Tensor, state: np.ndarray) -> StepOut:
        self._own_threads()
        last = k == self.num_exits - 1
        head = last or self.early_exit
        pieces = features.split(self.micro_batch) if len(features) > self.micro_batch else [features]
        if not head:
            x = [self.network.stages[k](p) for p in pieces]
            return StepOut(x[0] if len(x) == 1 else torch.cat(x), None, None, None, state)
        outs = [run_stage(self.network, k, p) for p in pieces]
        x = outs[0][0] if len(outs) == 1 else torch.cat([o[0] for o in outs])
        logits = outs[0][1] if len(outs) == 1 else torch.cat([o[1] for o in outs])
        if last:
            leave = torch.ones(len(x), dtype=torch.bool)
        else:
            scores, new_state = self.policy.step(k, logits, torch.from_numpy(state).to(self.device))
            leave, state = leaves(scores, self.thresholds[k]), new_state.cpu().numpy()
        return StepOut(x, leave.cpu().numpy(), *self._answer(k, logits), state)

    def _answer(self, k: int, logits: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(class, its softmax probability at the policy's temperature) of exit k's logits."""
        scaled = logits if self.policy.temperatures is None else logits / self.policy.temperatures[k]
        p, predictions = torch.softmax(scaled.float(), -1).max(-1)
        return predictions.cpu().numpy(), p.cpu().numpy()

    @torch.inference_mode()
    def stage(self, k: int, features: torch.Tensor) -> torch.Tensor:
        self._own_threads()
        return self.network.stages[k](features)

    @torch.inference_mode()
    def answer(self, k: int, array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self._own_threads()
        return self._answer(k, self.network.heads[k](self.from_numpy(array)).float())

    def take(self, features: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        return keep_rows(features, torch.from_numpy(np.asarray(rows)).to(self.device))

    def concat(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        return parts[0] if len(parts) == 1 else torch.cat(list(parts))

    def to_numpy(self, features: torch.Tensor) -> np.ndarray:
        return features.float().cpu().numpy()

    def from_numpy(self, array: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(self.device)
        return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def load_early_exit(*, model: str | None = None, weights: str | Path | None = None, source: str | Path | None = None,
                    early_exit: bool = True) -> EarlyExitModel:
    """The early-exit model `exitwise serve` runs: a saved one (`source`: early_exit.json or its folder), or a
    registered model with its shipped weights and the calibrated setting its card carries (`calibrated`)."""
    if source is not None:
        return EarlyExitModel.load(source)
    from .models import load_model, shipped_classes
    network, _ = load_model(model, weights)
    calibrated = EarlyExitModel.calibrated(network, model, weights)
    if calibrated is not None:
        return calibrated
    if early_exit:
        why = "other weights than the shipped ones" if weights is not None else "no calibrated setting"
        raise UserError(f"model {model!r} with {why}: serve a study's or calibration's folder (--from DIR), "
                        "or the full network (--no-early-exit)")
    return EarlyExitModel.create(network, model, "entropy", [None] * (network.num_exits - 1),
                                 class_names=shipped_classes(model) if weights is None else None)


def card_agreement(model: str | None, weights: str | Path | None = None) -> Agreement | None:
    """Per exit, how often each reduced precision predicts as fp32 does on real validation images, as a shipped
    model's card records it (`scripts/ship_weights.py`): what `tune` checks a precision against instead of the
    server's random images. None for other weights, or a card without it."""
    from .models import shipped_card, shipped_weights
    if model is None or weights is not None or not shipped_weights(model):
        return None
    agreement = shipped_card(model).precision_agreement
    return None if agreement is None else agreement.per_exit


def folder_agreement(source: str | Path) -> Agreement | None:
    """Per exit, how often each reduced precision predicted as fp32 did on the validation images of the study
    behind `source` (for the precisions it checked): a study's folder's results.json, or a calibration's
    calibration.json, which carries its study's measurements; only where that study ran the weights `source` names
    (the same SHA-256). What `tune` checks a precision against instead of the server's random images. None for a
    folder without them (one moved away from its study, or an older one)."""
    import json
    from .early_exit import CALIBRATION_FILE, saved_weights_sha256
    from .study.results import RESULTS_FILE, CalibrationReport, StudyResults
    folder = Path(source) if Path(source).is_dir() else Path(source).parent
    for name, measured in ((RESULTS_FILE, StudyResults.from_json),
                           (CALIBRATION_FILE, lambda doc: CalibrationReport.from_json(doc).study)):
        try:
            found = measured(json.loads((folder / name).read_text()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):  # none there, or not a study's
            continue
        if found.model is None or found.model.weights_sha256 != saved_weights_sha256(source):
            return None
        return found.precision_check.agreement(found.model.num_exits) if found.precision_check else None
    return None


def make_runner(*, model: str | None = None, weights: str | Path | None = None, source: str | Path | None = None,
                early_exit: bool = True, precision: str = "auto", micro_batch: int | None = None,
                workers: int = 1) -> TorchRunner:
    """`exitwise serve --model/--from`'s runner (a module-level function, so Ray can ship it to replicas), built in
    a thread of its own that ends when it is built. Loading and tuning run torch on several threads, and GNU
    OpenMP keeps a team of threads for each thread that did; while it holds more threads than there are CPUs
    it stops spinning between parallel regions, and every operator then waits for sleeping threads to wake.
    Built in this process's main thread, its team stayed for good, and a single image on two threads in a
    scheduler worker took 2.8 ms instead of 1.1 (b-resnet11, AMD Zen 4, 2 cores; docs/serve.md)."""
    import threading
    built: list = []

    def build() -> None:
        try:
            built.append(TorchRunner(load_early_exit(model=model, weights=weights, source=source,
                                                     early_exit=early_exit), early_exit=early_exit,
                                     precision=precision, micro_batch=micro_batch, workers=workers,
                                     agreement=card_agreement(model, weights) if source is None
                                     else folder_agreement(source)))
        except BaseException as e:  # noqa: BLE001  re-raised in the caller's thread
            built.append(e)

    thread = threading.Thread(target=build, name="exitwise-load")
    thread.start()
    thread.join()
    if isinstance(built[0], BaseException):
        raise built[0]
    return built[0]

"""The model card (`model.json`): what a training run (`train.py`, `exitwise train` and `exitwise attach`) records
beside its weights, and what a shipped model's card adds (`scripts/ship_weights.py`: `stored_dtypes`,
`check_subset`, `precision_agreement`; `scripts/card_calibrated.py`: `calibrated`). Read and written with
`records`' one mapping; the keys are those the cards have always had, so older code reads new cards and back.
Torch-free.
"""
from __future__ import annotations

from dataclasses import dataclass

from .. import records
from ..records import Thresholds
from ..refs import DatasetRef, TrainPrecisionProbe


@dataclass(frozen=True)
class CalibratedSetting:
    """The early-exit setting a shipped card carries (`scripts/card_calibrated.py`): chosen on validation by a
    study of the shipped weights, its accuracy measured on test. What `exitwise serve --model`, `exitwise export
    --model` and `exitwise models` take."""
    rule: str                               # how it was chosen, e.g. "fastest within 0.5 points of the final exit, ..."
    policy: str
    temperatures: tuple[float, ...] | None  # per exit; None: the policy's scores as they are
    thresholds: Thresholds
    val_accuracy: float
    test_accuracy: float
    mean_macs: float                        # per test sample
    exit_shares: tuple[float, ...]          # of the test samples leaving at each exit
    study_precision: str                    # the precision the study measured in
    exitwise_version: str


@dataclass(frozen=True)
class PrecisionAgreement:
    """Per exit, the share of real images on which each reduced precision predicts the class fp32 predicts
    (`scripts/ship_weights.py`): what a server checks a precision against, having no images of its own."""
    split: str
    images: int
    per_exit: dict[str, tuple[float, ...]]  # by precision
    machine: str                            # where it was measured, in words


@dataclass(frozen=True)
class HeadReport:
    """A side head's cost beside the stage it follows (`costs.head_report`)."""
    exit: str                               # the exit's name (an attached model: the submodule it follows)
    head_macs: int
    stage_macs: int
    fraction: float                         # head_macs / stage_macs
    kind: str | None = records.optional()  # an attached model's head kind (`auto`'s choice); absent otherwise


@dataclass(frozen=True, kw_only=True)
class ModelCard:
    """A trained model's card. Fields in the order the file has them. The `records.optional()` ones are keys a card
    may lack (the shipped cards predate `precision_probe` and `heads`; only shipped ones may have the last five):
    `to_json` leaves them out while None, so every card round-trips exactly
    (`ModelCard.from_json(doc).to_json() == doc`) and no reader meets a null where it expected a key or nothing; a
    card trained without a precision probe now lacks `precision_probe` (it was null). The other fields are always
    written (`val_accuracy`, `test_accuracy`: null without such images, as before). Free-form records that no
    code reads stay dicts."""
    model: str                       # a registered name, or an attached model's file
    num_exits: int
    dataset: DatasetRef
    split_seed: int
    recipe: dict                     # the TrainConfig trained with
    epochs: int
    train_seconds: float
    precision: str                   # what training ran in ("auto" resolved)
    precision_probe: TrainPrecisionProbe | None = records.optional()  # the evidence when "auto" chose it
    machine: dict                    # device.machine()'s fields, platform and processes
    val_accuracy: tuple[float, ...] | None  # per exit, after the last epoch (None: no validation images)
    test_accuracy: tuple[float, ...] | None  # per exit (None: no test images)
    exit_macs: tuple[int, ...]       # cumulative, per sample leaving at each exit
    heads: tuple[HeadReport, ...] | None = records.optional()
    history: tuple[dict, ...]        # per epoch: loss, lr, accuracies, seconds
    weights: str                     # the weights file beside the card
    exitwise_version: str
    note: str | None = records.optional()
    stored_dtypes: tuple[str, ...] | None = records.optional()  # a shipped model's tensors as stored (float16 loads as float32)
    check_subset: dict | None = records.optional()  # a shipped model's fp32 accuracy on a few test images, which tests reproduce
    calibrated: CalibratedSetting | None = records.optional()
    precision_agreement: PrecisionAgreement | None = records.optional()

    def to_json(self) -> dict:
        return records.to_json(self)

    @classmethod
    def from_json(cls, doc: dict) -> ModelCard:
        return records.from_json(cls, doc)

    def __getitem__(self, key: str):
        """`card["test_accuracy"]`: the dict `train`, `train_exits` and `attach_model` returned before (kept for
        one release)."""
        return self.to_json()[key]


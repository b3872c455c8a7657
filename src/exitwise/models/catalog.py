"""What `exitwise models` lists: every registered network, what it takes and costs, and for weights that ship with
the package the accuracy their model card records and the early-exit setting calibrated for them."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .. import records
from .card import CalibratedSetting
from .costs import backbone_macs, exit_macs
from .ref import create_model
from .registry import MODELS
from .weights import shipped_card, shipped_weights


@dataclass(frozen=True)
class ModelEntry:
    """One registered network; the last four fields come from its shipped weights' card (None without)."""
    name: str
    input_shape: tuple[int, int, int]  # C, H, W
    num_classes: int
    backbone_macs: int                 # per sample, the network without its side exits (what runs without early exit)
    exit_macs: tuple[int, ...]         # cumulative MACs of a sample leaving at each exit, side exits included
    dataset: str | None = None         # what the shipped weights were trained on
    test_accuracy: tuple[float, ...] | None = None  # per exit, on that data set's test split
    setting: CalibratedSetting | None = None

    @property
    def shipped(self) -> bool:
        return self.dataset is not None

    def to_json(self) -> dict:
        return records.to_json(self)  # with `shipped`; a threshold of -inf (never leave) as null


def catalog() -> tuple[ModelEntry, ...]:
    """Every registered model, by name."""
    entries = []
    for name in sorted(MODELS):
        network = create_model(name)
        entry = ModelEntry(name, tuple(network.input_shape), network.num_classes, backbone_macs(network),
                           tuple(exit_macs(network)))
        if shipped_weights(name):
            card = shipped_card(name)
            entry = dataclasses.replace(entry, dataset=card.dataset.name, test_accuracy=card.test_accuracy,
                                        setting=card.calibrated)
        entries.append(entry)
    return tuple(entries)


def format_catalog(entries: tuple[ModelEntry, ...]) -> str:
    """The catalog as a table: one line per model."""
    rows = [("model", "input", "exits", "M MACs", "weights", "test acc.", "early exit (shipped setting), on test")]
    for e in entries:
        full = e.backbone_macs
        early = ("-" if e.setting is None else
                 f"{e.setting.test_accuracy:.2%} at {e.setting.mean_macs / 1e6:.1f} M MACs "
                 f"({full / e.setting.mean_macs:.2f}x fewer; {e.setting.policy})")
        rows.append((e.name, "x".join(map(str, e.input_shape)), str(len(e.exit_macs)), f"{full / 1e6:.1f}",
                     e.dataset or "none", f"{e.test_accuracy[-1]:.2%}" if e.test_accuracy else "-", early))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows)

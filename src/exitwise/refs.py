"""What a saved file records about where its figures came from: the network and its weights (`ModelRef`) and the data
(`DatasetRef`), as results.json's and a study's logits' `model` and `dataset`. Torch-free, so those files read without
torch; `models/ref.py` resolves a `ModelRef` to a network, `data.Splits.describe()` makes a `DatasetRef`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .errors import UserError


def missing_fields(kind, doc) -> list[str]:
    """The fields of dataclass `kind` that `doc` (parsed JSON) lacks or holds as null."""
    return [f.name for f in dataclasses.fields(kind) if not isinstance(doc, dict) or doc.get(f.name) is None]


@dataclass(frozen=True)
class ModelRef:
    """A network and its weights, as results.json's `model` and a study's logits record them."""
    name: str             # a registered model, or the absolute path of a folder `exitwise attach` wrote
    weights: str          # the weights file (or shard index); an attached folder's own model.safetensors
    weights_sha256: str   # of every file the weights are made of (a shard index, then its shards)
    shipped: bool         # the weights came with the package
    num_exits: int

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, doc: dict, named_by: str) -> ModelRef:
        """The `model` a saved file (`named_by`) records; refused in one line if it lacks a field."""
        missing = missing_fields(cls, doc)
        if missing:
            raise UserError(f"{named_by!r} does not name the model and weights it came from (no {missing[0]})")
        return cls(**{f.name: doc[f.name] for f in dataclasses.fields(cls)})

    def __getitem__(self, key: str):
        """`ref["weights_sha256"]`: the dict `api.load_model` returned before (kept for one release)."""
        return self.to_json()[key]


@dataclass(frozen=True)
class SplitSizes:
    """Images in each split."""
    train: int
    val: int
    test: int


@dataclass(frozen=True)
class DatasetRef:
    """The data a study or training run used, as results.json's `dataset`, a study's logits and a model card record
    it (`Splits.describe()`)."""
    name: str                  # "cifar10", "digits", "folder", or a caller's own name
    source: str                # where the images came from (a path, or "scikit-learn digits")
    classes: tuple[str, ...]
    sizes: SplitSizes
    split_seed: int            # the seed that chose the validation images from train

    @property
    def val_size(self) -> int:
        """= sizes.val; the files have always had both (written, not read back)."""
        return self.sizes.val

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "classes": list(self.classes), "val_size": self.val_size}

"""`EarlyExitModel`: a multi-exit network with its exit policy and thresholds, the unit that is run, saved and shipped.

A study's chosen setting and `exitwise calibrate`'s result both come down to this: which network,
how an exit scores its confidence (the policy, with its temperatures), and one threshold per side
exit. Saved as a folder of two files, never pickled:

* `early_exit.json`: format, model name, policy, temperatures, thresholds (null = never leave there),
  exits, classes, input shape;
* `model.safetensors`: the network's weights; or, to avoid a copy of weights kept elsewhere (a study's
  output names the checkpoint it ran), `weights` and `weights_sha256` in the JSON, checked on load.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .config import as_tuple
from .errors import UserError
from .exit_rule import as_thresholds, thresholds_to_json
from .io import atomic_write_json, file_sha256, read_format_json, staged_output
from .records import JSON_NAMES
from .models import (MultiExitNetwork, calibrated_setting, check_fits, load_network, reference, shipped_classes,
                     weight_files)
from .policies import ExitPolicy, get_policy

FORMAT = "exitwise.early-exit-model/1"
CONFIG_FILE = "early_exit.json"
CALIBRATION_FILE = "calibration.json"  # what `exitwise calibrate` writes beside it
WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class EarlyExitModel:
    """`network` run with early exit: a sample leaves at the first side exit whose `policy` score is <= its threshold."""
    network: MultiExitNetwork
    policy: ExitPolicy
    thresholds: np.ndarray = field(repr=False)  # (K - 1,) float64; -inf never lets a sample leave there
    model_name: str                              # the registered model that rebuilds `network`
    class_names: tuple[str, ...] | None = None
    precision: str | None = None                 # set by `prepare`: `network` is an inference copy in it

    def __post_init__(self) -> None:
        if isinstance(self.policy, str):  # a name, as `create` and `with_setting` take it
            object.__setattr__(self, "policy", get_policy(self.policy))
        if not isinstance(self.policy, ExitPolicy):
            raise TypeError(f"policy must be an ExitPolicy or a registered policy's name, got "
                            f"{type(self.policy).__name__}")
        object.__setattr__(self, "thresholds", as_thresholds(list(self.thresholds), self.network.num_exits))

    @classmethod
    def create(cls, network: MultiExitNetwork, model_name: str, policy: str | ExitPolicy,
               thresholds: Sequence[float | None], temperatures: Sequence[float] | None = None,
               class_names: Sequence[str] | None = None) -> EarlyExitModel:
        """From names and JSON-style thresholds (None: never leave at that exit)."""
        exit_policy = get_policy(policy) if isinstance(policy, str) else policy
        thresholds = as_tuple(thresholds, "thresholds")  # a lone number or "0.1,0.2": one line, not a TypeError
        temperatures = None if temperatures is None else as_tuple(temperatures, "temperatures")
        class_names = None if class_names is None else as_tuple(class_names, "class_names")
        if temperatures is not None:
            if len(temperatures) != network.num_exits:
                raise UserError(f"expected {network.num_exits} temperatures (one per exit), got {len(temperatures)}")
            exit_policy = exit_policy.with_temperatures(temperatures)
        if class_names is not None and (len(class_names) != network.num_classes
                                        or not all(isinstance(c, str) for c in class_names)):
            raise UserError(f"expected {network.num_classes} class names (strings, one per class), got "
                            f"{len(class_names)}: {str(list(class_names))[:80]}")
        return cls(network, exit_policy, thresholds, model_name, class_names)  # thresholds checked when made

    @classmethod
    def calibrated(cls, network: MultiExitNetwork, model_name: str,
                   weights: str | Path | None = None) -> EarlyExitModel | None:
        """`network` with the early-exit setting the card of registered model `model_name`'s shipped weights
        carries (chosen on validation: `scripts/card_calibrated.py`) and the card's class names; None for other
        `weights`, or where no weights or no setting ship (each command words its own refusal)."""
        setting = calibrated_setting(model_name, weights)
        if setting is None:
            return None
        return cls.create(network, model_name, setting.policy, setting.thresholds, setting.temperatures,
                          shipped_classes(model_name))

    def prepare(self, precision: str = "fp32", device: str = "cpu") -> EarlyExitModel:
        """This model with an inference copy of its network on `device` (`runtime.prepare`), to run many times
        without preparing again; `with_setting` gives others that share the copy."""
        from .runtime import prepare
        if self.precision is not None:
            raise ValueError("this early-exit model is prepared already")
        return dataclasses.replace(self, network=prepare(self.network, precision, device), precision=precision)

    def with_setting(self, policy: str | ExitPolicy, thresholds: Sequence[float | None]) -> EarlyExitModel:
        """The same network (prepared or not) with another policy and thresholds."""
        return dataclasses.replace(self, policy=policy, thresholds=thresholds)  # both read and checked when made

    def run(self, data, *, precision: str | None = None, batch_size: int = 256, micro_batch: int | None = None,
            progress: bool = False):
        """Real early exit over an ImageSet of the network's image size (see `runtime.run_early_exit`): each sample's
        exit and prediction (none for an empty one).
        Runs a prepared model as it is (micro-batch default: `config.DEFAULT_MICRO_BATCH`); otherwise prepares
        a copy for this run in `precision` (default "auto") and the micro-batch measured fastest on this machine
        (`tune.tune`)."""
        from .config import DEFAULT_MICRO_BATCH, check_micro_batch, check_precision
        from .data import ImageSet
        from .tune import tune
        from .runtime import run_early_exit
        if not isinstance(data, ImageSet):  # checked once here, not in the loop
            raise TypeError(f"run takes an ImageSet, got {type(data).__name__}: wrap images (uint8 (N, H, W, C) or "
                            "float (N, C, H, W) in [0, 1]) as ImageSet.from_tensors(images, labels)")
        check_fits(self.network, data, "the ImageSet", classes=False)
        check_micro_batch(micro_batch)
        if precision is not None:
            check_precision(precision)
        if self.precision is not None and precision not in (None, self.precision):
            raise ValueError(f"this early-exit model is prepared in {self.precision}, not {precision}")
        if self.precision is not None or not len(data):  # no images: nothing to tune on, nothing runs
            network, micro_batch = self.network, micro_batch or DEFAULT_MICRO_BATCH
        else:
            tuned = tune(self.network, data, precision or "auto", micro_batch, batch_size=batch_size)
            network, micro_batch = tuned.network, tuned.micro_batch
        return run_early_exit(network, data, self.thresholds, self.policy, batch_size=batch_size,
                              progress=progress, micro_batch=micro_batch)

    def to_json(self) -> dict:
        return {"format": FORMAT, "model": self.model_name, "policy": self.policy.name,
                "temperatures": list(self.policy.temperatures) if self.policy.temperatures is not None else None,
                "thresholds": thresholds_to_json(self.thresholds), "num_exits": self.network.num_exits,
                "num_classes": self.network.num_classes, "input_shape": list(self.network.input_shape),
                "class_names": list(self.class_names) if self.class_names is not None else None}

    def save(self, out_dir: str | Path, weights: str | Path | None = None) -> Path:
        """`early_exit.json` and `model.safetensors` into `out_dir`, both or neither. With `weights` (the
        checkpoint the network was loaded from) the JSON names that file and its SHA-256 instead of a copy."""
        with staged_output(out_dir) as stage:
            self.write(stage, weights)
        return Path(out_dir)

    def write(self, folder: Path, weights: str | Path | None = None, weights_sha256: str | None = None) -> None:
        """`save` into a folder the caller stages (a study's or calibration's output). `weights_sha256`: the
        checkpoint's hash as recorded when it was loaded (else it is hashed now)."""
        config = self.to_json()
        if weights is None:
            if self.precision is not None:
                raise ValueError("a prepared network's weights are folded: save the model it was prepared from")
            from safetensors.torch import save_file
            save_file({k: v.contiguous() for k, v in self.network.state_dict().items()}, str(folder / WEIGHTS_FILE))
        else:
            config.update(weights=str(Path(weights).resolve()),
                          weights_sha256=weights_sha256 or file_sha256(*weight_files(weights)))
        atomic_write_json(folder / CONFIG_FILE, config)

    @classmethod
    def load(cls, path: str | Path) -> EarlyExitModel:
        """Rebuild a saved early-exit model: the registered network, its weights, policy and thresholds."""
        config_path, config = _read_config(path)
        network = load_network(_saved_reference(config_path, config), str(config_path))
        return cls.create(network, config["model"], config["policy"], config["thresholds"],
                          config.get("temperatures"), config.get("class_names"))


# the JSON type of each key of a saved setting (an early_exit.json, or `exitwise export --thresholds`' file); null
# stands for an optional key left out
SETTING_KEYS = {"model": str, "policy": str, "thresholds": list, "temperatures": list, "class_names": list,
                "num_exits": int, "weights": str, "weights_sha256": str}


def check_setting(doc: dict, where: str, required: Sequence[str]) -> dict:
    """`doc`, a saved setting, refused in one line (`where`: which file) when it lacks a `required` key or holds a key
    of another type."""
    missing = [k for k in required if doc.get(k) is None]
    if missing:
        raise UserError(f"{where} lacks {' and '.join(missing)}")
    for key, kind in SETTING_KEYS.items():
        if doc.get(key) is not None and (not isinstance(doc[key], kind) or isinstance(doc[key], bool)):
            raise UserError(f"{where}: {key} is {json.dumps(doc[key])[:60]}, not {JSON_NAMES[kind]}")
    return doc


def _read_config(path: str | Path) -> tuple[Path, dict]:
    """The path and content of a saved early-exit model's `early_exit.json` (`path`: it or its folder)."""
    path = Path(path)
    config_path = path / CONFIG_FILE if path.is_dir() else path
    calibrated = (config_path.parent / CALIBRATION_FILE).is_file()
    config = read_format_json(config_path, FORMAT, "early-exit model", missing=f"no early-exit model at "
                              f"{str(config_path)!r}: the calibration there wrote none (its goal was not met, or its "
                              f"study names no model: see its {CALIBRATION_FILE})" if calibrated else None)
    return config_path, check_setting(config, repr(str(config_path)), ("model", "policy", "thresholds", "num_exits"))


def _saved_reference(config_path: Path, config: dict):
    """The weights a saved early-exit model runs on (`ModelRef`): the checkpoint its JSON names, or its own copy."""
    weights = Path(config["weights"]) if config.get("weights") else config_path.parent / WEIGHTS_FILE
    return reference(config["model"], weights, config.get("weights_sha256"), config["num_exits"])


def saved_weights_sha256(path: str | Path) -> str:
    """SHA-256 of the weights a saved early-exit model runs on, as `EarlyExitModel.load` loads them."""
    return _saved_reference(*_read_config(path)).weights_sha256

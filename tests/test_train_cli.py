"""`exitwise train` and `exitwise attach` as their --help describes them: --seed seeds the initialisation too (one
seed, the same weights), and attach's help shows the defaults attach trains with, not `exitwise train`'s."""
import re

import pytest
from safetensors.torch import load_file

from exitwise.cli import build_parser, main
from exitwise.config import ATTACH_DEFAULTS, TrainConfig


def _train(out, *extra) -> dict:
    assert main(["train", "--dataset", "digits", "--model", "digits-convnet", "--epochs", "1", "--precision", "fp32",
                 "--no-progress", "--out", str(out), *extra]) == 0
    return load_file(out / "model.safetensors")


def test_one_seed_trains_the_same_weights_twice_and_another_seed_others(tmp_path):
    pytest.importorskip("sklearn")
    first, again, other = _train(tmp_path / "a"), _train(tmp_path / "b"), _train(tmp_path / "c", "--seed", "1")
    assert all((first[k] == again[k]).all() for k in first)  # the initialisation is seeded, not left to chance
    assert not all((first[k] == other[k]).all() for k in first)


def _shown_default(command: str, flag: str) -> str:
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    help_text = next(a.help for a in sub._actions if flag in a.option_strings)
    return re.search(r"\(default ([^)]*)\)", help_text).group(1)


@pytest.mark.parametrize("flag, field", [("--epochs", "epochs"), ("--lr", "lr"),
                                         ("--label-smoothing", "label_smoothing")])
def test_attach_help_shows_the_defaults_attach_trains_with(flag, field):
    assert float(_shown_default("attach", flag)) == ATTACH_DEFAULTS[field]
    assert float(_shown_default("train", flag).split(";")[0]) == getattr(TrainConfig(), field)


@pytest.mark.parametrize("flag, field", [("--epochs", "epochs"), ("--batch-size", "batch_size"), ("--lr", "lr")])
def test_train_help_shows_the_digits_recipe_beside_cifars(flag, field):
    from exitwise.config import TRAIN_DEFAULTS
    cifar, digits = _shown_default("train", flag).split("; --dataset digits: ")
    assert float(cifar) == getattr(TrainConfig(), field) and float(digits) == TRAIN_DEFAULTS["digits"][field]

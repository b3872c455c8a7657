"""`exitwise train` and `exitwise attach` as their --help describes them: attach's help shows the defaults attach
trains with, not `exitwise train`'s."""
import re

import pytest

from exitwise.cli import build_parser
from exitwise.config import ATTACH_DEFAULTS, TrainConfig


def _shown_default(command: str, flag: str) -> str:
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    help_text = next(a.help for a in sub._actions if flag in a.option_strings)
    return re.search(r"\(default ([^)]*)\)", help_text).group(1)


@pytest.mark.parametrize("flag, field", [("--epochs", "epochs"), ("--lr", "lr"),
                                         ("--label-smoothing", "label_smoothing")])
def test_attach_help_shows_the_defaults_attach_trains_with(flag, field):
    assert float(_shown_default("attach", flag)) == ATTACH_DEFAULTS[field]
    assert float(_shown_default("train", flag)) == getattr(TrainConfig(), field)

"""The CLI starts without torch: its flags and defaults come from torch-free dataclasses (`exitwise.config`,
`exitwise.study.config`); only a command that needs torch imports it. (`exitwise predict` with torch blocked: see
test_onnx_export.py, which has an export to predict with.)"""
import dataclasses
import subprocess
import sys
from pathlib import Path

from exitwise.cli import build_parser
from exitwise.config import AttachConfig, DataConfig, SchedulerConfig, ServeConfig, TrainConfig

SRC = Path(__file__).resolve().parent.parent / "src"


def run_without_torch(code: str) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter where `import torch` raises."""
    return subprocess.run([sys.executable, "-c", "import sys; sys.modules['torch'] = None\n" + code],
                          capture_output=True, text=True, env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"})


def test_help_and_every_command_help_need_no_torch():
    for command in ([], ["study"], ["train"], ["attach"], ["calibrate"], ["export"], ["predict"], ["models"]):
        done = run_without_torch(f"from exitwise.cli import main\nsys.exit(main({command + ['--help']!r}))")
        assert done.returncode == 0, done.stderr
        assert "usage: exitwise" in done.stdout


def test_a_command_that_needs_torch_says_so_in_one_line_where_it_is_not_installed():
    done = run_without_torch("from exitwise.cli import main\nsys.exit(main(['models']))")
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "exitwise models needs torch, which is not installed here: pip install exitwise" in done.stderr


def test_a_user_mistake_is_reported_without_torch():
    done = run_without_torch("from exitwise.cli import main\nsys.exit(main(['calibrate', '--from', 'x']))")
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "required" in done.stderr


def test_train_and_attach_flags_are_the_dataclass_fields_with_a_help():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    dests = {name: {a.dest for a in commands[name]._actions} for name in ("train", "attach", "study")}
    flagged = lambda cls: {f.name for f in dataclasses.fields(cls) if f.metadata.get("help")}
    assert flagged(TrainConfig) <= dests["train"] and flagged(TrainConfig) <= dests["attach"]
    assert flagged(DataConfig) <= dests["train"] & dests["attach"] & dests["study"]
    assert flagged(AttachConfig) <= dests["attach"]
    assert {"momentum", "crop_padding", "flip", "freeze_backbone"}.isdisjoint(dests["train"])  # no help: no flag


def test_flags_not_given_leave_the_dataclass_defaults():
    from exitwise.config import given
    args = build_parser().parse_args(["attach", "--model-file", "m.py:f", "--exits", "a, b", "--out", "o",
                                      "--head", "conv,gap", "--epochs", "3"])
    spec = AttachConfig(**given(args, AttachConfig), freeze_backbone=not args.joint)
    assert spec == AttachConfig(model_file="m.py:f", exits=("a", "b"), head=("conv", "gap"))
    assert given(args, TrainConfig) == {"epochs": 3} and DataConfig(**given(args, DataConfig)) == DataConfig()


def test_the_offered_calibration_methods_are_the_implemented_ones():
    from exitwise.study import calibration
    from exitwise.study.config import CALIBRATION_METHODS
    assert tuple(calibration.METHODS) == CALIBRATION_METHODS


def test_a_flag_made_from_a_config_field_shows_its_default_in_the_help():
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    helps = {a.dest: a.help for a in serve._actions}
    scheduler, server = SchedulerConfig(), ServeConfig()
    assert helps["max_batch"].endswith(f"(default {scheduler.max_batch})")
    assert helps["max_wait_ms"].endswith(f"(default {scheduler.max_wait_ms:g})")  # 0 is shown too
    assert helps["timeout_ms"].endswith(f"(default {scheduler.timeout_ms:g})")
    assert helps["port"].endswith(f"(default {server.port})")
    assert "(default" not in helps["next"]  # None: nothing to show

"""The CLI: user mistakes give one line on stderr, exit status 2 and no output left behind."""
import json
import subprocess
import sys

import pytest
from PIL import Image
from safetensors.torch import save_file

from exitwise.cli import main
from exitwise.data import CIFAR10_CLASSES
from exitwise.early_exit import EarlyExitModel
from exitwise.models import create_model
from exitwise.study.config import StudyConfig
from exitwise.study.results import StudyResults


def make_tree(root, per_class=3, size=32, skip_class=None):
    for split in ("train", "test"):
        for label, name in enumerate(CIFAR10_CLASSES):
            if name == skip_class:
                continue
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (size, size), (label * 20, i * 40, 0)).save(folder / f"{i}.png")
    return root


@pytest.fixture
def seed_weights(tmp_path):
    path = tmp_path / "seed.safetensors"
    save_file(create_model("seed-branchynet").state_dict(), str(path))
    return path


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def study_args(data_dir, weights, out, *extra):
    return ("study", "--dataset", "cifar10", "--data-dir", data_dir, "--model", "seed-branchynet",
            "--weights", weights, "--out", out, "--val-size", "10", "--no-progress", *extra)


def assert_user_error(code, err, *words):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("exitwise: error:"), err
    assert "Traceback" not in err
    for w in words:
        assert w in err


def test_a_small_study_writes_every_output(tmp_path, capsys, seed_weights):
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, *study_args(make_tree(tmp_path / "data"), seed_weights, out,
                                                    "--desired-accuracies", "0.5,0.9"))
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    frontiers_policies = {"entropy", "max-prob", "margin", "patience"}
    assert results["schema_version"] == 2 and StudyResults.from_json(results).to_json() == results
    defaults = StudyConfig()
    assert len(results["sweep"]) == defaults.num_cutoffs and results["fixed_cutoff"]["cutoff"] == defaults.cutoff
    assert {c["method"] for c in results["calibration"]} == {"per-exit", "seed-percentile", "empirical", "guaranteed"}
    assert {c["status"] for c in results["calibration"] if c["method"] in ("empirical", "guaranteed")} <= {"ok", "unreachable"}
    assert results["oracle"]["accuracy"] >= max(e["accuracy"] for e in results["exits"])
    assert results["timing_model"]["machine_load_at_start"]["cpus"] >= 1
    best = results["best"]
    assert all(best[key]["setting"]["policy"] in frontiers_policies for key in ("founding_rule", "fastest_within_points"))
    assert best["within_points"] == 0.5 and best["fastest_within_points"]["timed"]["measured_seconds"] > 0
    frontiers = results["frontiers"]
    assert set(frontiers["policies"]) == frontiers_policies
    assert frontiers["shared_cutoffs"] and frontiers["founding_percentile"] and frontiers["oracle"]
    early_exit = EarlyExitModel.load(out)  # the fastest setting, its weights named by path and hash
    assert early_exit.to_json()["thresholds"] == best["fastest_within_points"]["setting"]["thresholds"]
    assert early_exit.policy.name == best["fastest_within_points"]["setting"]["policy"]
    assert (out / "frontier.png").is_file()
    assert (out / "report.html").is_file() and (out / "report.md").is_file()
    assert "report.html" in stdout
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging leftovers


def test_method_limits_the_founding_calibration_methods_and_the_target_searches_still_run(tmp_path, capsys,
                                                                                          seed_weights):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *study_args(make_tree(tmp_path / "data", per_class=1), seed_weights, out,
                                               "--method", "seed-percentile", "--desired-accuracies", "0.5"))
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert [c["method"] for c in results["calibration"]] == ["seed-percentile", "empirical", "guaranteed"]


@pytest.mark.parametrize("extra, words", [
    (("--cutoff", "-1"), ["cutoff"]),
    (("--cutoff", "nan"), ["cutoff"]),
    (("--desired-accuracies", "0.8,1.5"), ["desired accuracy"]),
    (("--desired-accuracies", "0"), ["desired accuracy"]),
    (("--desired-accuracies", ","), ["at least one desired accuracy"]),
    (("--precision", "fp8"), ["precision"]),
    (("--micro-batch", "0"), ["micro-batch"]),
    (("--micro-batch", "-4"), ["micro-batch"]),
    (("--device", "tpu"), ["device", "tpu"]),
    (("--method", "magic"), ["magic"]),
] + ([(("--device", "cuda"), ["cuda", "not available"])] if not __import__("torch").cuda.is_available() else []))
def test_bad_numbers_are_refused_before_any_work(tmp_path, capsys, seed_weights, extra, words):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *study_args(make_tree(tmp_path / "data", per_class=1), seed_weights, out, *extra))
    assert_user_error(code, err, *words)
    assert not out.exists()


def test_a_study_into_a_calibrations_folder_is_refused_leaving_it_as_it_was(tmp_path, capsys, seed_weights):
    out = tmp_path / "cal"
    out.mkdir()
    for name in ("calibration.json", "early_exit.json"):  # what `exitwise calibrate --out cal` wrote
        (out / name).write_text("{}")
    code, _, err = run_cli(capsys, *study_args(make_tree(tmp_path / "data", per_class=1), seed_weights, out))
    assert_user_error(code, err, "holds a calibration")
    assert sorted(p.name for p in out.iterdir()) == ["calibration.json", "early_exit.json"]


def test_bad_data_dirs(tmp_path, capsys, seed_weights):
    out = tmp_path / "out"
    cases = {"does not exist": tmp_path / "nowhere", "is empty": tmp_path / "empty",
             "no CIFAR-10 data found": tmp_path / "odd"}
    (tmp_path / "empty").mkdir()
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "notes.txt").write_text("hello")
    for words, data_dir in cases.items():
        code, _, err = run_cli(capsys, *study_args(data_dir, seed_weights, out))
        assert_user_error(code, err, words, str(data_dir.name))
        assert not out.exists()


def test_missing_class_folder_is_named(tmp_path, capsys, seed_weights):
    code, _, err = run_cli(capsys, *study_args(make_tree(tmp_path / "d", 1, skip_class="horse"), seed_weights, tmp_path / "o"))
    assert_user_error(code, err, "horse")


def test_corrupt_image_is_named(tmp_path, capsys, seed_weights):
    data = make_tree(tmp_path / "d", 1)
    (data / "test" / "cat" / "0.png").write_bytes(b"\x89PNG broken")
    code, _, err = run_cli(capsys, *study_args(data, seed_weights, tmp_path / "o"))
    assert_user_error(code, err, "0.png")


def test_checkpoint_that_does_not_fit(tmp_path, capsys):
    wrong = tmp_path / "digits.safetensors"
    save_file(create_model("digits-convnet").state_dict(), str(wrong))
    code, _, err = run_cli(capsys, *study_args(make_tree(tmp_path / "d", 1), wrong, tmp_path / "o"))
    assert_user_error(code, err, "do not fit", "missing")
    assert not (tmp_path / "o").exists()


def test_unwritable_output_dir(tmp_path, capsys, seed_weights):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run_cli(capsys, *study_args(make_tree(tmp_path / "d", 1), seed_weights, blocker / "out"))
    assert_user_error(code, err, "cannot write")


def test_failure_mid_study_leaves_an_existing_output_dir_untouched(tmp_path, capsys, seed_weights, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("old")

    def broken_report(results, out_dir):
        (out_dir / "accuracy_vs_cutoff.png").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr("exitwise.study.report.write_report", broken_report)
    with pytest.raises(OSError):
        main([str(a) for a in study_args(make_tree(tmp_path / "d", 1), seed_weights, out)])
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]
    assert (out / "results.json").read_text() == "old"


def test_unknown_model_and_unknown_flag(capsys):
    code, _, err = run_cli(capsys, "study", "--model", "nope", "--out", "x", "--dataset", "digits")
    assert_user_error(code, err, "nope")
    code, _, err = run_cli(capsys, "study", "--bogus", "--out", "x")
    assert_user_error(code, err, "unrecognized arguments: --bogus")


def test_models_lists_each_network_with_its_cards_accuracy_and_calibrated_setting(capsys):
    from exitwise.models import shipped_card
    assert main(["models", "--json"]) == 0
    entries = {e["name"]: e for e in json.loads(capsys.readouterr().out)}
    card, b11 = shipped_card("b-resnet11"), entries["b-resnet11"]
    assert b11["shipped"] and b11["dataset"] == "cifar10" and b11["test_accuracy"] == list(card.test_accuracy)
    assert b11["exit_macs"] == list(card.exit_macs) and b11["input_shape"] == [3, 32, 32]
    assert (b11["setting"]["policy"], b11["setting"]["test_accuracy"]) == (card.calibrated.policy,
                                                                          card.calibrated.test_accuracy)
    assert not entries["b-resnet11-wide"]["shipped"] and entries["b-resnet11-wide"]["setting"] is None
    assert main(["models"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("b-resnet11 "))
    calibrated = card.calibrated
    assert f"{calibrated.test_accuracy:.2%} at {calibrated.mean_macs / 1e6:.1f} M MACs" in row


def test_output_piped_into_a_reader_that_stops_early_ends_quietly():
    reader = subprocess.Popen([sys.executable, "-m", "exitwise", "models", "--json"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    reader.stdout.close()  # as `| head -0` does, long before the command has imported torch and writes
    assert reader.wait(60) == 141 and reader.stderr.read() == b""  # 141: as a shell reports a writer SIGPIPE ended


def test_console_entry_point_runs_as_a_module():
    done = subprocess.run([sys.executable, "-m", "exitwise", "models"], capture_output=True, text=True)
    assert done.returncode == 0 and "seed-branchynet" in done.stdout


def test_study_with_the_max_prob_policy_and_patience_is_pointed_to_calibrate(tmp_path, capsys, seed_weights):
    data = make_tree(tmp_path / "d", 1)
    code, _, err = run_cli(capsys, *study_args(data, seed_weights, tmp_path / "o", "--policy", "max-prob", "--cutoff", "0.2"))
    assert code == 0, err
    assert json.loads((tmp_path / "o" / "results.json").read_text())["policy"] == "max-prob"
    code, _, err = run_cli(capsys, *study_args(data, seed_weights, tmp_path / "p", "--policy", "patience"))
    assert_user_error(code, err, "calibrate")


def test_a_command_terminated_mid_run_leaves_no_output_and_exits_143(tmp_path, monkeypatch):
    """SIGTERM (a job scheduler's stop, `timeout`, `kill`) unwinds as Ctrl-C does; before, the process died at once and
    left its hidden staging folder in --out."""
    import signal
    from exitwise import cli
    out = tmp_path / "out"
    script = f"""
import os, signal, sys, time
from exitwise import cli
from exitwise.io import staged_output

def terminated_mid_write(args):
    with staged_output({str(out)!r}) as stage:
        (stage / "results.json").write_text("{{}}")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)  # the handler raises here

cli.COMMANDS["models"] = terminated_mid_write
sys.exit(cli.main(["models"]))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 143 and done.stderr == "exitwise: terminated\n" and not out.exists(), done
    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setitem(cli.COMMANDS, "models", lambda args: None)
    assert main(["models"]) == 0 and signal.getsignal(signal.SIGTERM) is before  # the caller's handler back


def test_a_value_starting_with_a_minus_is_pointed_to_the_equals_form_which_reaches_the_check(tmp_path, capsys):
    train = ("train", "--dataset", "digits", "--model", "seed-branchynet", "--out", tmp_path / "o")
    code, _, err = run_cli(capsys, *train, "--exit-weights", "-1,1,1")
    assert_user_error(code, err, "--exit-weights", "--flag=-1,1,1")
    code, _, err = run_cli(capsys, *train, "--exit-weights=-1,1,1")
    assert_user_error(code, err, "exit weights must be non-negative")
    assert not (tmp_path / "o").exists()

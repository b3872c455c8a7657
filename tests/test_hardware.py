"""Precision, micro-batch and device are chosen by measuring this machine, and say which machine it was."""
import numpy as np
import pytest
import torch

from exitwise import device, tune
from exitwise.config import AGREEMENT_REQUIRED
from exitwise.device import machine, resolve_device
from exitwise.errors import UserError
from exitwise.refs import Load, PrecisionTried
from exitwise.tune import choose_micro_batch, choose_precision, choose_train_precision, pick_precision
from exitwise.models import create_model
from exitwise.runtime import prepare

from conftest import random_image_set

QUIET = Load(0.0, 2, False, 0.0)  # a quiet machine


def _agreement(table):
    asked = []

    def agreement(p):
        asked.append(p)
        return np.array(table[p])
    return agreement, asked


def test_the_fastest_candidate_that_agrees_with_fp32_wins():
    agreement, asked = _agreement({"bf16": [1.0, 0.999], "mixed": [1.0, 1.0]})
    chosen, tried = pick_precision({"fp32": 3.0, "bf16": 0.4, "mixed": 0.9}, agreement)
    assert chosen.precision == "bf16" and [t.precision for t in tried] == ["bf16", "mixed", "fp32"]
    assert asked == ["bf16"]  # slower candidates than the winner are never checked


def test_a_fast_candidate_that_disagrees_is_passed_over():
    agreement, asked = _agreement({"bf16": [0.98, 1.0], "mixed": [0.995, 1.0]})
    chosen, tried = pick_precision({"fp32": 3.0, "bf16": 0.4, "mixed": 0.9}, agreement)
    assert chosen.precision == "mixed" and asked == ["bf16", "mixed"]
    assert tried[0].agreement_with_fp32 == 0.98 < AGREEMENT_REQUIRED


def test_where_bf16_is_emulated_fp32_wins_without_any_agreement_pass():
    agreement, asked = _agreement({})
    chosen, tried = pick_precision({"fp32": 1.2, "bf16": 8.4, "mixed": 6.7}, agreement)
    assert chosen.precision == "fp32" and asked == []
    assert [t.agreement_with_fp32 for t in tried] == [1.0, None, None]


def test_an_explicit_precision_is_used_as_asked_and_its_agreement_recorded():
    agreement, asked = _agreement({"bf16": [0.9]})
    chosen, tried = pick_precision({"bf16": 8.0}, agreement, auto=False)
    assert chosen.precision == "bf16" and chosen.agreement_with_fp32 == 0.9


def test_choose_precision_times_every_candidate_on_this_machine():
    torch.manual_seed(0)
    precision, check = choose_precision(create_model("digits-convnet"), random_image_set(100), "auto",
                                        check_images=100)
    assert precision in ("fp32", "bf16", "mixed") and check.precision == precision
    assert {t.precision for t in check.tried} == {"fp32", "bf16", "mixed"}
    assert all(t.ms_per_image > 0 for t in check.tried)
    assert check.machine.capability == torch.backends.cpu.get_cpu_capability()
    assert choose_precision(create_model("digits-convnet"), random_image_set(10), "fp32") == ("fp32", None)


def test_the_precision_timing_is_measured_once_per_architecture_and_machine(tmp_path, monkeypatch):
    monkeypatch.setattr(tune, "machine_load", lambda: QUIET)  # as on a quiet machine
    monkeypatch.setenv("EXITWISE_CACHE_DIR", str(tmp_path))
    data = random_image_set(100)
    # seeded weights on which every precision agreed with fp32 on all 100 images (measured on Zen 4), so the choice
    # rests on the timing alone; unseeded, a bf16 agreement of 98% on some random weights flipped it now and then
    torch.manual_seed(5)
    first, check = choose_precision(create_model("digits-convnet"), data, "auto", check_images=100)
    assert check.timing_cached is False
    monkeypatch.setattr(tune, "seconds_per_call", lambda *a, **k: pytest.fail("timed again"))
    torch.manual_seed(6)
    again, cached = choose_precision(create_model("digits-convnet"), data, "auto", check_images=100)  # new weights
    assert again == first and cached.timing_cached is True
    assert [t.ms_per_image for t in cached.tried] == [t.ms_per_image for t in check.tried]


def test_the_agreement_check_runs_once_per_weights_and_images(tmp_path, monkeypatch):
    monkeypatch.setenv("EXITWISE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tune, "machine_load", lambda: QUIET)
    monkeypatch.setattr(tune, "pick_precision", lambda speed, agreement, auto: (
        PrecisionTried("bf16", 1.0, agreement_with_fp32=float(min(agreement("bf16")))), ()))
    data = random_image_set(100)
    torch.manual_seed(5)
    model = create_model("digits-convnet")
    first = choose_precision(model, data, "auto", check_images=100)[1]
    assert first.agreement_cached == ()
    real = tune.all_exit_logits
    monkeypatch.setattr(tune, "all_exit_logits", lambda *a, **k: pytest.fail("checked again"))
    again = choose_precision(model, data, "auto", check_images=100)[1]
    assert again.agreement_cached == ("bf16",) and again.agreement_with_fp32 == first.agreement_with_fp32
    monkeypatch.setattr(tune, "all_exit_logits", real)
    torch.manual_seed(6)  # other weights are checked afresh
    assert choose_precision(create_model("digits-convnet"), data, "auto", check_images=100)[1].agreement_cached == ()


def test_agreement_measured_before_on_real_images_is_used_instead_of_the_data_at_hand(tmp_path, monkeypatch):
    monkeypatch.setenv("EXITWISE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tune, "all_exit_logits", lambda *a, **k: pytest.fail("agreement measured on the data"))
    model, data = create_model("digits-convnet"), random_image_set(100)
    failing = {"bf16": [1.0, 1.0, 0.5], "mixed": [0.9, 1.0, 1.0]}
    picked = tune.tune(model, data, "auto", micro_batch=16, check_images=100, agreement=failing)
    assert picked.precision == "fp32"  # every reduced precision failed on the given agreement: fp32 always passes
    assert set(picked.precision_check.agreement_given) <= {"bf16", "mixed"}
    passing = {"bf16": [1.0, 1.0, 1.0], "mixed": [1.0, 1.0, 1.0]}
    picked = tune.tune(model, data, "auto", micro_batch=16, check_images=100, agreement=passing)
    fastest = min(picked.precision_check.tried, key=lambda t: t.ms_per_image).precision
    assert picked.precision == fastest and picked.precision_check.agreement_given == (() if fastest == "fp32"
                                                                                          else (fastest,))


def test_a_shipped_card_carries_each_reduced_precisions_agreement_on_real_images():
    from exitwise.serve_torch import card_agreement
    for name in ("b-resnet11", "b-resnet11-large", "seed-branchynet"):
        agreement = card_agreement(name)
        assert set(agreement) == {"bf16", "mixed"}, name
        assert all(len(v) == create_model(name).num_exits and all(0.9 <= a <= 1 for a in v)
                   for v in agreement.values()), name
    assert card_agreement("b-resnet11", weights="other.safetensors") is None  # other weights: not these numbers
    assert card_agreement("digits-convnet") is None  # no card check (its data is not CIFAR-10)


def test_a_served_study_or_calibration_checks_precisions_against_what_its_study_measured_on_validation_images(
        tmp_path, monkeypatch):
    import json
    from exitwise import serve_torch
    from exitwise.api import calibrate, study
    from exitwise.config import DataConfig
    monkeypatch.setenv("EXITWISE_CACHE_DIR", str(tmp_path / "cache"))
    study(model="digits-convnet", out=tmp_path / "s", data=DataConfig(dataset="digits"), progress=False,
          num_cutoffs=5, precision_check_images=100, timing_check_images=100)
    check = json.loads((tmp_path / "s" / "results.json").read_text())["precision_check"]
    measured = {t["precision"]: tuple(t["agreement_per_exit"]) for t in check["tried"]
                if t["precision"] != "fp32" and t["agreement_per_exit"]}
    assert serve_torch.folder_agreement(tmp_path / "s") == (measured or None)
    monkeypatch.setattr(serve_torch, "TorchRunner", lambda model, **settings: settings["agreement"])
    # the server is given the study's numbers, not its random images'
    assert serve_torch.make_runner(source=tmp_path / "s" / "early_exit.json") == (measured or None)
    calibrate(tmp_path / "s", tmp_path / "c", within_points=1.0)  # a calibration carries its study's measurements
    assert serve_torch.make_runner(source=tmp_path / "c") == (measured or None)


def test_a_folder_whose_study_ran_other_weights_gives_no_agreement(tmp_path):
    import json
    import shutil
    from exitwise import serve_torch
    from exitwise.api import study
    from exitwise.config import DataConfig
    study(model="digits-convnet", out=tmp_path / "s", data=DataConfig(dataset="digits"), progress=False,
          num_cutoffs=5, precision_check_images=100, timing_check_images=100, precision="bf16")
    assert serve_torch.folder_agreement(tmp_path / "s") is not None  # bf16 asked: its agreement was measured
    results = json.loads((tmp_path / "s" / "results.json").read_text())
    results["model"]["weights_sha256"] = "0" * 64
    (tmp_path / "s" / "results.json").write_text(json.dumps(results))
    assert serve_torch.folder_agreement(tmp_path / "s") is None
    shutil.copy(tmp_path / "s" / "early_exit.json", tmp_path / "alone.json")
    assert serve_torch.folder_agreement(tmp_path / "alone.json") is None  # no study beside it


def test_the_micro_batch_probe_runs_once_per_model_and_machine(tmp_path, monkeypatch):
    monkeypatch.setattr(tune, "machine_load", lambda: QUIET)  # as on a quiet machine
    model, data = prepare(create_model("digits-convnet")), random_image_set(300)
    size, probe = choose_micro_batch(model, data, torch.device("cpu"), "fp32", batch_size=128, cache_dir=tmp_path)
    assert size in (16, 32, 64, 128) and set(probe.ms_per_image) == {"16", "32", "64", "128"}
    assert not probe.cached
    monkeypatch.setattr(tune, "seconds_per_call", lambda *a, **k: pytest.fail("probed again"))
    again, cached = choose_micro_batch(model, data, torch.device("cpu"), "fp32", batch_size=128, cache_dir=tmp_path)
    assert again == size and cached.cached
    with pytest.raises(pytest.fail.Exception):  # a run on 20 images times every size on 20: not this probe's answer
        choose_micro_batch(model, random_image_set(20), torch.device("cpu"), "fp32", batch_size=128, cache_dir=tmp_path)
    other = prepare(create_model("seed-branchynet"))  # another architecture is probed afresh
    with pytest.raises(pytest.fail.Exception):
        choose_micro_batch(other, random_image_set(300, shape=(32, 32, 3)), torch.device("cpu"), "fp32",
                           cache_dir=tmp_path)


def test_a_probe_timed_while_the_machine_is_busy_is_used_once_and_not_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(tune, "machine_load", lambda: Load(9.0, 2, True, 0.9))
    model, data = prepare(create_model("digits-convnet")), random_image_set(64)
    size, probe = choose_micro_batch(model, data, torch.device("cpu"), "fp32", batch_size=64, cache_dir=tmp_path)
    assert not probe.cached and probe.busy_share == 0.9 and not (tmp_path / "probes.json").exists()
    monkeypatch.setattr(tune, "machine_load", lambda: QUIET)
    again, probe = choose_micro_batch(model, data, torch.device("cpu"), "fp32", batch_size=64, cache_dir=tmp_path)
    assert not probe.cached and (tmp_path / "probes.json").exists()  # measured afresh, and now kept


def test_training_precision_is_timed_without_touching_the_model_or_the_rng():
    torch.manual_seed(0)
    model = create_model("digits-convnet")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images, labels = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    state = torch.get_rng_state()
    precision, probe = choose_train_precision(model, images, labels, torch.device("cpu"))
    assert precision == probe.precision == min(probe.ms_per_image, key=probe.ms_per_image.get)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), state)


def test_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(UserError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    for name in ("gpu", "cpu:0", "cuda:x", "cuda:-1"):
        with pytest.raises(UserError, match=f"unknown device '{name}'"):
            resolve_device(name)
    with pytest.raises(UserError, match=f"'cuda:{torch.cuda.device_count()}' is not available"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")  # one past the last GPU
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="'cuda' is not available"):
            resolve_device("cuda")


def test_prepare_takes_a_device_by_name_and_refuses_an_unknown_one_in_one_line():
    from exitwise.models import create_model
    from exitwise.runtime import prepare
    net = create_model("digits-convnet")
    assert next(prepare(net, device="auto").parameters()).device.type in ("cpu", "cuda", "mps")
    with pytest.raises(UserError, match="unknown device 'gpu'"):  # was torch's RuntimeError listing 20 device types
        prepare(net, device="gpu")


def test_the_machine_names_its_cpu():
    m = machine()
    assert m.cpu and m.threads >= 1 and m.capability == torch.backends.cpu.get_cpu_capability()
    assert m.cpu in m.describe() and set(m.to_json()) == {"cpu", "capability", "native_bf16", "threads", "torch",
                                                         "device", "accelerator"}
    assert m.accelerator is None  # a CPU has no GPU name


def test_cache_clear_forgets_the_measured_micro_batches(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tune, "machine_load", lambda: QUIET)  # as on a quiet machine
    from exitwise.cli import main
    monkeypatch.setenv("EXITWISE_CACHE_DIR", str(tmp_path))
    choose_micro_batch(prepare(create_model("digits-convnet")), random_image_set(64), torch.device("cpu"), "fp32")
    assert main(["cache"]) == 0 and "micro-batch measurements" in capsys.readouterr().out
    assert main(["cache", "--clear"]) == 0
    assert not (tmp_path / "probes.json").exists()


def test_tune_prepares_the_model_in_what_it_measured(tmp_path, monkeypatch):
    monkeypatch.setenv("EXITWISE_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    data = random_image_set(100)
    tuned = tune.tune(create_model("digits-convnet"), data, check_images=100, batch_size=64)
    assert tuned.precision == tuned.precision_check.precision
    assert tuned.micro_batch == tuned.micro_batch_probe.micro_batch and tuned.network.training is False
    given = tune.tune(create_model("digits-convnet"), data, "fp32", micro_batch=8)
    assert (given.precision, given.micro_batch, given.precision_check, given.micro_batch_probe) == ("fp32", 8, None, None)


def test_busy_is_decided_by_what_other_processes_do_now_not_by_the_trailing_load_average(monkeypatch):
    monkeypatch.setattr(device.os, "getloadavg", lambda: (9.0, 9.0, 9.0))  # a job that ended a minute ago
    monkeypatch.setattr(device, "cpu_busy_share", lambda: 0.02)
    assert device.machine_load().busy is False
    monkeypatch.setattr(device.os, "getloadavg", lambda: (0.0, 0.0, 0.0))  # a job that has just started
    monkeypatch.setattr(device, "cpu_busy_share", lambda: 0.6)
    load = device.machine_load()
    assert load.busy is True and load.busy_share == 0.6
    assert "other work used 60% of them just now" in load.describe() and "BUSY" in load.describe()


def test_without_proc_stat_the_load_average_decides(monkeypatch):
    monkeypatch.setattr(device, "cpu_busy_share", lambda: None)
    monkeypatch.setattr(device.os, "getloadavg", lambda: (99.0, 0.0, 0.0))
    load = device.machine_load()
    assert load.busy is True and load.busy_share is None
    assert "other work" not in load.describe()


@pytest.mark.skipif(not device.Path("/proc/stat").is_file(), reason="needs /proc/stat (Linux)")
def test_the_busy_share_is_sampled_from_proc_stat():
    share = device.cpu_busy_share(0.05)
    assert share is not None and 0.0 <= share <= 1.0


@pytest.mark.skipif(not device.Path("/proc/stat").is_file(), reason="needs /proc/stat (Linux)")
@pytest.mark.skipif("PYTEST_XDIST_WORKER" in device.os.environ,
                    reason="pytest-xdist's other workers are other processes' work: the machine is not quiet")
def test_this_process_own_threads_are_not_other_work(monkeypatch):
    """/proc/stat's busy time less this process's own (readings made up, so other work on the machine running the
    test cannot change the answer)."""
    import io
    import types
    readings = iter([(1000, 500, 100), (1200, 550, 250),   # of 200 ticks 50 idle, 150 this process's: others 0
                     (1000, 500, 100), (1200, 550, 150)])  # 50 idle, 50 this process's: others 100 of 200
    ticks_per_s = 100
    current = {}

    def stat(path):
        total, idle, own = current["now"] = next(readings)
        return io.StringIO(f"cpu  {total - idle} 0 0 {idle} 0 0 0 0\n")

    fake_os = types.SimpleNamespace(times=lambda: types.SimpleNamespace(user=current["now"][2] / ticks_per_s,
                                                                        system=0.0),
                                    sysconf=lambda name: ticks_per_s)
    monkeypatch.setattr(device, "open", stat, raising=False)
    monkeypatch.setattr(device, "os", fake_os)
    assert device.cpu_busy_share(0) == 0.0  # this process's busy threads are not other work
    assert device.cpu_busy_share(0) == 0.5

"""On a CUDA GPU (skipped without one): the device paths give what the CPU gives, and name the GPU they ran on."""
import json

import numpy as np
import pytest
import torch

from exitwise.data import ImageSet, Splits
from exitwise.device import machine, resolve_device
from exitwise.early_exit import EarlyExitModel
from exitwise.models import create_model
from exitwise.policies import get_policy
from exitwise.runtime import all_exit_logits, prepare
from exitwise.study import StudyConfig, measure
from exitwise.tune import tune

from conftest import random_image_set, spread_thresholds

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")
CUDA = torch.device("cuda")


def _model() -> EarlyExitModel:
    torch.manual_seed(0)
    net, policy = create_model("digits-convnet"), get_policy("entropy")
    thresholds = spread_thresholds(net, random_image_set(200, seed=5), policy)
    return EarlyExitModel(net, policy, np.array(thresholds), "digits-convnet", tuple("0123456789"))


def test_auto_picks_the_gpu_and_every_figure_names_it():
    assert resolve_device("auto").type == "cuda"
    host = machine(CUDA)
    assert host.accelerator == torch.cuda.get_device_name(CUDA) and host.accelerator in host.describe()
    assert json.loads(json.dumps(host.to_json()))["accelerator"] == host.accelerator


def test_every_exits_logits_on_the_gpu_are_the_cpus_up_to_tf32_rounding():
    net, data = _model().network, random_image_set(300, seed=1)
    cpu = all_exit_logits(prepare(net), data).logits
    gpu = all_exit_logits(prepare(net, "fp32", CUDA), data).logits
    assert gpu.shape == cpu.shape and np.isfinite(gpu).all()
    np.testing.assert_allclose(gpu, cpu, rtol=1e-2, atol=1e-2)  # cuDNN may convolve in TF32
    assert (gpu.argmax(-1) == cpu.argmax(-1)).mean() >= 0.98


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_early_exit_on_the_gpu_leaves_where_it_does_on_the_cpu(precision):
    model, data = _model(), random_image_set(300, seed=2)
    cpu = model.prepare("fp32").run(data, batch_size=64)
    gpu = model.prepare(precision, "cuda").run(data, batch_size=64)
    assert set(np.unique(cpu.exits)) == {0, 1, 2}  # the thresholds use every exit
    floor = 0.97 if precision == "fp32" else 0.85   # samples near a threshold may leave elsewhere in bf16
    assert (gpu.exits == cpu.exits).mean() >= floor and (gpu.predictions == cpu.predictions).mean() >= floor


def test_tuning_on_the_gpu_chooses_a_precision_and_micro_batch_it_measured_there():
    net, data = _model().network, random_image_set(256, seed=3)
    tuned = tune(net, data, "auto", None, CUDA, batch_size=128, check_images=128)
    assert tuned.precision in ("fp32", "bf16", "mixed") and tuned.micro_batch >= 1
    assert next(tuned.network.parameters()).device.type == "cuda"
    assert tuned.precision_check.machine.accelerator == torch.cuda.get_device_name(CUDA)


def test_the_study_measures_on_the_gpu(tmp_path):
    from exitwise.models.ref import ModelRef
    data = random_image_set(400, seed=4)
    splits = Splits(data.subset(torch.arange(0, 100)), data.subset(torch.arange(100, 250)),
                    data.subset(torch.arange(250, 400)), "random", "generated", 0)
    config = StudyConfig(device="cuda", num_cutoffs=5, precision_check_images=64, timing_check_images=64,
                         progress=False)
    ref = ModelRef("digits-convnet", "random", "0" * 64, shipped=False, num_exits=3)
    cache = measure(_model().network, splits, config, ref)
    assert cache.val_logits.shape[:2] == (3, 150) and cache.test_logits.shape[:2] == (3, 150)
    assert (np.array(cache.stage_seconds_per_sample) > 0).all()
    assert cache.measurements.machine.device.startswith("cuda")


def test_training_on_the_gpu_learns_saves_cpu_weights_and_hands_the_model_back_on_the_cpu(tmp_path):
    from exitwise.train import TrainConfig, train
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (512,), generator=g)
    images = (labels.view(-1, 1, 1, 1) * 25).expand(-1, 8, 8, 1).to(torch.uint8)  # the class is the brightness
    data = ImageSet(images.contiguous(), labels, tuple(str(i) for i in range(10)))
    splits = Splits(data, data.subset(torch.arange(128)), data.subset(torch.arange(128)), "brightness", "generated", 0)
    net = create_model("digits-convnet")
    card = train(net, splits, TrainConfig(epochs=3, batch_size=64), tmp_path, progress=False, device="cuda")
    assert card is not None and (tmp_path / "model.safetensors").is_file()
    from safetensors.torch import load_file
    assert all(t.device.type == "cpu" for t in load_file(str(tmp_path / "model.safetensors")).values())
    assert json.loads((tmp_path / "model.json").read_text())
    assert {p.device.type for p in net.parameters()} == {"cpu"}  # where the caller built it

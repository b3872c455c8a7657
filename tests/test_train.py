"""Joint multi-exit training: the loss, the augmentation, learning, exact resume, DDP, outputs, bad input."""
import hashlib
import json
import math
import os
import runpy
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import exitwise.train as train_module
from exitwise.models.costs import exit_macs
from exitwise.data import ImageSet, Splits
from exitwise.errors import UserError
from exitwise.models import ModelCard, create_model, load_weights
from exitwise.models.base import MultiExitNetwork
from exitwise.train import TrainConfig, augment, evaluate, joint_loss, side_gradient_scaled, train

SRC = Path(__file__).resolve().parents[1] / "src"


class Toy(MultiExitNetwork):
    """Two exits, with batch norm and dropout, so resume must restore buffers and random state."""

    def __init__(self):
        stages = [nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.2)),
                  nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())]
        heads = [nn.Sequential(nn.Flatten(), nn.Linear(8 * 8 * 8, 4)),
                 nn.Sequential(nn.Flatten(), nn.Linear(16 * 4 * 4, 4))]
        super().__init__(stages, heads, num_classes=4, input_shape=(1, 8, 8))


def quadrants(n: int, seed: int) -> ImageSet:
    """8x8 noise with a bright 4x4 quadrant; the quadrant is the class (separable, and shift-robust)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=g)
    masks = torch.zeros(4, 8, 8, 1, dtype=torch.uint8)
    for q in range(4):
        masks[q, 4 * (q // 2):4 * (q // 2) + 4, 4 * (q % 2):4 * (q % 2) + 4] = 1
    images = torch.randint(0, 60, (n, 8, 8, 1), dtype=torch.uint8, generator=g) + 180 * masks[labels]
    return ImageSet(images, labels, ("a", "b", "c", "d"))


def splits(n_train: int = 96, seed: int = 0, split_seed: int = 0) -> Splits:
    return Splits(quadrants(n_train, seed), quadrants(64, seed + 1), quadrants(64, seed + 2), "quadrants", "test",
                  split_seed)


def ten_classes(data: Splits) -> Splits:
    """The same images labelled as 10 classes (6 unused), for the registry's 10-class digits model."""
    relabel = [ImageSet(s.images, s.labels, tuple("0123456789")) for s in (data.train, data.val, data.test)]
    return Splits(*relabel, data.dataset, data.source, data.split_seed)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread is as fast, and immune to stalls when other work shares the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY = dict(batch_size=32, crop_padding=1, flip=False, precision="fp32", lr=0.05)


def state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_joint_loss_is_the_weighted_sum_of_each_exits_smoothed_cross_entropy():
    logits = [torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]]), torch.tensor([[0.0, 1.0, 0.0], [3.0, -2.0, 1.0]])]
    labels = torch.tensor([0, 2])
    weights, eps = (0.5, 2.0), 0.1

    def ce(row, label):  # by hand: -(1 - eps) log p_label - eps * mean_c log p_c
        log_z = math.log(sum(math.exp(v) for v in row))
        log_p = [v - log_z for v in row]
        return -(1 - eps) * log_p[label] - eps * sum(log_p) / len(log_p)

    expected = sum(w * sum(ce(row.tolist(), y) for row, y in zip(l, labels.tolist())) / 2
                   for w, l in zip(weights, logits))
    assert joint_loss(logits, labels, weights, eps).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError):
        joint_loss(logits, labels, (1.0,))  # one weight per exit, no silent truncation


def test_distillation_mixes_each_side_exits_loss_with_its_kl_to_the_softened_final_exit():
    side = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]], requires_grad=True)
    final = torch.tensor([[0.0, 1.0, 0.0], [3.0, -2.0, 1.0]], requires_grad=True)
    labels, a, t = torch.tensor([0, 2]), 0.25, 2.0

    def softmax(row):
        z = [math.exp(v / t) for v in row]
        return [v / sum(z) for v in z]

    kl = sum(sum(q * math.log(q / p) for p, q in zip(softmax(s), softmax(f)))  # KL(final || side), by hand
             for s, f in zip(side.tolist(), final.tolist())) / 2
    ce = [torch.nn.functional.cross_entropy(l, labels).item() for l in (side, final)]
    loss = joint_loss([side, final], labels, (1.0, 1.0), distill=a, temperature=t)
    assert loss.item() == pytest.approx((1 - a) * ce[0] + a * t * t * kl + ce[1], rel=1e-6)
    loss.backward()  # the final exit is the teacher: only its own cross-entropy moves it
    final_ce = torch.autograd.grad(torch.nn.functional.cross_entropy(final, labels), final)[0]
    assert torch.allclose(final.grad, final_ce)
    same = [final.detach(), final.detach()]
    assert joint_loss(same, labels, (1.0, 1.0), distill=1.0).item() == pytest.approx(ce[1], rel=1e-6)


def test_side_gradient_scales_only_what_side_exits_pass_back_to_the_shared_layers():
    torch.manual_seed(0)
    model, x = Toy().eval(), torch.rand(6, 1, 8, 8)  # eval: no dropout, so every pass is the same function

    def gradients(side_weight: float, scale: float = 1.0) -> list[torch.Tensor]:
        model.zero_grad()
        with side_gradient_scaled(model, scale):
            side, final = model(x)
        (side_weight * side.square().sum() + final.square().sum()).backward()
        return [p.grad.clone() for p in model.parameters()]

    joint, final_only, side_only = gradients(1.0), gradients(0.0), gradients(1.0, scale=0.0)
    shared = len(list(model.stages[0].parameters()))  # stage 0 feeds the side head and the final exit
    for scale in (0.0, 0.25):
        scaled = gradients(1.0, scale)
        for k, (g, j, f) in enumerate(zip(scaled, joint, final_only)):
            expected = f + scale * (j - f) if k < shared else j  # heads and unshared stages: untouched
            assert torch.allclose(g, expected, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(side_only[:shared], final_only[:shared]))
    assert not model.stages[0]._forward_pre_hooks and not model.heads[0]._forward_pre_hooks  # removed after
    with pytest.raises(UserError, match="side gradient"):
        TrainConfig(side_gradient=1.5)


def test_exit_weights_given_as_one_number_are_refused_asking_for_a_list():
    with pytest.raises(UserError, match=r"exit_weights takes a list, e.g. \[1.0\], got 1.0"):
        TrainConfig(exit_weights=1.0)


@pytest.mark.parametrize("field, value", [("epochs", 2.5), ("batch_size", "64"), ("seed", True)])
def test_whole_number_settings_given_otherwise_from_python_are_refused(field, value):
    with pytest.raises(UserError, match=f"{field} must be a whole number, got {value!r}"):
        TrainConfig(**{field: value})
    import numpy as np
    assert TrainConfig(epochs=np.int64(3)).epochs == 3  # numpy's integers are whole numbers


def test_augment_crops_a_shift_of_the_zero_padded_image_and_flips():
    images = torch.arange(1, 6 * 4 * 4 * 2 + 1).reshape(6, 4, 4, 2).to(torch.uint8).repeat(20, 1, 1, 1)
    out = augment(images, padding=1, flip=False, generator=torch.Generator().manual_seed(0))
    assert out.shape == (120, 2, 4, 4) and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    padded = torch.nn.functional.pad(images.permute(0, 3, 1, 2).float() / 255, (1, 1, 1, 1))
    shifts = set()
    for i in range(len(images)):
        match = [(dy, dx) for dy in range(3) for dx in range(3)
                 if torch.equal(out[i], padded[i, :, dy:dy + 4, dx:dx + 4])]
        assert len(match) == 1
        shifts.add(match[0])
    assert len(shifts) == 9  # every shift of a 1-pixel padding occurs

    flipped = augment(images, padding=0, flip=True, generator=torch.Generator().manual_seed(0))
    plain = images.permute(0, 3, 1, 2).float() / 255
    is_flip = [torch.equal(f, p.flip(-1)) for f, p in zip(flipped, plain)]
    assert all(f or torch.equal(a, p) for f, a, p in zip(is_flip, flipped, plain))
    assert 0 < sum(is_flip) < len(images)
    assert torch.equal(augment(images, padding=0, flip=False), plain)


def test_cutout_zeroes_one_square_clipped_at_the_border_and_nothing_else():
    images = torch.full((200, 8, 8, 3), 255, dtype=torch.uint8)
    out = augment(images, padding=0, flip=False, generator=torch.Generator().manual_seed(0), cutout=4)
    zeroed = out.sum(1) == 0  # (B, H, W)
    rows, cols = zeroed.any(2), zeroed.any(1)
    for z, r, c in zip(zeroed, rows, cols):
        assert torch.equal(z, r[:, None] & c[None, :])  # a rectangle
        assert 1 <= r.sum() <= 4 and 1 <= c.sum() <= 4
        assert r.nonzero().diff(dim=0).eq(1).all() and c.nonzero().diff(dim=0).eq(1).all()  # contiguous
    assert (rows.sum(1) < 4).any() and (rows.sum(1) == 4).any()  # clipped at the border sometimes
    assert torch.equal(augment(images, padding=0, flip=False, cutout=0), images.permute(0, 3, 1, 2).float() / 255)


def test_training_on_a_separable_task_raises_every_exits_accuracy(tmp_path):
    torch.manual_seed(0)
    model, data = Toy(), splits(n_train=512)
    before = evaluate(model, data.val, precision="bf16")
    card = train(model, data, TrainConfig(epochs=4, batch_size=64, crop_padding=1, flip=False, lr=0.1), tmp_path,
                 progress=False)
    assert card.val_accuracy[-1] >= 0.9 and card.test_accuracy[-1] >= 0.9
    assert all(after > b + 0.2 for after, b in zip(card.val_accuracy, before))


def _interrupt_after_first_checkpoint(monkeypatch):
    write = train_module._write_checkpoint

    def write_then_stop(*args, **kwargs):
        write(*args, **kwargs)
        raise KeyboardInterrupt
    monkeypatch.setattr(train_module, "_write_checkpoint", write_then_stop)


def test_resume_ends_with_the_same_weights_as_an_uninterrupted_run(tmp_path, monkeypatch):
    config = TrainConfig(epochs=2, **TINY)
    torch.manual_seed(0)
    straight = Toy()
    train(straight, splits(), config, tmp_path / "straight", progress=False, device="cpu")  # bit-exact on a CPU

    torch.manual_seed(0)
    with monkeypatch.context() as m:
        _interrupt_after_first_checkpoint(m)
        with pytest.raises(KeyboardInterrupt):
            train(Toy(), splits(), config, tmp_path / "cut", progress=False, device="cpu")
    assert not (tmp_path / "cut" / "model.safetensors").exists()
    torch.manual_seed(123)  # a different init and RNG state: all must come from the checkpoint
    resumed = Toy()
    card = train(resumed, splits(), None, tmp_path / "cut", resume=tmp_path / "cut" / "checkpoint.pt",
                 progress=False, device="cpu")
    assert state_equal(resumed.state_dict(), straight.state_dict())
    assert [h["epoch"] for h in card.history] == [1, 2]
    assert state_equal(load_file(tmp_path / "cut" / "model.safetensors"),
                       load_file(tmp_path / "straight" / "model.safetensors"))


KILL_SCRIPT = """
import sys, torch
from exitwise.data import ImageSet, Splits
from exitwise.models import create_model
from exitwise.train import TrainConfig, train

torch.set_num_threads(1)  # as the test process, so both compute bit for bit alike


def setup():
    g = torch.Generator().manual_seed(0)
    def images(n):
        return ImageSet(torch.randint(0, 256, (n, 8, 8, 1), dtype=torch.uint8, generator=g),
                        torch.randint(0, 10, (n,), generator=g), tuple("0123456789"))
    data = Splits(images(N_TRAIN), images(64), images(64), "random", "test", 0)
    config = TrainConfig(epochs=3, batch_size=32, crop_padding=1, flip=False, precision="fp32", lr=0.05)
    torch.manual_seed(0)
    return create_model("digits-convnet"), data, config

if __name__ == "__main__":
    model, data, config = setup()
    train(model, data, config, sys.argv[1], progress=False, device="cpu")  # bit-exact on a CPU
"""


def test_a_run_killed_mid_epoch_resumes_to_the_uninterrupted_result(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT.replace("N_TRAIN", "3200"))  # 100 steps per epoch, ~0.4 s here
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(script), str(out)], env={**os.environ, "PYTHONPATH": str(SRC)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while not (out / "checkpoint.pt").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        # killed as the first checkpoint appears: early in the next epoch, two epochs before the end (a sleep here
        # could outlast the run on a faster machine)
        assert proc.poll() is None, proc.stderr.read().decode()
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] in (1, 2)  # killed before the end
    assert not (out / "model.safetensors").exists()

    setup = runpy.run_path(str(script))["setup"]
    model, data, config = setup()
    train(model, data, config, out, resume=out / "checkpoint.pt", progress=False, device="cpu")
    straight, data, config = setup()
    train(straight, data, config, tmp_path / "straight", progress=False, device="cpu")
    assert state_equal(model.state_dict(), straight.state_dict())


DDP_SCRIPT = KILL_SCRIPT.split('if __name__')[0] + """
import dataclasses, hashlib, os
def digest(model):
    return hashlib.sha256(b"".join(v.contiguous().numpy().tobytes() for v in model.state_dict().values())).hexdigest()

model, data, config = setup()
config = dataclasses.replace(config, epochs=1, freeze_backbone=FREEZE)
before, stages = digest(model), digest(model.stages)
card = train(model, data, config, sys.argv[1], progress=False, device="cpu")  # gloo: two processes, one machine
with open(os.path.join(sys.argv[2], f"rank{os.environ['RANK']}.txt"), "w") as f:
    f.write(f"{before} {digest(model)} {card is None} {stages == digest(model.stages)}")
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(tmp_path, freeze: bool) -> tuple[Path, list[list[str]]]:
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.replace("N_TRAIN", "256").replace("FREEZE", str(freeze)))
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(script), str(out),
                             str(tmp_path)], env={**os.environ, "PYTHONPATH": str(SRC)}, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, [(tmp_path / f"rank{r}.txt").read_text().split() for r in (0, 1)]


def test_torchrun_with_two_processes_ends_with_identical_weights_on_both_ranks(tmp_path):
    out, ((before0, after0, no_card0, _), (before1, after1, no_card1, _)) = run_torchrun(tmp_path, freeze=False)
    assert before0 == before1 and after0 == after1 and after0 != before0  # trained, and in sync
    assert (no_card0, no_card1) == ("False", "True")  # rank 0 writes and returns the model card
    saved = load_weights(create_model("digits-convnet"), out / "model.safetensors")
    digest = hashlib.sha256(b"".join(v.contiguous().numpy().tobytes() for v in saved.state_dict().values()))
    assert digest.hexdigest() == after0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["world_size"] == 2


def test_torchrun_with_a_frozen_backbone_trains_only_the_side_heads_in_sync(tmp_path):
    out, ((_, after0, _, stages0), (_, after1, _, stages1)) = run_torchrun(tmp_path, freeze=True)
    assert after0 == after1 and stages0 == stages1 == "True"  # heads in sync; stages and their statistics untouched
    saved = load_file(str(out / "model.safetensors"))
    assert saved and all(k.startswith("heads.") for k in saved) and not any(k.startswith("heads.2.") for k in saved)


def test_outputs_are_a_model_card_safetensors_and_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(0)
    model, data = create_model("digits-convnet"), ten_classes(splits(split_seed=7))
    card = train(model, data, TrainConfig(epochs=1, **TINY), tmp_path, progress=False)
    written = json.loads((tmp_path / "model.json").read_text())
    assert written == card.to_json() == ModelCard.from_json(written).to_json()  # the file round-trips exactly
    assert card.model == "digits-convnet" and card.split_seed == 7 and card.dataset == data.describe()
    assert card.recipe["epochs"] == card.epochs == 1 and card.precision == "fp32" and "precision_probe" not in written
    assert len(card.val_accuracy) == len(card.test_accuracy) == model.num_exits
    assert card.test_accuracy == pytest.approx(evaluate(model, data.test, precision="fp32"))
    assert list(card.exit_macs) == exit_macs(model) and card.train_seconds > 0
    assert {"platform", "torch", "threads"} <= card.machine.keys()
    assert len(card.heads) == model.num_exits - 1
    assert card["test_accuracy"] == written["test_accuracy"]  # the dict form, kept for one release
    loaded = load_weights(create_model("digits-convnet"), tmp_path / "model.safetensors")
    assert state_equal(loaded.state_dict(), {k: v.contiguous() for k, v in model.state_dict().items()})
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 1 and checkpoint["model_name"] == "digits-convnet"


def test_auto_precision_is_resolved_by_a_timed_step_recorded_and_kept_on_resume(tmp_path):
    torch.manual_seed(0)
    config = TrainConfig(epochs=1, **{**TINY, "precision": "auto"})
    card = train(create_model("digits-convnet"), ten_classes(splits()), config, tmp_path, progress=False)
    probe = card.precision_probe
    assert card.precision == card.recipe["precision"] == probe.precision in ("bf16", "fp32")
    assert probe.precision == min(probe.ms_per_image, key=probe.ms_per_image.get)
    assert card.machine["cpu"] and "native_bf16" in card.machine
    assert ModelCard.from_json(json.loads((tmp_path / "model.json").read_text())) == card
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["config"]
    assert saved["precision"] == card.precision  # a resumed run trains in what "auto" chose, not a new probe


def test_bad_input_raises_user_error_and_overwrites_nothing(tmp_path):
    config = TrainConfig(epochs=1, **TINY)
    torch.manual_seed(0)
    train(create_model("digits-convnet"), ten_classes(splits()), config, tmp_path / "digits", progress=False)
    train(Toy(), splits(), config, tmp_path / "toy", progress=False)
    before = {p: p.read_bytes() for p in (tmp_path / "toy").iterdir()}

    with pytest.raises(UserError, match="is of model 'digits-convnet', not 'Toy'"):
        train(Toy(), splits(), None, tmp_path / "toy", resume=tmp_path / "digits" / "checkpoint.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes((tmp_path / "toy" / "checkpoint.pt").read_bytes()[:500])
    with pytest.raises(UserError, match="cannot read checkpoint") as e:
        train(Toy(), splits(), None, tmp_path / "toy", resume=corrupt)
    assert "\n" not in str(e.value)
    notes = tmp_path / "notes.txt"
    notes.write_text("not a checkpoint")
    with pytest.raises(UserError, match=r"'.*notes.txt': not a file of tensors"):
        train(Toy(), splits(), None, tmp_path / "toy", resume=notes)  # once just "...: 105"
    with pytest.raises(UserError, match="trained with lr=0.05"):
        train(Toy(), splits(), TrainConfig(epochs=1, **{**TINY, "lr": 0.1}), tmp_path / "toy",
              resume=tmp_path / "toy" / "checkpoint.pt")
    with pytest.raises(UserError, match="already holds a training run"):
        train(Toy(), splits(), config, tmp_path / "toy")
    assert {p: p.read_bytes() for p in (tmp_path / "toy").iterdir()} == before

    empty = splits()
    empty = Splits(empty.train.subset(torch.arange(0)), empty.val, empty.test, "quadrants", "test", 0)
    with pytest.raises(UserError, match="no images"):
        train(Toy(), empty, config, tmp_path / "empty")
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="cannot write"):
        train(Toy(), splits(), config, tmp_path / "file" / "out")
    with pytest.raises(UserError, match="exit weights"):
        train(Toy(), splits(), TrainConfig(exit_weights=(1.0, 1.0, 1.0)), tmp_path / "weights")
    for bad in ({"distill": 1.5}, {"distill_temperature": 0.0}):
        with pytest.raises(UserError, match="distillation"):
            TrainConfig(**bad)
    with pytest.raises(UserError, match="diverged .* lower the learning rate"):
        train(Toy(), splits(), TrainConfig(epochs=1, **{**TINY, "lr": 1e10}), tmp_path / "diverged")
    assert not (tmp_path / "diverged" / "model.safetensors").exists()


def test_a_torchrun_process_without_a_gpu_of_its_own_is_told_in_one_line(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError, match="no GPU of its own.*--nproc-per-node 1"):
        train_module._rank_device(torch.device("cuda"))
    assert train_module._rank_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(UserError, match="no GPU of its own"):
        train_module._rank_device(torch.device("cuda", 0))  # under torchrun the rank picks the GPU
    monkeypatch.delenv("LOCAL_RANK")
    assert train_module._rank_device(torch.device("cuda", 1)) == torch.device("cuda", 1)  # alone: the GPU named
    assert train_module._rank_device(torch.device("cuda")) == torch.device("cuda", 0)


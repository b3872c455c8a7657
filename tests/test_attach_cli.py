"""Bring your own model end to end: a user's model file, `exitwise attach`, train_exits, the model folder in the study;
every bad input one line on stderr, exit 2, nothing written."""
import json
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from exitwise.errors import UserError
from exitwise.api import train_exits
from exitwise import attach
from exitwise.cli import main
from exitwise.early_exit import EarlyExitModel
from exitwise.data import ImageSet, load_splits, split_train
from exitwise.models import ModelCard, create_model
from exitwise.models.attach import AttachRecord
from exitwise.train import evaluate

USER_MODEL = textwrap.dedent('''
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
            self.block1 = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
            self.block2 = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
            self.fc = nn.Linear(32, 10)

        def forward(self, x):
            x = self.block1(self.stem((x - 0.5) / 0.5))
            x = x + self.block2(x)
            return {"logits": self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))}

    def build():
        torch.manual_seed(0)
        return Net()

    def broken():
        raise RuntimeError("no GPU here")
''')


@pytest.fixture
def user(tmp_path):
    """A model file and its weights, as a user would have them."""
    path = tmp_path / "my_model.py"
    path.write_text(USER_MODEL)
    namespace = {}
    exec(compile(USER_MODEL, str(path), "exec"), namespace)
    weights = tmp_path / "my.safetensors"
    save_file(namespace["build"]().state_dict(), str(weights))
    return path, weights, namespace["build"]


def run(capsys, *args):
    code = main([str(a) for a in args])
    return code, capsys.readouterr()


def attach_args(path, weights, out, *extra, exits="stem,block1", spec=None):
    return ["attach", "--model-file", spec or f"{path}:build", "--weights", weights, "--exits", exits,
            "--dataset", "digits", "--out", out, "--epochs", "2", "--no-progress", *extra]


def test_attach_writes_a_model_folder_the_study_and_loader_accept(tmp_path, capsys, user):
    path, weights, build = user
    out = tmp_path / "mine"
    code, io = run(capsys, *attach_args(path, weights, out, "--head", "pool,auto"))
    assert code == 0, io.err
    assert "head after stem (pool)" in io.out
    spec = json.loads((out / "attach.json").read_text())
    auto = spec["head"][1]  # what auto chose is recorded, so a later rule cannot change the rebuilt heads
    assert spec["exits"] == ["stem", "block1"] and spec["heads_only"] and spec["head"] == ["pool", auto] != "auto"
    assert AttachRecord.from_json(spec).to_json() == spec  # the file is the record, key for key
    assert AttachRecord.from_json({k: v for k, v in spec.items() if k != "head"}).head == "auto"  # an older file
    assert all(k.startswith("heads.") for k in load_file(str(out / "model.safetensors")))  # only the heads
    card = json.loads((out / "model.json").read_text())
    assert [(h["exit"], h["kind"]) for h in card["heads"]] == [("stem", "pool"), ("block1", auto)]
    assert ModelCard.from_json(card).to_json() == card  # heads with their kinds round-trip too
    network = create_model(out)  # rebuilt from the model file, the user's weights and the heads
    assert type(network.heads[0][0]).__name__ == "MixedPool" and network.head_kinds == ["pool", auto]
    model = build()
    model.load_state_dict(load_file(str(weights)))
    x = torch.rand(6, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(network.eval()(x)[-1], model.eval()(x)["logits"])
    saved = EarlyExitModel.create(network, str(out), "entropy", [0.5, None]).save(tmp_path / "ee")
    loaded = EarlyExitModel.load(saved)
    with torch.no_grad():
        assert torch.equal(loaded.network.eval()(x)[0], network(x)[0])
    code, io = run(capsys, "study", "--model-dir", out, "--dataset", "digits", "--out", tmp_path / "study",
                   "--precision", "fp32", "--no-progress")
    assert code == 0, io.err
    results = json.loads((tmp_path / "study" / "results.json").read_text())
    assert results["model"]["name"] == str(out.resolve()) and len(results["exits"]) == 3
    chosen = EarlyExitModel.load(tmp_path / "study")  # the study's early_exit.json names the model folder
    assert chosen.model_name == str(out.resolve()) and chosen.network.num_exits == 3
    onnx_runtime = pytest.importorskip("exitwise.deploy.onnx_runtime")  # and it deploys: --model-dir with its thresholds
    code, io = run(capsys, "export", "--model-dir", out, "--thresholds", tmp_path / "study" / "early_exit.json",
                   "--out", tmp_path / "onnx", "--exporter", "torchscript")
    assert code == 0, io.err
    digits = load_splits("digits").test
    images = digits.images.permute(0, 3, 1, 2).float().div(255).numpy()
    exported = onnx_runtime.OnnxEarlyExit.load(tmp_path / "onnx").run(images)
    ours = chosen.run(digits, precision="fp32")
    assert (exported.exits == ours.exits).mean() >= 0.99 and (exported.predictions == ours.predictions).mean() >= 0.99


@pytest.fixture(scope="module")
def attached_study(tmp_path_factory):
    """A folder with a model folder `a1` (attached, trained jointly for 2 epochs on digits) and its study `s1`, both written by
    the CLI as a user would."""
    root = tmp_path_factory.mktemp("newcomer")
    (root / "my_model.py").write_text(USER_MODEL)
    namespace = {}
    exec(compile(USER_MODEL, str(root / "my_model.py"), "exec"), namespace)
    save_file(namespace["build"]().state_dict(), str(root / "my.safetensors"))
    assert main([str(a) for a in attach_args(root / "my_model.py", root / "my.safetensors", root / "a1", "--joint")]) == 0
    assert main(["study", "--model-dir", str(root / "a1"), "--dataset", "digits", "--out", str(root / "s1"),
                 "--precision", "fp32", "--no-progress"]) == 0
    return root


def test_export_takes_a_relative_model_folder_with_its_studys_thresholds(attached_study, capsys, monkeypatch):
    pytest.importorskip("exitwise.deploy.onnx_runtime")
    monkeypatch.chdir(attached_study)  # as the docs show: relative paths, while early_exit.json names it absolutely
    code, io = run(capsys, "export", "--model-dir", "a1", "--thresholds", "s1/early_exit.json", "--out", "x1",
                   "--exporter", "torchscript")
    assert code == 0, io.err
    manifest = json.loads((attached_study / "x1" / "manifest.json").read_text())
    assert manifest["thresholds"] == json.loads((attached_study / "s1" / "early_exit.json").read_text())["thresholds"]
    code, io = run(capsys, "export", "--model", "b-resnet11", "--thresholds", "s1/early_exit.json", "--out", "x2")
    assert code == 2 and "is for model" in io.err and not (attached_study / "x2").exists()  # another model still is


def test_calibrate_on_an_attached_models_study_writes_a_model_export_accepts(attached_study, capsys):
    onnx_runtime = pytest.importorskip("exitwise.deploy.onnx_runtime")
    code, io = run(capsys, "calibrate", "--from", attached_study / "s1", "--out", attached_study / "c1",
                   "--within-points", "5")
    assert code == 0, io.err
    assert "early_exit.json" in io.out
    calibrated = EarlyExitModel.load(attached_study / "c1")
    doc = json.loads((attached_study / "c1" / "calibration.json").read_text())
    assert calibrated.model_name == str((attached_study / "a1").resolve()) and calibrated.network.num_exits == 3
    assert doc["result"]["thresholds"] == json.loads((attached_study / "c1" / "early_exit.json").read_text())["thresholds"]
    code, io = run(capsys, "export", "--from", attached_study / "c1", "--out", attached_study / "x3",
                   "--exporter", "torchscript")
    assert code == 0, io.err
    digits = load_splits("digits").test
    images = digits.images.permute(0, 3, 1, 2).float().div(255).numpy()
    exported = onnx_runtime.OnnxEarlyExit.load(attached_study / "x3").run(images)
    ours = calibrated.run(digits, precision="fp32")
    assert (exported.exits == ours.exits).mean() >= 0.99


def test_frozen_training_leaves_the_final_exit_alone_and_the_heads_learn(tmp_path, user):
    _, weights, build = user
    model = build()
    model.load_state_dict(load_file(str(weights)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    digits = load_splits("digits")
    data = split_train(ImageSet.from_tensors(torch.cat([digits.train.images, digits.val.images]),
                                             torch.cat([digits.train.labels, digits.val.labels])),
                       digits.test, val_size=200)
    network = attach(model.eval(), ["stem", "block1"], num_classes=10, input_shape=(1, 8, 8), max_head_fraction=1.0)
    card = train_exits(network, data, tmp_path / "run", epochs=6, batch_size=64, crop_padding=1, flip=False,
                       precision="fp32", progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the user's model is untouched
    accuracy = evaluate(network, data.test, precision="fp32")
    assert tuple(accuracy) == card.test_accuracy
    assert min(accuracy[:2]) > 0.5  # ten classes: chance is 0.1


def test_ImageSet_from_float_tensors_and_a_dataset():
    images = torch.rand(5, 3, 4, 4)
    a = ImageSet.from_tensors(images, torch.tensor([0, 1, 2, 1, 0]))
    assert a.images.shape == (5, 4, 4, 3) and a.classes == ("0", "1", "2")
    dataset = torch.utils.data.TensorDataset(images, torch.tensor([0, 1, 2, 1, 0]))
    b = ImageSet.from_dataset(dataset, classes=("a", "b", "c"))
    assert torch.equal(a.images, b.images) and b.classes == ("a", "b", "c")
    back, _ = next(a.batches(5))
    assert (back - images).abs().max() <= 0.5 / 255 + 1e-6
    normalized = torch.utils.data.TensorDataset(images - 0.5, torch.tensor([0, 1, 2, 1, 0]))  # mean-subtracted
    with pytest.raises(UserError, match=r"float images must be in \[0, 1\]"):  # was wrapped into uint8 silently
        ImageSet.from_dataset(normalized)


@pytest.mark.parametrize("change, words", [
    (dict(spec="{tmp}/nope.py:build"), ["model file not found", "nope.py"]),
    (dict(spec="{path}:missing"), ["no function 'missing'"]),
    (dict(spec="{path}:broken"), ["broken() raised RuntimeError", "no GPU here"]),
    (dict(exits="stem,block9"), ["'block9' is not a submodule"]),
    (dict(exits="block1,stem"), ["out of forward order"]),
    (dict(exits="block2.0"), ["cannot cut after 'block2.0'", "crosses the cut"]),  # block2's input skips it
    (dict(weights="{tmp}/other.safetensors"), ["do not fit", "missing"]),
    (dict(extra=["--head", "wide"]), ["unknown head kind 'wide'", "conv"]),
    (dict(extra=["--head", "pool,conv,gap"]), ["3 head kinds for 2 exits"]),
    (dict(extra=["--token-pool", "max"]), ["token pooling must be mean or cls"]),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, user, change, words):
    path, weights, _ = user
    save_file({"fc.weight": torch.zeros(10, 32)}, str(tmp_path / "other.safetensors"))
    fill = lambda v: v.format(tmp=tmp_path, path=path)  # noqa: E731
    out = tmp_path / "out"
    args = attach_args(path, fill(change["weights"]) if "weights" in change else weights, out,
                       *change.get("extra", ()), exits=change.get("exits", "stem,block1"),
                       spec=fill(change["spec"]) if "spec" in change else None)
    code, io = run(capsys, *args)
    assert code == 2
    assert io.err.count("\n") == 1 and all(w in io.err for w in words), io.err
    assert not out.exists()


def test_a_model_that_does_not_take_the_datas_images_is_one_line_exit_2_and_nothing_written(tmp_path, capsys):
    path = tmp_path / "rgb.py"  # colour images in; digits are grey
    path.write_text("from torch import nn\n\ndef build():\n    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), "
                    "nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))\n")
    out = tmp_path / "out"
    code, io = run(capsys, "attach", "--model-file", f"{path}:build", "--random-init", "--exits", "1",
                   "--dataset", "digits", "--out", out, "--epochs", "1", "--no-progress")
    assert code == 2
    assert io.err.count("\n") == 1 and "does not run on 1x8x8 images" in io.err and "3 channels" in io.err, io.err
    assert not out.exists()


def test_without_weights_attach_refuses_unless_random_init_or_joint_is_asked_for(tmp_path, capsys, user):
    path, weights, _ = user
    no_weights = [str(a) for a in attach_args(path, weights, tmp_path / "a", "--epochs", "1")]
    i = no_weights.index("--weights")
    del no_weights[i:i + 2]
    code, io = run(capsys, *no_weights)
    assert code == 2 and io.err.count("\n") == 1 and "--random-init" in io.err and "--joint" in io.err, io.err
    assert not (tmp_path / "a").exists()
    for flag, out in (("--random-init", tmp_path / "b"), ("--joint", tmp_path / "c")):
        args = [str(out) if a == str(tmp_path / "a") else a for a in no_weights]
        code, io = run(capsys, *args, flag)
        assert code == 0, io.err
        assert json.loads((out / "attach.json").read_text())["weights"] is None


def test_a_training_runs_folder_as_model_dir_is_refused_saying_which_flags_take_it(tmp_path, capsys):
    run_dir = tmp_path / "run"  # what `exitwise train --model digits-convnet --out run` writes
    run_dir.mkdir()
    save_file(create_model("digits-convnet").state_dict(), str(run_dir / "model.safetensors"))
    (run_dir / "model.json").write_text(json.dumps({"model": "digits-convnet"}))
    code, io = run(capsys, "study", "--model-dir", run_dir, "--dataset", "digits", "--out", tmp_path / "study")
    assert code == 2 and io.err.count("\n") == 1, io.err
    assert f"give --model digits-convnet --weights '{run_dir / 'model.safetensors'}'" in io.err
    assert not (tmp_path / "study").exists()


def test_a_model_folder_whose_user_weights_or_model_file_changed_is_refused(tmp_path, capsys, user):
    path, weights, _ = user
    out = tmp_path / "mine"
    assert run(capsys, *attach_args(path, weights, out))[0] == 0
    original = path.read_text()
    for changed, edit in ((path, original + "\n# edited\n"), (weights, None)):  # the model file was never checked
        if edit is None:
            path.write_text(original)
            weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
        else:
            path.write_text(edit)
        code, io = run(capsys, "study", "--model-dir", out, "--dataset", "digits", "--out", tmp_path / "study",
                       "--precision", "fp32", "--no-progress")
        assert code == 2 and io.err.count("\n") == 1 and "missing or changed" in io.err and changed.name in io.err
        assert not (tmp_path / "study").exists()


@pytest.mark.parametrize("edit, words", [
    ({"head": 5}, "head: 5 is not a string"),
    ({"exits": "stem,block1"}, 'exits: "stem,block1" is not a list'),
    ({"num_classes": "10"}, 'num_classes: "10" is not an integer'),
])
def test_an_attach_json_with_a_value_of_the_wrong_type_is_one_line_exit_2(tmp_path, capsys, user, edit, words):
    path, weights, _ = user
    out = tmp_path / "mine"
    assert run(capsys, *attach_args(path, weights, out, "--epochs", "1"))[0] == 0
    record = json.loads((out / "attach.json").read_text())
    (out / "attach.json").write_text(json.dumps({**record, **edit}))
    code, io = run(capsys, "study", "--model-dir", out, "--dataset", "digits", "--out", tmp_path / "study",
                   "--precision", "fp32", "--no-progress")
    assert code == 2 and io.err.count("\n") == 1 and "not a complete attach record" in io.err and words in io.err, \
        io.err
    assert not (tmp_path / "study").exists()


def test_study_takes_a_registered_model_or_an_attached_folder_not_both(tmp_path, capsys):
    code, io = run(capsys, "study", "--model", "digits-convnet", "--model-dir", tmp_path, "--dataset", "digits",
                   "--out", tmp_path / "study")  # the folder had won, silently
    assert code == 2 and io.err.count("\n") == 1 and "not both" in io.err and not (tmp_path / "study").exists()

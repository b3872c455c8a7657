"""An ONNX export runs the same early exit as torch: the same exits and predictions, without torch imported.

Needs the onnx extra (onnx, onnxruntime, onnxscript); skipped without it.
"""
import dataclasses
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from exitwise import export as export_module
from exitwise.api import export, load_model
from exitwise.cli import main
from exitwise.models.costs import exit_macs
from exitwise.data import ImageSet, load_splits
from exitwise.early_exit import EarlyExitModel
from exitwise.errors import UserError
from exitwise.models import CalibratedSetting, create_model
from exitwise.config import DEFAULT_MICRO_BATCH
from exitwise.deploy.manifest import manifest_digest, read_manifest
from exitwise.deploy.onnx_runtime import OnnxEarlyExit, Policy
from exitwise.deploy.predict import FIELDS, predict
from exitwise.policies import get_policy
from exitwise.records import NEVER
from exitwise.runtime import all_exit_logits, prepare, run_early_exit

from conftest import CIFAR_JPG, random_image_set, spread_thresholds

SRC = Path(__file__).resolve().parents[1] / "src"
NEAR = 1e-5  # fp32 rounding: a sample whose score is this close to a threshold may go either way


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """A random-weight digits-convnet (margin policy with temperatures), exported with the default exporter."""
    torch.manual_seed(0)
    net = create_model("digits-convnet")
    policy = get_policy("margin").with_temperatures([1.5, 0.7, 1.0])
    data = random_image_set(400, seed=1)
    model = EarlyExitModel(net, policy, np.array(spread_thresholds(net, data, policy)), "digits-convnet",
                           tuple("0123456789"))
    out = tmp_path_factory.mktemp("digits-export")
    model.save(out / "model")
    export(out / "onnx", source=out / "model")
    return model, data, out


def _borderline(net, data, policy, thresholds) -> np.ndarray:
    """Samples with a side-exit score within NEAR of that exit's threshold."""
    scores = policy.scores(torch.from_numpy(all_exit_logits(prepare(net), data).logits)).numpy()[:-1]
    return (np.abs(scores - np.asarray(thresholds, dtype=np.float32)[:, None]) <= NEAR).any(0)


def _assert_same_run(model: EarlyExitModel, data: ImageSet, runner: OnnxEarlyExit, **kwargs):
    """ONNX Runtime and torch agree on every exit and prediction, but at borderline scores; returns the ONNX run."""
    torch_run = run_early_exit(prepare(model.network, "fp32"), data, model.thresholds, model.policy)
    onnx_run = runner.run(data.images.numpy(), **kwargs)
    differ = (torch_run.exits != onnx_run.exits) | (torch_run.predictions != onnx_run.predictions)
    assert not (differ & ~_borderline(model.network, data, model.policy, model.thresholds)).any()
    return onnx_run


def test_exits_and_predictions_equal_the_torch_runtime(digits):
    model, data, out = digits
    run = _assert_same_run(model, data, OnnxEarlyExit.load(out / "onnx"))
    assert set(run.exits) == {0, 1, 2}  # every exit takes samples, so compaction and re-batching are exercised


@pytest.mark.parametrize("batch_size,micro_batch", [(1, 64), (7, 3), (400, 400)])
def test_the_batch_schedule_changes_no_decision(digits, batch_size, micro_batch):
    model, data, out = digits
    runner = OnnxEarlyExit.load(out / "onnx")
    reference = runner.run(data.images.numpy())
    run = runner.run(data.images.numpy(), batch_size=batch_size, micro_batch=micro_batch)
    assert (run.exits == reference.exits).all() and (run.predictions == reference.predictions).all()
    np.testing.assert_allclose(run.probabilities, reference.probabilities, rtol=1e-5)


def test_float32_nchw_pixels_in_0_1_decide_as_uint8_nhwc_ones(digits):
    _, data, out = digits
    runner, pixels = OnnxEarlyExit.load(out / "onnx"), data.images.numpy()
    a, b = runner.run(pixels), runner.run(pixels.transpose(0, 3, 1, 2).astype(np.float32) / 255)
    assert (a.exits == b.exits).all() and (a.predictions == b.predictions).all()


@pytest.mark.parametrize("images, message", [
    (np.zeros((2, 8, 8, 1), np.float32), r"numpy array of uint8 \(N, 8, 8, 1\) pixels or float32 \(N, 1, 8, 8\) "
                                         r"in \[0, 1\], got float32 \(2, 8, 8, 1\)"),  # NHWC floats
    (np.zeros((2, 1, 8, 8), np.uint8), r"got uint8 \(2, 1, 8, 8\)"),                    # NCHW pixels
    (np.zeros((2, 32, 32, 3), np.uint8), r"got uint8 \(2, 32, 32, 3\)"),                # another size
    (np.zeros((2, 1, 8, 8), np.float64), r"got float64 \(2, 1, 8, 8\)"),
    (np.full((2, 1, 8, 8), 255, np.float32), r"float32 images must be in \[0, 1\], got 255\.\.255"),  # not / 255
    (np.full((2, 1, 8, 8), np.nan, np.float32), r"float32 images must be in \[0, 1\]"),
    (torch.zeros(2, 8, 8, 1, dtype=torch.uint8), r"got a Tensor \(2, 8, 8, 1\)"),
    ([np.zeros((8, 8, 1), np.uint8)] * 2, "got a list"),
])
def test_images_it_cannot_take_are_refused_in_one_line_before_any_graph_runs(digits, images, message):
    runner = OnnxEarlyExit.load(digits[2] / "onnx")
    for run in (runner.run, runner.run_backbone):
        with pytest.raises(UserError, match=message):
            run(images)


@pytest.mark.parametrize("thresholds, message", [([float("nan"), 0.5], "not NaN"), ([0.5], "expected 2 thresholds"),
                                                 (["a", 0.5], "thresholds must be numbers")])
def test_thresholds_given_to_run_are_checked_as_a_saved_models_are(digits, thresholds, message):
    runner = OnnxEarlyExit.load(digits[2] / "onnx")
    with pytest.raises(UserError, match=message):
        runner.run(digits[1].images.numpy(), thresholds=thresholds)
    never = runner.run(digits[1].images.numpy(), thresholds=[None, None])  # None: never leave there, as in JSON
    assert (never.exits == 2).all()


def test_batch_sizes_below_one_are_refused_by_the_backbone_run_too(digits):
    runner = OnnxEarlyExit.load(digits[2] / "onnx")
    for run in (runner.run, runner.run_backbone):
        with pytest.raises(UserError, match="batch size and micro-batch must be at least 1, got 0 and"):
            run(digits[1].images.numpy(), batch_size=0)


@pytest.mark.parametrize("name,temperatures", [("entropy", None), ("max-prob", (2.0, 0.5, 1.0)),
                                               ("margin", (1.3, 1.0, 0.8)), ("patience", None)])
def test_numpy_scores_equal_the_torch_policies(name, temperatures):
    logits = torch.randn(3, 500, 10, generator=torch.Generator().manual_seed(0)) * 4
    logits[:, :5] = torch.tensor([30.0] + [0.0] * 9)  # confident rows: scores near 0 keep their digits
    policy = get_policy(name) if temperatures is None else get_policy(name).with_temperatures(temperatures)
    twin = Policy(name, temperatures)
    state, twin_state = policy.init_state(500), twin.init_state(500)
    for k in range(3):
        expected, state = policy.step(k, logits[k], state)
        got, twin_state = twin.step(k, logits[k].numpy(), twin_state)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5, atol=1e-6)


def test_the_manifest_describes_the_export(digits):
    model, _, out = digits
    manifest = json.loads((out / "onnx" / "manifest.json").read_text())
    assert [e["file"] for e in manifest["stages"]] == ["stage0.onnx", "stage1.onnx", "stage2.onnx"]
    assert [e["file"] for e in manifest["heads"]] == ["head0.onnx", "head1.onnx", "head2.onnx"]
    assert {e["exporter"] for e in manifest["stages"] + manifest["heads"]} == {"dynamo"}
    assert max(e["max_error"] for e in manifest["stages"] + manifest["heads"]) <= export_module.MAX_ERROR
    assert manifest["input"]["shape"] == ["batch", 1, 8, 8] and manifest["input"]["range"] == [0.0, 1.0]
    assert manifest["exit_macs"] == exit_macs(model.network)
    assert manifest["thresholds"] == model.to_json()["thresholds"]
    assert manifest["policy"] == "margin" and manifest["temperatures"] == [1.5, 0.7, 1.0]
    assert manifest["class_names"] == list("0123456789")
    from exitwise.io import file_sha256
    assert manifest["source_weights_sha256"] == file_sha256(out / "model" / "model.safetensors")
    typed = read_manifest(out / "onnx")
    assert typed.to_json() == manifest  # the file is the dataclass, key for key
    assert typed.thresholds == tuple(model.thresholds) and typed.temperatures == (1.5, 0.7, 1.0)
    assert typed.micro_batch == typed.micro_batch_probe.micro_batch


def test_an_older_manifest_reads_and_an_incomplete_one_is_refused_in_one_line(digits, tmp_path, capsys):
    _, data, out = digits
    older = tmp_path / "older"
    shutil.copytree(out / "onnx", older)
    doc = json.loads((older / "manifest.json").read_text())
    for key in ("micro_batch", "micro_batch_probe"):  # exports from before the micro-batch was measured
        del doc[key]
    (older / "manifest.json").write_text(json.dumps({**doc, "manifest_sha256": manifest_digest(doc)}))
    manifest = read_manifest(older)
    assert manifest.micro_batch is None and OnnxEarlyExit.load(older).micro_batch == DEFAULT_MICRO_BATCH
    del doc["stages"]
    (older / "manifest.json").write_text(json.dumps({**doc, "manifest_sha256": manifest_digest(doc)}))
    image = str(_write_pngs(data, tmp_path / "images", 1)[0])
    _one_line_error(capsys, ["predict", "--export", str(older), image], "is not a complete ONNX export manifest")


def test_runtime_and_predict_work_with_torch_blocked(digits, tmp_path):
    _, data, out = digits
    Image.fromarray(data.images[0, :, :, 0].numpy()).save(tmp_path / "a.png")
    code = (f"import sys; sys.modules['torch'] = None\n"  # `import torch` now raises: the command must not need it
            f"from exitwise.cli import main\n"
            f"sys.exit(main(['predict', '--export', {str(out / 'onnx')!r}, {str(tmp_path / 'a.png')!r}, "
            f"'--out', {str(tmp_path / 'p.json')!r}, '--no-progress']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    row = json.loads((tmp_path / "p.json").read_text())[0]
    assert tuple(row) == FIELDS and row["image"].endswith("a.png")
    assert [r.to_json() for r in predict(out / "onnx", [tmp_path / "a.png"], progress=False)] == [row]


def _write_pngs(data: ImageSet, folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i:03d}.png" for i in range(n)]
    for path, image in zip(paths, data.images[:n].numpy()):
        Image.fromarray(image[..., 0]).save(path)
    return paths


def test_predict_reads_folders_files_and_archives_alike(digits, tmp_path):
    _, data, out = digits
    paths = _write_pngs(data, tmp_path / "images", 20)
    (tmp_path / "images" / "README.txt").write_text("not an image: skipped")
    with tarfile.open(tmp_path / "images.tar.gz", "w:gz") as tar:
        for path in [*paths, tmp_path / "images" / "README.txt"]:
            tar.add(path, arcname=f"digits/{path.name}")
    expected = OnnxEarlyExit.load(out / "onnx").run(data.images[:20].numpy())
    for i, source in enumerate([[tmp_path / "images"], paths, [tmp_path / "images.tar.gz"]]):
        target = tmp_path / f"p{i}.csv"
        assert main(["predict", "--export", str(out / "onnx"), *map(str, source), "--out", str(target)]) == 0
        lines = target.read_text().splitlines()
        assert lines[0] == "image,class,class_index,probability,exit" and len(lines) == 21
        rows = [line.split(",") for line in lines[1:]]
        assert [int(r[2]) for r in rows] == expected.predictions.tolist()
        assert [int(r[4]) for r in rows] == expected.exits.tolist()


def _one_line_error(capsys, argv: list[str], match: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and match in err, err


def test_a_changed_missing_or_absent_export_is_refused_in_one_line(digits, tmp_path, capsys):
    _, data, out = digits
    image = str(_write_pngs(data, tmp_path / "images", 1)[0])
    broken = tmp_path / "broken"
    for name in ("manifest.json", "stage0.onnx", "stage1.onnx", "stage2.onnx", "head0.onnx", "head1.onnx",
                 "head2.onnx"):
        broken.mkdir(exist_ok=True)
        (broken / name).write_bytes((out / "onnx" / name).read_bytes())
    argv = ["predict", "--export", str(broken), image]
    assert main(argv) == 0
    capsys.readouterr()
    graph = broken / "stage1.onnx"
    original = graph.read_bytes()
    graph.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    _one_line_error(capsys, argv, "stage1.onnx' was changed after export")
    graph.unlink()
    _one_line_error(capsys, argv, "stage1.onnx' named by the manifest is missing")
    graph.write_bytes(original)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["thresholds"][0] = 0.0
    (broken / "manifest.json").write_text(json.dumps(manifest))
    _one_line_error(capsys, argv, "manifest.json' was changed after export")
    (broken / "manifest.json").unlink()
    _one_line_error(capsys, argv, "is not an exitwise ONNX export: no manifest.json")


def test_wrong_size_unreadable_and_missing_images_are_refused_in_one_line(digits, tmp_path, capsys):
    _, _, out = digits
    Image.fromarray(np.zeros((9, 8), dtype=np.uint8)).save(tmp_path / "big.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    base = ["predict", "--export", str(out / "onnx")]
    _one_line_error(capsys, base + [str(tmp_path / "big.png")], "is 8x9, but the model takes 8x8")
    _one_line_error(capsys, base + [str(tmp_path / "bad.png")], "cannot decode image")
    _one_line_error(capsys, base + [str(tmp_path / "none.png")], "no such image, folder or archive")
    _one_line_error(capsys, base + [str(tmp_path / "big.png"), "--out", str(tmp_path / "p.txt")], ".csv or .json")
    assert not (tmp_path / "p.txt").exists()


def test_predictions_to_a_file_that_cannot_be_written_are_refused_before_any_work(digits, tmp_path, capsys):
    _, data, out = digits
    base = ["predict", "--export", str(out / "onnx"), str(_write_pngs(data, tmp_path / "images", 1)[0]), "--out"]
    _one_line_error(capsys, base + [str(tmp_path / "no" / "p.csv")], "no folder")
    (tmp_path / "d.csv").mkdir()
    _one_line_error(capsys, base + [str(tmp_path / "d.csv")], "it is a folder")
    _one_line_error(capsys, base + ["/proc/p.csv"], "cannot write in '/proc'")
    assert not (tmp_path / "no").exists()


def test_export_from_a_model_name_and_a_thresholds_file(tmp_path, capsys):
    (tmp_path / "t.json").write_text(json.dumps({"policy": "entropy", "thresholds": [0.2, None]}))
    out = tmp_path / "onnx"
    assert main(["export", "--model", "digits-convnet", "--thresholds", str(tmp_path / "t.json"), "--out", str(out),
                 "--exporter", "torchscript"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["thresholds"] == [0.2, None] and manifest["class_names"] == [str(i) for i in range(10)]
    assert "thresholds [0.2, null])" in capsys.readouterr().out  # printed as the file has them
    assert {e["exporter"] for e in manifest["stages"]} == {"torchscript"}
    (tmp_path / "other.json").write_text(json.dumps({"model": "b-resnet11", "policy": "entropy",
                                                     "thresholds": [0.2, None]}))
    _one_line_error(capsys, ["export", "--model", "digits-convnet", "--thresholds", str(tmp_path / "other.json"),
                             "--out", str(tmp_path / "x")], "is for model 'b-resnet11'")
    _one_line_error(capsys, ["export", "--out", str(tmp_path / "x")], "give --from DIR")
    _one_line_error(capsys, ["export", "--from", str(tmp_path), "--model", "digits-convnet", "--out",
                             str(tmp_path / "x")], "not both")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("setting, message", [
    ({"policy": "entropy", "thresholds": "0.2"}, 'thresholds is "0.2", not a list'),
    ({"policy": "entropy", "thresholds": [0.2, None], "model": 3}, "model is 3, not a string"),
    ({"policy": 3, "thresholds": [0.2, None]}, "policy is 3, not a string"),
    ({"policy": "entropy", "thresholds": [0.2, None], "class_names": [1, 2]}, "expected 10 class names"),
])
def test_a_thresholds_file_of_the_wrong_shape_is_refused_before_any_export(tmp_path, capsys, setting, message):
    (tmp_path / "t.json").write_text(json.dumps(setting))
    _one_line_error(capsys, ["export", "--model", "digits-convnet", "--thresholds", str(tmp_path / "t.json"),
                             "--out", str(tmp_path / "x")], message)
    assert not (tmp_path / "x").exists()


def test_export_from_a_model_name_alone_takes_the_calibrated_setting_its_card_carries(tmp_path, capsys,
                                                                                       monkeypatch):
    from exitwise.models import weights
    _one_line_error(capsys, ["export", "--model", "digits-convnet", "--out", str(tmp_path / "x")],
                    "no calibrated setting shipped: give --thresholds FILE")  # its card has none
    card = weights.shipped_card("digits-convnet")
    setting = CalibratedSetting(rule="a test's", policy="max-prob", temperatures=(1.5, 1.0, 1.0),
                                thresholds=(0.25, NEVER),
                                val_accuracy=0.9, test_accuracy=0.9, mean_macs=1e5, exit_shares=(0.5, 0.5, 0.0),
                                study_precision="fp32", exitwise_version="0")
    monkeypatch.setattr(weights, "shipped_card", lambda name: dataclasses.replace(card, calibrated=setting))
    assert main(["export", "--model", "digits-convnet", "--out", str(tmp_path / "onnx"),
                 "--exporter", "torchscript"]) == 0
    manifest = json.loads((tmp_path / "onnx" / "manifest.json").read_text())
    assert (manifest["policy"], manifest["thresholds"], manifest["temperatures"]) == ("max-prob", [0.25, None],
                                                                                       [1.5, 1.0, 1.0])
    from safetensors.torch import save_file
    save_file(create_model("digits-convnet").state_dict(), tmp_path / "w.safetensors")
    _one_line_error(capsys, ["export", "--model", "digits-convnet", "--weights", str(tmp_path / "w.safetensors"),
                             "--out", str(tmp_path / "y")], "other weights than the shipped ones")
    _one_line_error(capsys, ["export", "--model", "nope", "--out", str(tmp_path / "z")], "unknown model 'nope'")
    assert not any((tmp_path / d).exists() for d in "xyz")


def test_a_graph_that_disagrees_with_torch_is_not_written(tmp_path, monkeypatch):
    monkeypatch.setattr(export_module, "MAX_ERROR", -1.0)  # any difference, even 0, is too large
    model = EarlyExitModel.create(create_model("digits-convnet"), "digits-convnet", "entropy", [0.5, 0.5])
    with pytest.raises(UserError, match="stage 0 differs between ONNX Runtime and torch"):
        export_module.export_onnx(model, tmp_path / "onnx", exporter="torchscript")
    assert not (tmp_path / "onnx").exists()


@pytest.mark.cifar
def test_shipped_b_resnet11_on_cifar_test_images(tmp_path):
    if not CIFAR_JPG.is_file():
        pytest.skip("../shared/data/cifar10-jpg.tar.gz not present")
    data = load_splits("cifar10", CIFAR_JPG, progress=False).test.subset(torch.arange(0, 10000, 40))  # 250 images
    (tmp_path / "t.json").write_text(json.dumps({"policy": "entropy", "thresholds": [0.3, 0.5, 0.8]}))
    export(tmp_path / "onnx", model="b-resnet11", thresholds=tmp_path / "t.json", exporter="torchscript")
    model = EarlyExitModel.create(load_model("b-resnet11")[0], "b-resnet11", "entropy", [0.3, 0.5, 0.8])
    run = _assert_same_run(model, data, OnnxEarlyExit.load(tmp_path / "onnx"))
    assert set(run.exits) == {0, 1, 2, 3}
    assert (run.predictions == data.labels.numpy()).mean() > 0.8  # the pixels are read as the model expects


def test_a_module_the_dynamo_exporter_refuses_falls_back_to_torchscript(tmp_path, monkeypatch):
    export_with = torch.onnx.export

    def no_dynamo(*args, dynamo=True, **kwargs):
        if dynamo:
            raise RuntimeError("no")
        return export_with(*args, dynamo=False, **kwargs)

    def refuse(*args, **kwargs):
        raise RuntimeError("no")

    monkeypatch.setattr(torch.onnx, "export", no_dynamo)
    model = EarlyExitModel.create(create_model("digits-convnet"), "digits-convnet", "entropy", [0.5, 0.5])
    manifest = export_module.export_onnx(model, tmp_path / "onnx")
    assert {g.exporter for g in manifest.graphs()} == {"torchscript"}
    monkeypatch.setattr(torch.onnx, "export", refuse)
    with pytest.raises(UserError, match=r"cannot export _InDtype to ONNX \(dynamo: no; torchscript: no\)"):
        export_module.export_onnx(model, tmp_path / "again")


def test_an_export_over_an_earlier_one_leaves_none_of_its_graphs_behind(digits, tmp_path):
    """A larger model's export replaced by a smaller one's kept its stage3.onnx and head3.onnx beside the new
    manifest; other files in the folder are the user's."""
    _, _, out = digits
    folder = tmp_path / "onnx"
    shutil.copytree(out / "onnx", folder)
    for name in ("stage3.onnx", "head3.onnx", "mine.onnx", "notes.txt"):
        (folder / name).write_bytes(b"x")
    export(folder, source=out / "model", exporter="torchscript")
    names = {p.name for p in folder.iterdir()}
    assert "stage3.onnx" not in names and "head3.onnx" not in names and {"mine.onnx", "notes.txt"} <= names
    assert {f"{kind}{k}.onnx" for kind in ("stage", "head") for k in range(3)} <= names

"""An EarlyExitModel runs the rule it was given, and survives a save and load unchanged."""
import json

import numpy as np
import pytest
import torch

from exitwise.study import analysis
from exitwise.early_exit import CONFIG_FILE, EarlyExitModel
from exitwise.errors import UserError
from exitwise.models import create_model
from exitwise.runtime import all_exit_logits, prepare

from conftest import random_image_set, spread_thresholds


def _model(thresholds=(0.5, None), temperatures=None) -> EarlyExitModel:
    torch.manual_seed(0)
    return EarlyExitModel.create(create_model("digits-convnet"), "digits-convnet", "entropy", thresholds,
                                 temperatures=temperatures, class_names=[str(i) for i in range(10)])


def test_run_leaves_where_the_rule_on_all_exit_logits_says():
    data = random_image_set(200)
    model = _model()
    model = model.with_setting("entropy", spread_thresholds(model.network, data, model.policy))
    logits = all_exit_logits(prepare(model.network), data).logits
    scores = model.policy.scores(torch.from_numpy(logits)).numpy()
    run = model.run(data, precision="fp32")
    assert set(run.exits) == {0, 1, 2}  # every exit taken, so the thresholds decide
    assert (run.exits == analysis.exit_points(scores, model.thresholds)).all()


def test_save_then_load_gives_the_same_decisions(tmp_path):
    data = random_image_set(100)
    model = _model(temperatures=(1.5, 1.2, 1.0))
    first = spread_thresholds(model.network, data, model.policy, shares=(0.5, 0.5))[0]
    model = model.with_setting(model.policy, (first, None))
    loaded = EarlyExitModel.load(model.save(tmp_path / "ee"))
    assert loaded.to_json() == model.to_json()
    assert np.isneginf(loaded.thresholds[1])
    a, b = model.run(data, precision="fp32"), loaded.run(data, precision="fp32")
    assert set(a.exits) == {0, 2}  # half leave at exit 0 (its temperature counts), none at exit 1 (null)
    assert (a.exits == b.exits).all() and (a.predictions == b.predictions).all()
    assert json.loads((tmp_path / "ee" / CONFIG_FILE).read_text())["thresholds"] == [first, None]


def test_wrong_number_of_thresholds_is_refused():
    with pytest.raises(UserError, match="expected 2 thresholds"):
        _model(thresholds=(0.5,))


def test_a_file_that_is_not_an_early_exit_model_is_refused(tmp_path):
    (tmp_path / CONFIG_FILE).write_text('{"format": "something else"}')
    with pytest.raises(UserError, match="not an exitwise early-exit model"):
        EarlyExitModel.load(tmp_path)


@pytest.mark.parametrize("edit, message", [
    ({"model": 5}, "model is 5, not a string"),
    ({"policy": 3}, "policy is 3, not a string"),
    ({"thresholds": 3}, "thresholds is 3, not a list"),
    ({"thresholds": "0.5"}, 'thresholds is "0.5", not a list'),
    ({"thresholds": ["a", None]}, "thresholds must be numbers"),
    ({"thresholds": [True, None]}, "thresholds must be numbers"),
    ({"num_exits": "3"}, 'num_exits is "3", not an integer'),
    ({"num_exits": None}, "lacks num_exits"),
    ({"temperatures": "x"}, 'temperatures is "x", not a list'),
    ({"temperatures": ["x", 1, 1]}, "temperatures must be positive numbers"),
    ({"temperatures": [1.0]}, "expected 3 temperatures"),
    ({"class_names": ["a"]}, "expected 10 class names"),
    ({"class_names": list(range(10))}, "expected 10 class names"),
    ({"weights": 3}, "weights is 3, not a string"),
])
def test_an_early_exit_json_with_a_key_of_the_wrong_type_or_length_is_refused_in_one_line(tmp_path, edit, message):
    folder = _model().save(tmp_path / "ee")
    config = json.loads((folder / CONFIG_FILE).read_text())
    (folder / CONFIG_FILE).write_text(json.dumps({**config, **edit}))
    with pytest.raises(UserError, match=message):
        EarlyExitModel.load(folder)


def test_saved_by_reference_the_weights_are_checked_by_hash(tmp_path):
    model = _model()
    weights = tmp_path / "w.safetensors"
    from safetensors.torch import save_file
    save_file(model.network.state_dict(), str(weights))
    model.save(tmp_path / "ee", weights=weights)
    assert not (tmp_path / "ee" / "model.safetensors").exists()
    assert EarlyExitModel.load(tmp_path / "ee").to_json() == model.to_json()
    from exitwise.early_exit import saved_weights_sha256
    from exitwise.io import file_sha256
    config = json.loads((tmp_path / "ee" / CONFIG_FILE).read_text())
    del config["weights_sha256"]  # a file that names its weights without their hash: they are hashed now
    (tmp_path / "ee" / CONFIG_FILE).write_text(json.dumps(config))
    assert saved_weights_sha256(tmp_path / "ee") == file_sha256(weights)  # was the folder's own (absent) copy
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    model.save(tmp_path / "ee", weights=weights)
    weights.write_bytes(weights.read_bytes()[:-1] + b"\1")
    with pytest.raises(UserError, match="missing or changed"):
        EarlyExitModel.load(tmp_path / "ee")


def test_a_shipped_model_runs_the_setting_its_card_carries_and_only_with_its_own_weights():
    from exitwise.models import load_model, shipped_card
    network, _ = load_model("b-resnet11")
    card = shipped_card("b-resnet11")
    model = EarlyExitModel.calibrated(network, "b-resnet11")
    assert model.policy.name == card.calibrated.policy and model.class_names == card.dataset.classes
    assert json.dumps(model.to_json()["thresholds"]) == json.dumps(list(card.calibrated.thresholds))
    assert EarlyExitModel.calibrated(network, "b-resnet11", weights="other.safetensors") is None  # not its numbers
    assert EarlyExitModel.calibrated(create_model("digits-convnet"), "digits-convnet") is None  # no setting ships


@pytest.mark.parametrize("data", [random_image_set(4).images.numpy(), random_image_set(4).images,
                                  list(random_image_set(4).images.numpy())])
def test_run_takes_an_image_set_and_says_so_when_given_bare_images(data):
    with pytest.raises(TypeError, match="run takes an ImageSet, got .*ImageSet.from_tensors"):
        _model().prepare().run(data)


@pytest.mark.parametrize("shape", [(32, 32, 3), (8, 8, 3), (16, 16, 1)])
def test_run_refuses_images_of_another_size_before_any_stage_runs(shape):
    with pytest.raises(UserError, match=r"the model takes 1x8x8 images, but the ImageSet has \d+x\d+x\d+ images"):
        _model().prepare().run(random_image_set(4, shape=shape))


@pytest.mark.parametrize("kwargs, message", [({"batch_size": 0}, "batch size must be at least 1"),
                                             ({"micro_batch": 0}, "micro-batch must be a positive number"),
                                             ({"micro_batch": -3}, "micro-batch must be a positive number")])
def test_run_refuses_batch_sizes_below_one_in_one_line(kwargs, message):
    with pytest.raises(UserError, match=message):
        _model().prepare().run(random_image_set(4), **kwargs)


def test_an_empty_image_set_gives_an_empty_run_prepared_or_not():
    empty = random_image_set(4).subset(torch.arange(0))
    for model in (_model(), _model().prepare()):
        run = model.run(empty)
        assert run.exits.shape == run.predictions.shape == (0,)


def test_the_constructor_takes_a_policy_by_name_and_json_style_thresholds_as_create_does():
    net = _model().network
    made = EarlyExitModel(net, "entropy", [None, 0.5], "digits-convnet")
    assert made.policy.name == "entropy" and made.to_json()["thresholds"] == [None, 0.5]
    with pytest.raises(UserError, match="unknown exit policy 'entropi'"):
        EarlyExitModel(net, "entropi", [0.5, 0.5], "digits-convnet")
    with pytest.raises(TypeError, match="policy must be an ExitPolicy or a registered policy's name, got int"):
        EarlyExitModel(net, 3, [0.5, 0.5], "digits-convnet")


@pytest.mark.parametrize("kwargs, message", [
    ({"thresholds": 0.1}, r"thresholds takes a list, e.g. \[0.1\], got 0.1"),
    ({"thresholds": "0.1,0.2"}, r"thresholds takes a list, e.g. \['0.1', '0.2'\]"),
    ({"thresholds": [0.1, 0.2], "temperatures": 1.5}, "temperatures takes a list"),
    ({"thresholds": [0.1, 0.2], "class_names": "0123456789"}, "class_names takes a list"),  # not ten names
])
def test_create_refuses_a_lone_number_or_string_where_a_list_belongs(kwargs, message):
    with pytest.raises(UserError, match=message):
        EarlyExitModel.create(create_model("digits-convnet"), "digits-convnet", "entropy", **kwargs)

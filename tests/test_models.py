"""The model registry, the seed network's layout, checkpoint loading and MACs."""
import json
import os
import pickle

import torch

import pytest
from safetensors.torch import save_file

from torch.utils.flop_counter import FlopCounterMode

from exitwise.models.costs import backbone_macs, exit_macs, stage_and_head_macs
from exitwise.errors import UserError
from exitwise.models import (INDEX_SUFFIX, MODELS, SHIPPED_WEIGHTS_DIR, ModelCard, create_model, load_weights,
                             register_model)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_gives_one_logit_tensor_per_exit_and_stages_compose_to_forward(name):
    model = create_model(name).eval()
    x = torch.rand(3, *model.input_shape)
    all_logits = model(x)
    assert len(all_logits) == model.num_exits and all(l.shape == (3, model.num_classes) for l in all_logits)
    h = x
    for k, (stage, head) in enumerate(zip(model.stages, model.heads)):
        h = stage(h)
        torch.testing.assert_close(head(h), all_logits[k])


def test_seed_branchynet_has_the_founding_layout_six_exits_and_82_mflops():
    model = create_model("seed-branchynet")
    assert model.num_exits == 6
    macs = exit_macs(model)
    assert macs == sorted(macs)
    assert 2 * macs[-1] == pytest.approx(82e6, rel=0.01)  # ARCHITECTURE.md: ~82 MFLOPs with every exit
    assert backbone_macs(model) < macs[-1]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_macs_per_stage_and_head_match_pytorchs_flop_counter(name):
    model = create_model(name).eval()
    expected, x = [], torch.zeros(1, *model.input_shape)
    with torch.no_grad():
        for stage, head in zip(model.stages, model.heads):
            for module in (stage, head):
                counter = FlopCounterMode(display=False)
                with counter:
                    y = module(x)
                expected.append(counter.get_total_flops() // 2)
                x = y if module is stage else x
    stages, heads = stage_and_head_macs(model)
    assert [m for pair in zip(stages, heads) for m in pair] == expected


def test_seed_checkpoint_names_map_onto_stages_and_heads(tmp_path):
    model = create_model("seed-branchynet")
    flat = {}
    for key, value in model.state_dict().items():
        part, index, rest = key.split(".", 2)
        flat[f"branch{int(index) + 1}.{rest}" if part == "heads" else rest] = value.clone()
    torch.save(flat, tmp_path / "seed.h5")
    fresh = load_weights(create_model("seed-branchynet"), tmp_path / "seed.h5")
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value)


def test_safetensors_round_trip(tmp_path):
    model = create_model("digits-convnet")
    save_file(model.state_dict(), str(tmp_path / "m.safetensors"))
    fresh = load_weights(create_model("digits-convnet"), tmp_path / "m.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))


class RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_of_python_objects_is_refused_as_weights_or_checkpoint_in_one_line_never_run(tmp_path, capsys):
    from exitwise.cli import main
    marker, out = tmp_path / "pwned", tmp_path / "out"
    torch.save({"x": RunsACommand(marker)}, tmp_path / "a.pt")
    (tmp_path / "b.pkl").write_bytes(pickle.dumps(RunsACommand(marker), protocol=4))  # torch warns of protocol 4
    for file in ("a.pt", "b.pkl"):
        for flags in (["study", "--weights"], ["train", "--resume"]):
            command, flag = flags
            assert main([command, "--dataset", "digits", "--model", "digits-convnet", flag, str(tmp_path / file),
                         "--out", str(out)]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "never unpickled" in err and "weights_only" not in err, err
    assert not marker.exists() and not out.exists()


def test_weights_given_as_a_folder_are_refused_asking_for_the_file_in_it(tmp_path):
    with pytest.raises(UserError, match="is a folder: give the weights file in it"):
        load_weights(create_model("digits-convnet"), tmp_path)


def test_checkpoint_that_does_not_fit_is_refused_naming_the_tensors(tmp_path):
    state = create_model("digits-convnet").state_dict()
    state.pop("heads.0.1.weight")
    state["stages.0.0.weight"] = torch.zeros(5, 1, 3, 3)
    state["surprise"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(UserError) as e:
        load_weights(create_model("digits-convnet"), tmp_path / "bad.pt")
    assert "heads.0.1.weight" in str(e.value) and "surprise" in str(e.value) and "stages.0.0.weight" in str(e.value)


def test_weights_of_integers_with_the_right_names_and_shapes_are_refused_not_cast(tmp_path):
    state = create_model("digits-convnet").state_dict()
    state["stages.0.0.weight"] = state["stages.0.0.weight"].round().to(torch.int64)  # load_state_dict would cast it
    save_file(state, str(tmp_path / "ints.safetensors"))
    with pytest.raises(UserError, match=r"wrong kind of number: stages.0.0.weight torch.int64 for torch.float32"):
        load_weights(create_model("digits-convnet"), tmp_path / "ints.safetensors")
    state["stages.0.0.weight"] = state["stages.0.0.weight"].to(torch.bfloat16)  # another float precision: taken
    save_file(state, str(tmp_path / "bf16.safetensors"))
    load_weights(create_model("digits-convnet"), tmp_path / "bf16.safetensors")


def test_pickled_code_is_never_run(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(UserError):
        load_weights(create_model("digits-convnet"), tmp_path / "evil.pt")


def test_unknown_model_and_garbage_file(tmp_path):
    with pytest.raises(UserError, match="unknown model"):
        create_model("nope")
    with pytest.raises(TypeError, match="create_model takes a registered model's name or an attached model's folder, "
                                        "got int 3"):  # was pathlib's 'expected str, bytes or os.PathLike object'
        create_model(3)
    (tmp_path / "garbage.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(UserError):
        load_weights(create_model("digits-convnet"), tmp_path / "garbage.safetensors")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_shipped_weights_load_and_carry_a_model_card(name):
    from exitwise.models import shipped_card, shipped_weights
    path = shipped_weights(name)
    if path is None:
        pytest.skip(f"no weights ship for {name}")
    load_weights(create_model(name), path)
    card = shipped_card(name)
    assert card.model == name and len(card.test_accuracy) == create_model(name).num_exits


@pytest.mark.parametrize("path", sorted(p.name for p in SHIPPED_WEIGHTS_DIR.glob("*.json")
                                        if not p.name.endswith(INDEX_SUFFIX)))
def test_a_shipped_card_reads_as_a_model_card_and_writes_back_byte_for_byte(path):
    text = (SHIPPED_WEIGHTS_DIR / path).read_text()
    card = ModelCard.from_json(json.loads(text))
    assert json.dumps(card.to_json(), indent=2) + "\n" == text  # no key lost, none added, in the same order


def test_every_shipped_file_is_under_the_8_mib_repository_limit():
    sizes = {p.name: p.stat().st_size for p in SHIPPED_WEIGHTS_DIR.iterdir()}
    assert sizes and all(size < 8 << 20 for size in sizes.values()), sizes


def test_sharded_weights_load_like_one_file_and_hash_as_all_their_shards(tmp_path):
    from exitwise.api import load_model
    from exitwise.models import read_state_dict, save_sharded, weight_files
    state = create_model("digits-convnet").state_dict()
    index = tmp_path / "net.safetensors.index.json"
    shards = save_sharded(state, index, max_shard_bytes=20_000)
    assert len(shards) > 2
    for shard in shards:  # at most 20 kB of tensors, unless one tensor alone is larger
        tensors = read_state_dict(shard).values()
        assert len(tensors) == 1 or sum(t.numel() * t.element_size() for t in tensors) <= 20_000
    assert weight_files(index) == [index, *sorted(shards)]
    loaded = read_state_dict(index)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    hashes = {load_model("digits-convnet", index)[1]["weights_sha256"]}
    for shard in (shards[0], shards[-1]):  # one changed byte in any shard changes the hash
        shard.write_bytes(shard.read_bytes()[:-1] + b"x")
        hashes.add(load_model("digits-convnet", index)[1]["weights_sha256"])
    assert len(hashes) == 3
    shards[0].unlink()
    with pytest.raises(UserError, match="not found"):
        read_state_dict(index)


def test_sharded_weights_a_saved_file_names_are_refused_in_one_line_when_a_shard_went_missing(tmp_path):
    from exitwise.models import check_unchanged, save_sharded, weight_files
    from exitwise.io import file_sha256
    index = tmp_path / "net.safetensors.index.json"
    shards = save_sharded(create_model("digits-convnet").state_dict(), index, max_shard_bytes=20_000)
    sha256 = file_sha256(*weight_files(index))
    check_unchanged(index, sha256, "early_exit.json")
    shards[1].unlink()
    with pytest.raises(UserError, match="'early_exit.json' names weights .* missing or changed"):
        check_unchanged(index, sha256, "early_exit.json")


@pytest.mark.parametrize("shard", ["net.safetensors.index.json", "../net-1.safetensors", None, 3])
def test_a_shard_index_may_only_name_safetensors_files_beside_it(tmp_path, shard):
    from exitwise.models import read_state_dict
    index = tmp_path / "net.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"w": shard}}))
    with pytest.raises(UserError, match="shard index"):
        read_state_dict(index)


def test_a_registered_model_knows_its_name_even_when_it_shares_a_class():
    large = create_model("b-resnet11-large")
    assert large.name == "b-resnet11-large" and type(large) is type(create_model("b-resnet11"))
    with pytest.raises(ValueError, match="registered already"):
        register_model("b-resnet11")(lambda: large)


def test_register_model_used_bare_as_timms_is_refused_instead_of_registering_nothing():
    def my_net():
        return create_model("digits-convnet")
    with pytest.raises(TypeError, match=r'register_model takes the model\'s name: @register_model\("my-net"\), got my_net'):
        register_model(my_net)


def test_a_registered_factory_that_returns_no_multi_exit_network_is_refused_by_create_model(monkeypatch):
    monkeypatch.setitem(MODELS, "plain-linear", lambda: torch.nn.Linear(3, 4))
    with pytest.raises(TypeError, match="model 'plain-linear' returned Linear, not a MultiExitNetwork"):
        create_model("plain-linear")

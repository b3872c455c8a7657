"""Hugging Face models built from configs (no download) get exits attached and trained on digits (needs exitwise[hf])."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from exitwise.api import train_exits  # noqa: E402
from exitwise import attach  # noqa: E402
from exitwise.data import load_splits  # noqa: E402
from exitwise.train import evaluate  # noqa: E402


def resnet():
    config = transformers.ResNetConfig(num_channels=1, embedding_size=16, hidden_sizes=[16, 32, 64], depths=[1, 1, 1],
                                       layer_type="basic", num_labels=10, downsample_in_first_stage=False)
    return transformers.ResNetForImageClassification(config), ["resnet.encoder.stages.0", "resnet.encoder.stages.1"]


def vit():
    config = transformers.ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=32, num_hidden_layers=3,
                                    num_attention_heads=2, intermediate_size=64, num_labels=10)
    model = transformers.ViTForImageClassification(config)
    layers = [n for n, m in model.named_modules() if type(m).__name__ == "ViTLayer"]
    return model, layers[:2]


@pytest.mark.parametrize("build, frozen", [(resnet, True), (vit, True)])
def test_hf_model_gets_exits_that_learn_and_keeps_its_logits(build, frozen, tmp_path):

    torch.manual_seed(0)
    model, exits = build()
    model.eval()
    network = attach(model, exits, num_classes=10, input_shape=(1, 8, 8), max_head_fraction=1.0)
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        expected = model(pixel_values=x).logits
        assert torch.equal(network.eval()(x)[-1], expected)
    splits = load_splits("digits")
    train_exits(network, splits, tmp_path / "run", epochs=8, lr=0.3, precision="fp32", progress=False,
                freeze_backbone=frozen)
    if frozen:  # the final exit's weights are untouched; training stored them channels_last, so sums may reorder
        with torch.no_grad():
            assert torch.allclose(network.eval()(x)[-1], expected, atol=1e-5)
    accuracy = evaluate(network, splits.test, precision="fp32")
    assert min(accuracy[:-1]) > 0.2, accuracy  # twice chance (ten classes); measured 0.30 to 0.76


def test_an_attached_vit_runs_on_the_device_its_weights_are_on():
    """torch.export writes the tracing device into the ops that make tensors (the position ids' arange); the
    stages make them on their input's device instead (on a GPU the CPU's arange broke training)."""
    model, exits = vit()
    network = attach(model.eval(), exits, num_classes=10, input_shape=(1, 8, 8), max_head_fraction=1.0).to("meta")
    logits = network.eval()(torch.zeros(2, 1, 8, 8, device="meta"))
    assert [l.device.type for l in logits] == ["meta"] * 3

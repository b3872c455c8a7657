"""attach: exits on models no one wrote for exitwise; the final exit is the model, bit for bit; impossible cuts refused."""
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from exitwise import attach
from exitwise.models.costs import head_report, stage_and_head_macs
from exitwise.errors import UserError
from exitwise.models.heads import MixedPool, TokenHead
from exitwise.runtime import all_exit_logits, prepare

from conftest import random_image_set


def _benchmark_model_file():
    """scripts/resnet18_cifar.py, the benchmark's "user's model": its BasicBlock is torchvision's layout."""
    path = Path(__file__).resolve().parents[1] / "scripts" / "resnet18_cifar.py"
    spec = importlib.util.spec_from_file_location("resnet18_cifar", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BasicBlock = _benchmark_model_file().BasicBlock


class TinyResNet(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 8))
        self.layer2 = nn.Sequential(BasicBlock(8, 16, 2), BasicBlock(16, 16))
        self.layer3 = nn.Sequential(BasicBlock(16, 32, 2))
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class DictNet(nn.Module):
    """Functional ops throughout and a dict out: the kind of forward an nn.Sequential cannot express."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 5)
        self.scale = nn.Parameter(torch.ones(8, 1, 1))

    def forward(self, images):
        x = F.gelu(self.a(images * 2 - 1))
        x = F.max_pool2d(x, 2)
        y = self.b(x) * self.scale + x  # residual inside the second stage only
        return {"features": y, "logits": self.head(y.mean((2, 3))), "aux": y.sum()}


class Encoder(nn.Module):
    """Patches -> tokens -> torch.nn.TransformerEncoder -> mean-pooled classifier."""

    def __init__(self, dim: int = 16, layers: int = 3):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.pos = nn.Parameter(torch.randn(1, 4, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.fc = nn.Linear(dim, 10)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        return self.fc(self.encoder(tokens).mean(1))


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def exact(model, ee, x, key=None):
    """The final exit is the model: the same fp32 logits, bit for bit."""
    with torch.no_grad():
        expected = model(x)
        got = ee(x)[-1]
    return torch.equal(got, expected[key] if key else expected)


def test_residual_model_cut_inside_its_trunk_keeps_the_final_exit_exact():
    model = TinyResNet().eval()
    ee = attach(model, ["layer1.1", "layer2"], num_classes=10, input_shape=(3, 16, 16))
    assert ee.num_exits == 3 and isinstance(ee.heads[-1], nn.Identity)
    assert not ee.training and not ee.heads[0].training  # in the mode of the model it was made from
    x = randn(5, 3, 16, 16)
    assert exact(model, ee, x)
    logits = ee(x)
    assert [tuple(l.shape) for l in logits] == [(5, 10)] * 3
    # the stages compose to the trunk: stage 0 ends at layer1's output
    with torch.no_grad():
        assert torch.equal(ee.stages[0](x), model.layer1(F.relu(model.bn1(model.conv1(x)))))


def test_the_benchmarks_resnet18_is_cut_after_each_layer_group():
    model = _benchmark_model_file().build().eval()
    ee = attach(model, ["layer1", "layer2", "layer3"], num_classes=10, input_shape=(3, 32, 32))
    assert exact(model, ee, randn(2, 3, 32, 32))
    assert all(r.head_macs <= 0.25 * r.stage_macs for r in head_report(ee))


def test_attached_model_shares_the_user_models_parameters_and_leaves_its_mode_and_statistics_alone():
    model = TinyResNet().train()
    before = model.bn1.running_mean.clone()
    ee = attach(model, ["layer1"], num_classes=10, input_shape=(3, 16, 16))
    assert ee.stages[0].conv1.weight is model.conv1.weight
    assert all(m.training for m in model.modules()) and ee.training
    assert torch.equal(model.bn1.running_mean, before)


def test_functional_forward_returning_a_dict_ends_at_its_logits():
    model = DictNet().eval()
    ee = attach(model, ["a"], num_classes=5, input_shape=(3, 8, 8))
    assert exact(model, ee, randn(3, 3, 8, 8), key="logits")
    with pytest.raises(UserError, match="output_key"):
        attach(model, ["a"], num_classes=5, input_shape=(3, 8, 8), output_key="logit")


def test_transformer_encoder_token_features_get_token_heads():
    model = Encoder().eval()
    ee = attach(model, ["encoder.layers.0", "encoder.layers.1"], num_classes=10, input_shape=(3, 8, 8))
    assert all(isinstance(h, TokenHead) for h in ee.heads[:-1])
    assert exact(model, ee, randn(4, 3, 8, 8))
    stages, heads = stage_and_head_macs(ee)
    assert stages[1] == 4 * 4 * 16 * 16 + 2 * 4 * 4 * 16 + 2 * 4 * 16 * 32  # one encoder layer, counted whole
    assert heads[0] == 16 * 10


def test_cls_token_pooling_reads_the_first_token():
    head = TokenHead(4, 3, pool="cls")
    x = randn(2, 5, 4)
    y = x.clone()
    y[:, 1:] = 0
    assert torch.equal(head(x), head(y))


def test_heads_fit_the_budget_and_are_reported():
    model = TinyResNet().eval()
    ee = attach(model, ["layer1", "layer2"], num_classes=10, input_shape=(3, 32, 32), max_head_fraction=0.2)
    report = head_report(ee, ["layer1", "layer2"])
    assert [r.exit for r in report] == ["layer1", "layer2"]
    assert all(r.head_macs <= 0.2 * r.stage_macs for r in report)
    assert isinstance(ee.heads[0][0], nn.Conv2d)  # a conv head fits a fifth of layer1's stage


def layer_types(head: nn.Module) -> list[type]:
    return [type(m) for m in head]


@pytest.mark.parametrize("kind, layers", [
    ("conv-pool", [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, MixedPool, nn.Flatten, nn.Linear]),
    ("conv", [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.AdaptiveMaxPool2d, nn.Flatten, nn.Linear]),
    ("pool", [MixedPool, nn.Flatten, nn.Linear]),
    ("gap", [nn.AdaptiveAvgPool2d, nn.Flatten, nn.Linear])])
def test_a_map_head_kind_can_be_asked_for(kind, layers):
    ee = attach(TinyResNet().eval(), ["layer1", "layer2"], num_classes=10, input_shape=(3, 16, 16), head=kind,
                max_head_fraction=1.0)
    assert all(layer_types(h) == layers for h in ee.heads[:-1])
    assert ee.head_kinds == [kind, kind]


def test_each_exit_can_have_its_own_head_kind():
    ee = attach(TinyResNet().eval(), ["layer1", "layer2"], num_classes=10, input_shape=(3, 16, 16),
                head=["pool", "conv"], max_head_fraction=1.0)
    assert [layer_types(h)[0] for h in ee.heads[:-1]] == [MixedPool, nn.Conv2d]
    with pytest.raises(UserError, match="3 head kinds for 2 exits"):
        attach(TinyResNet().eval(), ["layer1", "layer2"], num_classes=10, input_shape=(3, 16, 16),
               head=["pool", "conv", "gap"])


def test_auto_heads_get_cheaper_as_the_budget_shrinks():
    def kind_and_first_layer(fraction):
        ee = attach(TinyResNet().eval(), ["layer1"], num_classes=10, input_shape=(3, 16, 16),
                    max_head_fraction=fraction)
        return ee.head_kinds[0], type(ee.heads[0][0])
    assert kind_and_first_layer(0.5) == ("conv-pool", nn.Conv2d)  # conv, then SDN pooling to 4x4: richest
    assert kind_and_first_layer(0.02) == ("pool", MixedPool)  # 8 * 4 * 4 * 10 MACs fit, a 16-wide conv does not
    with pytest.warns(UserWarning, match="'layer1'"):  # nothing fits: the cheapest, warned about
        assert kind_and_first_layer(1e-5) == ("gap", nn.AdaptiveAvgPool2d)


def test_a_head_over_budget_is_warned_about():
    model = TinyResNet().eval()
    with pytest.warns(UserWarning, match="'layer1'"):
        attach(model, ["layer1"], num_classes=10, input_shape=(3, 16, 16),
               head_factory=lambda shape, classes, budget: nn.Sequential(
                   nn.Conv2d(shape[0], 64, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, classes)))


def test_head_factory_gets_the_feature_shape_and_budget():
    seen = []

    def factory(shape, classes, budget):
        seen.append((shape, classes, budget > 0))
        return nn.Sequential(nn.Flatten(), nn.LazyLinear(classes))
    attach(TinyResNet().eval(), ["layer1", "layer2"], num_classes=10, input_shape=(3, 16, 16), head_factory=factory)
    assert seen == [((8, 16, 16), 10, True), ((16, 8, 8), 10, True)]


@pytest.mark.parametrize("factory, message", [
    (lambda shape, classes, budget: nn.Sequential(nn.Flatten(), nn.LazyLinear(classes - 3)),
     r"exit 0's head from head_factory gives \(7,\) per sample, not \(10,\) logits"),
    (lambda shape, classes, budget: nn.AdaptiveAvgPool2d(1),
     r"exit 0's head from head_factory gives \(8, 1, 1\) per sample, not \(10,\) logits"),
    (lambda shape, classes, budget: nn.Linear(5, classes), r"exit 0's head does not run on its \(8, 8, 8\) features"),
    (lambda shape, classes, budget: None, "head_factory returned NoneType for exit 0, not a torch.nn.Module"),
])
def test_a_head_factorys_head_that_gives_no_logits_of_the_classes_is_refused_at_attach(factory, message):
    with pytest.raises(UserError, match=message):
        attach(TinyResNet().eval(), ["layer1"], num_classes=10, input_shape=(3, 8, 8), head_factory=factory)


def test_attached_model_runs_in_the_runtime_with_early_exit_logits_equal():
    model = TinyResNet().eval()
    ee = attach(model, ["layer1", "layer2"], num_classes=10, input_shape=(3, 16, 16))
    data = random_image_set(40, shape=(16, 16, 3))
    run = all_exit_logits(prepare(ee, "fp32"), data, batch_size=16)
    with torch.no_grad():
        expected = torch.cat([model(x) for x, _ in data.batches(16)])
    assert torch.allclose(torch.from_numpy(run.logits[-1]), expected, atol=1e-4)  # batch norms folded
    prepared = prepare(ee, "fp32")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in prepared.stages.modules())


class Skip(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        y = self.b(self.a(x)) + x  # the input skips over `a` and `b`
        return self.fc(y.mean((2, 3)))


class SizeFromInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.fc = nn.Conv2d(3, 4, 1), nn.Linear(4 * 4 * 4, 2)

    def forward(self, x):
        return self.fc(self.a(x).reshape(x.shape[0], -1))


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.fc = nn.Conv2d(3, 3, 1), nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(self.a(self.a(x)).mean((2, 3)))


@pytest.mark.parametrize("model, exits, words", [
    (Skip(), ["a"], ["'a'", "the input 'x'", "crosses the cut"]),
    (SizeFromInput(), ["a"], ["'a'", "used after it"]),
    (TinyResNet(), ["layer1.0.conv1"], ["'layer1.0.conv1'", "crosses the cut"]),  # the block's shortcut
    (Twice(), ["a"], ["'a'", "runs 2 times"]),
    (TinyResNet(), ["layer4"], ["'layer4' is not a submodule"]),
    (TinyResNet(), ["layer2", "layer1"], ["out of forward order", "'layer1'"]),
    (TinyResNet(), ["layer1", "layer1"], ["more than once"]),
    (TinyResNet(), ["fc"], ["'fc'", "after the model's logits"]),
    (TinyResNet(), [], ["at least one exit"]),
])
def test_impossible_cuts_are_refused_naming_the_module(model, exits, words):
    with pytest.raises(UserError) as e:
        attach(model.eval(), exits, num_classes=10 if isinstance(model, TinyResNet) else 2, input_shape=(3, 4, 4))
    assert all(w in str(e.value) for w in words), str(e.value)
    assert "\n" not in str(e.value)


def test_exits_given_as_one_string_are_refused_showing_the_list_meant():
    with pytest.raises(UserError, match=r"exits takes a list, e.g. \['layer1', 'layer2'\], got 'layer1,layer2'"):
        attach(TinyResNet().eval(), "layer1,layer2", num_classes=10, input_shape=(3, 8, 8))
    from exitwise.config import AttachConfig
    with pytest.raises(UserError, match=r"exits takes a list, e.g. \['layer1', 'layer2'\], got 'layer1,layer2'"):
        AttachConfig(model_file="m.py:build", exits="layer1,layer2")


def test_wrong_number_of_classes_is_refused():
    with pytest.raises(UserError, match=r"\(10,\) per sample, not \(7,\)"):
        attach(TinyResNet().eval(), ["layer1"], num_classes=7, input_shape=(3, 8, 8))

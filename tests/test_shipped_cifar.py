"""The weights shipped inside the package score on the shared CIFAR-10 copy what their model cards say.

Each card records `check_subset` (scripts/ship_weights.py): per-exit accuracy in fp32 on the first 1,000
test images, which every shipped model reproduces here in seconds on any CPU. The smallest model is also
checked on all 10,000 test images against the card's test accuracy (measured in bf16 when it was trained), and the
most accurate one is measured there reaching 91% at its final exit.
"""
import numpy as np
import pytest
import torch

from exitwise.api import load_model
from exitwise.data import load_splits
from exitwise.models import shipped_card, shipped_models
from exitwise.train import evaluate

from conftest import CIFAR_JPG

pytestmark = pytest.mark.cifar


@pytest.fixture(scope="module")
def cifar_test():
    if not CIFAR_JPG.is_file():
        pytest.skip("../shared/data/cifar10-jpg.tar.gz not present")
    return load_splits("cifar10", CIFAR_JPG, progress=False).test


@pytest.mark.parametrize("name", shipped_models("cifar10"))
def test_shipped_weights_reproduce_their_cards_check_subset_in_fp32(name, cifar_test):
    check = shipped_card(name).check_subset
    model, _ = load_model(name)  # the package's weights (float16 shards for the residual models)
    measured = evaluate(model, cifar_test.subset(torch.arange(check["images"])), precision=check["precision"])
    np.testing.assert_allclose(measured, check["accuracy"], atol=0.002)  # 2 of 1,000 images: CPU rounding


def test_the_smallest_shipped_model_reproduces_its_cards_full_test_accuracy(cifar_test):
    from exitwise.models.costs import backbone_macs
    from exitwise.models import create_model
    name = min(shipped_models("cifar10"), key=lambda n: backbone_macs(create_model(n)))
    model, _ = load_model(name)
    np.testing.assert_allclose(evaluate(model, cifar_test), shipped_card(name).test_accuracy, atol=0.002)


def test_a_shipped_model_reaches_91_percent_at_its_final_exit_on_all_10000_test_images(cifar_test):
    name = max(shipped_models("cifar10"), key=lambda n: shipped_card(n).test_accuracy[-1])
    model, _ = load_model(name)
    final = evaluate(model, cifar_test)[-1]  # in fp32, native on every CPU (59 s on a 2-core Intel Xeon with AMX)
    assert final >= 0.91 and abs(final - shipped_card(name).test_accuracy[-1]) <= 0.002, (name, final)

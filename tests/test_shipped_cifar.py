"""The weights shipped inside the package score on the shared CIFAR-10 copy what their model cards say."""
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
def test_shipped_weights_reproduce_their_cards_test_accuracy(name, cifar_test):
    model, _ = load_model(name)  # the package's weights (float16 shards for the residual models)
    measured = evaluate(model.to(memory_format=torch.channels_last), cifar_test)  # as training measured the card
    np.testing.assert_allclose(measured, shipped_card(name)["test_accuracy"], atol=0.002)


def test_a_shipped_model_reaches_91_percent_at_its_final_exit():
    assert max(shipped_card(n)["test_accuracy"][-1] for n in shipped_models("cifar10")) >= 0.91

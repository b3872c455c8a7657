"""The weights shipped inside the package score on the shared CIFAR-10 copy what their model cards say."""
import numpy as np
import pytest

from exitwise.api import load_model
from exitwise.data import load_splits
from exitwise.models import MODELS, shipped_card, shipped_weights
from exitwise.runtime import all_exit_logits, prepare

from conftest import CIFAR_JPG

pytestmark = pytest.mark.cifar
SHIPPED_CIFAR = [n for n in sorted(MODELS) if shipped_weights(n) and shipped_card(n)["dataset"]["name"] == "cifar10"]


@pytest.fixture(scope="module")
def cifar_test():
    if not CIFAR_JPG.is_file():
        pytest.skip("../shared/data/cifar10-jpg.tar.gz not present")
    return load_splits("cifar10", CIFAR_JPG, progress=False).test


@pytest.mark.parametrize("name", SHIPPED_CIFAR)
def test_shipped_weights_reproduce_their_cards_test_accuracy(name, cifar_test):
    model, _ = load_model(name)  # the package's weights (float16 shards for the residual models)
    run = all_exit_logits(prepare(model, "bf16"), cifar_test)
    measured = (run.logits.argmax(-1) == cifar_test.labels.numpy()).mean(1)
    np.testing.assert_allclose(measured, shipped_card(name)["test_accuracy"], atol=0.002)


def test_a_shipped_residual_model_reaches_91_percent_at_its_final_exit():
    assert max(shipped_card(n)["test_accuracy"][-1] for n in SHIPPED_CIFAR) >= 0.91

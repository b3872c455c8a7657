"""The timing benchmarks choose what they time as the study does: on validation data, never on test; and every
benchmark still imports (they are run by hand, so nothing else notices when a name they use goes away)."""
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from exitwise.policies import ExitArrays
from exitwise.study.results import NEVER, Setting

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    sys.path.insert(0, str(BENCHMARKS))  # the benchmarks import their shared timing_common
    try:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_early_exit_speed_picks_the_fastest_setting_within_points_on_validation():
    fastest_within = load_benchmark("early_exit_speed").fastest_within
    # two exits, 100 validation samples; the final exit is right on 90 of them
    correct = np.ones((2, 100), dtype=bool)
    correct[1, :10] = False
    correct[0, :30] = False                       # exit 0 is wrong on the first 30
    scores = np.zeros((2, 100))
    scores[0, :30] = np.linspace(0.5, 0.9, 30)    # ...which it scores less confident than the rest (0)
    val = {"entropy": ExitArrays(scores, correct)}
    macs, per_sample = np.array([1.0, 4.0]), np.array([1e-3, 3e-3])
    never = Setting("no early exit", "entropy", (NEVER,))
    everyone = Setting("all leave at exit 0", "entropy", (1.0,))          # 70% on validation
    confident = Setting("the confident leave at exit 0", "entropy", (0.1,))  # 70 leave, all right: 90% + 0
    # the final exit has 90% on validation: within 0.5 points, `everyone` (70%) is out and `confident` is fastest
    assert fastest_within([never, everyone, confident], val, 0.5, macs, per_sample) == confident
    assert fastest_within([never, everyone], val, 0.5, macs, per_sample) == never
    assert fastest_within([never, everyone, confident], val, 25, macs, per_sample) == everyone


@pytest.mark.parametrize("name", sorted(p.stem for p in BENCHMARKS.glob("*.py")))
def test_every_benchmark_imports(name):
    pytest.importorskip("fastapi")  # the serving benchmarks import the serve extra's modules
    pytest.importorskip("onnxruntime")
    load_benchmark(name)


def test_serve_parts_free_model_is_served_by_the_app():
    """serve_parts times the app's event loop over its own cost-free runner: that runner must stay one the app takes."""
    pytest.importorskip("fastapi")
    simplejpeg = pytest.importorskip("simplejpeg")
    serve_parts = load_benchmark("serve_parts")
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    cpu, wall = serve_parts.loop_cpu_per_request([simplejpeg.encode_jpeg(pixels)], 20, 4)  # raises unless all 200
    assert 0 < cpu and 0 < wall


def test_byom_benchmarks_print_a_cards_heads_and_the_training_probe():
    """What the bring-your-own-model benchmarks print of an attached model's card and the training precision probe:
    frozen records read by attribute (a card's heads were once dicts), as `exitwise attach` writes them."""
    from exitwise.models import HeadReport
    from exitwise.refs import TrainPrecisionProbe
    heads = [HeadReport("layer1", 1_000, 40_000, 0.025, "conv"), HeadReport("layer2", 500, 50_000, 0.01, "gap")]
    assert load_benchmark("byom_resnet18").head_line(heads[0]) == \
        "  head after layer1 (conv): 1,000 MACs (2.5% of its stage)"
    assert load_benchmark("byom_heads").head_costs(heads) == "1,000 (2.5%), 500 (1.0%)"
    probe = TrainPrecisionProbe("fp32", {"fp32": 1.5, "bf16": 3.25}, 64)
    assert load_benchmark("head_designs").probe_times(probe) == "fp32 1.50, bf16 3.25"

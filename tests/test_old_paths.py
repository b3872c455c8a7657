"""The import paths of the previous release keep working for one more: each old module re-exports its new home's
public names (the same objects) and warns, naming the new home, that it goes; the package itself imports none of
them (tests/test_layers.py)."""
import importlib
import sys
import warnings

import pytest

MOVED = {"byom": ["models.attach"], "costs": ["models.costs"], "hardware": ["config", "device", "tune"],
         "analysis": ["study.analysis"], "calibration": ["study.calibration"], "frontiers": ["study.frontiers"],
         "results": ["study.results"], "report": ["study.report"], "logits_cache": ["study.logits_cache"],
         "onnx_runtime": ["deploy.onnx_runtime", "exit_rule"], "predict": ["deploy.predict"]}


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_path_re_exports_its_new_home(old):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        shim = importlib.import_module(f"exitwise.{old}")
    assert "kept for one release" in shim.__doc__
    for new in MOVED[old]:
        module = importlib.import_module(f"exitwise.{new}")
        public = [n for n, v in vars(module).items() if not n.startswith("_") and getattr(v, "__module__", None)
                  == module.__name__]  # what the new module defines
        assert public and all(getattr(shim, n) is getattr(module, n) for n in public)


@pytest.mark.parametrize("old", sorted(MOVED))
def test_importing_an_old_path_warns_where_it_moved(old, monkeypatch):
    monkeypatch.delitem(sys.modules, f"exitwise.{old}", raising=False)  # a module warns when it runs: the first import
    with pytest.warns(DeprecationWarning, match=f"exitwise.{old} moved to .*exitwise.{MOVED[old][-1]}") as caught:
        __import__(f"exitwise.{old}")  # as an `import` statement does
    assert caught[0].filename == __file__  # the warning points at the line that imported the old path


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_the_old_names_people_used_still_resolve():
    from exitwise.analysis import as_thresholds, exit_points, leaves  # noqa: F401
    from exitwise.hardware import DEFAULT_MICRO_BATCH, machine, resolve_device, tune  # noqa: F401
    from exitwise.onnx_runtime import OnnxEarlyExit, Policy, entropy, softmax  # noqa: F401
    from exitwise.study import StudyConfig, analyse, measure, run_study, timing_subset  # noqa: F401
    from exitwise.train import TrainConfig  # noqa: F401
    from exitwise.api import load_model  # noqa: F401

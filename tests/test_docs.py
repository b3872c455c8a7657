"""The docs' Python runs as written: docs/python-api.md's example on the digits set in a folder of its own, then
docs/tiers.md's on what that one wrote (its folder names linked to those)."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import random_image_set

ROOT = Path(__file__).resolve().parents[1]


def python_block(doc: str) -> str:
    return re.search(r"```python\n(.*?)```", (ROOT / "docs" / doc).read_text(), re.S).group(1)


def run(code: str, where: Path) -> None:
    done = subprocess.run([sys.executable, "-c", code], cwd=where, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin", "HOME": str(where)})
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_python_api_and_tiers_pages_run_as_written(tmp_path):
    for module in ("onnxruntime", "onnxscript", "fastapi", "uvicorn"):  # export; measure_tier times a real server
        pytest.importorskip(module)
    (tmp_path / "images").mkdir()
    for i, pixels in enumerate(random_image_set(3, seed=2).images.numpy()):  # digits are 8x8 grayscale
        Image.fromarray(pixels[..., 0]).save(tmp_path / "images" / f"{i}.png")
    run(python_block("python-api.md"), tmp_path)
    for written in ("st/results.json", "cal/calibration.json", "onnx/manifest.json"):
        assert (tmp_path / written).is_file()
    for name, target in (("study", "st"), ("model-onnx", "onnx"), ("val-images", "images")):
        (tmp_path / name).symlink_to(tmp_path / target)
    run(python_block("tiers.md"), tmp_path)

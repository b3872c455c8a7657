"""The docs' code runs as written: docs/python-api.md's example, on the digits set, in a folder of its own."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import random_image_set

ROOT = Path(__file__).resolve().parents[1]


def test_the_python_api_page_runs_as_written(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    code = re.search(r"```python\n(.*?)```", (ROOT / "docs" / "python-api.md").read_text(), re.S).group(1)
    (tmp_path / "images").mkdir()
    for i, pixels in enumerate(random_image_set(3, seed=2).images.numpy()):  # digits are 8x8 grayscale
        Image.fromarray(pixels[..., 0]).save(tmp_path / "images" / f"{i}.png")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-2000:]
    for written in ("st/results.json", "cal/calibration.json", "onnx/manifest.json"):
        assert (tmp_path / written).is_file()

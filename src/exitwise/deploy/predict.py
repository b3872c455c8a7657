"""`exitwise predict`: classify image files with an ONNX export, without torch (see `exitwise.onnx_runtime`)."""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..errors import UserError
from ..images import read_images
from ..io import atomic_write_json, atomic_write_text
from .onnx_runtime import OnnxEarlyExit

OUTPUT_SUFFIXES = (".csv", ".json")
FIELDS = ("image", "class", "class_index", "probability", "exit")


@dataclass(frozen=True)
class ImagePrediction:
    """One image's answer: its class at the exit it took (0 = first) and that class's softmax probability there."""
    image: str
    label: str          # the class name (its index, as text, when the export has none); "class" in the files
    class_index: int
    probability: float  # rounded to 6 places, as written
    exit: int

    def to_json(self) -> dict:
        """A row of the CSV or JSON output (`FIELDS`), as `/v1/predict` answers too."""
        return {"image": self.image, "class": self.label, "class_index": self.class_index,
                "probability": self.probability, "exit": self.exit}


def predict(export: str | Path, paths: Sequence[str | Path], *, batch_size: int = 256,
            progress: bool = True) -> list[ImagePrediction]:
    """One answer per image (files, folders, .tar.gz), in the order read."""
    runner = OnnxEarlyExit.load(export)
    names, images = read_images(paths, runner.input_shape, progress=progress)
    result = runner.run(images, batch_size=batch_size, progress=progress)
    classes = runner.class_names
    return [ImagePrediction(name, classes[c] if classes else str(c), int(c), round(float(p), 6), int(e))
            for name, c, p, e in zip(names, result.predictions, result.probabilities, result.exits)]


def check_output(path: str | Path) -> None:
    """Refuse an output file whose format is unknown, before any work."""
    if Path(path).suffix.lower() not in OUTPUT_SUFFIXES:
        raise UserError(f"--out {str(path)!r}: write predictions to a .csv or .json file")


def write_predictions(rows: Sequence[ImagePrediction], path: str | Path) -> None:
    """`rows` as CSV or JSON (by the suffix), written atomically."""
    check_output(path)
    if Path(path).suffix.lower() == ".json":
        atomic_write_json(path, [r.to_json() for r in rows])
        return
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(r.to_json() for r in rows)
    atomic_write_text(path, text.getvalue())


def format_predictions(rows: Sequence[ImagePrediction]) -> str:
    """A table for the terminal: image, class, probability, exit."""
    width = max([len("image")] + [len(r.image) for r in rows])
    lines = [f"{'image':{width}s}  {'class':12s} {'prob':>7s}  exit"]
    lines += [f"{r.image:{width}s}  {r.label:12s} {r.probability:7.4f}  {r.exit}" for r in rows]
    return "\n".join(lines)

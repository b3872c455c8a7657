"""`exitwise predict`: classify image files with an ONNX export, without torch (see `exitwise.onnx_runtime`)."""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Sequence

from ..errors import UserError
from ..images import read_images
from ..io import atomic_write_json, atomic_write_text, check_writable_file
from .oip import PREDICTION_FIELDS as FIELDS, ImagePrediction
from .onnx_runtime import OnnxEarlyExit

OUTPUT_SUFFIXES = (".csv", ".json")


def predict(export: str | Path, paths: Sequence[str | Path], *, batch_size: int = 256,
            progress: bool = True) -> list[ImagePrediction]:
    """One answer per image (files, folders, .tar.gz), in the order read."""
    runner = OnnxEarlyExit.load(export)
    names, images = read_images(paths, runner.input_shape, progress=progress)
    result = runner.run(images, batch_size=batch_size, progress=progress)
    return [ImagePrediction.of(name, c, p, e, runner.class_names)
            for name, c, p, e in zip(names, result.predictions, result.probabilities, result.exits)]


def check_output(path: str | Path) -> None:
    """Refuse an output file whose format is unknown, or that cannot be written, before any work."""
    if Path(path).suffix.lower() not in OUTPUT_SUFFIXES:
        raise UserError(f"--out {str(path)!r}: write predictions to a .csv or .json file")
    check_writable_file(path, "--out")


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

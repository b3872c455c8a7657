"""An ONNX export's `manifest.json` (`exitwise.onnx-export/1`) as a frozen dataclass: what each graph is, the input
the graphs take, the exit setting, and the SHA-256 of every graph and of the manifest itself (docs/deploy.md).
`export.export_onnx` writes one; `read_manifest` reads one, refused in one line when it or a graph was changed.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import UserError
from ..io import file_sha256, read_format_json
from ..records import Thresholds, from_json, to_json
from ..refs import MicroBatchProbe

FORMAT = "exitwise.onnx-export/1"
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Graph:
    """One stage's or head's graph: input "x", output "y", a dynamic batch."""
    file: str
    exporter: str                       # "dynamo" or "torchscript"
    macs: int                           # per sample
    max_error: float                    # |onnxruntime - torch| on the export's check, relative to the output's scale
    output_shape: tuple[str | int, ...]  # ("batch", C, H, W)
    sha256: str


@dataclass(frozen=True)
class Normalization:
    """The input normalization inside stage 0 (the graphs take [0, 1] pixels)."""
    mean: tuple[float, ...]
    std: tuple[float, ...]
    where: str


@dataclass(frozen=True)
class InputSpec:
    """What stage 0 takes."""
    name: str
    shape: tuple[str | int, ...]        # ("batch", C, H, W)
    dtype: str
    layout: str
    range: tuple[float, float]
    pixels: str                         # how uint8 pixels become the input
    normalization: Normalization | None = None


@dataclass(frozen=True)
class ExportCheck:
    """How each graph was checked against torch before it was written."""
    rows: int
    max_error_allowed: float
    error: str                          # what `Graph.max_error` measures


@dataclass(frozen=True)
class Manifest:
    """manifest.json, key for key (docs/deploy.md says what each holds)."""
    format: str
    exitwise_version: str
    torch_version: str
    created: str                        # UTC, ISO 8601
    model: str                          # the registered name, or the attached folder's path
    source_weights_sha256: str | None
    input: InputSpec
    num_classes: int
    policy: str
    thresholds: Thresholds              # one per side exit; -inf (null): never leave there
    opset: int
    check: ExportCheck
    exit_macs: tuple[int, ...]          # cumulative, per sample leaving at each exit
    stages: tuple[Graph, ...]
    heads: tuple[Graph, ...]
    manifest_sha256: str                # of every other key, canonical JSON (`manifest_digest`)
    class_names: tuple[str, ...] | None = None
    temperatures: tuple[float, ...] | None = None
    micro_batch: int | None = None      # measured fastest where it was exported (None: an export from before)
    micro_batch_probe: MicroBatchProbe | None = None

    def graphs(self) -> tuple[Graph, ...]:
        return self.stages + self.heads

    def to_json(self) -> dict:
        return to_json(self)

    @classmethod
    def from_json(cls, doc: dict) -> Manifest:
        return from_json(cls, doc)

    def sealed(self) -> Manifest:
        """This manifest with its own digest filled in."""
        return replace(self, manifest_sha256=manifest_digest(self.to_json()))


def manifest_digest(doc: dict) -> str:
    """SHA-256 of a manifest's content (every key but `manifest_sha256`), canonical JSON."""
    body = {k: v for k, v in doc.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, allow_nan=False).encode()).hexdigest()


def read_manifest(folder: str | Path) -> Manifest:
    """The manifest of an export, refused (UserError) when missing, edited, or when a graph is missing or changed."""
    folder = Path(folder)
    path = folder / MANIFEST
    doc = read_format_json(path, FORMAT, "ONNX export manifest",
                           missing=f"{str(folder)!r} is not an exitwise ONNX export: no {MANIFEST}")
    if doc.get("manifest_sha256") != manifest_digest(doc):
        raise UserError(f"{str(path)!r} was changed after export (its SHA-256 differs): export again")
    try:
        manifest = Manifest.from_json(doc)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{str(path)!r} is not a complete ONNX export manifest ({type(e).__name__}: {e})") from None
    for graph in manifest.graphs():
        file = folder / graph.file
        if not file.is_file():
            raise UserError(f"graph {str(file)!r} named by the manifest is missing")
        if file_sha256(file) != graph.sha256:
            raise UserError(f"graph {str(file)!r} was changed after export (its SHA-256 differs from the manifest's)")
    return manifest

"""`exitwise export`: an EarlyExitModel as one ONNX graph per stage and per head, plus manifest.json.

Separate graphs are what let exits skip work outside torch: `exitwise.deploy.onnx_runtime` runs a stage only
for the samples still in (an ONNX `If` branches once per batch, not per sample). Each graph takes a
dynamic batch and comes from the fp32 inference copy (`runtime.prepare`: batch norms folded). Each is
checked against torch on ONNX Runtime before anything is written; the folder is written all or nothing.
"""
from __future__ import annotations

import hashlib
import io
import logging
import re
import warnings
from contextlib import contextmanager, redirect_stdout
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from .config import __version__, check_micro_batch
from .models.costs import exit_macs_of, stage_and_head_macs
from .early_exit import EarlyExitModel
from .errors import UserError, first_line
from .io import atomic_write_bytes, atomic_write_json, staged_output
from .refs import MicroBatchProbe
from .deploy.manifest import FORMAT, MANIFEST, ExportCheck, Graph, InputSpec, Manifest, Normalization

OPSET = 18
CHECK_ROWS = 5     # rows of the numerical check (not the export's example batch size, so the batch is dynamic)
MAX_ERROR = 1e-3   # largest |onnx - torch| allowed, relative to the largest |torch| output (at least 1)


EXPORTERS = ("dynamo", "torchscript")


@contextmanager
def _quiet():
    """The exporters print progress, warnings and log lines (e.g. about torchvision): keep them off the terminal."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _onnx_bytes(module: torch.nn.Module, example: torch.Tensor, exporter: str) -> tuple[bytes, str]:
    """The module as one ONNX graph (input "x", output "y", dynamic batch) and the exporter that made it:
    torch's dynamo exporter (falling back to the TorchScript one where it fails), or the TorchScript one."""
    errors = []
    for name in EXPORTERS[EXPORTERS.index(exporter):]:
        buffer = io.BytesIO()
        try:
            with _quiet():
                if name == "dynamo":
                    program = torch.onnx.export(module, (example,), dynamo=True, input_names=["x"],
                                                output_names=["y"], opset_version=OPSET, verbose=False,
                                                dynamic_shapes=({0: torch.export.Dim("batch")},))
                    program.save(buffer, external_data=False)
                else:
                    torch.onnx.export(module, (example,), buffer, dynamo=False, input_names=["x"], output_names=["y"],
                                      opset_version=OPSET, dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
            return buffer.getvalue(), name
        except Exception as e:  # each exporter fails in its own ways on modules it cannot trace
            errors.append(f"{name}: {first_line(e)}")
    raise UserError(f"cannot export {type(module).__name__} to ONNX ({'; '.join(errors)})")


def _max_error(graph: bytes, module: torch.nn.Module, x: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Largest |ONNX Runtime - torch| of the graph on `x` (relative to the output's scale), and torch's output."""
    import onnxruntime as ort
    with torch.inference_mode():
        expected = module(x).float()
    session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x.contiguous().numpy()})[0]
    scale = max(1.0, float(expected.abs().max()))
    return float(np.abs(got - expected.numpy()).max()) / scale, expected


def _normalization(model: EarlyExitModel) -> Normalization | None:
    """The input normalization inside the first stage (exitwise models take [0, 1] pixels), if any."""
    from .models.resnet import Normalize
    found = [m for m in model.network.stages[0].modules() if isinstance(m, Normalize)]
    if not found:
        return None
    return Normalization(tuple(found[0].mean.flatten().tolist()), tuple(found[0].std.flatten().tolist()),
                         "inside stage 0: feed [0, 1] pixels, not normalized ones")


def _measured_micro_batch(network: torch.nn.Module, images: int = 256) -> tuple[int, MicroBatchProbe]:
    """The micro-batch `tune` measures fastest here for the fp32 network, on random images of its input shape (a
    dense network's time does not depend on pixel values), and the probe's evidence."""
    from .data import ImageSet
    from .tune import tune
    c, h, w = network.input_shape
    pixels = torch.randint(0, 256, (images, h, w, c), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    data = ImageSet.from_tensors(pixels, torch.zeros(images, dtype=torch.long))
    tuned = tune(network, data, "fp32", None, torch.device("cpu"), images, check_images=0)
    return tuned.micro_batch, tuned.micro_batch_probe


def export_onnx(model: EarlyExitModel, out: str | Path, *, weights_sha256: str | None = None,
                exporter: str = "dynamo", micro_batch: int | None = None) -> Manifest:
    """Write `out`/stage{k}.onnx, head{k}.onnx and manifest.json (`deploy.manifest`); return the manifest.

    `exporter`: "dynamo" (torch.export; modules it cannot take fall back to "torchscript") or "torchscript".
    Refuses (UserError, nothing written) a policy without a numpy score (the runner has no torch), and a graph
    whose output on ONNX Runtime differs from torch's by more than MAX_ERROR of the output's scale. The manifest
    records the micro-batch the runner uses: `micro_batch`, or the one `tune` measures fastest here in fp32."""
    if model.policy.numpy is None:
        raise UserError(f"exit policy {model.policy.name!r} has no numpy score, so ONNX Runtime cannot run it: "
                        f"register it with numpy=exit_rule.NumpyScore(...)")
    check_micro_batch(micro_batch)
    try:
        import onnx  # noqa: F401  (the dynamo exporter needs onnx and onnxscript)
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise UserError(f"exitwise export needs the onnx extra ({e.name} is missing): pip install 'exitwise[onnx]'") \
            from None
    if exporter not in EXPORTERS:
        raise UserError(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    from .runtime import prepare
    net = prepare(model.network, "fp32")
    micro_batch, probe = (micro_batch, None) if micro_batch is not None else _measured_micro_batch(model.network)
    stage_macs, head_macs = stage_and_head_macs(model.network)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, *net.input_shape, generator=g)  # example batch for tracing (batch 2: not specialized as 1)
    check = torch.rand(CHECK_ROWS, *net.input_shape, generator=g)
    graphs: dict[str, bytes] = {}
    entries: dict[str, list[Graph]] = {"stage": [], "head": []}
    for k in range(net.num_exits):
        for kind, module, macs in (("stage", net.stages[k], stage_macs[k]), ("head", net.heads[k], head_macs[k])):
            graph, used = _onnx_bytes(module, x, exporter)
            error, output = _max_error(graph, module, check)
            if not error <= MAX_ERROR:
                raise UserError(f"{kind} {k} differs between ONNX Runtime and torch by {error:.2g} of its scale "
                                f"(more than {MAX_ERROR:g}); not exported")
            name = f"{kind}{k}.onnx"
            graphs[name] = graph
            entries[kind].append(Graph(name, used, macs, error, ("batch", *output.shape[1:]),
                                       hashlib.sha256(graph).hexdigest()))
            if kind == "stage":
                with torch.no_grad():  # not inference_mode: the exporters refuse inference tensors
                    x, check = module(x).float(), output
    manifest = Manifest(
        format=FORMAT, exitwise_version=__version__, torch_version=torch.__version__,
        created=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        model=model.model_name, source_weights_sha256=weights_sha256,
        input=InputSpec("x", ("batch", *net.input_shape), "float32", "NCHW", (0.0, 1.0),
                        "uint8 RGB (1 channel: grayscale) divided by 255", _normalization(model)),
        num_classes=net.num_classes, policy=model.policy.name, thresholds=tuple(float(t) for t in model.thresholds),
        opset=OPSET, check=ExportCheck(CHECK_ROWS, MAX_ERROR,
                                       "max |onnxruntime - torch| / max(1, max |torch|) on uniform [0, 1] inputs"),
        exit_macs=tuple(exit_macs_of(stage_macs, head_macs)),
        stages=tuple(entries["stage"]), heads=tuple(entries["head"]), manifest_sha256="",
        class_names=tuple(model.class_names) if model.class_names else None,
        temperatures=None if model.policy.temperatures is None else tuple(map(float, model.policy.temperatures)),
        micro_batch=micro_batch, micro_batch_probe=probe).sealed()
    earlier = _graph_files(out) if (Path(out) / MANIFEST).is_file() else set()  # an earlier export's, replaced
    with staged_output(out) as stage:
        for name, graph in graphs.items():
            atomic_write_bytes(stage / name, graph)
        atomic_write_json(stage / MANIFEST, manifest.to_json())
    for name in earlier - set(graphs):  # a larger model's stage3.onnx, say: not left beside a manifest without it
        (Path(out) / name).unlink(missing_ok=True)
    return manifest


def _graph_files(folder: str | Path) -> set[str]:
    return {p.name for p in Path(folder).glob("*.onnx") if re.fullmatch(r"(stage|head)\d+\.onnx", p.name)}


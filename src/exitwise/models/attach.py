"""Bring your own model: cut any traceable PyTorch network into stages at named submodules, put an exit on each cut.

`attach(model, exits=["layer1", "layer2"], num_classes=10, input_shape=(3, 32, 32))` traces the model's forward
with `torch.fx`, or, where fx cannot (a forward that branches on its input, as Hugging Face models do), with
`torch.export` (its graph is specialised to eval mode and holds copies of the parameters). It finds the value each
named submodule returns and splits the graph there: stage k runs from cut k-1 to cut k, the last stage from the
last cut to the model's logits. A cut is possible only where the cut module's output is the one value that
crosses it: a skip connection, a value read from the input or any other tensor made before the cut and used after
it is refused, naming the module. Values that do not depend on the input (parameters, constants, and with
torch.export shapes made from the batch size) are recomputed in every stage that uses them. The final exit runs
exactly the model's own operations, so its logits equal the model's bit for bit; its head is the identity.

Models whose forward returns a dict or a Hugging Face `ModelOutput` end at its `"logits"` entry (or the entry
named by `output_key`); a tuple ends at its first element. A cut module that returns a tuple is cut at its
first element.
"""
from __future__ import annotations

import importlib.util
import inspect
import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from .costs import head_report, module_macs
from .. import records
from ..config import as_tuple
from ..errors import UserError, first_line
from ..io import file_sha256
from .weights import check_state_fits, read_state_dict, weight_files
from .base import MultiExitNetwork
from .heads import HeadFactory, check_head_options, default_head_factory, map_head_kind

OUTPUT_KEY = "logits"


class _CutTracer(fx.Tracer):
    """fx's tracer that remembers the value each exit module returns (it traces through them, as usual)."""

    def __init__(self, exits: Sequence[str]):
        super().__init__()
        self.exits = set(exits)
        self.outputs: dict[str, list[Any]] = {name: [] for name in exits}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        """As fx decides, except that a module holding an exit module is traced through to reach it."""
        return super().is_leaf_module(m, qualname) and not any(e.startswith(qualname + ".") for e in self.exits)

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        if isinstance(m, nn.TransformerEncoder) and len(args) == 1 and all(v is None for v in kwargs.values()):
            forward = partial(_encoder_layers, m)  # its forward branches on its input; without masks it is this
        out = super().call_module(m, forward, args, kwargs)
        name = self.path_of_module(m)
        if name in self.exits:
            self.outputs[name].append(out)
        return out


def _encoder_layers(encoder: nn.TransformerEncoder, x: torch.Tensor) -> torch.Tensor:
    """nn.TransformerEncoder's forward without masks: each layer in turn, then the norm."""
    for layer in encoder.layers:
        x = layer(x)
    return x if encoder.norm is None else encoder.norm(x)


class Traced(NamedTuple):
    """A traced forward: the module its graph's attributes live in, the graph, each exit's output node, the logits."""
    root: nn.Module
    graph: fx.Graph
    cuts: dict[str, fx.Node]
    logits: fx.Node


def trace(model: nn.Module, exits: Sequence[str], input_shape: Sequence[int],
          output_key: str | None = None) -> Traced:
    """The model's forward graph from torch.fx's symbolic tracing or, where that fails (forward branches on its
    input, as Hugging Face models do), from torch.export on a (2, *input_shape) input with a dynamic batch."""
    try:
        return _fx_trace(model, exits, output_key)
    except UserError:
        raise
    except Exception as e:  # fx raises many types for code it cannot trace
        fx_error = e
    try:
        return _export_trace(model, exits, input_shape, output_key)
    except UserError:
        raise
    except Exception as e:  # torch.export raises many types for code it cannot capture
        raise UserError(f"cannot trace {type(model).__name__}'s forward: torch.fx: {first_line(fx_error)}; "
                        f"torch.export: {type(e).__name__}: {first_line(e)}") from None


def _fx_trace(model: nn.Module, exits: Sequence[str], output_key: str | None) -> Traced:
    tracer = _CutTracer(exits)
    params = list(inspect.signature(model.forward).parameters.values())
    if not params:
        raise UserError(f"{type(model).__name__}.forward takes no input")
    concrete = {p.name: p.default for p in params[1:] if p.default is not inspect.Parameter.empty}
    graph = tracer.trace(model, concrete_args=concrete or None)
    cuts = {}
    for name in exits:
        outs = tracer.outputs[name]
        if len(outs) != 1:
            raise UserError(f"exit module {name!r} runs {len(outs)} times in forward; cut at a module that runs once")
        out = outs[0]
        if isinstance(out, (tuple, list)) and out:
            out = out[0]
        if not isinstance(out, fx.Proxy):
            raise UserError(f"exit module {name!r} returns {type(out).__name__}, not a tensor: cut at a module "
                            f"that returns one")
        cuts[name] = out.node
    output = next(n for n in graph.nodes if n.op == "output").args[0]
    return Traced(model, graph, cuts, _logits(output, output_key))


def _export_trace(model: nn.Module, exits: Sequence[str], input_shape: Sequence[int],
                  output_key: str | None) -> Traced:
    """torch.export in eval mode (the graph is specialised to it), each exit module's call signature preserved."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        ep = torch.export.export(model.eval(), (torch.zeros(2, *input_shape),),
                                 dynamic_shapes=({0: torch.export.Dim.DYNAMIC},),
                                 preserve_module_call_signature=tuple(exits), strict=False)
    finally:
        for m, mode in modes:
            m.training = mode
    root = ep.module()
    nodes = {n.name: n for n in root.graph.nodes}
    calls = [e.fqn for e in ep.module_call_graph]
    cuts = {}
    for name in exits:
        runs = sum(1 for fqn in calls if fqn.split("@")[0] == name)
        if runs != 1:
            raise UserError(f"exit module {name!r} runs {runs} times in forward; cut at a module that runs once")
        outputs = next(e for e in ep.module_call_graph if e.fqn == name).signature.outputs
        if not outputs or not isinstance(outputs[0], torch.export.graph_signature.TensorArgument):
            raise UserError(f"exit module {name!r} does not return a tensor: cut at a module that returns one")
        cuts[name] = nodes[outputs[0].name]
    leaves = next(n for n in root.graph.nodes if n.op == "output").args[0]
    structure = pytree.tree_unflatten(list(leaves), ep.call_spec.out_spec)
    return Traced(root, root.graph, cuts, _logits(structure, output_key))


def _logits(out: Any, output_key: str | None) -> fx.Node:
    """The node of the model's logits: the output itself, a tuple's first element, or a dict's `output_key`."""
    if isinstance(out, dict) or hasattr(out, "keys"):
        key = output_key or OUTPUT_KEY
        if key not in out.keys():
            raise UserError(f"the model returns a dict with keys {', '.join(map(repr, out.keys()))}; "
                            f"name its logits with output_key (--output-key)")
        out = out[key]
    elif isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, fx.Node):
        raise UserError("the model's output does not depend on its input")
    return out


def _batch_sizes(graph: fx.Graph) -> set[fx.Node]:
    """torch.export's reads of the input's batch size: every stage can read it from its own input instead."""
    first = next(n for n in graph.nodes if n.op == "placeholder")
    return {n for n in graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.sym_size.int
            and n.args == (first, 0)}


def _depends_on_input(graph: fx.Graph, batch_sizes: set[fx.Node]) -> set[fx.Node]:
    """Nodes computed from a placeholder other than through its batch size; the others (parameters, constants,
    shapes made from the batch size) can be recomputed in any stage."""
    dependent: set[fx.Node] = set()
    for node in graph.nodes:
        if node in batch_sizes:
            continue
        if node.op == "placeholder" or any(a in dependent for a in node.all_input_nodes):
            dependent.add(node)
    return dependent


def _stage(root: nn.Module, nodes: list[fx.Node], inputs: dict[fx.Node, str], out: fx.Node,
           constant: Callable[[fx.Node], bool], batch_sizes: set[fx.Node]) -> fx.GraphModule:
    """A GraphModule of `nodes` that takes `inputs` (each a placeholder) and returns `out`."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {n: graph.placeholder(name) for n, name in inputs.items()}
    x = next(iter(env.values()))

    def lookup(n: fx.Node) -> fx.Node:
        if n not in env:
            if n in batch_sizes:
                env[n] = graph.call_function(torch.ops.aten.sym_size.int, (x, 0))
            elif constant(n):
                env[n] = graph.node_copy(n, lookup)
            else:
                raise AssertionError(f"{n} crosses a cut")  # excluded by the check in `split`
        return env[n]
    for n in nodes:
        if n not in env and n.op not in ("placeholder", "output"):
            env[n] = graph.node_copy(n, lookup)
    graph.output(lookup(out))
    _follow_input_device(graph, x)
    module = fx.GraphModule(root, graph)
    module.graph.eliminate_dead_code()
    module.graph.lint()
    module.recompile()
    return module


def _follow_input_device(graph: fx.Graph, x: fx.Node) -> None:
    """Ops that make tensors (`arange` for position ids) on the device the graph was traced on, torch.export writes
    it in: make them on the stage input's device, so the stage runs on a GPU too."""
    made = [n for n in graph.nodes if isinstance(n.kwargs.get("device"), torch.device)]
    if made:
        with graph.inserting_after(list(graph.find_nodes(op="placeholder"))[-1]):
            device = graph.call_function(getattr, (x, "device"))
        for n in made:
            n.kwargs = {**n.kwargs, "device": device}


def split(model: nn.Module, exits: Sequence[str], input_shape: Sequence[int],
          output_key: str | None = None) -> list[fx.GraphModule]:
    """The model as len(exits) + 1 stages: stage k ends at exit module k's output, the last at the model's logits."""
    exits = list(exits)
    modules = dict(model.named_modules())
    for name in exits:
        if not name or name not in modules:
            close = [m for m in modules if m and m.split(".")[-1] == name.split(".")[-1]][:3]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise UserError(f"{name!r} is not a submodule of {type(model).__name__}{hint}")
    if len(set(exits)) != len(exits):
        raise UserError(f"exit modules are named more than once: {', '.join(exits)}")
    root, graph, cuts, output = trace(model, exits, input_shape, output_key)
    order = {n: i for i, n in enumerate(graph.nodes)}
    positions = [order[cuts[name]] for name in exits]
    for (a, pa), (b, pb) in zip(zip(exits, positions), zip(exits[1:], positions[1:])):
        if pb <= pa:
            raise UserError(f"exits out of forward order: {b!r} does not run after {a!r}"
                            + (" (they end at the same value)" if pa == pb else ""))
    if positions and positions[-1] >= order[output]:
        raise UserError(f"exit module {exits[-1]!r} runs after the model's logits are computed")
    batch_sizes = _batch_sizes(graph)
    dependent = _depends_on_input(graph, batch_sizes)
    nodes = list(graph.nodes)
    for name, p in zip(exits, positions):
        crossing = [n for n in nodes[:p + 1] if n in dependent and any(order[u] > p for u in n.users)]
        others = [n for n in crossing if n is not cuts[name]]
        if others:
            what = ", ".join(_describe(n) for n in others[:3])
            raise UserError(f"cannot cut after {name!r}: besides its output, {what} made before it "
                            f"{'is' if len(others) == 1 else 'are'} used after it (a skip connection or another "
                            f"value crosses the cut)")
        if cuts[name] not in crossing:
            raise UserError(f"cannot cut after {name!r}: the model's logits do not depend on its output")
    bounds = [-1] + positions + [order[output]]
    placeholders = [n for n in nodes if n.op == "placeholder"]
    constant = lambda n: n not in dependent  # noqa: E731
    stages = []
    for k in range(len(bounds) - 1):
        inputs = {placeholders[0]: "x"} if k == 0 else {cuts[exits[k - 1]]: "x"}
        if k == 0:
            inputs.update({p: p.name for p in placeholders[1:]})
        stages.append(_stage(root, nodes[bounds[k] + 1:bounds[k + 1] + 1], inputs,
                             cuts[exits[k]] if k < len(exits) else output, constant, batch_sizes))
    return stages


def _describe(node: fx.Node) -> str:
    if node.op == "placeholder":
        return f"the input {node.target!r}"
    if node.op == "call_module":
        return f"the output of {node.target!r}"
    return f"{node.name!r} ({getattr(node.target, '__name__', node.target)})"


@torch.no_grad()
def _run_in_eval(module: nn.Module, x: torch.Tensor, fails: str) -> Any:
    """`module(x)` in eval mode, each of the user's modules left in the mode it was in; an exception is `fails`
    (what did not run on what) in one line."""
    modes = [(m, m.training) for m in module.modules()]
    try:
        return module.eval()(x)
    except Exception as e:  # the user's code can raise anything; most often, it takes other inputs
        raise UserError(f"{fails}: {type(e).__name__}: {first_line(e)}") from None
    finally:
        for m, mode in modes:
            m.training = mode


def feature_shapes(stages: Sequence[nn.Module], input_shape: Sequence[int]) -> list[tuple[int, ...]]:
    """Each stage's output shape for one sample (run on a zero input in eval mode)."""
    x, shapes = torch.zeros(1, *input_shape), []
    for stage in stages:
        x = _run_in_eval(stage, x, f"the model does not run on {'x'.join(map(str, input_shape))} images")
        if not isinstance(x, torch.Tensor):
            raise UserError(f"a cut yields {type(x).__name__}, not a tensor")
        shapes.append(tuple(x.shape[1:]))
    return shapes


def _check_head(k: int, head: Any, shape: tuple[int, ...], num_classes: int) -> None:
    """Refuse a head from the user's `head_factory` that does not map exit k's features to (num_classes,) logits
    (a wrong one would otherwise run, scoring and predicting from whatever it gives)."""
    if not isinstance(head, nn.Module):
        raise UserError(f"head_factory returned {type(head).__name__} for exit {k}, not a torch.nn.Module")
    out = _run_in_eval(head, torch.zeros(1, *shape), f"exit {k}'s head does not run on its {shape} features")
    got = tuple(out.shape[1:]) if isinstance(out, torch.Tensor) else type(out).__name__
    if got != (num_classes,):
        raise UserError(f"exit {k}'s head from head_factory gives {got} per sample, not ({num_classes},) logits")


def attach(model: nn.Module, exits: Sequence[str], num_classes: int, input_shape: Sequence[int], *,
           head_factory: HeadFactory | None = None, max_head_fraction: float = 0.25, token_pool: str = "mean",
           head: str | Sequence[str] = "auto", output_key: str | None = None, warn: bool = True) -> MultiExitNetwork:
    """`model` as a multi-exit network with an exit after each module named in `exits` (dotted paths, in forward order).

    Heads come from `head_factory(feature_shape, num_classes, budget_macs)` (default: `models.heads`, with token
    features pooled by `token_pool` and maps given heads of kind `head`, one for all exits or one per exit: auto,
    conv-pool, conv, pool or gap), the budget being `max_head_fraction` of the MACs of the stage the head follows; a
    head over it is warned about unless `warn` is False (`costs.head_report` lists every head's cost). The kinds
    `auto` resolved to are kept in `network.head_kinds` (None for a head from `head_factory` or for non-map
    features), so a later rebuild makes the same heads. The final exit is the model itself: the same operations,
    the same logits. The model's parameters are shared, not copied.
    """
    exits = as_tuple(exits, "exits")
    if not exits:
        raise UserError("name at least one exit module")
    if not 0 < max_head_fraction:
        raise UserError(f"the head budget must be a positive fraction of a stage, got {max_head_fraction}")
    stages = split(model, exits, input_shape, output_key)
    shapes = feature_shapes(stages, input_shape)
    if shapes[-1] != (num_classes,):
        raise UserError(f"the model's output is {shapes[-1]} per sample, not ({num_classes},) logits: "
                        f"check num_classes (or output_key)")
    kinds = [head] if isinstance(head, str) else list(head)
    kinds = kinds * len(exits) if len(kinds) == 1 else kinds
    if len(kinds) != len(exits):
        raise UserError(f"{len(kinds)} head kinds for {len(exits)} exits: give one kind, or one per exit")
    inputs = [tuple(input_shape)] + shapes[:-1]
    budgets = [max_head_fraction * module_macs(stage, (1, *inp)) for stage, inp in zip(stages, inputs)]
    if head_factory is None:
        check_head_options(token_pool, kinds)
        kinds = [map_head_kind(shape, num_classes, budget, kind) if len(shape) == 3 else None
                 for shape, budget, kind in zip(shapes[:-1], budgets, kinds)]
        heads = [default_head_factory(shape, num_classes, budget, token_pool, kind or "auto")
                 for shape, budget, kind in zip(shapes[:-1], budgets, kinds)]
    else:
        heads = [head_factory(shape, num_classes, budget) for shape, budget in zip(shapes[:-1], budgets)]
        for k, (head, shape) in enumerate(zip(heads, shapes[:-1])):
            _check_head(k, head, shape, num_classes)
    network = MultiExitNetwork(stages, heads + [nn.Identity()], num_classes, tuple(input_shape))
    network.train(model.training)
    network.exit_names = list(exits)
    network.head_kinds = None if head_factory else kinds
    if warn:
        head_report(network, list(exits), max_head_fraction)
    return network


ATTACH_FORMAT = "exitwise.attached-model/1"
ATTACH_FILE = "attach.json"
ATTACHED_WEIGHTS = "model.safetensors"  # the trained heads (or whole network) beside attach.json


def build_user_model(spec: str) -> nn.Module:
    """Import FILE and call FUNCTION() from "FILE:FUNCTION": this runs the user's code, as `python FILE` would."""
    path, sep, function = str(spec).rpartition(":")
    if not sep or not path or not function:
        raise UserError(f"--model-file takes FILE:FUNCTION, got {spec!r}")
    if not Path(path).is_file():
        raise UserError(f"model file not found: {path!r}")
    try:
        module_spec = importlib.util.spec_from_file_location(f"exitwise_user_model_{Path(path).stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    except Exception as e:  # the user's code can raise anything
        raise UserError(f"importing {path!r} raised {type(e).__name__}: {first_line(e)}") from None
    build = getattr(module, function, None)
    if not callable(build):
        raise UserError(f"{path!r} has no function {function!r}")
    try:
        model = build()
    except Exception as e:
        raise UserError(f"{path}:{function}() raised {type(e).__name__}: {first_line(e)}") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"{path}:{function}() returned {type(model).__name__}, not a torch.nn.Module")
    return model


def load_user_weights(model: nn.Module, path: str | Path) -> None:
    """The user's checkpoint into their model, refusing missing, extra or mis-shaped tensors by name."""
    state = read_state_dict(path)
    check_state_fits(model, state, path)
    model.load_state_dict(state)


def is_model_dir(name: str | Path) -> bool:
    """Whether `name` is a folder `exitwise attach` wrote."""
    return (Path(name) / ATTACH_FILE).is_file()


@dataclass(frozen=True)
class AttachRecord:
    """attach.json: what `load_attached` needs to rebuild an attached network, the model file and weights with their
    SHA-256 (checked before they run), and how the exits were attached."""
    format: str
    model_file: str                  # /abs/path/file.py:FUNCTION
    model_file_sha256: str
    weights: str | None              # the user's weights, absolute path (None: the function's own initialisation)
    weights_sha256: str | None
    exits: tuple[str, ...]           # the submodules each side exit follows
    num_classes: int
    input_shape: tuple[int, ...]     # C, H, W
    max_head_fraction: float
    token_pool: str
    output_key: str | None
    heads_only: bool                 # weights_file holds the side heads only (the backbone frozen)
    weights_file: str                # the trained weights beside attach.json
    head: str | tuple[str | None, ...] = "auto"  # the head kind per side exit, as `auto` chose (older files: auto)

    def to_json(self) -> dict:
        return records.to_json(self)

    @classmethod
    def from_json(cls, doc: dict) -> AttachRecord:
        return records.from_json(cls, doc)


def attach_spec(model_file: str, weights: str | Path | None, exits: Sequence[str], num_classes: int,
                input_shape: Sequence[int], max_head_fraction: float, token_pool: str, output_key: str | None,
                freeze_backbone: bool, head: str | Sequence[str | None] = "auto") -> AttachRecord:
    """What `load_attached` needs to rebuild the network: the model file and weights (with their SHA-256)."""
    file = Path(model_file.rpartition(":")[0]).resolve()
    return AttachRecord(
        ATTACH_FORMAT, f"{file}:{model_file.rpartition(':')[2]}", file_sha256(file),
        str(Path(weights).resolve()) if weights else None, file_sha256(*weight_files(weights)) if weights else None,
        tuple(exits), num_classes, tuple(input_shape), max_head_fraction, token_pool, output_key, freeze_backbone,
        ATTACHED_WEIGHTS, head if isinstance(head, str) else tuple(head))


def load_attached(model_dir: str | Path) -> MultiExitNetwork:
    """Rebuild the multi-exit network that `exitwise attach` wrote to `model_dir` (its model file runs)."""
    from .weights import check_unchanged, read_state_dict
    folder = Path(model_dir)
    try:
        doc = json.loads((folder / ATTACH_FILE).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {str(folder / ATTACH_FILE)!r}: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != ATTACH_FORMAT:
        raise UserError(f"{str(folder / ATTACH_FILE)!r} is not an exitwise attached model ({ATTACH_FORMAT})")
    try:
        spec = AttachRecord.from_json(doc)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{str(folder / ATTACH_FILE)!r} is not a complete attach record ({type(e).__name__}: {e})") \
            from None
    file = Path(spec.model_file.rpartition(":")[0])
    if not file.is_file() or file_sha256(file) != spec.model_file_sha256:  # its code builds the network: a changed
        raise UserError(f"{str(folder / ATTACH_FILE)!r} names model file {str(file)!r}, which is missing or changed "
                        "(SHA-256 differs): run exitwise attach again")  # file would build another one, silently
    model = build_user_model(spec.model_file)
    if spec.weights:
        check_unchanged(spec.weights, spec.weights_sha256, str(folder / ATTACH_FILE))
        load_user_weights(model, spec.weights)
    model.eval()
    network = attach(model, spec.exits, spec.num_classes, spec.input_shape, max_head_fraction=spec.max_head_fraction,
                     token_pool=spec.token_pool, head=spec.head, output_key=spec.output_key,
                     warn=False)  # warned at attach
    state = read_state_dict(folder / spec.weights_file)
    expected = network.state_dict()
    keys = [k for k in expected if k.startswith("heads.")] if spec.heads_only else list(expected)
    if sorted(keys) != sorted(state):
        raise UserError(f"{str(folder / spec.weights_file)!r} does not fit the network its {ATTACH_FILE} builds")
    network.load_state_dict(state, strict=not spec.heads_only)
    return network

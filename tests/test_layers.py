"""The package's import picture: no circles, no import against the layer order, and deploy/ and the core never
import torch. Read from the source (every import, also those inside functions), so a lazy import counts too.

Layers, lowest first (DEVELOPERS.md): a module imports only from its own layer or below; deploy/ sees only the core."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "exitwise"
LAYERS = [
    ("core", {"errors", "io", "progress", "images", "config", "exit_rule", "allocator", "refs", "records",
              "_moved"}),
    ("models, deploy", {"models", "deploy"}),
    ("wings", {"device", "policies", "runtime", "tune", "data", "train"}),
    ("study, early_exit, export", {"study", "early_exit", "export", "serve_torch"}),
    ("api", {"api"}),
    ("cli", {"cli", "__main__", ""}),  # "": the package itself, whose lazy `exitwise.attach` and `train_exits` reach down
]
SHIMS = {"byom", "hardware", "costs", "analysis", "calibration", "frontiers", "results", "report", "logits_cache",
         "onnx_runtime", "predict"}  # old paths kept for one release: re-exports, imported by nothing inside
TORCH_FREE = LAYERS[0][1] | {"deploy"}


def modules() -> dict[str, Path]:
    """Dotted names under exitwise ("" is the package, "models" its __init__) -> source file; shims left out."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        parts = parts[:-1] if parts[-1] == "__init__" else parts
        if not (len(parts) == 1 and parts[0] in SHIMS):
            found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> tuple[set[str], set[str]]:
    """(exitwise modules, top-level outside packages) that the module at `path` imports, anywhere in its body."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    package = [p for p in package if p]
    inside, outside = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top, _, rest = alias.name.partition(".")
                (inside.add(rest) if top == "exitwise" else outside.add(top))
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                top, _, rest = (node.module or "").partition(".")
                if top != "exitwise":
                    outside.add(top)
                    continue
                base = rest.split(".") if rest else []
            else:
                base = package[:len(package) - (node.level - 1)] + (node.module.split(".") if node.module else [])
            for alias in node.names:  # `from .pkg import submodule` imports the submodule
                sub = ".".join(base + [alias.name])
                inside.add(sub if sub in known else ".".join(base))
    return inside, outside


GRAPH = {name: imports(name, path, modules()) for name, path in modules().items()}


def layer(name: str) -> int:
    top = name.split(".")[0]
    return next(i for i, (_, members) in enumerate(LAYERS) if top in members)


def test_every_module_has_a_layer():
    for name in GRAPH:
        layer(name)  # StopIteration names a module that DEVELOPERS.md and LAYERS do not place


def test_no_module_imports_against_the_layer_order():
    upward = [f"{a} ({LAYERS[layer(a)][0]}) imports {b} ({LAYERS[layer(b)][0]})"
              for a, (inside, _) in GRAPH.items() for b in inside if layer(b) > layer(a)]
    assert upward == []


def test_deploy_sees_only_the_core_and_itself():
    wrong = [f"{a} imports {b}" for a, (inside, _) in GRAPH.items() if a.startswith("deploy")
             for b in inside if not (b.startswith("deploy") or layer(b) == 0)]
    assert wrong == []


@pytest.mark.parametrize("name", sorted(n for n in GRAPH if n.split(".")[0] in TORCH_FREE))
def test_the_core_and_deploy_never_import_torch(name):
    assert not GRAPH[name][1] & {"torch", "torchvision", "safetensors"}


def test_no_import_circles():
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = "open"
        for nxt in sorted(GRAPH.get(name, ((), ()))[0]):
            if state.get(nxt) == "open":
                pytest.fail("import circle: " + " -> ".join(trail[trail.index(nxt):] + [name, nxt]))
            if nxt not in state:
                visit(nxt, trail + [name])
        state[name] = "done"

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [])


def test_the_shims_are_imported_by_nothing_inside():
    assert [a for a, (inside, _) in GRAPH.items() for b in inside if b in SHIMS] == []


def test_device_facts_are_a_leaf_and_tuning_sits_above_the_runtime():
    assert all(layer(b) == 0 for b in GRAPH["device"][0])
    assert "runtime" in GRAPH["tune"][0] and "tune" not in GRAPH["runtime"][0]

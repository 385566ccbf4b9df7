"""The architecture, checked: every module sits in a layer, no module imports from a layer above its own, the
import graph has no cycle, and no private name is imported across modules.

Layers, bottom to top (``diffsamplers/__init__.py`` is the facade that re-exports the public names):

* core primitives — noise processes, prediction types, random streams, artifacts, diagnostics, bundled data;
  the denoiser on top of them;
* bundled models (the exact mixtures, the digits networks);
* schedules — data: which noise levels to visit;
* solvers — host plans and linear updates, with the file formats they need at run time (DC ratios, CPR);
* the loop — the one step function, the sampling loop, the one reference solution;
* guidance and teleportation — what plugs into the loop;
* metrics — distances of samples, Fréchet statistics, feature networks, shards;
* tuning — what runs a model to learn something (Align Your Steps, KLUB, the DC ratio search);
* adapters — diffusers schedulers and pipelines;
* apps — the model registry, the recipe parser, the command line, the reports.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "diffsamplers"

#: The first component of a module's name below ``diffsamplers`` → its layer's rank.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("core primitives", ("noise", "prediction", "rng", "artifacts", "diagnostics", "data", "distances")),
    ("denoiser", ("denoiser",)),
    ("bundled models", ("models",)),
    ("schedules", ("schedules",)),
    ("solvers", ("solvers",)),
    ("loop", ("step", "sampling", "reference", "masked")),
    ("guidance and teleportation", ("guidance", "teleport")),
    ("metrics", ("metrics",)),
    ("tuning", ("tuning",)),
    ("adapters", ("adapters",)),
    ("apps", ("apps", "__main__")),
]
RANK = {part: rank for rank, (_, parts) in enumerate(LAYERS) for part in parts}
FACADE = "diffsamplers"


def _module_name(path: Path) -> str:
    parts = ["diffsamplers", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    base = package.split(".")[: len(package.split(".")) - (node.level - 1)] if node.level else []
    return ".".join([*base, *([node.module] if node.module else [])])


def _imports(module: str) -> list[tuple[str, list[str], int]]:
    """(imported module, imported names, line) for every import of ``module`` in the package, lazy ones included."""
    path = MODULES[module]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("diffsamplers")]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, path, node) if node.level else (node.module or "")
            if not target.startswith("diffsamplers"):
                continue
            names = [a.name for a in node.names]
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            out += [(m, [], node.lineno) for m in submodules]
            out.append((target, [n for n in names if f"{target}.{n}" not in MODULES], node.lineno))
    return out


def _layer(module: str) -> int:
    part = module.split(".")[1]
    if part not in RANK:
        raise AssertionError(f"{module} is in no layer: add {part!r} to LAYERS in tests/test_layers.py")
    return RANK[part]


def test_every_module_is_in_a_layer():
    for module in MODULES:
        if module != FACADE:
            _layer(module)


def test_no_module_imports_from_a_layer_above_its_own():
    upward = []
    for module in MODULES:
        if module == FACADE:
            continue
        for target, _, line in _imports(module):
            if target == FACADE:
                if module.split(".")[1] != "apps":  # only the jobs may read the facade (its version)
                    upward.append(f"{module}:{line} imports the facade {FACADE}")
                continue
            if _layer(target) > _layer(module):
                upward.append(
                    f"{module}:{line} ({LAYERS[_layer(module)][0]}) imports {target} ({LAYERS[_layer(target)][0]})"
                )
    assert not upward, "\n".join(upward)


def test_no_private_name_is_imported_across_modules():
    private = [
        f"{module}:{line} imports {name} from {target}"
        for module in MODULES
        for target, names, line in _imports(module)
        for name in names
        if name.startswith("_") and not name.startswith("__")
    ]
    assert not private, "\n".join(private)


def test_the_import_graph_has_no_cycle():
    graph = {
        m: sorted({t for t, _, _ in _imports(m) if t in MODULES and t != m and t != FACADE})
        for m in MODULES
        if m != FACADE
    }
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in graph.get(m, []):
            if state.get(t) == 1:
                cycle = stack[stack.index(t) :] + [t]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m)


@pytest.mark.parametrize(
    "source, target, ok",
    [("diffsamplers.solvers.base", "diffsamplers.step", False), ("diffsamplers.apps.cli", "diffsamplers.step", True)],
)
def test_the_rule_itself(source, target, ok):
    """The checker would catch a solver importing the loop, and lets an app import it."""
    assert (_layer(target) <= _layer(source)) == ok

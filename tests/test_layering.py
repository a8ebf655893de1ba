"""The package's one-way layering (STYLE.md §2.1): lower layers never import higher ones; no import cycle between
modules; no literal accelerator name outside the device helper; library modules never print."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "bitsmith"
ORDER = ["version", "errors", "utils", "formats", "nn", "transforms", "algorithms", "config", "models", "checkpoint", "end_to_end", "pipeline",
         "data", "eval", "export", "plan", "run", "cli"]
# what each layer may import from bitsmith (besides itself); errors and utils are usable by all
ALLOWED = {
    "version": set(),
    "errors": set(),
    "utils": set(),
    "formats": set(),
    "nn": {"formats"},
    "transforms": {"formats", "nn"},
    "algorithms": {"formats", "nn", "transforms"},
    "config": {"formats", "algorithms"},
    "models": {"formats", "nn", "transforms", "algorithms"},
    "checkpoint": {"formats", "nn", "algorithms"},
    "end_to_end": {"formats", "nn", "algorithms", "models", "checkpoint"},
    "pipeline": {"formats", "nn", "transforms", "algorithms", "config", "models", "checkpoint", "end_to_end"},
    "data": set(),
    "eval": set(),
    "export": {"formats", "nn", "transforms", "algorithms", "config", "models", "data", "eval"},
    "plan": {"formats", "nn", "algorithms", "config", "models", "end_to_end", "pipeline", "data", "eval", "export"},
    "run": {"formats", "nn", "algorithms", "config", "models", "checkpoint", "end_to_end", "pipeline", "data", "eval", "export",
            "plan", "version"},
    "cli": set(ORDER),
}


def _bitsmith_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    rel = path.relative_to(SRC).parts
    pkg_depth = len(rel) - 1  # directories below bitsmith/
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: climb to bitsmith/ then take the first component
                up = node.level - 1
                base = list(rel[:-1])[: max(pkg_depth - up, 0)] if up <= pkg_depth else []
                mod = (node.module or "").split(".")
                parts = base + [p for p in mod if p]
                if parts:
                    out.add(parts[0])
                else:
                    out.update(a.name for a in node.names)
            elif node.module and node.module.startswith("bitsmith."):
                out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith("bitsmith."))
    return out


def _layer_of(path: Path) -> str:
    first = path.relative_to(SRC).parts[0]
    return first.removesuffix(".py")


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layer_imports_only_lower_layers(layer):
    files = list((SRC / layer).rglob("*.py")) if (SRC / layer).is_dir() else [SRC / f"{layer}.py"]
    assert files
    for f in files:
        bad = _bitsmith_imports(f) - ALLOWED[layer] - {layer, "errors", "utils", "__init__"}
        assert not bad, f"{f.relative_to(SRC)} imports {sorted(bad)}, above its layer {layer!r}"


def test_errors_imports_nothing_from_bitsmith():
    assert not _bitsmith_imports(SRC / "errors.py")
    assert not _bitsmith_imports(SRC / "utils" / "__init__.py") - {"errors"}


def _module(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_graph() -> dict[str, set[str]]:
    """bitsmith module → the bitsmith modules it imports (anywhere in the file, function-level imports too)."""
    files = {_module(f): f for f in SRC.rglob("*.py")}
    graph = {}
    for name, f in files.items():
        package = name.split(".") if f.name == "__init__.py" else name.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
                full = ".".join(p for p in (base, node.module or "") if p)
                deps.update(f"{full}.{a.name}" if f"{full}.{a.name}" in files else full for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def test_no_import_cycle():
    graph, state, path = _module_graph(), {}, []

    def visit(m: str) -> None:
        state[m] = "open"
        path.append(m)
        for d in sorted(graph[m]):
            assert state.get(d) != "open", "import cycle: " + " → ".join(path[path.index(d):] + [d])
            if d not in state:
                visit(d)
        path.pop()
        state[m] = "done"

    assert len(graph) > 50
    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_formats_is_pure():
    for f in (SRC / "formats").rglob("*.py"):
        for n in ast.walk(ast.parse(f.read_text())):
            uses_nn = (
                (isinstance(n, ast.ImportFrom) and n.module == "torch" and any(a.name == "nn" for a in n.names))
                or (isinstance(n, ast.Import) and any(a.name.startswith("torch.nn") for a in n.names))
                or (isinstance(n, ast.Attribute) and n.attr in {"Module", "Parameter", "Linear"})
            )
            assert not uses_nn, f"formats/{f.name} uses torch.nn modules (pure functions like F.pad are fine)"


def test_no_accelerator_literal_outside_device_helper():
    for f in SRC.rglob("*.py"):
        if f.name == "device.py":
            continue
        assert '"cuda' not in f.read_text() and "'cuda" not in f.read_text(), f"{f} names the accelerator"


def test_library_never_prints():
    for f in SRC.rglob("*.py"):
        if f.parts[-2] == "cli":
            continue
        calls = [n for n in ast.walk(ast.parse(f.read_text()))
                 if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "print"]
        assert not calls, f"{f.relative_to(SRC)} calls print()"


def test_functions_stay_short():
    """No function over 60 lines (STYLE.md), Triton kernels (nn/kernels) excepted."""
    long = []
    for f in SRC.rglob("*.py"):
        if "kernels" in f.parts:
            continue
        for n in ast.walk(ast.parse(f.read_text())):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 60:
                long.append(f"{f.relative_to(SRC)}::{n.name} ({n.end_lineno - n.lineno + 1} lines)")
    assert not long, "functions over 60 lines: " + ", ".join(long)

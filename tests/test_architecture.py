"""The package is a one-way stack: a module imports only from its own package or from layers below it.

Walks every `lmforge` module's AST (module- and function-level imports alike), so an upward import cannot
hide inside a function. DESIGN.md's "Layers" section is the picture this enforces.
"""

from __future__ import annotations

import ast
from pathlib import Path

import lmforge

ROOT = Path(lmforge.__file__).parent

# Bottom to top. Packages on one line are peers and must not import each other.
LAYERS: list[set[str]] = [
    {"core"},
    {"data"},
    {"tokenizer"},
    {"model"},
    {"peft"},
    {"checkpoint"},
    {"parallel"},
    {"train"},
    {"tasks"},
    {"generate"},
    {"posttrain"},
    {"eval", "serve"},
    {"quickstart"},
    {"cli", "__init__"},
    {"__main__"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}
# Modules that may import lmforge inside a function: the command table loads a command's module only when
# it runs (so `lmforge --help` stays instant), and `lmforge.data` resolves its pipeline lazily.
LAZY_LOADERS = {"lmforge.cli", "lmforge.data"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top_package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def lmforge_imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for every lmforge import in a file."""
    tree = ast.parse(path.read_text(), str(path))
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.ImportFrom) and child.level == 0 and (child.module or "").startswith("lmforge"):
                found.append((child.module or "", child.lineno, inner))
            elif isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, inner) for a in child.names if a.name.startswith("lmforge"))
            visit(child, inner)

    visit(tree, False)
    return found


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def test_every_package_has_a_layer():
    packages = {top_package(m) for m in all_modules()}
    assert packages <= set(RANK), f"packages without a layer in LAYERS: {sorted(packages - set(RANK))}"


def test_imports_point_down_the_stack():
    upward = []
    for module, path in all_modules().items():
        src = top_package(module)
        for target, line, _ in lmforge_imports(path):
            dst = top_package(target)
            if dst == src or target == "lmforge":
                continue
            if RANK[dst] >= RANK[src]:
                upward.append(f"{path.relative_to(ROOT.parent)}:{line}: {src} imports {target}")
    assert not upward, "imports against the layer direction:\n" + "\n".join(upward)


def test_no_relative_relative_imports():
    """Absolute imports only, so the walk above sees every dependency."""
    relative = [f"{p.relative_to(ROOT.parent)}:{n.lineno}" for p in ROOT.rglob("*.py")
                for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.ImportFrom) and n.level]
    assert not relative, relative


def test_function_level_imports_only_for_optional_dependencies():
    hidden = [f"{path.relative_to(ROOT.parent)}:{line}: {target}"
              for module, path in all_modules().items() if module not in LAZY_LOADERS
              for target, line, inner in lmforge_imports(path) if inner]
    assert not hidden, "lmforge imported inside a function (import at module level):\n" + "\n".join(hidden)


def test_no_import_cycles_between_modules():
    modules = all_modules()
    graph = {m: {t for t, _, inner in lmforge_imports(p) if not inner and t in modules and t != m}
             for m, p in modules.items()}
    state: dict[str, int] = {}
    cycles: list[str] = []

    def walk(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(" -> ".join(stack[stack.index(t):] + [m, t]) if t in stack else f"{m} -> {t}")
            elif t not in state:
                walk(t, stack + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            walk(m, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_walker_sees_an_upward_import(tmp_path):
    """The checks above cannot pass vacuously: a planted upward import inside a function is found."""
    planted = tmp_path / "x.py"
    planted.write_text("def f():\n    from lmforge.serve.app import ServeConfig\n")
    assert lmforge_imports(planted) == [("lmforge.serve.app", 2, True)]


def test_modules_imported(tmp_path) -> None:
    """The walker below sees both import forms, at any depth."""
    planted = tmp_path / "test_x.py"
    planted.write_text("import test_a.b\ndef f():\n    from test_c import d\n")
    assert imported_modules(planted) == {"test_a", "test_c"}


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every module `path` imports, module-level or inside functions (absolute only)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_no_test_module_imports_another():
    """Shared test code lives in conftest fixtures or plain helper modules, never in a test_*.py module (importing
    one re-collects its tests and couples two files' edits); conftest itself is never imported."""
    tests = Path(__file__).parent
    bad = [f"{path.name} imports {name}" for path in sorted(tests.glob("*.py"))
           for name in sorted(imported_modules(path)) if name.startswith("test_") or name == "conftest"]
    assert not bad, "\n".join(bad)

"""The package imports cleanly in any order: no module imports one that imports it back, not even inside a
function (such cycles break as soon as someone moves the import to the top, or imports a module first)."""
import ast
import importlib
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "moh_convert"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_imports(path: Path, modules: set[str]) -> set[str]:
    """Package modules that `path` imports anywhere in its body (relative or absolute, top level or in functions)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = importlib.util.resolve_name("." * node.level + base, package)
            submodules = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules]
            # `from . import recipe` imports the submodule; `from .recipe import X` imports `recipe`.
            candidates = submodules or [base]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        found.update(candidate for candidate in candidates if candidate in modules)
    # A package's own __init__ runs when any of its submodules is imported: it is not an import of that package.
    return found - {name}


def test_no_import_cycles_between_package_modules():
    paths = [path for path in PACKAGE_DIR.rglob("*.py")]
    modules = {module_name(path) for path in paths}
    graph = {module_name(path): package_imports(path, modules) for path in paths}
    cycles = []

    def visit(node, stack, on_stack, done):
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target in on_stack:
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in done:
                visit(target, stack, on_stack, done)
        on_stack.discard(node)
        stack.pop()
        done.add(node)

    done: set[str] = set()
    for node in sorted(graph):
        if node not in done:
            visit(node, [], set(), done)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(cycle) for cycle in cycles)


@pytest.mark.parametrize("module", ["moh_convert.cli", "moh_convert.calibrate", "moh_convert.train", "moh_convert.hub"])
def test_each_entry_module_imports_on_its_own(module):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr

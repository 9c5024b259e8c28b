"""Rules of the house as tests (DESIGN.md §2), read from the source with an AST walk:

- ``contract/`` (the bundle contract) imports no torch/timm, no HTTP, no ``service``/``training``/``models``;
- ``training/`` and ``models/`` never import ``service/``;
- no import cycles among the project's modules (imports inside functions count; ``if TYPE_CHECKING:``
  blocks do not, they never run).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("contract", "models", "training", "service")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(path: Path) -> set[str]:
    """Every module a file imports at run time (absolute names; relative imports resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def project_graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    modules = {module_name(p): p for p in files}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        graph[name] = {m for m in imports_of(path) if m in modules and m != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path ``[a, b, ..., a]``, or None (depth-first search, colours)."""
    colour = dict.fromkeys(graph, 0)  # 0 new, 1 on the stack, 2 done
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        colour[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if colour[nxt] == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if colour[nxt] == 0 and (cycle := dfs(nxt)):
                return cycle
        stack.pop()
        colour[node] = 2
        return None

    for node in sorted(graph):
        if colour[node] == 0 and (cycle := dfs(node)):
            return cycle
    return None


def test_find_cycle_sees_a_cycle_and_a_clean_graph():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_imports_of_skips_type_checking_and_counts_lazy_imports(tmp_path, monkeypatch):
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    src = pkg / "mod.py"
    src.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import never\n"
        "def f():\n    from pkg import other\n    from . import sibling\n"
    )
    found = imports_of(src)
    assert "never" not in found
    assert {"pkg.other", "pkg.sibling"} <= found


def test_no_import_cycles():
    cycle = find_cycle(project_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def _offenders(package: str, banned: tuple[str, ...]) -> list[str]:
    out = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for name in sorted(imports_of(path)):
            if name.split(".")[0] in banned:
                out.append(f"{path.relative_to(ROOT)} imports {name}")
    return out


@pytest.mark.parametrize("package", ["training", "models"])
def test_training_and_models_never_import_service(package):
    assert _offenders(package, ("service",)) == []


def test_service_never_imports_torch_anywhere():
    """Every module of service/ (bench included, lazy imports too): the subprocess test in
    test_service_units.py imports the main ones; this one reads them all."""
    assert _offenders("service", ("torch", "timm", "torchvision")) == []


def test_contract_is_torch_free_http_free_and_standalone():
    banned = ("torch", "timm", "torchvision", "fastapi", "starlette", "uvicorn", "onnxruntime")
    assert _offenders("contract", (*banned, "service", "training", "models")) == []


def _sizes():
    """scripts/check_sizes.py, loaded as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_sizes", ROOT / "scripts" / "check_sizes.py")
    sizes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sizes)
    return sizes


def test_modules_and_functions_stay_small():
    """Every module under 400 lines, no function over 60 (scripts/check_sizes.py; tests not counted)."""
    sizes = _sizes()
    problems = [
        p for pkg in sizes.FOLDERS for f in sorted((ROOT / pkg).rglob("*.py")) for p in sizes.oversized(f)
    ]
    assert problems == []


def test_size_check_sees_a_long_function(tmp_path):
    sizes = _sizes()
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n" + "    x = 1\n" * 61)
    assert [p for p in sizes.oversized(probe) if "f has 62 lines" in p]

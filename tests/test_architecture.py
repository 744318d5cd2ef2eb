"""The package's shape, enforced: no import cycles, no reaching into another module's private names,
one file per name. Read from the source with ast (nothing is imported), so a violation names its line."""
from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "sparsetorch"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module an ``from ... import`` names (relative levels resolved)."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(module: str, path: Path, top_level_only: bool):
    """(line, imported module, imported names) for every sparsetorch import in ``module``."""
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    if top_level_only:  # imports under `if TYPE_CHECKING:` never run
        nodes = [n for n in nodes if not (isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test))]
        nodes = [c for n in nodes for c in ([n] if not isinstance(n, (ast.If, ast.Try)) else ast.walk(n))]
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            target = resolve(module, path, node)
            if target.split(".")[0] == "sparsetorch":
                yield node.lineno, target, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "sparsetorch":
                    yield node.lineno, alias.name, []


def edges(module: str, path: Path):
    """Modules ``module`` imports, at its top or inside functions (a lazy import must not hide a cycle):
    each import target, its packages, and submodules named."""
    for _, target, names in imports(module, path, top_level_only=False):
        parts = target.split(".")
        for i in range(2, len(parts) + 1):  # importing a.b.c runs a.b first
            yield ".".join(parts[:i])
        for name in names:
            if f"{target}.{name}" in MODULES:
                yield f"{target}.{name}"


def test_no_import_cycles():
    graph = {m: {t for t in edges(m, p) if t in MODULES and t != m} for m, p in MODULES.items()}
    for module, deps in graph.items():  # a package's __init__ importing its own children is not a cycle
        graph[module] = {d for d in deps if not module.startswith(d + ".")}
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def private_imports():
    for module, path in MODULES.items():
        for line, target, names in imports(module, path, top_level_only=False):
            leaf_private = any(part.startswith("_") and not part.startswith("__") for part in target.split("."))
            if leaf_private and target != module:
                yield f"{path.relative_to(PACKAGE.parent)}:{line} imports private module {target}"
            for name in names:
                if name.startswith("_") and not name.startswith("__") and target != module:
                    yield f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}.{name}"


# the one private module other modules may import: the lazy-attribute helper every package __init__ uses
ALLOWED = {"sparsetorch._lazy"}


def test_no_cross_module_private_imports():
    found = [v for v in private_imports() if not any(f"module {a}" in v for a in ALLOWED)]
    assert not found, "make these names public or move them where they are used:\n" + "\n".join(found)


def test_every_file_name_is_unique():
    names = Counter(p.name for p in PACKAGE.rglob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    twice = sorted(n for n, c in names.items() if c > 1)
    assert not twice, f"file names used more than once: {twice}"


def test_every_package_says_what_it_holds():
    for init in PACKAGE.rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and doc.strip() != "TODO", f"{init} needs a docstring: its first line is the README's layout entry"


def test_readme_layout_is_generated_from_the_tree():
    import subprocess
    import sys

    script = PACKAGE.parents[1] / "tools" / "readme_layout.py"
    done = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_moved_top_level_names_warn_and_still_work():
    import warnings

    import sparsetorch
    from sparsetorch.sparsifiers import CompressedRigL

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert sparsetorch.CompressedRigL is CompressedRigL
    assert any(issubclass(w.category, DeprecationWarning) and "sparsetorch.sparsifiers.CompressedRigL" in str(w.message)
               for w in caught)
    assert "CompressedRigL" not in sparsetorch.__all__

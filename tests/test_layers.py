"""The import rule of CONTRIBUTING.md: each layer imports only the layers before it, the library never
imports the test lab, and no module imports itself back through others.

Every ``import`` statement in ``src/aradia`` counts, also those inside functions (lazy imports still
run) and under ``if TYPE_CHECKING:`` (a type named in a signature is a dependency a reader follows).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

SRC = Path(__file__).resolve().parent.parent / "src"

#: Library layers, lowest first; a module may import its own layer and those listed before it.
LAYERS = ["base", "proto", "sources", "machine", "linux", "trace", "service", "apps", "facade"]
#: Top-level modules that are not packages, by layer.
TOP_LEVEL = {"aradia": "facade", "aradia.errors": "base", "aradia.cache": "base", "aradia.elf": "base",
             "aradia.progress": "base", "aradia._version": "base", "aradia.vm": "linux", "aradia.client": "facade"}
#: Beside the library: they may import any of it, and no library module may import them.
OUTSIDE = ("aradia.lab", "aradia.cli", "aradia.__main__")


def module_name(path: Path, root: Path) -> str:
    """``src/aradia/linux/maps.py`` -> ``aradia.linux.maps`` (a package is its ``__init__``)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """Every ``aradia`` module ``path`` imports, anywhere in the file, with relative imports resolved.

    ``from aradia.linux import maps`` imports the module ``aradia.linux.maps``; ``from aradia.vm
    import VM`` the module ``aradia.vm`` (``known`` tells modules from other names).
    """
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            subs = {f"{base}.{a.name}" for a in node.names} & known
            found.update(subs or {base})
    return {m for m in found if m == "aradia" or m.startswith("aradia.")}


def layer_of(module: str) -> str | None:
    """The layer a module belongs to, or None for the lab/CLI (outside the library)."""
    if module.startswith(OUTSIDE):
        return None
    if module in TOP_LEVEL:
        return TOP_LEVEL[module]
    sub = module.split(".")[1] if module.count(".") >= 1 else ""
    return sub if sub in LAYERS else "base" if sub in ("errors", "cache", "elf", "progress", "_version") else sub


def graph(root: Path) -> dict[str, set[str]]:
    """Module -> the aradia modules it imports (only those that exist as files under ``root``)."""
    files = {module_name(p, root): p for p in (root / "aradia").rglob("*.py")}
    known = set(files)
    result = {}
    for name, path in files.items():
        deps = set()
        for dep in imports_of(path, name, known):
            while dep not in known and "." in dep:
                dep = dep.rpartition(".")[0]
            if dep != name:
                deps.add(dep)
        result[name] = deps
    return result


def violations(root: Path) -> list[str]:
    """Every import that breaks the layer rule, as readable lines."""
    out = []
    for module, deps in sorted(graph(root).items()):
        mine = layer_of(module)
        if mine is None:
            continue
        if mine not in LAYERS:
            out.append(f"{module}: in no known layer ({mine}); add it to LAYERS in tests/test_layers.py")
            continue
        for dep in sorted(deps):
            theirs = layer_of(dep)
            if theirs is None:
                out.append(f"{module} imports {dep} (the lab/CLI is outside the library)")
            elif theirs in LAYERS and LAYERS.index(theirs) > LAYERS.index(mine):
                out.append(f"{module} ({mine}) imports {dep} ({theirs}), a later layer")
    return out


def cycles(root: Path) -> list[list[str]]:
    """Import cycles between modules (each as the list of modules around it)."""
    g = graph(root)
    found: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(g.get(node, ())):
            if dep == "aradia":  # the package's lazy __getattr__ facade, not a module dependency
                continue
            if state.get(dep) == 1:
                found.append([*stack[stack.index(dep):], dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node)
    return found


def test_library_layers_import_only_earlier_layers_and_never_the_lab() -> None:
    assert violations(SRC) == []


def test_no_import_cycle_in_the_package() -> None:
    assert cycles(SRC) == []


def test_the_lab_and_cli_exist_and_are_checked() -> None:
    """The rule above is only worth something if it sees the modules it guards."""
    g = graph(SRC)
    assert "aradia.lab.launcher" in g and "aradia.lab.images" in g
    assert "aradia.linux.processes" in g and "aradia.trace.tracer" in g
    assert layer_of("aradia.lab.images") is None
    assert layer_of("aradia.trace.tracer") == "trace"


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp_path / "aradia" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


BASE_TREE = {"__init__.py": "", "errors.py": "", "lab/__init__.py": "", "lab/launcher.py": "",
             "linux/__init__.py": "", "machine/__init__.py": "", "machine/qemu.py": "",
             "trace/__init__.py": "", "service/__init__.py": ""}


@pytest.mark.parametrize("importer", ["linux/walks.py", "trace/tracer.py", "service/api.py", "machine/x.py"])
def test_checker_reports_a_library_module_that_imports_the_lab(tmp_path: Path, importer: str) -> None:
    root = _tree(tmp_path, {**BASE_TREE, importer: "def f():\n    from aradia.lab.launcher import launch\n"})
    name = "aradia." + importer.removesuffix(".py").replace("/", ".")
    assert violations(root) == [f"{name} imports aradia.lab.launcher (the lab/CLI is outside the library)"]


def test_checker_reports_an_upward_import_and_accepts_a_downward_one(tmp_path: Path) -> None:
    root = _tree(tmp_path, {**BASE_TREE, "machine/paging.py": "from aradia.linux import walks\n",
                            "linux/walks.py": "from aradia.machine import qemu\nfrom aradia.errors import X\n"})
    assert violations(root) == ["aradia.machine.paging (machine) imports aradia.linux.walks (linux), a later layer"]


def test_checker_reports_a_cycle(tmp_path: Path) -> None:
    root = _tree(tmp_path, {**BASE_TREE, "machine/a.py": "from aradia.machine import b\n",
                            "machine/b.py": "def f():\n    from aradia.machine.a import X\n"})
    assert cycles(root) == [["aradia.machine.a", "aradia.machine.b", "aradia.machine.a"]]

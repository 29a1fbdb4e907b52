"""The package's rooms and the direction of their imports (docs/architecture.md, "The rule")."""

import ast
from pathlib import Path

import ckptmerge

PACKAGE = Path(ckptmerge.__file__).parent

# A room may import rooms of its own rank or lower, never higher; same-rank rooms must not form a cycle.
RANK = {
    "errors": 0, "console": 0,
    "io": 1, "data": 1, "parallel": 1,
    "merging": 2,
    "evaluation": 3,
    "online": 4,
    "train": 5,
    "recovery": 6, "search": 6, "sweep": 6, "demo": 6,
    "reproduce": 7,
    "cli": 8, "__main__": 8,
}


def _room(module: str) -> str:
    return module.split(".")[1] if module.count(".") >= 1 else "__init__"


def _imports() -> list[tuple[Path, str, str]]:
    edges = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        room = rel.parts[0].removesuffix(".py")
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else (
                [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            for name in names:
                if name.startswith("ckptmerge.") or name == "ckptmerge":
                    edges.append((rel, room, _room(name)))
    return edges


def test_top_level_holds_at_most_four_modules():
    modules = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(modules) <= 4, modules


def test_every_room_has_a_rank_and_a_docstring():
    rooms = {p.name for p in PACKAGE.iterdir() if p.is_dir() and not p.name.startswith("__")}
    rooms |= {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    assert rooms <= set(RANK), rooms - set(RANK)
    for room in rooms:
        init = PACKAGE / room / "__init__.py"
        if init.parent.is_dir():
            assert init.exists() and ast.get_docstring(ast.parse(init.read_text())), f"{room}/__init__.py needs a docstring"


def test_no_room_imports_a_room_above_it():
    upward = [f"{rel}: {room} -> {target}" for rel, room, target in _imports()
              if room in RANK and target in RANK and RANK[target] > RANK[room]]
    assert not upward, "\n".join(upward)


def test_rooms_of_one_rank_do_not_import_each_other_both_ways():
    pairs = {(room, target) for _, room, target in _imports() if room != target and room in RANK and target in RANK}
    cycles = sorted((a, b) for a, b in pairs if (b, a) in pairs and a < b)
    assert not cycles, cycles


def test_no_module_imports_the_public_api_package_root():
    """Modules import from their rooms, never ``from ckptmerge import X`` (which would load the whole API)."""
    offenders = [str(rel) for rel, room, target in _imports() if target == "__init__" and room != "__init__"]
    allowed = {"cli/main.py", "merging/manifest.py"}  # they read __version__ only
    assert set(offenders) <= allowed, offenders


def _module_name(path: Path, package: Path) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_imports(tree: ast.Module) -> list[str]:
    """Every module an ``import`` names, at any depth (functions too), except under ``if TYPE_CHECKING:``."""
    typing_only = {id(node) for stmt in ast.walk(tree)
                   if isinstance(stmt, ast.If) and ast.unparse(stmt.test).endswith("TYPE_CHECKING")
                   for inner in stmt.body for node in ast.walk(inner)}
    names = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]  # a name may be a module
    return names


def _module_edges(package: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (a package's own ``__init__`` only when named)."""
    paths = {_module_name(path, package): path for path in package.rglob("*.py")}
    return {module: {name for name in _runtime_imports(ast.parse(path.read_text())) if name in paths and name != module}
            for module, path in paths.items()}


def _import_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in sorted(edges[module]):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = stack[stack.index(module):]
            del stack[stack.index(module):]
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(edges):
        if module not in index:
            visit(module)
    return cycles


def test_cycle_search_finds_a_cycle_through_a_function_level_import(tmp_path):
    package = tmp_path / "pkg"
    (package / "room").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "room" / "__init__.py").write_text("")
    (package / "room" / "a.py").write_text("from pkg.room.b import g\n")
    (package / "room" / "b.py").write_text("def g():\n    from pkg.room import a\n")
    (package / "room" / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.room.d\n")
    (package / "room" / "d.py").write_text("import pkg.room.c\n")
    assert _import_cycles(_module_edges(package)) == [["pkg.room.a", "pkg.room.b"]]


def test_no_file_level_import_cycles():
    """No two files import each other, directly or through others, even from inside a function (issue 22):
    a circle means the modules are one job split in two, and one of them sees the other half-initialised."""
    cycles = _import_cycles(_module_edges(PACKAGE))
    assert not cycles, "\n".join(" <-> ".join(cycle) for cycle in cycles)


def _modules_that(predicate) -> set[str]:
    return {str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")
            if any(predicate(node) for node in ast.walk(ast.parse(path.read_text())))}


def test_one_module_per_low_level_helper():
    """ctypes (C-library calls) only in io/libc.py; "is this pid alive" (``os.kill(pid, 0)``) only in
    io/process_liveness.py (issue 22: one helper per job)."""
    def imports_ctypes(node):
        return (isinstance(node, ast.Import) and any(a.name == "ctypes" for a in node.names)) or \
            (isinstance(node, ast.ImportFrom) and node.module == "ctypes")

    def probes_a_pid(node):
        return isinstance(node, ast.Call) and ast.unparse(node.func) == "os.kill" and len(node.args) == 2 and \
            isinstance(node.args[1], ast.Constant) and node.args[1].value == 0

    assert _modules_that(imports_ctypes) == {"io/libc.py"}
    assert _modules_that(probes_a_pid) == {"io/process_liveness.py"}

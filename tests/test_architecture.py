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

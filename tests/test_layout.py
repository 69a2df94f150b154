"""The layout's rules."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("actors", "client")
MAX_LINES = 450
MAX_MODULES = 16  # per folder, ``__init__.py`` not counted


def test_actors_never_imports_client():
    for path in (ROOT / "actors").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not any(n == "client" or n.startswith("client.") for n in names), path


def _modules() -> dict[str, Path]:
    """Every module of the packages, by dotted name (a package by its own name)."""
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _top_level_imports(body: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
    """The imports a module makes when it is imported, ``if TYPE_CHECKING:`` ones included
    (a circle of type-only imports is a circle all the same); not those inside functions."""
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If):
            yield from _top_level_imports(node.body)
            yield from _top_level_imports(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody):
                yield from _top_level_imports(block)
            for handler in node.handlers:
                yield from _top_level_imports(handler.body)


def _import_graph() -> dict[str, set[str]]:
    """Module -> the modules of the packages it imports at module level."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in _top_level_imports(ast.parse(path.read_text()).body):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                assert node.level == 0, f"{path}: relative import"
                assert node.module is not None
                # ``from package import module`` imports that module; other names: the package.
                targets = [f"{node.module}.{alias.name}" for alias in node.names]
            for target in targets:
                while target not in modules and "." in target:
                    target = target.rsplit(".", 1)[0]
                # A module's own packages are imported before it, whatever it imports.
                if target in modules and not (name + ".").startswith(target + "."):
                    graph[name].add(target)
    return graph


def _floors(graph: dict[str, set[str]]) -> dict[str, int]:
    """Each module's floor (1 + the highest floor it imports); fails on a circle."""
    floors: dict[str, int] = {}
    visiting: list[str] = []

    def floor(name: str) -> int:
        if name in floors:
            return floors[name]
        assert name not in visiting, "import circle: " + " -> ".join(
            [*visiting[visiting.index(name) :], name]
        )
        visiting.append(name)
        floors[name] = 1 + max((floor(other) for other in graph[name]), default=0)
        visiting.pop()
        return floors[name]

    for name in graph:
        floor(name)
    return floors


def test_no_import_circle():
    floors = _floors(_import_graph())
    assert floors  # and no circle: _floors asserts it


def test_no_import_circle_between_the_subpackages_of_actors():
    subpackages: dict[str, set[str]] = {}
    for name, imported in _import_graph().items():
        if not name.startswith("actors."):
            continue
        own = ".".join(name.split(".")[:2])
        subpackages.setdefault(own, set()).update(
            ".".join(other.split(".")[:2])
            for other in imported
            if other.startswith("actors.") and not other.startswith(own)
        )
    _floors(subpackages)


def _client_imports_of_actors() -> Iterator[tuple[Path, str, str]]:
    """``(path, module, name)`` of every import of ``actors`` in ``client/``, wherever made."""
    for path in (ROOT / "client").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "actors":
                        yield path, alias.name, ""
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "actors":
                for alias in node.names:
                    yield path, node.module or "", alias.name


def test_client_imports_only_public_names_of_actors():
    import importlib

    for path, module, name in _client_imports_of_actors():
        assert not any(part.startswith("_") for part in module.split(".")), (path, module)
        assert name and not name.startswith("_"), (path, module, name)
        assert name in importlib.import_module(module).__all__, (path, module, name)


def test_actors_exports_exactly_what_client_needs():
    import actors

    used = {name for _, module, name in _client_imports_of_actors() if module == "actors"}
    assert used == set(actors.__all__)


def test_each_subpackage_says_what_it_is_for_and_exports_its_public_names():
    for init in (ROOT / "actors").glob("*/__init__.py"):
        tree = ast.parse(init.read_text())
        assert ast.get_docstring(tree), init
        exported = [
            node
            for node in tree.body
            if isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets)
        ]
        assert exported, init


def test_no_module_over_450_lines():
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            lines = len(path.read_text().splitlines())
            assert lines <= MAX_LINES, f"{path.relative_to(ROOT)}: {lines} lines"


def test_no_folder_over_16_modules():
    for package in PACKAGES:
        for folder in [ROOT / package, *(ROOT / package).rglob("*/")]:
            if folder.name == "__pycache__":
                continue
            modules = [p for p in folder.glob("*.py") if p.name != "__init__.py"]
            assert len(modules) <= MAX_MODULES, f"{folder.relative_to(ROOT)}: {len(modules)}"


def test_the_worker_template_points_at_the_folder_that_holds_actors():
    """The template is started with ``python -c`` and this folder on its ``PYTHONPATH``: it
    must be where ``actors`` is importable from, wherever ``_template.py`` sits."""
    import actors
    from actors.executors import _template

    assert (Path(_template._PACKAGE_ROOT) / "actors" / "__init__.py").is_file()
    # The checkout, or site-packages under tox's non-editable install: where this process
    # imported ``actors`` from.
    assert Path(_template._PACKAGE_ROOT) == Path(actors.__file__).resolve().parent.parent

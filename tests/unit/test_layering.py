"""The package's shape, checked by walking its source (docs/architecture.md draws it).

Layers, arrows pointing down only:
  foundation (errors, settings, durable, refs, ray_client, statedb + its migrations, events)
  -> ML stages and platform parts (data, model, train, ..., jobs, cluster, manifests, devenv)
  -> services (serving/, loop/, observability/, stack, demo)
  -> adapters (flowops.cli, jobs/, serve_apps/), which nothing in the package imports.
Function-level imports count as imports: a cycle hidden in a function is still a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "platform" / "flowops"

FOUNDATION = {"errors", "settings", "durable", "refs", "ray_client", "statedb", "migrations", "events",
              "resources", "image_model"}
SERVICES = {"serving", "loop", "observability", "stack", "demo"}
ADAPTERS = {"cli"}
MAX_LINES = 600


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
TREES = {name: ast.parse(path.read_text(), str(path)) for name, path in MODULES.items()}


def _resolve(current: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    is_pkg = MODULES[current].name == "__init__.py"
    base = current.split(".")
    base = base[: len(base) - node.level + (1 if is_pkg else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(name: str) -> list[tuple[str, list[str]]]:
    """(imported module, imported names) for every import statement of a module, at any depth."""
    found = []
    for node in ast.walk(TREES[name]):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((_resolve(name, node), [alias.name for alias in node.names]))
    return found


def _flowops_targets(module: str, names: list[str]) -> set[str]:
    """The flowops modules an import statement loads: `from flowops import a` loads flowops.a."""
    targets = set()
    for name in names:
        if f"{module}.{name}" in MODULES:
            targets.add(f"{module}.{name}")
    if not targets and module in MODULES:
        targets.add(module)
    return {t for t in targets if t.startswith("flowops.") and t != "flowops"}


def _graph() -> dict[str, set[str]]:
    graph = {}
    for name in MODULES:
        edges: set[str] = set()
        for module, names in _imports(name):
            edges |= _flowops_targets(module, names)
        edges.discard(name)
        graph[name] = edges
    return graph


def _top(name: str) -> str:
    return name.split(".")[1] if "." in name else ""


def _layer(name: str) -> int:
    top = _top(name)
    if top in FOUNDATION:
        return 0
    if top in SERVICES:
        return 2
    if top in ADAPTERS:
        return 3
    return 1


def _package_graph() -> dict[str, set[str]]:
    """Import edges between top-level units (a package counts as one unit, its modules merged)."""
    units: dict[str, set[str]] = {}
    for name, edges in _graph().items():
        unit = _top(name)
        units.setdefault(unit, set()).update(_top(e) for e in edges if _top(e) != unit)
    units.pop("", None)
    return units


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one member (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_walk_sees_the_package():
    assert {"flowops.errors", "flowops.settings", "flowops.cli.main"} <= set(MODULES)
    assert "flowops.errors" in _graph()["flowops.settings"]


def test_no_import_cycles_between_modules_or_packages():
    assert _cycles(_graph()) == []
    assert _cycles(_package_graph()) == []


def test_imports_point_down_the_layers():
    upward = [
        f"{name} (layer {_layer(name)}) imports {target} (layer {_layer(target)})"
        for name, edges in _graph().items()
        for target in edges
        if _layer(target) > _layer(name)
    ]
    assert upward == []


def test_foundation_imports_only_foundation():
    wrong = [
        f"{name} imports {target}"
        for name, edges in _graph().items() if _top(name) in FOUNDATION
        for target in edges if _top(target) not in FOUNDATION
    ]
    assert wrong == []


def test_the_package_never_imports_its_adapters():
    wrong = []
    for name in MODULES:
        if _top(name) in ADAPTERS:
            continue
        for module, _ in _imports(name):
            if module.split(".")[0] in ("jobs", "serve_apps") or \
                    module.startswith(("flowops.cli", "flowops.workloads", "flowops.apps")):
                wrong.append(f"{name} imports {module}")
    assert wrong == []


@pytest.mark.parametrize("root", ["platform/flowops", "jobs", "serve_apps"])
def test_no_private_name_is_imported_across_modules(root):
    wrong = []
    for path in sorted((REPO / root).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(("flowops", "jobs")):
                wrong += [f"{path.relative_to(REPO)}: {node.module}.{a.name}"
                          for a in node.names if a.name.startswith("_") and a.name != "__version__"]
    assert wrong == []


def test_no_module_is_a_god_module():
    big = {name: n for name, path in MODULES.items()
           if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert big == {}


def _calls(name: str, attr: str) -> int:
    return sum(
        1 for node in ast.walk(TREES[name])
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
        and node.func.attr == attr and isinstance(node.func.value, ast.Name) and node.func.value.id == "ray"
    )


def test_one_ray_init():
    sites = {name: n for name in MODULES if (n := _calls(name, "init"))}
    assert sites == {"flowops.ray_client": 1}


def test_model_uris_are_built_only_in_refs():
    built = []
    for name, tree in TREES.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.JoinedStr) and any(
                isinstance(v, ast.Constant) and "models:/" in str(v.value) for v in node.values
            ):
                built.append(f"{name}:{node.lineno}")
    assert all(site.startswith("flowops.refs:") for site in built), built


def test_one_place_translates_validation_errors():
    sites = []
    for name, tree in TREES.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ExceptHandler) and node.type is not None:
                text = ast.unparse(node.type)
                if "ValidationError" in text and "kubernetes_validate" not in text:
                    sites.append(f"{name}:{node.lineno}")
    assert len(sites) == 1 and sites[0].startswith("flowops.errors:"), sites


def test_job_entrypoints_have_no_argparse():
    users = [p.name for p in sorted((REPO / "jobs").glob("*.py")) if "argparse" in p.read_text()]
    assert users == []


def test_the_workload_list_is_the_job_entrypoints_with_their_configs():
    import importlib

    from flowops.jobs import WORKLOADS

    modules = {p.stem for p in (REPO / "jobs").glob("*.py") if not p.stem.startswith("_")}
    assert set(WORKLOADS) == modules
    for workload, target in WORKLOADS.items():
        module, name = target.split(":")
        assert hasattr(importlib.import_module(module), name), target
        assert name in (REPO / "jobs" / f"{workload}.py").read_text(), workload


def test_pyproject_ships_every_package_and_nothing_generic_at_the_top_level():
    import tomllib

    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = setuptools["package-dir"]
    tree = {".".join(p.relative_to(PACKAGE.parent).parts[:-1])
            for p in PACKAGE.rglob("__init__.py")}
    expected = tree | {name for name in mapped if name}
    assert set(setuptools["packages"]) == expected
    assert all(name.split(".")[0] == "flowops" for name in setuptools["packages"])
    for name, folder in mapped.items():
        assert (REPO / folder).is_dir(), (name, folder)

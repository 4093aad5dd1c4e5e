"""The package's layers: every import of a coatnet module, at module level or inside a function, points down
the stack (docs/architecture.md), and no two modules import each other, directly or around a loop."""
from __future__ import annotations

import ast
from pathlib import Path

import coatnet

SRC = Path(coatnet.__file__).resolve().parent

# Bottom to top: a module imports modules of its own layer or of layers below it, never above.
LAYERS = (
    ("base", ("coatnet.utils", "coatnet.process_group", "coatnet.preprocess", "coatnet.version",
              "coatnet.device_plan")),
    ("layers", ("coatnet.layers",)),
    ("models", ("coatnet.models",)),
    ("data", ("coatnet.data",)),
    ("train", ("coatnet.train",)),
    ("tools", ("coatnet.export", "coatnet.bench", "coatnet.pipeline_bench", "coatnet.study", "coatnet.explain",
               "coatnet.publish")),
    ("cli", ("coatnet.cli", "coatnet.__main__", "coatnet")),  # the package root re-exports models for users
)


def _modules() -> dict[str, tuple[Path, bool]]:
    """{dotted name: (file, is a package's __init__)} of every module under src/coatnet."""
    found = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


MODULES = _modules()


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The coatnet modules an import statement loads (`from pkg import name` loads pkg.name when that is a
    module, else pkg)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = module.split(".") if is_package else module.split(".")[:-1]
        if node.level:
            base = base[:len(base) - node.level + 1]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        names = [f"{prefix}.{alias.name}" if f"{prefix}.{alias.name}" in MODULES else prefix for alias in node.names]
    targets = []
    for name in names:
        while name and name not in MODULES:  # `import coatnet.x.y` of a name inside a module: that module
            name = name.rpartition(".")[0]
        if name.split(".")[0] == "coatnet" and name != module:
            targets.append(name)
    return targets


def _imports() -> list[tuple[str, str, int, bool]]:
    """(importer, imported, line, inside a function) for every import of a coatnet module."""
    edges = []
    for module, (path, is_package) in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        in_function = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                       for n in ast.walk(f)}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges += [(module, t, node.lineno, id(node) in in_function)
                          for t in _targets(node, module, is_package)]
    return edges


IMPORTS = _imports()


def _layer(module: str) -> int:
    """Index in LAYERS of the layer `module` belongs to (the longest matching prefix decides)."""
    best, length = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > length:
                best, length = index, len(prefix)
    assert best is not None, f"{module} belongs to no layer: add it to LAYERS and docs/architecture.md"
    return best


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack, on_stack, components = [], set(), []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return components


def test_every_module_belongs_to_a_layer():
    assert all(_layer(m) is not None for m in MODULES)


def test_no_modules_import_each_other_even_inside_functions():
    graph = {m: set() for m in MODULES}
    for importer, imported, _, _ in IMPORTS:
        graph[importer].add(imported)
    assert _cycles(graph) == []


def test_every_import_points_down_the_layers():
    upward = [f"{importer}:{line} imports {imported} ({LAYERS[_layer(importer)][0]} -> "
              f"{LAYERS[_layer(imported)][0]}{', inside a function' if inside else ''})"
              for importer, imported, line, inside in IMPORTS if _layer(imported) > _layer(importer)]
    assert upward == []


def test_data_imports_nothing_from_training():
    assert [(a, b) for a, b, _, _ in IMPORTS if a.startswith("coatnet.data") and b.startswith("coatnet.train")] == []


def test_only_the_cli_imports_coatnet_modules_inside_functions():
    # Everywhere else an import inside a function would hide a dependency (and could hide a cycle); the CLI
    # defers its commands' imports so that `coatnet --help` stays fast.
    hidden = [f"{importer}:{line} imports {imported}" for importer, imported, line, inside in IMPORTS
              if inside and _layer(importer) != _layer("coatnet.cli")]
    assert hidden == []


def test_the_checks_see_the_imports_they_are_about():
    # The parser resolves relative, package and function-level imports (a check that saw none would pass).
    edges = {(a, b) for a, b, _, _ in IMPORTS}
    assert ("coatnet.data.shards", "coatnet.process_group") in edges
    assert ("coatnet.train.distributed", "coatnet.train.distributed.batches") in edges
    assert ("coatnet.models.weights", "coatnet.models.timm_import") in edges
    assert any(a == "coatnet.cli.train" and inside for a, _, _, inside in IMPORTS)
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]

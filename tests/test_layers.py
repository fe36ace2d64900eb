"""The package's layers, checked from the source: imports only go down, features do not import each other,
and no module imports itself back through others.

Layers, bottom to top (docs/design.md):

0. ``mergesmith.core``: model reading and sources (plain, packed BitNet, ``model+adapter``), output folders,
   dtypes, architecture facts, randomness, sizes, devices, errors, the compiled loops.
1. ``mergesmith.methods``: the merge methods' maths.
2. ``mergesmith.pipeline``: the merge (config, plan, execute, backends, stages, API, command).
3. features, each a sibling package: ``moe``, ``lora``, ``bitnet``, ``eval``, ``inspection``, ``tokens``.
4. workflows that compose features: ``search`` (merges candidates and scores them with ``eval``); they may
   import every layer below, features included, and not each other.
5. the top: ``mergesmith`` itself (the public API), ``cli``, ``__main__``.

Every import counts, at module level or inside a function, also under ``TYPE_CHECKING`` (for the layers);
the cycle check leaves out ``TYPE_CHECKING`` imports, which never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "mergesmith"
FEATURES = ("moe", "lora", "bitnet", "eval", "inspection", "tokens")
WORKFLOWS = ("search",)
LAYERS = {"core": 0, "methods": 1, "pipeline": 2, **dict.fromkeys(FEATURES, 3), **dict.fromkeys(WORKFLOWS, 4)}
TOP = 5


def module_names() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = ("mergesmith", *path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = module_names()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(name: str, source: str | None = None) -> list[tuple[str, bool]]:
    """(imported mergesmith module, whether it runs: False under ``if TYPE_CHECKING``) for every import
    statement in module ``name``, at any depth."""
    path = MODULES.get(name)
    tree = ast.parse(source if source is not None else path.read_text())
    package = name if path is not None and path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, runs: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.body:
                visit(child, False)
            for child in node.orelse:
                visit(child, runs)
            return
        if isinstance(node, ast.Import):
            found.extend((alias.name, runs) for alias in node.names if alias.name.startswith("mergesmith"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            if base.split(".")[0] == "mergesmith":
                for alias in node.names:  # `from pkg import module` imports the module
                    sub = f"{base}.{alias.name}"
                    found.append((sub if sub in MODULES else base, runs))
        for child in ast.iter_child_nodes(node):
            visit(child, runs)

    visit(tree, True)
    return found


def layer_of(module: str) -> tuple[int, str | None]:
    """(layer, feature package or None) of a module."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] not in LAYERS:
        return TOP, None
    return LAYERS[parts[1]], parts[1] if parts[1] in FEATURES + WORKFLOWS else None


def problems(graph: dict[str, list[tuple[str, bool]]]) -> list[str]:
    """Every upward or feature-to-feature import, and every import cycle, in ``graph``."""
    found = []
    for module, targets in graph.items():
        layer, feature = layer_of(module)
        for target, _ in targets:
            t_layer, t_feature = layer_of(target)
            if t_layer > layer:
                found.append(f"{module} imports {target}, a layer above it")
            elif feature and t_feature and t_feature != feature and t_layer == layer:
                # a workflow (layer 4) composes features; siblings on one layer stay apart
                found.append(f"{module} imports {target}, another feature")
    found += [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
    return found


def cycles(graph: dict[str, list[tuple[str, bool]]]) -> list[list[str]]:
    """One cycle per strongly connected group of modules (imports that run only)."""
    edges = {m: sorted({t for t, runs in ts if runs and t in graph and t != m}) for m, ts in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return groups


def package_graph() -> dict[str, list[tuple[str, bool]]]:
    return {name: imports_of(name) for name in MODULES}


def test_imports_go_down_only_and_never_in_a_circle():
    assert problems(package_graph()) == []


def test_a_workflow_may_import_features():
    graph = package_graph()
    assert any(t.startswith("mergesmith.eval") for t, _ in graph["mergesmith.search.engine"])
    assert problems(graph) == []


def test_every_package_has_a_layer():
    for name in MODULES:
        parts = name.split(".")
        assert len(parts) == 1 or parts[1] in LAYERS or parts[1] in ("cli", "__main__"), name


@pytest.mark.parametrize(
    ("module", "line", "why"),
    [
        ("mergesmith.core.model", "from mergesmith.pipeline.plan import MergePlan", "a layer above"),
        ("mergesmith.core.write", "    from mergesmith.moe import build_moe", "a layer above"),
        ("mergesmith.methods.linear", "from mergesmith.pipeline import execute", "a layer above"),
        ("mergesmith.pipeline.plan", "from mergesmith.bitnet.convert import HfPlan", "a layer above"),
        ("mergesmith.moe.build", "from mergesmith.lora.extract import extract_lora", "another feature"),
        ("mergesmith.eval.loading", "from ..bitnet import heal", "another feature"),
        ("mergesmith.eval.tasks", "from mergesmith.search.run import search", "a layer above"),
        ("mergesmith.moe.build", "    from mergesmith.search import engine", "a layer above"),
        ("mergesmith.pipeline.execute", "from mergesmith.pipeline import stages", "import cycle"),
    ],
)
def test_a_new_bad_import_is_caught(module, line, why):
    graph = package_graph()
    indented = line.startswith(" ")
    source = MODULES[module].read_text() + (
        "\ndef _added():\n" + line + "\n" if indented else "\n" + line + "\n"
    )
    graph[module] = imports_of(module, source)
    assert any(why in p and module in p for p in problems(graph)), problems(graph)

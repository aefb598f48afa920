"""No truthmap module imports one that imports it back, at the top of a file or inside a function."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "truthmap"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    """The truthmap modules a file imports anywhere in it (`import a.b`, `from a import b`, relative imports)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in modules}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            for alias in node.names:
                target = f"{base}.{alias.name}"
                found.add(target if target in modules else base)
    return (found & modules) - {name}


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports(p, modules) for p in paths}


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle [a, b, ..., a], or None."""
    state = {}  # module -> "open" while on the path, "done" after

    def visit(module, path):
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                return path[path.index(target):] + [module, target] if target in path else [module, target]
            if target not in state and (found := visit(target, path + [module])):
                return found
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (found := visit(module, [])):
            return found
    return None


def test_no_module_imports_one_that_imports_it_back():
    graph = import_graph()
    assert {"truthmap.pipeline", "truthmap.executor", "truthmap.stages"} <= set(graph)
    assert "truthmap.stages" in graph["truthmap.pipeline"]  # function-level imports count
    assert cycle(graph) is None, " -> ".join(cycle(graph))


def test_a_cycle_is_found():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


# The package's layers, lowest first: a module may import its own layer (without cycles) and those below it,
# never one above. A new module must be placed here, which is the point: its place in the layers is a decision.
LAYERS = {
    "base": {"errors", "progress", "rundir", "executor", "datasets", "datasets.spec", "datasets.registry",
             "datasets.rules", "datasets.loaders", "datasets.builtin"},
    "lm": {"models", "sites", "decoding"},
    "config": {"config"},
    "stages": {"generate", "label", "locate", "activations", "importer", "resample", "stages", "baselines", "probes",
               "controls", "heatmap", "error_types", "selection", "detection", "generalize", "detector", "report",
               "verdict", "sampling_baselines", "costs"},
    "api": {"pipeline", "cli"},
}


def layer_of(module: str) -> int:
    short = module.removeprefix("truthmap").lstrip(".")
    for rank, members in enumerate(LAYERS.values()):
        if short in members or (short == "" and rank == 0):
            return rank
    raise AssertionError(f"{module} is in no layer of tests/test_imports.py: place it in LAYERS")


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{module} -> {target}" for module, targets in graph.items() for target in targets
                  if layer_of(target) > layer_of(module))


def test_no_layer_imports_a_higher_one():
    graph = import_graph()
    assert upward_imports(graph) == []
    names = list(LAYERS)
    assert {names[layer_of(m)] for m in graph} == set(names)  # every layer holds a module: the table is current


def test_an_upward_import_is_found():
    graph = {"truthmap.models": {"truthmap.probes"}, "truthmap.probes": {"truthmap.models"}}
    assert upward_imports(graph) == ["truthmap.models -> truthmap.probes"]

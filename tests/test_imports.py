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
    assert {"truthmap.pipeline", "truthmap.executor", "truthmap.runner.contract"} <= set(graph)
    assert "truthmap.runner.contract" in graph["truthmap.pipeline"]  # function-level imports count
    assert cycle(graph) is None, " -> ".join(cycle(graph))


def test_a_cycle_is_found():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


# The package's layers, lowest first. A module may import the layers below its own, never one above, and within its
# own layer only the modules of the datasets package and the pairs named in SIDEWAYS. A new module must be
# placed here, which is the point: its place in the layers is a decision. "" is the package itself (the public
# names of truthmap/__init__.py, which may come from any layer).
LAYERS = {
    "base": {"errors", "progress", "lm", "stages", "analysis", "runner"},  # no truthmap imports (the folders' faces too)
    "loops": {"tables", "batches"},  # the one reader of user tables, the one resumable batch loop
    "contract": {"rundir", "executor", "datasets", "datasets.spec", "datasets.registry", "datasets.rules",
                 "datasets.loaders", "datasets.builtin"},  # run directory layout and schemas, datasets, executors
    "state": {"runstate"},  # locking, checkpoints, resume checks of a run directory
    "lm": {"lm.models", "lm.sites", "lm.decoding"},  # loading a model, naming its layers, batched decoding
    "config": {"config"},
    # stages/: what a run directory is made of, each from a model: answers, labels, exact answers, activations
    "stages": {"stages.generate", "stages.label", "stages.locate", "stages.activations", "stages.baselines"},
    # analysis/: what is read from a run directory, no model
    "analysis: numerics": {"analysis.solver", "analysis.cpuload", "analysis.evaluation"},
    "analysis: metrics": {"analysis.metrics", "analysis.calibration"},  # the field's metrics; calibrated thresholds
    "analysis: scheduler": {"analysis.scheduler"},  # batches of probe cells on the CPUs or a GPU
    "analysis: cells": {"analysis.probes", "analysis.heatmap", "analysis.controls", "analysis.error_types",
                        "analysis.report"},
    "analysis: tables": {"analysis.detection", "analysis.selection", "analysis.generalize", "analysis.card",
                         "analysis.detector", "analysis.costs"},  # detection table, selection, transfer, detectors
    "analysis: verdicts": {"analysis.verdict", "analysis.sampling_baselines"},  # the fair verdict; sampling baselines
    # runner/: the Stage contract and each stage's run function, as pipeline's table lists them
    "runner: contract": {"runner.contract"},
    "runner: stages": {"runner.answering", "runner.probing", "runner.importer", "runner.resample", "runner.flagged"},
    "api": {"", "pipeline"},
    "cli": {"cli", "results"},  # entry points: the command line and the results pages
}
# Imports within one layer, each with its reason. An entry no module uses any more fails the test: remove it.
SIDEWAYS = {
    ("lm.sites", "lm.decoding"): "the hooked forward pass pads its batch as decoding does",
    ("stages.generate", "stages.locate"): "the generation settings record the extraction prompt's version",
    ("stages.label", "stages.locate"): "labelling a frame of answers locates their exact answers",
    ("analysis.calibration", "analysis.metrics"): "thresholds are reported with the metrics' intervals",
    ("analysis.generalize", "analysis.detection"): "transfer fits the probes of the detection table",
    ("analysis.detector", "analysis.detection"): "a detector chooses its layers as the detection table does",
    ("analysis.detector", "analysis.card"): "a saved detector writes its model card",
    ("analysis.detection", "analysis.costs"): "the detection table shows each method's cost",
    ("analysis.sampling_baselines", "analysis.verdict"): "a sampling baseline is set against the probe as the verdict sets the bar",
    ("runner.importer", "runner.answering"): "an import is checked as generated answers are",
    ("runner.resample", "runner.answering"): "resamples are checked as the greedy answers are",
}


def short(module: str) -> str:
    return module.removeprefix("truthmap").lstrip(".")


def layer_of(module: str) -> int:
    for rank, members in enumerate(LAYERS.values()):
        if short(module) in members:
            return rank
    raise AssertionError(f"{module} is in no layer of tests/test_imports.py: place it in LAYERS")


def forbidden_imports(graph: dict[str, set[str]]) -> list[str]:
    """Each import of a higher layer ("upward"), or of the same layer outside the datasets package and SIDEWAYS."""
    found = []
    for module, targets in graph.items():
        for target in targets:
            a, b = short(module), short(target)
            if layer_of(target) > layer_of(module):
                found.append(f"{module} -> {target} (upward)")
                continue
            datasets_parts = a.split(".")[0] == b.split(".")[0] == "datasets"
            if layer_of(target) == layer_of(module) and not datasets_parts and (a, b) not in SIDEWAYS:
                found.append(f"{module} -> {target} (sideways: name it in SIDEWAYS, or move one of them)")
    return sorted(found)


def test_no_layer_imports_a_higher_one_or_its_own_but_named_exceptions():
    graph = import_graph()
    assert forbidden_imports(graph) == []
    names = list(LAYERS)
    assert {names[layer_of(m)] for m in graph} == set(names)  # every layer holds a module: the table is current
    placed = {m for members in LAYERS.values() for m in members}
    assert placed == {short(m) for m in graph}  # and names no module that is gone
    used = {(short(m), short(t)) for m, targets in graph.items() for t in targets}
    assert set(SIDEWAYS) <= used  # every named exception is still needed


def test_an_upward_import_is_found():
    graph = {"truthmap.lm.models": {"truthmap.analysis.probes"}, "truthmap.analysis.probes": {"truthmap.lm.models"}}
    assert forbidden_imports(graph) == ["truthmap.lm.models -> truthmap.analysis.probes (upward)"]


def test_an_import_within_a_layer_is_found_unless_named_or_in_one_package():
    graph = {"truthmap.analysis.probes": {"truthmap.analysis.heatmap"}, "truthmap.stages.generate": {"truthmap.stages.locate"},
             "truthmap.datasets.loaders": {"truthmap.datasets.spec"}, "truthmap.rundir": {"truthmap.executor"}}
    assert forbidden_imports(graph) == [
        "truthmap.analysis.probes -> truthmap.analysis.heatmap (sideways: name it in SIDEWAYS, or move one of them)",
        "truthmap.rundir -> truthmap.executor (sideways: name it in SIDEWAYS, or move one of them)",
    ]

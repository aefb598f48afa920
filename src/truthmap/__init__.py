"""truthmap: find where a language model knows that it is wrong.

The Python API at the top level (imported on first use, so `import truthmap` and `truthmap --help` stay light):

    import truthmap
    config = truthmap.RunConfig(dataset="geography", n_samples=200)
    truthmap.run(config)                      # answers -> activations -> probes, skipping finished stages
    truthmap.resample(config, truthmap.ResampleConfig(n_resamples=10))

The modules live in folders by what they do (lm/, stages/, analysis/, runner/; docs/architecture.md); a user's
code imports these names from the top level, which stay where they are when a file moves.
"""

from importlib import import_module

from truthmap.errors import ConfigError, DataError, ModelError, ProbeError, StoreError, TruthmapError

__version__ = "0.1.0"

# name -> (module, attribute): what the top level offers, and where it lives. No name of a top-level module
# (pipeline, config, ...): importing that module would replace the name.
_API = {
    "RunConfig": ("truthmap.config", "RunConfig"),
    "run_dir": ("truthmap.config", "run_dir"),
    "load_config_records": ("truthmap.config", "load_config_records"),
    "run": ("truthmap.pipeline", "run_all"),
    "generate": ("truthmap.pipeline", "generate"),
    "resample": ("truthmap.pipeline", "resample"),
    "generalize": ("truthmap.pipeline", "generalize"),
    "extract": ("truthmap.pipeline", "extract"),
    "probe": ("truthmap.pipeline", "probe"),
    "table": ("truthmap.pipeline", "table"),
    "fit_detector": ("truthmap.pipeline", "fit_detector"),
    "import_answers": ("truthmap.pipeline", "import_answers"),
    "summarize_answers": ("truthmap.stages.generate", "summarize_answers"),
    "ResampleConfig": ("truthmap.runner.resample", "ResampleConfig"),
    "ImportSource": ("truthmap.runner.importer", "ImportSource"),
    "Detector": ("truthmap.analysis.detector", "Detector"),
    "answer": ("truthmap.runner.flagged", "answer"),
    "ErrorProbe": ("truthmap.analysis.probes", "ErrorProbe"),
    "probe_grid": ("truthmap.analysis.probes", "probe_grid"),
    "probe_cells": ("truthmap.runner.probing", "probe_cells"),
    "write_probe_outputs": ("truthmap.runner.probing", "write_probe_outputs"),
    "open_store": ("truthmap.stages.activations", "open_store"),
    "open_embedding": ("truthmap.stages.activations", "open_embedding"),
    "load_model": ("truthmap.lm.models", "load_model"),
    "write_report": ("truthmap.analysis.report", "write_report"),
    "get_spec": ("truthmap.datasets", "get_spec"),
    "load_records": ("truthmap.datasets", "load_records"),
    "build_prompt": ("truthmap.datasets", "build_prompt"),
}

__all__ = ["ConfigError", "DataError", "ModelError", "ProbeError", "StoreError", "TruthmapError", "__version__",
           *_API]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'truthmap' has no attribute {name!r}")
    module, attribute = _API[name]
    value = getattr(import_module(module), attribute)
    globals()[name] = value  # looked up once
    return value


def __dir__():
    return sorted(__all__)

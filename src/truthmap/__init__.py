"""truthmap: find where a language model knows that it is wrong.

The Python API at the top level (imported on first use, so `import truthmap` and `truthmap --help` stay light):

    import truthmap
    config = truthmap.RunConfig(dataset="geography", n_samples=200)
    truthmap.run(config)                      # answers -> activations -> probes, skipping finished stages
    truthmap.pipeline.resample(config, truthmap.ResampleConfig(n_resamples=10))

generate, generalize and resample are both modules and pipeline functions: call them as truthmap.pipeline.<name>.
"""

from importlib import import_module

from truthmap.errors import ConfigError, DataError, ModelError, ProbeError, StoreError, TruthmapError

__version__ = "0.1.0"

# name -> (module, attribute): what the top level offers, and where it lives. No name of a submodule: importing
# that submodule would replace the function.
_API = {
    "RunConfig": ("truthmap.config", "RunConfig"),
    "run_dir": ("truthmap.config", "run_dir"),
    "load_config_records": ("truthmap.config", "load_config_records"),
    "run": ("truthmap.pipeline", "run_all"),
    "extract": ("truthmap.pipeline", "extract"),
    "probe": ("truthmap.pipeline", "probe"),
    "table": ("truthmap.pipeline", "table"),
    "fit_detector": ("truthmap.pipeline", "fit_detector"),
    "import_answers": ("truthmap.pipeline", "import_answers"),
    "summarize_answers": ("truthmap.generate", "summarize_answers"),
    "ResampleConfig": ("truthmap.resample", "ResampleConfig"),
    "ImportSource": ("truthmap.importer", "ImportSource"),
    "Detector": ("truthmap.detector", "Detector"),
    "answer": ("truthmap.flagged", "answer"),
    "ErrorProbe": ("truthmap.probes", "ErrorProbe"),
    "probe_grid": ("truthmap.probes", "probe_grid"),
    "probe_cells": ("truthmap.probing", "probe_cells"),
    "write_probe_outputs": ("truthmap.probing", "write_probe_outputs"),
    "open_store": ("truthmap.activations", "open_store"),
    "open_embedding": ("truthmap.activations", "open_embedding"),
    "load_model": ("truthmap.models", "load_model"),
    "write_report": ("truthmap.report", "write_report"),
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

"""The Python API: the table of a study's stages, run_all, and one function per stage that runs it from a RunConfig
unless it is done (stages.stage_done) and returns where it wrote.

The stage bodies live in their modules (answering, probing, baselines, resample, importer, detection); this module
only says in which order they run, what each reads and writes, and holds the run directory's lock around them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

from truthmap.config import RunConfig, load_config_records, run_dir
from truthmap.errors import ConfigError
from truthmap.rundir import RunDir, check_token, generalization_dir, read_json, tables_dir, write_json
from truthmap.runner import answering, probing
from truthmap.runner.contract import Stage, extraction_done, model_loader, require_answers, stage_done
from truthmap.runner.probing import write_probe_outputs
from truthmap.runstate import run_lock
from truthmap.stages import baselines as baseline_scores
from truthmap.stages.generate import summarize_answers

__all__ = ["STAGES", "baselines", "extract", "fit_detector", "generalize", "generate", "import_answers",
           "load_config_records", "probe", "resample", "run_all", "run_dir", "summarize_answers", "table",
           "write_probe_outputs"]

# The stages of `truthmap run`, in order. reads/writes: RunDir names. A stage is skipped when stage_done finds its
# outputs made with what the config asks for; "refuse" stages stop on other settings (naming the key), "redo"
# stages, whose outputs only summarize others, are made again.
STAGES = (
    Stage("answers", reads=(), writes=("answers", "run_json", "activations"), made=answering.answers_made,
          wanted=answering.answers_wanted, run=answering.generate),
    Stage("activations", reads=("answers", "run_json"), writes=("activations",), made=answering.activations_made,
          wanted=lambda config, run: {"site": config.site}, run=answering.extract),
    Stage("probes", reads=("answers", "activations"), writes=("probe_files",), made=probing.probes_made,
          wanted=probing.probes_wanted, run=probing.probe, on_mismatch="redo", needs_model=False),
)
BASELINES = Stage("baselines", reads=("answers", "run_json"), writes=("baselines",), made=baseline_scores.baselines_made,
                  wanted=baseline_scores.baselines_wanted, run=baseline_scores.run_baselines, on_mismatch="redo")
ANSWERS, ACTIVATIONS, PROBES = STAGES


def locked(stage):
    """Hold the run directory's lock while a stage may write there: a second process writing the same run stops at
    once (runstate.run_lock). run_all's stages take it again, which the lock allows within one process."""

    @functools.wraps(stage)
    def wrapper(config: RunConfig, *args, **kwargs):
        with run_lock(run_dir(config)):
            return stage(config, *args, **kwargs)

    return wrapper


@locked
def generate(config: RunConfig, lm=None, activations: bool = True) -> RunDir:
    """Generate, label and locate, recording config.site's activations while generating (activations=False: not):
    writes answers.parquet, run.json and that site's store (skipped when already done)."""
    if stage_done(ANSWERS, config):
        answering.check_finished_answers(config, run_dir(config))
        return run_dir(config)
    answering.check_models(config, lm)
    return answering.generate(config, lm, activations)


@locked
def extract(config: RunConfig, lm=None) -> RunDir:
    """Activations at the probed positions for every answer, by a forward pass over it (skipped when the store is
    complete: generate records its site's while generating). For another site, or answers made elsewhere."""
    require_answers(run_dir(config))
    if stage_done(ACTIVATIONS, config):
        answering.check_finished_store(config, run_dir(config))
        return run_dir(config)
    answering.check_models(config, lm)
    return answering.extract(config, lm)


@locked
def probe(config: RunConfig) -> RunDir:
    """Probe every (layer, position) cell on the rows with a valid exact answer; write the heatmap and tables."""
    require_answers(run_dir(config))
    if stage_done(PROBES, config):
        return run_dir(config)
    return probing.probe(config)


@locked
def baselines(config: RunConfig, get_lm) -> RunDir:
    """baselines.parquet: token-probability aggregates and p(True) for every answer (skipped when complete)."""
    if stage_done(BASELINES, config):
        return run_dir(config)
    return baseline_scores.run_baselines(config, get_lm)


@locked
def import_answers(config: RunConfig, source, lm=None, strict: bool = False, activations: bool = True) -> dict:
    """`truthmap import`: the run of config from an answers file (importer.import_answers); returns its summary."""
    from truthmap.runner.importer import import_answers as run_import

    summary = run_import(config, source, lm, strict, activations)
    if activations:
        extract(config, lm)  # another site of a finished import: a pass of its own, as `extract` does
    return summary


@locked
def resample(config: RunConfig, resampling=None, lm=None, **options) -> dict:
    """K sampled answers per question of a finished greedy run, their error types, type probes and answer
    selection (resample.resample); resampling: a resample.ResampleConfig, or its fields as keywords."""
    from truthmap.runner.resample import ResampleConfig
    from truthmap.runner.resample import resample as run_resample

    resampling = dataclasses.replace(resampling or ResampleConfig(), **options)
    return run_resample(config, resampling, lm)


@locked
def fit_detector(config: RunConfig, token: str, layer: int | None, out: str | None = None) -> dict:
    """Fit a detector on a run's rows (a quarter of them, grouped by question, kept apart to calibrate it), test it
    on the test split when extracted, save it as a directory, and score the rows of both runs (probing.fit_detector)."""
    return probing.fit_detector(config, token, layer, out)


@locked
def run_all(config: RunConfig) -> dict:
    """Every stage of STAGES in order, skipping finished ones; returns where the figure is and the best cell."""
    from truthmap.analysis.report import red_flags, write_report

    run = run_dir(config)
    answering.check_resume(config)  # before any model loads
    lm = None
    if config.executor == "local" and any(s.needs_model and s.made(config, run) is None for s in STAGES):
        from truthmap.lm.models import load_model

        lm = load_model(config.model, config.device, config.dtype)
    generate(config, lm)
    extract(config, lm)
    probe(config)
    save_resolved_config(run, config)
    report = write_report(run.path)
    summary = read_json(run.probe_files(config.site).summary)
    return {
        "heatmap": str(run.probe_files(config.site).heatmap_png),
        "best": summary["best"],
        "verdict": summary.get("verdict"),
        **summarize_answers(run),
        "report": str(report),
        "warnings": red_flags(run),
    }


def save_resolved_config(run: RunDir, config: RunConfig) -> None:
    """Keep, per site, the configuration this run was last made with; rewritten only when it changes."""
    saved = read_json(run.resolved_config) if run.resolved_config.exists() else {}
    resolved = saved | {config.site: json.loads(json.dumps(config.to_dict()))}  # tuples as JSON lists, to compare
    if resolved != saved:
        write_json(run.resolved_config, resolved)


@locked
def prepare(config: RunConfig, get_lm) -> RunDir:
    """Answers and activations of one run, and baselines for a test split (the only split they are scored on).

    A run already on disk is used as it is, whatever its size."""
    run = run_dir(config)
    if not (run.answers.exists() and run.run_json.exists()):
        generate(config, get_lm())
    if not extraction_done(run, config.site):
        extract(config, get_lm())
    return baselines(config, get_lm) if config.split == "test" else run


def prepare_splits(config: RunConfig, datasets: list[str], test_samples: int | None,
                   get_lm=None) -> dict[str, tuple[RunDir, RunDir]]:
    """The (train, test) runs of each dataset, made where missing; the model loads only if something is."""
    get_lm = get_lm or model_loader(config)
    sizes = {"train": config.n_samples, "test": test_samples or config.n_samples}
    configs = {dataset: [dataclasses.replace(config, dataset=dataset, split=s, n_samples=n) for s, n in sizes.items()]
               for dataset in datasets}
    for each in (c for pair in configs.values() for c in pair):
        check_study_input(each)  # every dataset's, before the model loads for the first
    return {dataset: tuple(prepare(c, get_lm) for c in pair) for dataset, pair in configs.items()}


def check_study_input(config: RunConfig) -> None:
    """What prepare would refuse only once the model is loaded: a run to make needs its dataset's questions, and
    a finished one given another --dtype or --device is refused (it is used as it is)."""
    run = run_dir(config)
    answering.check_models(config)
    answering.check_finished_answers(config, run)
    answering.check_finished_store(config, run)
    if not (run.answers.exists() and run.run_json.exists()):
        load_config_records(config)


def table(config: RunConfig, datasets: list[str], test_samples: int | None = None, n_resamples: int | None = None,
          temperature: float = 1.0) -> dict:
    """The detection table over datasets: each dataset's train run fits the probes, its test run scores them.
    n_resamples: also the sampling baselines, from that many sampled answers per test question."""
    from truthmap.analysis.costs import add_costs
    from truthmap.analysis.detection import evaluate_dataset, write_detection_table
    from truthmap.lm.models import model_slug
    from truthmap.runner.resample import sampling_rows

    if not datasets:
        raise ConfigError("No datasets: pass --datasets NAME [NAME ...].")
    results, get_lm = [], model_loader(config)
    for dataset, (train, test) in prepare_splits(config, datasets, test_samples, get_lm).items():
        rows = evaluate_dataset(dataset, train, test, config.site, config.seeds)
        if n_resamples:
            rows += sampling_rows(dataclasses.replace(config, dataset=dataset, split="test"), rows, n_resamples,
                                  temperature, get_lm)
        results += add_costs(rows, test)
    slug = model_slug(config.model)
    title = f"Error detection AUC (test split) · {slug} · {config.site}"
    return write_detection_table(results, tables_dir(Path(config.runs_dir) / slug), title)


def generalize(config: RunConfig, datasets: list[str], token: str, test_samples: int | None = None) -> dict:
    """Train on each dataset, test on every dataset: the matrix of AUCs and of AUCs over the target's baseline."""
    from truthmap.analysis.generalize import generalization
    from truthmap.lm.models import model_slug

    if len(datasets) < 2:
        raise ConfigError("Generalization needs at least two datasets: pass --datasets A B [C ...].")
    check_token(token)
    runs = prepare_splits(config, datasets, test_samples)
    directory = generalization_dir(Path(config.runs_dir) / model_slug(config.model))
    return generalization(runs, config.site, token, config.seeds, directory)

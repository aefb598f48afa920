"""What every stage shares: the Stage contract and its one resume check, what a run directory holds, and the
stages that need a model as the executor runs them (executor.runner), each on one shard of batches.

A Stage states what it reads and writes (RunDir names), what its outputs were made with and what they must have
been made with (from the config), and its run function; `stage_done` is the one resume check: done when both
agree, refused (or, for a stage whose outputs are only a summary of others, redone) when they differ.

A shard is every batch, in this process (shard None: the run's own work/ and store), or every n-th batch on a Ray
worker (shard (k, n): work/shards/<k>-of-<n>/, which answering merges afterwards). Either way the same function
works through its batches, so a local run and a sharded one write the same answers and the same store bytes.

The answers stage generates a batch, labels and locates it (label.label_and_locate), writes its 15 cells from
what the decoding recorded (activations.write_answer_cells), and only then checkpoints it: a batch's activations
stay in memory only until its exact answers are known, and a killed run never has answers without their cells.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from truthmap.config import RunConfig
from truthmap.errors import ConfigError
from truthmap.rundir import RunDir, Work, answers_table, read_json, require_answers  # noqa: F401 (stage API)
from truthmap.runstate import Checkpoints, check_matches

# ------------------------------------------------------------------------------------------ the stage contract


@dataclass(frozen=True)
class Stage:
    """One stage of a study, as pipeline's table lists it."""

    name: str
    reads: tuple[str, ...]  # RunDir names of its inputs
    writes: tuple[str, ...]  # RunDir names of its outputs
    made: Callable  # (config, run) -> what its outputs on disk were made with, or None: not made (or not finished)
    wanted: Callable  # (config, run) -> what they must have been made with
    run: Callable  # (config, lm=None) -> the run directory; the model is loaded only when it is needed
    on_mismatch: str = "refuse"  # "refuse": other settings are an error naming the key; "redo": made again
    needs_model: bool = True
    finished: Callable | None = None  # (config, run) -> whether outputs that were begun are complete; default: made


def stage_done(stage: Stage, config: RunConfig | None, run=None) -> bool:
    """The one resume check: whether stage's outputs are on disk, made with what config asks for. run: where they
    are (default: config's run directory; a stage's own folder for the steps of a stage)."""
    from truthmap.config import run_dir

    run = run or run_dir(config)
    made = stage.made(config, run)
    if made is None:
        return False
    wanted = stage.wanted(config, run)
    if stage.on_mismatch == "refuse":
        check_matches(made, wanted, run.path)
    elif any(made.get(key) != value for key, value in wanted.items()):
        return False
    return stage.finished is None or stage.finished(config, run)


# ------------------------------------------------------------------------------------------ a run directory


def imported(run: RunDir) -> bool:
    """Whether the run's answers were imported from a file (`truthmap import`) rather than generated."""
    return run.answers.exists() and run.run_json.exists() and "import" in read_json(run.run_json)


def extraction_done(run: RunDir, site: str) -> bool:
    from truthmap.stages.activations import META_FIX

    meta_path = run.store(site).meta
    return meta_path.exists() and (meta := read_json(meta_path, META_FIX))["written"] == meta["shape"][2]


def model_state(config: RunConfig, lm=None):
    """What the executor's workers hold (load_models), as a picklable function: a local model path is made
    absolute, since a Ray worker may run in another directory."""
    from truthmap.lm.models import model_location

    if config.executor == "ray":
        config = dataclasses.replace(config, model=model_location(config.model),
                                     extraction_model=config.extraction_model and model_location(config.extraction_model))
    return functools.partial(load_models, config, lm)


def model_loader(config: RunConfig):
    """A function that loads the model on its first call only: stages that find their work done never load it."""
    loaded = []

    def get():
        if not loaded:
            from truthmap.lm.models import load_model

            loaded.append(load_model(config.model, config.device, config.dtype))
        return loaded[0]

    return get


@dataclass
class Models:
    """What a worker holds: the model that answers, and the extractor (`--extraction-model`), loaded on first use."""

    lm: object  # models.LoadedModel, is_chat as the prompt style decides
    config: RunConfig
    device: str | None = None
    loaded: dict = dataclasses.field(default_factory=dict)  # "extractor", "prefix": loaded once, kept

    def extractor(self):
        if not self.config.extraction_model:
            return self.lm
        if "extractor" not in self.loaded:
            from truthmap.lm.models import load_model

            config = self.config
            self.loaded["extractor"] = load_model(config.extraction_model, self.device or config.device, config.dtype)
        return self.loaded["extractor"]

    def extraction_prefix(self):
        """The extraction prompt's few-shot prefix, encoded once for every batch (locate.extraction_prefix)."""
        if "prefix" not in self.loaded:
            from truthmap.stages.locate import extraction_prefix

            self.loaded["prefix"] = extraction_prefix(self.extractor())
        return self.loaded["prefix"]


def load_models(config: RunConfig, lm=None, device: str | None = None) -> Models:
    """The worker's state: lm (already loaded), or config.model loaded on device (a Ray worker's) or config.device."""
    from truthmap.lm.models import load_model

    lm = lm or load_model(config.model, device or config.device, config.dtype)
    return Models(dataclasses.replace(lm, is_chat=use_chat(config.prompt_style, lm)), config, device)


def use_chat(prompt_style: str, lm) -> bool:
    if prompt_style == "instruct" and not lm.is_chat:
        raise ConfigError(f"--prompt-style instruct needs a chat template, and model '{lm.name}' has none. Use base.")
    return lm.is_chat if prompt_style == "auto" else prompt_style == "instruct"


def extraction(config: RunConfig, extractor, checkpoints, prefix=None, progress: bool = True):
    """The run's label.Extraction: config's extractor method, tries, seed and batch size."""
    from truthmap.stages.label import Extraction

    return Extraction(extractor, checkpoints, config.batch_size, config.extractor, config.extraction_tries,
                      config.seed, prefix, progress)


def describe(models: Models):
    """The answering model without its weights: tokenizer, source, chat template, device, dtype."""
    return dataclasses.replace(models.lm, model=None)


def compute_settings(config: RunConfig, lm=None) -> dict:
    """The dtype and the kind of device the model computes in (the loaded model's, or what loading would give):
    both change the numbers generated, so finished batches are not continued with others."""
    from truthmap.stages.activations import device_kind

    if lm is not None:
        return {"dtype": lm.dtype, "device": device_kind(lm.device)}
    from truthmap.lm.models import default_device_and_dtype

    device, dtype = default_device_and_dtype(config.device, config.dtype)
    return {"dtype": dtype, "device": device_kind(device)}


def work_dir(run: RunDir, shard: tuple[int, int] | None) -> Work:
    """Where a shard checkpoints: the run's own work/, or work/shards/<k>-of-<n>/ (absolute: workers may run
    in another directory)."""
    return run.work if shard is None else Work(run.work.shard(*shard).path.absolute())


def store_dir(run: RunDir, shard: tuple[int, int] | None, site: str) -> Path:
    return run.activations(site) if shard is None else work_dir(run, shard).store(site).path


# ------------------------------------------------------------------------------------------------- answers


@dataclass
class Answering:
    """What every shard of the answers stage shares (sent to each Ray worker)."""

    config: RunConfig
    spec: object  # datasets.DatasetSpec
    records: list  # datasets.Record, in record order
    prompts: list[str]  # one per record
    settings: dict  # answers_settings, stop_text included: run.json's settings
    generation: dict  # what keys the generation checkpoints (generate.generation_settings), without dtype, device
    run: RunDir
    site: str | None  # the site whose activations are recorded while generating; None: none


def answer_shard(models: Models, batches: list[list[int]], shard, job: Answering):
    """Generate, label and locate the records of `batches` (indices into job.records) batch by batch, writing each
    batch's cells (job.site) before its checkpoint. Returns (located frame, the shard's records in store order,
    its store or None)."""
    import pandas as pd

    from truthmap.stages.activations import create_or_resume, new_meta, write_answer_cells
    from truthmap.stages.generate import generate_answers
    from truthmap.stages.label import label_and_locate

    config, lm = job.config, models.lm
    rows = sorted(i for batch in batches for i in batch)  # a shard's store holds its records in record order
    work = work_dir(job.run, shard)
    record_of = {job.records[i].id: job.records[i] for i in rows}
    store_row = {job.records[i].id: k for k, i in enumerate(rows)}
    store = store_dir(job.run, shard, job.site) if job.site else None
    meta = create_or_resume(store, new_meta(lm, job.site, len(rows), job.settings, one_pass=True)) if store else None
    # On first use: answers that need no extractor leave no checkpoints of it.
    extract = extraction(config, models.extractor, lambda: Checkpoints(work.extractions.path, job.settings),
                         prefix=models.extraction_prefix, progress=False)
    located = []

    def after_batch(frame, recording):
        frame = label_and_locate(job.spec, [record_of[i] for i in frame["id"]], frame, lm.tokenizer, config.locate,
                                 extract, answer_tokens=not config.extraction_model)
        if store:
            write_answer_cells(lm, store, meta, frame, [store_row[i] for i in frame["id"]], recording)
        located.append(frame)

    generate_answers(
        lm, [job.records[i].id for i in rows], [job.prompts[i] for i in rows], job.settings["max_new_tokens"],
        config.batch_size, Checkpoints(work.generations.path, job.generation | compute_settings(config, lm)),
        job.settings["stop_text"], job.site, after_batch,
    )
    return pd.concat(located, ignore_index=True).drop_duplicates("id", keep="last"), rows, store


# ------------------------------------------------------------------------------------------------- activations


@dataclass
class Extracting:
    """What every shard of the extraction stage shares: the answers table's token ids and positions."""

    table: object  # pandas frame: prompt_ids, answer_ids, pos_<position> for each probed position
    settings: dict  # run.json's settings
    site: str
    batch_size: int
    run: RunDir


def extract_shard(models: Models, batches: list[list[int]], shard, job: Extracting):
    """The activations of the answers in `batches` (rows of job.table) by a forward pass over each; returns (the
    shard's rows in store order, its store)."""
    from truthmap.stages.activations import extract_activations

    rows = sorted(i for batch in batches for i in batch)  # re-cut by extract_activations into the same batches
    store = store_dir(job.run, shard, job.site)
    table = job.table.iloc[rows].reset_index(drop=True)
    extract_activations(models.lm, table, store, job.site, job.batch_size, job.settings)
    return rows, store

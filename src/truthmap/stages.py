"""The stages that need a model, as the executor runs them (executor.runner): each on one shard of batches.

A shard is every batch, in this process (shard None: the run's own work/ and store), or every n-th batch on a Ray
worker (shard (k, n): work/shards/<k>-of-<n>/, which pipeline merges afterwards). Either way the same function
works through its batches, so a local run and a sharded one write the same answers and the same store bytes.

The answers stage generates a batch, labels and locates it (label.label_and_locate), writes its 15 cells from
what the decoding recorded (activations.write_answer_cells), and only then checkpoints it: a batch's activations
stay in memory only until its exact answers are known, and a killed run never has answers without their cells.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from truthmap.config import RunConfig
from truthmap.errors import ConfigError
from truthmap.rundir import Checkpoints, RunDir, Work


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
            from truthmap.models import load_model

            config = self.config
            self.loaded["extractor"] = load_model(config.extraction_model, self.device or config.device, config.dtype)
        return self.loaded["extractor"]

    def extraction_prefix(self):
        """The extraction prompt's few-shot prefix, encoded once for every batch (locate.extraction_prefix)."""
        if "prefix" not in self.loaded:
            from truthmap.locate import extraction_prefix

            self.loaded["prefix"] = extraction_prefix(self.extractor())
        return self.loaded["prefix"]


def load_models(config: RunConfig, lm=None, device: str | None = None) -> Models:
    """The worker's state: lm (already loaded), or config.model loaded on device (a Ray worker's) or config.device."""
    from truthmap.models import load_model

    lm = lm or load_model(config.model, device or config.device, config.dtype)
    return Models(dataclasses.replace(lm, is_chat=use_chat(config.prompt_style, lm)), config, device)


def use_chat(prompt_style: str, lm) -> bool:
    if prompt_style == "instruct" and not lm.is_chat:
        raise ConfigError(f"--prompt-style instruct needs a chat template, and model '{lm.name}' has none. Use base.")
    return lm.is_chat if prompt_style == "auto" else prompt_style == "instruct"


def extraction(config: RunConfig, extractor, checkpoints, prefix=None, progress: bool = True):
    """The run's label.Extraction: config's extractor method, tries, seed and batch size."""
    from truthmap.label import Extraction

    return Extraction(extractor, checkpoints, config.batch_size, config.extractor, config.extraction_tries,
                      config.seed, prefix, progress)


def describe(models: Models):
    """The answering model without its weights: tokenizer, source, chat template, device, dtype."""
    return dataclasses.replace(models.lm, model=None)


def compute_settings(config: RunConfig, lm=None) -> dict:
    """The dtype and the kind of device the model computes in (the loaded model's, or what loading would give):
    both change the numbers generated, so finished batches are not continued with others."""
    from truthmap.activations import device_kind

    if lm is not None:
        return {"dtype": lm.dtype, "device": device_kind(lm.device)}
    from truthmap.models import default_device_and_dtype

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

    from truthmap.activations import create_or_resume, new_meta, write_answer_cells
    from truthmap.generate import generate_answers
    from truthmap.label import label_and_locate

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
    from truthmap.activations import extract_activations

    rows = sorted(i for batch in batches for i in batch)  # re-cut by extract_activations into the same batches
    store = store_dir(job.run, shard, job.site)
    table = job.table.iloc[rows].reset_index(drop=True)
    extract_activations(models.lm, table, store, job.site, job.batch_size, job.settings)
    return rows, store

"""The Ray executor: generation and extraction sharded across workers, merged into what a local run writes.

`--executor ray` runs the stages that need the model on a Ray cluster: a local one started here, or an existing
one at `--ray-address`. Each worker is a Ray actor that loads the model itself (one per GPU, else one per CPU
with one torch thread) and runs the local run's own stage functions (`generate_answers`, `extract_spans`,
`extract_activations`) on its shard, checkpointing into its own directory (`run.shard(k, n)`), so that each shard
resumes on its own. The driver labels, merges and writes: answers.parquet in record order, the activation store
in the local layout.

Shards are made of whole batches: the driver cuts the work into the very batches a local run makes (same order,
same batch size) and deals them out round-robin. Every batch then holds the same rows, with the same padding, as
in a local run, so each result is the local one bit for bit, the sampled extraction retries included (they are
seeded per batch). The run directory must be on a filesystem that every worker sees (one machine, or a shared
mount), and truthmap must be installed on every node.
"""

from __future__ import annotations

import dataclasses
import os
import time
from contextlib import contextmanager
from pathlib import Path

from truthmap.errors import ConfigError, TruthmapError
from truthmap.progress import progress_bar

RAY_PIP = 'pip install "truthmap[ray]"'


# ------------------------------------------------------------------------------------------------- sharding


def deal(items: list, batch_size: int, n_shards: int) -> list[list]:
    """Cut items into consecutive batches of batch_size (as a local run does) and deal them round-robin."""
    return deal_batches([items[start : start + batch_size] for start in range(0, len(items), batch_size)], n_shards)


def deal_batches(batches: list[list], n_shards: int) -> list[list]:
    """Deal whole batches round-robin: over batches sorted by length, every shard gets a similar mix."""
    shards = [[] for _ in range(n_shards)]
    for index, batch in enumerate(batches):
        shards[index % n_shards].extend(batch)
    return shards


# ------------------------------------------------------------------------------------------------- workers


class Worker:
    """One model on one device; runs a stage function on it: function(lm, *args). Made a Ray actor by `workers`."""

    def __init__(self, model: str, device: str, dtype: str | None, prompt_style: str, extraction_model: str | None):
        import torch

        from truthmap.models import load_model
        from truthmap.pipeline import _use_chat

        torch.set_num_threads(1)  # one worker per CPU: more threads would only fight over the cores
        os.environ["TRUTHMAP_PROGRESS"] = "0"  # the driver shows progress per shard; N interleaved bars say nothing
        self.extraction_model, self.device, self.dtype, self.extractor = extraction_model, device, dtype, None
        self.error = None
        try:
            lm = load_model(model, device, dtype)
            self.lm = dataclasses.replace(lm, is_chat=_use_chat(prompt_style, lm))
        except TruthmapError as error:  # kept for the first call: an actor dying in __init__ loses its exception
            self.error = error

    def describe(self):
        """The loaded model without its weights: tokenizer, source, chat template, device, dtype."""
        if self.error:
            raise self.error
        return dataclasses.replace(self.lm, model=None)

    def call(self, function, *args, extractor: bool = False):
        if self.error:
            raise self.error
        if not extractor or not self.extraction_model:
            return function(self.lm, *args)
        if self.extractor is None:
            from truthmap.models import load_model

            self.extractor = load_model(self.extraction_model, self.device, self.dtype)
        return function(self.extractor, *args)


def import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError(f"--executor ray needs Ray, which is not installed. Install it with: {RAY_PIP}") from None
    return ray


def connect(config) -> None:
    """Join the cluster at config.ray_address, or start a local one; a session already running is reused."""
    ray = import_ray()
    if ray.is_initialized():
        return
    quiet = {"include_dashboard": False, "logging_level": "warning"}
    if config.ray_address:
        ray.init(address=config.ray_address, **quiet)
    else:
        ray.init(num_cpus=config.workers or os.cpu_count(), **quiet)


def plan_workers(config, resources: dict, n_batches: int) -> tuple[int, int]:
    """(workers, GPUs per worker): one per GPU when the cluster has GPUs (unless --device cpu), else one per CPU."""
    gpus = int(resources.get("GPU", 0)) if (config.device or "cuda").startswith("cuda") else 0
    kind, available = ("GPU", gpus) if gpus else ("CPU", int(resources.get("CPU", 1)))
    wanted = config.workers or available
    if wanted > available:
        raise ConfigError(f"--workers {wanted} needs {wanted} {kind}s, and the Ray cluster has {available}.")
    return max(1, min(wanted, n_batches)), 1 if gpus else 0  # no idle worker loading a model for nothing


def model_location(model: str) -> str:
    """A local model path made absolute: workers may run in another directory. Other names are left as they are."""
    from truthmap.models import EMBEDDED_MODELS

    local = model not in EMBEDDED_MODELS and Path(model).expanduser().exists()  # as models.resolve_source decides
    return str(Path(model).expanduser().resolve()) if local else model


def shard_dir(run, k: int, n: int) -> Path:
    return run.shard(k, n).absolute()  # absolute, as model_location


@contextmanager
def workers(config, n_items: int, extraction_model: str | None = None):
    """Start the actors for a stage (each loads the model), yield them, and kill them (freeing the models) after."""
    ray = import_ray()
    connect(config)
    n, gpus = plan_workers(config, ray.cluster_resources(), -(-n_items // config.batch_size))
    actor = ray.remote(Worker).options(
        num_cpus=1, num_gpus=gpus, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TRUTHMAP_PROGRESS": "0"}}
    )
    args = (model_location(config.model), "cuda" if gpus else "cpu", config.dtype, config.prompt_style,
            extraction_model and model_location(extraction_model))
    started = [actor.remote(*args)]
    try:
        # The first worker loads alone: a GGUF file is converted into the cache once, not n times at once.
        get([started[0].describe.remote()])
        started += [actor.remote(*args) for _ in range(n - 1)]
        yield started
    finally:
        for each in started:
            ray.kill(each)


def get(refs: list, description: str = "", unit: str = "shard") -> list:
    """ray.get with a progress bar per finished shard; a worker's error is raised here as itself."""
    ray = import_ray()
    pending = list(refs)
    try:
        with progress_bar(len(refs), description, unit=unit, enabled=bool(description)) as advance:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                advance(len(done))
        return ray.get(refs)
    except ray.exceptions.RayTaskError as error:
        raise error.cause from None


def run_shards(actors, function, jobs: list, description: str, extractor: bool = False) -> list:
    """function(lm, *job) for the non-empty jobs, job k on actor k; the results in job order."""
    refs = [actor.call.remote(function, *job, extractor=extractor) for actor, job in zip(actors, jobs) if job]
    return get(refs, description)


# ------------------------------------------------------------------------------------------------- stages


def generate_on_ray(config, spec, records, run, settings):
    """pipeline.generate on Ray workers: the same answers.parquet and run.json (with the workers' device)."""
    import pandas as pd

    from truthmap import pipeline
    from truthmap.datasets import build_prompt
    from truthmap.generate import answer_stop, generate_answers
    from truthmap.label import label_and_locate
    from truthmap.locate import extract_spans
    from truthmap.models import encode_prompt
    from truthmap.rundir import Checkpoints

    started = time.time()
    max_new_tokens = settings["max_new_tokens"]
    with workers(config, len(records), config.extraction_model) as actors:
        n = len(actors)
        lm = get([actors[0].describe.remote()])[0]  # tokenizer and chat template as the workers have them
        settings = settings | {"stop_text": answer_stop(spec, lm.is_chat)}  # as pipeline.generate adds it
        ids = [r.id for r in records]
        prompts = [build_prompt(spec, r, "instruct" if lm.is_chat else "base") for r in records]
        lengths = [len(encode_prompt(lm.tokenizer, p, lm.is_chat)) for p in prompts]
        order = sorted(range(len(ids)), key=lambda i: -lengths[i])  # generate_answers' order: longest first
        jobs = [
            rows and ([ids[i] for i in rows], [prompts[i] for i in rows], max_new_tokens, config.batch_size,
                      Checkpoints(shard_dir(run, k, n) / "generations", pipeline.generation_settings(settings)),
                      settings["stop_text"])
            for k, rows in enumerate(deal(order, config.batch_size, n))
        ]
        frames = run_shards(actors, generate_answers, jobs, f"Generating answers on {n} Ray workers")
        frame = pd.concat(frames, ignore_index=True).set_index("id").loc[ids].reset_index()  # record order

        def extract(pending):
            jobs = [
                rows and (rows, config.batch_size, Checkpoints(shard_dir(run, k, n) / "extractions", settings),
                          config.extractor, config.extraction_tries, config.seed)
                for k, rows in enumerate(deal(pending, config.batch_size, n))
            ]
            found = {}
            for shard in run_shards(actors, extract_spans, jobs, "Extracting exact answers", extractor=True):
                found |= shard
            return found

        frame = label_and_locate(spec, records, frame, lm.tokenizer, config.locate, extract,
                                 not config.extraction_model)
    pipeline.write_answers(run, config, settings, records, prompts, frame, lm, started)
    return run


def extract_on_ray(config, run, table):
    """pipeline.extract on Ray workers: each shard fills its own store, then they merge into the run's store."""
    from truthmap.activations import extract_activations, extraction_batches
    from truthmap.rundir import POSITIONS, position_column, read_json

    settings = read_json(run.run_json)["settings"]
    lengths = [len(p) + len(a) for p, a in zip(table["prompt_ids"], table["answer_ids"])]
    cut = extraction_batches(lengths, config.batch_size)
    columns = ["prompt_ids", "answer_ids", *(position_column(p) for p in POSITIONS)]
    with workers(config, len(table)) as actors:
        n = len(actors)
        shards = deal_batches(cut, n)
        directories = [shard_dir(run, k, n) / "activations" / config.site for k in range(n)]
        jobs = [
            rows and (table[columns].iloc[rows].reset_index(drop=True), directory, config.site, config.batch_size, settings)
            for rows, directory in zip(shards, directories)
        ]
        run_shards(actors, extract_activations, jobs, f"Extracting {config.site} activations on {n} Ray workers")
    merge_stores([(rows, d) for rows, d in zip(shards, directories) if rows], run.activations(config.site), len(table))
    return run


def merge_stores(parts: list[tuple[list[int], Path]], directory: Path, n_samples: int) -> None:
    """Copy each shard's store into the run's store at its rows; meta.json is written last, so a killed merge
    never leaves a store that looks finished."""
    import numpy as np

    from truthmap.activations import EMBED_FILE, META_FILE, STORE_FILE
    from truthmap.rundir import read_json, write_json

    metas = [read_json(Path(d) / META_FILE) for _, d in parts]
    n_layers, n_positions, _, hidden = metas[0]["shape"]
    meta = metas[0] | {"shape": [n_layers, n_positions, n_samples, hidden], "written": n_samples,
                       "clipped": sum(m["clipped"] for m in metas)}
    files = [(STORE_FILE, "shape")]
    if all("embed_shape" in m for m in metas):  # the input embedding, beside the store (see activations.py)
        meta["embed_shape"] = metas[0]["embed_shape"][:2] + [n_samples, metas[0]["embed_shape"][3]]
        files.append((EMBED_FILE, "embed_shape"))
    else:
        meta.pop("embed_shape", None)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / META_FILE).unlink(missing_ok=True)
    for name, key in files:
        np.memmap(directory / name, dtype=np.float16, mode="w+", shape=tuple(meta[key])).flush()
        for (rows, part_dir), part_meta in zip(parts, metas):
            for layer in range(meta[key][0]):  # one layer of one shard mapped at a time (see activations.py)
                store = np.memmap(directory / name, dtype=np.float16, mode="r+", shape=tuple(meta[key]))
                part = np.memmap(Path(part_dir) / name, dtype=np.float16, mode="r", shape=tuple(part_meta[key]))
                store[layer][:, rows, :] = part[layer]  # [positions, shard samples, hidden]
                store.flush()
                del store, part
    write_json(directory / META_FILE, meta)

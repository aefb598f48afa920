"""The executor: runs a stage function over batches of work, in this process or sharded over Ray workers.

It knows nothing of what a stage does. A stage gives a `load` function (what each worker holds: the model) and a
stage function, function(state, batches, shard), which works through its batches and returns what the stage
merges. `runner` runs it in this process on every batch (one shard, shard None), or with `--executor ray` on n
Ray actors, each of which loads its own state (one per GPU, else one per CPU with one torch thread) and gets
every n-th batch (shard (k, n)).

The stage cuts the batches, as a local run makes them; whole batches are dealt round-robin. Every batch then holds
the same rows, with the same padding, as in a local run, so each result is the local one bit for bit. A shard
writes where its stage function puts it (the run directory's work/shards/<k>-of-<n>/), which must be on a
filesystem every worker sees (one machine, or a shared mount), and truthmap must be installed on every node.
`--ray-address` joins an existing cluster; without it a local Ray instance is started.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

from truthmap.errors import ConfigError, TruthmapError
from truthmap.progress import progress_bar

RAY_PIP = 'pip install "truthmap[ray]"'


# ------------------------------------------------------------------------------------------------- sharding


def deal(items: list, batch_size: int, n_shards: int) -> list[list]:
    """Cut items into consecutive batches of batch_size (as a local run does) and deal them round-robin."""
    return deal_batches([items[start : start + batch_size] for start in range(0, len(items), batch_size)], n_shards)


def deal_batches(batches: list[list], n_shards: int) -> list[list]:
    """Deal whole batches round-robin (shard_batches), each shard's items in one list."""
    return [[item for batch in shard for item in batch] for shard in shard_batches(batches, n_shards)]


def shard_batches(batches: list[list], n_shards: int) -> list[list[list]]:
    """Batch k goes to shard k % n_shards: over batches sorted by length, every shard gets a similar mix."""
    return [batches[k::n_shards] for k in range(n_shards)]


# ------------------------------------------------------------------------------------------------- runners


class LocalRunner:
    """Everything in this process: one shard of every batch."""

    def __init__(self, state):
        self.state = state

    def one(self, function):
        """function(state), where a worker's state is (here: this process's)."""
        return function(self.state)

    def map(self, function, batches: list[list], description: str = "") -> list:
        """[function(state, batches, None)]: the results of the one shard."""
        return [function(self.state, batches, None)]


class RayRunner:
    """Ray actors (`Worker`), one shard each."""

    def __init__(self, actors):
        self.actors = actors

    def one(self, function):
        return get([self.actors[0].call.remote(function)])[0]

    def map(self, function, batches: list[list], description: str = "") -> list:
        """function(state, its batches, (k, n)) on actor k, for the shards that got a batch; results in shard order."""
        n = len(self.actors)
        shards = shard_batches(batches, n)
        refs = [actor.call.remote(function, shard, (k, n)) for k, (actor, shard) in enumerate(zip(self.actors, shards))
                if shard]
        return get(refs, f"{description} on {n} Ray workers" if description else "")


@contextmanager
def runner(config, load, n_batches: int):
    """A LocalRunner holding load() (config.executor "local"), or a RayRunner over actors that each hold
    load(device="cuda" or "cpu") (config.executor "ray": see the top); the actors are killed on exit, freeing
    their models. load must be picklable for Ray (a module-level function, or a partial of one)."""
    if config.executor != "ray":
        yield LocalRunner(load())
        return
    with workers(config, load, n_batches) as actors:
        yield RayRunner(actors)


class Worker:
    """One state (a model on one device) in one Ray actor; runs stage functions on it: function(state, *args)."""

    def __init__(self, load, device: str):
        import torch

        torch.set_num_threads(1)  # one worker per CPU: more threads would only fight over the cores
        os.environ["TRUTHMAP_PROGRESS"] = "0"  # the driver shows progress per shard; N interleaved bars say nothing
        self.error = None
        try:
            self.state = load(device=device)
        except TruthmapError as error:  # kept for the first call: an actor dying in __init__ loses its exception
            self.error = error

    def call(self, function, *args):
        if self.error:
            raise self.error
        return function(self.state, *args)


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


@contextmanager
def workers(config, load, n_batches: int):
    """Start the actors for a stage (each loads its state), yield them, and kill them (freeing the models) after."""
    ray = import_ray()
    connect(config)
    n, gpus = plan_workers(config, ray.cluster_resources(), n_batches)
    actor = ray.remote(Worker).options(
        num_cpus=1, num_gpus=gpus, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TRUTHMAP_PROGRESS": "0"}}
    )
    device = "cuda" if gpus else "cpu"
    started = [actor.remote(load, device)]
    try:
        # The first worker loads alone: a GGUF file is converted into the cache once, not n times at once.
        get([started[0].call.remote(_ready)])
        started += [actor.remote(load, device) for _ in range(n - 1)]
        yield started
    finally:
        for each in started:
            ray.kill(each)


def _ready(state) -> bool:
    return True


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

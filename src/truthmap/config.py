"""One configuration for a study, shared by the Python API and the CLI (flags > study file > defaults)."""

from __future__ import annotations

import difflib
import tomllib
import typing
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from truthmap.errors import ConfigError, check_name

DEFAULT_SEEDS = (0, 5, 26, 42, 63)


@dataclass
class RunConfig:
    model: str = "smollm2"
    dataset: str = "geography"
    split: str = "train"
    n_samples: int | None = None  # None: the whole split (at most 10,000, as in the paper)
    data_dir: str | None = None  # None: $TRUTHMAP_DATA_DIR
    runs_dir: str = "runs"
    batch_size: int = 16
    seed: int = 0  # subsampling and the sampled extraction retries
    device: str | None = None  # None: cuda when available, else cpu
    dtype: str | None = None  # None: bfloat16 on cuda, float32 on cpu
    prompt_style: str = "auto"  # auto (chat template when the model has one) | instruct | base
    max_new_tokens: int | None = None  # None: the dataset's (100; 200 for math)
    extraction_model: str | None = None  # None: the answering model extracts its own exact answers
    extraction_tries: int = 5  # with extractor "free"
    locate: str = "blind"  # blind (the extractor on every open answer) | gold (gold alias for correct answers)
    extractor: str = "constrained"  # constrained (a span of the answer or NO ANSWER) | free (free text, retried)
    custom_path: str | None = None  # dataset "custom": a CSV or JSONL file
    question_column: str = "question"
    answer_column: str = "answer"
    site: str = "mlp"
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    executor: str = "local"  # local (in-process) | ray (generation and extraction sharded over Ray workers)
    ray_address: str | None = None  # None: start a local Ray instance
    workers: int | None = None  # Ray workers, one model each; None: one per GPU of the cluster, else one per CPU

    def __post_init__(self):
        from truthmap.lm.sites import SITES

        names = {  # option: (what a user calls it, the legal names)
            "split": ("split", ("train", "test")),
            "prompt_style": ("prompt style", ("auto", "instruct", "base")),
            "locate": ("locate method", ("blind", "gold")),
            "extractor": ("extractor", ("constrained", "free")),
            "site": ("site", SITES),
            "executor": ("executor", ("local", "ray")),
        }
        for option, (kind, legal) in names.items():
            check_name(kind, getattr(self, option), legal)
        checks = {
            "batch_size": (self.batch_size >= 1, "an integer >= 1"),
            "n_samples": (self.n_samples is None or self.n_samples >= 1, "an integer >= 1"),
            "max_new_tokens": (self.max_new_tokens is None or self.max_new_tokens >= 1, "an integer >= 1"),
            "extraction_tries": (self.extraction_tries >= 1, "an integer >= 1"),
            "workers": (self.workers is None or self.workers >= 1, "an integer >= 1"),
        }
        for option, (ok, expected) in checks.items():
            if not ok:
                flag = "--" + option.replace("_", "-")
                raise ConfigError(f"Invalid {flag} {getattr(self, option)!r}: expected {expected}.")
        self.seeds = tuple(int(s) for s in self.seeds)
        if self.device is not None:
            from truthmap.lm.models import check_device  # imports torch: only when a device is named

            check_device(self.device, local=self.executor == "local")

    def to_dict(self) -> dict:
        return asdict(self)


# A study file may list several datasets and sites; `truthmap run --config` runs every dataset x site.
STUDY_LISTS = {"dataset": "datasets", "site": "sites"}


def load_study(path: str | Path | None, flags: dict | None = None) -> list[RunConfig]:
    """One RunConfig per dataset x site: RunConfig defaults < the TOML file at `path` < `flags`.

    `flags` holds only the options given on the command line; --dataset or --site replaces the file's list.
    """
    return study_configs(read_study_file(Path(path)) if path else {}, flags)


def study_configs(values: dict, flags: dict | None = None) -> list[RunConfig]:
    """One RunConfig per dataset x site of a study's checked keys (read_study_file's), `flags` over them."""
    values = dict(values)
    for key, value in (flags or {}).items():
        values.pop(STUDY_LISTS.get(key, key), None)
        values[key] = value
    datasets = values.pop("datasets", None) or [values.pop("dataset", RunConfig.dataset)]
    sites = values.pop("sites", None) or [values.pop("site", RunConfig.site)]
    return [RunConfig(**values, dataset=dataset, site=site) for dataset in datasets for site in sites]


def read_toml(path: Path, what: str = "configuration file") -> dict:
    """A TOML file's tables, or one line saying why it cannot be read (what: how the error names the file)."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as error:
        raise ConfigError(f"Cannot read the {what} {path}: {error.strerror}.") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path} is not valid TOML: {error}.") from None


def read_study_file(path: Path) -> dict:
    """The keys of a TOML study file, each checked against RunConfig's fields and types."""
    return check_study_values(read_toml(path), str(path))


def check_study_values(values: dict, source: str) -> dict:
    """The keys of a study (a file, or one study of docs/results.toml), checked against RunConfig's fields and
    types; `source` names where they came from in the error line."""
    accepted = _accepted_values()
    for key, value in values.items():
        if key not in accepted:
            close = difflib.get_close_matches(key.replace("-", "_"), list(accepted), n=1)
            hint = f" Did you mean: {close[0]}?" if close else ""
            raise ConfigError(f"Unknown key '{key}' in {source}.{hint} Known keys: {', '.join(accepted)}.")
        check, expected = accepted[key]
        if not check(value):
            raise ConfigError(f"Key '{key}' in {source} must be {expected}, got {value!r}.")
    for single, many in STUDY_LISTS.items():
        if single in values and many in values:
            raise ConfigError(f"{source} sets both '{single}' and '{many}'; keep one.")
    return values


def _accepted_values() -> dict:
    """key -> (check, description) for every RunConfig field, derived from its type, plus the study's lists."""
    hints = typing.get_type_hints(RunConfig)
    accepted = {field.name: _type_check(hints[field.name]) for field in fields(RunConfig)}
    for many in STUDY_LISTS.values():
        accepted[many] = (lambda v: isinstance(v, list) and v and all(isinstance(x, str) for x in v),
                          "a non-empty list of strings")
    return accepted


TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _type_check(hint):
    if typing.get_origin(hint) is tuple:  # seeds = [0, 5, 26]
        item = typing.get_args(hint)[0]
        expected = "a list of " + TYPE_NAMES.get(item, item.__name__).split()[-1] + "s"  # "a list of integers"
        return (lambda v: isinstance(v, list) and all(_is(x, item) for x in v)), expected
    kinds = [k for k in (typing.get_args(hint) or (hint,)) if k is not type(None)]
    if not all(isinstance(k, type) for k in kinds):
        return (lambda v: True), "any value"
    return (lambda v: any(_is(v, k) for k in kinds)), " or ".join(TYPE_NAMES.get(k, k.__name__) for k in kinds)


def _is(value, kind: type) -> bool:
    if isinstance(value, bool):  # TOML true is not a number
        return kind is bool
    return isinstance(value, kind) or (kind is float and isinstance(value, int))


# ------------------------------------------------------------------------------------------ what a config names


def run_dir(config: RunConfig):
    """The run directory of config's model, dataset and split (rundir.RunDir)."""
    from truthmap.lm.models import model_slug
    from truthmap.rundir import RunDir

    return RunDir(config.runs_dir, model_slug(config.model), config.dataset, config.split)


def load_config_records(config: RunConfig):
    """(dataset entry, the records of config's split and subsample)."""
    from truthmap.datasets import CustomSource, get_spec, load_records

    spec = get_spec(config.dataset)
    custom = None
    if config.dataset == "custom":
        if not config.custom_path:
            raise ConfigError("Dataset 'custom' needs a file: pass --custom-path FILE.csv|FILE.jsonl.")
        custom = CustomSource(config.custom_path, config.question_column, config.answer_column)
    records = load_records(config.dataset, config.split, config.data_dir, config.n_samples, config.seed, custom)
    return spec, records

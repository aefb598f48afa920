"""The run directory: the one contract between stages. Every path, column and store shape is defined here.

    runs/<model-slug>/<dataset>/<split>/
        run.json                    config, seed, package versions of the answers stage
        resolved_config.json        site -> the configuration `truthmap run` last used (defaults < study file < flags)
        report.html                 the self-contained report (`truthmap report`, and the end of `truthmap run`)
        answers.parquet             one row per sample (ANSWER_COLUMNS)
        work/generations/part-*.parquet   checkpoints of the generation stage, one per finished batch
        work/extractions/part-*.parquet   checkpoints of the exact-answer extraction, one per finished batch
        work/shards/<k>-of-<n>/     `--executor ray`: shard k's generations/, extractions/, activations/<site>/
        activations/<site>/acts.f16       float16, cell-major [layers, positions, samples, hidden]
        activations/<site>/embed.f16      float16, [1, positions, samples, hidden]: the input embedding (embed row)
        activations/<site>/meta.json      shape, embed_shape, dtype, what made it, and how many samples are written
        probes/<site>/heatmap.png|svg|csv, top_cells.json, probes.json (text-only controls, verdict)
        probes/<site>/selectivity.png|svg|csv   AUC minus the best text-only control, per cell
        baselines.parquet           per-row error scores of the logit baselines and p(True) (`truthmap table`)
        detector_<site>.json        a saved detector fitted on this run (`truthmap fit-detector`)
        detector_scores.parquet     id, error_probability, in_train: that detector applied to this run's rows
        resamples/                  K sampled answers per question, error types, answer selection (`truthmap resample`)
    runs/<model-slug>/tables/detection_table.csv|md|png      Table 1 over datasets (`truthmap table`)
    runs/<model-slug>/generalization/auc*.csv|png, text_controls.csv  train on one, test on another (`generalize`)

Stages never import each other: each reads what the previous one wrote here, and writes atomically (temp file
+ os.replace), so a killed run never leaves a half-written artifact and a rerun resumes where it stopped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from truthmap.errors import ConfigError

NAMED_POSITIONS = (
    "last_q",
    "first_answer",
    "second_answer",
    "exact_answer_before_first",
    "exact_answer_first",
    "exact_answer_last",
    "exact_answer_after_last",
)
POSITIONS = NAMED_POSITIONS + tuple(str(k) for k in range(-8, 0))
EXACT_POSITIONS = tuple(p for p in NAMED_POSITIONS if p.startswith("exact_answer"))

# answers.parquet: column -> meaning. Positions are absolute indices into prompt_ids + answer_ids.
ANSWER_COLUMNS = {
    "id": "stable record id from the dataset loader",
    "question": "the question as in the dataset",
    "prompt": "the user message (instruct) or plain prompt (base) given to the model",
    "gold": "list of gold answers / aliases, or the gold label",
    "group": "linked-rows group (WinoBias pairs), null when unlinked",
    "answer": "generated text, decoded from answer_ids",
    "correct": "bool, the dataset's correctness rule",
    "exact_answer": "the span of `answer` that carries the answer ('' when none)",
    "exact_answer_valid": "bool, the exact answer was found in the answer and mapped to tokens",
    "exact_answer_source": "gold_match | label | extracted | no_answer | not_found | token_mismatch",
    "exact_start": "character start of the exact answer in `answer` (-1 when invalid)",
    "exact_end": "character end (exclusive), -1 when invalid",
    "prompt_ids": "list[int], prompt token ids (chat template applied)",
    "answer_ids": "list[int], generated token ids without the stop token",
    "answer_logprobs": "list[float], log-probability of each generated token",
    "stopped": "bool, generation ended on a stop token (not on max_new_tokens)",
    "prompt_len": "len(prompt_ids)",
    "answer_len": "len(answer_ids)",
    **{f"pos_{p}": f"token index of position {p}" for p in POSITIONS},  # exact_answer_*: -1 when invalid
}


def position_column(position: str) -> str:
    return f"pos_{position}"


class RunDir:
    def __init__(self, root: str | Path, model_slug: str, dataset: str, split: str):
        self.path = Path(root) / model_slug / dataset / split

    @classmethod
    def from_path(cls, path: str | Path) -> "RunDir":
        """The run at a path of the form <root>/<model-slug>/<dataset>/<split>."""
        path = Path(path)
        if len(path.parts) < 3:
            raise ConfigError(f"{path} is not a run directory: expected runs/<model>/<dataset>/<split>.")
        return cls(path.parents[2], *path.parts[-3:])

    answers = property(lambda self: self.path / "answers.parquet")
    run_json = property(lambda self: self.path / "run.json")
    resolved_config = property(lambda self: self.path / "resolved_config.json")
    report = property(lambda self: self.path / "report.html")
    generation_parts = property(lambda self: self.path / "work" / "generations")
    extraction_parts = property(lambda self: self.path / "work" / "extractions")

    baselines = property(lambda self: self.path / "baselines.parquet")
    detector_scores = property(lambda self: self.path / "detector_scores.parquet")
    resamples = property(lambda self: self.path / "resamples")
    model_dir = property(lambda self: self.path.parent.parent)  # runs/<model-slug>: study-level results
    tables = property(lambda self: tables_dir(self.model_dir))
    generalization = property(lambda self: generalization_dir(self.model_dir))

    def detector(self, site: str) -> Path:
        return self.path / f"detector_{site}.json"

    def shard(self, k: int, n: int) -> Path:
        """Work of shard k of n (`--executor ray`), laid out as the run's own work; merged into the run's files."""
        return self.path / "work" / "shards" / f"{k}-of-{n}"

    def activations(self, site: str) -> Path:
        return self.path / "activations" / site

    def probes(self, site: str) -> Path:
        return self.path / "probes" / site


def tables_dir(model_dir: str | Path) -> Path:
    return Path(model_dir) / "tables"


def generalization_dir(model_dir: str | Path) -> Path:
    return Path(model_dir) / "generalization"


def write_atomic(path: Path, write) -> None:
    """Call write(tmp_path), then move the result into place in one step."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, data) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, default=str) + "\n"))


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def write_parquet(path: Path, frame) -> None:
    write_atomic(path, lambda tmp: frame.to_parquet(tmp, index=False))


def check_matches(saved: dict, wanted: dict, where: Path) -> None:
    """Refuse to resume work made with other settings; name the first key that differs."""
    for key, value in wanted.items():
        if key in saved and saved[key] != value:
            raise ConfigError(
                f"{where} was made with {key}={saved[key]!r}, not {value!r}. "
                "Use another --runs-dir, or delete that directory to start over."
            )


class Checkpoints:
    """Finished batches of a stage, one parquet part each, keyed by record id; resume skips what is done."""

    def __init__(self, directory: Path, settings: dict):
        self.directory = Path(directory)
        meta_path = self.directory / "settings.json"
        if meta_path.exists():
            check_matches(read_json(meta_path), settings, self.directory)
        else:
            write_json(meta_path, settings)

    def parts(self) -> list[Path]:
        return sorted(self.directory.glob("part-*.parquet"))

    def load(self):
        import pandas as pd

        parts = self.parts()
        return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True) if parts else pd.DataFrame()

    def done_ids(self) -> set[str]:
        frame = self.load()
        return set(frame["id"]) if len(frame) else set()

    def write(self, frame) -> None:
        write_parquet(self.directory / f"part-{len(self.parts()):06d}.parquet", frame)


def package_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("truthmap", "torch", "transformers", "numpy", "pandas", "scikit-learn"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found

"""The run directory: the one contract between stages. Every path, column and store shape is defined here.

    runs/<model-slug>/<dataset>/<split>/
        run.json                    config, seed, package versions, model identity of the answers stage; for an
                                    imported run, "import": the answers file (path, sha256, rows) and what was skipped
        resolved_config.json        site -> the configuration `truthmap run` last used (defaults < study file < flags)
        report.html                 the self-contained report (`truthmap report`, and the end of `truthmap run`)
        answers.parquet             one row per sample (ANSWER_COLUMNS)
        work/generations/part-*.parquet   checkpoints of the generation stage, one per finished batch
        work/extractions/part-*.parquet   checkpoints of the exact-answer extraction, one per finished batch
        work/imports/part-*.parquet       `truthmap import`: the answer tokens' log-probabilities, one part per batch
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

import contextlib
import hashlib
import json
import os
from pathlib import Path

from truthmap.errors import ConfigError, StoreError, check_name

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


def check_token(token) -> None:
    """A probed token is one of POSITIONS, by name ('exact_answer_last', '-1'); else a ConfigError listing them."""
    check_name("token", token, POSITIONS)

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
    "exact_answer_source": "extracted | gold_match | label | given (imported) | no_answer | not_found | token_mismatch",
    "exact_start": "character start of the exact answer in `answer` (-1 when invalid)",
    "exact_end": "character end (exclusive), -1 when invalid",
    "gold_start": "character start of the earliest gold alias in a correct answer (-1: incorrect, or none found)",
    "gold_end": "character end (exclusive) of that alias, -1 when none",
    "gold_first_token": "index into prompt_ids + answer_ids of the gold alias's first token, -1 when none",
    "gold_last_token": "index of the gold alias's last token, -1 when none",
    "prompt_ids": "list[int], prompt token ids (chat template applied)",
    "answer_ids": "list[int], generated token ids without the stop token",
    "answer_logprobs": "list[float], log-probability of each generated token",
    "stopped": "bool, the answer ended (stop token, or line break after a base prompt) before max_new_tokens",
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
    lock = property(lambda self: self.path / ".lock")  # held by the one process writing this run (run_lock)
    run_json = property(lambda self: self.path / "run.json")
    resolved_config = property(lambda self: self.path / "resolved_config.json")
    report = property(lambda self: self.path / "report.html")
    generation_parts = property(lambda self: self.path / "work" / "generations")
    extraction_parts = property(lambda self: self.path / "work" / "extractions")
    import_parts = property(lambda self: self.path / "work" / "imports")

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


REBUILD = "delete it and rerun the command that wrote it"
ANSWERS_FIX = ("delete it and rerun `truthmap generate` (or `truthmap run`) with the same options to rebuild it from "
               "the checkpoints in work/")


def read_json(path: Path, fix: str = REBUILD):
    """A JSON file of the run; a damaged one (a killed write of an older version, a hand edit) is named."""
    try:
        return json.loads(Path(path).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StoreError(f"{path} is damaged (not valid JSON: {err}); {fix}.") from None


def read_parquet(path: Path, columns=None, fix: str = REBUILD):
    """A parquet file of the run; a truncated or damaged one is named with what rebuilds it."""
    import pandas as pd

    try:
        return pd.read_parquet(path, columns=columns)
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        if not Path(path).is_file():
            raise
        reason = (str(err).strip().split(". ")[0].split("': ")[-1] or type(err).__name__).rstrip(".")  # no path again
        raise StoreError(f"{path} is damaged ({reason}); {fix}.") from None


def write_parquet(path: Path, frame) -> None:
    write_atomic(path, lambda tmp: frame.to_parquet(tmp, index=False))


def file_sha256(path: str | Path) -> str:
    """The content hash of an input file: a run records it, so a file edited in place is not taken for the same."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# How a changed setting is described when its raw values say little.
CHANGED = {
    "custom_sha256": "from another content of the custom file (sha256 {saved:.12}..., now {value:.12}...: edited since)",
    "import_sha256": "from another answers file (sha256 {saved:.12}..., this one {value:.12}...)",
}


def check_matches(saved: dict, wanted: dict, where: Path) -> None:
    """Refuse to resume work made with other settings; name the first key that differs."""
    for key, value in wanted.items():
        if key in saved and saved[key] != value:
            made = CHANGED[key].format(saved=saved[key], value=value) if key in CHANGED else (
                f"with {key}={saved[key]!r}, not {value!r}")
            raise StoreError(
                f"{where} was made {made}. Use another --runs-dir, or delete that directory to start over."
            )


def check_checkpoints(directory: Path, settings: dict) -> None:
    """Refuse checkpoints made with other settings (before any model loads, and when they are opened)."""
    meta_path = Path(directory) / "settings.json"
    if meta_path.exists():
        check_matches(read_json(meta_path), settings, directory)


_HELD: set[str] = set()  # locks this process holds: run_all holds the lock its stages take again


@contextlib.contextmanager
def run_lock(run: "RunDir"):
    """One writer per run directory: a second process stops at once, naming the first one's pid.

    An flock on run.lock: the kernel drops it when its holder dies, even by kill -9, so a lock never outlives its
    run. The file is removed on release (checked by inode on taking it), and so are the directories that were
    created only to hold it, so a command that fails on its input leaves nothing behind.
    """
    try:
        import fcntl
    except ImportError:  # Windows: no flock; runs are not locked there
        yield
        return
    path = run.lock
    key = os.path.abspath(path)
    if key in _HELD:
        yield
        return
    created = [p for p in (run.path, *run.path.parents[:3]) if not p.exists()]
    while True:
        run.path.mkdir(parents=True, exist_ok=True)  # again: a holder that just ended may have removed it
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip()
            f.close()
            who = f"pid {holder}" if holder.isdigit() else "another process"
            raise StoreError(
                f"{run.path} is in use by another truthmap run ({who}); wait for it to finish, or stop it, "
                "then run this again."
            ) from None
        with contextlib.suppress(FileNotFoundError):
            if os.fstat(f.fileno()).st_ino == os.stat(path).st_ino:
                break
        f.close()  # the previous holder removed the file after we opened it: lock the one there now
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    _HELD.add(key)
    try:
        yield
    finally:
        _HELD.discard(key)
        path.unlink(missing_ok=True)
        f.close()
        for directory in created:  # deepest first; one that now holds anything stays
            with contextlib.suppress(OSError):
                directory.rmdir()


class Checkpoints:
    """Finished batches of a stage, one parquet part each, keyed by record id; resume skips what is done.

    A part is never changed once written (a damaged one is deleted and its batch written again under a new
    number), so each is read once: a stage that asks after every batch what is done reads only the new parts."""

    def __init__(self, directory: Path, settings: dict):
        self.directory = Path(directory)
        self.read: dict[Path, object] = {}  # part -> its frame
        meta_path = self.directory / "settings.json"
        if meta_path.exists():
            check_checkpoints(self.directory, settings)
        else:
            write_json(meta_path, settings)

    def parts(self) -> list[Path]:
        return sorted(self.directory.glob("part-*.parquet"))

    def batches(self) -> list:
        """Each finished batch's frame, in the order they were written."""
        parts = self.parts()
        fix = "delete it and rerun the same command: that batch is made again"
        self.read = {p: self.read[p] if p in self.read else read_parquet(p, fix=fix) for p in parts}
        return list(self.read.values())

    def load(self):
        import pandas as pd

        frames = self.batches()
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def done_ids(self) -> set[str]:
        frame = self.load()
        return set(frame["id"]) if len(frame) else set()

    def write(self, frame) -> None:
        # After the last part, not at the count of parts: once a damaged part is deleted, the count is a taken number.
        parts = self.parts()
        number = int(parts[-1].stem.removeprefix("part-")) + 1 if parts else 0
        path = self.directory / f"part-{number:06d}.parquet"
        write_parquet(path, frame)
        self.read.pop(path, None)  # read back on the next load, as parquet gives it (dtypes)


def package_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("truthmap", "torch", "transformers", "numpy", "pandas", "scikit-learn"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found

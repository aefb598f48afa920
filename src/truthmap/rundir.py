"""The run directory: the one contract between stages. Every path, column and store shape is defined here.

    runs/<model-slug>/<dataset>/<split>/                       RunDir
        run.json                    RUN_JSON's keys: settings, config, model identity of the answers stage, ...;
                                    for an imported run, "import": the answers file (path, sha256, rows), skips
        resolved_config.json        site -> the configuration `truthmap run` last used (defaults < study file < flags)
        .lock                       held by the one process writing this run (runstate.run_lock), removed on release
        report.html                 the self-contained report (`truthmap report`, and the end of `truthmap run`)
        answers.parquet             one row per sample (ANSWER_COLUMNS: column -> type, meaning)
        work/generations/           Checkpoint: settings.json, part-<n>.parquet per finished batch of generation
        work/extractions/           the same for the exact-answer extraction
        work/imports/               `truthmap import`: the answer tokens' log-probabilities
        work/shards/<k>-of-<n>/     `--executor ray`: shard k's generations/, extractions/, activations/<site>/
        activations/<site>/         Store: acts.f16 (STORE_DTYPE, cell-major [layers, positions, samples, hidden]),
                                    embed.f16 ([1, positions, samples, hidden]: the input embedding row),
                                    meta.json (shape, embed_shape, dtype, what made it, samples written)
        probes/<site>/              ProbeFiles: heatmap.png|svg|csv, selectivity.png|svg|csv (AUC minus the best
                                    text-only control), top_cells.json, probes.json (counts, controls, verdict)
        baselines.parquet           per-row error scores of the logit baselines and p(True) (`truthmap table`)
        detector_<site>/            DetectorFiles: a saved detector fitted on this run (`truthmap fit-detector`):
                                    config.json, model.safetensors, README.md (format 2: detector_<site>.json|.npz)
        detector_scores.parquet     DETECTOR_SCORE_COLUMNS: that detector applied to this run's rows
        resamples/                  ResampleFiles (`truthmap resample`): resamples.json (the steps done),
                                    answers.parquet (RESAMPLE_COLUMNS), cell_acts.npy, greedy_cell_acts.npy,
                                    error_types.csv, error_type_counts.json, type_probes.csv, selection.csv|png,
                                    selection_choices.csv; work/generations/, work/extractions/, work/cell-*/
    runs/<model-slug>/tables/       TableFiles: detection_table.csv|md|png, detection_results.json (`truthmap table`)
    runs/<model-slug>/generalization/   GeneralizationFiles: auc*.csv|png, text_controls.csv, generalization.json

ARTIFACTS and MODEL_ARTIFACTS list every file above as patterns; tests/test_rundir_contract.py walks a whole study
against them, and checks that no other module builds a path from a string.

Stages never import each other: each reads what the previous one wrote here, and writes atomically (temp file
+ os.replace, write_atomic below), so a killed run never leaves a half-written artifact and a rerun resumes where it
stopped. Who may write a run now (the lock), its checkpoints and the resume checks live in runstate.py.
"""

from __future__ import annotations

import contextlib
import errno
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

# answers.parquet: column -> (type, meaning). Types are logical, as parquet stores them whatever pandas writes or
# reads them as: str, bool, int64, float64, list[int] ...; "str | None": null allowed. Positions are absolute
# indices into prompt_ids + answer_ids.
ANSWER_COLUMNS = {
    "id": ("str", "stable record id from the dataset loader"),
    "question": ("str", "the question as in the dataset"),
    "prompt": ("str", "the user message (instruct) or plain prompt (base) given to the model"),
    "gold": ("list[str]", "gold answers / aliases, or the gold label"),
    "group": ("str | None", "linked-rows group (WinoBias pairs), None when unlinked"),
    "answer": ("str", "generated text, decoded from answer_ids"),
    "correct": ("bool", "the dataset's correctness rule"),
    "exact_answer": ("str", "the span of `answer` that carries the answer ('' when none)"),
    "exact_answer_valid": ("bool", "the exact answer was found in the answer and mapped to tokens"),
    "exact_answer_source": ("str", "extracted | gold_match | label | given (imported) | no_answer | not_found | "
                                   "token_mismatch"),
    "exact_start": ("int64", "character start of the exact answer in `answer` (-1 when invalid)"),
    "exact_end": ("int64", "character end (exclusive), -1 when invalid"),
    "gold_start": ("int64", "character start of the earliest gold alias in a correct answer (-1: incorrect, or none)"),
    "gold_end": ("int64", "character end (exclusive) of that alias, -1 when none"),
    "gold_first_token": ("int64", "index into prompt_ids + answer_ids of the gold alias's first token, -1 when none"),
    "gold_last_token": ("int64", "index of the gold alias's last token, -1 when none"),
    "prompt_ids": ("list[int]", "prompt token ids (chat template applied)"),
    "answer_ids": ("list[int]", "generated token ids without the stop token"),
    "answer_logprobs": ("list[float]", "log-probability of each generated token"),
    "stopped": ("bool", "the answer ended (stop token, or line break after a base prompt) before max_new_tokens"),
    "prompt_len": ("int64", "len(prompt_ids)"),
    "answer_len": ("int64", "len(answer_ids)"),
    **{f"pos_{p}": ("int64", f"token index of position {p}") for p in POSITIONS},  # exact_answer_*: -1 when invalid
}

# resamples/answers.parquet: the greedy answers' per-answer columns, plus `sample` (0..K-1).
RESAMPLE_COLUMNS = {
    "id": ANSWER_COLUMNS["id"],
    "sample": ("int64", "k, the sample's number (0..K-1) for its question"),
    **{c: v for c, v in ANSWER_COLUMNS.items() if c not in ("id", "question", "prompt", "gold", "group")},
}

# detector_scores.parquet: a saved detector applied to this run's rows (`truthmap fit-detector`).
DETECTOR_SCORE_COLUMNS = {
    "id": ("str", "the row's id in answers.parquet"),
    "error_probability": ("float64", "the detector's P(error); NaN without the detector's position (exact answer)"),
    "in_train": ("bool", "the row was one the detector was fitted on"),
}

# baselines.parquet: id, then one error score (float64, higher: more likely wrong) per baseline, named as in
# baselines.BASELINE_NAMES: logits_mean ... probas_max_exact, p_true, p_true_exact.
BASELINE_ID_COLUMN = {"id": ("str", "the row's id in answers.parquet")}
BASELINE_SCORE_DTYPE = "float64"

# run.json: key -> meaning. Written once per run by the answers stage (generate.write_answers); "import" only for
# an imported run.
RUN_JSON = {
    "settings": "what decides answers.parquet (generate.answers_settings or importer's); resume refuses a change",
    "config": "the RunConfig of the command that made the answers (config.to_dict)",
    "model_source": "where the weights were loaded from (hub name, local path, gguf)",
    "model_identity": "which weights made the answers (models.model_identity), None when unknown",
    "chat_template": "bool, the prompts went through the model's chat template (instruct) rather than plain (base)",
    "device": "the device the answers were made on",
    "dtype": "the dtype the model computed in",
    "n_samples": "rows of answers.parquet",
    "exact_answer_agreement": "exact answers against the gold alias's tokens (locate.gold_agreement)",
    "activations_while_generating": "the site whose store came from the answers' own decoding, None when none",
    "seconds": "wall time of the answers stage",
    "versions": "package versions (package_versions)",
    "import": "only for `truthmap import`: the answers file (path, sha256, rows) and what was skipped",
}
RUN_JSON_OPTIONAL = ("import",)

# activations/<site>/: the store. acts.f16 is cell-major [layers, positions, samples, hidden]; embed.f16 is
# [1, positions, samples, hidden]; both raw float16 (np.memmap), their shapes in meta.json.
STORE_DTYPE = "float16"
STORE_LAYOUT = "layers x positions x samples x hidden"


def position_column(position: str) -> str:
    return f"pos_{position}"


def _file(name: str):
    """A file of a folder object below, by its name on disk (listed by `files`, for ARTIFACTS)."""
    prop = property(lambda self: self.path / name)
    prop.fget.filename = name
    return prop


def files(folder: type) -> list[str]:
    """The file names a folder class declares with _file."""
    return [v.fget.filename for v in vars(folder).values() if isinstance(v, property) and hasattr(v.fget, "filename")]


class Folder:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"


class Checkpoint(Folder):
    """work/<stage>/: settings.json (what made the batches) and one part-<number>.parquet per finished batch."""

    settings = _file("settings.json")
    PART = "part-*.parquet"

    def part(self, number: int) -> Path:
        return self.path / f"part-{number:06d}.parquet"

    def parts(self) -> list[Path]:
        return sorted(self.path.glob(self.PART))

    @staticmethod
    def number(part: Path) -> int:
        return int(part.stem.removeprefix("part-"))


class Store(Folder):
    """activations/<site>/ (or a shard's): the float16 store, the input-embedding row beside it, their meta.json."""

    acts = _file("acts.f16")  # STORE_DTYPE, [layers, positions, samples, hidden] (STORE_LAYOUT)
    embed = _file("embed.f16")  # STORE_DTYPE, [1, positions, samples, hidden]
    meta = _file("meta.json")  # shape, embed_shape, dtype, what made it, samples written


class Work(Folder):
    """work/ of a run, of one of its shards (`--executor ray`), or of its resamples: the stages' checkpoints."""

    generations = property(lambda self: Checkpoint(self.path / "generations"))
    extractions = property(lambda self: Checkpoint(self.path / "extractions"))
    imports = property(lambda self: Checkpoint(self.path / "imports"))  # `truthmap import`: answer log-probabilities

    def store(self, site: str) -> Store:
        """A shard's store of site, merged into the run's (activations/<site>/) when every shard is done."""
        return Store(self.path / "activations" / site)

    def shard(self, k: int, n: int) -> "Work":
        """Work of shard k of n (`--executor ray`), laid out as the run's own work; merged into the run's files."""
        return Work(self.path / "shards" / f"{k}-of-{n}")

    def cell(self, site: str, layer: int, token: str) -> Checkpoint:
        """resamples/work/: the resampled answers' activations at one (site, layer, token) cell."""
        return Checkpoint(self.path / f"cell-{site}-{layer}-{token}")


class ProbeFiles(Folder):
    """probes/<site>/: the probe stage's outputs."""

    heatmap_png = _file("heatmap.png")
    heatmap_svg = _file("heatmap.svg")
    heatmap_csv = _file("heatmap.csv")  # AUC per (layer, token): `make demo`'s output
    selectivity_png = _file("selectivity.png")  # AUC minus the best text-only control, per cell
    selectivity_svg = _file("selectivity.svg")
    selectivity_csv = _file("selectivity.csv")
    top_cells = _file("top_cells.json")
    summary = _file("probes.json")  # what made it, counts, best cell, text-only controls, verdict


class ResampleFiles(Folder):
    """resamples/: K sampled answers per question, error types, answer selection (`truthmap resample`)."""

    state = _file("resamples.json")  # what made the answers, the cell, then the analysis summary
    answers = _file("answers.parquet")  # RESAMPLE_COLUMNS
    cell_acts = _file("cell_acts.npy")  # float16 [answers, width] at the cell
    greedy_cell_acts = _file("greedy_cell_acts.npy")  # float16 [questions, width]
    error_types = _file("error_types.csv")
    error_type_counts = _file("error_type_counts.json")
    type_probes = _file("type_probes.csv")
    selection_csv = _file("selection.csv")
    selection_choices = _file("selection_choices.csv")
    selection_png = _file("selection.png")
    work = property(lambda self: Work(self.path / "work"))


class TableFiles(Folder):
    """runs/<model-slug>/tables/: the detection table over datasets (`truthmap table`)."""

    csv = _file("detection_table.csv")
    md = _file("detection_table.md")
    png = _file("detection_table.png")
    results = _file("detection_results.json")
    metrics_csv = _file("detection_metrics.csv")  # AUPRC, PRR, FPR@95, AURC beside the AUROC (metrics.py)
    risk_coverage_png = _file("risk_coverage.png")
    cost_csv = _file("cost_table.csv")  # AUC, interval and cost per answer of each method (costs.py)
    cost_png = _file("auroc_vs_cost.png")


class GeneralizationFiles(Folder):
    """runs/<model-slug>/generalization/: train on one dataset, test on another (`truthmap generalize`)."""

    MATRICES = ("auc", "auc_minus_baseline", "auc_minus_control")
    auc_csv = _file("auc.csv")
    auc_png = _file("auc.png")
    auc_minus_baseline_csv = _file("auc_minus_baseline.csv")
    auc_minus_baseline_png = _file("auc_minus_baseline.png")
    auc_minus_control_csv = _file("auc_minus_control.csv")
    auc_minus_control_png = _file("auc_minus_control.png")
    text_controls = _file("text_controls.csv")
    summary = _file("generalization.json")

    def matrix(self, stem: str) -> tuple[Path, Path]:
        """(csv, png) of one of MATRICES."""
        return getattr(self, f"{stem}_csv"), getattr(self, f"{stem}_png")


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

    answers = _file("answers.parquet")
    lock = _file(".lock")  # held by the one process writing this run (runstate.run_lock); removed on release
    run_json = _file("run.json")
    resolved_config = _file("resolved_config.json")
    report = _file("report.html")
    baselines = _file("baselines.parquet")
    detector_scores = _file("detector_scores.parquet")
    costs = _file("costs.json")  # seconds per answer of the stages that cost model time (record_seconds)

    work = property(lambda self: Work(self.path / "work"))
    generation_parts = property(lambda self: self.work.generations.path)
    extraction_parts = property(lambda self: self.work.extractions.path)
    import_parts = property(lambda self: self.work.imports.path)
    resamples = property(lambda self: self.path / "resamples")
    resample_files = property(lambda self: ResampleFiles(self.resamples))
    model_dir = property(lambda self: self.path.parent.parent)  # runs/<model-slug>: study-level results
    tables = property(lambda self: tables_dir(self.model_dir))
    table_files = property(lambda self: TableFiles(self.tables))
    generalization = property(lambda self: generalization_dir(self.model_dir))
    generalization_files = property(lambda self: GeneralizationFiles(self.generalization))

    def detector(self, site: str) -> Path:
        """The directory of the detector fitted on this run (DetectorFiles); format 2 was detector_<site>.json."""
        return self.path / f"detector_{site}"

    def shard(self, k: int, n: int) -> Path:
        return self.work.shard(k, n).path

    def activations(self, site: str) -> Path:
        return self.path / "activations" / site

    def store(self, site: str) -> Store:
        return Store(self.activations(site))

    def probes(self, site: str) -> Path:
        return self.path / "probes" / site

    def probe_files(self, site: str) -> ProbeFiles:
        return ProbeFiles(self.probes(site))

    def store_sites(self) -> list[str]:
        """Sites with a store begun (activations/<site>/meta.json)."""
        return sorted(p.name for p in (self.path / "activations").glob("*") if Store(p).meta.exists())

    def probe_sites(self) -> list[str]:
        return sorted(p.name for p in (self.path / "probes").glob("*") if p.is_dir())

    def detector_sites(self) -> list[str]:
        """Sites of the detectors saved in this run (detector_<site>/config.json, or format 2's detector_<site>.json)."""
        found = {p.parent.name for p in self.path.glob("detector_*/config.json")}
        found |= {p.stem for p in self.path.glob("detector_*.json")}
        return sorted(name.removeprefix("detector_") for name in found)


def tables_dir(model_dir: str | Path) -> Path:
    return Path(model_dir) / "tables"


def generalization_dir(model_dir: str | Path) -> Path:
    return Path(model_dir) / "generalization"


class DetectorFiles(Folder):
    """A saved detector (`Detector.save_pretrained`): a folder that `huggingface_hub.upload_folder` publishes as is."""

    config = _file("config.json")  # settings, model and dataset identity, calibration, thresholds, test metrics
    weights = _file("model.safetensors")  # the probe's arrays and the calibration's parameters
    card = _file("README.md")  # the model card, written from config.json


def detector_weights(path: str | Path) -> Path:
    """The .npz beside a detector's .json (the arrays; the JSON holds the rest)."""
    return Path(path).with_suffix(".npz")


def begun_runs(root: str | Path) -> list[Path]:
    """Every <root>/<model-slug>/<dataset>/<split> that has begun (answers, run.json or generation checkpoints)."""
    any_run = RunDir("", "*", "*", "*")
    marks = (any_run.answers, any_run.run_json, any_run.work.path)
    return sorted({p.parent for mark in marks for p in Path(root).glob(str(mark))})


def runs_below(path: str | Path) -> list[Path]:
    """Run directories anywhere below path (those with answers), for a 'did you mean'."""
    return sorted(p.parent for p in Path(path).rglob(RunDir.answers.fget.filename))


# Every file a run may hold, as patterns relative to the run directory ("*": one path component), and those of
# runs/<model-slug>/. tests/test_rundir_contract.py walks finished runs against them.
def _patterns(prefix: str, folder: type) -> list[str]:
    return [f"{prefix}{name}" for name in files(folder)]


def _checkpoint_patterns(prefix: str) -> list[str]:
    return [f"{prefix}{name}" for name in (*files(Checkpoint), Checkpoint.PART)]


def _work_patterns(prefix: str, stages: tuple[str, ...], store: bool) -> list[str]:
    found = [p for stage in stages for p in _checkpoint_patterns(f"{prefix}{stage}/")]
    return found + (_patterns(f"{prefix}activations/*/", Store) if store else [])


ARTIFACTS = [
    *files(RunDir),
    "detector_*.json",  # format 2
    "detector_*.npz",
    *_patterns("detector_*/", DetectorFiles),
    *_work_patterns("work/", ("generations", "extractions", "imports"), store=False),
    *_work_patterns("work/shards/*/", ("generations", "extractions"), store=True),
    *_patterns("activations/*/", Store),
    *_patterns("probes/*/", ProbeFiles),
    *_patterns("resamples/", ResampleFiles),
    *_work_patterns("resamples/work/", ("generations", "extractions"), store=False),
    *_checkpoint_patterns("resamples/work/cell-*/"),
]
MODEL_ARTIFACTS = [*_patterns("tables/", TableFiles), *_patterns("generalization/", GeneralizationFiles)]


def matches(relative: str | Path, patterns: list[str]) -> bool:
    """Whether a path relative to a run (or model) directory is one of the patterns, component by component."""
    import fnmatch

    parts = Path(relative).parts
    return any(len(parts) == len(p.split("/")) and all(map(fnmatch.fnmatchcase, parts, p.split("/")))
               for p in patterns)


ROOM = "Free some space (or use another --runs-dir) and run the same command again: finished work resumes."


@contextlib.contextmanager
def space_for(path: Path):
    """A full disk while writing path: a StoreError naming the file, not a raw OSError [Errno 28]. What was
    written before is whole (files are replaced atomically, the store says which rows it holds), so a rerun
    with space resumes."""
    try:
        yield
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
        raise StoreError(f"No space left on the disk to write {path}. {ROOM}") from None


def human_size(n: float) -> str:
    """Bytes as a person reads them: '500 bytes', '23.0 KB', '1.4 GB' (powers of 1000, as df -H)."""
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def write_atomic(path: Path, write) -> None:
    """Call write(tmp_path), then move the result into place in one step."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with space_for(path):
            write(tmp)
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, data) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, default=str) + "\n"))


def write_run_json(run: RunDir, record: dict) -> None:
    """run.json, holding only RUN_JSON's keys: a new key is declared (and described) there first."""
    undeclared = sorted(set(record) - set(RUN_JSON))
    if undeclared:
        raise StoreError(f"run.json key {undeclared[0]!r} is not declared in rundir.RUN_JSON; declare it there.")
    write_json(run.run_json, record)


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


def package_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("truthmap", "torch", "transformers", "numpy", "pandas", "scikit-learn"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


class ResultsPages(Folder):
    """docs/results/ (`make results`): a page per study of docs/results.toml, its figures and its numbers."""

    index = _file("index.md")  # every study's headline, with links to the pages

    def page(self, study: str) -> Path:
        return self.path / f"{study}.md"

    def summary(self, study: str) -> Path:
        """The numbers and stamp the page was written from (JSON): the index is rebuilt from these."""
        return self.path / f"{study}.json"

    def figure(self, study: str, run_name: str, figure: str) -> Path:
        """A figure copied from a run's probes/<site>/ (figure: `heatmap`, `selectivity`)."""
        return self.path / study / f"{run_name}-{figure}.png"

    def pages(self) -> list[Path]:
        return sorted(self.path.glob("*.md"))


def require_answers(run: RunDir) -> None:
    if not run.answers.exists():
        raise StoreError(f"No answers in {run.path}. Run `truthmap generate` with the same options first.")


def answers_table(run: RunDir):
    """answers.parquet of run, refused with one line when missing or damaged."""
    require_answers(run)
    return read_parquet(run.answers, fix=ANSWERS_FIX)


def record_seconds(path: Path, stage: str, seconds: float, answers: int) -> None:
    """Add a stage's seconds per answer to a run's costs.json (RunDir.costs; costs.py reads it)."""
    saved = read_json(path) if path.exists() else {}
    write_json(path, saved | {stage: {"seconds_per_answer": round(seconds / max(1, answers), 5), "answers": answers}})

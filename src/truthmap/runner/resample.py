"""Resampling: K sampled answers per question, each labelled, located and read at one (layer, token) cell.

Each (question, k) samples with its own generator, seeded from (seed, question id, k): the answers do not depend
on the batch size, on the order of the work, or on which other questions are resampled. Every step writes a
checkpoint per finished batch, keyed by `row_key(id, k)`, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path

from truthmap import rundir, runstate
from truthmap.analysis.error_types import ERROR_TYPES, vote_text
from truthmap.batches import load_in_order, run_batches
from truthmap.errors import ConfigError, ProbeError, StoreError
from truthmap.lm.decoding import generate_batch
from truthmap.rundir import (
    EXACT_POSITIONS,
    POSITIONS,
    ResampleFiles,
    Work,
    check_token,
    position_column,
    read_json,
    write_atomic,
    write_json,
    write_parquet,
)
from truthmap.runstate import Checkpoints
from truthmap.stages.activations import FLOAT16_MAX  # as the greedy store: values beyond float16's range are clipped
from truthmap.stages.generate import answer_stop, generation_columns, stop_at_text


def row_key(question_id: str, k: int) -> str:
    return f"{question_id}#{k}"


def sample_seed(seed: int, question_id: str, k: int) -> int:
    """A 63-bit seed for one (question, k), stable across runs and platforms (unlike Python's hash)."""
    digest = hashlib.sha256(f"{seed}|{question_id}|{k}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def sample_answers(lm, greedy, n_resamples: int, temperature: float, seed: int, max_new_tokens: int, batch_size: int,
                   checkpoints: Checkpoints, stop_ids: list[int], stop_text: str | None = None):
    """greedy: frame with id and prompt_ids. Returns one row per (id, sample): id, sample, prompt_ids, answer_ids,
    answer_logprobs, stopped, answer; in the order of greedy's ids, then k. Answers end as the greedy ones do: at a
    stop token, and at stop_text (generate.answer_stop) when given."""
    import pandas as pd

    todo = [
        (row_key(question_id, k), question_id, k, [int(t) for t in prompt])
        for question_id, prompt in zip(greedy["id"], greedy["prompt_ids"])
        for k in range(n_resamples)
    ]
    stop_check = stop_at_text(lm.tokenizer, stop_text)

    def sample(batch):
        seeds = [sample_seed(seed, question_id, k) for _, question_id, k, _ in batch]
        prompts = [prompt for *_, prompt in batch]
        generations = generate_batch(
            lm.model, lm.tokenizer, prompts, max_new_tokens, stop_ids, temperature, row_seeds=seeds,
            stop_check=stop_check,
        )
        return pd.DataFrame(
            {
                "id": [key for key, *_ in batch],
                "question_id": [question_id for _, question_id, _, _ in batch],
                "sample": [k for _, _, k, _ in batch],
                "prompt_ids": prompts,
                **generation_columns(lm.tokenizer, generations),
            }
        )

    run_batches(todo, sample, checkpoints, batch_size=batch_size, description="Resampling answers",
                key=lambda item: item[0], length=lambda item: len(item[3]))
    keys = [key for key, *_ in todo]  # greedy's ids, then k
    return load_in_order(checkpoints, keys).reset_index(drop=True).rename(columns={"question_id": "id"})


def cell_activations(lm, frame, site: str, layer: int, token: str, batch_size: int, checkpoints: Checkpoints):
    """float16 [rows, width]: the site's output at (layer, token) for every row of frame (prompt_ids, answer_ids,
    pos_<token>, and a unique `key`). Rows without that position (-1) read the first token; callers mask them."""
    import numpy as np
    import pandas as pd

    from truthmap.lm.sites import read_cells

    sequences = [list(p) + list(a) for p, a in zip(frame["prompt_ids"], frame["answer_ids"])]
    positions = np.maximum(frame[position_column(token)].to_numpy(), 0)  # [rows]
    keys = list(frame["key"])

    def read(batch):
        values = read_cells(lm, [sequences[i] for i in batch], positions[batch][:, None], site)
        values = values[:, layer, 0, :].float().numpy()  # [batch, width]
        values = np.clip(values, -FLOAT16_MAX, FLOAT16_MAX).astype(np.float16)
        return pd.DataFrame({"id": [keys[i] for i in batch], "acts": [v.tobytes() for v in values]})

    run_batches(range(len(frame)), read, checkpoints, batch_size=batch_size, key=lambda i: keys[i],
                length=lambda i: len(sequences[i]), description=f"Reading {site} layer {layer} at {token}")
    stored = load_in_order(checkpoints, keys)["acts"]
    return np.stack([np.frombuffer(value, dtype=np.float16) for value in stored])


# --------------------------------------------------------------------------------------------- a whole resampling

RESAMPLE_COLUMNS = list(rundir.RESAMPLE_COLUMNS)  # resamples/answers.parquet, in order


def choose_questions(n: int, n_questions: int | None, seed: int):
    """Indices of the greedy rows to resample: all, or a seeded subset of n_questions, in the greedy order."""
    import numpy as np

    if n_questions is not None and n_questions < 1:
        raise ConfigError(f"Invalid --n-questions {n_questions}: expected an integer >= 1 (questions to resample).")
    if n_questions is None or n_questions >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, n_questions, replace=False))


def resolve_cell(probes_json: Path, site: str, layer: int | None, token: str | None, n_layers: int) -> dict:
    """The (layer, token) cell to read: the given one, else the best cell of the greedy train run's probes."""
    if layer is None or token is None:
        if not probes_json.exists():
            raise StoreError(
                f"No probes in {probes_json.parent} to take the best cell from. Run `truthmap run` on the train "
                "split first, or pass --layer and --token."
            )
        best = read_json(probes_json)["best"]
        layer = best["layer"] if layer is None else layer
        token = best["token"] if token is None else token
    check_token(token)
    if not 0 <= layer < n_layers:
        raise ConfigError(f"Invalid --layer {layer}: the model has {n_layers} layers (0 to {n_layers - 1}).")
    return {"site": site, "layer": int(layer), "token": token}


def greedy_cell(acts, cell: dict):
    """float16 [samples, width]: the greedy store's cell (open_store's [samples, layers, positions, hidden])."""
    import numpy as np

    return np.asarray(acts[:, cell["layer"], POSITIONS.index(cell["token"]), :], dtype=np.float16)


def resample_answers(lm, extractor, spec, records: dict, greedy, settings: dict, work: Work, batch_size: int,
                     locating: dict):
    """Sample, label and locate: the frame of resamples/answers.parquet (RESAMPLE_COLUMNS).

    settings: what made the greedy answers, plus n_resamples, temperature and resample_seed; it keys the sampling
    checkpoints, which other extraction settings or another subset of questions can therefore reuse.
    """
    from truthmap.lm.models import stop_token_ids
    from truthmap.stages.label import Extraction, label_and_locate

    generated = sample_answers(
        lm, greedy, settings["n_resamples"], settings["temperature"], settings["resample_seed"],
        settings["max_new_tokens"], batch_size, Checkpoints(work.generations.path, settings),
        stop_token_ids(lm.tokenizer, lm.model), answer_stop(spec, lm.is_chat),
    )
    # Each sample is its own row, keyed by row_key, located as the greedy answers were (locating: the greedy
    # run's "locate", "extractor" and "extraction_tries").
    keys = [row_key(i, k) for i, k in zip(generated["id"], generated["sample"])]
    keyed = [dataclasses.replace(records[i], id=key) for i, key in zip(generated["id"], keys)]
    checkpoints = Checkpoints(work.extractions.path, settings | locating)
    extract = Extraction(lambda: extractor, lambda: checkpoints, batch_size, locating["extractor"],
                         locating["extraction_tries"] or 1, settings["resample_seed"])
    frame = label_and_locate(spec, keyed, generated.assign(id=keys), lm.tokenizer, locating["locate"], extract,
                             answer_tokens=extractor.tokenizer is lm.tokenizer).assign(id=generated["id"].to_numpy())
    return frame[RESAMPLE_COLUMNS]


def save_npy(path: Path, array) -> None:
    import numpy as np

    def write(tmp):
        with open(tmp, "wb") as handle:  # a handle: np.save would add ".npy" to the temporary name
            np.save(handle, array)

    write_atomic(path, write)


def save_csv(path: Path, frame) -> None:
    write_atomic(path, lambda tmp: frame.to_csv(tmp, index=False))


# ------------------------------------------------------------------------------------------------------ analysis


def type_probes(types, greedy, greedy_acts, seeds):
    """AUC of a probe predicting each error type from the greedy answer's activations at the cell.

    Rows: greedy answers with a valid exact answer. One probe per type (the type against all other questions), a
    grouped, stratified split per seed (probes.probe_grid on one cell). A type with fewer than MIN_PER_CLASS
    questions in or out of it, or whose split fails, is reported as skipped, with the reason.
    """
    import numpy as np
    import pandas as pd

    from truthmap.analysis.probes import MIN_PER_CLASS, probe_grid

    valid = greedy["exact_answer_valid"].to_numpy(dtype=bool)
    X = greedy_acts[valid][:, None, None, :]  # [n, 1 layer, 1 position, width]: one cell for probe_grid
    groups = greedy["group"][valid].tolist()
    flags = types.set_index("id").loc[greedy["id"][valid]]
    rows = []
    for name, code in ERROR_TYPES.items():
        y = flags[name].to_numpy(dtype=bool)
        inside, outside = int(y.sum()), int((~y).sum())
        row = {"type": name, "code": code, "n": len(y), "with_type": inside, "without_type": outside,
               "auc_mean": np.nan, "auc_std": np.nan, "seeds": len(seeds), "skipped": ""}
        if min(inside, outside) < MIN_PER_CLASS:
            row["skipped"] = f"too few: {inside} with the type, {outside} without (need {MIN_PER_CLASS} of each)"
        else:
            try:
                grid = probe_grid(X, y, groups=groups, seeds=seeds, progress=False, name=name)
                row["auc_mean"], row["auc_std"] = float(grid.mean[0, 0]), float(grid.std[0, 0])
            except ProbeError as error:
                row["skipped"] = str(error)
        rows.append(row)
    return pd.DataFrame(rows)


def selection_candidates(greedy, answers, greedy_acts, cell_acts, token: str, n_folds: int, fold_seed: int):
    """One row per (question, candidate): the greedy answer (0) and the K samples (1..K), scored for selection.

    The error probe is cross-fitted on the greedy answers (selection.out_of_fold_error_probabilities); a
    candidate without the cell's position (no exact answer for an exact-answer token) gets no probe score.
    Returns the frame and a note on the probe ("" when it worked).
    """
    import numpy as np
    import pandas as pd

    from truthmap.analysis.selection import fold_of_groups, mean_logprob, out_of_fold_error_probabilities

    def usable(frame):
        valid = frame["exact_answer_valid"].to_numpy(dtype=bool)
        return valid if token in EXACT_POSITIONS else np.ones(len(frame), dtype=bool)

    folds = fold_of_groups(greedy["group"].tolist(), n_folds, fold_seed)
    fold_of_id = dict(zip(greedy["id"], folds))
    score_acts = np.concatenate([greedy_acts, cell_acts])
    score_folds = np.array([fold_of_id[i] for i in [*greedy["id"], *answers["id"]]])
    try:
        probabilities = out_of_fold_error_probabilities(
            greedy_acts, ~greedy["correct"].to_numpy(dtype=bool), greedy["exact_answer_valid"].to_numpy(dtype=bool),
            folds, score_acts, score_folds, n_folds,
        )
        note = ""
    except ProbeError as error:
        probabilities, note = np.full(len(score_acts), np.nan), f"skipped: {error}"
    probabilities[~np.concatenate([usable(greedy), usable(answers)])] = np.nan
    rows = pd.DataFrame(
        {
            "id": [*greedy["id"], *answers["id"]],
            "candidate": [0] * len(greedy) + [int(k) + 1 for k in answers["sample"]],
            "correct": [*greedy["correct"], *answers["correct"]],
            "error_probability": probabilities,
            "exact_answer": [vote_text(*v) for v in zip(
                [*greedy["exact_answer_source"], *answers["exact_answer_source"]],
                [*greedy["exact_answer_valid"], *answers["exact_answer_valid"]],
                [*greedy["exact_answer"], *answers["exact_answer"]],
            )],
            "mean_logprob": [mean_logprob(list(lp)) for lp in [*greedy["answer_logprobs"], *answers["answer_logprobs"]]],
        }
    )
    return rows, note


def analyse(greedy, answers, greedy_acts, cell_acts, token: str, seeds, out: ResampleFiles, title: str, n_folds: int = 5,
            fold_seed: int = 0) -> dict:
    """Error types, type probes and answer selection; writes their files in `out`, returns a summary."""
    from truthmap.analysis.error_types import type_counts, type_table
    from truthmap.analysis.selection import METHODS, plot_selection, select_answers, selection_report

    questions = {
        question_id: (
            group["correct"].tolist(),
            [vote_text(*v) for v in zip(group["exact_answer_source"], group["exact_answer_valid"], group["exact_answer"])],
        )
        for question_id, group in answers.groupby("id", sort=False)
    }
    types = type_table(questions)
    types.insert(1, "greedy_correct", types["id"].map(dict(zip(greedy["id"], greedy["correct"]))))
    counts = type_counts(types)
    save_csv(out.error_types, types)
    write_json(out.error_type_counts, counts)

    probes = type_probes(types, greedy, greedy_acts, seeds)
    save_csv(out.type_probes, probes)

    candidates, probe_note = selection_candidates(greedy, answers, greedy_acts, cell_acts, token, n_folds, fold_seed)
    chosen = select_answers(candidates)
    report = selection_report(chosen, types)
    save_csv(out.selection_csv, report)
    save_csv(out.selection_choices, chosen)
    plot_selection(report, title, out.selection_png)
    overall = report.iloc[0]
    return {
        "questions": len(types),
        "resampled_answers": len(answers),
        "greedy_accuracy": round(float(greedy["correct"].mean()), 4),
        "sampled_accuracy": round(float(answers["correct"].mean()), 4),
        "error_types": counts,
        "type_probes": {
            row.type: ({"auc_mean": round(row.auc_mean, 4), "auc_std": round(row.auc_std, 4)} if not row.skipped
                       else {"skipped": row.skipped})
            for row in probes.itertuples()
        },
        "selection": {m: round(float(overall[m]), 4) for m in (*METHODS, "oracle")},
        "selection_probe": probe_note or f"ErrorProbe cross-fitted over {n_folds} folds of the greedy answers",
    }


# ------------------------------------------------------------------------------------------ the stage's steps


@dataclasses.dataclass
class Resampling:
    """What one resampling of a greedy run needs (resample gathers it from the run directory)."""

    files: ResampleFiles  # where it writes: the run's resamples/
    greedy: object  # frame: the chosen questions' rows of the greedy answers.parquet
    greedy_acts: object  # float16 [questions, width]: the greedy store at the cell
    cell: dict  # site, layer, token (resolve_cell)
    settings: dict  # the greedy run's settings, plus n_resamples, temperature and resample_seed
    extraction: dict  # how the greedy answers were located (generate.LOCATING_KEYS), as resamples are
    generation: dict  # what keys the sampling checkpoints (generate.generation_settings(settings))
    batch_size: int
    seeds: tuple
    title: str


def resample_stage(job: Resampling, load_records, answer_models, get_lm) -> dict:
    """The three steps, each skipped when resamples.json says it is done with these settings: sample, label and
    locate the answers; read their activations at the cell; analyse. resamples.json is written once per step, so
    a killed run resumes at the first step not done. Returns resamples.json's content.

    load_records() -> (spec, question id -> Record); answer_models() -> (model, extractor), loaded on first use;
    get_lm(): the model for the cell's activations.
    """
    import numpy as np

    from truthmap.runner.contract import stage_done

    files = job.files
    answers, state = sampled_answers(job, load_records, answer_models)
    _, read = resample_steps(made_by(job), job.cell)
    cell = job.cell
    if not stage_done(read, None, files):
        keyed = answers.assign(key=[row_key(i, k) for i, k in zip(answers["id"], answers["sample"])])
        acts = cell_activations(
            get_lm(), keyed, cell["site"], cell["layer"], cell["token"], job.batch_size,
            # extraction moves exact-answer positions
            Checkpoints(files.work.cell(cell["site"], cell["layer"], cell["token"]).path,
                        job.settings | job.extraction | cell),
        )
        save_npy(files.cell_acts, acts)
        save_npy(files.greedy_cell_acts, job.greedy_acts)
        kept = {k: state[k] for k in ("settings", "sampling_seconds") if k in state}
        state = save_state(files, kept | {"cell": cell})
    summary = analyse(job.greedy, answers, job.greedy_acts, np.load(files.cell_acts), cell["token"], job.seeds, files,
                      job.title)
    return save_state(files, state | summary)


def made_by(job: Resampling) -> dict:
    """What the sampled answers are made with, as resamples.json keeps it (JSON's types)."""
    return json.loads(json.dumps(job.settings | job.extraction | {"n_questions": len(job.greedy)}))


def resample_steps(made_by: dict, cell: dict):
    """The first two steps of resample_stage as stages.Stage entries over resamples.json's state, read when they
    are checked (made again when it says other settings, or a cell other than `cell`, or their file is missing)."""
    from truthmap.runner.contract import Stage

    def step(name, key, wanted, file):
        def made(config, files):
            state = read_json(files.state) if files.state.exists() else {}
            return {key: state[key]} if key in state else None

        return Stage(name, reads=("answers",), writes=(file,), run=None, on_mismatch="redo", made=made,
                     wanted=lambda config, files: {key: wanted},
                     finished=lambda config, files: getattr(files, file).exists())

    return step("resampled answers", "settings", made_by, "answers"), step("cell activations", "cell", cell, "cell_acts")


def sampled_answers(job: Resampling, load_records, answer_models):
    """The first step of resample_stage, also what the sampling baselines read: (resamples/answers.parquet's frame,
    resamples.json's content). Sampled, labelled and located only when resamples.json's settings differ; the
    checkpoints make a killed sampling resume. The seconds this process spent sampling are kept in
    resamples.json ("sampling_seconds"; a resumed sampling counts its last part only)."""
    import time

    import pandas as pd

    from truthmap.runner.contract import stage_done

    files, made = job.files, made_by(job)
    state = read_json(files.state) if files.state.exists() else {}
    sampled, _ = resample_steps(made, job.cell)
    if not stage_done(sampled, None, files):
        started = time.perf_counter()
        spec, records = load_records()
        model, extractor = answer_models()
        answers = resample_answers(model, extractor, spec, records, job.greedy, job.generation, files.work,
                                   job.batch_size, job.extraction)
        write_parquet(files.answers, answers)
        state = save_state(files, {"settings": made, "sampling_seconds": round(time.perf_counter() - started, 2)})
    return pd.read_parquet(files.answers), state


def save_state(files: ResampleFiles, state: dict) -> dict:
    write_json(files.state, state)
    return state


# ------------------------------------------------------------------------------------------------- the stage


@dataclasses.dataclass(frozen=True)
class ResampleConfig:
    """The resampling stage's own parameters (the run's are RunConfig's)."""

    n_resamples: int = 10  # K sampled answers per question (the paper uses 30)
    temperature: float = 1.0
    seed: int = 0  # sampling seed: the same seed gives the same answers at any batch size
    layer: int | None = None  # the probed cell; None: the train run's best cell's
    token: str | None = None
    n_questions: int | None = None  # resample this many of the run's questions (seeded); None: all

    def __post_init__(self):
        if not self.temperature > 0:
            raise ConfigError(f"Invalid --temperature {self.temperature}: resampling needs a temperature > 0 (the "
                              "paper uses 1).")
        if self.n_resamples < 1:
            raise ConfigError(f"Invalid --n-resamples {self.n_resamples}: expected an integer >= 1.")


def resample(config, resampling: ResampleConfig, lm=None) -> dict:
    """K sampled answers per question of a finished greedy run; their error types, type probes and answer selection.

    Reads the greedy run of `config` (answers, activations, and the train run's best probe cell unless layer and
    token are given); writes run.resamples/ and returns its resamples.json. Finished steps are not redone, and
    the model is loaded only when answers or activations are missing.
    """
    job, load_records, load_answer_models, get_lm = resampling_job(config, resampling, lm)
    return resample_stage(job, load_records, load_answer_models, get_lm)


def resampling_job(config, resampling: ResampleConfig, lm=None, with_cell: bool = True, get_lm=None):
    """(Resampling, load_records, answer_models, get_lm) of resample; with_cell=False: no cell to read (the
    sampling baselines read the answers alone), so no probes.json is needed."""
    from truthmap.config import run_dir
    from truthmap.rundir import ANSWERS_FIX, read_parquet
    from truthmap.runner.answering import check_finished_store, check_models
    from truthmap.runner.contract import model_loader
    from truthmap.stages.generate import generation_settings, locating_settings

    run = run_dir(config)
    check_models(config, lm)
    check_finished_store(config, run)  # the greedy cell's activations, beside which the resamples' are read
    if not (run.answers.exists() and run.run_json.exists()):
        raise StoreError(
            f"No greedy answers in {run.path}. Run `truthmap run --dataset {config.dataset} --split {config.split}` "
            "with the same --model and --runs-dir first."
        )
    made = read_json(run.run_json)
    # Resamples are located as the greedy answers were (runs made before "locate" existed: these flags).
    extraction = {k: made["settings"].get(k, v) for k, v in locating_settings(config).items()}
    check_resample_extractor(config, run, extraction["extraction_model"])
    every = read_parquet(run.answers, fix=ANSWERS_FIX)
    rows = choose_questions(len(every), resampling.n_questions, resampling.seed)
    greedy = every.iloc[rows].reset_index(drop=True)
    cell, greedy_acts = greedy_cell_of(config, resampling, rows) if with_cell else (None, None)
    settings = made["settings"] | {"n_resamples": resampling.n_resamples, "temperature": resampling.temperature,
                                   "resample_seed": resampling.seed}
    get_lm = get_lm or (model_loader(config) if lm is None else (lambda: lm))
    job = Resampling(run.resample_files, greedy, greedy_acts, cell, settings, extraction,
                     generation_settings(settings), config.batch_size, config.seeds, job_title(config, resampling, cell))
    return (job, functools.partial(greedy_records, config, made, greedy),
            functools.partial(answer_models, config, made, extraction, get_lm), get_lm)


def greedy_cell_of(config, resampling: ResampleConfig, rows):
    """(the probe cell resampling reads, the greedy answers' activations there) for the questions at rows."""
    from truthmap.config import run_dir
    from truthmap.stages.activations import open_store

    store, meta = open_store(run_dir(config).activations(config.site))
    probes_json = run_dir(dataclasses.replace(config, split="train")).probe_files(config.site).summary
    cell = resolve_cell(probes_json, config.site, resampling.layer, resampling.token, meta["shape"][0])
    return cell, greedy_cell(store, cell)[rows]


def job_title(config, resampling: ResampleConfig, cell: dict | None) -> str:
    from truthmap.lm.models import model_slug

    title = (f"{model_slug(config.model)} · {config.dataset} ({config.split}) · K={resampling.n_resamples}, "
             f"T={resampling.temperature}")
    return title + (f"\ncell: {config.site} layer {cell['layer']}, {cell['token']}" if cell else "")


def sampling_rows(config, rows: list[dict], n_resamples: int, temperature: float, get_lm) -> list[dict]:
    """The sampling baselines' rows of the detection table for the test run of `config`, from the answers that
    `truthmap resample` samples (and reuses: resamples/ of that run, all its questions, seed --seed); rows: the
    dataset's other rows, whose best probe on validation (detection.best_probe_row) each is set against."""
    from truthmap.analysis.detection import best_probe_row, probe_data
    from truthmap.analysis.sampling_baselines import rule_match, sampling_cost, sampling_results, sampling_scores
    from truthmap.analysis.verdict import chosen_probe_scores
    from truthmap.config import run_dir
    from truthmap.datasets.rules import RULES

    resampling = ResampleConfig(n_resamples=n_resamples, temperature=temperature, seed=config.seed)
    job, load_records, load_answer_models, _ = resampling_job(config, resampling, with_cell=False, get_lm=get_lm)
    answers, state = sampled_answers(job, load_records, load_answer_models)
    spec, _ = load_records()
    scores = sampling_scores(job.greedy, answers, rule_match(RULES[spec.rule]) if spec.rule in RULES else None)
    common = {k: rows[-1][k] for k in ("dataset", "n_train", "n_test", "test_errors")}
    common |= {"n_resamples": n_resamples, "temperature": temperature}
    test = probe_data(run_dir(config), config.site, f"{config.dataset} (test)")
    probe = best_probe_row(rows)
    if probe is not None:
        train = probe_data(run_dir(dataclasses.replace(config, split="train")), config.site, f"{config.dataset} (train)")
        probe = {"method": probe["method"],
                 "scores": chosen_probe_scores(train, test, probe["method"].removeprefix("Probe @ "), config.seeds)}
    return sampling_results(scores, test, common, sampling_cost(answers, state, job.extraction), probe)

def check_resample_extractor(config, run, used: str | None) -> None:
    """Resamples are located as the greedy answers were: another --extraction-model given would be ignored."""
    from truthmap.lm.models import same_model

    asked, used = config.extraction_model, used or config.model
    if asked is not None and not same_model(asked, used):
        raise ConfigError(f"The answers of {run.path} were located with --extraction-model {used}, and its resamples "
                          f"are located as they were: drop --extraction-model {asked}, or make a greedy run with it "
                          "(another --runs-dir).")


def greedy_records(config, made: dict, greedy):
    """(dataset entry, question id -> Record) of the greedy run's questions, loaded again as the run loaded them."""
    from truthmap.config import load_config_records, run_dir
    from truthmap.stages.generate import answers_settings

    run = run_dir(config)
    kept = {k: made["config"][k] for k in ("n_samples", "seed", "custom_path", "question_column", "answer_column")
            if k in made["config"]}
    greedy_config = dataclasses.replace(config, **kept, data_dir=config.data_dir or made["config"].get("data_dir"))
    spec, records = load_config_records(greedy_config)
    if "custom_sha256" in made["settings"]:  # the questions must be those the greedy answers answered
        now = answers_settings(greedy_config, spec)["custom_sha256"]
        runstate.check_matches(made["settings"], {"custom_sha256": now}, run.path)
    records = {r.id: r for r in records}
    missing = [i for i in greedy["id"] if i not in records]
    if missing:
        raise StoreError(f"The dataset no longer has question {missing[0]!r} of {run.answers}; check --data-dir.")
    return spec, records


def answer_models(config, made: dict, extraction: dict, get_lm):
    """(the model that answers, as the greedy run prompted it; the extractor the greedy run used)."""
    model = dataclasses.replace(get_lm(), is_chat=made["chat_template"])
    if not extraction["extraction_model"]:
        return model, model
    from truthmap.lm.models import load_model

    return model, load_model(extraction["extraction_model"], config.device, config.dtype)


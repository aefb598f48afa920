"""`truthmap import`: answers made anywhere (vLLM on a cluster, an API, another team's run) become a normal run.

The file (CSV, JSONL or Parquet) holds one answer per row: `question` and `answer` (names configurable), and
optionally `id`, `prompt`, `gold` aliases, `wrong_answers`, `correct`, `exact_answer`, `stopped`, and the exact
tokens `prompt_token_ids` / `answer_token_ids`. Each row becomes a row of answers.parquet as `generate` would
have written it:
- prompt tokens: `prompt_token_ids` as given; else `prompt` (the user message, or the text already rendered with
  the chat template, which is then not applied again); else the dataset's prompt built from the question, with
  the chat template when the model has one (--prompt-style), as `generate` builds it;
- answer tokens: `answer_token_ids` as given (a trailing stop token is dropped, as generate drops it), and the
  answer text is their decoding, as in a generated run; else the answer text re-encoded. Re-encoding gives the
  generated tokens back for nearly every answer, not all: a model may write a split the tokenizer would not choose
  ("ĠA" + "aland"), so give the token ids when the engine reports them (vLLM does);
- each answer token's log-probability: one teacher-forced forward pass per batch (logit and probability
  baselines need them);
- labels: a given `correct` wins; else the dataset's rule (--dataset) on the `gold` aliases. The summary counts
  the given labels that the rule, where gold is given too, contradicts;
- exact answers: a given `exact_answer` (it must occur in the answer), else located as `generate` locates them
  (locate.locate_answers: labels, gold aliases with --locate gold, the extractor).
Rows that cannot be imported (no question, an empty answer, a duplicate id, no label, too long for the model's
context, an exact answer not in the answer) are skipped and counted by kind in the summary and run.json, or
stop the import with --strict. The run records its file (path, sha256, rows) and refuses to continue over
another file.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

from truthmap.config import RunConfig
from truthmap.errors import DataError

SKIP_KINDS = {
    "missing_question": "no question",
    "empty_answer": "an empty answer",
    "duplicate_id": "an id already seen in an earlier row",
    "no_label": "neither a `correct` value nor gold aliases to label it",
    "too_long": "prompt and answer longer than the model's context",
    "exact_answer_not_in_answer": "an exact answer that does not occur in the answer",
}
SHOWN_ROWS = 10  # row numbers listed per kind of skip
# Logits kept per forward pass (floats): batch x answer length x vocabulary; 2**26 floats = 256 MB in float32.
LOGIT_BUDGET = 1 << 26


@dataclass(frozen=True)
class ImportSource:
    """The answers file and the names of its columns (only `question` and `answer` are required)."""

    path: str
    question_column: str = "question"
    answer_column: str = "answer"
    gold_column: str = "gold"
    id_column: str = "id"
    prompt_column: str = "prompt"
    correct_column: str = "correct"
    exact_answer_column: str = "exact_answer"


@dataclass
class Row:
    number: int  # 1 = the file's first answer
    id: str
    question: str | None
    answer: str | None
    gold: list
    wrong: list
    correct: bool | None
    exact: str | None
    prompt: str | None
    prompt_ids: list | None
    answer_ids: list | None
    stopped: bool | None
    ids_given: bool = False  # answer_ids came from the file, not from encoding the text


def import_settings(config, spec, source, sha256: str, rows: int) -> dict:
    """What decides the content of an imported answers.parquet; continuing with any of it changed is refused."""
    from dataclasses import asdict

    from truthmap.stages.generate import locating_settings

    return {
        "model": config.model,
        "dataset": config.dataset,
        "dataset_version": spec.version,
        "split": config.split,
        "prompt_style": config.prompt_style,
        "max_new_tokens": config.max_new_tokens or spec.max_new_tokens,
        "import_sha256": sha256,  # the file's content, not its path (as custom_sha256)
        "import_rows": rows,
        "import_columns": asdict(source) | {"path": None},
    } | locating_settings(config)


# ------------------------------------------------------------------------------------------------- reading


def read_rows(path: Path, source: ImportSource) -> list[Row]:
    """Every row of the file as a Row; a file that cannot be read, or lacks a required column, is an error."""
    from truthmap.tables import read_table

    records = [record for _, record in read_table(path, what="Answers file")]
    columns = set().union(*(r.keys() for r in records))
    for option, column in (("--question-column", source.question_column), ("--answer-column", source.answer_column)):
        if column not in columns and not (column == source.answer_column and "answer_token_ids" in columns):
            raise DataError(f"{path} has no column {column!r} (columns: {', '.join(sorted(map(str, columns)))}); "
                            f"name it with {option}.")
    if source.gold_column not in columns and source.correct_column not in columns:
        raise DataError(f"{path} has neither gold aliases (column {source.gold_column!r}) nor labels (column "
                        f"{source.correct_column!r}): give one, or name it with --gold-column / --correct-column.")
    header = path.name.lower().endswith((".csv", ".csv.gz"))  # a CSV's line 1 is its header, as generate counts
    return [_row(path, number, record, source, number + header) for number, record in enumerate(records, start=1)]


def _missing(value) -> bool:
    if value is None:
        return True
    try:
        import math

        return isinstance(value, float) and math.isnan(value)
    except TypeError:
        return False


def _text(value) -> str | None:
    return None if _missing(value) else str(value)


def _row(path: Path, number: int, record: dict, source: ImportSource, line: int) -> Row:
    from truthmap.datasets.loaders import _aliases

    def get(column):
        value = record.get(column)
        return None if _missing(value) or (isinstance(value, str) and not value.strip()) else value

    gold = get(source.gold_column)
    wrong = get("wrong_answers")
    identifier = get(source.id_column)
    question = _text(get(source.question_column))
    return Row(
        number=number,
        id=str(identifier).strip() if identifier is not None else f"row-{number}",
        question=question.strip() if question else None,
        answer=_text(record.get(source.answer_column)),  # as written: a leading space is part of the tokens
        gold=[] if gold is None else _aliases(path, line, source.gold_column, _plain(gold)),
        wrong=[] if wrong is None else _aliases(path, line, "wrong_answers", _plain(wrong)),
        correct=_flag(path, number, source.correct_column, get(source.correct_column)),
        exact=_text(get(source.exact_answer_column)),
        prompt=_text(get(source.prompt_column)),
        prompt_ids=_token_ids(path, number, "prompt_token_ids", get("prompt_token_ids")),
        answer_ids=_token_ids(path, number, "answer_token_ids", get("answer_token_ids")),
        stopped=_flag(path, number, "stopped", get("stopped")),
        ids_given=get("answer_token_ids") is not None,
    )


def _plain(value):
    """A list from Parquet arrives as a numpy array; the alias parser takes lists and strings."""
    return list(value) if hasattr(value, "tolist") and not isinstance(value, str) else value


def _flag(path: Path, number: int, column: str, value) -> bool | None:
    if value is None:
        return None
    if isinstance(value, bool) or (hasattr(value, "dtype") and value.dtype == bool):
        return bool(value)
    text = str(value).strip().lower()
    if text in ("true", "1", "1.0", "yes"):
        return True
    if text in ("false", "0", "0.0", "no"):
        return False
    raise DataError(f"{path} row {number}: column {column!r} is {value!r}; write true or false.")


def _token_ids(path: Path, number: int, column: str, value) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            value = None
    value = _plain(value)
    if not isinstance(value, list) or not all(isinstance(t, int) or hasattr(t, "__index__") for t in value):
        raise DataError(f"{path} row {number}: column {column!r} should be a list of token ids like [12, 345].")
    flag = next((t for t in value if type(t).__name__ in ("bool", "bool_")), None)  # numpy's too
    if flag is not None:  # JSON true is an int to Python: [true, 504] would read as ids [1, 504]
        raise DataError(f"{path} row {number}: column {column!r} holds {bool(flag)}, not a token id; write a list of "
                        "integer token ids like [12, 345].")
    return [int(t) for t in value]


# ------------------------------------------------------------------------------------------------- rows


def prepare_rows(rows: list[Row], spec, lm, source: ImportSource, strict: bool) -> tuple[list[Row], dict, int]:
    """The rows to import, with their prompt and answer tokens set; {kind: [row numbers]} of those skipped; and
    how many answer texts differ from the decoding of their given token ids (the decoding is kept, as generate
    keeps it: the text's character offsets must be those of the tokens)."""
    from truthmap.lm.models import stop_token_ids

    skipped = {kind: [] for kind in SKIP_KINDS}
    stops = set(stop_token_ids(lm.tokenizer, lm.model))
    context = model_context(lm)
    seen, kept = set(), []
    text_differs = 0
    for row in rows:
        if row.answer_ids is not None:
            ids = list(row.answer_ids)
            while ids and ids[-1] in stops:  # an engine's stop token ends the answer; generate drops it too
                ids.pop()
                row.stopped = True
            decoded = lm.tokenizer.decode(ids)
            text_differs += row.answer is not None and decoded != row.answer
            row.answer_ids, row.answer = ids, decoded
        kind = _bad_row(row, seen)
        if kind is None:
            row.prompt_ids = row.prompt_ids or prompt_ids(lm, spec, row, source)
            if row.answer_ids is None:
                row.answer_ids = lm.tokenizer(row.answer, add_special_tokens=False)["input_ids"]
            if context and len(row.prompt_ids) + len(row.answer_ids) > context:
                kind = "too_long"
        if kind is not None:
            if strict:
                raise bad_row_error(source, row, kind)
            skipped[kind].append(row.number)
            continue
        seen.add(row.id)
        row.stopped = True if row.stopped is None else row.stopped  # an answer given whole ended on its own
        kept.append(row)
    return kept, skipped, text_differs


def check_token_ids(rows: list[Row], tokenizer, stops, source: ImportSource, model: str) -> None:
    """Before the model loads: every given token id is one of the tokenizer's. Special tokens inside an answer (a
    chat header, a pad), but the end tokens it may close with, which prepare_rows drops, get one warning: a model
    may write them (generate keeps them, so an import of its answers keeps them too), ids of another tokenizer
    do too."""
    last = len(tokenizer) - 1
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    inside = []
    for row in rows:
        for column, ids in (("prompt_token_ids", row.prompt_ids), ("answer_token_ids", row.answer_ids)):
            bad = next((t for t in ids or [] if not 0 <= t <= last), None)
            if bad is not None:
                raise DataError(f"{source.path} row {row.number} (id {row.id!r}): column {column!r} holds the id "
                                f"{bad}, outside the vocabulary of model {model!r} (ids 0 to {last}); give the token "
                                "ids of that model's tokenizer.")
        answer = list(row.answer_ids or [])
        while answer and answer[-1] in stops:
            answer.pop()
        found = next((t for t in answer if t in special or t in stops), None)
        if found is not None:
            inside.append((row, found))
    if inside:
        import warnings

        from truthmap.errors import TruthmapWarning

        row, found = inside[0]
        warnings.warn(TruthmapWarning(
            f"{len(inside)} of {len(rows)} answers of {source.path} hold a special token inside their 'answer_token_ids' (first: "
            f"row {row.number}, {tokenizer.convert_ids_to_tokens(found)!r}, id {found}); kept, as generate keeps what "
            f"a model writes. If model {model!r} did not write them, the ids are another tokenizer's."))


def check_prompts(rows: list[Row], spec, source: ImportSource) -> None:
    """Before the model loads: rows without a prompt get the dataset's, which may need more than the question."""
    from truthmap.datasets import build_prompt
    from truthmap.datasets.spec import Record

    for row in rows:
        if row.prompt is None and row.prompt_ids is None and row.question:
            record = Record(id=row.id, question=row.question, answers=row.gold)
            try:
                for style in ("instruct", "base"):
                    build_prompt(spec, record, style)
            except DataError:
                raise prompt_needs_more(spec, source) from None


def prompt_needs_more(spec, source: ImportSource) -> DataError:
    return DataError(f"The {spec.name} prompt needs more than the question; give each row's prompt in a "
                     f"{source.prompt_column!r} column of {source.path}.")


def check_rows(rows: list[Row], source: ImportSource) -> None:
    """--strict: the first row with a fault that shows without the tokenizer (not the decoding of token ids,
    nor the length in tokens) stops the import."""
    seen = set()
    for row in rows:
        kind = _bad_row(row, seen, text=not row.ids_given)
        if kind is not None:
            raise bad_row_error(source, row, kind)
        seen.add(row.id)


def bad_row_error(source: ImportSource, row: Row, kind: str) -> DataError:
    return DataError(f"{source.path} row {row.number} (id {row.id!r}) has {SKIP_KINDS[kind]}; fix or remove it, or "
                     "import without --strict to skip such rows.")


def _bad_row(row: Row, seen: set, text: bool = True) -> str | None:
    """The first fault of a row, or None; text=False leaves out the checks of the answer's text."""
    if not row.question:
        return "missing_question"
    if text and (row.answer is None or not row.answer.strip()):
        return "empty_answer"
    if row.id in seen:
        return "duplicate_id"
    if row.correct is None and not row.gold:
        return "no_label"
    if text and row.exact is not None and exact_span(row) is None:
        return "exact_answer_not_in_answer"
    return None


def exact_span(row: Row) -> tuple[int, int] | None:
    """Character span of the given exact answer in the answer (case-insensitive, first occurrence)."""
    exact = row.exact.strip()
    start = row.answer.lower().find(exact.lower()) if exact else -1
    return (start, start + len(exact)) if start >= 0 else None


def model_context(lm) -> int | None:
    """The longest sequence the model takes (its position table); None when it does not say."""
    config = getattr(lm.model, "config", None)
    return getattr(config, "max_position_embeddings", None) or None


def prompt_ids(lm, spec, row: Row, source: ImportSource) -> list[int]:
    """The prompt tokens as `generate` makes them: the dataset's prompt from the question (or the given user
    message) under the chat template; a prompt already rendered with the template is encoded as it is."""
    from truthmap.datasets import build_prompt
    from truthmap.datasets.spec import Record
    from truthmap.lm.models import encode_prompt

    text = row.prompt
    if text is None:
        record = Record(id=row.id, question=row.question, answers=row.gold)
        try:
            text = build_prompt(spec, record, "instruct" if lm.is_chat else "base")
        except DataError:
            raise prompt_needs_more(spec, source) from None
    row.prompt = text
    if lm.is_chat and text.startswith(rendered_start(lm.tokenizer)):
        return lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    return encode_prompt(lm.tokenizer, text, lm.is_chat)


def rendered_start(tokenizer) -> str:
    """What the chat template writes before the user's message (system turn, role header): a prompt that starts
    with it was rendered already."""
    marker = "\x00truthmap\x00"
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": marker}], add_generation_prompt=True,
                                             tokenize=False)
    return rendered.split(marker)[0] or "\x00never\x00"


def label_rows(spec, rows: list[Row]):
    """Records for the rules, and the labels: a given `correct` wins over the dataset's rule."""
    from truthmap.datasets import is_correct
    from truthmap.datasets.spec import Record

    records = [Record(id=r.id, question=r.question, answers=r.gold, wrong_answers=r.wrong) for r in rows]
    correct, given, by_rule, disagree = {}, 0, 0, 0
    for record, row in zip(records, rows):
        rule = bool(is_correct(spec, record, row.answer)) if row.gold else None
        if row.correct is not None:
            given += 1
            disagree += rule is not None and rule != row.correct
            correct[row.id] = row.correct
        else:
            by_rule += 1
            correct[row.id] = rule
    return records, {"correct": correct, "given": given, "by_rule": by_rule, "disagree": disagree}


def locate_rows(config, spec, rows: list[Row], labels: dict, records, lm, settings: dict, run):
    """The generation frame of rows (generation_frame), labelled (labels: label_rows') and located
    (label.label_and_locate): a given exact answer where the row has one, else located as `generate` locates."""
    from truthmap.runner.contract import extraction
    from truthmap.runstate import Checkpoints
    from truthmap.stages.label import label_and_locate

    def extractor():
        if not config.extraction_model:
            return lm
        from truthmap.lm.models import load_model

        return load_model(config.extraction_model, config.device, config.dtype)

    given = {row.id: ("given", exact_span(row)) for row in rows if row.exact is not None}
    extract = extraction(config, extractor, lambda: Checkpoints(run.extraction_parts, settings))
    return label_and_locate(spec, records, generation_frame(lm, rows), lm.tokenizer, config.locate, extract,
                            answer_tokens=not config.extraction_model, correct=[labels["correct"][r.id] for r in rows],
                            given=given)


# ------------------------------------------------------------------------------------------------- the stage


def import_answers(config: RunConfig, source, lm=None, strict: bool = False, activations: bool = True) -> dict:
    """`truthmap import` (importer.py): write the run of config (its model, dataset and split) from the answers
    file, and config.site's activations from the same teacher-forced pass that scores the answer tokens
    (activations=False: not); returns the import summary.

    A finished import of the same file returns at once; checkpoints of a killed one are resumed."""
    import dataclasses
    import time

    from truthmap.config import run_dir
    from truthmap.datasets import get_spec
    from truthmap.rundir import file_sha256, read_json
    from truthmap.runner.answering import check_finished_answers, check_models
    from truthmap.runner.contract import stage_done
    from truthmap.runstate import check_checkpoints
    from truthmap.stages import generate

    spec = get_spec(config.dataset)
    check_models(config, lm)
    path = Path(source.path).expanduser()
    rows = read_rows(path, source)  # the file's own errors first, before any model loads
    run = run_dir(config)
    settings = import_settings(config, spec, source, file_sha256(path), len(rows))
    if stage_done(import_stage(settings), config):
        check_finished_answers(config, run)
        return read_json(run.run_json)["import"] | generate.summarize_answers(run)
    check_checkpoints(run.import_parts, settings)
    check_checkpoints(run.extraction_parts, settings)
    if strict:
        check_rows(rows, source)  # what can be seen in the text fails before the model loads
    check_import_input(config, rows, spec, source, lm)
    from truthmap.runner.contract import use_chat

    started = time.time()
    if lm is None:
        from truthmap.lm.models import load_model

        lm = load_model(config.model, config.device, config.dtype)
    lm = dataclasses.replace(lm, is_chat=use_chat(config.prompt_style, lm))
    kept, skipped, text_differs = prepare_rows(rows, spec, lm, source, strict)
    if not kept:
        raise DataError(f"No row of {path} can be imported ({describe_skips(skipped)}); see the summary's kinds.")
    records, labels = label_rows(spec, kept)
    located = locate_rows(config, spec, kept, labels, records, lm, settings, run)
    located["answer_logprobs"] = scored_logprobs(config, run, lm, located, settings, activations)
    summary = import_summary(path, settings, rows, kept, skipped, labels, text_differs)
    generate.write_answers(run, config, settings, records, list(located["prompt"]), located.drop(columns=["prompt"]),
                           lm, started, config.site if activations else None, extra={"import": summary})
    return summary | generate.summarize_answers(run)


def check_import_input(config: RunConfig, rows, spec, source, lm=None) -> None:
    """Before the model loads: the dataset's prompt can be built for rows without one, and every token id given is
    one of the model's (its tokenizer alone is loaded for that, when the rows give ids)."""
    from truthmap.lm.models import stop_token_ids, tokenizer_and_stops

    check_prompts(rows, spec, source)
    if not any(r.prompt_ids is not None or r.answer_ids is not None for r in rows):
        return
    if lm is not None:
        tokenizer, stops = lm.tokenizer, stop_token_ids(lm.tokenizer, lm.model)
    else:
        tokenizer, stops = tokenizer_and_stops(config.model)
    check_token_ids(rows, tokenizer, stops, source, config.model)


def import_stage(settings: dict):
    """The import as a stages.Stage: its run.json must be an import's, made with these settings (the file's
    sha256 and row count, the columns, the model, dataset and locating); done once answers.parquet is written."""
    from truthmap.runner.contract import Stage

    def made(config, run):
        from truthmap.rundir import read_json

        if not run.run_json.exists():
            return None
        written = read_json(run.run_json)
        if "import" not in written:
            from truthmap.errors import ConfigError

            raise ConfigError(f"{run.path} holds answers generated by truthmap, not imported ones; import into "
                              "another --runs-dir, --dataset or --split, or delete that run.")
        return written["settings"]

    return Stage("import", reads=("a user's answers file",), writes=("answers", "run_json", "activations"), made=made,
                 wanted=lambda config, run: settings, run=import_answers,
                 finished=lambda config, run: run.answers.exists())


def scored_logprobs(config, run, lm, located, settings: dict, activations: bool) -> list:
    """score_answers' log-probabilities of the located rows, in their order; with activations, the same pass
    writes config.site's store (its row k is answers.parquet's row k: both follow the kept rows)."""
    from truthmap.runstate import Checkpoints
    from truthmap.stages.activations import create_or_resume, new_meta

    site, store = config.site if activations else None, None
    if site:
        store = (run.activations(site), create_or_resume(run.activations(site),
                                                         new_meta(lm, site, len(located), settings, one_pass=True)))
    logprobs = score_answers(lm, located, config.batch_size, Checkpoints(run.import_parts, settings), store)
    return [logprobs[i] for i in located["id"]]


def import_summary(path: Path, settings: dict, rows, kept, skipped: dict, labels: dict, text_differs: int) -> dict:
    """The "import" entry of run.json: the file, what was imported and skipped, where labels and tokens came from."""
    return {
        "file": str(path.resolve()),
        "sha256": settings["import_sha256"],
        "rows": len(rows),
        "imported": len(kept),
        "skipped": {kind: len(numbers) for kind, numbers in skipped.items()},
        "skipped_rows": {kind: numbers[:SHOWN_ROWS] for kind, numbers in skipped.items() if numbers},
        "labels": {"given": labels["given"], "by_rule": labels["by_rule"],
                   "given_disagreeing_with_rule": labels["disagree"]},
        "answer_tokens": {"given": sum(r.ids_given for r in kept),
                          "re_encoded_from_text": sum(not r.ids_given for r in kept)},
        "answer_text_replaced_by_token_decoding": text_differs,
    }


# ------------------------------------------------------------------------------------------------- log-probs


def generation_frame(lm, rows: list[Row]):
    """id, prompt, prompt_ids, answer_ids, stopped, answer: the generation columns of each row, as `generate`
    writes them (the log-probabilities come later, from the pass that reads the activations)."""
    import pandas as pd

    return pd.DataFrame({
        "id": [r.id for r in rows],
        "prompt": [r.prompt if r.prompt is not None else lm.tokenizer.decode(r.prompt_ids) for r in rows],
        "prompt_ids": [list(r.prompt_ids) for r in rows],
        "answer_ids": [list(r.answer_ids) for r in rows],
        "stopped": [bool(r.stopped) for r in rows],
        "answer": [r.answer for r in rows],
    })


def cut_by_logits(order: list, answer_length, batch_size: int, vocab: int) -> list[list]:
    """Consecutive runs of `order`, at most batch_size each, whose kept logits (batch x (longest answer + 1) x
    vocab) fit LOGIT_BUDGET; answer_length(item) is an item's answer length."""
    cut = []
    for i in order:
        if cut and len(cut[-1]) < batch_size:
            longest = max(answer_length(j) for j in cut[-1] + [i]) + 1
            if (len(cut[-1]) + 1) * longest * vocab <= LOGIT_BUDGET:
                cut[-1].append(i)
                continue
        cut.append([i])
    return cut


def score_answers(lm, frame, batch_size: int, checkpoints, store=None) -> dict[str, list[float]]:
    """{id: log-probability of each answer token given the prompt and the answer before it}, by one teacher-forced
    forward pass per batch over the located frame (label.located_frame's); with store = (directory, meta) the same
    pass writes each row's 15 cells of the store's site (its row in the store is its row in frame), before the
    batch's log-probabilities are checkpointed, as generation writes its cells before its checkpoint.

    Positions count real tokens, as in decoding, so a left-padded row sees what it saw while it was generated."""
    import numpy as np
    import pandas as pd

    from truthmap.batches import run_batches
    from truthmap.lm.sites import read_cells
    from truthmap.rundir import POSITIONS, position_column
    from truthmap.stages import activations

    done = checkpoints.load()
    found = dict(zip(done["id"], done["answer_logprobs"].map(list))) if len(done) else {}
    written = activations.rows_written(store[1]) if store else None
    finished = {k for k, id_ in enumerate(frame["id"]) if id_ in found and not (store and k not in written)}
    prompts, answers = list(frame["prompt_ids"]), list(frame["answer_ids"])
    positions = np.stack([frame[position_column(p)].to_numpy() for p in POSITIONS], axis=1)  # [rows, 15]
    vocab = lm.model.get_output_embeddings().weight.shape[0]

    def score(chosen):
        sequences = [list(prompts[k]) + list(answers[k]) for k in chosen]
        cells = np.maximum(positions[chosen], 0)  # no exact answer (-1) reads the first token, as extract does
        values = []
        hooked = read_cells(lm, sequences, cells, store[1]["site"] if store else None,
                            forward=answer_logprobs(lm, [answers[k] for k in chosen], values))
        if store:
            activations.write_rows(store[0], store[1], chosen, hooked.float().numpy(),
                                   activations.read_embeddings(lm, sequences, cells))
            activations.mark_written(store[0], store[1], chosen)
        found.update(zip((frame["id"].iat[k] for k in chosen), values))
        return pd.DataFrame({"id": [frame["id"].iat[k] for k in chosen], "answer_logprobs": values})

    run_batches(range(len(frame)), score, checkpoints, batch_size=batch_size, done=finished,
                length=lambda k: len(prompts[k]) + len(answers[k]), description="Scoring answers",
                cut=lambda order: cut_by_logits(order, lambda k: len(answers[k]), batch_size, vocab))
    return found


def answer_logprobs(lm, answers: list[list[int]], values: list):
    """A forward for sites.read_cells: the model over the padded prompt + answer batch, appending to `values` each
    row's log-probability of its answer tokens."""
    import inspect

    import torch

    accepts = inspect.signature(lm.model.forward).parameters
    keep = max(len(a) for a in answers) + 1  # answer token j is predicted at the position before it

    def forward(input_ids, attention_mask):
        device = lm.model.device
        out = lm.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                       position_ids=(attention_mask.cumsum(-1) - 1).clamp(min=0).to(device), use_cache=False,
                       **({"logits_to_keep": keep} if "logits_to_keep" in accepts else {}))
        logits = out.logits[:, -keep:].float()  # [batch, keep, vocab]
        for row, answer in enumerate(answers):
            n = len(answer)
            targets = torch.tensor(answer, device=logits.device)[:, None]
            scores = torch.log_softmax(logits[row, keep - n - 1 : keep - 1], dim=-1)
            values.append(scores.gather(1, targets)[:, 0].tolist())

    return forward


def describe_skips(skipped: dict) -> str:
    return ", ".join(f"{len(v)} with {SKIP_KINDS[k]}" for k, v in skipped.items() if v) or "no rows"

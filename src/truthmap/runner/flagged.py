"""`truthmap answer`: the model answers, and each answer carries its probability of being wrong and a flag.

The cell the detector reads is taken from the activations recorded while the answer is decoded
(generate.generate_answers with the detector's site: sites.record), in the same pass that writes the answer; never
a second forward pass. When the detector's token is an exact-answer token, each batch is labelled and located
(label.label_and_locate: the extractor runs on that batch) before its cells are read, as the answers stage does.

A flag is the detector's log-odds at or above the threshold of the target picked (--max-fpr or --min-recall,
Detector.threshold). With abstain, a flagged answer is replaced by REFUSAL, and the row says so. With gold answers
(a dataset, or a gold column) the selective accuracy is reported: the accuracy of the answers kept, and their share.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import numpy as np

from truthmap.errors import ConfigError, DataError

REFUSAL = "I am not sure enough of the answer to give one."


@dataclasses.dataclass
class Answered:
    rows: object  # pandas frame: id, question, answer, error_probability, error_logit, flag, abstained, ...
    threshold: float | None  # on the log-odds; None without a target
    target: str | None  # "max_fpr 0.05", "min_recall 0.9"
    selective: dict | None  # kept, share_kept, accuracy_kept, accuracy_all (with gold answers and a target)


def read_questions(path, question_column: str = "question", gold_column: str = "gold"):
    """Questions (and optional gold answers) of a CSV, JSONL or Parquet file (tables.read_table)."""
    from truthmap.tables import read_table

    rows = read_table(Path(path), (question_column,), what="Input file")
    for place, row in rows:
        question = row[question_column]
        if not isinstance(question, str) or not question.strip():
            where = f"line {place}" if isinstance(place, int) else place
            raise DataError(f"{path} {where}: empty question; fill it in or remove the row.")
    golds = [row.get(gold_column) or None for _, row in rows] if rows and gold_column in rows[0][1] else None
    return [row[question_column] for _, row in rows], golds

def question_records(questions, golds=None) -> list:
    from truthmap.datasets.spec import Record

    def aliases(gold):
        if gold is None or (isinstance(gold, float) and np.isnan(gold)):
            return []
        return [gold] if isinstance(gold, str) else [str(g) for g in gold]

    golds = golds if golds is not None else [None] * len(questions)
    return [Record(id=f"row-{i + 1}", question=q, answers=aliases(g)) for i, (q, g) in enumerate(zip(questions, golds))]


def answer(questions=None, detector=None, *, golds=None, records=None, spec=None, max_fpr=None, min_recall=None,
           abstain: bool = False, lm=None, model=None, device=None, dtype=None, batch_size: int = 16,
           max_new_tokens: int | None = None) -> Answered:
    """Answer `questions` (or dataset `records` with their `spec`) with the detector's model; each answer with its
    error_probability and, with a target (max_fpr or min_recall), its flag. detector: a Detector or a saved one's
    path. Bad input fails before the model loads."""
    from truthmap.analysis.detector import Detector, check_texts, load_scoring_model
    from truthmap.datasets import get_spec

    found = detector if isinstance(detector, Detector) else Detector.from_pretrained(detector)
    if records is None:
        if not questions:
            raise ConfigError("Nothing to answer: give questions (--question, --input FILE or --dataset NAME).")
        check_texts(questions, ["-"] * len(questions))
        records = question_records(questions, golds)
    spec = spec or get_spec((found.info or {}).get("dataset", "geography"))
    if abstain and (max_fpr, min_recall) == (None, None):
        raise ConfigError("--abstain replaces the flagged answers: pick the flag's threshold with --max-fpr (such as "
                          "0.05) or --min-recall (such as 0.9).")
    threshold = found.threshold(max_fpr, min_recall) if (max_fpr, min_recall) != (None, None) else None
    target = f"max_fpr {max_fpr:g}" if max_fpr is not None else f"min_recall {min_recall:g}" if min_recall else None
    lm = lm or load_scoring_model(found, model, device, dtype)
    found.check_model(lm)
    rows = answer_records(found, lm, spec, records, batch_size, max_new_tokens or spec.max_new_tokens)
    rows["flag"] = rows["error_logit"] >= threshold if threshold is not None else None
    rows["abstained"] = bool(abstain) & rows["flag"].fillna(False).astype(bool) if threshold is not None else False
    if abstain and threshold is not None:
        rows.loc[rows["abstained"], "answer"] = REFUSAL
    graded = rows["correct"].notna().all() and threshold is not None
    return Answered(rows, threshold, target, selective_accuracy(rows) if graded else None)


def answer_records(detector, lm, spec, records, batch_size: int, max_new_tokens: int):
    """Generate, label and locate each batch, and read the detector's cell from the decoding's recording."""
    import pandas as pd

    from truthmap.datasets import build_prompt
    from truthmap.rundir import Work
    from truthmap.runstate import Checkpoints
    from truthmap.stages.generate import answer_stop, generate_answers

    info = detector.info or {}
    chat = bool(info.get("chat_template", lm.is_chat)) and lm.is_chat
    lm = dataclasses.replace(lm, is_chat=chat)
    prompts = [build_prompt(spec, r, "instruct" if chat else "base") for r in records]
    by_id = {r.id: r for r in records}
    scored = []
    with tempfile.TemporaryDirectory() as scratch:  # answers are not kept: no run directory, nothing to resume
        work = Work(Path(scratch))
        extract = extractor(lm, info, batch_size, work)

        def after_batch(frame, recording):
            scored.append(score_batch(detector, lm, spec, [by_id[i] for i in frame["id"]], frame, recording, info,
                                      extract))

        generate_answers(lm, [r.id for r in records], prompts, max_new_tokens, batch_size,
                         Checkpoints(work.generations.path, {}), answer_stop(spec, chat), detector.site,
                         after_batch)
    frame = pd.concat(scored, ignore_index=True).set_index("id").loc[[r.id for r in records]].reset_index()
    frame.insert(1, "question", [r.question for r in records])
    return frame


def extractor(lm, info: dict, batch_size: int, work):
    """extract(rows) for label_and_locate: the detector's extractor (label.Extraction), in the batch it is called on."""
    import functools

    from truthmap.runstate import Checkpoints
    from truthmap.stages.label import Extraction
    from truthmap.stages.locate import extraction_prefix

    method = info.get("extractor") or "free"  # detectors saved before the constrained extractor used free text
    return Extraction(lambda: lm, lambda: Checkpoints(work.extractions.path, {}), batch_size, method,
                      int(info.get("extraction_tries") or 1), 0, functools.cache(lambda: extraction_prefix(lm)),
                      progress=False)

def score_batch(detector, lm, spec, records, frame, recording, info: dict, extract):
    """One decoded batch with its exact answers, positions and the detector's scores at its cell."""
    from truthmap.analysis.detector import check_finite
    from truthmap.rundir import EXACT_POSITIONS, position_column
    from truthmap.stages.label import label_and_locate, label_answers, located_frame

    graded = [bool(r.answers) for r in records]
    if detector.token in EXACT_POSITIONS:
        frame = label_and_locate(spec, records, frame, lm.tokenizer, info.get("locate") or "blind", extract)
    else:  # no exact answer needed: no extractor run
        correct = label_answers(spec, records, list(frame["answer"]))
        frame = located_frame(frame.assign(correct=correct), records, {r.id: ("not_needed", None) for r in records},
                              lm.tokenizer)
    positions = frame[position_column(detector.token)].to_numpy()
    cells = np.full((len(frame), detector.n_layers_, detector.n_features_in_), np.nan)  # [rows, layers, hidden]
    for k, (prompt, at) in enumerate(zip(frame["prompt_ids"], positions)):
        if at >= 0:
            cells[k] = recording.cells(k, len(prompt), [int(at)])[:, 0].float().numpy()
    usable = positions >= 0
    check_finite(cells[usable], [r.id for r, ok in zip(records, usable) if ok], detector)
    probability, logit = np.full(len(frame), np.nan), np.full(len(frame), np.nan)
    if usable.any():
        probability[usable] = detector.predict_proba(cells[usable])[:, 1]
        logit[usable] = detector.decision_function(cells[usable])
    return frame.assign(error_probability=probability, error_logit=logit,
                        correct=[c if g else None for c, g in zip(frame["correct"], graded)])[
        ["id", "answer", "error_probability", "error_logit", "exact_answer", "exact_answer_source", "correct",
         "prompt_ids", "answer_ids"]]


def selective_accuracy(rows) -> dict:
    """Accuracy of the answers kept (not flagged) and their share, with the accuracy of all answers beside it."""
    correct = rows["correct"].astype(bool).to_numpy()
    kept = ~rows["flag"].fillna(False).astype(bool).to_numpy()
    return {"kept": int(kept.sum()), "rows": len(rows), "share_kept": round(float(kept.mean()), 4),
            "accuracy_kept": round(float(correct[kept].mean()), 4) if kept.any() else None,
            "accuracy_all": round(float(correct.mean()), 4)}


def summary_lines(result: Answered) -> list[str]:
    rows = result.rows
    if result.threshold is None:
        return [f"Answered {len(rows)} questions; no target picked (--max-fpr or --min-recall): nothing flagged."]
    flagged = int(rows["flag"].fillna(False).sum())
    lines = [f"Answered {len(rows)} questions; flagged {flagged} at {result.target} (log-odds >= "
             f"{result.threshold:.4f})."]
    if rows["abstained"].any():
        lines.append(f"Abstained on {int(rows['abstained'].sum())}: their answers are replaced by \"{REFUSAL}\".")
    if result.selective:
        s = result.selective
        kept = "n/a" if s["accuracy_kept"] is None else f"{s['accuracy_kept']:.3f}"
        lines.append(f"Selective accuracy: {kept} on the {s['kept']} answers kept ({s['share_kept']:.1%} of "
                     f"{s['rows']}); {s['accuracy_all']:.3f} on all.")
    return lines


OUTPUT_COLUMNS = ("id", "question", "answer", "error_probability", "flag", "abstained", "exact_answer", "correct")


def write_rows(rows, output) -> str:
    """The answers as JSON lines (returned, for stdout) or written to `output` (.csv or .jsonl)."""
    from truthmap.rundir import write_atomic

    table = rows[list(OUTPUT_COLUMNS)]
    if output is None:
        return table.to_json(orient="records", lines=True, force_ascii=False).rstrip("\n")
    output = Path(output)
    if output.suffix.lower() not in (".csv", ".jsonl"):
        raise ConfigError(f"--output {output} must end in .csv or .jsonl.")
    if output.suffix.lower() == ".jsonl":
        write_atomic(output, lambda tmp: table.to_json(tmp, orient="records", lines=True, force_ascii=False))
    else:
        write_atomic(output, lambda tmp: table.to_csv(tmp, index=False))
    return f"Answers: {output}"

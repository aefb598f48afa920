"""The run's report: one self-contained report.html, and the status of every run on disk (`truthmap runs`).

The report reads only files of the run directory (no model, no torch), so it can be written after any stage:
a section whose files are missing is left out. Figures are embedded as data URIs and the CSS and the filter
script are inline, so the file can be mailed or archived alone. All text from the run is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from truthmap.errors import StoreError
from truthmap.rundir import (
    ANSWERS_FIX,
    ProbeFiles,
    RunDir,
    TableFiles,
    begun_runs,
    read_json,
    read_parquet,
    runs_below,
    write_atomic,
)

EXAMPLES_CAP = 500  # rows of answers.parquet shown; the page stays light in a browser
# Red flags: numbers too good to be true. A best cell at or above this AUC with a spread over the seeds below
# TOO_STEADY; answers that ran to the token limit in more than this share of rows; a class this small.
TOO_GOOD_AUC = 0.99
TOO_STEADY = 0.0005  # prints as ± 0.000
MOST_AT_LIMIT = 0.5
FEW_OF_A_CLASS = 20
TOP_ERRORS = 25  # rows in the "highest-scored errors" filter
TABLE_CAP = 200  # rows of a results CSV shown


def write_report(run_path) -> Path:
    """Write <run>/report.html from the run directory's files; return its path.

    Rewritten only when its content changes, so rerunning a finished study touches nothing.
    """
    run = RunDir.from_path(run_path)
    if not run.answers.exists():
        raise StoreError(f"No answers.parquet in {run.path}: not a run directory.{_runs_below(Path(run_path))}")
    info = read_json(run.run_json) if run.run_json.exists() else {}
    answers = read_parquet(run.answers, fix=ANSWERS_FIX)  # a damaged file named, as generate and probe name it
    sections = [
        ("summary", "Summary", summary_section(run, info, answers)),
        *heatmap_sections(run),
        ("detection", "Error detection, all datasets", detection_section(run)),
        ("generalization", "Generalization across datasets", generalization_section(run)),
        ("resamples", "Error types and answer selection", resample_section(run)),
        ("examples", "Examples", examples_section(answers, _read_scores(run))),
        ("configuration", "Configuration and versions", config_section(run, info)),
    ]
    title = f"truthmap · {run.path.parent.parent.name} · {run.path.parent.name} ({run.path.name})"
    page = render_page(title, [s for s in sections if s[2]])
    path = run.report
    data = page.encode("utf-8")  # bytes: reading text back would turn any "\r" into "\n" and never match
    if not path.exists() or path.read_bytes() != data:
        write_atomic(path, lambda tmp: tmp.write_bytes(data))
    return path


def _runs_below(path: Path) -> str:
    found = runs_below(path)[:3]
    if not found:
        return " Expected runs/<model>/<dataset>/<split>."
    return f" Did you mean: {', '.join(str(p) for p in found)}?"


# ---------------------------------------------------------------- sections (each returns HTML, '' when absent)


def red_flags(run: RunDir, answers=None) -> list[str]:
    """Warnings about numbers too good to be true, one line each, naming the likely cause; [] when none.

    - most answers ran to the token limit: a base model that does not stop writes on into invented turns, and the
      label and exact answer are then read from text the question never asked for;
    - a best cell at AUC >= 0.99 with no spread over the seeds: the likely cause is named from the run's own
      files: answers not stopping, too few rows of one class, wrong answers whose exact answer is copied from the
      prompt, else another text artefact (something in the probed tokens, not the model's knowledge, gives the
      label away).
    """
    if answers is None:
        import pandas as pd

        answers = pd.read_parquet(run.answers)
    flags = []
    at_limit = _ran_to_limit(run, answers)
    if at_limit and at_limit[0] > MOST_AT_LIMIT * len(answers):
        n, limit = at_limit
        flags.append(
            f"{n} of {len(answers)} answers ({n / len(answers):.0%}) ran to the {limit}-token limit without stopping: "
            "labels and exact answers may be read from text written after the answer (a base model that does not "
            "stop at the line break?); check the examples, or raise --max-new-tokens."
        )
    for site in _sites_with(run, "summary"):
        probes = read_json(run.probe_files(site).summary)
        best = probes.get("best")
        if not best or best["auc_mean"] < TOO_GOOD_AUC or best["auc_std"] >= TOO_STEADY:
            continue
        causes = []
        if at_limit and at_limit[0] > MOST_AT_LIMIT * len(answers):
            causes.append(f"answers not stopping ({at_limit[0]} of {len(answers)} ran to the token limit)")
        errors, correct = probes.get("errors"), probes.get("correct")
        if errors is not None and correct is not None and min(errors, correct) < FEW_OF_A_CLASS:
            causes.append(f"too few rows of one class ({errors} errors, {correct} correct among the probed rows)")
        copied = _errors_copying_the_prompt(answers) if best["token"].startswith("exact_answer") else None
        if copied and copied[0] > copied[1] / 2:
            causes.append(
                f"a text artefact: the exact answers of {copied[0]} of the {copied[1]} probed errors are text of the "
                "prompt (the question's own subject, or an example), so the exact-answer tokens give the label away"
            )
        if not causes:
            causes.append("a text artefact: something in the probed tokens, not the model's knowledge, gives the "
                          "label away (e.g. correct and wrong answers written or located differently)")
        flags.append(
            f"best cell ({site}, layer {best['layer']}, {best['token']}) AUC {best['auc_mean']:.3f} ± "
            f"{best['auc_std']:.3f} is too good to be true; likely cause: {'; '.join(causes)}."
        )
    return flags


def _errors_copying_the_prompt(answers) -> tuple[int, int] | None:
    """(probed errors whose exact answer occurs in the prompt, probed errors), or None when the table lacks them."""
    if not {"prompt", "exact_answer", "exact_answer_valid", "correct"} <= set(answers.columns):
        return None
    errors = answers[answers["exact_answer_valid"].astype(bool) & ~answers["correct"].astype(bool)]
    copied = sum(str(e).strip().lower() in str(p).lower() for e, p in zip(errors["exact_answer"], errors["prompt"]))
    return int(copied), len(errors)


def _ran_to_limit(run: RunDir, answers) -> tuple[int, int] | None:
    """(answers that ran to the token limit, that limit), or None when the run does not say."""
    if "stopped" not in answers.columns or "answer_len" not in answers.columns:
        return None
    settings = (read_json(run.run_json) if run.run_json.exists() else {}).get("settings", {})
    limit = settings.get("max_new_tokens") or int(answers["answer_len"].max() or 0)
    return int((~answers["stopped"].astype(bool)).sum()), int(limit)


def summary_section(run: RunDir, info: dict, answers) -> str:
    config = info.get("config", {})
    correct = int(answers["correct"].sum())
    rows = {
        "model": config.get("model", run.path.parent.parent.name),
        "model source": info.get("model_source", ""),
        "dataset": f"{run.path.parent.name} ({run.path.name})",
        "answers": f"{len(answers)}: {correct} correct, {len(answers) - correct} incorrect",
        "with a valid exact answer": int(answers["exact_answer_valid"].sum()),
        **_locating_rows(info, answers),
        "run directory": str(run.path),
    }
    for site in _sites_with(run, "summary"):
        probes = read_json(run.probe_files(site).summary)
        best = probes.get("best")
        if best:
            rows[f"best cell, {site}"] = (
                f"layer {best['layer']}, token {best['token']}, AUC {best['auc_mean']:.3f} ± {best['auc_std']:.3f}"
            )
        if probes.get("verdict"):
            rows[f"verdict, {site}"] = probes["verdict"]
    warnings = "".join(f'<p class="warning">Warning: {html.escape(flag)}</p>' for flag in red_flags(run, answers))
    return warnings + _key_value_table(rows)


def _locating_rows(info: dict, answers) -> dict:
    """How exact answers were found, the answers that name none (left out of probes), and the gold check."""
    settings = info.get("settings", {})
    sources = answers["exact_answer_source"].value_counts().to_dict()
    rows = {
        "exact answers located": f"{settings.get('locate', 'gold')}, {settings.get('extractor', 'free')} extractor",
        "exact-answer sources": ", ".join(f"{k} {v}" for k, v in sources.items()),
        "NO ANSWER (left out of probes and baselines)": sources.get("no_answer", 0),
    }
    agreement = info.get("exact_answer_agreement")
    if agreement and agreement.get("correct_with_gold"):
        n = agreement["correct_with_gold"]
        rows["agreement with the gold alias (correct answers)"] = (
            f"same tokens {agreement['same_tokens']} of {n} ({agreement['same_share']:.0%}), "
            f"overlapping {agreement['overlapping']} of {n} ({agreement['overlapping_share']:.0%})"
        )
    return rows


def heatmap_sections(run: RunDir) -> list[tuple[str, str, str]]:
    sections = []
    for site in sorted(set(_sites_with(run, "heatmap_svg")) | set(_sites_with(run, "heatmap_png"))):
        folder = run.probe_files(site)
        figure = folder.heatmap_svg if folder.heatmap_svg.exists() else folder.heatmap_png
        parts = [_figure(figure, f"Layer x token AUC of the error probes, {site}")]
        if folder.summary.exists():
            parts.append(_probe_facts(read_json(folder.summary)))
        if folder.top_cells.exists():
            parts.append("<h3>Best cells</h3>" + _records_table(read_json(folder.top_cells)))
        parts.append(controls_parts(folder))
        sections.append((f"heatmap-{site}", f"Heatmap: {site}", "\n".join(parts)))
    return sections


def controls_parts(folder: ProbeFiles) -> str:
    """The text-only controls of a probe folder, the verdict and the selectivity map; '' for a run made before."""
    probes = read_json(folder.summary) if folder.summary.exists() else {}
    parts = []
    if probes.get("verdict"):
        parts.append(f"<h3>Verdict</h3><p>{html.escape(probes['verdict'])}</p>")
    if probes.get("verdict_details"):  # the controls of the verdict: validation AUC chose each, test AUC scored it
        records = [{"control": c["label"], "chosen": c["member"], "validation_auc": c["validation_auc"],
                    "test_auc": c["auc_mean"]} for c in probes["verdict_details"]["controls"].values()]
        parts.append("<h3>Controls of the verdict (the bar: best on validation rows)</h3>" + _records_table(records))
    if probes.get("controls"):
        keys = ["label", "auc_mean", "auc_std", "auc_low", "auc_high"]
        keys += ["note"] * any("note" in c for c in probes["controls"].values())
        records = [{k: c.get(k) for k in keys} for c in probes["controls"].values()]
        parts.append("<h3>Text-only controls (no model internals)</h3>" + _records_table(records))
    if probes.get("embedding_best"):
        cell = probes["embedding_best"]
        token = html.escape(cell["token"])
        parts.append(f'<p class="note">Input embedding row (the token-identity floor): best {token},'
                     f" AUC {cell['auc_mean']:.3f}.</p>")
    figure = folder.selectivity_svg if folder.selectivity_svg.exists() else folder.selectivity_png
    if figure.exists():
        parts.append("<h3>Selectivity: AUC minus the best text-only control</h3>" + _figure(figure, "Selectivity"))
    return "\n".join(parts)


def _probe_facts(probes: dict) -> str:
    facts = {
        "rows probed (valid exact answer)": probes.get("rows_with_valid_exact_answer"),
        "errors / correct": f"{probes.get('errors')} / {probes.get('correct')}",
        "train / test rows per seed": f"{probes.get('n_train')} / {probes.get('n_test')}",
        "seeds": ", ".join(str(s) for s in probes.get("seeds", [])),
    }
    return _key_value_table(facts)


def detection_section(run: RunDir) -> str:
    tables = run.table_files
    return _files_section([tables.png, tables.csv, tables.risk_coverage_png, tables.metrics_csv, tables.cost_png,
                           tables.cost_csv]) + _table_verdicts(tables)


def _table_verdicts(tables: TableFiles) -> str:
    """The verdict lines that close detection_table.md (best probe against best text-only control, per dataset)."""
    path = tables.md
    if not path.exists() or "\nVerdict" not in path.read_text():
        return ""
    head, _, lines = path.read_text().partition("\nVerdict")
    items = [line[2:] for line in lines.splitlines() if line.startswith("- ")]
    return "<h3>Verdict" + html.escape(lines.splitlines()[0]) + "</h3><ul>" + "".join(
        f"<li>{html.escape(item)}</li>" for item in items) + "</ul>"


def generalization_section(run: RunDir) -> str:
    files = run.generalization_files
    return _files_section([files.auc_minus_baseline_png, files.auc_minus_control_png, files.auc_png, files.auc_csv,
                           files.auc_minus_baseline_csv, files.auc_minus_control_csv, files.text_controls])


def resample_section(run: RunDir) -> str:
    files = run.resample_files
    return _files_section([files.error_types, files.type_probes, files.selection_png, files.selection_csv])


def _files_section(paths: list[Path]) -> str:
    """Each file present, in order: a PNG as a figure, a CSV as a table under its name."""
    parts = []
    for path in paths:
        name = path.name
        if path.exists():
            body = _figure(path, name) if path.suffix == ".png" else _csv_table(path)
            parts.append(f"<h3>{html.escape(name)}</h3>\n{body}")
    return "\n".join(parts)


def config_section(run: RunDir, info: dict) -> str:
    parts = []
    if run.resolved_config.exists():
        for site, config in read_json(run.resolved_config).items():
            parts.append(f"<h3>Resolved configuration, site {html.escape(site)}</h3>" + _key_value_table(config))
    elif info.get("config"):
        parts.append("<h3>Configuration</h3>" + _key_value_table(info["config"]))
    machine = {k: info[k] for k in ("model_source", "chat_template", "device", "dtype", "seconds") if k in info}
    if machine:
        parts.append("<h3>Answers stage</h3>" + _key_value_table(machine))
    if info.get("versions"):
        parts.append("<h3>Versions</h3>" + _key_value_table(info["versions"]))
    return "\n".join(parts)


# ---------------------------------------------------------------- examples


def _read_scores(run: RunDir):
    """The saved detector's error probability per row, or None when no detector was applied to this run."""
    if not run.detector_scores.exists():
        return None
    import pandas as pd

    scores = pd.read_parquet(run.detector_scores)
    return scores.assign(id=scores["id"].astype(str)).set_index("id")


def examples_section(answers, scores) -> str:
    table = answers.assign(id=answers["id"].astype(str))
    if scores is not None:
        table = table.join(scores.reindex(columns=["error_probability", "in_train"]), on="id")
    ranks = _error_ranks(table) if scores is not None else {}
    shown = _pick_examples(table, set(ranks))
    note = ""
    if len(shown) < len(table):
        note = f"This page holds {len(shown)} of the {len(table)} answers: the top-scored errors, then the first"
        note += " rows of the file. All are in answers.parquet."
    head = ["#", "question", "answer (exact answer marked)", "gold", "label", "exact answer source"]
    if scores is not None:
        head += ["error probability", "detector fit"]
    rows = "\n".join(_example_row(i, row, ranks.get(row["id"]), scores is not None) for i, row in shown.iterrows())
    return (
        _filter_buttons(table, bool(ranks))
        + f'<p class="note"><span id="examples-count"></span> {html.escape(note)}</p>'
        + f'<table id="examples-table"><thead><tr>{"".join(f"<th>{html.escape(h)}</th>" for h in head)}</tr></thead>'
        + f"<tbody>\n{rows}\n</tbody></table>"
    )


def _error_ranks(table) -> dict[str, int]:
    """Incorrect answers with the highest error probability: id -> rank (0 = highest)."""
    errors = table[~table["correct"].astype(bool) & table["error_probability"].notna()]
    top = errors.sort_values("error_probability", ascending=False, kind="stable").head(TOP_ERRORS)
    return {row_id: rank for rank, row_id in enumerate(top["id"])}


def _pick_examples(table, keep: set[str]):
    if len(table) <= EXAMPLES_CAP:
        return table
    kept = table["id"].isin(keep)
    others = table[~kept].head(EXAMPLES_CAP - int(kept.sum()))
    return table[kept | table.index.isin(others.index)]


def _filter_buttons(table, with_top: bool) -> str:
    correct = int(table["correct"].sum())
    buttons = [("all", f"All ({len(table)})"), ("correct", f"Correct ({correct})")]
    buttons.append(("incorrect", f"Incorrect ({len(table) - correct})"))
    if with_top:
        buttons.append(("top", f"Highest-scored errors (top {TOP_ERRORS})"))
    return '<div class="filters">' + "".join(
        f'<button type="button" data-filter="{name}">{html.escape(label)}</button>' for name, label in buttons
    ) + "</div>"


def _example_row(index: int, row, rank: int | None, with_scores: bool) -> str:
    correct = bool(row["correct"])
    attributes = f' data-correct="{int(correct)}"' + (f' data-rank="{rank}"' if rank is not None else "")
    cells = [
        str(index),
        html.escape(str(row["question"])),
        _marked_answer(row),
        html.escape(_gold_text(row.get("gold"))),
        f'<span class="{"ok" if correct else "bad"}">{"correct" if correct else "incorrect"}</span>',
        html.escape(str(row.get("exact_answer_source", ""))),
    ]
    if with_scores:
        probability = row.get("error_probability")
        cells.append("–" if probability is None or probability != probability else f"{probability:.3f}")
        in_train = row.get("in_train")
        cells.append("–" if in_train is None or in_train != in_train else ("train" if in_train else "held out"))
    return f"<tr{attributes}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"


def _marked_answer(row) -> str:
    """The answer with its exact answer, answer[exact_start:exact_end], in <mark>; each part escaped."""
    answer = str(row["answer"])
    start, end = int(row.get("exact_start", -1)), int(row.get("exact_end", -1))
    if not row.get("exact_answer_valid", False) or not 0 <= start < end <= len(answer):
        return html.escape(answer)
    return html.escape(answer[:start]) + f"<mark>{html.escape(answer[start:end])}</mark>" + html.escape(answer[end:])


def _gold_text(gold) -> str:
    if gold is None or isinstance(gold, str):
        return gold or ""
    aliases = [str(g) for g in gold]
    return " | ".join(aliases[:4]) + (f" (+{len(aliases) - 4})" if len(aliases) > 4 else "")


# ---------------------------------------------------------------- HTML pieces


def _sites_with(run: RunDir, file: str) -> list[str]:
    """Sites whose probes/<site>/ holds that file (a ProbeFiles attribute: "summary", "heatmap_png")."""
    return [site for site in run.probe_sites() if getattr(run.probe_files(site), file).exists()]


def _figure(path: Path, caption: str) -> str:
    mime = "image/svg+xml" if path.suffix == ".svg" else "image/png"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<figure><img src="data:{mime};base64,{data}" alt="{html.escape(caption)}"></figure>'


def _cell(value) -> str:
    if isinstance(value, float):
        return "–" if value != value else f"{value:.3f}"
    if isinstance(value, (list, tuple, dict)):
        return html.escape(json.dumps(value))
    return html.escape("" if value is None else str(value))


def _key_value_table(values: dict) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{_cell(v)}</td></tr>" for k, v in values.items())
    return f'<table class="facts">{rows}</table>'


def _records_table(records: list[dict]) -> str:
    if not records:
        return '<p class="note">(no rows)</p>'
    head = list(records[0])
    body = "".join("<tr>" + "".join(f"<td>{_cell(r.get(h))}</td>" for h in head) + "</tr>" for r in records)
    header = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    return f"<table><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table>"


def _csv_table(path: Path) -> str:
    import pandas as pd

    try:
        frame = pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError) as error:  # say so, and keep the rest of the report
        return f'<p class="note">Unreadable: {html.escape(str(error))}</p>'
    frame.columns = ["" if str(c).startswith("Unnamed:") else str(c) for c in frame.columns]  # a saved index
    note = f'<p class="note">First {TABLE_CAP} of {len(frame)} rows; all in {html.escape(path.name)}.</p>' if (
        len(frame) > TABLE_CAP
    ) else ""
    return _records_table(frame.head(TABLE_CAP).to_dict("records")) + note


STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1200px; padding: 1em 2em; color: #222; }
nav a { margin-right: 1em; }
h2 { border-bottom: 1px solid #ccc; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
thead th { background: #f2f4f7; position: sticky; top: 0; }
table.facts th { background: #f7f7f7; font-weight: normal; color: #555; }
figure { margin: 0.5em 0; }
figure img { max-width: 100%; }
mark { background: #ffe58a; }
.ok { color: #17692e; } .bad { color: #a31515; }
.note { color: #666; }
.warning { background: #fff3cd; border-left: 4px solid #d39e00; padding: 6px 10px; }
.filters button { margin-right: 0.5em; padding: 4px 10px; cursor: pointer; }
.filters button[aria-pressed="true"] { background: #2b5797; color: white; border-color: #2b5797; }
"""

# Filters: show all, correct or incorrect rows in file order, or the top-ranked errors in rank order.
SCRIPT = """
(function () {
  var table = document.getElementById("examples-table");
  if (!table) return;
  var body = table.tBodies[0];
  var rows = Array.prototype.slice.call(body.rows);
  var keep = {
    all: function (row) { return true; },
    correct: function (row) { return row.dataset.correct === "1"; },
    incorrect: function (row) { return row.dataset.correct === "0"; },
    top: function (row) { return row.dataset.rank !== undefined; }
  };
  var buttons = Array.prototype.slice.call(document.querySelectorAll(".filters button"));
  function rank(row) { return row.dataset.rank === undefined ? 1e9 : Number(row.dataset.rank); }
  function show(filter) {
    var order = filter === "top" ? rows.slice().sort(function (a, b) { return rank(a) - rank(b); }) : rows;
    var shown = 0;
    order.forEach(function (row) {
      row.hidden = !keep[filter](row);
      if (!row.hidden) shown += 1;
      body.appendChild(row);
    });
    document.getElementById("examples-count").textContent = shown + " of " + rows.length + " rows shown.";
    buttons.forEach(function (b) { b.setAttribute("aria-pressed", String(b.dataset.filter === filter)); });
  }
  buttons.forEach(function (b) { b.addEventListener("click", function () { show(b.dataset.filter); }); });
  show("all");
})();
"""


def render_page(title: str, sections: list[tuple[str, str, str]]) -> str:
    nav = " ".join(f'<a href="#{anchor}">{html.escape(name)}</a>' for anchor, name, _ in sections)
    body = "\n".join(
        f'<section id="{anchor}"><h2>{html.escape(name)}</h2>\n{content}</section>' for anchor, name, content in sections
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>\n"
        f"<body><h1>{html.escape(title)}</h1><nav>{nav}</nav>\n{body}\n<script>{SCRIPT}</script></body></html>\n"
    )


# ---------------------------------------------------------------- runs on disk


def find_runs(runs_dir) -> list[RunDir]:
    """Every runs/<model-slug>/<dataset>/<split> that has begun (answers, run.json or generation checkpoints)."""
    return [RunDir.from_path(p) for p in begun_runs(runs_dir)]


def run_status(run: RunDir, damaged: list[str] | None = None) -> dict:
    """What a run directory holds, read from its files only: counts and the stages done. A damaged file marks its
    column 'DAMAGED' and adds its one-line error to `damaged`, so the other runs are still listed."""
    damaged = [] if damaged is None else damaged
    samples = correct = None
    answers = None
    if run.answers.exists():
        try:
            fix = "delete it and rerun the command that made this run to rebuild it"
            labels = read_parquet(run.answers, ["correct"], fix)["correct"]
            samples, correct = len(labels), int(labels.sum())
        except StoreError as err:
            damaged.append(str(err))
            answers = "DAMAGED"
    parts = len(run.work.generations.parts())
    answers = answers or ("done" if samples is not None else (f"{parts} batches" if parts else "started"))
    return {
        "model": run.path.parent.parent.name,
        "dataset": run.path.parent.name,
        "split": run.path.name,
        "samples": samples,
        "correct": correct,
        "answers": answers,
        "activations": ",".join(_activation_status(run, damaged)) or "-",
        "probes": ",".join(_sites_with(run, "summary")) or "-",
        "detector": _detector_status(run),
        "report": "yes" if run.report.exists() else "-",
    }


def _detector_status(run: RunDir) -> str:
    """Sites of the detectors fitted on this run; 'scored' when a detector was applied to its rows."""
    sites = ",".join(run.detector_sites())
    scored = "scored" if run.detector_scores.exists() else ""
    return " ".join(filter(None, [sites, scored])) or "-"


def _activation_status(run: RunDir, damaged: list[str]) -> list[str]:
    """Sites with a complete store, and the share written of unfinished ones ('attn 40%')."""
    from truthmap.stages.activations import META_FIX

    found = []
    for site in run.store_sites():
        meta_path = run.store(site).meta
        try:
            meta = read_json(meta_path, META_FIX)
        except StoreError as err:
            damaged.append(str(err))
            found.append(f"{site} DAMAGED")
            continue
        total = meta["shape"][2]
        written = meta.get("written", 0)
        found.append(site if written == total else f"{site} {100 * written // max(total, 1)}%")
    return found


def format_runs(runs: list[RunDir], runs_dir) -> str:
    """One aligned line per run, under a header."""
    if not runs:
        return f"No runs under {runs_dir}."
    damaged: list[str] = []
    statuses = [run_status(run, damaged) for run in runs]
    columns = list(statuses[0])
    rows = [columns] + [["-" if s[c] is None else str(s[c]) for c in columns] for s in statuses]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    numeric = {"samples", "correct"}
    return "\n".join(
        ["  ".join(cell.rjust(w) if c in numeric else cell.ljust(w) for c, cell, w in zip(columns, row, widths)).rstrip()
         for row in rows]
        + [f"Damaged: {message}" for message in damaged]
    )

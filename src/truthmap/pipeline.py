"""The Python API: each function runs one stage of a study from a RunConfig and returns where it wrote."""

from __future__ import annotations

import dataclasses
import time

from truthmap.config import RunConfig
from truthmap.errors import ConfigError
from truthmap.rundir import ANSWER_COLUMNS, Checkpoints, RunDir, check_matches, package_versions, read_json, write_json, write_parquet


def run_dir(config: RunConfig) -> RunDir:
    from truthmap.models import model_slug

    return RunDir(config.runs_dir, model_slug(config.model), config.dataset, config.split)


def load_config_records(config: RunConfig):
    from truthmap.datasets import CustomSource, get_spec, load_records

    spec = get_spec(config.dataset)
    custom = None
    if config.dataset == "custom":
        if not config.custom_path:
            raise ConfigError("Dataset 'custom' needs a file: pass --custom-path FILE.csv|FILE.jsonl.")
        custom = CustomSource(config.custom_path, config.question_column, config.answer_column)
    records = load_records(config.dataset, config.split, config.data_dir, config.n_samples, config.seed, custom)
    return spec, records


def answers_settings(config: RunConfig, spec) -> dict:
    """What decides the content of answers.parquet; resuming with any of it changed is refused."""
    return {
        "model": config.model,
        "dataset": config.dataset,
        "dataset_version": spec.version,
        "split": config.split,
        "n_samples": config.n_samples,
        "seed": config.seed,
        "prompt_style": config.prompt_style,
        "max_new_tokens": config.max_new_tokens or spec.max_new_tokens,
        "custom_path": config.custom_path,
    }


def generate(config: RunConfig, lm=None) -> RunDir:
    """Generate, label and locate: writes answers.parquet and run.json (skipped when already done)."""
    import pandas as pd

    from truthmap.datasets import build_prompt
    from truthmap.generate import generate_answers
    from truthmap.label import label_answers
    from truthmap.locate import direct_spans, exact_answer_columns, extract_with_llm
    from truthmap.models import load_model

    spec, records = load_config_records(config)
    run = run_dir(config)
    settings = answers_settings(config, spec)
    if run.answers.exists() and run.run_json.exists():
        check_matches(read_json(run.run_json)["settings"], settings, run.path)
        return run
    started = time.time()
    lm = lm or load_model(config.model, config.device, config.dtype)
    lm = dataclasses.replace(lm, is_chat=_use_chat(config.prompt_style, lm))
    prompts = [build_prompt(spec, r, "instruct" if lm.is_chat else "base") for r in records]
    ids = [r.id for r in records]
    frame = generate_answers(
        lm, ids, prompts, settings["max_new_tokens"], config.batch_size, Checkpoints(run.generation_parts, settings)
    )
    frame["correct"] = label_answers(spec, records, list(frame["answer"]))
    spans = direct_spans(spec, records, list(frame["answer"]), list(frame["correct"]))
    if spec.exact_answer == "match":
        extractor = lm if not config.extraction_model else load_model(config.extraction_model, config.device, config.dtype)
        pending = [(r.id, r.question, a) for r, a in zip(records, frame["answer"]) if r.id not in spans]
        extraction_settings = settings | {"extraction_model": config.extraction_model, "tries": config.extraction_tries}
        checkpoints = Checkpoints(run.extraction_parts, extraction_settings)
        spans |= extract_with_llm(extractor, pending, config.batch_size, checkpoints, config.extraction_tries, config.seed)
    else:
        spans |= {r.id: ("not_found", None) for r in records if r.id not in spans}
    table = pd.DataFrame(
        {
            "id": ids,
            "question": [r.question for r in records],
            "prompt": prompts,
            "gold": [list(r.answers) for r in records],
            "group": [r.group for r in records],
        }
    ).merge(frame, on="id")
    table = table.assign(**exact_answer_columns(table, lm.tokenizer, spans))
    table["prompt_len"] = table["prompt_ids"].map(len)
    table["answer_len"] = table["answer_ids"].map(len)
    write_parquet(run.answers, table[list(ANSWER_COLUMNS)])
    write_json(
        run.run_json,
        {
            "settings": settings,
            "config": config.to_dict(),
            "model_source": lm.source,
            "chat_template": lm.is_chat,
            "device": lm.device,
            "dtype": lm.dtype,
            "n_samples": len(table),
            "seconds": round(time.time() - started, 1),
            "versions": package_versions(),
        },
    )
    return run


def _use_chat(prompt_style: str, lm) -> bool:
    if prompt_style == "instruct" and not lm.is_chat:
        raise ConfigError(f"--prompt-style instruct needs a chat template, and model '{lm.name}' has none. Use base.")
    return lm.is_chat if prompt_style == "auto" else prompt_style == "instruct"


def summarize_answers(run: RunDir) -> dict:
    import pandas as pd

    table = pd.read_parquet(run.answers, columns=["correct", "exact_answer_valid", "exact_answer_source"])
    return {
        "answers": str(run.answers),
        "samples": len(table),
        "correct": int(table["correct"].sum()),
        "incorrect": int((~table["correct"]).sum()),
        "valid_exact_answer": int(table["exact_answer_valid"].sum()),
        "exact_answer_sources": table["exact_answer_source"].value_counts().to_dict(),
    }


def _answers_table(run: RunDir):
    import pandas as pd

    if not run.answers.exists():
        raise ConfigError(f"No answers in {run.path}. Run `truthmap generate` with the same options first.")
    return pd.read_parquet(run.answers)


def extraction_done(run: RunDir, site: str) -> bool:
    meta_path = run.activations(site) / "meta.json"
    return meta_path.exists() and (meta := read_json(meta_path))["written"] == meta["shape"][2]


def extract(config: RunConfig, lm=None) -> RunDir:
    """Activations at the probed positions for every answer (skipped when the store is complete)."""
    from truthmap.activations import extract_activations
    from truthmap.models import load_model

    run = run_dir(config)
    table = _answers_table(run)
    if extraction_done(run, config.site):
        return run
    lm = lm or load_model(config.model, config.device, config.dtype)
    settings = read_json(run.run_json)["settings"]
    extract_activations(lm, table, run.activations(config.site), config.site, config.batch_size, settings)
    return run


class _Rows:
    """A [samples, layers, positions, hidden] store restricted to some rows, read one cell at a time."""

    def __init__(self, acts, rows):
        self.acts, self.rows = acts, rows
        self.shape = (len(rows),) + tuple(acts.shape[1:])

    def __getitem__(self, key):
        import numpy as np

        return np.asarray(self.acts[key])[self.rows]


def probe(config: RunConfig) -> RunDir:
    """Probe every (layer, position) cell on the rows with a valid exact answer; write the heatmap and tables."""
    import numpy as np

    from truthmap.activations import open_store
    from truthmap.heatmap import plot_heatmap, top_cells, write_heatmap_csv, write_top_cells
    from truthmap.models import model_slug
    from truthmap.probes import probe_grid
    from truthmap.rundir import POSITIONS

    run = run_dir(config)
    out = run.probes(config.site)
    table = _answers_table(run)
    acts, meta = open_store(run.activations(config.site))
    made_by = {"answers": meta["answers"], "site": config.site, "seeds": list(config.seeds)}
    if (out / "probes.json").exists() and all(read_json(out / "probes.json").get(k) == v for k, v in made_by.items()):
        return run
    rows = np.flatnonzero(table["exact_answer_valid"].to_numpy())
    is_error = ~table["correct"].to_numpy()[rows]
    groups = [table["group"].iloc[i] for i in rows]
    grid = probe_grid(_Rows(acts, rows), is_error, groups=groups, seeds=config.seeds, name=config.dataset)
    title = f"{model_slug(config.model)} · {config.dataset} ({config.split}) · {config.site} · n={len(rows)}"
    plot_heatmap(grid.mean, POSITIONS, title, out / "heatmap.png", out / "heatmap.svg")
    write_heatmap_csv(grid, POSITIONS, out / "heatmap.csv")
    write_top_cells(grid, POSITIONS, out / "top_cells.json")
    write_json(
        out / "probes.json",
        made_by
        | {
            "rows_with_valid_exact_answer": int(len(rows)),
            "errors": int(is_error.sum()),
            "correct": int((~is_error).sum()),
            "n_train": grid.n_train,
            "n_test": grid.n_test,
            "best": top_cells(grid, POSITIONS, k=1)[0],
            "activations": {k: meta[k] for k in ("shape", "dtype", "clipped")},
        },
    )
    return run


def run_all(config: RunConfig) -> dict:
    """generate -> extract -> probe, skipping finished stages; returns where the figure is and the best cell."""
    run = run_dir(config)
    lm = None
    if not run.answers.exists() or not extraction_done(run, config.site):
        from truthmap.models import load_model

        lm = load_model(config.model, config.device, config.dtype)
    generate(config, lm)
    extract(config, lm)
    probe(config)
    summary = read_json(run.probes(config.site) / "probes.json")
    return {"heatmap": str(run.probes(config.site) / "heatmap.png"), "best": summary["best"], **summarize_answers(run)}

"""The Python API: each function runs one stage of a study from a RunConfig and returns where it wrote."""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path

from truthmap.config import RunConfig
from truthmap.errors import ConfigError, DataError, StoreError
from truthmap.generate import answers_settings, generation_settings, locating_settings
from truthmap.rundir import (
    ANSWER_COLUMNS,
    ANSWERS_FIX,
    POSITIONS,
    ProbeFiles,
    RunDir,
    check_checkpoints,
    check_matches,
    check_token,
    file_sha256,
    generalization_dir,
    package_versions,
    position_column,
    read_json,
    read_parquet,
    run_lock,
    tables_dir,
    write_json,
    write_parquet,
    write_run_json,
)


def run_dir(config: RunConfig) -> RunDir:
    from truthmap.models import model_slug

    return RunDir(config.runs_dir, model_slug(config.model), config.dataset, config.split)


def locked(stage):
    """Hold the run directory's lock while a stage may write there: a second process writing the same run stops at
    once (rundir.run_lock). run_all's stages take it again, which the lock allows within one process."""

    @functools.wraps(stage)
    def wrapper(config: RunConfig, *args, **kwargs):
        with run_lock(run_dir(config)):
            return stage(config, *args, **kwargs)

    return wrapper


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


def check_resume(config: RunConfig) -> None:
    """Refuse bad input and work on disk made with other settings before any model loads (it takes seconds)."""
    run = run_dir(config)
    if imported(run):  # its answers came from a file (`truthmap import`), not from this dataset's questions
        if not extraction_done(run, config.site):
            check_extract_resume(config, run, read_json(run.run_json)["settings"])
        return
    spec, _ = load_config_records(config)  # the dataset's own errors first
    settings = answers_settings(config, spec)
    if run.run_json.exists():
        check_matches(read_json(run.run_json)["settings"], settings, run.path)
    if not run.answers.exists():
        if config.executor == "local":  # Ray workers resolve their own
            check_generation_resume(config, run, settings, config.site)
    elif run.run_json.exists() and config.executor == "local" and not extraction_done(run, config.site):
        check_extract_resume(config, run, read_json(run.run_json)["settings"])


def check_generation_resume(config: RunConfig, run: RunDir, settings: dict, site: str | None) -> None:
    """Before the model loads: the checkpoints of the answers stage, and the store it records into while
    generating, must have been begun with these settings, dtype and device kind."""
    from truthmap.activations import check_resume as check_store
    from truthmap.models import default_device_and_dtype
    from truthmap.stages import compute_settings

    check_checkpoints(run.generation_parts, generation_settings(settings) | compute_settings(config))
    check_checkpoints(run.extraction_parts, settings)
    if site:
        device, dtype = default_device_and_dtype(config.device, config.dtype)
        check_store(run.activations(site), None, site, dtype, device)  # settings lack stop_text until it loads


def check_extract_resume(config: RunConfig, run: RunDir, settings: dict) -> None:
    """The activations must come from the model that answered, and a store begun with another dtype, device kind
    or site is not finished with this one (the numbers would differ from row to row)."""
    from truthmap.activations import check_resume as check_store
    from truthmap.models import default_device_and_dtype, same_model

    if not same_model(config.model, settings["model"]):
        raise StoreError(
            f"{run.path} holds the answers of model {settings['model']!r}, not {config.model!r}: activations must "
            f"come from the model that answered. Use --model {settings['model']}."
        )
    device, dtype = default_device_and_dtype(config.device, config.dtype)
    check_store(run.activations(config.site), settings, config.site, dtype, device)


@locked
def generate(config: RunConfig, lm=None, activations: bool = True) -> RunDir:
    """Generate, label and locate, recording config.site's activations while generating (activations=False: not):
    writes answers.parquet, run.json and that site's store (skipped when already done)."""
    import pandas as pd

    from truthmap.activations import merge_stores
    from truthmap.datasets import build_prompt
    from truthmap.executor import runner
    from truthmap.generate import answer_stop
    from truthmap.models import encode_prompt
    from truthmap.stages import Answering, answer_shard, describe

    run = run_dir(config)
    if imported(run):
        return run  # answers imported from a file are the run's answers; nothing to generate
    spec, records = load_config_records(config)
    settings = answers_settings(config, spec)
    if run.answers.exists() and run.run_json.exists():
        made = read_json(run.run_json)
        check_matches(made["settings"], settings, run.path)
        # Where answers end depends on the prompt style the run used. A run made before answers stopped at the line
        # break has no stop_text: read as None, its base-model answers (which ran on) are refused, chat ones kept.
        stop = {"stop_text": answer_stop(spec, made["chat_template"])}
        check_matches({"stop_text": made["settings"].get("stop_text")}, stop, run.path)
        return run
    site = config.site if activations else None
    if config.executor == "local":
        check_generation_resume(config, run, settings, site)  # before the model loads
    started = time.time()
    with runner(config, model_state(config, lm), -(-len(records) // config.batch_size)) as workers:
        lm = workers.one(describe)  # the tokenizer and chat template as the workers have them
        settings["stop_text"] = answer_stop(spec, lm.is_chat)
        made_parts = run.work.generations.settings
        if made_parts.exists():  # batches of a killed run from before the stop rule: as on resume above
            check_matches({"stop_text": read_json(made_parts).get("stop_text")}, settings, run.generation_parts)
        prompts = [build_prompt(spec, r, "instruct" if lm.is_chat else "base") for r in records]
        lengths = [len(encode_prompt(lm.tokenizer, p, lm.is_chat)) for p in prompts]
        order = sorted(range(len(records)), key=lambda i: -lengths[i])  # generate_answers' order: longest first
        batches = [order[start : start + config.batch_size] for start in range(0, len(order), config.batch_size)]
        job = Answering(config, spec, records, prompts, settings, generation_settings(settings), run, site)
        shards = workers.map(functools.partial(answer_shard, job=job), batches, "Generating answers")
    if site and config.executor == "ray":
        merge_stores([(rows, store) for _, rows, store in shards], run.activations(site), len(records))
    frame = pd.concat([located for located, _, _ in shards]).set_index("id").loc[[r.id for r in records]]
    write_answers(run, config, settings, records, prompts, frame.reset_index(), lm, started, site)
    return run


def model_state(config: RunConfig, lm=None):
    """What the executor's workers hold (stages.load_models), as a picklable function: a local model path is made
    absolute, since a Ray worker may run in another directory."""
    from truthmap.models import model_location
    from truthmap.stages import load_models

    if config.executor == "ray":
        config = dataclasses.replace(config, model=model_location(config.model),
                                     extraction_model=config.extraction_model and model_location(config.extraction_model))
    return functools.partial(load_models, config, lm)


def write_answers(run: RunDir, config: RunConfig, settings: dict, records, prompts, frame, lm, started,
                  site: str | None = None, extra: dict | None = None) -> None:
    """answers.parquet (records + located answers, label.label_and_locate's frame) and run.json (with `extra`'s
    keys)."""
    import pandas as pd

    from truthmap.locate import gold_agreement

    ids = [r.id for r in records]
    table = pd.DataFrame(
        {
            "id": ids,
            "question": [r.question for r in records],
            "prompt": prompts,
            "gold": [list(r.answers) for r in records],
            "group": [r.group for r in records],
        }
    ).merge(frame, on="id")
    write_parquet(run.answers, table[list(ANSWER_COLUMNS)])
    write_run_json(
        run,
        {
            "settings": settings,
            "config": config.to_dict(),
            "model_source": lm.source,
            "model_identity": getattr(lm, "identity", None),  # which weights made the answers (models.model_identity)
            "chat_template": lm.is_chat,
            "device": lm.device,
            "dtype": lm.dtype,
            "n_samples": len(table),
            "exact_answer_agreement": gold_agreement(table),
            "activations_while_generating": site,  # the store of this site came from the answers' own decoding
            "seconds": round(time.time() - started, 1),
            "versions": package_versions(),
            **(extra or {}),
        },
    )


def imported(run: RunDir) -> bool:
    """Whether the run's answers were imported from a file (`truthmap import`) rather than generated."""
    return run.answers.exists() and run.run_json.exists() and "import" in read_json(run.run_json)


@locked
def import_answers(config: RunConfig, source, lm=None, strict: bool = False, activations: bool = True) -> dict:
    """`truthmap import` (importer.py): write the run of config (its model, dataset and split) from the answers
    file, and config.site's activations from the same teacher-forced pass that scores the answer tokens
    (activations=False: not); returns the import summary.

    A finished import of the same file returns at once; checkpoints of a killed one are resumed."""
    from truthmap.datasets import get_spec
    from truthmap.activations import create_or_resume, new_meta
    from truthmap.importer import (SHOWN_ROWS, check_rows, describe_skips, generation_frame, import_settings,
                                   label_rows, locate_rows, prepare_rows, read_rows, score_answers)
    from truthmap.label import located_frame
    from truthmap.rundir import Checkpoints, check_checkpoints, check_matches, file_sha256, read_json

    spec = get_spec(config.dataset)
    path = Path(source.path).expanduser()
    rows = read_rows(path, source)  # the file's own errors first, before any model loads
    run = run_dir(config)
    settings = import_settings(config, spec, source, file_sha256(path), len(rows))
    if run.run_json.exists():
        made = read_json(run.run_json)
        if "import" not in made:
            raise ConfigError(f"{run.path} holds answers generated by truthmap, not imported ones; import into "
                              "another --runs-dir, --dataset or --split, or delete that run.")
        check_matches(made["settings"], settings, run.path)
        if run.answers.exists():
            return made["import"] | summarize_answers(run)
    check_checkpoints(run.import_parts, settings)
    check_checkpoints(run.extraction_parts, settings)
    if strict:
        check_rows(rows, source)  # what can be seen in the text fails before the model loads
    started = time.time()
    if lm is None:
        from truthmap.models import load_model

        lm = load_model(config.model, config.device, config.dtype)
    from truthmap.stages import use_chat

    lm = dataclasses.replace(lm, is_chat=use_chat(config.prompt_style, lm))
    kept, skipped, text_differs = prepare_rows(rows, spec, lm, source, strict)
    if not kept:
        raise DataError(f"No row of {path} can be imported ({describe_skips(skipped)}); see the summary's kinds.")
    records, labels = label_rows(spec, kept)
    frame = generation_frame(lm, kept).assign(correct=[labels["correct"][r.id] for r in kept])
    spans = locate_rows(config, spec, records, kept, frame, lm, settings, run)
    located = located_frame(frame, records, spans, lm.tokenizer)
    site, store = config.site if activations else None, None
    if site:  # store row k is answers.parquet's row k: both follow the kept rows
        store = (run.activations(site), create_or_resume(run.activations(site),
                                                         new_meta(lm, site, len(located), settings, one_pass=True)))
    logprobs = score_answers(lm, located, config.batch_size, Checkpoints(run.import_parts, settings), store)
    located["answer_logprobs"] = [logprobs[i] for i in located["id"]]
    summary = {
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
    write_answers(run, config, settings, records, list(located["prompt"]), located.drop(columns=["prompt"]), lm,
                  started, site, extra={"import": summary})
    return summary | summarize_answers(run)


def summarize_answers(run: RunDir) -> dict:
    table = read_parquet(run.answers, ["correct", "stopped", "exact_answer_valid", "exact_answer_source"], ANSWERS_FIX)
    no_answer = table["exact_answer_source"] == "no_answer"
    wrong = ~table["correct"] & ~no_answer
    made = read_json(run.run_json)
    return {
        "answers": str(run.answers),
        "samples": len(table),
        "correct": int(table["correct"].sum()),
        "incorrect": int((~table["correct"]).sum()),
        "stopped": int(table["stopped"].sum()),  # answers that ended before the token limit
        "valid_exact_answer": int(table["exact_answer_valid"].sum()),
        "exact_answer_sources": table["exact_answer_source"].value_counts().to_dict(),
        # Answers that name no answer are their own kind: left out of probes and baselines, as in the paper.
        "no_answer": int(no_answer.sum()),
        "wrong_with_exact_answer": f"{int(table['exact_answer_valid'][wrong].sum())} of {int(wrong.sum())}",
        "locate": made["settings"].get("locate", "gold"),
        "gold_agreement": made.get("exact_answer_agreement"),
    }


def _answers_table(run: RunDir):
    if not run.answers.exists():
        raise StoreError(f"No answers in {run.path}. Run `truthmap generate` with the same options first.")
    return read_parquet(run.answers, fix=ANSWERS_FIX)


def extraction_done(run: RunDir, site: str) -> bool:
    from truthmap.activations import META_FIX

    meta_path = run.store(site).meta
    return meta_path.exists() and (meta := read_json(meta_path, META_FIX))["written"] == meta["shape"][2]


@locked
def extract(config: RunConfig, lm=None) -> RunDir:
    """Activations at the probed positions for every answer, by a forward pass over it (skipped when the store is
    complete: generate records its site's while generating). For another site, or answers made elsewhere."""
    from truthmap.activations import extraction_batches, merge_stores
    from truthmap.executor import runner
    from truthmap.stages import Extracting, extract_shard

    run = run_dir(config)
    table = _answers_table(run)
    if extraction_done(run, config.site):
        return run
    settings = read_json(run.run_json)["settings"]
    if lm is None and config.executor == "local":
        check_extract_resume(config, run, settings)  # before the model loads
    cut = extraction_batches([len(p) + len(a) for p, a in zip(table["prompt_ids"], table["answer_ids"])],
                             config.batch_size)
    columns = ["prompt_ids", "answer_ids", *(position_column(p) for p in POSITIONS)]
    job = Extracting(table[columns], settings, config.site, config.batch_size, run)
    started = time.perf_counter()
    with runner(config, model_state(config, lm), len(cut)) as workers:
        shards = workers.map(functools.partial(extract_shard, job=job), cut, f"Extracting {config.site} activations")
    if config.executor == "ray":
        merge_stores(shards, run.activations(config.site), len(table))
    from truthmap.costs import record_seconds  # the probes' cost, beside the detection table

    record_seconds(run.costs, "extract", time.perf_counter() - started, len(table))
    return run


PROBE_OUTPUTS = 3  # bump when the probe stage writes new files: 2 = embedding row, controls, intervals; 3 = fair verdict


@locked
def probe(config: RunConfig) -> RunDir:
    """Probe every (layer, position) cell on the rows with a valid exact answer; write the heatmap and tables."""
    import numpy as np

    from truthmap.activations import open_embedding, open_store
    from truthmap.models import model_slug

    run = run_dir(config)
    out = run.probe_files(config.site)
    table = _answers_table(run)
    acts, meta = open_store(run.activations(config.site))
    made_by = {"answers": meta["answers"], "site": config.site, "seeds": list(config.seeds), "outputs": PROBE_OUTPUTS}
    if out.summary.exists() and all(read_json(out.summary).get(k) == v for k, v in made_by.items()):
        return run
    rows = np.flatnonzero(table["exact_answer_valid"].to_numpy())
    embed = open_embedding(run.activations(config.site), meta)
    grid, embed_grid, controls = probe_cells(table, rows, acts, embed, config)
    title = f"{model_slug(config.model)} · {config.dataset} ({config.split}) · {config.site} · n={len(rows)}"
    summary = write_probe_outputs(out, grid, embed_grid, controls, title, config.dataset)
    from truthmap.verdict import run_verdict  # the cell chosen on validation rows, the embedding row a control

    summary |= run_verdict(table, rows, acts, embed, config.seeds, config.dataset, config.device)
    write_json(
        out.summary,
        made_by
        | {
            "rows_with_valid_exact_answer": int(len(rows)),
            "errors": grid.n_errors,
            "correct": grid.n_correct,
            "n_train": grid.n_train,
            "n_test": grid.n_test,
            **summary,
            "activations": {k: meta[k] for k in ("shape", "dtype", "clipped")},
        },
    )
    return run


def probe_cells(table, rows, acts, embed, config: RunConfig, progress=True) -> tuple:
    """(probe grid, input-embedding row or None, text controls) on the answers table's rows (with a valid exact
    answer), of the store acts [answers, layers, positions, hidden] and embed [answers, 1, positions, hidden]."""
    from truthmap.activations import RowView
    from truthmap.probes import probe_grid

    is_error = ~table["correct"].to_numpy()[rows]
    groups = [table["group"].iloc[i] for i in rows]
    grid = probe_grid(RowView(acts, rows), is_error, groups=groups, seeds=config.seeds, name=config.dataset,
                      device=config.device, progress=progress)
    embed_grid = None
    if embed is not None:  # the token-identity floor: one more "layer", probed on the same rows and splits
        embed_grid = probe_grid(RowView(embed, rows), is_error, groups=groups, seeds=config.seeds,
                                name=f"{config.dataset} (input embedding)", device=config.device, progress=False)
    # Not in a thread beside the grid: with the grid's two fits on the 2 CPUs that made the stage slower.
    return grid, embed_grid, text_controls(table, rows, is_error, groups, config)


def text_controls(table, rows, is_error, groups, config: RunConfig) -> dict:
    """The text-only controls (controls.py) on the probe grid's rows, splits and bootstrap draws."""
    from truthmap.controls import CONTROLS, control_grid
    from truthmap.probes import bootstrap_weights, split_masks

    texts = {name: [str(t) for t in table[column].iloc[rows]] for name, (column, _) in CONTROLS.items()}
    train = split_masks(len(rows), groups, tuple(config.seeds), is_error, name=config.dataset)
    return control_grid(texts, is_error, train, bootstrap_weights(is_error))


def write_probe_outputs(out: ProbeFiles | Path, grid, embed_grid, controls: dict, title: str, dataset: str) -> dict:
    """heatmap.png|svg|csv (embedding row below layer 0, grey dots where a cell's interval does not clear the best
    control), selectivity.png|svg|csv, top_cells.json; returns the summary entries of probes.json."""
    out = ProbeFiles(out.path if isinstance(out, ProbeFiles) else out)
    from truthmap.controls import best_control, public, selectivity, verdict
    from truthmap.heatmap import EMBED_ROW, plot_heatmap, top_cells, with_embedding, write_heatmap_csv
    from truthmap.heatmap import write_selectivity_csv, write_top_cells

    rows, labels = with_embedding(grid, embed_grid)
    sel = selectivity(rows, controls)
    best_name = best_control(controls)
    control_auc = controls[best_name]["auc_mean"] if best_name else None
    note = ""
    if "clears" in sel:
        note = f"· : 95% interval does not clear {controls[best_name]['label']} (AUC {control_auc:.3f})"
    plot_heatmap(rows.mean, POSITIONS, title, out.heatmap_png, out.heatmap_svg, labels,
                 marked=~sel["clears"] if "clears" in sel else None, note=note)
    write_heatmap_csv(rows, POSITIONS, out.heatmap_csv, labels)
    if best_name:
        plot_heatmap(sel["mean"], POSITIONS, f"Selectivity: AUC minus {controls[best_name]['label']}\n{title}",
                     out.selectivity_png, out.selectivity_svg, labels, marked=~sel["clears"] if "clears" in sel
                     else None, diverging=True, note=note)
        write_selectivity_csv(sel, POSITIONS, out.selectivity_csv, labels)
    write_top_cells(grid, POSITIONS, out.top_cells, control_auc=control_auc)
    best = top_cells(grid, POSITIONS, k=1, control_auc=control_auc)[0]
    return {
        "best": best,
        "embedding_best": top_cells(embed_grid, POSITIONS, k=1, control_auc=control_auc)[0] | {"layer": EMBED_ROW}
        if embed_grid else None,
        "controls": public(controls),
        "best_control": best_name,
        "verdict": verdict(best, controls, dataset),
    }


@locked
def run_all(config: RunConfig) -> dict:
    """generate -> extract -> probe, skipping finished stages; returns where the figure is and the best cell."""
    run = run_dir(config)
    check_resume(config)
    lm = None
    if config.executor == "local" and (not run.answers.exists() or not extraction_done(run, config.site)):
        from truthmap.models import load_model

        lm = load_model(config.model, config.device, config.dtype)
    generate(config, lm)
    extract(config, lm)
    probe(config)
    save_resolved_config(run, config)
    from truthmap.report import red_flags, write_report

    report = write_report(run.path)
    summary = read_json(run.probe_files(config.site).summary)
    return {
        "heatmap": str(run.probe_files(config.site).heatmap_png),
        "best": summary["best"],
        "verdict": summary.get("verdict"),
        **summarize_answers(run),
        "report": str(report),
        "warnings": red_flags(run),
    }


def save_resolved_config(run: RunDir, config: RunConfig) -> None:
    """Keep, per site, the configuration this run was last made with; rewritten only when it changes."""
    saved = read_json(run.resolved_config) if run.resolved_config.exists() else {}
    resolved = saved | {config.site: json.loads(json.dumps(config.to_dict()))}  # tuples as JSON lists, to compare
    if resolved != saved:
        write_json(run.resolved_config, resolved)


def model_loader(config: RunConfig):
    """A function that loads the model on its first call only: stages that find their work done never load it."""
    loaded = []

    def get():
        if not loaded:
            from truthmap.models import load_model

            loaded.append(load_model(config.model, config.device, config.dtype))
        return loaded[0]

    return get


@locked
def baselines(config: RunConfig, get_lm) -> RunDir:
    """baselines.parquet: token-probability aggregates and p(True) for every answer (skipped when complete)."""
    import pandas as pd

    from truthmap.baselines import baseline_scores

    run = run_dir(config)
    table = _answers_table(run)
    if run.baselines.exists() and set(pd.read_parquet(run.baselines, columns=["id"])["id"]) == set(table["id"]):
        return run
    lm = dataclasses.replace(get_lm(), is_chat=read_json(run.run_json)["chat_template"])
    started = time.perf_counter()
    write_parquet(run.baselines, baseline_scores(lm, table, config.batch_size))
    from truthmap.costs import record_seconds  # p(True)'s cost, beside the detection table

    record_seconds(run.costs, "baselines", time.perf_counter() - started, len(table))
    return run


@locked
def prepare(config: RunConfig, get_lm) -> RunDir:
    """Answers and activations of one run, and baselines for a test split (the only split they are scored on).

    A run already on disk is used as it is, whatever its size."""
    run = run_dir(config)
    if not (run.answers.exists() and run.run_json.exists()):
        generate(config, get_lm())
    if not extraction_done(run, config.site):
        extract(config, get_lm())
    return baselines(config, get_lm) if config.split == "test" else run


def prepare_splits(config: RunConfig, datasets: list[str], test_samples: int | None,
                   get_lm=None) -> dict[str, tuple[RunDir, RunDir]]:
    """The (train, test) runs of each dataset, made where missing; the model loads only if something is."""
    get_lm = get_lm or model_loader(config)
    sizes = {"train": config.n_samples, "test": test_samples or config.n_samples}
    return {
        dataset: tuple(prepare(dataclasses.replace(config, dataset=dataset, split=s, n_samples=n), get_lm) for s, n in sizes.items())
        for dataset in datasets
    }


def table(config: RunConfig, datasets: list[str], test_samples: int | None = None, n_resamples: int | None = None,
          temperature: float = 1.0) -> dict:
    """The detection table over datasets: each dataset's train run fits the probes, its test run scores them.
    n_resamples: also the sampling baselines, from that many sampled answers per test question."""
    from truthmap.costs import add_costs
    from truthmap.detection import evaluate_dataset, write_detection_table
    from truthmap.models import model_slug

    if not datasets:
        raise ConfigError("No datasets: pass --datasets NAME [NAME ...].")
    results = []
    get_lm = model_loader(config)
    for dataset, (train, test) in prepare_splits(config, datasets, test_samples, get_lm).items():
        rows = evaluate_dataset(dataset, train, test, config.site, config.seeds)
        if n_resamples:
            rows += sampling_rows(dataclasses.replace(config, dataset=dataset, split="test"), rows, n_resamples,
                                  temperature, get_lm)
        results += add_costs(rows, test)
    slug = model_slug(config.model)
    title = f"Error detection AUC (test split) · {slug} · {config.site}"
    return write_detection_table(results, tables_dir(Path(config.runs_dir) / slug), title)


def sampling_rows(config: RunConfig, rows: list[dict], n_resamples: int, temperature: float, get_lm) -> list[dict]:
    """The sampling baselines' rows of the detection table for the test run of `config`, from the answers that
    `truthmap resample` samples (and reuses: resamples/ of that run, all its questions, seed --seed); rows: the
    dataset's other rows, whose best probe on validation (detection.best_probe_row) each is set against."""
    from truthmap import resample as resampling
    from truthmap.datasets.rules import RULES
    from truthmap.detection import best_probe_row, probe_data
    from truthmap.sampling_baselines import rule_match, sampling_cost, sampling_results, sampling_scores
    from truthmap.verdict import chosen_probe_scores

    job, load_records, answer_models, _ = resampling_job(config, n_resamples, temperature, config.seed, None, None,
                                                         with_cell=False, get_lm=get_lm)
    answers, state = resampling.sampled_answers(job, load_records, answer_models)
    spec, _ = load_records()
    scores = sampling_scores(job.greedy, answers, rule_match(RULES[spec.rule]) if spec.rule in RULES else None)
    common = {k: rows[-1][k] for k in ("dataset", "n_train", "n_test", "test_errors")}
    common |= {"n_resamples": n_resamples, "temperature": temperature}
    test = probe_data(run_dir(config), config.site, f"{config.dataset} (test)")
    probe = best_probe_row(rows)
    if probe is not None:
        train = probe_data(run_dir(dataclasses.replace(config, split="train")), config.site, f"{config.dataset} (train)")
        scores_of_probe = chosen_probe_scores(train, test, probe["method"].removeprefix("Probe @ "), config.seeds)
        probe = {"method": probe["method"], "scores": scores_of_probe}
    return sampling_results(scores, test, common, sampling_cost(answers, state, job.extraction), probe)


@locked
def fit_detector(config: RunConfig, token: str, layer: int | None, out: str | None = None) -> dict:
    """Fit a detector on a run, save it, and score that run's rows (and its test split's, when extracted)."""
    import numpy as np

    from truthmap.detection import probe_data, write_detector_scores
    from truthmap.detector import Detector, weights_path

    check_token(token)
    run = run_dir(config)
    path = Path(out or run.detector(config.site))
    weights_path(path)  # a bad --out fails before the fit
    data = probe_data(run, config.site, f"{config.dataset} ({config.split})")
    read = data.layer_reader(token)
    X = np.stack([read(layer_) for layer_ in range(data.acts.shape[1])], axis=1)  # [rows, layers, hidden]
    made = read_json(run.run_json)
    info = {
        "model": config.model,
        "dataset": config.dataset,
        "chat_template": made["chat_template"],
        "model_identity": made.get("model_identity"),  # score refuses other weights under the same name
        **{k: made["settings"].get(k) for k in ("locate", "extractor", "extraction_tries", "extraction_prompt")},
        "training": {
            "run": str(run.path),
            "rows": len(data.ids),
            "errors": int(data.is_error.sum()),
            "correct": int((~data.is_error).sum()),
            "seeds": list(config.seeds),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    }
    detector = Detector(token=token, layer=layer, site=config.site, seeds=config.seeds, info=info)
    detector.fit(X, data.is_error, data.groups)
    detector.save(path)
    scored = {str(run.path): write_detector_scores(detector, run, in_train=True)}
    test_run = run_dir(dataclasses.replace(config, split="test"))
    if config.split == "train" and extraction_done(test_run, config.site):
        scored[str(test_run.path)] = write_detector_scores(detector, test_run, in_train=False)
    return {"detector": str(path), "layer": detector.layer_, "token": token, "scored": scored}


def generalize(config: RunConfig, datasets: list[str], token: str, test_samples: int | None = None) -> dict:
    """Train on each dataset, test on every dataset: the matrix of AUCs and of AUCs over the target's baseline."""
    from truthmap.generalize import generalization
    from truthmap.models import model_slug

    if len(datasets) < 2:
        raise ConfigError("Generalization needs at least two datasets: pass --datasets A B [C ...].")
    check_token(token)
    runs = prepare_splits(config, datasets, test_samples)
    directory = generalization_dir(Path(config.runs_dir) / model_slug(config.model))
    return generalization(runs, config.site, token, config.seeds, directory)


@locked
def resample(config: RunConfig, n_resamples: int = 10, temperature: float = 1.0, seed: int = 0,
             layer: int | None = None, token: str | None = None, lm=None, n_questions: int | None = None) -> dict:
    """K sampled answers per question of a finished greedy run; their error types, type probes and answer selection.

    Reads the greedy run of `config` (answers, activations, and the train run's best probe cell unless layer and
    token are given); writes run.resamples/ and returns its resamples.json. Finished steps are not redone, and
    the model is loaded only when answers or activations are missing.
    """
    from truthmap import resample as resampling

    job, load_records, answer_models, get_lm = resampling_job(config, n_resamples, temperature, seed, layer, token,
                                                               lm, n_questions)
    return resampling.resample_stage(job, load_records, answer_models, get_lm)


def resampling_job(config: RunConfig, n_resamples: int, temperature: float, seed: int, layer: int | None,
                   token: str | None, lm=None, n_questions: int | None = None, with_cell: bool = True, get_lm=None):
    """(resample.Resampling, load_records, answer_models, get_lm) of resample; with_cell=False: no cell to read
    (the sampling baselines read the answers alone), so no probes.json is needed."""
    import pandas as pd

    from truthmap import resample as resampling
    from truthmap.activations import open_store
    from truthmap.models import model_slug

    if not temperature > 0:
        raise ConfigError(f"Invalid --temperature {temperature}: resampling needs a temperature > 0 (the paper uses 1).")
    if n_resamples < 1:
        raise ConfigError(f"Invalid --n-resamples {n_resamples}: expected an integer >= 1.")
    run = run_dir(config)
    if not (run.answers.exists() and run.run_json.exists()):
        raise StoreError(
            f"No greedy answers in {run.path}. Run `truthmap run --dataset {config.dataset} --split {config.split}` "
            "with the same --model and --runs-dir first."
        )
    made = read_json(run.run_json)
    every = pd.read_parquet(run.answers)
    rows = resampling.choose_questions(len(every), n_questions, seed)
    greedy = every.iloc[rows].reset_index(drop=True)
    cell, greedy_acts = None, None
    if with_cell:
        store, meta = open_store(run.activations(config.site))
        probes_json = run_dir(dataclasses.replace(config, split="train")).probe_files(config.site).summary
        cell = resampling.resolve_cell(probes_json, config.site, layer, token, meta["shape"][0])
        greedy_acts = resampling.greedy_cell(store, cell)[rows]
    settings = made["settings"] | {"n_resamples": n_resamples, "temperature": temperature, "resample_seed": seed}
    # Resamples are located as the greedy answers were (runs made before "locate" existed: these flags).
    extraction = {k: made["settings"].get(k, v) for k, v in locating_settings(config).items()}
    get_lm = get_lm or (model_loader(config) if lm is None else (lambda: lm))

    def load_records():
        greedy_config = _greedy_records_config(config, made["config"])
        spec, records = load_config_records(greedy_config)
        if "custom_sha256" in made["settings"]:  # the questions must be those the greedy answers answered
            now = answers_settings(greedy_config, spec)["custom_sha256"]
            check_matches(made["settings"], {"custom_sha256": now}, run.path)
        records = {r.id: r for r in records}
        missing = [i for i in greedy["id"] if i not in records]
        if missing:
            raise StoreError(f"The dataset no longer has question {missing[0]!r} of {run.answers}; check --data-dir.")
        return spec, records

    def answer_models():
        model = dataclasses.replace(get_lm(), is_chat=made["chat_template"])
        if not extraction["extraction_model"]:
            return model, model
        from truthmap.models import load_model

        return model, load_model(extraction["extraction_model"], config.device, config.dtype)

    title = f"{model_slug(config.model)} · {config.dataset} ({config.split}) · K={n_resamples}, T={temperature}"
    if cell:
        title += f"\ncell: {config.site} layer {cell['layer']}, {cell['token']}"
    job = resampling.Resampling(
        run.resample_files, greedy, greedy_acts, cell, settings, extraction, generation_settings(settings),
        config.batch_size, config.seeds, title,
    )
    return job, load_records, answer_models, get_lm


def _greedy_records_config(config: RunConfig, saved: dict) -> RunConfig:
    """The config that loads the greedy run's questions again: its subsample and dataset source, our data dir."""
    kept = {k: saved[k] for k in ("n_samples", "seed", "custom_path", "question_column", "answer_column") if k in saved}
    return dataclasses.replace(config, **kept, data_dir=config.data_dir or saved.get("data_dir"))

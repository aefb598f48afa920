"""The run functions of the stages that need a model: answers (generate, label, locate, and record the site's
activations while decoding) and activations (a forward pass over answers made otherwise, or for another site).

Each shards its batches over the executor's workers (stages.answer_shard, stages.extract_shard); pipeline's stage
table says what each reads and writes and when it is done. Work begun with other settings is refused before the
model loads (check_resume): a killed run's checkpoints and half-written store must be finished as they were begun.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

from truthmap.config import RunConfig, load_config_records, run_dir
from truthmap.errors import StoreError
from truthmap.rundir import POSITIONS, RunDir, position_column, read_json
from truthmap.runner.contract import answers_table, extraction_done, imported, model_state
from truthmap.runstate import check_checkpoints, check_matches
from truthmap.stages.generate import answers_settings, generation_settings


def check_resume(config: RunConfig) -> None:
    """Refuse bad input and work on disk made with other settings before any model loads (it takes seconds)."""
    run = run_dir(config)
    check_models(config)
    check_finished_answers(config, run)
    check_finished_store(config, run)
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
    from truthmap.lm.models import default_device_and_dtype
    from truthmap.runner.contract import compute_settings
    from truthmap.stages.activations import check_resume as check_store

    check_checkpoints(run.generation_parts, generation_settings(settings) | compute_settings(config))
    check_checkpoints(run.extraction_parts, settings)
    if site:
        device, dtype = default_device_and_dtype(config.device, config.dtype)
        check_store(run.activations(site), None, site, dtype, device)  # settings lack stop_text until it loads


def check_extract_resume(config: RunConfig, run: RunDir, settings: dict) -> None:
    """The activations must come from the model that answered, and a store begun with another dtype, device kind
    or site is not finished with this one (the numbers would differ from row to row)."""
    from truthmap.lm.models import default_device_and_dtype, same_model
    from truthmap.stages.activations import check_resume as check_store

    if not same_model(config.model, settings["model"]):
        raise StoreError(
            f"{run.path} holds the answers of model {settings['model']!r}, not {config.model!r}: activations must "
            f"come from the model that answered. Use --model {settings['model']}."
        )
    device, dtype = default_device_and_dtype(config.device, config.dtype)
    check_store(run.activations(config.site), settings, config.site, dtype, device)


def check_models(config: RunConfig, lm=None) -> None:
    """Every model named can be found, before any loads: a wrong --extraction-model would fail only after the first
    batch of answers, leaving settings behind that refuse the corrected rerun."""
    from truthmap.lm.models import check_model_name

    if lm is None:
        check_model_name(config.model)
    if config.extraction_model:
        check_model_name(config.extraction_model, "--extraction-model")


def check_finished_answers(config: RunConfig, run: RunDir) -> None:
    """Finished answers made with another --dtype or --device than the one given are refused (see check_finished)."""
    from truthmap.stages.activations import device_kind

    if run.answers.exists() and run.run_json.exists():
        made = read_json(run.run_json)
        device = made.get("device") and device_kind(made["device"])
        check_finished(run.answers, {"--dtype": made.get("dtype"), "--device": device}, config, run.path)


def check_finished_store(config: RunConfig, run: RunDir) -> None:
    """A finished store of config.site made with another --dtype or --device than the one given is refused."""
    if extraction_done(run, config.site):
        from truthmap.stages.activations import META_FIX

        meta = read_json(run.store(config.site).meta, META_FIX)
        made = {"--dtype": meta.get("model_dtype"), "--device": meta.get("device")}
        check_finished(run.activations(config.site), made, config, run.activations(config.site))


def check_finished(where: Path, made: dict, config: RunConfig, delete: Path) -> None:
    """A finished stage is not made again: a --dtype or --device given now that is not the one it was made with
    would be ignored without a word (the numbers would be the other dtype's), so it is refused, naming how to get
    what was asked. Not given (None): whatever the stage was made with."""
    from truthmap.stages.activations import device_kind

    asked = {"--dtype": config.dtype, "--device": config.device and device_kind(config.device)}
    for option, value in asked.items():
        if value is not None and made.get(option) is not None and made[option] != value:
            raise StoreError(f"{where} is finished and was made with {option} {made[option]}, not {value}: a "
                             f"finished stage is not made again. For {option} {value}, use another --runs-dir, or "
                             f"delete {delete} and rerun.")


def generate(config: RunConfig, lm=None, activations: bool = True) -> RunDir:
    """Generate, label and locate, recording config.site's activations while generating (activations=False: not):
    writes answers.parquet, run.json and that site's store. The caller skips it when the stage is done."""
    import pandas as pd

    from truthmap.executor import runner
    from truthmap.runner.contract import Answering, answer_shard, describe
    from truthmap.stages import generate as answers
    from truthmap.stages.activations import merge_stores

    run = run_dir(config)
    spec, records = load_config_records(config)
    settings = answers_settings(config, spec)
    site = config.site if activations else None
    if config.executor == "local":
        check_generation_resume(config, run, settings, site)  # before the model loads
    started = time.time()
    with runner(config, model_state(config, lm), -(-len(records) // config.batch_size)) as workers:
        lm = workers.one(describe)  # the tokenizer and chat template as the workers have them
        settings["stop_text"] = answers.answer_stop(spec, lm.is_chat)
        made_parts = run.work.generations.settings
        if made_parts.exists():  # batches of a killed run from before the stop rule: as on resume above
            check_matches({"stop_text": read_json(made_parts).get("stop_text")}, settings, run.generation_parts)
        prompts, batches = answer_batches(config, spec, records, lm)
        job = Answering(config, spec, records, prompts, settings, generation_settings(settings), run, site)
        shards = workers.map(functools.partial(answer_shard, job=job), batches, "Generating answers")
    if site and config.executor == "ray":
        merge_stores([(rows, store) for _, rows, store in shards], run.activations(site), len(records))
    frame = pd.concat([located for located, _, _ in shards]).set_index("id").loc[[r.id for r in records]]
    answers.write_answers(run, config, settings, records, prompts, frame.reset_index(), lm, started, site)
    return run


def answer_batches(config: RunConfig, spec, records, lm) -> tuple[list[str], list[list[int]]]:
    """The prompts, and the records' indices cut into the batches generate_answers makes: longest first."""
    from truthmap.batches import in_batches, longest_first
    from truthmap.datasets import build_prompt
    from truthmap.lm.models import encode_prompt

    prompts = [build_prompt(spec, r, "instruct" if lm.is_chat else "base") for r in records]
    lengths = [len(encode_prompt(lm.tokenizer, p, lm.is_chat)) for p in prompts]
    return prompts, in_batches(longest_first(range(len(records)), lambda i: lengths[i]), config.batch_size)


def extract(config: RunConfig, lm=None) -> RunDir:
    """Activations at the probed positions for every answer, by a forward pass over it. For another site than
    generation recorded, or answers made elsewhere; the caller skips it when the store is complete."""
    from truthmap.executor import runner
    from truthmap.runner.contract import Extracting, extract_shard
    from truthmap.stages.activations import extraction_batches, merge_stores

    run = run_dir(config)
    table = answers_table(run)
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
    from truthmap.rundir import record_seconds  # the probes' cost, beside the detection table

    record_seconds(run.costs, "extract", time.perf_counter() - started, len(table))
    return run


def answers_made(config: RunConfig, run: RunDir) -> dict | None:
    """What the answers on disk were made with (None: none are): run.json's settings, stop_text included."""
    if not (run.answers.exists() and run.run_json.exists()):
        return None
    made = read_json(run.run_json)["settings"]
    return {} if imported(run) else made | {"stop_text": made.get("stop_text")}


def answers_wanted(config: RunConfig, run: RunDir) -> dict:
    """What the answers must have been made with. Where answers end depends on the prompt style the run used: a
    run made before answers stopped at the line break has no stop_text (None), so its base-model answers (which
    ran on) are refused, its chat ones kept. Imported answers are the run's answers, whatever made them."""
    from truthmap.stages.generate import answer_stop

    if imported(run):
        return {}
    spec, _ = load_config_records(config)
    return answers_settings(config, spec) | {"stop_text": answer_stop(spec, read_json(run.run_json)["chat_template"])}


def activations_made(config: RunConfig, run: RunDir) -> dict | None:
    """A complete store of the site is done (its settings were checked when it was begun)."""
    return {"site": config.site} if extraction_done(run, config.site) else None


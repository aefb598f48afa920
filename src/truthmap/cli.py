"""The `truthmap` command: parses flags into a RunConfig, calls one pipeline function, prints the outcome.

Nothing heavy is imported at module level, so `truthmap --help` answers instantly without torch.
"""

from __future__ import annotations

import functools
import json
import signal
import warnings
from typing import Annotated, Optional

import typer

from truthmap.config import DEFAULT_SEEDS, RunConfig
from truthmap.errors import TruthmapError, TruthmapWarning

app = typer.Typer(
    help="Find where a language model knows that it is wrong: answers, exact answers, activations, probes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

Model = Annotated[str, typer.Option(
    help="'smollm2' (embedded default), 'gemma3-270m' (a base model), a hub id, a local directory or a .gguf file."
)]
Dataset = Annotated[str, typer.Option(help="A registered dataset (see `truthmap datasets`), or 'custom'.")]
Split = Annotated[str, typer.Option(help="train or test.")]
NSamples = Annotated[Optional[int], typer.Option(help="Subsample this many questions (seeded); default: whole split.")]
DataDir = Annotated[Optional[str], typer.Option(help="Directory of dataset files; default: $TRUTHMAP_DATA_DIR.")]
RunsDir = Annotated[str, typer.Option(help="Where run directories are written.")]
BatchSize = Annotated[int, typer.Option(help="Samples per forward pass.")]
Seed = Annotated[int, typer.Option(help="Seed for subsampling and sampled retries.")]
Device = Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:1 ...; default: cuda when available.")]
Dtype = Annotated[Optional[str], typer.Option(help="float32, bfloat16 or float16; default: bf16 on cuda, fp32 on cpu.")]
PromptStyle = Annotated[str, typer.Option(help="auto (chat template if the model has one), instruct or base.")]
MaxNewTokens = Annotated[Optional[int], typer.Option(help="Default: the dataset's (100; 200 for math).")]
ExtractionModel = Annotated[Optional[str], typer.Option(help="Model that extracts exact answers; default: the same.")]
ExtractionTries = Annotated[int, typer.Option(help="With --extractor free: tries per answer, greedy first, then sampled.")]
Locate = Annotated[str, typer.Option(help="blind (the extractor locates every open answer, right or wrong) or gold "
                                          "(a gold alias in correct answers, the extractor for the rest: the paper's way).")]
Extractor = Annotated[str, typer.Option(help="constrained (can only copy a span of the answer, or say NO ANSWER) or "
                                             "free (free text that must occur in the answer, retried).")]
CustomPath = Annotated[Optional[str], typer.Option(help="With --dataset custom: a CSV or JSONL file.")]
QuestionColumn = Annotated[str, typer.Option(help="With --dataset custom: the question column.")]
AnswerColumn = Annotated[str, typer.Option(help="With --dataset custom: the answer column (a string or a list).")]
Site = Annotated[str, typer.Option(help="mlp (MLP output, as the paper), mlp_in, attn or resid.")]
Seeds = Annotated[str, typer.Option(help="Probe split seeds, comma- or space-separated.")]
Executor = Annotated[str, typer.Option(help="local (in this process) or ray (shards over Ray workers, one model each).")]
RayAddress = Annotated[Optional[str], typer.Option(help="With --executor ray: an existing cluster; default: start a local one.")]
Workers = Annotated[Optional[int], typer.Option(help="With --executor ray: workers; default: one per GPU, else per CPU.")]
StudyFile = Annotated[Optional[str], typer.Option(help="A TOML study file (see study.example.toml); flags given here override it.")]
Debug = Annotated[bool, typer.Option("--debug", help="Show the full traceback when a command fails.")]
DEFAULT_SEEDS_TEXT = ",".join(str(s) for s in DEFAULT_SEEDS)
DatasetList = Annotated[list[str], typer.Option("--datasets", help="Datasets of the study (space- or comma-separated, or repeated).")]
StudySamples = Annotated[Optional[int], typer.Option(help="Questions per train split, for runs not yet on disk.")]
TestSamples = Annotated[Optional[int], typer.Option(help="Questions per test split (default: --n-samples).")]


def parse_seeds(text: str) -> tuple[int, ...]:
    parts = text.replace(",", " ").split()
    if not parts or not all(p.lstrip("-").isdigit() for p in parts):
        raise typer.BadParameter(f"expected integers like '0,5,26', got {text!r}", param_hint="--seeds")
    return tuple(int(p) for p in parts)


DEBUG = {"on": False}  # set by `truthmap --debug` for this invocation
# Exits and usage errors that click prints itself; found by name because typer may ship its own copy of click.
CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
CLICK_EXCEPTIONS = (typer.Exit, typer.Abort, CLICK_ERROR)


@app.callback()
def global_options(debug: Debug = False):
    DEBUG["on"] = debug


# `--datasets a b c`: click options take one value each, so the names after the first arrive as extra arguments.
EXTRA_DATASETS = {"allow_extra_args": True}


def parse_datasets(items: list[str]) -> list[str]:
    return [name for item in items for name in item.replace(",", " ").split()]


class Stopped(BaseException):
    """SIGTERM, raised where the run is, as Ctrl-C raises KeyboardInterrupt: the stop is reported in one line."""


def _raise_stopped(signum, frame):
    raise Stopped()


def reports_errors(command):
    """Print any error as one line and exit 1; the traceback only with --debug. Warnings are one line each, and
    a run stopped by Ctrl-C or SIGTERM says where it stopped and how to resume (exit 130 or 143)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from truthmap.progress import STOPPED

        STOPPED.clear()
        previous = _on_sigterm(_raise_stopped)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always", TruthmapWarning)
                warnings.showwarning = functools.partial(show_warning, warnings.showwarning)
                return command(*args, **kwargs)
        except CLICK_EXCEPTIONS:
            raise
        except (KeyboardInterrupt, Stopped) as stop:
            if DEBUG["on"]:
                raise
            typer.echo(stopped_line("Ctrl-C" if isinstance(stop, KeyboardInterrupt) else "SIGTERM"), err=True)
            raise typer.Exit(130 if isinstance(stop, KeyboardInterrupt) else 143) from None
        except Exception as error:
            if DEBUG["on"]:
                raise
            typer.echo(error_line(error), err=True)
            raise typer.Exit(1) from None
        finally:
            _on_sigterm(previous)

    return wrapper


def _on_sigterm(handler):
    """Install a SIGTERM handler; returns the previous one. Only the main thread may (None elsewhere: no change)."""
    if handler is None:
        return None
    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:
        return None


def show_warning(original, message, category, filename, lineno, file=None, line=None):
    if issubclass(category, TruthmapWarning):
        typer.echo(f"Warning: {message}", err=True)
    else:
        original(message, category, filename, lineno, file, line)


def stopped_line(how: str) -> str:
    from truthmap.progress import where

    return (f"Stopped by {how}{where()}. Finished batches and stages are saved: run the same command again to "
            "resume from there.")


def error_line(error: Exception) -> str:
    if isinstance(error, TruthmapError):
        return f"Error: {error}"
    message = (str(error).strip().splitlines() or [""])[0]
    return f"Error: {type(error).__name__}: {message} (rerun with --debug for the traceback)"


@app.command()
@reports_errors
def generate(
    model: Model = "smollm2",
    dataset: Dataset = "geography",
    split: Split = "train",
    n_samples: NSamples = None,
    data_dir: DataDir = None,
    runs_dir: RunsDir = "runs",
    batch_size: BatchSize = 16,
    seed: Seed = 0,
    device: Device = None,
    dtype: Dtype = None,
    prompt_style: PromptStyle = "auto",
    max_new_tokens: MaxNewTokens = None,
    extraction_model: ExtractionModel = None,
    extraction_tries: ExtractionTries = 5,
    locate: Locate = "blind",
    extractor: Extractor = "constrained",
    custom_path: CustomPath = None,
    question_column: QuestionColumn = "question",
    answer_column: AnswerColumn = "answer",
    site: Site = "mlp",
    executor: Executor = "local",
    ray_address: RayAddress = None,
    workers: Workers = None,
):
    """Answer a dataset's questions, label them and locate the exact answers: writes answers.parquet, and the
    site's activations, recorded while the answers are generated.

    Example: truthmap generate --dataset triviaqa --n-samples 200 --data-dir ../shared/data
    """
    from truthmap import pipeline

    config = RunConfig(**{k: v for k, v in locals().items() if k != "pipeline"})
    run = pipeline.generate(config)
    typer.echo(json.dumps(pipeline.summarize_answers(run), indent=2))


@app.command("import")
@reports_errors
def import_(
    answers_file: Annotated[str, typer.Argument(help="A .csv, .jsonl or .parquet file of answers, one per row.")],
    model: Annotated[str, typer.Option(help="The model that wrote the answers (as for generate).")] = "smollm2",
    dataset: Annotated[str, typer.Option(help="Whose correctness rule and prompt apply (e.g. triviaqa); 'custom': the "
                                              "alias rule. Also names the run directory.")] = "custom",
    split: Split = "train",
    runs_dir: RunsDir = "runs",
    batch_size: BatchSize = 16,
    seed: Seed = 0,
    device: Device = None,
    dtype: Dtype = None,
    prompt_style: PromptStyle = "auto",
    extraction_model: ExtractionModel = None,
    extraction_tries: ExtractionTries = 5,
    locate: Locate = "blind",
    extractor: Extractor = "constrained",
    question_column: Annotated[str, typer.Option(help="The question column.")] = "question",
    answer_column: Annotated[str, typer.Option(help="The column of the model's answers.")] = "answer",
    gold_column: Annotated[str, typer.Option(help="Optional gold aliases (a list, or one answer): labels by the rule.")] = "gold",
    id_column: Annotated[str, typer.Option(help="Optional row ids (default: row-1, row-2 ...).")] = "id",
    prompt_column: Annotated[str, typer.Option(help="Optional prompt: the user message, or the text rendered with the "
                                                    "chat template (default: the dataset's prompt of the question).")] = "prompt",
    correct_column: Annotated[str, typer.Option(help="Optional labels (true/false); they win over the rule.")] = "correct",
    exact_answer_column: Annotated[str, typer.Option(help="Optional exact answers (a span of the answer).")] = "exact_answer",
    strict: Annotated[bool, typer.Option("--strict", help="Stop at the first bad row instead of skipping it.")] = False,
):
    """Import answers generated elsewhere (vLLM, an API, another run) as a normal run: tokens, log-probabilities,
    labels and exact answers. Then extract, probe, run, table, fit-detector and report work on it unchanged.

    Example: truthmap import answers.jsonl --dataset triviaqa --split test
    """
    from truthmap import pipeline
    from truthmap.importer import ImportSource

    source = ImportSource(answers_file, question_column, answer_column, gold_column, id_column, prompt_column,
                          correct_column, exact_answer_column)
    config = RunConfig(model=model, dataset=dataset, split=split, runs_dir=runs_dir, batch_size=batch_size, seed=seed,
                       device=device, dtype=dtype, prompt_style=prompt_style, extraction_model=extraction_model,
                       extraction_tries=extraction_tries, locate=locate, extractor=extractor)
    typer.echo(json.dumps(pipeline.import_answers(config, source, strict=strict), indent=2))


@app.command()
@reports_errors
def extract(
    model: Model = "smollm2",
    dataset: Dataset = "geography",
    split: Split = "train",
    runs_dir: RunsDir = "runs",
    site: Site = "mlp",
    batch_size: BatchSize = 16,
    device: Device = None,
    dtype: Dtype = None,
    executor: Executor = "local",
    ray_address: RayAddress = None,
    workers: Workers = None,
):
    """Read every layer's activations at the 15 probed positions of each answer into the run's float16 store, by a
    second pass over the answers: for a site other than the one `generate` recorded, or answers made elsewhere.

    Example: truthmap extract --dataset geography --site resid
    """
    from truthmap import pipeline

    config = RunConfig(**{k: v for k, v in locals().items() if k != "pipeline"})
    run = pipeline.extract(config)
    typer.echo(f"Activations: {run.activations(site)}")


@app.command()
@reports_errors
def probe(
    model: Model = "smollm2",
    dataset: Dataset = "geography",
    split: Split = "train",
    runs_dir: RunsDir = "runs",
    site: Site = "mlp",
    seeds: Seeds = DEFAULT_SEEDS_TEXT,
    device: Device = None,
):
    """Train a probe per (layer, token) cell and draw the layer x token AUC heatmap.

    Example: truthmap probe --dataset geography --seeds 0,5,26,42,63
    """
    from truthmap import pipeline

    config = RunConfig(
        model=model, dataset=dataset, split=split, runs_dir=runs_dir, site=site, seeds=parse_seeds(seeds), device=device
    )
    run = pipeline.probe(config)
    summary = pipeline.read_json(run.probe_files(site).summary)
    typer.echo(json.dumps(summary["best"], indent=2))
    if summary.get("verdict"):
        typer.echo(f"Verdict: {summary['verdict']}")


@app.command()
@reports_errors
def run(
    ctx: typer.Context,
    config: StudyFile = None,
    model: Model = "smollm2",
    dataset: Dataset = "geography",
    split: Split = "train",
    n_samples: NSamples = None,
    data_dir: DataDir = None,
    runs_dir: RunsDir = "runs",
    batch_size: BatchSize = 16,
    seed: Seed = 0,
    device: Device = None,
    dtype: Dtype = None,
    prompt_style: PromptStyle = "auto",
    max_new_tokens: MaxNewTokens = None,
    extraction_model: ExtractionModel = None,
    extraction_tries: ExtractionTries = 5,
    locate: Locate = "blind",
    extractor: Extractor = "constrained",
    custom_path: CustomPath = None,
    question_column: QuestionColumn = "question",
    answer_column: AnswerColumn = "answer",
    site: Site = "mlp",
    seeds: Seeds = DEFAULT_SEEDS_TEXT,
    executor: Executor = "local",
    ray_address: RayAddress = None,
    workers: Workers = None,
):
    """The main job: generate, extract, probe, draw the heatmap and write report.html, skipping finished stages.

    With --config, runs every dataset x site of a TOML study file; flags given on the command line override it.

    Example: truthmap run --dataset triviaqa --n-samples 1000 --data-dir ../shared/data
    """
    from truthmap import pipeline
    from truthmap.config import load_study

    options = {k: v for k, v in locals().items() if k not in ("ctx", "config", "pipeline", "load_study")}
    flags = {k: v for k, v in options.items() if given(ctx, k)}
    if "seeds" in flags:
        flags["seeds"] = parse_seeds(flags["seeds"])
    for run_config in load_study(config, flags):
        result = pipeline.run_all(run_config)
        best = result["best"]
        shown = {k: v for k, v in result.items() if k not in ("best", "report", "warnings", "verdict")}
        typer.echo(json.dumps(shown, indent=2))
        typer.echo(f"Heatmap: {result['heatmap']}")
        typer.echo(f"Best cell: layer {best['layer']}, token {best['token']}, AUC {best['auc_mean']:.3f} ± {best['auc_std']:.3f}")
        if result.get("verdict"):
            typer.echo(f"Verdict: {result['verdict']}")
        for warning in result.get("warnings", []):
            typer.echo(f"Warning: {warning}")
        typer.echo(f"Report: {result['report']}")


def given(ctx: typer.Context, name: str) -> bool:
    """Whether the option was typed on the command line (not left at its default)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


@app.command()
@reports_errors
def datasets():
    """List the registered datasets.

    Example: truthmap datasets
    """
    from truthmap.datasets import get_spec, list_datasets

    for name in list_datasets():
        typer.echo(f"{name:32} {get_spec(name).description}")


@app.command(context_settings=EXTRA_DATASETS)
@reports_errors
def table(
    ctx: typer.Context,
    datasets: DatasetList,
    model: Model = "smollm2",
    n_samples: StudySamples = 300,
    test_samples: TestSamples = None,
    data_dir: DataDir = None,
    runs_dir: RunsDir = "runs",
    batch_size: BatchSize = 16,
    seed: Seed = 0,
    device: Device = None,
    dtype: Dtype = None,
    extraction_tries: ExtractionTries = 5,
    locate: Locate = "blind",
    extractor: Extractor = "constrained",
    custom_path: CustomPath = None,
    question_column: QuestionColumn = "question",
    answer_column: AnswerColumn = "answer",
    site: Site = "mlp",
    seeds: Seeds = DEFAULT_SEEDS_TEXT,
):
    """The paper's Table 1: baselines and chosen-layer probes, trained on each train split, scored on its test split.

    Runs missing on disk (answers, activations, baselines) are made first; runs already there are reused as
    they are. Writes runs/<model>/tables/detection_table.csv, .md and .png.

    Example: truthmap table --datasets geography triviaqa winobias --n-samples 300 --data-dir ../shared/data
    """
    from truthmap import pipeline

    options = {k: v for k, v in locals().items() if k not in ("ctx", "pipeline", "datasets", "test_samples")}
    config = RunConfig(**(options | {"seeds": parse_seeds(seeds)}))
    written = pipeline.table(config, parse_datasets(datasets + ctx.args), test_samples)
    typer.echo(open(written["md"]).read())
    typer.echo(f"Table: {written['csv']}, {written['md']}, {written['png']}")


@app.command(context_settings=EXTRA_DATASETS)
@reports_errors
def generalize(
    ctx: typer.Context,
    datasets: DatasetList,
    model: Model = "smollm2",
    token: Annotated[str, typer.Option(help="The probed token of every probe.")] = "exact_answer_last",
    n_samples: StudySamples = 300,
    test_samples: TestSamples = None,
    data_dir: DataDir = None,
    runs_dir: RunsDir = "runs",
    batch_size: BatchSize = 16,
    seed: Seed = 0,
    device: Device = None,
    dtype: Dtype = None,
    extraction_tries: ExtractionTries = 5,
    locate: Locate = "blind",
    extractor: Extractor = "constrained",
    custom_path: CustomPath = None,
    question_column: QuestionColumn = "question",
    answer_column: AnswerColumn = "answer",
    site: Site = "mlp",
    seeds: Seeds = DEFAULT_SEEDS_TEXT,
):
    """Train a probe on each dataset, test it on every dataset: AUC matrix, and AUC minus the target's baseline.

    Reuses the runs of `truthmap table` (and makes missing ones). Writes runs/<model>/generalization/auc.csv,
    auc_minus_baseline.csv, auc_minus_control.csv and their heatmaps (train datasets down, test datasets across),
    and text_controls.csv (the text-only controls, transferred the same way).

    Example: truthmap generalize --datasets geography triviaqa movies winobias mnli --data-dir ../shared/data
    """
    from truthmap import pipeline

    options = {k: v for k, v in locals().items() if k not in ("ctx", "pipeline", "datasets", "test_samples", "token")}
    config = RunConfig(**(options | {"seeds": parse_seeds(seeds)}))
    result = pipeline.generalize(config, parse_datasets(datasets + ctx.args), token, test_samples)
    typer.echo(result["auc_table"].round(3).to_string())
    typer.echo("\nAUC minus the test dataset's Logits-min-exact AUC:")
    typer.echo(result["relative_table"].round(3).to_string())
    typer.echo("\nAUC minus the best text-only control trained and tested on the same datasets:")
    typer.echo(result["control_table"].round(3).to_string())
    for where, why in result["blank"].items():
        typer.echo(f"Blank ({where}): {why}")
    typer.echo(f"Files: {result['auc']}, {result['auc_minus_baseline']}, {result['auc_minus_control']} (+ .png), "
               f"{result['text_controls']}")


@app.command("fit-detector")
@reports_errors
def fit_detector(
    model: Model = "smollm2",
    dataset: Dataset = "geography",
    split: Split = "train",
    runs_dir: RunsDir = "runs",
    site: Site = "mlp",
    token: Annotated[str, typer.Option(help="Probed token, e.g. exact_answer_last, last_q, -1.")] = "exact_answer_last",
    layer: Annotated[Optional[int], typer.Option(help="Layer; default: chosen on validation splits.")] = None,
    seeds: Seeds = DEFAULT_SEEDS_TEXT,
    out: Annotated[Optional[str], typer.Option(help="Detector file (.json, with a .npz of the same name beside it); "
                                                    "default: <run>/detector_<site>.json.")] = None,
):
    """Fit an error detector on a finished run; save it as a JSON file of settings and a .npz of weights beside it.

    Also writes detector_scores.parquet in the run (and in its test split's run, when that one is extracted).

    Example: truthmap fit-detector --dataset geography --token exact_answer_last
    """
    from truthmap import pipeline

    config = RunConfig(model=model, dataset=dataset, split=split, runs_dir=runs_dir, site=site, seeds=parse_seeds(seeds))
    typer.echo(json.dumps(pipeline.fit_detector(config, token, layer, out), indent=2))


@app.command()
@reports_errors
def score(
    detector: Annotated[str, typer.Option(help="A detector .json from `truthmap fit-detector` (its .npz beside it).")],
    question: Annotated[Optional[str], typer.Option(help="The question (single mode).")] = None,
    answer: Annotated[Optional[str], typer.Option(help="The answer to score (single mode).")] = None,
    exact_answer: Annotated[Optional[str], typer.Option(help="The span of the answer that answers (skips extraction).")] = None,
    gold: Annotated[Optional[str], typer.Option(help="A correct answer; used as the exact answer when the answer contains it.")] = None,
    input_path: Annotated[Optional[str], typer.Option("--input", help="Batch mode: a CSV or JSONL file of questions and answers.")] = None,
    output: Annotated[Optional[str], typer.Option(help="Batch mode: write the rows with their scores here (.csv or .jsonl).")] = None,
    question_column: QuestionColumn = "question",
    answer_column: Annotated[str, typer.Option(help="Batch mode: the column of answers to score.")] = "answer",
    model: Annotated[Optional[str], typer.Option(help="Default: the detector's model (another one is refused).")] = None,
    device: Device = None,
    dtype: Dtype = None,
    batch_size: BatchSize = 16,
):
    """Probability that an answer is wrong, from the detector's probe on the model's own activations.

    Example: truthmap score --detector runs/smollm2/geography/train/detector_mlp.json --question "What is the capital of Peru?" --answer "The capital of Peru is Lima."
    """
    from truthmap.detector import Detector, check_texts, load_scoring_model, read_pairs, score_file
    from truthmap.errors import ConfigError

    single = {"--question": question, "--answer": answer, "--exact-answer": exact_answer, "--gold": gold}
    if input_path and any(value is not None for value in single.values()):
        flag = next(name for name, value in single.items() if value is not None)
        raise ConfigError(
            f"--input scores the rows of a file, {flag} one answer: give one or the other (in batch mode the file's "
            "columns exact_answer and gold play the roles of --exact-answer and --gold)."
        )
    found = Detector.load(detector)
    if input_path:
        frame = read_pairs(input_path, question_column, answer_column)  # bad input fails before the model loads
        lm = load_scoring_model(found, model, device, dtype)
        typer.echo(score_file(found, lm, frame, input_path, output, question_column, answer_column, batch_size))
        return
    if question is None or answer is None:
        raise typer.BadParameter("give --question and --answer, or --input FILE for batch mode", param_hint="--answer")
    check_texts([question], [answer])
    lm = load_scoring_model(found, model, device, dtype)
    result = found.score_texts([question], [answer], lm, golds=[gold] if gold else None,
                               exact_answers=[exact_answer] if exact_answer else None)
    typer.echo(json.dumps(result[0], indent=2))


@app.command()
@reports_errors
def report(run_dir: Annotated[str, typer.Argument(help="A run directory: runs/<model>/<dataset>/<split>.")]):
    """Write the run's report.html: heatmaps, result tables, configuration and browsable examples, in one file.

    Example: truthmap report runs/smollm2/geography/train
    """
    from truthmap.report import write_report

    typer.echo(f"Report: {write_report(run_dir)}")


@app.command()
@reports_errors
def runs(runs_dir: RunsDir = "runs"):
    """List the runs on disk: samples, correct answers and the stages done (reads files only).

    Example: truthmap runs --runs-dir runs
    """
    from truthmap.report import find_runs, format_runs

    typer.echo(format_runs(find_runs(runs_dir), runs_dir))


@app.command()
@reports_errors
def resample(
    model: Model = "smollm2",
    dataset: Dataset = "geography",
    split: Split = "train",
    n_samples: Annotated[Optional[int], typer.Option(help="Resample this many of the run's questions (seeded); default: all.")] = None,
    n_resamples: Annotated[int, typer.Option(help="Sampled answers per question (K; the paper uses 30).")] = 10,
    temperature: Annotated[float, typer.Option(help="Sampling temperature, > 0.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Sampling seed: the same seed gives the same answers at any batch size.")] = 0,
    layer: Annotated[Optional[int], typer.Option(help="Layer of the probed cell; default: the train run's best cell.")] = None,
    token: Annotated[Optional[str], typer.Option(help="Token of the probed cell, e.g. exact_answer_last; default: the best cell's.")] = None,
    data_dir: DataDir = None,
    runs_dir: RunsDir = "runs",
    batch_size: BatchSize = 16,
    device: Device = None,
    dtype: Dtype = None,
    extraction_model: ExtractionModel = None,
    extraction_tries: ExtractionTries = 1,
    site: Site = "mlp",
    seeds: Seeds = DEFAULT_SEEDS_TEXT,
):
    """Sample K answers per question of a finished run: error types, probes per type, and answer selection.

    Writes <run>/resamples/: answers.parquet, cell_acts.npy, error_types.csv, type_probes.csv, selection.csv and
    selection.png, resamples.json.

    Example: truthmap resample --dataset geography --n-samples 100 --n-resamples 10 --temperature 1.0 --seed 0
    """
    from truthmap import pipeline

    config = RunConfig(
        model=model, dataset=dataset, split=split, data_dir=data_dir, runs_dir=runs_dir, batch_size=batch_size,
        device=device, dtype=dtype, extraction_model=extraction_model, extraction_tries=extraction_tries, site=site,
        seeds=parse_seeds(seeds),
    )
    summary = pipeline.resample(config, n_resamples, temperature, seed, layer, token, n_questions=n_samples)
    out = pipeline.run_dir(config).resample_files
    typer.echo(json.dumps({k: summary[k] for k in ("questions", "resampled_answers", "error_types", "selection")}, indent=2))
    cell = summary["cell"]
    typer.echo(f"Cell: {cell['site']} layer {cell['layer']}, token {cell['token']}")
    typer.echo(f"Selection: {out.selection_csv}, {out.selection_png}")


def main():
    app()


if __name__ == "__main__":
    main()

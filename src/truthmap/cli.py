"""The `truthmap` command: parses flags into a RunConfig, calls one pipeline function, prints the outcome.

Every option is declared once, in OPTIONS (its flag, help text and --help panel), and its default is RunConfig's
for a RunConfig field; each command lists the options it takes (`@takes(...)`), which builds its typer signature.
A run on disk is addressed the same way by every command that reads one: --run DIR, or --model, --dataset,
--split under --runs-dir.

Nothing heavy is imported at module level, so `truthmap --help` answers instantly without torch.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import signal
import typing
import warnings
from typing import Annotated, Optional

import typer

from truthmap.config import RunConfig
from truthmap.errors import ConfigError, StoreError, TruthmapError, TruthmapWarning
from truthmap.rundir import POSITIONS, RunDir, check_token, read_json
from truthmap.runstate import run_lock

app = typer.Typer(
    help="Find where a language model knows that it is wrong: answers, exact answers, activations, probes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def parse_seeds(text: str) -> tuple[int, ...]:
    parts = text.replace(",", " ").split()
    if not parts or not all(p.lstrip("-").isdigit() for p in parts):
        raise typer.BadParameter(f"expected integers like '0,5,26', got {text!r}", param_hint="--seeds")
    return tuple(int(p) for p in parts)


# The panels of --help, in this order: which run, what it reads, what it runs on, then each stage's settings.
PANELS = RUN, DATASET, MODEL, GENERATION, LOCATING, PROBES, SCORING, OUTPUT = (
    "Run", "Dataset", "Model", "Generation", "Locating", "Probes", "Scoring", "Output")
ABSENT = object()  # an Option without a default of its own: RunConfig's


@dataclasses.dataclass(frozen=True)
class Option:
    """One command-line option. type and default: the RunConfig field's, for a field (typer shows the default)."""

    help: str
    panel: str
    type: object = None
    default: object = ABSENT  # `...`: required
    flag: str | None = None  # default: --the-name-with-dashes
    to_text: typing.Callable | None = None  # RunConfig's default as typed on the command line
    parse: typing.Callable | None = None  # the typed text -> the value the command gets (raises on a bad one)
    help_in: dict = dataclasses.field(default_factory=dict)  # command -> its help there, where more particular

    def declaration(self, name: str) -> str:
        return self.flag or "--" + name.replace("_", "-")


def _token(value):
    if value is not None:
        check_token(value)  # a ConfigError that lists the 15 names
    return value


OPTIONS = {
    # Run: which run, or which runs.
    "config": Option("A TOML study file (see study.example.toml); flags given here override it.", RUN,
                     Optional[str], None),
    "run": Option("An existing run directory, runs/<model>/<dataset>/<split>: names the run instead of --model, "
                  "--dataset, --split and --runs-dir.", RUN, Optional[str], None),
    "model": Option("'smollm2' (embedded default), 'gemma3-270m' (a base model), a hub id, a local directory or a "
                    ".gguf file.", RUN, help_in={"import": "The model that wrote the answers (as for generate).",
                                                 "score": "Default: the detector's model (another one is refused)."}),
    "dataset": Option("A registered dataset (see `truthmap datasets`), or 'custom' (a file: --custom-path).", RUN,
                      help_in={"import": "Whose correctness rule and prompt apply (e.g. triviaqa); 'custom': the "
                                         "alias rule. Also names the run directory."}),
    "datasets": Option("Datasets of the study (space- or comma-separated, or repeated).", RUN, list[str], ...),
    "split": Option("train or test.", RUN),
    "runs_dir": Option("Where run directories are written.", RUN),
    "seed": Option("Seed of subsampling and of sampling (the sampled extraction retries).", RUN,
                   help_in={"resample": "Sampling seed: the same seed gives the same answers at any batch size; "
                                        "also subsamples --n-questions."}),
    # Dataset: the questions, and the columns of a file given.
    "n_samples": Option("Subsample this many questions of the split (seeded); default: the whole split.", DATASET),
    "n_questions": Option("Questions per train split, for runs not yet on disk.", DATASET, Optional[int], None,
                          help_in={"resample": "Resample this many of the run's questions (seeded); default: all."}),
    "n_test_questions": Option("Questions per test split, for runs not yet on disk; default: --n-questions.", DATASET,
                               Optional[int], None),
    "data_dir": Option("Directory of dataset files; default: $TRUTHMAP_DATA_DIR.", DATASET),
    "custom_path": Option("With --dataset custom: a CSV or JSONL file of questions and answers.", DATASET),
    "question_column": Option("With --dataset custom: the question column.", DATASET,
                              help_in={"import": "The question column.",
                                       "score": "Batch mode: the question column of the --input file.",
                                       "answer": "The question column of the --input file (or of --custom-path)."}),
    "answer_column": Option("With --dataset custom: the column of correct answers (a string or a list).", DATASET,
                            help_in={"import": "The column of the model's answers.",
                                     "score": "Batch mode: the column of answers to score."}),
    "gold_column": Option("Optional gold aliases (a list, or one answer): labels by the rule.", DATASET, str, "gold"),
    "id_column": Option("Optional row ids (default: row-1, row-2 ...).", DATASET, str, "id"),
    "prompt_column": Option("Optional prompt: the user message, or the text rendered with the chat template "
                            "(default: the dataset's prompt of the question).", DATASET, str, "prompt"),
    "correct_column": Option("Optional labels (true/false); they win over the rule.", DATASET, str, "correct"),
    "exact_answer_column": Option("Optional exact answers (a span of the answer).", DATASET, str, "exact_answer"),
    "strict": Option("Stop at the first bad row instead of skipping it.", DATASET, bool, False, "--strict"),
    # Model: where and how the model runs.
    "device": Option("cpu, cuda, cuda:1 ...; default: cuda when available.", MODEL),
    "dtype": Option("float32, bfloat16 or float16; default: bf16 on cuda, fp32 on cpu.", MODEL),
    "batch_size": Option("Samples per forward pass.", MODEL),
    "executor": Option("local (in this process) or ray (shards over Ray workers, one model each).", MODEL),
    "ray_address": Option("With --executor ray: an existing cluster; default: start a local one.", MODEL),
    "workers": Option("With --executor ray: workers; default: one per GPU, else per CPU.", MODEL),
    # Generation
    "prompt_style": Option("auto (chat template if the model has one), instruct or base.", GENERATION),
    "max_new_tokens": Option("Default: the dataset's (100; 200 for math).", GENERATION),
    "n_resamples": Option("Sampled answers per question (K; the paper uses 30).", GENERATION, int, 10,
                          help_in={"table": "With --sampling-baselines: sampled answers per test question (K)."}),
    "temperature": Option("Sampling temperature, > 0.", GENERATION, float, 1.0),
    "sampling_baselines": Option("Also the sampling baselines (semantic entropy, distinct answers, self-consistency) "
                                 "from --n-resamples sampled answers per test question, those `truthmap resample` "
                                 "writes (reused when there).", GENERATION, bool, False, "--sampling-baselines"),
    # Locating the exact answer
    "locate": Option("blind (the extractor locates every open answer, right or wrong) or gold (a gold alias in "
                     "correct answers, the extractor for the rest: the paper's way).", LOCATING),
    "extractor": Option("constrained (can only copy a span of the answer, or say NO ANSWER) or free (free text "
                        "that must occur in the answer, retried).", LOCATING),
    "extraction_model": Option("Model that extracts exact answers; default: the answering model.", LOCATING),
    "extraction_tries": Option("With --extractor free: tries per answer, greedy first, then sampled.", LOCATING),
    # Probes
    "site": Option("mlp (MLP output, as the paper), mlp_in, attn or resid.", PROBES),
    "seeds": Option("Probe split seeds, comma- or space-separated.", PROBES, str,
                    to_text=lambda seeds: ",".join(str(s) for s in seeds), parse=parse_seeds),
    "token": Option(f"The probed token, one of: {', '.join(POSITIONS)}.", PROBES, Optional[str], "exact_answer_last",
                    parse=_token, help_in={"resample": f"Token of the probed cell, one of: {', '.join(POSITIONS)}; "
                                                        "default: the train run's best cell's."}),
    "layer": Option("Layer of the probed cell.", PROBES, Optional[int], None,
                    help_in={"fit-detector": "Layer of the probe; default: chosen on validation splits.",
                             "resample": "Layer of the probed cell; default: the train run's best cell's."}),
    # Scoring
    "detector": Option("A detector directory from `truthmap fit-detector` (or a format-2 .json, its .npz beside "
                       "it).", SCORING, str, ...),
    "max_fpr": Option("Flag answers at the threshold whose false-positive rate (right answers flagged) on the "
                      "calibration rows is at most this, such as 0.05.", SCORING, Optional[float], None),
    "min_recall": Option("Flag answers at the threshold that flags at least this share of the calibration rows' "
                         "errors, such as 0.9.", SCORING, Optional[float], None),
    "abstain": Option("Replace each flagged answer with a refusal (the row says so).", SCORING, bool, False,
                      "--abstain"),
    "question": Option("The question (single mode).", SCORING, Optional[str], None),
    "answer": Option("The answer to score (single mode).", SCORING, Optional[str], None),
    "exact_answer": Option("The span of the answer that answers (skips extraction).", SCORING, Optional[str], None),
    "gold": Option("A correct answer; used as the exact answer when the answer contains it.", SCORING,
                   Optional[str], None),
    "input_path": Option("Batch mode: a CSV or JSONL file of questions and answers.", SCORING, Optional[str], None,
                         "--input", help_in={"answer": "A CSV, JSONL or Parquet file of questions (an optional gold "
                                                       "column grades the answers)."}),
    # Output
    "out": Option("Detector directory (config.json, model.safetensors, README.md); default: "
                  "<run>/detector_<site>.", OUTPUT, Optional[str], None),
    "output": Option("Batch mode: write the rows with their scores here (.csv or .jsonl).", OUTPUT, Optional[str],
                     None, help_in={"answer": "Write the answers here (.csv or .jsonl); default: JSON lines on "
                                              "stdout."}),
}
RUN_FIELDS = {field.name: field for field in dataclasses.fields(RunConfig)}
RUN_TYPES = typing.get_type_hints(RunConfig)
ADDRESS = ("model", "dataset", "split", "runs_dir")  # what --run DIR stands for
# Flags whose meaning changed: old name -> new name. Given, they fail in one line (never silently accepted).
RENAMED = {"n_samples": "n_questions", "test_samples": "n_test_questions"}


def flag(name: str) -> str:
    return OPTIONS[name].declaration(name) if name in OPTIONS else "--" + name.replace("_", "-")


def default_of(name: str):
    """The option's default: RunConfig's for a RunConfig field (as typed on the command line), else the table's."""
    option = OPTIONS[name]
    if option.default is not ABSENT:
        return option.default
    value = RUN_FIELDS[name].default
    return option.to_text(value) if option.to_text else value


def _parameter(name: str, default, command: str) -> inspect.Parameter:
    option = OPTIONS[name]
    text = option.help_in.get(command, option.help)
    info = typer.Option(default, option.declaration(name), help=text, rich_help_panel=option.panel)
    kind = option.type or RUN_TYPES[name]
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=kind)


def _renamed_parameter(old: str) -> inspect.Parameter:
    info = typer.Option(None, flag(old), hidden=True)
    return inspect.Parameter(old, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=Optional[str])


def takes(*names: str, defaults: dict | None = None, renamed: tuple[str, ...] = ()):
    """Give a command the options `names` of OPTIONS, as keyword arguments, after its own parameters.

    The help shown is the option's help_in for this command, else its help; --help groups the options in PANELS.
    `defaults` replaces an option's default for this command (say why where used); `renamed` lists the old flags
    (RENAMED) that fail with a ConfigError naming the new one. Values are parsed (--seeds) and checked (--token)
    before the command runs; the command gets `ctx` when it declares it."""
    defaults = defaults or {}

    def decorate(command):
        own = list(inspect.signature(command, eval_str=True).parameters.values())
        wants_ctx = "ctx" in [p.name for p in own]
        own = [p for p in own if p.kind is not inspect.Parameter.VAR_KEYWORD]
        context = [] if wants_ctx else [inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                          annotation=typer.Context)]
        name_of_command = command.__name__.strip("_").replace("_", "-")  # import_ -> import
        in_panels = sorted(names, key=lambda name: PANELS.index(OPTIONS[name].panel))  # stable: else as listed
        options = [_parameter(name, defaults.get(name, default_of(name)), name_of_command) for name in in_panels]
        parameters = context + own + options + [_renamed_parameter(old) for old in renamed]

        @functools.wraps(command)
        def wrapper(ctx, *args, **kwargs):
            for old in renamed:
                value = kwargs.pop(old)
                if value is not None:
                    raise ConfigError(f"{flag(old)} is now {flag(RENAMED[old])} in `truthmap {ctx.info_name}`: "
                                      f"rerun with {flag(RENAMED[old])} {value}.")
            for name in names:
                if OPTIONS[name].parse:
                    kwargs[name] = OPTIONS[name].parse(kwargs[name])
            return command(ctx, *args, **kwargs) if wants_ctx else command(*args, **kwargs)

        wrapper.__signature__ = inspect.Signature(parameters)
        wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
        return wrapper

    return decorate


def run_config(options: dict, **changes) -> RunConfig:
    """The RunConfig of a command's options (those that are RunConfig fields), with `changes` over them."""
    return RunConfig(**{k: v for k, v in options.items() if k in RUN_FIELDS} | changes)


def given(ctx: typer.Context, name: str) -> bool:
    """Whether the option was typed on the command line (not left at its default)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def check_address(ctx: typer.Context, run: str | None) -> None:
    """--run DIR names the run: typing --model, --dataset, --split or --runs-dir beside it is refused."""
    typed = [flag(name) for name in ADDRESS if given(ctx, name)]
    if run is not None and typed:
        raise ConfigError(f"--run {run} already names the run: drop {', '.join(typed)}, or drop --run.")


def addressed(ctx: typer.Context, options: dict) -> dict:
    """The options with --run DIR resolved into the run's --model (from its run.json), --dataset, --split and
    --runs-dir; without --run, the options as given."""
    from truthmap.lm.models import model_slug

    directory = options.pop("run")
    check_address(ctx, directory)
    if directory is None:
        return options
    run = RunDir.from_path(directory)
    if not run.run_json.exists():
        if run.path.is_dir():
            with run_lock(run):  # a run still being made (an import writes run.json last) is in use, not missing
                pass
        raise StoreError(f"No run.json in {run.path}: --run takes a run directory made by generate, run or import "
                         "(runs/<model>/<dataset>/<split>).")
    model = read_json(run.run_json)["config"]["model"]
    root, slug, dataset, split = run.path.parents[2], *run.path.parts[-3:]
    if model_slug(model) != slug:
        raise StoreError(f"{run.path} holds answers of model {model!r}, whose runs are in {model_slug(model)}/, not "
                         f"{slug}/: move the directory back, or address it with --model.")
    return options | {"model": model, "dataset": dataset, "split": split, "runs_dir": str(root)}


# Option lists that several commands share.
ADDRESSED = ("run", *ADDRESS)
EXECUTION = ("batch_size", "device", "dtype", "executor", "ray_address", "workers")
LOCATING_OPTIONS = ("extraction_model", "extraction_tries", "locate", "extractor")
CUSTOM = ("custom_path", "question_column", "answer_column")
GENERATING = ("model", "dataset", "split", "runs_dir", "seed", "n_samples", "data_dir", *CUSTOM, *EXECUTION,
              "prompt_style", "max_new_tokens", *LOCATING_OPTIONS, "site")
STUDY = ("datasets", "model", "runs_dir", "seed", "n_questions", "n_test_questions", "data_dir", *CUSTOM,
         "batch_size", "device", "dtype", "extraction_tries", "locate", "extractor", "site", "seeds")
STUDY_QUESTIONS = 300  # table and generalize: questions per train split when --n-questions is not given


DEBUG = {"on": False}  # set by `truthmap --debug` for this invocation
# Exits and usage errors that click prints itself; found by name because typer may ship its own copy of click.
CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
CLICK_EXCEPTIONS = (typer.Exit, typer.Abort, CLICK_ERROR)


@app.callback()
def global_options(
    debug: Annotated[bool, typer.Option("--debug", help="Show the full traceback when a command fails.")] = False,
):
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
@takes(*GENERATING)
def generate(**options):
    """Answer a dataset's questions, label them and locate the exact answers: writes answers.parquet, and the
    site's activations, recorded while the answers are generated.

    Example: truthmap generate --dataset triviaqa --n-samples 200 --data-dir ../shared/data
    """
    from truthmap import pipeline
    run = pipeline.generate(run_config(options))
    typer.echo(json.dumps(pipeline.summarize_answers(run), indent=2))


IMPORT_COLUMNS = ("question_column", "answer_column", "gold_column", "id_column", "prompt_column", "correct_column",
                  "exact_answer_column")


@app.command("import")
@reports_errors
# Answers made elsewhere have no registered dataset by default: 'custom' labels them by their gold aliases.
@takes("model", "dataset", "split", "runs_dir", "seed", *IMPORT_COLUMNS, "strict", "batch_size", "device", "dtype",
       "prompt_style", *LOCATING_OPTIONS, "site", defaults={"dataset": "custom"})
def import_(
    answers_file: Annotated[str, typer.Argument(help="A .csv, .jsonl or .parquet file of answers, one per row.")],
    **options,
):
    """Import answers generated elsewhere (vLLM, an API, another run) as a normal run: tokens, log-probabilities,
    labels, exact answers, and --site's activations from the same pass as the log-probabilities. Then extract,
    probe, run, table, fit-detector and report work on it unchanged.

    Example: truthmap import answers.jsonl --dataset triviaqa --split test
    """
    from truthmap import pipeline
    from truthmap.runner.importer import ImportSource

    source = ImportSource(answers_file, *(options.pop(column) for column in IMPORT_COLUMNS))
    strict = options.pop("strict")
    typer.echo(json.dumps(pipeline.import_answers(run_config(options), source, strict=strict), indent=2))


@app.command()
@reports_errors
@takes(*ADDRESSED, "site", *EXECUTION)
def extract(ctx: typer.Context, **options):
    """Read every layer's activations at the 15 probed positions of each answer into the run's float16 store, by a
    second pass over the answers: for a site other than the one `generate` recorded, or answers made elsewhere.

    Example: truthmap extract --dataset geography --site resid
    """
    from truthmap import pipeline
    run = pipeline.extract(run_config(addressed(ctx, options)))
    typer.echo(f"Activations: {run.activations(options['site'])}")


@app.command()
@reports_errors
@takes(*ADDRESSED, "site", "seeds", "device")
def probe(ctx: typer.Context, **options):
    """Train a probe per (layer, token) cell and draw the layer x token AUC heatmap.

    Example: truthmap probe --dataset geography --seeds 0,5,26,42,63
    """
    from truthmap import pipeline
    run = pipeline.probe(run_config(addressed(ctx, options)))
    summary = pipeline.read_json(run.probe_files(options["site"]).summary)
    typer.echo(json.dumps(summary["best"], indent=2))
    if summary.get("verdict"):
        typer.echo(f"Verdict: {summary['verdict']}")


@app.command()
@reports_errors
@takes("config", *GENERATING, "seeds")
def run(ctx: typer.Context, **options):
    """The main job: generate, extract, probe, draw the heatmap and write report.html, skipping finished stages.

    With --config, runs every dataset x site of a TOML study file; flags given on the command line override it.

    Example: truthmap run --dataset triviaqa --n-samples 1000 --data-dir ../shared/data
    """
    from truthmap import pipeline
    from truthmap.config import load_study

    flags = {k: v for k, v in options.items() if k in RUN_FIELDS and given(ctx, k)}
    for config in load_study(options["config"], flags):
        result = pipeline.run_all(config)
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


@app.command()
@reports_errors
def datasets():
    """List the registered datasets.

    Example: truthmap datasets
    """
    from truthmap.datasets import get_spec, list_datasets

    for name in list_datasets():
        typer.echo(f"{name:32} {get_spec(name).description}")


def study(ctx: typer.Context, options: dict) -> tuple[RunConfig, list[str], int | None]:
    """table and generalize: the config of their runs (--n-questions per train split), the datasets, and the
    questions per test split."""
    names = parse_datasets(options.pop("datasets") + ctx.args)
    test_questions = options.pop("n_test_questions")
    return run_config(options, n_samples=options.pop("n_questions")), names, test_questions


@app.command(context_settings=EXTRA_DATASETS)
@reports_errors
@takes(*STUDY, "sampling_baselines", "n_resamples", "temperature", defaults={"n_questions": STUDY_QUESTIONS},
       renamed=("n_samples", "test_samples"))
def table(ctx: typer.Context, **options):
    """The paper's Table 1: baselines and chosen-layer probes, trained on each train split, scored on its test split.

    Runs missing on disk (answers, activations, baselines) are made first; runs already there are reused as
    they are. Writes runs/<model>/tables/detection_table.csv, .md and .png.

    Example: truthmap table --datasets geography triviaqa winobias --n-questions 300 --data-dir ../shared/data
    """
    from truthmap import pipeline
    sampling = {name: options.pop(name) for name in ("sampling_baselines", "n_resamples", "temperature")}
    config, names, test_questions = study(ctx, options)
    written = pipeline.table(config, names, test_questions, temperature=sampling["temperature"],
                             n_resamples=sampling["n_resamples"] if sampling["sampling_baselines"] else None)
    typer.echo(open(written["md"]).read())
    typer.echo(f"Table: {written['csv']}, {written['md']}, {written['png']}")


@app.command(context_settings=EXTRA_DATASETS)
@reports_errors
@takes(*STUDY, "token", defaults={"n_questions": STUDY_QUESTIONS}, renamed=("n_samples", "test_samples"))
def generalize(ctx: typer.Context, **options):
    """Train a probe on each dataset, test it on every dataset: AUC matrix, and AUC minus the target's baseline.

    Reuses the runs of `truthmap table` (and makes missing ones). Writes runs/<model>/generalization/auc.csv,
    auc_minus_baseline.csv, auc_minus_control.csv and their heatmaps (train datasets down, test datasets across),
    and text_controls.csv (the text-only controls, transferred the same way).

    Example: truthmap generalize --datasets geography triviaqa movies winobias mnli --data-dir ../shared/data
    """
    from truthmap import pipeline
    token = options.pop("token")
    config, names, test_questions = study(ctx, options)
    result = pipeline.generalize(config, names, token, test_questions)
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
@takes(*ADDRESSED, "site", "token", "layer", "seeds", "out")
def fit_detector(ctx: typer.Context, **options):
    """Fit an error detector on a finished run: a quarter of its rows (grouped by question) calibrate it and set its
    thresholds; saved as a directory (config.json, model.safetensors, README.md: docs/guide/detector.md).

    Tested on the test split when that one is extracted. Also writes detector_scores.parquet in both runs.

    Example: truthmap fit-detector --dataset geography --token exact_answer_last
    """
    from truthmap import pipeline
    token, layer, out = options.pop("token"), options.pop("layer"), options.pop("out")
    typer.echo(json.dumps(pipeline.fit_detector(run_config(addressed(ctx, options)), token, layer, out), indent=2))


@app.command()
@reports_errors
# --model: None, the detector's own model (score refuses another one), as RunConfig's default would not be.
@takes("detector", "question", "answer", "exact_answer", "gold", "input_path", "question_column", "answer_column",
       "output", "model", "device", "dtype", "batch_size", "max_fpr", "min_recall", defaults={"model": None})
def score(**options):
    """Probability that an answer is wrong, from the detector's probe on the model's own activations.

    Example: truthmap score --detector runs/smollm2/geography/train/detector_mlp --question "What is the capital of Peru?" --answer "The capital of Peru is Lima." --max-fpr 0.05
    """
    from truthmap.analysis.detector import Detector, check_texts, load_scoring_model, read_pairs, score_file
    from truthmap.lm.models import check_device

    o = options
    check_device(o["device"])  # before the model loads (else after it, ~20 s)
    single = {flag(name): o[name] for name in ("question", "answer", "exact_answer", "gold")}
    if o["input_path"] and any(value is not None for value in single.values()):
        given_flag = next(name for name, value in single.items() if value is not None)
        raise ConfigError(
            f"--input scores the rows of a file, {given_flag} one answer: give one or the other (in batch mode the "
            "file's columns exact_answer and gold play the roles of --exact-answer and --gold)."
        )
    found = Detector.load(o["detector"])
    threshold = picked_threshold(found, o["max_fpr"], o["min_recall"])  # a bad target fails before the model loads
    if o["input_path"]:
        # Bad input fails before the model loads.
        frame = read_pairs(o["input_path"], o["question_column"], o["answer_column"])
        lm = load_scoring_model(found, o["model"], o["device"], o["dtype"])
        typer.echo(score_file(found, lm, frame, o["input_path"], o["output"], o["question_column"], o["answer_column"],
                              o["batch_size"], threshold))
        return
    if o["question"] is None or o["answer"] is None:
        raise typer.BadParameter("give --question and --answer, or --input FILE for batch mode", param_hint="--answer")
    check_texts([o["question"]], [o["answer"]])
    lm = load_scoring_model(found, o["model"], o["device"], o["dtype"])
    result = found.score_texts([o["question"]], [o["answer"]], lm, golds=[o["gold"]] if o["gold"] else None,
                               exact_answers=[o["exact_answer"]] if o["exact_answer"] else None)
    if threshold is not None:
        result[0]["flag"] = result[0]["error_logit"] is not None and result[0]["error_logit"] >= threshold
    typer.echo(json.dumps(result[0], indent=2))


def picked_threshold(detector, max_fpr, min_recall):
    """The detector's log-odds threshold at --max-fpr or --min-recall; None when neither is given."""
    if max_fpr is None and min_recall is None:
        return None
    return detector.threshold(max_fpr, min_recall)


@app.command()
@reports_errors
# --model: None, the detector's own model, as in score. --dataset: only when typed (else --question or --input).
@takes("detector", "question", "gold", "input_path", "max_fpr", "min_recall", "abstain", "output", "dataset", "split",
       "n_samples", "seed", "data_dir", *CUSTOM, "max_new_tokens", "model", "device", "dtype", "batch_size",
       defaults={"model": None})
def answer(ctx: typer.Context, **o):
    """Answer questions with the detector's model; each answer carries its error probability and a flag.

    The detector reads the activations recorded while each answer is written (no second pass). With --abstain,
    flagged answers are replaced by a refusal. With gold answers, prints the accuracy of the answers kept.

    Example: truthmap answer --detector runs/smollm2/geography/train/detector_mlp --question "What is the capital of Peru?" --max-fpr 0.05
    """
    from truthmap.runner import flagged
    given_dataset = given(ctx, "dataset")
    sources = [name for name, value in (("--question", o["question"]), ("--input", o["input_path"]),
                                        ("--dataset", given_dataset or None)) if value]
    if len(sources) != 1:
        raise ConfigError("Give the questions one way: --question TEXT, --input FILE or --dataset NAME"
                          + (f" (got {' and '.join(sources)})." if sources else "."))
    questions, golds, records, spec = None, None, None, None
    if o["question"]:
        questions, golds = [o["question"]], [o["gold"]] if o["gold"] else None
    elif o["input_path"]:
        questions, golds = flagged.read_questions(o["input_path"], o["question_column"])
    else:
        from truthmap.pipeline import load_config_records

        spec, records = load_config_records(run_config({k: v for k, v in o.items() if k != "model"}))
    result = flagged.answer(questions, o["detector"], golds=golds, records=records, spec=spec,
                              max_fpr=o["max_fpr"], min_recall=o["min_recall"], abstain=o["abstain"],
                              model=o["model"], device=o["device"], dtype=o["dtype"], batch_size=o["batch_size"],
                              max_new_tokens=o["max_new_tokens"])
    text = flagged.write_rows(result.rows, o["output"])
    if text:
        typer.echo(text)
    for line in flagged.summary_lines(result):
        typer.echo(line, err=True)


@app.command()
@reports_errors
@takes(*ADDRESSED)
def report(
    ctx: typer.Context,
    # The form before --run existed, kept working (hidden): `truthmap report DIR` is `truthmap report --run DIR`.
    run_dir: Annotated[Optional[str], typer.Argument(hidden=True)] = None,
    **options,
):
    """Write the run's report.html: heatmaps, result tables, configuration and browsable examples, in one file.

    Example: truthmap report --run runs/smollm2/geography/train
    """
    from truthmap.analysis.report import write_report
    from truthmap.lm.models import model_slug

    if run_dir is not None and options["run"] is not None:
        raise ConfigError(f"Give the run directory once: --run {options['run']} or {run_dir}, not both.")
    directory = run_dir if run_dir is not None else options["run"]
    check_address(ctx, directory)
    if directory is None:
        directory = RunDir(options["runs_dir"], model_slug(options["model"]), options["dataset"], options["split"]).path
    typer.echo(f"Report: {write_report(directory)}")


@app.command()
@reports_errors
@takes("runs_dir")
def runs(**options):
    """List the runs on disk: samples, correct answers and the stages done (reads files only).

    Example: truthmap runs --runs-dir runs
    """
    from truthmap.analysis.report import find_runs, format_runs

    runs_dir = options["runs_dir"]
    typer.echo(format_runs(find_runs(runs_dir), runs_dir))


@app.command()
@reports_errors
@takes(*ADDRESSED, "n_questions", "n_resamples", "temperature", "seed", "layer", "token", "data_dir", *EXECUTION[:3],
       "extraction_model", "extraction_tries", "site", "seeds", defaults={"token": None}, renamed=("n_samples",))
def resample(ctx: typer.Context, **options):
    """Sample K answers per question of a finished run: error types, probes per type, and answer selection.

    Writes <run>/resamples/: answers.parquet, cell_acts.npy, error_types.csv, type_probes.csv, selection.csv and
    selection.png, resamples.json.

    Example: truthmap resample --dataset geography --n-questions 100 --n-resamples 10 --temperature 1.0 --seed 0
    """
    from truthmap import pipeline
    from truthmap.runner.resample import ResampleConfig

    asked = {name: options.pop(name) for name in ("n_questions", "n_resamples", "temperature", "layer", "token")}
    config = run_config(addressed(ctx, options))
    summary = pipeline.resample(config, ResampleConfig(**asked, seed=config.seed))
    out = pipeline.run_dir(config).resample_files
    typer.echo(json.dumps({k: summary[k] for k in ("questions", "resampled_answers", "error_types", "selection")}, indent=2))
    cell = summary["cell"]
    typer.echo(f"Cell: {cell['site']} layer {cell['layer']}, token {cell['token']}")
    typer.echo(f"Selection: {out.selection_csv}, {out.selection_png}")


def main():
    app()


if __name__ == "__main__":
    main()

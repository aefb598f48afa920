"""The `truthmap` command: parses flags into a RunConfig, calls one pipeline function, prints the outcome.

Nothing heavy is imported at module level, so `truthmap --help` answers instantly without torch.
"""

from __future__ import annotations

import functools
import json
from typing import Annotated, Optional

import typer

from truthmap.config import DEFAULT_SEEDS, RunConfig
from truthmap.errors import TruthmapError

app = typer.Typer(
    help="Find where a language model knows that it is wrong: answers, exact answers, activations, probes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

Model = Annotated[str, typer.Option(help="'smollm2' (embedded default), a hub id, a local directory or a .gguf file.")]
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
ExtractionTries = Annotated[int, typer.Option(help="Tries per incorrect answer: greedy first, then sampled.")]
CustomPath = Annotated[Optional[str], typer.Option(help="With --dataset custom: a CSV or JSONL file.")]
QuestionColumn = Annotated[str, typer.Option(help="With --dataset custom: the question column.")]
AnswerColumn = Annotated[str, typer.Option(help="With --dataset custom: the answer column (a string or a list).")]
Site = Annotated[str, typer.Option(help="mlp (MLP output, as the paper), mlp_in, attn or resid.")]
Seeds = Annotated[str, typer.Option(help="Probe split seeds, comma- or space-separated.")]
DEFAULT_SEEDS_TEXT = ",".join(str(s) for s in DEFAULT_SEEDS)


def parse_seeds(text: str) -> tuple[int, ...]:
    parts = text.replace(",", " ").split()
    if not parts or not all(p.lstrip("-").isdigit() for p in parts):
        raise typer.BadParameter(f"expected integers like '0,5,26', got {text!r}", param_hint="--seeds")
    return tuple(int(p) for p in parts)


def reports_errors(command):
    """Print library errors as one line and exit 1; no traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except TruthmapError as error:
            typer.echo(f"Error: {error}", err=True)
            raise typer.Exit(1) from None

    return wrapper


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
    custom_path: CustomPath = None,
    question_column: QuestionColumn = "question",
    answer_column: AnswerColumn = "answer",
):
    """Answer a dataset's questions, label them and locate the exact answers: writes answers.parquet.

    Example: truthmap generate --dataset triviaqa --n-samples 200 --data-dir ../shared/data
    """
    from truthmap import pipeline

    config = RunConfig(**{k: v for k, v in locals().items() if k != "pipeline"})
    run = pipeline.generate(config)
    typer.echo(json.dumps(pipeline.summarize_answers(run), indent=2))


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
):
    """Read every layer's activations at the 15 probed positions of each answer into the run's float16 store.

    Example: truthmap extract --dataset geography --site mlp
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
):
    """Train a probe per (layer, token) cell and draw the layer x token AUC heatmap.

    Example: truthmap probe --dataset geography --seeds 0,5,26,42,63
    """
    from truthmap import pipeline

    config = RunConfig(model=model, dataset=dataset, split=split, runs_dir=runs_dir, site=site, seeds=parse_seeds(seeds))
    run = pipeline.probe(config)
    typer.echo(json.dumps(pipeline.read_json(run.probes(site) / "probes.json")["best"], indent=2))


@app.command()
@reports_errors
def run(
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
    custom_path: CustomPath = None,
    question_column: QuestionColumn = "question",
    answer_column: AnswerColumn = "answer",
    site: Site = "mlp",
    seeds: Seeds = DEFAULT_SEEDS_TEXT,
):
    """The main job: generate, extract, probe and draw the heatmap, skipping finished stages.

    Example: truthmap run --dataset triviaqa --n-samples 1000 --data-dir ../shared/data
    """
    from truthmap import pipeline

    options = {k: v for k, v in locals().items() if k != "pipeline"}
    config = RunConfig(**(options | {"seeds": parse_seeds(seeds)}))
    result = pipeline.run_all(config)
    best = result["best"]
    typer.echo(json.dumps({k: v for k, v in result.items() if k != "best"}, indent=2))
    typer.echo(f"Heatmap: {result['heatmap']}")
    typer.echo(f"Best cell: layer {best['layer']}, token {best['token']}, AUC {best['auc_mean']:.3f} ± {best['auc_std']:.3f}")


@app.command()
def datasets():
    """List the registered datasets.

    Example: truthmap datasets
    """
    from truthmap.datasets import get_spec, list_datasets

    for name in list_datasets():
        typer.echo(f"{name:32} {get_spec(name).description}")


def main():
    app()


if __name__ == "__main__":
    main()

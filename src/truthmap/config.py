"""One configuration for a study, shared by the Python API and the CLI (flags > defaults)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from truthmap.errors import ConfigError

DEFAULT_SEEDS = (0, 5, 26, 42, 63)


@dataclass
class RunConfig:
    model: str = "smollm2"
    dataset: str = "geography"
    split: str = "train"
    n_samples: int | None = None  # None: the whole split (at most 10,000, as in the paper)
    data_dir: str | None = None  # None: $TRUTHMAP_DATA_DIR
    runs_dir: str = "runs"
    batch_size: int = 16
    seed: int = 0  # subsampling and the sampled extraction retries
    device: str | None = None  # None: cuda when available, else cpu
    dtype: str | None = None  # None: bfloat16 on cuda, float32 on cpu
    prompt_style: str = "auto"  # auto (chat template when the model has one) | instruct | base
    max_new_tokens: int | None = None  # None: the dataset's (100; 200 for math)
    extraction_model: str | None = None  # None: the answering model extracts its own exact answers
    extraction_tries: int = 5
    custom_path: str | None = None  # dataset "custom": a CSV or JSONL file
    question_column: str = "question"
    answer_column: str = "answer"
    site: str = "mlp"
    seeds: tuple[int, ...] = DEFAULT_SEEDS

    def __post_init__(self):
        checks = {
            "split": (self.split in ("train", "test"), "train or test"),
            "batch_size": (self.batch_size >= 1, "an integer >= 1"),
            "n_samples": (self.n_samples is None or self.n_samples >= 1, "an integer >= 1"),
            "prompt_style": (self.prompt_style in ("auto", "instruct", "base"), "auto, instruct or base"),
            "extraction_tries": (self.extraction_tries >= 1, "an integer >= 1"),
            "site": (self.site in ("mlp", "mlp_in", "attn", "resid"), "mlp, mlp_in, attn or resid"),
        }
        for option, (ok, expected) in checks.items():
            if not ok:
                flag = "--" + option.replace("_", "-")
                raise ConfigError(f"Invalid {flag} {getattr(self, option)!r}: expected {expected}.")
        self.seeds = tuple(int(s) for s in self.seeds)

    def to_dict(self) -> dict:
        return asdict(self)

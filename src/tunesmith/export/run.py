"""`tunesmith export RUN --format …`: turn a finished run into what a serving stack loads, and check that
serving will compute what training computed."""

from __future__ import annotations

import json
import shlex
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ProblemsError, TunesmithError
from ..model.runs import run_info, run_system_prompt
from .card import write_model_card

FORMATS = ("peft", "merged", "gguf", "gguf-lora", "ollama")
GGUF_TYPES = ("f16", "bf16", "q8_0", "f32")


@dataclass
class ExportResult:
    format: str
    path: Path
    checks: dict = field(default_factory=dict)
    commands: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def export_run(run_dir: str | Path, format: str, out: str | Path | None = None, dtype: str | None = None,
               name: str | None = None) -> ExportResult:
    run_dir = Path(run_dir)
    info = run_info(run_dir)
    if format not in FORMATS:
        raise TunesmithError(f"unknown export format '{format}'", hint=f"choose one of {', '.join(FORMATS)}")
    name = name or info.get("name") or run_dir.name
    out = Path(out) if out else run_dir / "export" / format
    return {"peft": _peft, "merged": _merged, "gguf": _gguf, "gguf-lora": _gguf_lora,
            "ollama": _ollama}[format](run_dir, info, out, dtype, name)


def _peft(run_dir: Path, info: dict, out: Path, dtype, name: str) -> ExportResult:
    from .vllm import check_vllm_lora, serve_command, write_vllm_readme

    if info.get("adapter_kind") == "full":
        raise TunesmithError("a full fine-tune has no adapter to export", hint="use --format merged or gguf")
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(run_dir / "adapter", out)
    base = _base_for_serving(info)
    problems = check_vllm_lora(out)
    if problems:
        raise ProblemsError(problems, title=f"adapter written to {out}, but vLLM cannot serve it")
    write_model_card(out, run_dir, "adapter", name)
    write_vllm_readme(out, base, name, system_prompt=run_system_prompt(run_dir, info))
    return ExportResult("peft", out, commands=[serve_command(out, base, name)])


def _merged(run_dir: Path, info: dict, out: Path, dtype, name: str) -> ExportResult:
    from ..model.merge import merge_run

    path, report = merge_run(run_dir, out, dtype=dtype or "bf16")
    write_model_card(path, run_dir, "merged", name)
    return ExportResult("merged", path, checks={"merge": report})


def _gguf(run_dir: Path, info: dict, out: Path, dtype, name: str) -> ExportResult:
    from ..model.merge import merge_run
    from .gguf import export_gguf
    from .parity import check_logits_parity, check_tokenizer_parity

    dtype = dtype or "f16"
    if dtype not in GGUF_TYPES:
        raise TunesmithError(f"GGUF type '{dtype}' is not supported", hint=f"choose one of {', '.join(GGUF_TYPES)}")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tunesmith-merged-", dir=out) as tmp:
        merged, merge_report = merge_run(run_dir, Path(tmp) / "merged", dtype="fp32")
        gguf_path = export_gguf(merged, out / "model.gguf", dtype=dtype, name=name)
        checks = {"merge": merge_report, "tokenizer": check_tokenizer_parity(merged, gguf_path),
                  "logits": check_logits_parity(merged, gguf_path, dtype)}
    (out / "parity.json").write_text(json.dumps(checks, indent=2, default=str))
    write_model_card(out, run_dir, "gguf", name)
    system = run_system_prompt(run_dir, info)
    chat = f"llama-cli -m {shlex.quote(str(gguf_path))} -cnv" + (f" -sys {shlex.quote(system)}" if system else "")
    server = f"llama-server -m {shlex.quote(str(gguf_path))}" + (
        "  # send the system message the model was trained with (see README.md)" if system else "")
    return ExportResult("gguf", gguf_path, checks=checks, commands=[chat, server])


def _gguf_lora(run_dir: Path, info: dict, out: Path, dtype, name: str) -> ExportResult:
    from ..model.load import resolve
    from .gguf import export_gguf_lora

    if info.get("adapter_kind") in ("full", "dora", "qlora"):
        raise TunesmithError(f"llama.cpp's LoRA GGUF carries plain LoRA only, not {info['adapter_kind']}",
                             hint="export --format gguf (merged) instead")
    base = resolve(info["model"])
    out.mkdir(parents=True, exist_ok=True)
    path = export_gguf_lora(run_dir / "adapter", base, out / "adapter.gguf", dtype=dtype or "f32")
    write_model_card(out, run_dir, "gguf-lora", name)
    return ExportResult("gguf-lora", path,
                        commands=[f"llama-cli -m BASE.gguf --lora {path} -cnv  # BASE.gguf: the base model as GGUF"])


def _ollama(run_dir: Path, info: dict, out: Path, dtype, name: str) -> ExportResult:
    from transformers import AutoTokenizer

    from .ollama import ollama_model_name, write_modelfile

    gguf = _gguf(run_dir, info, out, dtype, name)
    modelfile = write_modelfile(gguf.path, out, AutoTokenizer.from_pretrained(run_dir / "adapter"), name=name,
                                system=run_system_prompt(run_dir, info))
    write_model_card(out, run_dir, "ollama", ollama_model_name(name))
    return ExportResult("ollama", modelfile.modelfile, checks={**gguf.checks, "family": modelfile.family,
                                                               "stops": list(modelfile.stops)},
                        commands=[modelfile.command, f"ollama run {modelfile.command.split()[2]}"])


def _base_for_serving(info: dict) -> str:
    """What `vllm serve` should load as the base: a hub id as given, else the local folder tunesmith used."""
    spec = info.get("model") or "default"
    if spec == "default":
        from ..model.default import HUB_ID

        return HUB_ID
    from ..model.load import resolve

    return str(resolve(spec))

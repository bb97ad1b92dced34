"""The model card (README.md with the Hub's YAML metadata) written into every export of a run: what was
trained, on what data (names and row counts, never contents), with which settings, and the comparison
eval's scores with their intervals when the run has been evaluated."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from ..errors import TunesmithError
from ..model import default as default_model
from ..model.runs import run_info, run_system_prompt

# export format -> (library_name on the Hub, what the folder holds)
KINDS: dict[str, tuple[str | None, str]] = {
    "adapter": ("peft", "a LoRA adapter (PEFT) for the base model"),
    "merged": ("transformers", "the adapter merged into the base model: a standalone checkpoint"),
    "gguf": (None, "the merged model as one GGUF file for llama.cpp"),
    "gguf-lora": (None, "the LoRA adapter as a GGUF file for llama.cpp, used on top of the base model's GGUF"),
    "ollama": (None, "the merged model as a GGUF file with an Ollama Modelfile"),
}


def md_block(text: str, lang: str = "text") -> str:
    """`text` in a fenced block that no backtick run inside it can close."""
    longest = run = 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{lang}\n{text}\n{fence}"


def hub_base_model(spec: str | None) -> str | None:
    """The base model's Hub id, when there is one: the default model's, or a spec that is not a local path."""
    if spec in (None, "", "default"):
        return default_model.HUB_ID
    if Path(spec).expanduser().exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        return None
    return spec


def base_license(spec: str | None) -> str | None:
    """The base model's license: the default model's, or the `license:` of a local base's README.md."""
    if spec in (None, "", "default"):
        return default_model.LICENSE
    readme = Path(spec).expanduser() / "README.md"
    if not readme.is_file():
        return None
    from huggingface_hub import metadata_load

    try:
        return (metadata_load(readme) or {}).get("license")
    except (ValueError, yaml.YAMLError):
        return None


def hub_datasets(specs: Sequence[str]) -> list[str]:
    """The training data specs that name Hub datasets (local files are described in the card's text only)."""
    from ..data.sources import data_files

    out = []
    for spec in specs:
        try:
            if data_files(spec) is None:
                out.append(spec)
        except TunesmithError:  # a local file that is no longer where training read it
            pass
    return out


def _specs(value: Any) -> list[str]:
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def _read_config(run_dir: Path) -> dict:
    path = run_dir / "config.yaml"
    config = yaml.safe_load(path.read_text()) if path.is_file() else {}
    return config if isinstance(config, dict) else {}


def card_metadata(info: Mapping[str, Any], kind: str) -> dict[str, Any]:
    library, _ = KINDS[kind]
    data = info.get("data") or {}
    tags = ["tunesmith", str(info.get("method") or "sft"), str(info.get("adapter_kind") or "lora")]
    if kind in ("gguf", "gguf-lora", "ollama"):
        tags += ["gguf", "llama.cpp"] + (["ollama"] if kind == "ollama" else [])
    meta: dict[str, Any] = {}
    base = hub_base_model(info.get("model"))
    if base:
        meta["base_model"] = base
    if library:
        meta["library_name"] = library
    meta["license"] = base_license(info.get("model")) or "other"
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = list(dict.fromkeys(tags))
    datasets = hub_datasets(_specs(data.get("train")))
    if datasets:
        meta["datasets"] = datasets
    return meta


# ---------------------------------------------------------------- the card's sections

_SWITCHES = {"reference_cache", "share_prompt"}  # how tunesmith computes, not what was trained


def _training_lines(info: Mapping[str, Any], config: Mapping[str, Any]) -> list[str]:
    adapter, train, data = (config.get(k) or {} for k in ("adapter", "train", "data"))
    kind = info.get("adapter_kind") or adapter.get("kind", "lora")
    lines = [f"- method: `{info.get('method', 'sft')}`"]
    margs = {k: v for k, v in (config.get("method_args") or {}).items() if v is not None and k not in _SWITCHES}
    if info.get("method", "sft") != "sft" and margs:
        lines.append("- method settings: " + ", ".join(f"`{k}={v}`" for k, v in margs.items()))
    if kind == "full":
        lines.append("- adapter: none (full fine-tuning)")
    else:
        extras = [k for k in ("use_rslora", "use_dora") if adapter.get(k)]
        lines.append(f"- adapter: `{kind}`, r = {adapter.get('r')}, alpha = {adapter.get('alpha')}, dropout = "
                     f"{adapter.get('dropout')}, target = `{adapter.get('target')}`"
                     + (f", init = `{adapter['init']}`" if adapter.get("init", "default") != "default" else "")
                     + "".join(f", `{k}`" for k in extras))
    schedule = f"{train.get('schedule')} schedule, warmup ratio {train.get('warmup_ratio')}"
    lines += [f"- optimisation: lr = {train.get('lr')}, {schedule}, weight decay {train.get('weight_decay')}, "
              f"micro-batch {train.get('micro_batch_size')} x {train.get('grad_accum')} accumulation, "
              f"{info.get('steps')} steps, seed {train.get('seed')}",
              f"- sequences: max_length = {data.get('max_length')} tokens ({data.get('truncation')} truncation), "
              f"trained on `{data.get('train_on')}` turns",
              f"- precision: {info.get('precision')} on {info.get('device')}, {info.get('wall_time_s')} s of training"]
    final = info.get("final") or {}
    if "loss" in final:
        lines.append(f"- final training loss: {final['loss']:.4g}")
    return lines


def _data_lines(run_dir: Path, info: Mapping[str, Any]) -> list[str]:
    lines = []
    for stage in info.get("stages") or []:
        record = run_dir / "stages" / Path(stage).name / "run.json"
        stage_info = json.loads(record.read_text()) if record.is_file() else {}
        if stage_info:
            lines.append(f"- stage `{Path(stage).name}` ({stage_info.get('method')}): "
                         + _data_summary(stage_info.get("data") or {}))
    if not lines:
        lines.append("- " + _data_summary(info.get("data") or {}))
    return lines


def _data_summary(data: Mapping[str, Any]) -> str:
    names = ", ".join(f"`{Path(s).name}`" if Path(s).suffix else f"`{s}`" for s in _specs(data.get("train")))
    text = f"{data.get('examples', '?')} training rows from {names or '(unknown)'} ({data.get('format')} format)"
    if data.get("eval_examples"):
        text += f", {data['eval_examples']} held out for the eval loss"
    return text + (f"; sha256 of the files: `{data['sha256'][:16]}…`" if data.get("sha256") else "")


# ---------------------------------------------------------------- the eval table

def _rows_from_ladder(ladder: Any, metrics: Sequence[str], units: Mapping[str, str]) -> list[dict]:
    """results.json "ladder": a list of rungs (for the first metric) or {metric: [rungs]}."""
    by_metric = ladder if isinstance(ladder, Mapping) else {(metrics or ["score"])[0]: ladder}
    rows = []
    for metric, rungs in by_metric.items():
        for rung in rungs if isinstance(rungs, list) else []:
            if isinstance(rung, Mapping) and "mean" in rung:
                rows.append({"metric": metric, "candidate": rung.get("name") or rung.get("candidate"),
                             "mean": rung["mean"], "lo": rung.get("lo"), "hi": rung.get("hi"),
                             "unit": rung.get("unit") or units.get(metric), "usd_per_1k": rung.get("usd_per_1k")})
    return rows


def _rows_from_comparisons(comparisons: Any) -> list[dict]:
    rows = []
    for comp in comparisons if isinstance(comparisons, list) else []:
        for name, agg in (comp.get("aggregates") or {}).items():
            rows.append({"metric": comp.get("metric"), "candidate": name, "mean": agg.get("mean"),
                         "lo": agg.get("lo"), "hi": agg.get("hi"), "unit": comp.get("unit")})
    return rows


def _rows_from_run(summary: Mapping[str, Any]) -> list[dict]:
    return [{"metric": metric, "candidate": name, "mean": s.get("mean"), "lo": s.get("lo"), "hi": s.get("hi")}
            for metric, by_name in (summary.get("scores") or {}).items() for name, s in by_name.items()]


def eval_table(run_dir: Path, info: Mapping[str, Any]) -> tuple[list[dict], list[str], int | None]:
    """(rows of metric/candidate/mean/lo/hi, verdict lines, n) from the run's eval/results.json (its ladder,
    else its comparisons), else the eval summary in run.json; ([], [], None) when the run was not evaluated."""
    path = run_dir / "eval" / "results.json"
    try:
        results = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        results = {}
    results = results if isinstance(results, dict) else {}
    comparisons = results.get("comparisons") if isinstance(results.get("comparisons"), list) else []
    units = {c.get("metric"): c.get("unit") for c in comparisons if isinstance(c, Mapping)}
    rows = (_rows_from_ladder(results["ladder"], results.get("metrics") or [], units) if results.get("ladder")
            else []) or _rows_from_comparisons(comparisons)
    summary = info.get("eval") if isinstance(info.get("eval"), Mapping) else {}
    rows = rows or _rows_from_run(summary)
    verdicts = [p["verdict"] for c in comparisons if isinstance(c, Mapping) for p in c.get("pairs") or []
                if isinstance(p, Mapping) and p.get("verdict")] or list(summary.get("verdicts") or [])
    worth = results.get("worth")
    for item in worth if isinstance(worth, list) else [worth]:
        if isinstance(item, Mapping) and item.get("line"):
            verdicts.append(item["line"])
    n = results.get("n", summary.get("n"))
    return [r for r in rows if isinstance(r.get("mean"), (int, float))], verdicts, n


def _score(value: Any, unit: str | None) -> str:
    if not isinstance(value, (int, float)):
        return "n/a"
    return f"{100 * value:.1f}%" if unit == "pts" else f"{value:.3f}"


def _eval_lines(run_dir: Path, info: Mapping[str, Any]) -> list[str]:
    rows, verdicts, n = eval_table(run_dir, info)
    if not rows:
        return ["This run has not been evaluated (`tunesmith eval` or an `eval:` section in the config adds the "
                "comparison here)."]
    priced = any(r.get("usd_per_1k") is not None for r in rows)
    lines = [f"Held-out comparison on {n} examples (95% intervals):", "",
             "| candidate | metric | score | 95% interval |" + (" $ per 1k queries |" if priced else ""),
             "|---|---|---|---|" + ("---|" if priced else "")]
    for r in rows:
        interval = f"{_score(r['lo'], r.get('unit'))} – {_score(r['hi'], r.get('unit'))}"
        cost = f" {r['usd_per_1k']:.4g} |" if priced and r.get("usd_per_1k") is not None else (" |" if priced else "")
        lines.append(f"| {r['candidate']} | {r['metric']} | {_score(r['mean'], r.get('unit'))} | {interval} |{cost}")
    return lines + ([""] + [f"- {v}" for v in verdicts] if verdicts else [])


# ---------------------------------------------------------------- use, system message, the whole card

def _use_lines(kind: str, name: str, system: str | None) -> list[str]:
    import shlex

    sys_flag = f" -sys {shlex.quote(system)}" if system else ""
    if kind == "adapter":
        return [md_block('from peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n\n'
                         'model = AutoPeftModelForCausalLM.from_pretrained("PATH_OR_REPO_ID")\n'
                         'tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO_ID")', "python")]
    if kind == "merged":
        return [md_block('from transformers import AutoModelForCausalLM, AutoTokenizer\n\n'
                         'model = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO_ID")\n'
                         'tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO_ID")', "python")]
    if kind == "gguf":
        return [md_block(f"llama-cli -m model.gguf -cnv{sys_flag}\nllama-server -m model.gguf", "bash")]
    if kind == "gguf-lora":
        return [md_block("llama-cli -m BASE.gguf --lora adapter.gguf -cnv" + sys_flag, "bash"),
                "", "BASE.gguf is the base model converted to GGUF."]
    return [md_block(f"ollama create {name} -f Modelfile\nollama run {name}", "bash")]


def _system_lines(system: str | None) -> list[str]:
    if not system:
        return []
    return ["## System message", "",
            "Every training example began with this system message, so the model learned the task under it. "
            "Send it as the first message of every conversation (`tunesmith generate` / `chat` do by default; "
            "the Ollama Modelfile sets it as `SYSTEM`; llama.cpp and vLLM add none of their own):", "",
            md_block(system), ""]


def _parity_lines(out_dir: Path) -> list[str]:
    path = out_dir / "parity.json"
    if not path.is_file():
        return []
    logits = json.loads(path.read_text()).get("logits") or {}
    if "max_abs_diff" not in logits:
        return []
    return ["## Serving parity", "",
            f"Checked at export against the merged checkpoint, reading the GGUF back with transformers' own GGUF "
            f"loader: max |logit difference| {logits['max_abs_diff']:.3g} (tolerance {logits['tolerance']:.3g}, "
            f"{logits.get('dtype')}), argmax agreement {logits.get('argmax_agreement', 0):.1%}; the tokenizer and "
            "chat template give the same token ids.", ""]


def _file_lines(out_dir: Path) -> list[str]:
    files = sorted(p for p in out_dir.rglob("*") if p.is_file() and p.name != "README.md")
    return ["## Files", ""] + [f"- `{p.relative_to(out_dir).as_posix()}` ({p.stat().st_size:,} bytes)"
                               for p in files] + [""]


def model_card(run_dir: str | Path, kind: str, out_dir: str | Path, name: str | None = None) -> str:
    """The README.md text for export `kind` of the run, written into `out_dir` (whose files it lists)."""
    if kind not in KINDS:
        raise TunesmithError(f"no model card for export kind {kind!r}", hint=f"one of {', '.join(KINDS)}")
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    info, config = run_info(run_dir), _read_config(run_dir)
    name = name or info.get("name") or run_dir.name
    system = run_system_prompt(run_dir, info)
    base = hub_base_model(info.get("model")) or Path(str(info.get("model"))).name  # a local folder: its name only
    meta = yaml.safe_dump(card_metadata(info, kind), sort_keys=False, allow_unicode=True)
    body = [f"# {name}", "", f"This folder holds {KINDS[kind][1]}. It was fine-tuned from `{base}` with "
            "tunesmith.", "",
            "## Training", "", *_training_lines(info, config), "", "## Data", "", *_data_lines(run_dir, info),
            "", "## Evaluation", "", *_eval_lines(run_dir, info), "", *_system_lines(system),
            "## Use", "", *_use_lines(kind, name, system), "", *_parity_lines(out_dir), *_file_lines(out_dir)]
    return f"---\n{meta}---\n\n" + "\n".join(body)


def write_model_card(out_dir: str | Path, run_dir: str | Path, kind: str, name: str | None = None) -> Path:
    """Write (replace) out_dir/README.md with the run's model card."""
    out_dir = Path(out_dir)
    readme = out_dir / "README.md"
    readme.write_text(model_card(run_dir, kind, out_dir, name), encoding="utf-8")
    return readme

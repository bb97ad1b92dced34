"""Serving a PEFT LoRA adapter with vLLM: check it against vLLM's LoRA rules, and write the command.

The rules, from vLLM's adapter loader (vllm/lora/peft_helper.py, vllm/config/lora.py) and its model
classes (recent releases):

- `--max-lora-rank` accepts only 1, 8, 16, 32, 64, 128, 256, 320 or 512, and must be >= the
  adapter's rank; so an adapter's rank can be at most 512.
- `use_dora` is rejected ("vLLM does not yet support DoRA"), any `modules_to_save` is rejected
  ("vLLM only supports modules_to_save being None"), and `bias` must be "none".
- vLLM scales every module by `lora_alpha / r` (or `/ sqrt(r)` with rsLoRA) from the top-level
  config: `rank_pattern` / `alpha_pattern` are not read, so an adapter using them is served wrongly.
- Targets must be layers vLLM can wrap: for llama, mistral and qwen2 the linear projections
  q/k/v/o_proj and gate/up/down_proj; llama and mistral also allow LoRA on embed_tokens and lm_head.
- `trainable_token_indices` needs a vLLM new enough to have `--max-lora-trainable-tokens`.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from tunesmith.errors import Problem, TunesmithError

VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
LINEAR_TARGETS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
EMBEDDING_TARGETS = {"llama": frozenset({"embed_tokens", "lm_head"}), "mistral": frozenset({"embed_tokens", "lm_head"}),
                     "qwen2": frozenset()}
_README_START, _README_END = "<!-- tunesmith:vllm -->", "<!-- /tunesmith:vllm -->"


def _base_model_type(config: dict, architecture: str | None) -> str | None:
    """model_type of the base model: given, or read from a local base_model_name_or_path."""
    if architecture:
        return architecture
    base = config.get("base_model_name_or_path")
    if base and (Path(base) / "config.json").is_file():
        return json.loads((Path(base) / "config.json").read_text()).get("model_type")
    return None


def _adapter_modules(weights: Path) -> tuple[dict[str, int], list[str]]:
    """({target leaf name: largest rank seen}, [tensor keys that are not LoRA A/B or embedding matrices])."""
    from safetensors import safe_open

    ranks: dict[str, int] = {}
    others: list[str] = []
    with safe_open(str(weights), framework="pt") as handle:
        for key in handle.keys():
            shape = handle.get_slice(key).get_shape()
            for marker, rank_dim in ((".lora_A.", 0), (".lora_embedding_A", 0)):
                if marker in key:
                    leaf = key.split(marker)[0].rsplit(".", 1)[-1]
                    ranks[leaf] = max(ranks.get(leaf, 0), shape[rank_dim])
            if not any(m in key for m in (".lora_A.", ".lora_B.", ".lora_embedding_A", ".lora_embedding_B")):
                others.append(key)
    return ranks, others


def _config_problems(config: dict, where: str) -> list[Problem]:
    problems = []
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(Problem(f"{where} peft_type", f"{config.get('peft_type')} adapters cannot be served by vLLM",
                                "vLLM serves LoRA adapters only; export a merged model instead"))
    if config.get("use_dora"):
        problems.append(Problem(f"{where} use_dora", "vLLM does not support DoRA",
                                "train with plain LoRA (adapter.dora: false) or serve the merged model"))
    if config.get("modules_to_save"):
        problems.append(Problem(f"{where} modules_to_save", f"{config['modules_to_save']} is set; vLLM only "
                                "loads adapters without modules_to_save", "serve the merged model instead"))
    if config.get("bias", "none") != "none":
        problems.append(Problem(f"{where} bias", f"bias={config['bias']!r}; vLLM supports only bias='none'"))
    for pattern in ("rank_pattern", "alpha_pattern"):
        if config.get(pattern):
            problems.append(Problem(f"{where} {pattern}", "vLLM ignores per-module rank/alpha and would scale "
                                    "these modules wrongly", "train with one r and lora_alpha for all modules"))
    if config.get("trainable_token_indices"):
        problems.append(Problem(f"{where} trainable_token_indices", "needs a vLLM with --max-lora-trainable-tokens",
                                "check your vLLM version, or serve the merged model"))
    return problems


def _rank_problems(rank: int, max_lora_rank: int | None, where: str) -> list[Problem]:
    problems = []
    if max_lora_rank is not None and max_lora_rank not in VLLM_MAX_LORA_RANKS:
        problems.append(Problem("max_lora_rank", f"{max_lora_rank} is not a value vLLM accepts",
                                f"use one of {', '.join(map(str, VLLM_MAX_LORA_RANKS))}"))
    limit = max_lora_rank if max_lora_rank is not None else VLLM_MAX_LORA_RANKS[-1]
    if rank > limit:
        hint = (f"serve with --max-lora-rank {serving_rank(rank)}" if rank <= VLLM_MAX_LORA_RANKS[-1]
                else f"train with r <= {VLLM_MAX_LORA_RANKS[-1]}")
        problems.append(Problem(f"{where} r", f"rank {rank} is above --max-lora-rank {limit}", hint))
    return problems


def _target_problems(ranks: dict[str, int], others: list[str], model_type: str | None, where: str) -> list[Problem]:
    allowed = LINEAR_TARGETS | EMBEDDING_TARGETS.get(model_type or "", frozenset())
    problems = [Problem(f"{where} {leaf}", f"vLLM cannot apply LoRA to {leaf!r} of a {model_type or 'llama-family'} "
                        "model", f"target only {', '.join(sorted(allowed))}")
                for leaf in sorted(ranks) if leaf not in allowed]
    if others:
        problems.append(Problem(f"{where} {others[0]}", f"{len(others)} tensor(s) are not LoRA matrices (e.g. DoRA "
                                "magnitudes, fully saved embeddings or trained modules); vLLM rejects them",
                                "save the adapter with save_embedding_layers=False, or serve the merged model"))
    return problems


def adapter_rank(adapter_dir: str | Path) -> int:
    """The largest LoRA rank in the adapter (config r, rank_pattern and the stored matrices)."""
    adapter_dir = Path(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    ranks, _ = _adapter_modules(adapter_dir / "adapter_model.safetensors")
    return max([int(config.get("r", 0)), *(config.get("rank_pattern") or {}).values(), *ranks.values()])


def check_vllm_lora(adapter_dir: str | Path, max_lora_rank: int | None = None,
                    architecture: str | None = None) -> list[Problem]:
    """Every reason vLLM would refuse (or mis-serve) this adapter; an empty list means it is servable.

    architecture: the base model's model_type ("llama", "mistral", "qwen2"); read from a local
    base_model_name_or_path when not given.
    """
    adapter_dir = Path(adapter_dir)
    config_path, weights = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    if not config_path.is_file() or not weights.is_file():
        missing = config_path if not config_path.is_file() else weights
        return [Problem(str(missing), "is missing", "point at a PEFT adapter folder saved by tunesmith or PEFT")]
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        return [Problem(str(config_path), f"is not valid JSON: {err}")]
    where = str(config_path)
    ranks, others = _adapter_modules(weights)
    problems = _config_problems(config, where)
    problems += _rank_problems(adapter_rank(adapter_dir), max_lora_rank, where)
    problems += _target_problems(ranks, others, _base_model_type(config, architecture), str(weights))
    return problems


def serving_rank(rank: int) -> int:
    """The smallest --max-lora-rank vLLM accepts that fits `rank`."""
    fitting = [r for r in VLLM_MAX_LORA_RANKS if r >= rank]
    if rank < 1 or not fitting:
        raise TunesmithError(f"LoRA rank {rank} cannot be served by vLLM (largest --max-lora-rank is 512)",
                             hint="retrain with r <= 512 or serve the merged model")
    return fitting[0]


def vllm_command(base: str, name: str, adapter_path: str | Path, rank: int) -> str:
    """`vllm serve BASE --enable-lora --lora-modules NAME=PATH --max-lora-rank R`, shell-quoted."""
    module = f"{name}={Path(adapter_path).resolve()}"
    return (f"vllm serve {shlex.quote(base)} --enable-lora --lora-modules {shlex.quote(module)} "
            f"--max-lora-rank {serving_rank(rank)}")


def write_vllm_readme(adapter_dir: str | Path, base: str, name: str) -> Path:
    """Add (or replace) a "Serve with vLLM" section in adapter_dir/README.md; raise if vLLM cannot serve it."""
    adapter_dir = Path(adapter_dir)
    problems = check_vllm_lora(adapter_dir)
    if problems:
        from tunesmith.errors import ProblemsError

        raise ProblemsError(problems, title="vLLM cannot serve this adapter")
    command = vllm_command(base, name, adapter_dir, adapter_rank(adapter_dir))
    section = "\n".join([
        _README_START, "## Serve with vLLM", "", "```bash", command, "```", "",
        f"Then ask for the adapter by name (`\"model\": \"{name}\"`) on the OpenAI-compatible API:", "",
        "```bash", "curl http://localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\",
        f"  -d '{{\"model\": \"{name}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}]}}'", "```",
        _README_END, ""])
    readme = adapter_dir / "README.md"
    text = readme.read_text(encoding="utf-8") if readme.is_file() else ""
    if _README_START in text:
        text = text[: text.index(_README_START)] + text[text.index(_README_END) + len(_README_END):].lstrip("\n")
    readme.write_text((text.rstrip("\n") + "\n\n" if text.strip() else "") + section, encoding="utf-8")
    return readme

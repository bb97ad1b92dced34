"""Serving a PEFT LoRA adapter with vLLM: check it against vLLM's LoRA rules, and write the command.

The rules are read from vLLM 0.33.0's source, not checked by running vLLM (it does not install on the
CPU-only machines tunesmith's tests run on): its adapter config checks (vllm/lora/peft_helper.py,
vllm/config/lora.py), its adapter loader (vllm/lora/lora_model.py, vllm/lora/utils.py) and its model
classes (vllm/model_executor/models/llama.py, mistral.py, qwen2.py):

- `--max-lora-rank` accepts only 1, 8, 16, 32, 64, 128, 256, 320 or 512, and must be >= the largest
  rank of the adapter (`r` and `rank_pattern`); so an adapter's rank can be at most 512.
- Rejected: `use_dora` ("vLLM does not yet support DoRA"), `modules_to_save` (vLLM allows only the
  `classifier` / `score` heads of classification models), `bias` other than "none", `lora_bias`, and
  initialisations that change the base weights when PEFT loads the adapter (`init_lora_weights` PiSSA,
  OLoRA, CorDA, LoftQ ...; gaussian, eva, orthogonal, mica and lora_ga are fine), aLoRA, layer
  replication, BD-LoRA and QALoRA.
- `rank_pattern` / `alpha_pattern` are honoured, with PEFT's matching rule.
- Every tensor must be a LoRA matrix (`lora_A/B.weight`, `lora_embedding_A/B`); copies of the base
  embedding (`*.embed_tokens.base_layer.weight`, `*.lm_head.base_layer.weight`) are skipped. Anything
  else (trainable-token deltas, DoRA magnitudes, fully saved modules) fails to load.
- Targets must be layers vLLM wraps: every linear projection (q/k/v/o_proj, gate/up/down_proj for
  these models); embed_tokens and lm_head only for llama (Mistral and Qwen2 declare no embedding modules).

Tool calls: vLLM turns a model's written calls into OpenAI `tool_calls` only when it is started with
`--enable-auto-tool-choice --tool-call-parser NAME`, and the parser must match the syntax the chat template
teaches (vLLM's docs, "Tool Calling"): `hermes` for `<tool_call>` blocks (Hermes, Qwen2.5), `mistral` for
`[TOOL_CALLS]`, `llama3_json` for Llama 3.1/3.2's JSON calls.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from tunesmith.errors import Problem, TunesmithError

VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
LINEAR_TARGETS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
EMBEDDING_TARGETS = {"llama": frozenset({"embed_tokens", "lm_head"}), "mistral": frozenset(), "qwen2": frozenset()}
# init_lora_weights values vLLM accepts besides booleans (peft_helper.PEFTHelper._init_is_supported)
SUPPORTED_INITS = frozenset({"gaussian", "eva", "orthogonal", "mica", "lora_ga"})
BASE_EMBEDDING_SUFFIXES = (".embed_tokens.base_layer.weight", ".lm_head.base_layer.weight")
# other PEFT features vLLM reads only to refuse them: config key -> what to say
REFUSED_FEATURES = {"lora_bias": "LoRA bias (lora_bias)", "alora_invocation_tokens": "Activated LoRA (aLoRA)",
                    "layer_replication": "layer_replication", "use_bdlora": "block-diagonal LoRA (BD-LoRA)",
                    "use_qalora": "QALoRA"}
_README_START, _README_END = "<!-- tunesmith:vllm -->", "<!-- /tunesmith:vllm -->"
# vLLM tool-call parser -> markers that all appear in a chat template teaching that call syntax
TOOL_PARSERS = (("hermes", ("<tool_call>",)), ("mistral", ("[TOOL_CALLS]",)),
                ("llama3_json", ("<|start_header_id|>", "tools", '"parameters"')))


def tool_call_parser(chat_template: str | None) -> str | None:
    """The `--tool-call-parser` vLLM needs for the calls this chat template writes; None for a template
    without tool calls (or a syntax vLLM has no parser for here)."""
    for parser, markers in TOOL_PARSERS:
        if chat_template and all(marker in chat_template for marker in markers):
            return parser
    return None


def saved_chat_template(folder: str | Path) -> str | None:
    """The chat template a saved tokenizer carries (chat_template.jinja, or tokenizer_config.json's)."""
    folder = Path(folder)
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    config = folder / "tokenizer_config.json"
    if config.is_file():
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        return template if isinstance(template, str) else None
    return None


def _base_model_type(config: dict, architecture: str | None) -> str | None:
    """model_type of the base model: given, or read from a local base_model_name_or_path."""
    if architecture:
        return architecture
    base = config.get("base_model_name_or_path")
    if base and (Path(base) / "config.json").is_file():
        return json.loads((Path(base) / "config.json").read_text()).get("model_type")
    return None


def _adapter_modules(weights: Path) -> tuple[dict[str, int], list[str]]:
    """({target leaf name: largest rank seen}, [tensor keys vLLM's loader cannot parse])."""
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
            lora = any(m in key for m in (".lora_A.", ".lora_B.", ".lora_embedding_A", ".lora_embedding_B"))
            if not lora and not key.endswith(BASE_EMBEDDING_SUFFIXES):
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
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in SUPPORTED_INITS:
        problems.append(Problem(f"{where} init_lora_weights", f"{init!r} changes the base weights when the adapter "
                                "is loaded, which vLLM does not do", "save the adapter converted to plain LoRA "
                                "(tunesmith does this for PiSSA/OLoRA runs) or serve the merged model"))
    for key, what in REFUSED_FEATURES.items():
        if config.get(key):
            problems.append(Problem(f"{where} {key}", f"vLLM does not support {what}", "serve the merged model"))
    if config.get("trainable_token_indices"):
        problems.append(Problem(f"{where} trainable_token_indices", "vLLM cannot load trainable-token deltas",
                                "serve the merged model instead"))
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
                                "magnitudes, trainable-token deltas or trained modules); vLLM's loader rejects them",
                                "serve the merged model instead"))
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


def vllm_command(base: str, name: str, adapter_path: str | Path, rank: int,
                 tool_parser: str | None = None) -> str:
    """`vllm serve BASE --enable-lora --lora-modules NAME=PATH --max-lora-rank R`, shell-quoted; with a tool
    parser, also `--enable-auto-tool-choice --tool-call-parser P`."""
    module = f"{name}={Path(adapter_path).resolve()}"
    tools = f" --enable-auto-tool-choice --tool-call-parser {tool_parser}" if tool_parser else ""
    return (f"vllm serve {shlex.quote(base)} --enable-lora --lora-modules {shlex.quote(module)} "
            f"--max-lora-rank {serving_rank(rank)}{tools}")


def _curl_example(name: str, system_prompt: str | None) -> list[str]:
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": "Hello"}]
    body = json.dumps({"model": name, "messages": messages}, ensure_ascii=False)
    return ["```bash", "curl http://localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\",
            f"  -d {shlex.quote(body)}", "```"]


def serve_command(adapter_dir: str | Path, base: str, name: str) -> str:
    """The `vllm serve` line for this adapter folder: its rank, and the tool parser of its saved chat template."""
    return vllm_command(base, name, adapter_dir, adapter_rank(adapter_dir),
                        tool_call_parser(saved_chat_template(adapter_dir)))


def _tool_note(parser: str | None) -> list[str]:
    if not parser:
        return []
    return ["", f"The chat template writes tool calls in the syntax vLLM's `{parser}` parser reads, so "
            "`--enable-auto-tool-choice --tool-call-parser " + parser + "` returns them as OpenAI `tool_calls` "
            "(send `tools` with the request, as in training)."]


def _system_note(system_prompt: str | None) -> list[str]:
    if not system_prompt:
        return []
    return ["", "Every training example carried this system message, so the model learned the task under it. "
            "vLLM adds no system message of its own: send it as the first message of every request, as below.",
            "", "```text", system_prompt, "```"]


def write_vllm_readme(adapter_dir: str | Path, base: str, name: str, system_prompt: str | None = None) -> Path:
    """Add (or replace) a "Serve with vLLM" section in adapter_dir/README.md; raise if vLLM cannot serve it.
    system_prompt: the system message the run trained with; the section says to send it and its example does."""
    adapter_dir = Path(adapter_dir)
    problems = check_vllm_lora(adapter_dir)
    if problems:
        from tunesmith.errors import ProblemsError

        raise ProblemsError(problems, title="vLLM cannot serve this adapter")
    parser = tool_call_parser(saved_chat_template(adapter_dir))
    command = serve_command(adapter_dir, base, name)
    section = "\n".join([
        _README_START, "## Serve with vLLM", "", "```bash", command, "```", *_tool_note(parser),
        *_system_note(system_prompt), "",
        f"Then ask for the adapter by name (`\"model\": \"{name}\"`) on the OpenAI-compatible API:", "",
        *_curl_example(name, system_prompt), _README_END, ""])
    readme = adapter_dir / "README.md"
    text = readme.read_text(encoding="utf-8") if readme.is_file() else ""
    if _README_START in text:
        text = text[: text.index(_README_START)] + text[text.index(_README_END) + len(_README_END):].lstrip("\n")
    readme.write_text((text.rstrip("\n") + "\n\n" if text.strip() else "") + section, encoding="utf-8")
    return readme

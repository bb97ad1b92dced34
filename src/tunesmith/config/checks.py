"""Checks that involve several config fields or stages. `config.load.validated` runs them after the
schema, so every problem is reported at once, each with its YAML path and a hint."""

from __future__ import annotations

from pydantic import ValidationError

from ..errors import Problem
from .problems import problems_from
from .schema import (
    METHOD_ARGS,
    AdapterConfig,
    DataConfig,
    MethodConfig,
    RunConfig,
    TrainConfig,
    stage_config,
    stage_method_args,
)

# Input embeddings and output heads as transformers names them (Llama/Mistral/Qwen/Gemma/Phi, GPT-2, GPT-NeoX).
EMBEDDING_NAMES = {"embed_tokens", "lm_head", "wte", "embed_in", "embed_out", "word_embeddings", "tok_embeddings"}
QUANTISED_NAMES = {"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "dense", "gate_proj", "up_proj",
                   "down_proj", "gate_up_proj", "fc1", "fc2"}


def cross_check(cfg: RunConfig) -> list[Problem]:
    """Every problem that involves several fields, not just the first."""
    p = run_problems(cfg) + adapter_problems(cfg.adapter) + document_problems(cfg)
    p += stages_problems(cfg) if cfg.stages else method_problems(cfg)
    return p


def run_problems(cfg: RunConfig) -> list[Problem]:
    p: list[Problem] = []
    a = cfg.adapter
    if a.kind == "qlora" and cfg.precision == "fp16" and cfg.device == "cpu":
        p.append(Problem("precision", "fp16 compute is not supported on CPU", "use precision: auto, bf16 or fp32"))
    if not cfg.stages and cfg.data.train is None:
        p.append(Problem("data.train", "no training data given",
                         "set data.train to a file, folder or hub dataset id, e.g. data.train: train.jsonl"))
    if cfg.data.eval is not None and cfg.data.eval_split > 0:
        p.append(Problem("data.eval_split", "both data.eval and data.eval_split are set",
                         "use one: an explicit eval file, or a fraction split off the training data"))
    if cfg.eval is not None and cfg.eval.data is None and cfg.data.eval is None and cfg.data.eval_split == 0:
        p.append(Problem("eval.data", "an eval section needs held-out data",
                         "set eval.data, data.eval or data.eval_split"))
    return p


def stages_problems(cfg: RunConfig) -> list[Problem]:
    """Each stage validated with the same sections as the top level, and its settings checked against its
    method; top-level method_args that no stage reads are errors too."""
    p: list[Problem] = []
    defaults = MethodConfig()
    for i, st in enumerate(cfg.stages):
        at = f"stages[{i}]"
        if isinstance(st.data, DataConfig) and st.data.train is None:
            p.append(Problem(f"{at}.data.train", "no training data given for this stage",
                             "set the stage's data: to a file or a data section"))
        p += stage_section_problems(i, st.train, st.method_args, cfg.train.model_dump(exclude_unset=True))
        own = {k for k, v in stage_method_args(st).items() if getattr(defaults, k, object()) != v}
        p += ignored_args(st.method, own, f"{at}.")
        p += kto_problems(st.method, st.train.get("micro_batch_size", cfg.train.micro_batch_size), f"{at}.")
        try:
            p += online_problems(stage_config(cfg, i), f"{at}.")
        except ValidationError:
            pass  # the stage's own sections are invalid: stage_section_problems reports them
    used = set().union(*(METHOD_ARGS[st.method] for st in cfg.stages))
    for key in sorted(changed_args(cfg.method_args) - used):
        p.append(Problem(f"method_args.{key}", f"no stage's method uses {key} "
                         f"({', '.join(st.method for st in cfg.stages)})", "remove it, or set it in the stage "
                         "that needs it (stages[i].method_args)"))
    return p


def stage_section_problems(i: int, train: object, method_args: object, top_train: dict | None = None
                           ) -> list[Problem]:
    """A stage's `train` and `method_args` mappings validated as TrainConfig / MethodConfig. Also run on the
    raw config when the schema itself failed, so a stage's problems are listed with everything else."""
    p: list[Problem] = []
    for key, value, section, base in (("train", train, TrainConfig, top_train or {}),
                                      ("method_args", method_args, MethodConfig, {})):
        if not isinstance(value, dict):
            continue  # not a mapping: the schema reports it
        try:
            section.model_validate({**base, **value})
        except ValidationError as e:
            p += problems_from(e, section, f"stages[{i}].{key}")
    return p


def changed_args(args: MethodConfig) -> set[str]:
    """The method_args that differ from their defaults (a config written back with every default in it
    sets nothing)."""
    defaults = MethodConfig()
    return {k for k in MethodConfig.model_fields if getattr(args, k) != getattr(defaults, k)}


def method_problems(cfg: RunConfig) -> list[Problem]:
    return (ignored_args(cfg.method, changed_args(cfg.method_args), "")
            + kto_problems(cfg.method, cfg.train.micro_batch_size, "") + online_problems(cfg, ""))


# The syntax of each reward spec (methods/rewards.py builds them): kind -> (argument, example, required?)
REWARD_SYNTAX = {"json_schema": ("FILE", "json_schema:schema.json", True), "regex": ("PATTERN", "regex:\\d+", True),
                 "exact": (None, "exact", False), "choice": ("LABELS.json", "choice:labels.json", False),
                 "f1": (None, "f1", False), "length": ("N", "length:200", True), "think": ("TAG", "think", False),
                 "python": ("MODULE:FUNCTION", "python:my_rewards:score", True),
                 "judge": ("URL#MODEL", "judge:http://localhost:8000/v1#grader", True)}


def online_problems(cfg: RunConfig, at: str) -> list[Problem]:
    """GRPO's settings: rewards that parse, groups that can be compared, room left for the answers."""
    a = cfg.method_args
    if cfg.method != "grpo":
        if a.beta == 0:
            return [Problem(f"{at}method_args.beta", f"beta 0 removes {cfg.method}'s objective",
                            "use a positive beta, or leave it unset for the method's default")]
        return []
    p = [reward_problem(r.reward, f"{at}method_args.rewards[{i}]") for i, r in enumerate(a.rewards)]
    p = [x for x in p if x is not None]
    if not a.rewards:
        p.append(Problem(f"{at}method_args.rewards", "grpo needs at least one reward function",
                         "e.g. method_args.rewards: [json_schema:schema.json, exact] (docs/grpo.md lists them)"))
    if a.group_size < 2:
        p.append(Problem(f"{at}method_args.group_size", f"a group of {a.group_size} completion per prompt: GRPO "
                         "scores each completion against the others of its group, so one alone always has "
                         "advantage 0 and nothing is learned", "use 2 or more (8 is common)"))
    if a.max_new_tokens >= cfg.data.max_length:
        p.append(Problem(f"{at}method_args.max_new_tokens", f"{a.max_new_tokens} leaves no room for the prompt "
                         f"within data.max_length {cfg.data.max_length}",
                         "lower max_new_tokens or raise data.max_length (prompt + answer must fit)"))
    return p


def reward_problem(spec: str, where: str) -> Problem | None:
    kind, sep, arg = spec.partition(":")
    if kind not in REWARD_SYNTAX:
        return Problem(where, f"unknown reward '{spec}'", f"rewards are {', '.join(REWARD_SYNTAX)}")
    name, example, required = REWARD_SYNTAX[kind]
    if name is None and sep:
        return Problem(where, f"'{kind}' takes no argument", f"write {example}")
    if required and not arg:
        return Problem(where, f"'{kind}' needs {name}", f"e.g. {example}")
    if kind == "length" and not arg.isdigit():
        return Problem(where, f"length:{arg}: N must be a whole number of tokens", f"e.g. {example}")
    if kind == "python" and ":" not in arg:
        return Problem(where, f"python:{arg} names no function", f"e.g. {example}")
    if kind == "judge" and ("#" not in arg or not arg.startswith(("http://", "https://"))):
        return Problem(where, f"judge:{arg} is not URL#MODEL", f"e.g. {example}")
    return None


def ignored_args(method: str, keys: set[str], at: str) -> list[Problem]:
    """method_args the method does not read: they would silently do nothing."""
    p = []
    for key in sorted(keys & set(MethodConfig.model_fields) - METHOD_ARGS[method]):
        hint = ("ORPO's weight is method_args.orpo_lambda; remove beta" if (method, key) == ("orpo", "beta")
                else f"{method} reads {', '.join(sorted(METHOD_ARGS[method])) or 'no method_args'}; remove it")
        p.append(Problem(f"{at}method_args.{key}", f"{key} does not apply to {method}", hint))
    return p


def kto_problems(method: str, micro_batch_size: object, at: str) -> list[Problem]:
    if method == "kto" and isinstance(micro_batch_size, int) and micro_batch_size < 2:
        return [Problem(f"{at}train.micro_batch_size", "KTO needs at least 2 examples per micro-batch: its KL "
                        "reference point pairs each prompt with another example's completion",
                        "set train.micro_batch_size: 2 or more")]
    return []


def document_problems(cfg: RunConfig) -> list[Problem]:
    """Settings for documents (method: cpt) that cannot work, or that a single-stage run of another method
    would ignore."""
    p: list[Problem] = []
    d = cfg.data
    if d.window_overlap >= d.max_length - 1:
        p.append(Problem("data.window_overlap", f"must be below data.max_length - 1 ({d.max_length - 1})",
                         "a window must move on by at least one token; e.g. data.window_overlap: 64"))
    if not cfg.stages and cfg.method != "cpt":
        for key, is_set in (("window_overlap", d.window_overlap > 0), ("cross_document", d.cross_document)):
            if is_set:
                p.append(Problem(f"data.{key}", f"applies to documents (method: cpt), not to method {cfg.method}",
                                 f"remove data.{key} or use method: cpt"))
    return p


def adapter_problems(a: AdapterConfig) -> list[Problem]:
    """Adapter settings that cannot work together."""
    p: list[Problem] = []
    trains_embeddings = a.kind == "full" or any(n.split(".")[-1] in EMBEDDING_NAMES for n in a.modules_to_save)
    if a.embedding_lr is not None and not trains_embeddings:
        p.append(Problem("adapter.embedding_lr", "nothing trains the input embedding or output head",
                         "add them to adapter.modules_to_save (e.g. [embed_tokens, lm_head]) or use adapter.kind: "
                         "full; otherwise remove adapter.embedding_lr"))
    if a.kind == "full":
        lora_only = {"use_dora": a.use_dora, "use_rslora": a.use_rslora, "modules_to_save": a.modules_to_save,
                     "dropout": a.dropout > 0, "target": a.target != "all-linear",
                     "init": a.init in ("pissa", "olora"), "lora_plus_ratio": a.lora_plus_ratio}
        for key, is_set in lora_only.items():
            if is_set:
                p.append(Problem(f"adapter.{key}", "applies to LoRA adapters; full fine-tuning trains every "
                                 "parameter", f"remove adapter.{key} or choose a LoRA adapter kind"))
        if a.from_adapter:
            p.append(Problem("adapter.from_adapter", "full fine-tuning cannot start from a LoRA adapter",
                             "merge the adapter first (tunesmith merge) and use the merged folder as model:"))
    if a.from_adapter and a.init != "default":
        p.append(Problem("adapter.init", "adapter.init only applies to new adapters; from_adapter continues a "
                         "trained one", "remove adapter.init or adapter.from_adapter"))
    if a.dora and a.init in ("pissa", "olora"):
        p.append(Problem("adapter.init", f"'{a.init}' with DoRA is not supported", "use adapter.init: default"))
    if a.kind == "qlora":
        p += qlora_problems(a)
    elif a.quantize_embeddings is not None:
        p.append(Problem("adapter.quantize_embeddings", f"applies to qlora only; adapter.kind {a.kind} keeps every "
                         "base weight in the run's precision", "remove adapter.quantize_embeddings or use adapter.kind: qlora"))
    return p


def qlora_problems(a: AdapterConfig) -> list[Problem]:
    p: list[Problem] = []
    if a.init in ("pissa", "olora"):
        p.append(Problem("adapter.init", f"'{a.init}' rewrites the base weights, which QLoRA keeps in 4-bit",
                         "use adapter.init: default with qlora"))
    for name in a.modules_to_save:
        if name.split(".")[-1] in QUANTISED_NAMES:
            p.append(Problem("adapter.modules_to_save", f"'{name}' is a linear layer that QLoRA stores in 4-bit; "
                             "it cannot be trained in full", "list it in adapter.target to train it with LoRA"))
        elif a.embeddings_in_4bit and name.split(".")[-1] in EMBEDDING_NAMES:
            p.append(Problem("adapter.modules_to_save", f"'{name}' is stored in 4-bit (adapter.quantize_embeddings "
                             "is on by default for qlora) and cannot be trained in full",
                             "set adapter.quantize_embeddings: false to train it (it then stays bf16)"))
    return p


__all__ = ["EMBEDDING_NAMES", "cross_check"]

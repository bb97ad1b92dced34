"""Checks that involve several config fields. They run inside RunConfig's validation, so their problems are
reported together with the field errors, each with its YAML path and a hint."""

from __future__ import annotations

from .config import (
    PREFERENCE_METHODS,
    REFERENCE_METHODS,
    AdapterConfig,
    DataConfig,
    MethodConfig,
    RunConfig,
    TrainConfig,
    _suggest,
)
from .errors import Problem


def cross_check(cfg: RunConfig) -> list[Problem]:
    """Checks that involve several fields. Returns every problem, not just the first."""
    p: list[Problem] = []
    a = cfg.adapter
    if a.kind == "full" and a.init in ("pissa", "olora"):
        p.append(Problem("adapter.init", f"'{a.init}' initialises LoRA adapters; full fine-tuning has none",
                         "remove adapter.init or choose a LoRA adapter kind"))
    if a.kind == "full" and a.lora_plus_ratio:
        p.append(Problem("adapter.lora_plus_ratio", "LoRA+ needs LoRA adapters; full fine-tuning has none",
                         "remove adapter.lora_plus_ratio"))
    if a.kind == "qlora" and a.init in ("pissa", "olora"):
        p.append(Problem("adapter.init", f"'{a.init}' rewrites the base weights, which QLoRA keeps in 4-bit",
                         "use adapter.init: default with qlora"))
    if a.kind == "qlora" and cfg.precision == "fp16" and cfg.device == "cpu":
        p.append(Problem("precision", "fp16 compute is not supported on CPU", "use precision: bf16 or fp32"))
    if cfg.train.optimizer == "adamw_8bit" and cfg.device == "cpu":
        p.append(Problem("train.optimizer", "8-bit AdamW needs a CUDA device", "use train.optimizer: adamw on CPU"))
    if not cfg.stages and cfg.data.train is None:
        p.append(Problem("data.train", "no training data given",
                         "set data.train to a file, folder or hub dataset id, e.g. data.train: train.jsonl"))
    if cfg.data.eval is not None and cfg.data.eval_split > 0:
        p.append(Problem("data.eval_split", "both data.eval and data.eval_split are set",
                         "use one: an explicit eval file, or a fraction split off the training data"))
    for i, st in enumerate(cfg.stages):
        if st.method in REFERENCE_METHODS | PREFERENCE_METHODS | {"kto"} and i == 0 and cfg.adapter.from_adapter is None:
            pass  # a preference stage first is allowed: the reference is the base model
        if isinstance(st.data, DataConfig) and st.data.train is None:
            p.append(Problem(f"stages[{i}].data.train", "no training data given for this stage",
                             "set the stage's data: to a file or a data section"))
        unknown = set(st.train) - set(TrainConfig.model_fields)
        for k in sorted(unknown):
            p.append(Problem(f"stages[{i}].train.{k}", "unknown key", _suggest(k, TrainConfig.model_fields)))
    p += method_problems(cfg)
    p += adapter_problems(a)
    p += document_problems(cfg)
    if cfg.eval is not None and cfg.eval.data is None and cfg.data.eval is None and cfg.data.eval_split == 0:
        p.append(Problem("eval.data", "an eval section needs held-out data",
                         "set eval.data, data.eval or data.eval_split"))
    return p


SMOOTHED_METHODS = {"dpo", "simpo"}


def method_problems(cfg: RunConfig) -> list[Problem]:
    """Method settings that the chosen method(s) cannot use: KTO's micro-batch, unused beta / smoothing."""
    p: list[Problem] = []
    runs = [("", cfg.method, cfg.train.micro_batch_size, cfg.method_args.beta, cfg.method_args.model_dump())]
    if cfg.stages:
        runs = []
        for i, st in enumerate(cfg.stages):
            # only what the stage itself sets: top-level method_args may be meant for another stage
            beta = st.beta if st.beta is not None else st.method_args.get("beta")
            mbs = st.train.get("micro_batch_size", cfg.train.micro_batch_size)
            runs.append((f"stages[{i}].", st.method, mbs, beta, st.method_args))
            for k in sorted(set(st.method_args) - set(MethodConfig.model_fields)):
                p.append(Problem(f"stages[{i}].method_args.{k}", "unknown key", _suggest(k, MethodConfig.model_fields)))
    for at, method, mbs, beta, margs in runs:
        if method == "kto" and isinstance(mbs, int) and mbs < 2:
            p.append(Problem(f"{at}train.micro_batch_size", "KTO needs at least 2 examples per micro-batch: its "
                             "KL reference point pairs each prompt with another example's completion",
                             "set train.micro_batch_size: 2 or more"))
        if method == "orpo" and beta is not None:
            p.append(Problem(f"{at}method_args.beta" if at == "" else f"{at}beta", "ORPO has no beta",
                             "ORPO's weight is method_args.orpo_lambda; remove beta"))
        smoothing = margs.get("label_smoothing") or 0
        if smoothing and method not in SMOOTHED_METHODS:
            p.append(Problem(f"{at}method_args.label_smoothing", f"label_smoothing does not apply to {method}",
                             "it is used by dpo (conservative DPO) and simpo; remove it"))
    return p


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
    """Adapter settings that cannot work together (beyond those checked in cross_check)."""
    p: list[Problem] = []
    if a.kind == "full":
        lora_only = {"use_dora": a.use_dora, "use_rslora": a.use_rslora, "modules_to_save": a.modules_to_save,
                     "dropout": a.dropout > 0, "target": a.target != "all-linear"}
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
    trains_embeddings = a.kind == "full" or any(n.split(".")[-1] in EMBEDDING_NAMES for n in a.modules_to_save)
    if a.embedding_lr is not None and not trains_embeddings:
        p.append(Problem("adapter.embedding_lr", "nothing trains the input embedding or output head",
                         "add them to adapter.modules_to_save (e.g. [embed_tokens, lm_head]) or use adapter.kind: "
                         "full; otherwise remove adapter.embedding_lr"))
    if (a.kind == "dora" or a.use_dora) and a.init in ("pissa", "olora"):
        p.append(Problem("adapter.init", f"'{a.init}' with DoRA is not supported", "use adapter.init: default"))
    quantised_names = {"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "dense", "gate_proj", "up_proj",
                       "down_proj", "gate_up_proj", "fc1", "fc2"}
    if a.kind == "qlora":
        for name in a.modules_to_save:
            if name.split(".")[-1] in quantised_names:
                p.append(Problem("adapter.modules_to_save", f"'{name}' is a linear layer that QLoRA stores in 4-bit; "
                                 "it cannot be trained in full", "list it in adapter.target to train it with LoRA"))
            elif a.embeddings_in_4bit and name.split(".")[-1] in EMBEDDING_NAMES:
                p.append(Problem("adapter.modules_to_save", f"'{name}' is stored in 4-bit (adapter.quantize_embeddings "
                                 "is on by default for qlora) and cannot be trained in full",
                                 "set adapter.quantize_embeddings: false to train it (it then stays bf16)"))
    elif a.quantize_embeddings is not None:
        p.append(Problem("adapter.quantize_embeddings", f"applies to qlora only; adapter.kind {a.kind} keeps every "
                         "base weight in the run's precision", "remove adapter.quantize_embeddings or use adapter.kind: qlora"))
    return p


# Input embeddings and output heads as transformers names them (Llama/Mistral/Qwen/Gemma/Phi, GPT-2, GPT-NeoX).
EMBEDDING_NAMES = {"embed_tokens", "lm_head", "wte", "embed_in", "embed_out", "word_embeddings", "tok_embeddings"}

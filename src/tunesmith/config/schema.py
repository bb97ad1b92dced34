"""The typed schema for a run: one pydantic section per component, extra keys forbidden."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Method = Literal["sft", "dpo", "ipo", "orpo", "kto", "simpo", "cpt", "grpo"]
AdapterKind = Literal["lora", "rslora", "dora", "qlora", "full"]
Tracker = Literal["tensorboard", "mlflow", "wandb", "trackio"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    train: str | list[str] | None = None
    eval: str | list[str] | None = None
    eval_split: float = Field(0.0, ge=0.0, lt=1.0)
    format: Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion", "preference",
                    "preference_implicit", "hh_rlhf", "kto", "text", "prompt"] = "auto"
    columns: dict[str, str] = Field(default_factory=dict)
    split: str | None = None  # hub datasets: which split
    max_length: int = Field(1024, ge=8)
    truncation: Literal["right", "left", "drop"] = "right"
    train_on: Literal["all_assistant", "last_assistant"] = "all_assistant"
    system_prompt: str | None = None
    skip_invalid: bool = False
    max_examples: int | None = Field(None, ge=1)
    # documents (method: cpt): tokens a window repeats from the one before as context (docs/data.md)
    window_overlap: int = Field(0, ge=0)
    cross_document: bool = False  # documents: one stream cut into windows, attention across documents


class AdapterConfig(Section):
    kind: AdapterKind = "lora"
    r: int = Field(16, ge=1)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target: str | list[str] = "all-linear"  # all-linear | attention | mlp | [names]
    modules_to_save: list[str] = Field(default_factory=list)
    lora_plus_ratio: float | None = Field(None, gt=0)  # LoRA+: lr of B = ratio * lr
    init: Literal["default", "gaussian", "pissa", "olora"] = "default"
    double_quant: bool = True  # QLoRA
    # QLoRA: also store the input embedding and output head in NF4. None (unset) = on for qlora.
    quantize_embeddings: bool | None = None
    from_adapter: str | None = None  # start from an existing adapter dir (e.g. an SFT run)
    use_dora: bool = False  # DoRA magnitudes on top of lora/rslora/qlora (kind: dora is lora + this)
    use_rslora: bool = False  # rank-stabilised scale alpha/sqrt(r) on top of lora/dora/qlora
    # learning rate of a trained input embedding / output head (modules_to_save or full); None = train.lr
    embedding_lr: float | None = Field(None, gt=0)

    @property
    def dora(self) -> bool:
        """DoRA magnitudes: `kind: dora`, or `use_dora` on another LoRA kind."""
        return self.kind == "dora" or self.use_dora

    @property
    def rslora(self) -> bool:
        """Rank-stabilised scale alpha / sqrt(r): `kind: rslora`, or `use_rslora` on another LoRA kind."""
        return self.kind == "rslora" or self.use_rslora

    @property
    def embeddings_in_4bit(self) -> bool:
        """Whether the base's embedding and output head are stored in NF4: qlora, unless switched off."""
        return self.kind == "qlora" and self.quantize_embeddings is not False


class RewardConfig(Section):
    """One reward of an online method (methods/rewards.py lists the specs)."""

    reward: str  # json_schema:FILE | regex:PATTERN | exact | choice[:LABELS] | f1 | length:N | think[:TAG] |
    # python:MODULE:FUNCTION | judge:URL#MODEL
    weight: float = 1.0
    reference: str | None = None  # the data column reference-based rewards compare with (default: the answer)
    name: str | None = None  # its name in the metrics (default: the spec's kind)


class MethodConfig(Section):
    # None: the method's own default (methods/preference.py, methods/grpo.py); 0 is only valid for grpo
    beta: float | None = Field(None, ge=0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)
    orpo_lambda: float = Field(0.1, gt=0)
    simpo_gamma: float = Field(0.5, ge=0)
    kto_desirable_weight: float = Field(1.0, gt=0)
    kto_undesirable_weight: float = Field(1.0, gt=0)
    # weight of the chosen answer's per-token NLL added to a preference loss (RPO; TRL's rpo_alpha)
    sft_weight: float = Field(0.0, ge=0)
    dpop_lambda: float = Field(0.0, ge=0)  # DPO-Positive: penalise the chosen log-prob falling below the reference
    # precomputed: one pass before training, cached on disk; live: computed each step (no cache, no pre-pass)
    reference: Literal["precomputed", "live"] = "precomputed"
    reference_cache: bool = True
    # paired methods: compute the prompt that chosen and rejected share once (exact; off = two full sequences)
    share_prompt: bool = True
    # grpo (docs/grpo.md): rewards, and G completions per prompt sampled with these settings
    rewards: list[RewardConfig] = Field(default_factory=list)
    group_size: int = Field(8, ge=1)
    max_new_tokens: int = Field(256, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    loss_type: Literal["grpo", "dr_grpo", "dapo"] = "dapo"
    epsilon: float = Field(0.2, gt=0, lt=1)  # the clip range [1 - epsilon, 1 + epsilon_high]
    epsilon_high: float | None = Field(None, gt=0)  # None: epsilon; larger: DAPO's clip-higher
    scale_rewards: Literal["group", "batch", "none"] = "group"
    iterations: int = Field(1, ge=1)  # optimizer steps on each sampled batch
    # completions sampled as one batch: a step's prompts go together, sample_rows // group_size of them (at
    # least a micro-batch); decoding reads every weight once per token, whatever the rows
    sample_rows: int = Field(64, ge=1)

    @field_validator("rewards", mode="before")
    @classmethod
    def _reward_shorthand(cls, v: Any) -> Any:
        return [{"reward": x} if isinstance(x, str) else x for x in v] if isinstance(v, list) else v


_REFERENCE_KEYS = {"reference", "reference_cache"}
# The method_args each method reads; setting any other one is an error (it would be silently ignored).
METHOD_ARGS: dict[str, set[str]] = {
    "sft": set(),
    "cpt": set(),
    "dpo": {"beta", "label_smoothing", "sft_weight", "dpop_lambda", "share_prompt"} | _REFERENCE_KEYS,
    "ipo": {"beta", "sft_weight", "share_prompt"} | _REFERENCE_KEYS,
    "orpo": {"orpo_lambda", "share_prompt"},
    "simpo": {"beta", "simpo_gamma", "label_smoothing", "sft_weight", "share_prompt"},
    "kto": {"beta", "kto_desirable_weight", "kto_undesirable_weight"} | _REFERENCE_KEYS,
    "grpo": {"beta", "share_prompt", "rewards", "group_size", "max_new_tokens", "temperature", "top_p", "top_k", "loss_type",
             "epsilon", "epsilon_high", "scale_rewards", "iterations", "sample_rows"},
}


class TrainConfig(Section):
    lr: float = Field(2e-4, gt=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1)
    micro_batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0.0, le=1.0)
    warmup_steps: int | None = Field(None, ge=0)
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    seed: int = 0
    packing: bool = True
    pack_length: int | None = Field(None, ge=8)
    group_by_length: bool = True
    logits_chunk: int = Field(1024, ge=1)
    grad_checkpointing: bool = False
    compile: bool = False
    fused: bool = True  # model/fused.py: RMSNorm, SwiGLU and CPU attention that save less for backward
    # model/attention.py: auto = a variable-length flash kernel on CUDA (else SDPA with the mask), the matmul
    # attention for short CPU rows; varlen = that kernel or an error; sdpa = always SDPA with the 4D mask
    attention: Literal["auto", "varlen", "sdpa"] = "auto"
    liger: bool = True  # a trained LM head on CUDA uses liger-kernel's fused linear cross-entropy if installed
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit"] = "adamw"
    eval_every: int | None = Field(None, ge=1)
    save_every: int | None = Field(None, ge=1)
    keep_last: int = Field(2, ge=1)
    skip_nonfinite: int = Field(0, ge=0)
    # several processes (torchrun): auto = DDP when a full replica fits on each device, FSDP2 otherwise
    parallel: Literal["auto", "ddp", "fsdp"] = "auto"
    fsdp_cpu_offload: bool = False  # FSDP2: keep parameters, gradients and optimizer state in CPU memory
    # examples (pairs) per optimizer step over all processes; sets grad_accum = global / (micro x processes)
    global_batch_size: int | None = Field(None, ge=1)
    dist_timeout_s: float = Field(600.0, gt=0)  # how long a collective waits for a rank that stopped
    ignore_plan: bool = False  # train even when `tunesmith plan` says the run cannot fit its device
    report_to: list[Tracker] = Field(default_factory=list)  # experiment trackers (train/trackers.py)

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_tracker(cls, v: Any) -> Any:
        return [] if v in (None, "none") else [v] if isinstance(v, str) else v


class EvalConfig(Section):
    """Every setting of the comparison eval, in one place: a config's `eval:` section, `tunesmith eval`'s
    flags and `tunesmith.evaluate(...)` all build this."""

    data: str | None = None  # held-out examples (in a run config: else data.eval or the eval split)
    candidates: list[str] = Field(default_factory=lambda: ["base", "base+fewshot:5", "tuned"])
    metrics: list[str] = Field(default_factory=lambda: ["exact"])
    max_new_tokens: int | Literal["auto"] = "auto"  # auto: the longest reference's tokens plus a margin
    batch_size: int = Field(16, ge=1)
    max_examples: int | None = Field(None, ge=1)  # a seeded random sample of this many, kept in file order
    sample_seed: int = 0
    fewshot_seed: int = 0
    require_win: bool = False  # fail unless every tuned candidate beats every baseline
    require_worth: bool = False  # fail unless the best fine-tune beats the best rung without fine-tuning
    judge: str | None = None
    regression: str | None = None
    base: str | None = None  # the base model (default: the runs' own)
    train_data: str | None = None  # where shots, labels and retrieval come from (default: the run's)
    data_format: str = "auto"
    docs: str | None = None  # a folder of documents for +docs:K
    system_prompt: str | None = None  # for prompts without one (default: the run's data.system_prompt)
    by_stage: bool = True  # a multi-stage run is evaluated stage by stage, each against the one before
    prices: str | None = None  # a price table overriding entries of the shipped one
    device_price: str | None = None  # the price table's device the local candidates are priced as
    embedder: str | None = None  # embedding model for :embed retrieval (default: the base model)
    resume: bool = False  # reuse the answers an earlier, interrupted eval kept in <out>/answers
    out: str | None = None
    device: Literal["auto", "cpu", "cuda", "mps"] | None = None  # None: the run's device, else auto
    precision: Literal["auto", "bf16", "fp16", "fp32"] | None = None
    endpoint_concurrency: int = Field(4, ge=1)  # requests in flight per endpoint
    endpoint_rate_limit: float | None = Field(None, gt=0)  # requests per minute per endpoint
    endpoint_retries: int = Field(4, ge=0)
    endpoint_timeout: float = Field(60.0, gt=0)  # seconds per request

    @field_validator("max_new_tokens")
    @classmethod
    def _positive_limit(cls, v: Any) -> Any:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be at least 1, or auto")
        return v


class StageConfig(Section):
    """One stage of a multi-stage run; unset fields inherit from the run's top-level config."""

    name: str | None = None
    method: Method = "sft"
    data: DataConfig | str | None = None
    train: dict[str, Any] = Field(default_factory=dict)
    beta: float | None = Field(None, gt=0)
    method_args: dict[str, Any] = Field(default_factory=dict)


class RunConfig(Section):
    name: str = "run"
    output_dir: str = "runs"
    model: str = "default"
    revision: str | None = None
    trust_remote_code: bool = False
    allow_pickle_weights: bool = False  # also load a base model whose weights are pickle (*.bin) files
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    threads: Literal["auto"] | int = "auto"  # CPU threads for torch: auto = measured once per machine
    method: Method = "sft"
    data: DataConfig = Field(default_factory=DataConfig)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    method_args: MethodConfig = Field(default_factory=MethodConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig | None = None
    stages: list[StageConfig] = Field(default_factory=list)

    @field_validator("adapter", mode="before")
    @classmethod
    def _adapter_shorthand(cls, v: Any) -> Any:
        return {"kind": v} if isinstance(v, str) else v

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


def stage_config(cfg: RunConfig, i: int) -> RunConfig:
    """Stage i of `stages:` as a full RunConfig: what the stage sets over the top level. The stage's `train`
    and `method_args` are validated with the same sections as the top level (pydantic ValidationError)."""
    st = cfg.stages[i]
    data = cfg.data
    if isinstance(st.data, str):
        data = cfg.data.model_copy(update={"train": st.data, "eval": None})
    elif isinstance(st.data, DataConfig):
        data = st.data
    train = TrainConfig.model_validate({**cfg.train.model_dump(exclude_unset=True), **st.train})
    margs = MethodConfig.model_validate({**cfg.method_args.model_dump(exclude_unset=True), **stage_method_args(st)})
    return cfg.model_copy(update={"method": st.method, "data": data, "train": train, "method_args": margs,
                                  "stages": []})


def stage_method_args(st: StageConfig) -> dict[str, Any]:
    """The method_args a stage sets itself (`beta:` is a shorthand for `method_args.beta`)."""
    return {**st.method_args, **({"beta": st.beta} if st.beta is not None else {})}

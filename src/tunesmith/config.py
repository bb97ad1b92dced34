"""The typed schema for a run: YAML in, `--set a.b=c` overrides, one validation pass that reports every
problem at once with its YAML path and a hint."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError, Problem

Method = Literal["sft", "dpo", "ipo", "orpo", "kto", "simpo"]
AdapterKind = Literal["lora", "rslora", "dora", "qlora", "full"]
PREFERENCE_METHODS = {"dpo", "ipo", "orpo", "simpo"}
REFERENCE_METHODS = {"dpo", "ipo", "kto"}
Tracker = Literal["tensorboard", "mlflow", "wandb", "trackio"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    train: str | list[str] | None = None
    eval: str | list[str] | None = None
    eval_split: float = Field(0.0, ge=0.0, lt=1.0)
    format: Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion", "preference",
                    "preference_implicit", "hh_rlhf", "kto"] = "auto"
    columns: dict[str, str] = Field(default_factory=dict)
    split: str | None = None  # hub datasets: which split
    max_length: int = Field(1024, ge=8)
    truncation: Literal["right", "left", "drop"] = "right"
    train_on: Literal["all_assistant", "last_assistant"] = "all_assistant"
    system_prompt: str | None = None
    skip_invalid: bool = False
    max_examples: int | None = Field(None, ge=1)


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

    @property
    def embeddings_in_4bit(self) -> bool:
        """Whether the base's embedding and output head are stored in NF4: qlora, unless switched off."""
        return self.kind == "qlora" and self.quantize_embeddings is not False


class MethodConfig(Section):
    # None: the method's own default (SimPO 2.0, DPO/IPO/KTO 0.1; ORPO uses orpo_lambda instead)
    beta: float | None = Field(None, gt=0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)
    orpo_lambda: float = Field(0.1, gt=0)
    simpo_gamma: float = Field(0.5, ge=0)
    kto_desirable_weight: float = Field(1.0, gt=0)
    kto_undesirable_weight: float = Field(1.0, gt=0)
    reference_cache: bool = True
    # paired methods: compute the prompt that chosen and rejected share once (exact; off = two full sequences)
    share_prompt: bool = True


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
    optimizer: Literal["adamw", "adamw_8bit"] = "adamw"
    eval_every: int | None = Field(None, ge=1)
    save_every: int | None = Field(None, ge=1)
    keep_last: int = Field(2, ge=1)
    skip_nonfinite: int = Field(0, ge=0)
    report_to: list[Tracker] = Field(default_factory=list)  # experiment trackers (train/trackers.py)

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_tracker(cls, v: Any) -> Any:
        return [] if v in (None, "none") else [v] if isinstance(v, str) else v


class EvalConfig(Section):
    data: str | None = None
    candidates: list[str] = Field(default_factory=lambda: ["base", "base+fewshot:5", "tuned"])
    metrics: list[str] = Field(default_factory=lambda: ["exact"])
    max_new_tokens: int = Field(64, ge=1)
    batch_size: int = Field(16, ge=1)
    max_examples: int | None = Field(None, ge=1)
    fewshot_seed: int = 0
    require_win: bool = False
    judge: str | None = None
    regression: str | None = None


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

    @model_validator(mode="after")
    def _cross_checks(self) -> RunConfig:
        from .config_checks import cross_check  # the checks need the finished classes

        problems = cross_check(self)
        if problems:
            # Raised as a ValueError so pydantic reports it next to any field errors.
            raise ValueError("\x00".join(f"{p.where}\x01{p.what}\x01{p.hint or ''}" for p in problems))
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


def _suggest(key: str, options: Any) -> str:
    import difflib

    close = difflib.get_close_matches(key, list(options), n=1)
    return f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(sorted(options))}"


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "list[str]", "DataConfig", "literal['sft']"):
            continue  # union branch names pydantic adds to locations
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _problems_from(err: ValidationError) -> list[Problem]:
    problems: list[Problem] = []
    seen: set[tuple[str, str]] = set()
    for e in err.errors():
        msg = str(e.get("msg", ""))
        if "\x01" in msg:  # cross-check problems packed by RunConfig._cross_checks
            body = msg.split("Value error, ", 1)[-1]
            for chunk in body.split("\x00"):
                where, what, hint = chunk.split("\x01")
                problems.append(Problem(where, what, hint or None))
            continue
        where = _loc(tuple(e["loc"]))
        hint = None
        if e["type"] == "extra_forbidden":
            what = "unknown key"
            parent = _section_for(tuple(e["loc"][:-1]))
            if parent is not None:
                hint = _suggest(str(e["loc"][-1]), parent.model_fields)
        else:
            what = msg
            if e["type"].startswith("literal_error"):
                hint = "choose one of the listed values"
            elif "type" in e["type"] or e["type"].endswith("_parsing"):
                hint = f"got {e.get('input')!r}"
        if (where, what) not in seen:
            seen.add((where, what))
            problems.append(Problem(where, what, hint))
    return problems


def _section_for(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = RunConfig
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        ann = field.annotation
        found = None
        for cand in (ann, *getattr(ann, "__args__", ())):
            for inner in (cand, *getattr(cand, "__args__", ())):
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    found = inner
        if found is None:
            return None
        model = found
    return model


def parse_config(raw: dict[str, Any], source: str = "config") -> RunConfig:
    """Validate a dict; raise ConfigError listing every problem."""
    if not isinstance(raw, dict):
        raise ConfigError([Problem(source, "the config must be a mapping of keys to values",
                                   "start from examples/banking77/config.yaml")])
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_problems_from(e), title=f"invalid config {source}") from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=c` overrides; values are parsed as YAML (so 1e-4, true, [a, b] work)."""
    problems = []
    for item in overrides:
        if "=" not in item:
            problems.append(Problem(f"--set {item}", "expected KEY=VALUE", "e.g. --set train.lr=1e-4"))
            continue
        key, value = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            current = node.get(part)
            if part == "adapter" and isinstance(current, str):
                current = {"kind": current}  # the `adapter: lora` shorthand
            if current is None:
                current = {}
            if not isinstance(current, dict):
                problems.append(Problem(f"--set {item}", f"'{part}' is a value, not a section"))
                break
            node[part] = current
            node = current
        else:
            _set_leaf(node, parts[-1], value)
    if problems:
        raise ConfigError(problems, title="invalid --set overrides")
    return raw


def _set_leaf(node: dict, key: str, value: str) -> None:
    try:
        node[key] = yaml.safe_load(value) if value != "" else None
    except yaml.YAMLError:
        node[key] = value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> RunConfig:
    """Load a YAML run config (or start from `base`), apply overrides, validate once."""
    raw: dict[str, Any] = dict(base or {})
    source = "config"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.exists():
            raise ConfigError([Problem(str(path), "file not found", "check the path to your config YAML")])
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            raise ConfigError([Problem(where, f"not valid YAML: {getattr(e, 'problem', e)}",
                                       "check indentation and quoting")]) from None
        if not isinstance(loaded, dict):
            raise ConfigError([Problem(str(path), "the config must be a mapping of keys to values",
                                       "start from examples/banking77/config.yaml")])
        raw.update(loaded)
        # Relative data paths in a config file are relative to the file, as a user expects.
        _resolve_relative_paths(raw, path.parent)
    raw = apply_overrides(raw, overrides or [])
    return parse_config(raw, source)


def _resolve_relative_paths(raw: dict[str, Any], root: Path) -> None:
    def fix(v: Any) -> Any:
        if isinstance(v, str) and not Path(v).is_absolute() and (root / v).exists():
            return str(root / v)
        if isinstance(v, list):
            return [fix(x) for x in v]
        return v

    data = raw.get("data")
    if isinstance(data, dict):
        for key in ("train", "eval"):
            if key in data:
                data[key] = fix(data[key])
    ev = raw.get("eval")
    if isinstance(ev, dict):
        for key in ("data", "regression"):
            if key in ev:
                ev[key] = fix(ev[key])
    for st in raw.get("stages") or []:
        if isinstance(st, dict):
            if isinstance(st.get("data"), str):
                st["data"] = fix(st["data"])
            elif isinstance(st.get("data"), dict):
                for key in ("train", "eval"):
                    if key in st["data"]:
                        st["data"][key] = fix(st["data"][key])
    if isinstance(raw.get("model"), str) and (root / raw["model"]).exists():
        raw["model"] = str(root / raw["model"])


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)

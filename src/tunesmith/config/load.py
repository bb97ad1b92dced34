"""Loading a run config: YAML in, `--set a.b=c` overrides, one validation pass that reports every problem
at once with its YAML path and a hint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from ..errors import ConfigError, Problem
from .checks import cross_check, stage_section_problems
from .problems import problems_from
from .schema import RunConfig


def parse_config(raw: dict[str, Any], source: str = "config") -> RunConfig:
    """Validate a dict; raise ConfigError listing every problem."""
    if not isinstance(raw, dict):
        raise ConfigError([Problem(source, "the config must be a mapping of keys to values",
                                   "start from examples/banking77/config.yaml")])
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as e:
        stages = raw.get("stages") if isinstance(raw.get("stages"), list) else []
        inner = [q for i, st in enumerate(stages) if isinstance(st, dict)
                 for q in stage_section_problems(i, st.get("train"), st.get("method_args"))]
        raise ConfigError(problems_from(e) + inner, title=f"invalid config {source}") from None
    return validated(cfg, source)


def parse_section(section: type[BaseModel], raw: dict[str, Any], where: str) -> Any:
    """Validate one section on its own (e.g. the EvalConfig that `tunesmith eval` builds from its flags);
    raise ConfigError listing every problem, each at `where.<key>`."""
    try:
        return section.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(problems_from(e, section, where), title=f"invalid {where} settings") from None


def validated(cfg: RunConfig, source: str = "config") -> RunConfig:
    """The checks that span several fields and stages; every problem at once, or the config unchanged."""
    problems = cross_check(cfg)
    if problems:
        raise ConfigError(problems, title=f"invalid config {source}")
    return cfg


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
        for key in ("data", "regression", "train_data", "docs", "prices", "embedder"):
            if key in ev:
                ev[key] = fix(ev[key])
        _resolve_eval_files(ev, fix)
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
    for section in [raw] + [st for st in raw.get("stages") or [] if isinstance(st, dict)]:
        args = section.get("method_args")
        if isinstance(args, dict) and isinstance(args.get("rewards"), list):
            args["rewards"] = [_reward_paths(r, root) for r in args["rewards"]]


def _reward_paths(reward: Any, root: Path) -> Any:
    """A reward's file (json_schema:FILE, choice:LABELS, python:FILE.py:FUNCTION) relative to the config."""
    spec = reward.get("reward") if isinstance(reward, dict) else reward
    if not isinstance(spec, str):
        return reward
    kind, sep, arg = spec.partition(":")
    path = arg.rpartition(":")[0] if kind == "python" else arg
    if kind not in ("json_schema", "choice", "python") or not path or Path(path).is_absolute() \
            or not (root / path).is_file():
        return reward
    fixed = f"{kind}:{root / arg}"
    return {**reward, "reward": fixed} if isinstance(reward, dict) else fixed


def _resolve_eval_files(ev: dict[str, Any], fix: Any) -> None:
    """Files named inside eval specs are relative to the config too: `json_schema:FILE`, `choice:FILE`,
    `python:FILE.py:FUNCTION` metrics and `+prompt:FILE` candidates."""
    import re

    def metric(spec: Any) -> Any:
        if not isinstance(spec, str):
            return spec
        kind, sep, arg = spec.partition(":")
        if kind in ("json_schema", "choice") and sep:
            return f"{kind}:{fix(arg)}"
        if kind == "python" and ".py:" in arg:
            path, _, fn = arg.rpartition(":")
            return f"python:{fix(path)}:{fn}"
        return spec

    def candidate(spec: Any) -> Any:
        if not isinstance(spec, str) or "+prompt:" not in spec:
            return spec
        return re.sub(r"\+prompt:([^+]+)", lambda m: "+prompt:" + str(fix(m.group(1))), spec)

    if isinstance(ev.get("metrics"), list):
        ev["metrics"] = [metric(m) for m in ev["metrics"]]
    if isinstance(ev.get("candidates"), list):
        ev["candidates"] = [candidate(c) for c in ev["candidates"]]


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)

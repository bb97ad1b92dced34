from pathlib import Path

import pytest
import yaml

from tunesmith.config import apply_overrides, load_config, parse_config
from tunesmith.errors import ConfigError

EXAMPLES = sorted(Path(__file__).resolve().parents[1].glob("examples/**/*.yaml"))


def test_every_problem_reported_at_once_with_paths_and_hints():
    with pytest.raises(ConfigError) as e:
        parse_config({"data": {"train": "x.jsonl", "max_lenght": 5}, "train": {"lr": "fast", "micro_batch_size": 0},
                      "method": "ppo", "colour": "blue"})
    wheres = {p.where: p for p in e.value.problems}
    assert set(wheres) == {"data.max_lenght", "train.lr", "train.micro_batch_size", "method", "colour"}
    assert wheres["data.max_lenght"].what == "unknown key"
    assert "max_length" in wheres["data.max_lenght"].hint
    assert "fast" in wheres["train.lr"].hint
    text = str(e.value)
    assert "invalid config" in text and "(5)" in text


def test_cross_field_problems_listed_together():
    with pytest.raises(ConfigError) as e:
        parse_config({"adapter": {"kind": "full", "init": "pissa", "lora_plus_ratio": 16}})
    wheres = [p.where for p in e.value.problems]
    assert "adapter.init" in wheres and "adapter.lora_plus_ratio" in wheres and "data.train" in wheres


def test_adapter_shorthand_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    (tmp_path / "d.jsonl").write_text("")
    path.write_text(yaml.safe_dump({"data": {"train": "d.jsonl"}, "adapter": "dora"}))
    cfg = load_config(path, ["train.lr=1e-4", "adapter.r=8", "data.train_on=last_assistant"])
    assert cfg.adapter.kind == "dora" and cfg.adapter.r == 8
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.data.train == str(tmp_path / "d.jsonl")  # relative to the config file
    assert cfg.data.train_on == "last_assistant"


def test_override_errors_are_config_errors():
    with pytest.raises(ConfigError):
        apply_overrides({}, ["no-equals-sign"])
    with pytest.raises(ConfigError) as e:
        parse_config(apply_overrides({"data": {"train": "x"}}, ["train.epochs=-1"]))
    assert e.value.problems[0].where == "train.epochs"


def test_bad_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  train: [unclosed\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(path) in e.value.problems[0].where


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(p.parents[2])))
def test_shipped_example_configs_validate(path):
    cfg = load_config(path)
    for key in ("train", "eval"):
        value = getattr(cfg.data, key)
        if isinstance(value, str):
            assert Path(value).exists(), f"{path}: data.{key} points at a missing file"


def test_examples_exist():
    assert EXAMPLES, "no example configs found"


def test_every_config_key_is_documented():
    from tunesmith.config import AdapterConfig, DataConfig, EvalConfig, MethodConfig, RunConfig, TrainConfig

    doc = (Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text()
    for section in (RunConfig, DataConfig, AdapterConfig, MethodConfig, TrainConfig, EvalConfig):
        for key in section.model_fields:
            assert f"`{key}`" in doc, f"{section.__name__}.{key} is not in docs/config.md"


def test_every_stage_is_validated_with_the_same_sections():
    """A stage's train and method_args go through TrainConfig and MethodConfig, with their YAML paths."""
    with pytest.raises(ConfigError) as e:
        parse_config({"stages": [
            {"method": "sft", "data": "a", "train": {"lr": -1}},
            {"method": "dpo", "data": "b", "beta": -5,
             "method_args": {"label_smoothing": 0.9, "share_prompt": "maybe"}}]})
    where = {p.where for p in e.value.problems}
    assert where == {"stages[0].train.lr", "stages[1].beta",
                     "stages[1].method_args.label_smoothing", "stages[1].method_args.share_prompt"}
    with pytest.raises(ConfigError) as e:  # the same problems when the rest of the config is valid
        parse_config({"stages": [{"method": "sft", "data": "a", "train": {"lr": -1}},
                                 {"method": "dpo", "data": "b", "method_args": {"label_smoothing": 0.9}}]})
    assert {p.where for p in e.value.problems} == {"stages[0].train.lr", "stages[1].method_args.label_smoothing"}


@pytest.mark.parametrize("method,args,key", [("sft", {"beta": 0.2}, "beta"), ("dpo", {"simpo_gamma": 1.0}, "simpo_gamma"),
                                              ("kto", {"share_prompt": False}, "share_prompt"),
                                              ("orpo", {"sft_weight": 0.5}, "sft_weight")])
def test_settings_the_method_ignores_are_errors(method, args, key):
    with pytest.raises(ConfigError) as e:
        parse_config({"method": method, "data": {"train": "x"}, "method_args": args})
    assert [p.where for p in e.value.problems] == [f"method_args.{key}"]
    assert f"does not apply to {method}" in e.value.problems[0].what


def test_stage_settings_must_fit_their_stage_and_top_level_ones_some_stage():
    with pytest.raises(ConfigError) as e:
        parse_config({"method_args": {"orpo_lambda": 0.3},
                      "stages": [{"method": "sft", "data": "a", "method_args": {"beta": 0.1}},
                                 {"method": "dpo", "data": "b", "beta": 0.2}]})
    assert {p.where for p in e.value.problems} == {"stages[0].method_args.beta", "method_args.orpo_lambda"}
    ok = parse_config({"method_args": {"beta": 0.3},
                       "stages": [{"method": "sft", "data": "a"}, {"method": "dpo", "data": "b"}]})
    from tunesmith.config import stage_config

    assert stage_config(ok, 1).method_args.beta == 0.3 and stage_config(ok, 0).method == "sft"


def test_a_config_written_back_with_every_default_reloads(tmp_path):
    """run folders keep config.yaml with every default; reloading it must not trip the ignored-key check."""
    from tunesmith.config import dump_config, load_config

    cfg = parse_config({"method": "sft", "data": {"train": "x"}})
    (tmp_path / "config.yaml").write_text(dump_config(cfg))
    assert load_config(tmp_path / "config.yaml").method == "sft"


def test_the_config_package_has_no_import_cycle():
    """schema <- problems <- checks <- load: each module imports only those before it."""
    import ast

    root = Path(__file__).resolve().parents[1] / "src" / "tunesmith" / "config"
    order = ["schema", "problems", "checks", "load"]
    for i, name in enumerate(order):
        tree = ast.parse((root / f"{name}.py").read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 1}
        assert imported <= set(order[:i]), (name, imported)

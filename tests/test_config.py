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

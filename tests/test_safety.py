"""Inputs never crash tunesmith: random configs give a config or a ConfigError; remote code needs consent."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunesmith.config import RunConfig, apply_overrides, parse_config
from tunesmith.errors import ConfigError, ModelLoadError

KEYS = ["model", "data", "train", "adapter", "eval", "stages", "method", "precision", "name", "lr", "r", "kind",
        "max_length", "epochs", "micro_batch_size", "beta", "metrics", "candidates", "x", "format", "truncation"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["lora", "qlora", "full", "dpo", "kto", "bf16", "right"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.sampled_from(KEYS), inner, max_size=4)),
                      max_leaves=12)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(KEYS), values, max_size=6))
def test_any_config_validates_or_reports_problems_with_paths(raw):
    try:
        cfg = parse_config(raw)
    except ConfigError as e:
        assert e.problems and all(p.where for p in e.problems)
    else:
        assert isinstance(cfg, RunConfig)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=20), max_size=4))
def test_any_override_string_validates_or_reports(items):
    try:
        parse_config(apply_overrides({"data": {"train": "x.jsonl"}}, items))
    except ConfigError as e:
        assert e.problems


def test_model_with_remote_code_needs_the_flag(tmp_path):
    from tunesmith.model.load import load_model_and_tokenizer

    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "totally_custom_arch", "architectures": ["CustomForCausalLM"],
        "auto_map": {"AutoConfig": "modeling_custom.CustomConfig",
                     "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}}))
    (tmp_path / "modeling_custom.py").write_text("raise SystemExit('remote code must never run')\n")
    with pytest.raises(ModelLoadError) as e:
        load_model_and_tokenizer(str(tmp_path))
    assert "trust_remote_code" in e.value.hint

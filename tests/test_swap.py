"""AdapterSet: one base, several adapters, per-request switching that matches single-adapter models."""

from __future__ import annotations

import pytest
import torch

from adapter_utils import load_tiny, token_batch, train_steps
from tunesmith.config import AdapterConfig
from tunesmith.errors import TunesmithError
from tunesmith.model.adapters import apply_adapter, load_adapter, save_adapter
from tunesmith.model.merge import logits_of
from tunesmith.model.swap import AdapterSet

ADAPTERS = {  # different kinds, ranks and targets, so the set must route each layer correctly
    "a": AdapterConfig(kind="lora", r=4, target="all-linear"),
    "b": AdapterConfig(kind="dora", r=2, target="mlp"),
    "c": AdapterConfig(kind="rslora", r=8, target=["v_proj"]),
}


@pytest.fixture(scope="module")
def adapter_dirs(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    dirs = {}
    for seed, (name, cfg) in enumerate(ADAPTERS.items()):
        model = apply_adapter(load_tiny(tiny_dir), cfg)
        train_steps(model, cfg, steps=2, seed=seed)
        dirs[name] = save_adapter(model, root / name)
    return dirs


def test_switching_matches_single_adapter_models(tiny_dir, adapter_dirs):
    ids = token_batch(seed=11)
    expected = {name: logits_of(load_adapter(load_tiny(tiny_dir), d), ids) for name, d in adapter_dirs.items()}
    expected[None] = logits_of(load_tiny(tiny_dir), ids)
    for x in (None, "a", "b", "c"):
        for y in (None, "a", "b", "c"):
            if x != y:
                assert not torch.allclose(expected[x], expected[y], atol=1e-4), (x, y)

    adapter_set = AdapterSet(load_tiny(tiny_dir))
    for name, d in adapter_dirs.items():
        adapter_set.add(name, d)
        assert adapter_set.active is None
        assert torch.equal(logits_of(adapter_set.model, ids), expected[None]), "adding must not switch"
    assert adapter_set.names == ["a", "b", "c"]
    for name in ["a", "b", None, "c", "a", None, "b", "b", "c"]:  # requests in any order
        adapter_set.use(name)
        assert adapter_set.active == name
        assert torch.equal(logits_of(adapter_set.model, ids), expected[name]), name
    assert not any(p.requires_grad for p in adapter_set.model.parameters())


def test_base_is_loaded_once(tiny_dir, adapter_dirs):
    base = load_tiny(tiny_dir)
    embedding = base.get_input_embeddings().weight
    adapter_set = AdapterSet(base)
    assert adapter_set.model is base
    for name, d in adapter_dirs.items():
        adapter_set.add(name, d)
    assert adapter_set.model.get_input_embeddings().weight is embedding
    assert sum(1 for m in adapter_set.model.modules() if type(m).__name__ == "LlamaForCausalLM") == 1


def test_qlora_adapters_switch(tiny_dir, tmp_path):
    ids = token_batch(seed=3)
    dirs, expected = {}, {None: logits_of(load_tiny(tiny_dir, quantized=True), ids)}
    for seed, name in enumerate(["x", "y"]):
        cfg = AdapterConfig(kind="qlora", r=4, use_dora=seed == 1)
        model = apply_adapter(load_tiny(tiny_dir, quantized=True), cfg)
        train_steps(model, cfg, steps=1, seed=seed)
        dirs[name] = save_adapter(model, tmp_path / name)
        expected[name] = logits_of(model, ids)
    adapter_set = AdapterSet(load_tiny(tiny_dir, quantized=True))
    for name, d in dirs.items():
        adapter_set.add(name, d)
    for name in ["y", "x", None, "y"]:
        adapter_set.use(name)
        assert torch.equal(logits_of(adapter_set.model, ids), expected[name]), name


def test_errors(tiny_dir, adapter_dirs, tmp_path):
    adapter_set = AdapterSet(load_tiny(tiny_dir))
    with pytest.raises(TunesmithError, match="no adapter named 'a'"):
        adapter_set.use("a")
    adapter_set.use(None)  # the base is always available
    adapter_set.add("a", adapter_dirs["a"])
    with pytest.raises(TunesmithError, match="already used"):
        adapter_set.add("a", adapter_dirs["b"])
    with pytest.raises(TunesmithError, match="not found"):
        adapter_set.add("z", tmp_path / "nothing")
    assert adapter_set.names == ["a"]

"""The speed options change how fast training runs, never what it computes: length-grouped batch order,
gradient checkpointing and torch.compile (the last two through the recipe, as `train.*` config keys)."""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers.models.llama import modeling_llama

import tunesmith
import tunesmith.model.adapters as adapters
import tunesmith.model.fused as fused
from tunesmith.data.batching import batch_order
from tunesmith.train import recipe

# ---------------------------------------------------------------- length-grouped batch order

def skewed_lengths(n: int = 600, seed: int = 0) -> list[int]:
    """Mostly short examples and a long tail, like real chat data."""
    rng = random.Random(seed)
    return [int(rng.lognormvariate(4.0, 0.9)) + 4 for _ in range(n)]


def padding_waste(lengths: list[int], batches: list[list[int]]) -> float:
    """Fraction of a padded batch's tokens that are padding."""
    total = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    return 1 - sum(lengths) / total


@pytest.mark.parametrize("group", [True, False])
def test_every_example_once_per_epoch(group):
    lengths = skewed_lengths(203)
    for epoch in range(3):
        batches = batch_order(lengths, 8, seed=5, epoch=epoch, group_by_length=group)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(203))
        assert all(len(b) == 8 for b in batches[:-1]) or group  # grouped: the short batch may be anywhere
        assert sum(len(b) == 8 for b in batches) == 203 // 8


@pytest.mark.parametrize("group", [True, False])
def test_order_is_a_function_of_seed_and_epoch(group):
    lengths = skewed_lengths(300)
    order = lambda seed, epoch: batch_order(lengths, 8, seed, epoch, group_by_length=group)  # noqa: E731
    assert order(1, 0) == order(1, 0)
    assert order(1, 0) != order(1, 1)
    assert order(1, 0) != order(2, 0)
    assert order(1, 1) != order(1, 2)


def test_grouping_cuts_padding_on_skewed_lengths():
    lengths = skewed_lengths(600)
    grouped = [padding_waste(lengths, batch_order(lengths, 8, 0, e, group_by_length=True)) for e in range(3)]
    shuffled = [padding_waste(lengths, batch_order(lengths, 8, 0, e, group_by_length=False)) for e in range(3)]
    assert max(grouped) < 0.15 < 0.35 < min(shuffled), (grouped, shuffled)


def test_grouped_batches_are_still_shuffled():
    """Grouping must not hand the model the examples sorted by length: the sequence of batch lengths over an
    epoch is not monotonic, and the first batch differs between epochs."""
    lengths = skewed_lengths(600)
    batches = batch_order(lengths, 8, seed=0, epoch=0, group_by_length=True)
    longest = [max(lengths[i] for i in b) for b in batches]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)
    assert batches[0] != batch_order(lengths, 8, seed=0, epoch=1, group_by_length=True)[0]


# ---------------------------------------------------------------- gradient checkpointing and compile

@pytest.fixture
def layer_calls(monkeypatch):
    """Counts the MLP calls of the decoder layers: a recomputed layer runs its MLP again in the backward. (The
    layer's own `forward` is the checkpointing wrapper transformers installs, so it is left alone.) Both MLP
    forwards are counted: transformers' and the fused one `train.fused` swaps in."""
    calls = {"n": 0}

    def counting(original):
        def counted(self, *args, **kwargs):
            calls["n"] += 1
            return original(self, *args, **kwargs)
        return counted

    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", counting(modeling_llama.LlamaMLP.forward))
    monkeypatch.setattr(fused, "mlp_forward", counting(fused.mlp_forward))
    return calls


def losses(tiny_dir, tmp_path, name: str, **train) -> list[float]:
    """Loss of each of 4 optimizer steps of LoRA SFT on 12 short conversations (fp32)."""
    rows = [{"messages": [{"role": "user", "content": "hello world " * (1 + i % 4) + str(i)},
                          {"role": "assistant", "content": ["card balance", "exchange rate", "top up"][i % 3]}]}
            for i in range(12)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {"model": str(tiny_dir), "output_dir": str(tmp_path / "runs"), "name": name, "precision": "fp32",
           "device": "cpu", "data": {"train": str(data)},
           "train": {"lr": 5e-3, "max_steps": 4, "micro_batch_size": 4, "warmup_ratio": 0.0, **train}}
    run = tunesmith.train(cfg, progress=False)
    return [m["loss"] for m in run.metrics if "loss" in m]


def test_gradient_checkpointing_gives_the_same_losses(tiny_dir, tmp_path, layer_calls, monkeypatch):
    enabled = []
    original = adapters.enable_gradient_checkpointing
    monkeypatch.setattr(adapters, "enable_gradient_checkpointing", lambda m: (enabled.append(m), original(m)))
    checking = recipe.check_head

    def uncounted_check(model):  # the pre-training head check runs forwards of its own; count training only
        before = layer_calls["n"]
        checking(model)
        layer_calls["n"] = before
    monkeypatch.setattr(recipe, "check_head", uncounted_check)

    plain = losses(tiny_dir, tmp_path, "plain")
    plain_calls, layer_calls["n"] = layer_calls["n"], 0
    ckpt = losses(tiny_dir, tmp_path, "ckpt", grad_checkpointing=True)
    assert len(enabled) == 1
    assert plain_calls == 4 * 2  # 4 steps x 2 layers, one micro-batch each
    assert layer_calls["n"] == 2 * plain_calls  # every layer recomputed in the backward
    assert len(plain) == 4 and plain[0] != plain[-1]
    torch.testing.assert_close(ckpt, plain, atol=1e-6, rtol=1e-5)


@pytest.mark.slow  # building the compiled layers takes minutes on a small shared CPU
def test_compile_gives_the_same_losses(tiny_dir, tmp_path, monkeypatch):
    compiled = []
    original = adapters.compile_layers
    monkeypatch.setattr(adapters, "compile_layers", lambda m: compiled.append(original(m)))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()

    plain = losses(tiny_dir, tmp_path, "plain")
    fast = losses(tiny_dir, tmp_path, "compiled", compile=True)
    assert compiled == [2]  # both decoder layers
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # dynamo really compiled something
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-4)
    torch._dynamo.reset()

"""The two references behind one interface: live (computed each micro-batch) equals precomputed (one pass
before training) for a fresh adapter, a stage that starts from an adapter, and full fine-tuning; the cache
key pins the base model's weights, whatever form they come in."""

import json

import pytest
import torch

import tunesmith
from pref_utils import pair_rows, quiet, run_config, steps, write_jsonl


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))


def _losses(cfg):
    return [(r["loss"], r["rewards/margins"]) for r in steps(tunesmith.train(cfg, progress=False,
                                                                                console=quiet()[0]))]


@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_live_reference_gives_the_precomputed_run(tiny_dir, tmp_path, adapter):
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows())
    runs = {}
    for mode in ("precomputed", "live"):
        cfg = run_config(tiny_dir, tmp_path / "runs", "dpo", data, name=mode, adapter=adapter,
                         method_args={"reference": mode}, train={"max_steps": 4, "micro_batch_size": 4})
        runs[mode] = _losses(cfg)
    assert runs["live"][0][0] == pytest.approx(0.6931471805599453, abs=1e-6)
    for (a, ma), (b, mb) in zip(runs["live"], runs["precomputed"], strict=True):
        assert a == pytest.approx(b, abs=1e-5) and ma == pytest.approx(mb, abs=1e-5)
    assert abs(runs["live"][-1][1]) > 1e-3  # the policy really moved away from the reference


def test_live_reference_from_a_starting_adapter_is_that_adapter(tiny_dir, tmp_path):
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"messages": [{"role": "user", "content": r["prompt"]},
                                                             {"role": "assistant", "content": r["chosen"]}]}
                                               for r in pair_rows()])
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_rows())
    out = {}
    for mode in ("precomputed", "live"):
        cfg = {"name": mode, "output_dir": str(tmp_path / "runs"), "model": str(tiny_dir), "device": "cpu",
               "precision": "fp32", "data": {"max_length": 64},
               "train": {"micro_batch_size": 8, "lr": 1e-2, "warmup_ratio": 0.0, "schedule": "constant"},
               "stages": [{"method": "sft", "data": str(sft), "train": {"max_steps": 6}},
                          {"method": "dpo", "data": str(pairs), "train": {"max_steps": 3, "lr": 3e-3},
                           "method_args": {"reference": mode}}]}
        run = tunesmith.train(cfg, progress=False, console=quiet()[0])
        out[mode] = [(r["loss"], r["logps/chosen"]) for r in steps(run.stages[1])]
    assert out["live"][0][0] == pytest.approx(0.6931471805599453, abs=1e-6)  # reference == the SFT adapter
    for (a, ca), (b, cb) in zip(out["live"], out["precomputed"], strict=True):
        assert a == pytest.approx(b, abs=1e-5) and ca == pytest.approx(cb, abs=1e-4)


def test_live_reference_leaves_training_weights_untouched(tiny_dir):
    """The swap in and out of the step-0 weights is exact, and gradients still reach the live weights."""
    from tunesmith.data.batching import collate
    from tunesmith.data.render import Tokenized
    from tunesmith.methods.logps import sequence_logps
    from tunesmith.methods.reference import LiveReference
    from tunesmith.model.device import make_runtime
    from tunesmith.model.load import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(str(tiny_dir), precision="fp32")
    fresh, _ = load_model_and_tokenizer(str(tiny_dir), precision="fp32")
    ref = LiveReference(model, "initial-weights", make_runtime("cpu", "fp32"), lambda b: sequence_logps(model, b))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    after = {n: p.detach().clone() for n, p in model.named_parameters()}
    seq = Tokenized((1, 5, 6, 7, 8), (-100, -100, 6, 7, 8))
    batch = collate([seq], 0)
    step0 = ref("train", [seq], batch)
    assert all(torch.equal(p, after[n]) for n, p in model.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(step0.logp_sum, sequence_logps(fresh, batch).logp_sum)  # the step-0 model's
    now = sequence_logps(model, batch)
    assert not torch.allclose(now.logp_sum, step0.logp_sum)
    now.logp_sum.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_the_key_pins_bin_weights_and_hub_commits(tiny_dir, tmp_path, monkeypatch):
    """A local model saved as *.bin used to be keyed on config.json alone; a hub id without a revision on its
    name alone. Both now change with the content."""
    from transformers import AutoModelForCausalLM

    from tunesmith.model.load import model_identity

    binary = tmp_path / "bin-model"
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    model.config.save_pretrained(binary)
    torch.save(model.state_dict(), binary / "pytorch_model.bin")  # how older checkpoints ship their weights
    first = model_identity(str(binary))["sha256"]
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    torch.save(model.state_dict(), binary / "pytorch_model.bin")
    assert model_identity(str(binary))["sha256"] != first

    import huggingface_hub

    hub = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    repo = hub / "models--org--tiny"
    for commit in ("a" * 40, "b" * 40):
        snap = repo / "snapshots" / commit
        snap.mkdir(parents=True)
        (snap / "config.json").write_text(json.dumps({"model_type": "llama"}))
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
        assert model_identity("org/tiny")["commit"] == commit
    assert model_identity("org/never-downloaded")["commit"] is None

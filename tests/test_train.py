"""End-to-end training on a tiny model: overfitting, exact gradient accumulation, saved adapters that reload."""

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import tunesmith
from tunesmith.cli import main as cli_main
from tunesmith.model.runs import load_run

LABELS = ["card_arrival", "exchange_rate", "top_up_failed", "card_linking"]


def write_rows(path, n, vary_length=True):
    rows = []
    for i in range(n):
        user = "hello world " * (1 + (i * 3) % 5 if vary_length else 1) + str(i)
        rows.append({"messages": [{"role": "user", "content": user},
                                  {"role": "assistant", "content": LABELS[i % 4] + (" ok" * (i % 3))}]})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def config(tiny_dir, tmp_path, **train):
    data = write_rows(tmp_path / "train.jsonl", train.pop("n", 8))
    return {"model": str(tiny_dir), "output_dir": str(tmp_path / "runs"), "name": train.pop("name", "t"),
            "precision": "fp32", "device": "cpu", "adapter": train.pop("adapter", {"kind": "lora"}),
            "data": {"train": str(data)},
            "train": {"lr": 1e-2, "max_steps": 40, "micro_batch_size": 8, "warmup_ratio": 0.0, **train}}


def test_tiny_model_overfits_eight_examples(tiny_dir, tmp_path):
    run = tunesmith.train(config(tiny_dir, tmp_path), progress=False)
    losses = [m["loss"] for m in run.metrics if "loss" in m]
    assert len(losses) == 40
    assert losses[0] > 5.5 and losses[-1] < 2.6, losses
    lines = (run.path / "metrics.jsonl").read_text().splitlines()
    assert {"step", "loss", "lr", "tokens_per_s", "grad_norm"} <= set(json.loads(lines[-1]))
    info = json.loads((run.path / "run.json").read_text())
    for key in ("versions", "base_model", "data", "trainable", "wall_time_s", "state"):
        assert key in info
    assert info["base_model"]["sha256"] and info["data"]["sha256"]
    assert info["state"]["tokens"] > 0 and info["versions"]["torch"]
    assert (run.path / "config.yaml").exists()


def _weights_after(tiny_dir, tmp_path, name, **train):
    cfg = config(tiny_dir, tmp_path, name=name, n=4, max_steps=1, lr=1e-3, max_grad_norm=None, **train)
    run = tunesmith.train(cfg, progress=False)
    return load_file(run.adapter / "adapter_model.safetensors")


def _gradients_of_first_step(tiny_dir, tmp_path, monkeypatch, name, adapter, **train):
    """The gradients the optimizer receives at the first step, by parameter name."""
    captured = {}
    real = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        if not captured:
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        captured[id(p)] = p.grad.detach().clone()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    cfg = config(tiny_dir, tmp_path, name=name, n=4, max_steps=1, lr=1e-3, max_grad_norm=None, adapter=adapter,
                 **train)
    tunesmith.train(cfg, progress=False)
    return list(captured.values())  # in the optimizer's parameter order, the same in every run


@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_grad_accumulation_gives_the_big_batch_gradients(tiny_dir, tmp_path, monkeypatch, adapter):
    """The gradients themselves, before the optimizer (AdamW normalises away a wrong overall scale, so equal
    weights after one step prove little): micro-batch 1 x accum 4 == micro-batch 4 x accum 1."""
    big = _gradients_of_first_step(tiny_dir, tmp_path, monkeypatch, "gbig", adapter, micro_batch_size=4,
                                   grad_accum=1)
    small = _gradients_of_first_step(tiny_dir, tmp_path, monkeypatch, "gsmall", adapter, micro_batch_size=1,
                                     grad_accum=4)
    assert len(big) == len(small) and len(big) > 0
    for a, b in zip(small, big, strict=True):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-5)
    assert sum(float(g.abs().sum()) for g in big) > 0


@pytest.mark.parametrize("packing", [False, True])
def test_grad_accumulation_matches_one_big_batch(tiny_dir, tmp_path, packing):
    """micro-batch 1 x accum 4 == micro-batch 4 x accum 1 on rows of different lengths: the loss is
    normalised by the target tokens of the whole accumulated batch, not averaged per micro-batch."""
    big = _weights_after(tiny_dir, tmp_path, "big", micro_batch_size=4, grad_accum=1, packing=packing)
    small = _weights_after(tiny_dir, tmp_path, "small", micro_batch_size=1, grad_accum=4, packing=packing)
    assert big.keys() == small.keys()
    for k in big:
        torch.testing.assert_close(small[k], big[k], atol=1e-7, rtol=1e-5)
    assert any(bool((v != 0).any()) for k, v in big.items() if "lora_B" in k)


def test_saved_adapter_reloads_with_peft_and_tunesmith(tiny_dir, tmp_path):
    run = tunesmith.train(config(tiny_dir, tmp_path, max_steps=5), progress=False)
    ids = torch.tensor([[1, 40, 41, 42, 43, 2]])
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    peft_model = PeftModel.from_pretrained(base, run.adapter).eval()
    ours, _, info = load_run(run.path, device="cpu", precision="fp32", dtype="fp32")
    with torch.no_grad():
        a = peft_model(ids).logits
        b = ours.eval()(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_dir)(ids).logits
    assert torch.equal(a, b)
    assert not torch.allclose(a, plain)  # the adapter does something
    assert info["adapter_kind"] == "lora"


def test_same_seed_same_losses_different_seed_differs(tiny_dir, tmp_path):
    def losses(name, seed):
        cfg = config(tiny_dir, tmp_path, name=name, max_steps=4, micro_batch_size=2, seed=seed, n=8)
        cfg["adapter"] = {"kind": "lora", "dropout": 0.1}
        return [m["loss"] for m in tunesmith.train(cfg, progress=False).metrics if "loss" in m]

    assert losses("a", 1) == losses("b", 1)
    assert losses("c", 2) != losses("a", 1)


def test_cli_train_and_generate(tiny_dir, tmp_path, capsys):
    cfg = config(tiny_dir, tmp_path, max_steps=2)
    import yaml

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli_main(["train", str(path), "--no-progress", "--set", "name=cli"]) == 0
    assert (tmp_path / "runs" / "cli" / "adapter" / "adapter_model.safetensors").exists()
    code = cli_main(["generate", str(tmp_path / "runs" / "cli"), "--prompt", "hello world", "--max-new-tokens", "4",
                     "--device", "cpu", "--precision", "fp32"])
    assert code == 0
    assert capsys.readouterr().out.count("\n") == 1  # one reply line


def test_cli_reports_config_errors_without_traceback(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("data: {train: x.jsonl}\ntrain: {lr: fast, epoch: 2}\n")
    assert cli_main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "train.lr" in err and "train.epoch" in err and "epochs" in err and "Traceback" not in err


def test_chat_repl_keeps_the_conversation(tiny_dir, tmp_path, monkeypatch, capsys):
    run = tunesmith.train(config(tiny_dir, tmp_path, max_steps=2), progress=False)
    typed = iter(["hello world", "/reset", "how are you", ""])
    seen = []

    from tunesmith.model.generate import Generator

    real = Generator.generate

    def spy(self, prompts, **kwargs):
        seen.append([m["content"] for m in prompts[0]])
        return real(self, prompts, **kwargs)

    monkeypatch.setattr("builtins.input", lambda prompt="": next(typed))
    monkeypatch.setattr(Generator, "generate", spy)
    assert cli_main(["chat", str(run.path), "--max-new-tokens", "3", "--device", "cpu", "--precision", "fp32",
                     "--system", "be brief"]) == 0
    assert seen[0] == ["be brief", "hello world"]
    assert seen[1] == ["be brief", "how are you"]  # /reset dropped the first exchange, kept the system line
    assert capsys.readouterr().out.count("model> ") == 2

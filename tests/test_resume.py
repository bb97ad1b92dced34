"""Exact resume after kill -9, atomic checkpoints, signals, non-finite steps, and refusing pickles."""

import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import tunesmith
from tunesmith.errors import TrainingAborted, TunesmithError
from tunesmith.train import checkpoint

ROOT = Path(__file__).resolve().parents[1]
LABELS = ["card_arrival", "exchange_rate", "top_up_failed", "card_linking"]

DRIVER = """
import os, signal, sys
sys.path[:0] = [{src!r}, {tests!r}]
from tunesmith.cli import main
from tunesmith.train import loop
kill_at, sig = int(sys.argv[2]), getattr(signal, sys.argv[3])
orig = loop.Trainer.forward
count = [0]
def forward(self, *a, **k):
    count[0] += 1
    if count[0] == kill_at:
        os.kill(os.getpid(), sig)
    return orig(self, *a, **k)
loop.Trainer.forward = forward
sys.exit(main(["train", sys.argv[1], "--no-progress"] + sys.argv[4:]))
"""


def make_config(tiny_dir, tmp_path, name="r", **train):
    rows = [{"messages": [{"role": "user", "content": "hello world " * (1 + i % 3) + str(i)},
                          {"role": "assistant", "content": LABELS[i % 4]}]} for i in range(8)]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = {"model": str(tiny_dir), "output_dir": str(tmp_path / "runs"), "name": name, "precision": "fp32",
           "device": "cpu", "adapter": {"kind": "lora", "dropout": 0.1}, "data": {"train": str(data)},
           # 8 examples, micro-batch 2, accum 2: 2 optimizer steps per epoch, 3 epochs = 6 steps
           "train": {"lr": 5e-3, "epochs": 3, "micro_batch_size": 2, "grad_accum": 2, "save_every": 1,
                     "keep_last": 3, "warmup_ratio": 0.2, **train}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def drive(config_path, kill_at=0, sig="SIGKILL", *extra):
    driver = config_path.parent / "driver.py"
    driver.write_text(DRIVER.format(src=str(ROOT / "src"), tests=str(ROOT / "tests")))
    env = {**os.environ, "PYTHONPATH": ""}
    return subprocess.run([sys.executable, str(driver), str(config_path), str(kill_at), sig, *extra],
                          capture_output=True, text=True, timeout=300, env=env)


def final_state(run_dir):
    ck = run_dir / "checkpoints" / "step-000006"
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    return load_file(ck / "trainable.safetensors"), load_file(ck / "optimizer.safetensors"), losses


@pytest.fixture(scope="module")
def uninterrupted(tiny_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("straight")
    done = drive(make_config(tiny_dir, tmp))
    assert done.returncode == 0, done.stderr[-2000:]
    return final_state(tmp / "runs" / "r")


# forward calls: step s (1-based) runs micro-batches 2s-1 and 2s; step 2 ends epoch 1
@pytest.mark.parametrize("kill_at,where", [(6, "mid-accumulation"), (7, "at an optimizer step"),
                                           (5, "at an epoch boundary")])
def test_kill_9_then_resume_is_bit_identical(tiny_dir, tmp_path, uninterrupted, kill_at, where):
    config = make_config(tiny_dir, tmp_path)
    killed = drive(config, kill_at)
    assert killed.returncode == -signal.SIGKILL, where
    assert checkpoint.latest(tmp_path / "runs" / "r" / "checkpoints") is not None
    resumed = drive(config, 0, "SIGKILL", "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr
    weights, optim, losses = final_state(tmp_path / "runs" / "r")
    ref_w, ref_o, ref_losses = uninterrupted
    assert weights.keys() == ref_w.keys() and optim.keys() == ref_o.keys()
    assert all(torch.equal(weights[k], ref_w[k]) for k in weights), where
    assert all(torch.equal(optim[k], ref_o[k]) for k in optim), where
    assert losses == ref_losses and len(losses) == 6


def test_sigterm_finishes_the_step_saves_and_exits_75(tiny_dir, tmp_path, uninterrupted):
    config = make_config(tiny_dir, tmp_path)
    stopped = drive(config, 5, "SIGTERM")
    assert stopped.returncode == 75, stopped.stderr[-2000:]
    assert "--resume auto" in stopped.stderr
    assert checkpoint.latest(tmp_path / "runs" / "r" / "checkpoints").name == "step-000003"
    resumed = drive(config, 0, "SIGKILL", "--resume", "auto")
    assert resumed.returncode == 0
    weights, _, losses = final_state(tmp_path / "runs" / "r")
    assert all(torch.equal(weights[k], uninterrupted[0][k]) for k in weights)
    assert losses == uninterrupted[2]


def test_crash_while_writing_leaves_previous_checkpoint(tiny_dir, tmp_path, monkeypatch):
    real = checkpoint.save_file

    def disk_full_at_step_3(tensors, path):  # the third checkpoint's first file hits a full disk
        if ".tmp-step-000003" in str(path):
            raise OSError(28, "No space left on device")
        return real(tensors, path)

    monkeypatch.setattr(checkpoint, "save_file", disk_full_at_step_3)
    with pytest.raises(TunesmithError) as e:
        tunesmith.train(yaml.safe_load(make_config(tiny_dir, tmp_path).read_text()), progress=False)
    assert "No space left" in e.value.message and "previous checkpoint is intact" in e.value.hint
    root = tmp_path / "runs" / "r" / "checkpoints"
    assert [p.name for p in checkpoint.checkpoint_dirs(root)] == ["step-000001", "step-000002"]
    assert not list(root.glob(".tmp-*"))
    # a partial folder left by a kill -9 (no marker) and a stale temp folder are both ignored
    (root / "step-000003").mkdir()
    (root / "step-000003" / "trainable.safetensors").write_bytes(b"half")
    (root / ".tmp-step-000004-1").mkdir()
    assert checkpoint.latest(root).name == "step-000002"


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['TUNESMITH_PWNED']}",))


def test_booby_trapped_pickle_is_refused_and_never_executed(tiny_dir, tmp_path, monkeypatch):
    pwned = tmp_path / "pwned"
    monkeypatch.setenv("TUNESMITH_PWNED", str(pwned))
    config = make_config(tiny_dir, tmp_path, max_steps=2)
    run = tunesmith.train(yaml.safe_load(config.read_text()), progress=False)
    trap = run.path / "checkpoints" / "step-000009"
    trap.mkdir()
    (trap / "COMPLETE").write_text("{}")
    (trap / "optimizer.pt").write_bytes(pickle.dumps(Payload()))
    for resume in ("auto", str(trap)):
        with pytest.raises(TunesmithError) as e:
            tunesmith.train(yaml.safe_load(config.read_text()), progress=False, resume=resume)
        assert "optimizer.pt" in e.value.message
    assert not pwned.exists()
    # an adapter folder holding only a pickle is refused as well
    adapter = tmp_path / "bad_adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text((run.adapter / "adapter_config.json").read_text())
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(TunesmithError):
        tunesmith.open_adapters(str(tiny_dir), {"x": str(adapter)}, device="cpu", precision="fp32")
    assert not pwned.exists()


def test_nonfinite_loss_stops_before_the_step_names_it_and_keeps_last_good(tiny_dir, tmp_path, monkeypatch):
    from tunesmith.methods.sft import SFT

    real = SFT.loss
    calls = {"n": 0}

    def poisoned(self, policy, reference, batch):
        calls["n"] += 1
        loss, m = real(self, policy, reference, batch)
        return (loss * float("nan"), m) if calls["n"] == 5 else (loss, m)

    monkeypatch.setattr(SFT, "loss", poisoned)
    cfg = yaml.safe_load(make_config(tiny_dir, tmp_path).read_text())
    with pytest.raises(TrainingAborted) as e:
        tunesmith.train(cfg, progress=False)
    assert e.value.exit_code == 4 and "step 3" in e.value.message and "train.jsonl:" in e.value.message
    run = tmp_path / "runs" / "r"
    failure = json.loads((run / "failure.json").read_text())
    assert failure["step"] == 3 and failure["last_good_checkpoint"].endswith("step-000002")

    calls["n"] = 0
    cfg["train"]["skip_nonfinite"] = 1
    cfg["name"] = "skip"
    result = tunesmith.train(cfg, progress=False)
    records = [m for m in result.metrics if "loss" in m]
    assert len(records) == 6 and records[2].get("skipped") is True
    assert records[2]["loss"] != records[2]["loss"]  # the NaN is logged, not hidden


def test_out_of_memory_gives_advice_and_no_partial_checkpoint(tiny_dir, tmp_path, monkeypatch):
    from tunesmith.train import loop

    real = loop.Trainer.train_step

    def exhausting(self):
        if self.state.step == 2:
            raise MemoryError()
        return real(self)

    monkeypatch.setattr(loop.Trainer, "train_step", exhausting)
    with pytest.raises(TrainingAborted) as e:
        tunesmith.train(yaml.safe_load(make_config(tiny_dir, tmp_path).read_text()), progress=False)
    assert e.value.exit_code == 5 and "out of memory" in e.value.message
    for advice in ("micro_batch_size=1", "grad_accum=4", "grad_checkpointing", "qlora", "max_length"):
        assert advice in e.value.hint
    root = tmp_path / "runs" / "r" / "checkpoints"
    assert [p.name for p in checkpoint.checkpoint_dirs(root)] == ["step-000001", "step-000002"]
    assert not list(root.glob(".tmp-*"))

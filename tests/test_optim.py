"""train/optim.py: which optimizer each train.optimizer value builds (fused AdamW on CUDA, bitsandbytes' 8-bit
and paged ones), that they train, and that the 8-bit optimizer's state survives a checkpoint exactly;
model/memory.py: what run.json records."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import load_file

import tunesmith
from tunesmith.errors import TunesmithError
from tunesmith.model import memory
from tunesmith.train.checkpoint import _step
from tunesmith.train.optim import build_optimizer, make_optimizer, optimizer_spec


@pytest.mark.parametrize("name,device,cls,fused", [
    ("adamw", "cuda", "torch.AdamW", True), ("adamw", "cpu", "torch.AdamW", None),
    ("adamw_8bit", "cuda", "bitsandbytes.AdamW8bit", None), ("paged_adamw", "cuda", "bitsandbytes.PagedAdamW", None),
    ("paged_adamw_8bit", "cpu", "bitsandbytes.PagedAdamW8bit", None),
])
def test_optimizer_spec(name, device, cls, fused):
    got_cls, kwargs = optimizer_spec(name, device)
    assert got_cls == cls and kwargs.get("fused") == fused
    assert kwargs["betas"] == (0.9, 0.999) and kwargs["eps"] == 1e-8


def test_unknown_optimizer_and_missing_bitsandbytes_are_clear_errors(monkeypatch):
    with pytest.raises(TunesmithError, match="unknown optimizer 'sgd'"):
        optimizer_spec("sgd", "cpu")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    p = torch.nn.Parameter(torch.zeros(4))
    with pytest.raises(TunesmithError, match="needs bitsandbytes") as e:
        make_optimizer([{"params": [p]}], "adamw_8bit", 1e-3, "cpu")
    assert "tunesmith[qlora]" in e.value.hint


@pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")
@pytest.mark.parametrize("name", ["adamw", "adamw_8bit", "paged_adamw_8bit"])
def test_each_optimizer_trains_the_adapter(name):
    from speed_utils import tiny_lora
    from tunesmith.config import RunConfig

    model = tiny_lora(seed=1)
    cfg = RunConfig.model_validate({"data": {"train": "t.jsonl"}, "train": {"optimizer": name, "lr": 1e-2}})
    opt = build_optimizer(model, cfg)
    assert type(opt).__name__ == {"adamw": "AdamW", "adamw_8bit": "AdamW8bit",
                                  "paged_adamw_8bit": "PagedAdamW8bit"}[name]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ids = torch.randint(4, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert len(moved) == len(before)


def test_step_counts_come_back_as_each_optimizer_keeps_them():
    on_meta = torch.empty(3, device="meta")
    assert _step(3, on_meta, {}) == 3 and isinstance(_step(3, on_meta, {}), int)  # bitsandbytes
    assert _step(3.0, on_meta, {"fused": True}).device.type == "meta"  # fused AdamW reads it on the device
    assert _step(3.0, on_meta, {"capturable": True}).device.type == "meta"
    plain = _step(3.0, on_meta, {"fused": None})
    assert plain.device.type == "cpu" and plain.dtype == torch.float32 and float(plain) == 3.0


def test_8bit_adamw_resumes_bit_identically_and_run_json_has_memory(tiny_dir, tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"hello world {i}"},
                          {"role": "assistant", "content": ["card_arrival", "exchange_rate"][i % 2]}]}
            for i in range(8)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def config(name):
        # bitsandbytes' 8-bit AdamW runs on CPU too (device auto is the CPU here)
        return {"name": name, "model": str(tiny_dir), "output_dir": str(tmp_path / "runs"), "precision": "fp32", "data": {"train": str(data)},
                "adapter": {"kind": "lora", "r": 64},  # LoRA matrices of 4096+ weights get 8-bit moments
                "train": {"optimizer": "adamw_8bit", "lr": 5e-3, "max_steps": 4, "micro_batch_size": 2,
                          "save_every": 2, "keep_last": 2}}

    straight = tunesmith.train(config("straight"), progress=False)
    resumed = tunesmith.train(config("resumed"), progress=False,
                              resume=str(straight.path / "checkpoints" / "step-000002"))
    a = load_file(straight.path / "checkpoints" / "step-000004" / "trainable.safetensors")
    b = load_file(resumed.path / "checkpoints" / "step-000004" / "trainable.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    moments = load_file(straight.path / "checkpoints" / "step-000004" / "optimizer.safetensors")
    assert any(t.dtype == torch.uint8 for t in moments.values())  # really the 8-bit state
    info = json.loads((straight.path / "run.json").read_text())
    assert info["memory"]["peak_rss_mib"] > 100 and info["memory"]["cuda"] is None
    assert info["attention"]["batches"] == {"matmul": 5}  # 4 training steps and check_head's one batch


def test_cuda_peaks_read_the_allocator(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d=None: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda d=None: 4 * 2**30)

    class Props:
        total_memory = 141 * 2**30

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d=None: Props)
    assert memory.cuda_peaks("cuda") == {"peak_allocated_mib": 3072.0, "peak_reserved_mib": 4096.0,
                                         "total_mib": 144384.0}
    assert memory.cuda_peaks("cpu") is None


def test_8bit_state_through_torch_distributed_checkpoint_layout_round_trips(tmp_path):
    """The state-dict path multi-process checkpoints take (torch.distributed.checkpoint's optimizer state, by
    parameter name): bitsandbytes nests its 8-bit state in one dict entry, shares its quantisation maps between
    parameters and counts steps in an int; saved to safetensors and loaded into a fresh optimizer, the next
    step is bit-identical to the uninterrupted one."""
    from safetensors.torch import load_file, save_file
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    from tunesmith.train.checkpoint import _from_fqn_state, _to_fqn_state

    def setup():
        torch.manual_seed(0)
        policy = torch.nn.Module()
        policy.model = torch.nn.Sequential(torch.nn.Linear(64, 4096), torch.nn.Linear(4096, 8))
        return policy, make_optimizer([{"params": list(policy.parameters())}], "adamw_8bit", 1e-3, "cpu")

    def step(policy, opt, seed):
        opt.zero_grad()
        policy.model(torch.randn(4, 64, generator=torch.Generator().manual_seed(seed))).square().sum().backward()
        opt.step()

    a, opt_a = setup()
    step(a, opt_a, 1)
    tensors, meta = _from_fqn_state(get_optimizer_state_dict(a, opt_a), type(opt_a).__name__)
    assert any(k.endswith("__bnb_optimizer_quant_state__/state1") for k in tensors)
    assert {v["step"] for v in meta["scalars"].values()} == {1}  # an int, as bitsandbytes keeps it
    save_file(tensors, str(tmp_path / "opt.safetensors"))  # refuses tensors that share memory
    b, opt_b = setup()
    b.load_state_dict(a.state_dict())
    set_optimizer_state_dict(b, opt_b, _to_fqn_state(load_file(str(tmp_path / "opt.safetensors")), meta))
    step(a, opt_a, 2)
    step(b, opt_b, 2)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))

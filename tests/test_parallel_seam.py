"""The parallel seam in one process: every reduction is the identity, and the loop sees no difference."""

import pytest
import torch

from tunesmith.train.parallel import SingleProcess, setup_parallel


def test_one_process_reductions_are_identities():
    p = SingleProcess()
    assert p.sum([1.5, 2.0]) == [1.5, 2.0] and p.gather_bytes(b"ab") == [b"ab"]
    assert p.any(True) and not p.any(False)
    assert p.all_finite(1.0, 2.0) and not p.all_finite(1.0, float("nan"))
    w = torch.nn.Parameter(torch.ones(3))
    w.grad = torch.tensor([3.0, 4.0, 0.0])
    assert p.clip([w], None) == pytest.approx(5.0) and torch.equal(w.grad, torch.tensor([3.0, 4.0, 0.0]))
    assert p.clip([w], 1.0) == pytest.approx(5.0)
    torch.testing.assert_close(w.grad, torch.tensor([0.6, 0.8, 0.0]))


def test_one_process_without_torchrun_needs_no_process_group(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    engine = setup_parallel("ddp")  # asked for, but there is one process and no torchrun: nothing to join
    assert type(engine) is SingleProcess and engine.world_size == 1 and not torch.distributed.is_initialized()

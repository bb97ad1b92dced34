"""The parallel seam in one process: every reduction is the identity, and the loop sees no difference."""

import pytest
import torch

from tunesmith.errors import TunesmithError
from tunesmith.train.parallel import SingleProcess, setup_parallel


def test_one_process_reductions_are_identities():
    p = SingleProcess()
    assert p.sum([1.5, 2.0]) == [1.5, 2.0] and p.gather([{"a": 1}]) == [{"a": 1}]
    assert p.all_finite(1.0, 2.0) and not p.all_finite(1.0, float("nan"))
    w = torch.nn.Parameter(torch.ones(3))
    w.grad = torch.tensor([3.0, 4.0, 0.0])
    assert p.clip([w], None) == pytest.approx(5.0) and torch.equal(w.grad, torch.tensor([3.0, 4.0, 0.0]))
    assert p.clip([w], 1.0) == pytest.approx(5.0)
    torch.testing.assert_close(w.grad, torch.tensor([0.6, 0.8, 0.0]))


def test_several_processes_without_an_engine_refuse_to_start(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(TunesmithError, match="every rank would train alone"):
        setup_parallel()

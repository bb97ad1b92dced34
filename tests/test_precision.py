"""precision: auto picks what the device computes natively."""

import pytest
import torch

from tunesmith.model import device as dev


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_on_cpu_follows_native_bf16(monkeypatch, native, expected):
    monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda: native)
    assert dev.resolve_precision("auto", torch.device("cpu")) == expected


def test_explicit_choices_are_mapped_to_what_the_device_runs(monkeypatch):
    monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda: True)
    cpu, mps = torch.device("cpu"), torch.device("mps")
    assert dev.resolve_precision("fp16", cpu) == "bf16"
    assert dev.resolve_precision("fp32", cpu) == "fp32"
    assert dev.resolve_precision("bf16", mps) == "fp16"
    assert dev.resolve_precision("auto", mps) == "fp16"


def test_explicit_bf16_on_an_emulating_cpu_warns_and_is_kept(monkeypatch):
    monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda: False)
    with pytest.warns(UserWarning, match="no native bf16"):
        assert dev.resolve_precision("bf16", torch.device("cpu")) == "bf16"


def test_auto_on_cuda_depends_on_bf16_support(monkeypatch):
    for supported, expected in ((True, "bf16"), (False, "fp16")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda s=supported: s)
        assert dev.resolve_precision("auto", torch.device("cuda")) == expected


def test_the_detector_agrees_with_torch():
    assert dev.cpu_has_native_bf16() is bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())

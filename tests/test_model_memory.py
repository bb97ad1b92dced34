"""What a loaded model keeps mapped: after a load that converted the weights (NF4, another dtype) no tensor
points into the memory-mapped safetensors file any more, so its pages leave the process's RSS; a model loaded
in the file's own dtype keeps using the mapping (there it is the weights). And the peak RSS run.json reports is
the process's own."""

from __future__ import annotations

import gc

import pytest
import torch

from tunesmith.model.load import load_model_and_tokenizer
from tunesmith.model.memory import _mapped_checkpoints, peak_rss_mib, release_checkpoint_mapping


def mapped_model(tiny_dir):
    """The tiny model with its weights as views of the memory-mapped file (what transformers' loader gives when
    it assigns the file's tensors; built directly, so the test does not depend on the loader's path)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_dir), dtype=torch.float32)
    model.load_state_dict(load_file(str(tiny_dir / "model.safetensors")), assign=True, strict=False)
    model.tie_weights()
    for module in model.modules():  # buffers that are not in the file (rotary frequencies)
        for key, buf in list(module._buffers.items()):
            if buf is not None and buf.is_meta:
                module._buffers[key] = torch.zeros(buf.shape, dtype=buf.dtype)
    assert in_mapping(model), "safetensors' load_file maps the file on Linux"
    return model


def in_mapping(model) -> list[str]:
    ranges = _mapped_checkpoints()
    names = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
             if any(lo <= t.data_ptr() < hi for lo, hi in ranges)]
    return names


def test_a_model_in_the_files_dtype_keeps_its_mapped_weights(tiny_dir):
    model = mapped_model(tiny_dir)
    other = mapped_model(tiny_dir)  # another mapped file in the process: judged per file, not in total
    mapped = in_mapping(model)
    assert release_checkpoint_mapping(model) == 0 and release_checkpoint_mapping(other) == 0  # the weights are the mapping: nothing is copied
    assert in_mapping(model) == mapped


def test_qlora_load_leaves_nothing_in_the_mapped_file(tiny_dir):
    pytest.importorskip("bitsandbytes")
    files = str(tiny_dir / "model.safetensors")
    before = [r for r in _mapped_checkpoints()]
    model, _ = load_model_and_tokenizer(str(tiny_dir), precision="fp32", quantize_nf4=True, quantize_embeddings=False)
    assert in_mapping(model) == []  # norms and rotary buffers were copied out of the file
    gc.collect()
    assert len(_mapped_checkpoints()) <= len(before), files  # ... so the file's mapping is gone
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight  # ties survive
    ids = torch.tensor([[1, 30, 31, 32]])
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_release_copies_the_few_tensors_left_in_the_file_and_keeps_ties(tiny_dir):
    model = mapped_model(tiny_dir)
    with torch.no_grad():  # convert most weights (as a dtype conversion would), leave the norms in the file
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
                module.weight = torch.nn.Parameter(module.weight.detach().clone(), requires_grad=False)
    left = in_mapping(model)
    assert any("norm" in n for n in left)
    expected = {n: t.clone() for n, t in model.state_dict().items()}
    copied = release_checkpoint_mapping(model)
    assert copied > 0 and in_mapping(model) == []
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    for n, t in model.state_dict().items():
        assert torch.equal(t, expected[n]), n


def test_peak_rss_is_this_processes_own():
    peak = peak_rss_mib()
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    assert peak == pytest.approx(hwm, abs=1.0)

"""Multi-stage runs: SFT then DPO. The DPO stage starts from the SFT adapter and uses it as its reference."""

import json

import pytest
import torch

import tunesmith
from pref_utils import pair_rows, quiet, steps, write_jsonl
from tunesmith.data.batching import collate
from tunesmith.data.load import load_data
from tunesmith.data.render import Renderer
from tunesmith.methods import get_method
from tunesmith.methods.logps import sequence_logps


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))


def _sft_rows() -> list[dict]:
    return [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["chosen"]}]}
            for r in pair_rows()]


def _reference_from(model, tok, pairs_file) -> torch.Tensor:
    """Summed log-probs of the pairs' chosen and rejected sequences under `model`, scored here, not by the
    run, in the cache's canonical order (sequences sorted by token ids and labels)."""
    method = get_method("dpo")
    renderer = Renderer(tok, 64)
    items = [method.render(renderer, ex) for ex in load_data(_data_cfg(pairs_file), 0)[0].examples]
    seqs = [s for item in items for s in (item.chosen, item.rejected)]
    with torch.no_grad():
        logp = sequence_logps(model.eval(), collate(seqs, 2)).logp_sum  # one sequence per row, no sharing
    by_key = {(s.input_ids, s.labels): v for s, v in zip(seqs, logp.tolist(), strict=True)}
    return torch.tensor([by_key[k] for k in sorted(by_key)])


def _data_cfg(path):
    from tunesmith.config import DataConfig

    return DataConfig(train=str(path), max_length=64)


def test_sft_then_dpo(tiny_dir, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.model.adapters import load_adapter

    sft_file = write_jsonl(tmp_path / "sft.jsonl", _sft_rows())
    pairs_file = write_jsonl(tmp_path / "pairs.jsonl", pair_rows())
    cfg = {"name": "two", "output_dir": str(tmp_path / "runs"), "model": str(tiny_dir), "device": "cpu",
           "precision": "fp32", "data": {"max_length": 64},
           "train": {"micro_batch_size": 8, "lr": 1e-2, "warmup_ratio": 0.0, "schedule": "constant"},
           "stages": [{"method": "sft", "data": str(sft_file), "train": {"max_steps": 8}},
                      {"method": "dpo", "data": str(pairs_file), "beta": 0.2,
                       "train": {"max_steps": 3, "lr": 3e-3}}]}
    console, buf = quiet()
    run = tunesmith.train(cfg, progress=False, console=console)
    sft_dir, dpo_dir = run.path / "stages" / "1-sft", run.path / "stages" / "2-dpo"
    for d in (sft_dir, dpo_dir):
        assert (d / "adapter" / "adapter_model.safetensors").exists() and (d / "run.json").exists()
        assert (d / "report.html").exists() and (d / "report.md").exists()
    assert "stage 2/2" in buf.getvalue()

    final = (run.adapter / "adapter_model.safetensors").read_bytes()
    assert final == (dpo_dir / "adapter" / "adapter_model.safetensors").read_bytes()
    assert final != (sft_dir / "adapter" / "adapter_model.safetensors").read_bytes()

    dpo_info = json.loads((dpo_dir / "run.json").read_text())
    assert dpo_info["method"] == "dpo" and dpo_info["reference"]["key"] == run.info["reference"]["key"]
    assert [s.path for s in run.stages] == [sft_dir, dpo_dir]

    # the DPO stage starts from the SFT adapter: policy == reference at its first step
    first = steps(run.stages[1])[0]
    assert first["loss"] == pytest.approx(0.6931471805599453, abs=1e-6)
    assert abs(first["rewards/margins"]) < 1e-5

    # ... and its reference is the SFT model's log-probs, not the base model's
    cached = load_file(dpo_info["reference"]["path"])["train.logp"]
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    sft_model = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_dir), sft_dir / "adapter")
    base_model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    from_sft, from_base = _reference_from(sft_model, tok, pairs_file), _reference_from(base_model, tok, pairs_file)
    torch.testing.assert_close(cached, from_sft, atol=1e-4, rtol=0)
    assert (cached - from_base).abs().max() > 1.0  # SFT moved the log-probs far from the base's


def test_stage_of_full_fine_tuning_continues_from_the_previous_checkpoint(tiny_dir, tmp_path):
    sft_file = write_jsonl(tmp_path / "sft.jsonl", _sft_rows())
    pairs_file = write_jsonl(tmp_path / "pairs.jsonl", pair_rows())
    cfg = {"name": "full", "output_dir": str(tmp_path / "runs"), "model": str(tiny_dir), "device": "cpu",
           "precision": "fp32", "adapter": "full", "data": {"max_length": 64},
           "train": {"micro_batch_size": 8, "lr": 1e-3, "warmup_ratio": 0.0, "max_steps": 2},
           "stages": [{"method": "sft", "data": str(sft_file)}, {"method": "dpo", "data": str(pairs_file)}]}
    run = tunesmith.train(cfg, progress=False, console=quiet()[0])
    sft_dir = run.path / "stages" / "1-sft"
    assert run.stages[1].config.model == str(sft_dir / "adapter")
    assert steps(run.stages[1])[0]["loss"] == pytest.approx(0.6931471805599453, abs=1e-6)
    assert (run.adapter / "config.json").exists()


def test_run_report_charts_and_summary(tmp_path):
    import xml.etree.ElementTree as ET

    from tunesmith.train.report import PAD_B, PAD_T, H, write_run_report

    records = [{"event": "start"}] + [
        {"step": s, "loss": 1.0 / s, "lr": 1e-3, "rewards/margins": 0.1 * s, "rewards/accuracies": 0.5,
         "kl": float("nan") if s == 2 else 0.2} for s in range(1, 5)]
    records[-1]["eval_loss"] = 0.3
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "run.json").write_text(json.dumps({"name": "r", "method": "kto", "reference": {"key": "ab" * 32,
                                                                                             "cache_hit": True}}))
    html_path, md_path = write_run_report(tmp_path)
    svgs = html_path.read_text().split("<div>")[1:]
    charts = {ET.fromstring(s.split("</div>")[0]).get("aria-label"): ET.fromstring(s.split("</div>")[0])
              for s in svgs}
    ns = "{http://www.w3.org/2000/svg}"
    assert set(charts) == {"Loss", "Reward margin (chosen − rejected)", "Reward accuracy",
                           "KL estimate (KTO z0; GRPO: to the reference)", "Learning rate"}
    loss = charts["Loss"]
    line = loss.find(f"{ns}polyline")
    ys = [float(p.split(",")[1]) for p in line.get("points").split()]
    assert ys[0] == pytest.approx(PAD_T) and ys[-1] == pytest.approx(H - PAD_B)  # max at the top, min at the bottom
    assert loss.find(f"{ns}circle") is not None  # eval_loss: a single point
    kl_points = charts["KL estimate (KTO z0; GRPO: to the reference)"].find(f"{ns}polyline").get("points").split()
    assert len(kl_points) == 3  # the NaN step is left out
    md = md_path.read_text()
    assert "| loss | 1 | 0.25 | 0.25 | 1 |" in md and "| rewards/margins | 0.1 | 0.4 | 0.1 | 0.4 |" in md
    assert "cache hit" in md and "steps: 4" in md

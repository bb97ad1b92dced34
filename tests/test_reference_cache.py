"""The reference log-probs cache: hits on a rerun with identical losses, misses when anything it depends on
changes, safetensors + JSON only, and the numbers are the base model's log-probs."""

import json
import re

import pytest
import torch

import tunesmith
from pref_utils import pair_rows, quiet, run_config, steps, write_jsonl
from tunesmith.methods.reference import cache_dir

KEY = re.compile(r"[0-9a-f]{64}")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))


def _train(cfg):
    console, buf = quiet()
    run = tunesmith.train(cfg, progress=False, console=console)
    info = json.loads((run.path / "run.json").read_text())
    return run, info["reference"], buf.getvalue()


def test_rerun_hits_the_cache_with_identical_losses(tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows())
    cfg = run_config(tiny_dir, tmp_path / "runs", "dpo", data, train={"max_steps": 3})
    run1, ref1, out1 = _train(cfg)
    assert ref1["cache_hit"] is False and KEY.fullmatch(ref1["key"]) and "cache miss" in out1
    files = sorted(p.name for p in cache_dir().iterdir())
    assert files == [f"{ref1['key']}.json", f"{ref1['key']}.safetensors"]
    sidecar = json.loads((cache_dir() / f"{ref1['key']}.json").read_text())
    assert sidecar["key"] == ref1["key"] and sidecar["sequences"] == {"train": 16}  # 8 pairs
    assert set(sidecar["parts"]) >= {"model", "adapter", "quantization", "template", "precision", "sequences"}

    cfg["name"] = "again"
    run2, ref2, out2 = _train(cfg)
    assert ref2 == {**ref1, "cache_hit": True}
    assert f"reference log-probs: cache hit ({ref1['key']})" in out2
    assert [r["loss"] for r in steps(run2)] == [r["loss"] for r in steps(run1)]

    cfg["name"], cfg["method"] = "ipo", "ipo"  # same sequences, same reference: shared
    assert _train(cfg)[1]["cache_hit"] is True


def test_changed_data_or_max_length_misses(tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows())
    cfg = run_config(tiny_dir, tmp_path / "runs", "dpo", data, train={"max_steps": 1})
    key = _train(cfg)[1]["key"]

    other = write_jsonl(tmp_path / "other.jsonl", pair_rows(shift=2))
    changed = _train({**cfg, "name": "data", "data": {**cfg["data"], "train": str(other)}})[1]
    assert changed["cache_hit"] is False and changed["key"] != key

    prompted = _train({**cfg, "name": "sys", "data": {**cfg["data"], "system_prompt": "Answer briefly."}})[1]
    assert prompted["cache_hit"] is False and prompted["key"] not in (key, changed["key"])
    # the key is the scored sequences' content: a max_length that cuts none of them changes nothing
    longer = _train({**cfg, "name": "len", "data": {**cfg["data"], "max_length": 48}})[1]
    assert longer["cache_hit"] is True and longer["key"] == key
    cut = _train({**cfg, "name": "cut", "data": {**cfg["data"], "max_length": 24, "truncation": "left"}})[1]
    assert cut["cache_hit"] is False and cut["key"] != key

    bf16 = _train({**cfg, "name": "bf16", "precision": "bf16"})[1]
    assert bf16["cache_hit"] is False and bf16["key"] != key


def test_cache_off_writes_nothing_and_damaged_file_is_recomputed(tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows())
    cfg = run_config(tiny_dir, tmp_path / "runs", "dpo", data, train={"max_steps": 1},
                     method_args={"reference_cache": False})
    run, ref, out = _train(cfg)
    assert "cache off" in out and not cache_dir().exists() and ref["path"] is None

    cfg["method_args"] = {}
    first = _train(cfg)
    path = cache_dir() / f"{first[1]['key']}.safetensors"
    path.write_bytes(b"not a safetensors file")
    again = _train({**cfg, "name": "again"})
    assert again[1]["cache_hit"] is False and "cache miss" in again[2]
    assert [r["loss"] for r in steps(again[0])] == [r["loss"] for r in steps(first[0])]


def test_cached_values_are_the_base_models_log_probs(tiny_dir, tmp_path):
    """A fresh LoRA adapter's reference is the base model: score the pairs independently and compare."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows())
    eval_data = write_jsonl(tmp_path / "eval.jsonl", pair_rows(4, shift=1))
    cfg = run_config(tiny_dir, tmp_path / "runs", "dpo", data, data={"eval": str(eval_data)},
                     train={"max_steps": 2, "eval_every": 2})
    run, ref, _ = _train(cfg)
    tables = load_file(ref["path"])
    assert tables["train.logp"].shape == (16,) and tables["eval.logp"].shape == (8,)  # distinct sequences

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    for name, rows in (("train", pair_rows()), ("eval", pair_rows(4, shift=1))):
        expected = sorted(_completion_logp(model, tok, row["prompt"], row[side])
                          for row in rows for side in ("chosen", "rejected"))
        assert sorted(tables[f"{name}.logp"].tolist()) == pytest.approx(expected, abs=1e-4)
    assert torch.isfinite(torch.tensor(steps(run)[-1]["eval_loss"]))


def _completion_logp(model, tok, prompt: str, reply: str) -> float:
    """log p(reply tokens + end-of-turn | prompt), by hand from the chat template."""
    before = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                     add_generation_prompt=True)
    full = tok.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}],
                                   tokenize=False)
    full = full[: full.rindex("<|im_end|>") + len("<|im_end|>")]
    ids = tok(full, add_special_tokens=False)["input_ids"]
    start = len(tok(before, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    return sum(logp[t - 1, ids[t]].item() for t in range(start, len(ids)))

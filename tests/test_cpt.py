"""Continued pre-training end to end on the tiny model: documents from a folder to a trained adapter to a
perplexity eval (CLI and Python API), the settings' checks, and the embedding / head learning rate."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import tunesmith
from tunesmith.cli import main
from tunesmith.config import AdapterConfig
from tunesmith.data.types import Document, Source
from tunesmith.errors import ConfigError, TunesmithError

TOPIC = ("the quick brown fox jumps over the lazy dog and the dog sleeps while the fox runs to the river "
         "where the water is cold and clear and the fox drinks before it runs home again")


def docs_folder(root: Path, n: int, offset: int = 0) -> Path:
    """Documents in one style and vocabulary: the same sentence with the words rotated."""
    root.mkdir(parents=True, exist_ok=True)
    words = TOPIC.split()
    for i in range(n):
        k = (i + offset) * 3 % len(words)
        (root / f"doc{i:02d}.md").write_text(f"# note {i + offset}\n\n" + " ".join(words[k:] + words[:k]) + "\n")
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("cpt")
    general = root / "general.jsonl"
    general.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"hello {i}"},
                                                        {"role": "assistant", "content": "how are you today"}]})
                               + "\n" for i in range(4)))
    return {"root": root, "train": docs_folder(root / "train", 12), "held": docs_folder(root / "held", 8, 40),
            "general": general}


def cpt_config(tiny_dir, corpus, name="cpt", **data):
    return {"name": name, "output_dir": str(corpus["root"] / "runs"), "model": str(tiny_dir), "method": "cpt",
            "device": "cpu", "precision": "fp32",
            "data": {"train": str(corpus["train"]), "eval": str(corpus["held"]), "max_length": 24,
                     "window_overlap": 4, **data},
            "adapter": {"kind": "lora", "r": 8, "alpha": 16},
            "train": {"lr": 1e-2, "max_steps": 30, "micro_batch_size": 8, "warmup_ratio": 0.0},
            "eval": {"candidates": ["base", "tuned"], "metrics": ["perplexity"], "regression": str(corpus["general"])}}


def test_cpt_from_a_folder_of_documents_to_a_perplexity_win(tiny_dir, corpus):
    run = tunesmith.train(cpt_config(tiny_dir, corpus), progress=False)
    render = run.info["data"]["render"]
    assert run.info["data"]["format"] == "text" and run.info["data"]["examples"] == 12
    assert render["documents"] == 12 and render["windows"] > 12 and render["dropped"] == 0
    assert render["trained_tokens"] == render["tokens"] - 12  # overlap >= 1: every token but each first
    assert run.info["plan"]["data"]["examples"] == render["windows"]  # the plan before training: the same windows
    losses = [m["loss"] for m in run.metrics if "loss" in m]
    assert losses[-1] < losses[0] - 1.0, losses
    summary = run.info["eval"]
    assert summary["won"] is True
    scores = summary["scores"]["perplexity"]
    assert scores["tuned"]["hi"] < scores["base"]["lo"]  # held-out documents in the same style: clearly better
    results = json.loads((run.path / "eval" / "results.json").read_text())
    ppl = results["perplexity"]["perplexity"]
    assert ppl["tuned"]["perplexity"] == pytest.approx(math.exp(scores["tuned"]["mean"]))
    assert results["n"] == 8 and all(n > 0 for n in results["documents"]["scored_tokens"])
    # the regression set (conversations) is scored on its answers' tokens: what the adaptation cost
    reg = summary["regression"]["scores"]["perplexity"]
    assert set(reg) == {"base", "tuned"} and all(v["mean"] > 0 for v in reg.values())


def test_document_nll_equals_the_model_on_each_whole_document(tiny_dir, corpus):
    """Documents shorter than the eval window are scored in one piece: the model's own log-softmax."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.data.documents import document_ids, end_of_text_id
    from tunesmith.eval.candidates import Candidate
    from tunesmith.eval.documents import document_nll
    from tunesmith.eval.engine import Engine

    engine = Engine(str(tiny_dir), [Candidate("base")], device="cpu", precision="fp32")
    docs = [Document(p.read_text(), Source(str(p), 1)) for p in sorted(corpus["held"].iterdir())]
    nll, counts = document_nll(engine, Candidate("base"), docs)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    for doc, got, n in zip(docs, nll, counts, strict=True):
        ids = torch.tensor([document_ids(tok, doc.text, end_of_text_id(tok), False)])
        with torch.no_grad():
            logp = model(ids).logits.log_softmax(-1)[0, :-1].gather(-1, ids[0, 1:, None]).squeeze(-1)
        assert n == ids.shape[1] - 1 and got == pytest.approx(float(-logp.mean()), rel=1e-5)


def test_cpt_through_the_cli_and_cross_document_windows(tiny_dir, corpus, tmp_path, capsys):
    import yaml

    cfg = cpt_config(tiny_dir, corpus, name="cli", cross_document=True, window_overlap=0)
    cfg.pop("eval")
    cfg["train"]["max_steps"] = 4
    path = tmp_path / "cpt.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path), "--no-progress"]) == 0
    info = json.loads((corpus["root"] / "runs" / "cli" / "run.json").read_text())
    render = info["data"]["render"]
    assert render["documents"] == 12 and render["windows"] == math.ceil(render["tokens"] / 24)
    out = tmp_path / "eval"
    run = corpus["root"] / "runs" / "cli"
    assert main(["eval", "--data", str(corpus["held"]), "--candidates", f"base,{run}", "--metric", "perplexity",
                 "--out", str(out), "--device", "cpu", "--precision", "fp32"]) == 0
    captured = capsys.readouterr()
    assert "eval: base perplexity" in captured.err and f"eval: {run} perplexity" in captured.err
    results = json.loads((out / "results.json").read_text())
    assert results["n"] == 8 and set(results["perplexity"]["perplexity"]) == {"base", str(run)}


def test_documents_refuse_generation_metrics_and_few_shot(tiny_dir, corpus):
    with pytest.raises(TunesmithError, match="documents, which have no answers to generate"):
        tunesmith.evaluate(str(corpus["held"]), ["base"], metrics=["exact"], device="cpu", precision="fp32",
                           base=str(tiny_dir))
    with pytest.raises(TunesmithError, match="few-shot candidates and a judge do not apply"):
        tunesmith.evaluate(str(corpus["held"]), ["base", "base+fewshot:2"], metrics=["perplexity"], device="cpu",
                           precision="fp32", base=str(tiny_dir))


def test_cpt_settings_are_checked(tiny_dir, corpus):
    cfg = cpt_config(tiny_dir, corpus, window_overlap=23)
    with pytest.raises(ConfigError) as err:
        tunesmith.parse_config(cfg)
    assert [p.where for p in err.value.problems] == ["data.window_overlap"]
    sft = cpt_config(tiny_dir, corpus, cross_document=True)
    sft["method"] = "sft"
    with pytest.raises(ConfigError) as err:
        tunesmith.parse_config(sft)
    assert sorted(p.where for p in err.value.problems) == ["data.cross_document", "data.window_overlap"]
    lr = cpt_config(tiny_dir, corpus)
    lr["adapter"]["embedding_lr"] = 1e-5
    with pytest.raises(ConfigError, match="nothing trains the input embedding or output head"):
        tunesmith.parse_config(lr)
    lr["adapter"]["modules_to_save"] = ["embed_tokens"]
    assert tunesmith.parse_config(lr).adapter.embedding_lr == 1e-5
    wrong_data = cpt_config(tiny_dir, corpus)
    wrong_data.update(method="sft")
    wrong_data["data"] = {"train": str(corpus["train"])}
    wrong_data.pop("eval")
    with pytest.raises(TunesmithError, match="documents .* for cpt"):
        tunesmith.train(wrong_data, progress=False, evaluate=False)


def test_embedding_lr_gives_the_embedding_and_head_their_own_group(tiny_dir):
    from transformers import AutoModelForCausalLM

    from tunesmith.model.adapters import apply_adapter, optimizer_param_groups

    cfg = AdapterConfig(kind="lora", r=4, modules_to_save=["embed_tokens", "lm_head"], embedding_lr=1e-5)
    with pytest.warns(UserWarning):  # PEFT: tied embeddings listed in modules_to_save
        model = apply_adapter(AutoModelForCausalLM.from_pretrained(tiny_dir), cfg)
    groups = {g["name"]: g for g in optimizer_param_groups(model, cfg, lr=1e-3, weight_decay=0.1)}
    copies = [p for n, p in model.named_parameters() if ".modules_to_save." in n]
    assert len(copies) == 2 and {id(p) for p in groups["embedding"]["params"]} == {id(p) for p in copies}
    assert groups["embedding"]["lr"] == 1e-5 and groups["decay"]["lr"] == 1e-3
    assert not any(".modules_to_save." in n for n, p in model.named_parameters()
                   if any(p is q for q in groups["decay"]["params"]))
    full_cfg = AdapterConfig(kind="full", embedding_lr=1e-5)
    full = apply_adapter(AutoModelForCausalLM.from_pretrained(tiny_dir), full_cfg)
    groups = {g["name"]: g for g in optimizer_param_groups(full, full_cfg, lr=1e-3, weight_decay=0.0)}
    assert [p is full.get_input_embeddings().weight for p in groups["embedding"]["params"]] == [True]  # tied: once
    assert sum(len(g["params"]) for g in groups.values()) == sum(1 for p in full.parameters() if p.requires_grad)


def test_stages_cpt_then_sft(tiny_dir, corpus):
    """Adapt to the domain's text first, then teach the task: each stage starts from the one before."""
    cfg = {"name": "staged", "output_dir": str(corpus["root"] / "runs"), "model": str(tiny_dir), "device": "cpu",
           "precision": "fp32", "data": {"max_length": 24, "window_overlap": 2},
           "train": {"lr": 1e-2, "max_steps": 3, "micro_batch_size": 4, "warmup_ratio": 0.0},
           "stages": [{"method": "cpt", "data": str(corpus["train"])},
                      {"method": "sft", "data": {"train": str(corpus["general"]), "max_length": 64}}]}
    run = tunesmith.train(cfg, progress=False)
    first, second = run.stages
    assert first.info["method"] == "cpt" and first.info["data"]["render"]["documents"] == 12
    assert second.info["method"] == "sft" and "documents" not in second.info["data"]["render"]
    assert (run.path / "adapter" / "adapter_model.safetensors").exists()


def test_two_processes_train_cross_document_windows_as_one(tiny_dir, corpus, tmp_path):
    """DDP on 2 processes (gloo, torchrun) at global batch 8 = 2 x 2 x 2 trains the same steps as one process
    at 2 x 4: the stream of documents is cut into the same windows on every rank."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    here = Path(__file__).resolve().parent
    cfg = cpt_config(tiny_dir, corpus, name="ddp", cross_document=True)
    cfg.pop("eval")
    cfg["output_dir"] = str(tmp_path / "two")
    cfg["train"].update(max_steps=3, micro_batch_size=2, global_batch_size=8, lr=5e-3)
    (tmp_path / "jobs.json").write_text(json.dumps([{"config": cfg}]))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here.parent / "src"), str(here)]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(here / "dist_driver.py"), str(tmp_path / "jobs.json"), str(tmp_path / "out.jsonl")],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes, ddp" in proc.stderr
    assert json.loads((tmp_path / "out.jsonl").read_text()) == {"name": "ddp", "ok": True}
    one = tunesmith.train({**cfg, "output_dir": str(tmp_path / "one")}, progress=False, evaluate=False)

    def run_losses(path: Path) -> list[float]:
        return [r["loss"] for r in map(json.loads, (path / "metrics.jsonl").read_text().splitlines()) if "loss" in r]

    two = tmp_path / "two" / "ddp"
    assert len(run_losses(two)) == 3 and run_losses(two) == pytest.approx(run_losses(one.path), abs=1e-5)
    w1, w2 = (load_file(next((p / "adapter").glob("*.safetensors"))) for p in (one.path, two))
    assert w1.keys() == w2.keys() and w1
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=1e-5, rtol=0)

"""`tunesmith eval` end to end on the tiny model: few-shot prompts, one base load with swapped adapters,
--require-win on a planted win and on a no-op adapter, the loss metric against a hand computation, the
report files, the LLM judge over HTTP, and the eval at the end of `tunesmith.train`."""

from __future__ import annotations

import json
import random
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import tunesmith
from tunesmith.cli import main
from tunesmith.data.types import Conversation, Message, Source
from tunesmith.errors import TunesmithError
from tunesmith.eval import engine as engine_module
from tunesmith.eval.candidates import parse_candidates, pick_shots, with_shots

LABEL = "card_arrival"
WORDS = "hello world how are you today the quick brown fox jumps over lazy dog".split()
COMMON = ["--device", "cpu", "--precision", "fp32", "--max-new-tokens", "8"]


def _prompts(n: int, seed: int, length: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(length)) for _ in range(n)]


def _write(path: Path, prompts: list[str], answer: str = LABEL) -> Path:
    rows = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": answer}]} for p in prompts]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def trainable_tiny(tiny_dir: Path, out: Path) -> Path:
    """The tiny model, made able to learn a fixed answer with LoRA in a few steps. Its `<|im_end|>` (pad ==
    eos) embedding row is zero (padding_idx), so with tied weights that token's logit is stuck at 0 and the
    model could never learn to stop: give the row random values like the others. A doubled final-norm scale
    lets the logits become confident within a few steps."""
    from transformers import AutoModelForCausalLM

    shutil.copytree(tiny_dir, out)
    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        noise = torch.randn(emb.shape[1], generator=torch.Generator().manual_seed(0))
        emb[model.config.eos_token_id] = noise * emb.std()
        model.model.norm.weight.mul_(2.0)
    model.save_pretrained(out)
    return out


def noop_run(model_dir: Path, path: Path) -> Path:
    """A run whose LoRA adapter is freshly initialised (B = 0): it answers exactly as the base model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.config import AdapterConfig
    from tunesmith.model.adapters import apply_adapter, save_adapter
    from tunesmith.model.load import model_identity

    model = apply_adapter(AutoModelForCausalLM.from_pretrained(model_dir), AdapterConfig(kind="lora", r=4))
    save_adapter(model, path / "adapter")
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(path / "adapter")
    info = {"name": path.name, "model": str(model_dir), "adapter_kind": "lora",
            "base_model": model_identity(str(model_dir))}
    (path / "run.json").write_text(json.dumps(info))
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_dir):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("eval_run")
    model_dir = trainable_tiny(Path(tiny_dir), root / "model")
    eval_prompts = _prompts(12, seed=1, length=5)
    train = _write(root / "train.jsonl", _prompts(24, seed=0, length=4))
    held_out = _write(root / "eval.jsonl", eval_prompts)
    general = _write(root / "general.jsonl", _prompts(8, seed=2, length=3), answer="hello world")
    config = {
        "name": "fit", "output_dir": str(root / "runs"), "model": str(model_dir), "device": "cpu",
        "precision": "fp32", "data": {"train": str(train), "max_length": 64},
        "adapter": {"kind": "lora", "r": 8, "alpha": 16},
        "train": {"lr": 1e-2, "epochs": 6, "micro_batch_size": 8, "warmup_ratio": 0.0, "schedule": "constant",
                  "packing": False},
        "eval": {"data": str(held_out), "candidates": ["base", "base+fewshot:2", "tuned"],
                 "metrics": ["exact", "loss"], "max_new_tokens": 8},
    }
    run = tunesmith.train(config, progress=False)
    noop = noop_run(model_dir, root / "runs" / "noop")
    return SimpleNamespace(root=root, model=model_dir, train=train, eval=held_out, general=general,
                           eval_prompts=eval_prompts, run=run, fit=run.path, noop=noop)


def _conv(user: str, answer: str, line: int, system: str | None = None) -> Conversation:
    msgs = ([Message("system", system)] if system else []) + [Message("user", user), Message("assistant", answer)]
    return Conversation(tuple(msgs), Source("train.jsonl", line))


def test_fewshot_shots_are_seeded_training_examples_never_eval_prompts():
    train = [_conv(f"question {i}", f"answer {i}", i + 1) for i in range(30)]
    eval_prompts = [(Message("system", "Be brief."), Message("user", f"question {i}")) for i in range(0, 30, 2)]
    # the same eval prompts, differently cased and spaced, still count as eval prompts
    eval_prompts += [(Message("user", f"  QUESTION   {i} "),) for i in range(1, 6, 2)]
    shots = pick_shots(train, 5, seed=3, exclude=eval_prompts)
    assert shots == pick_shots(train, 5, seed=3, exclude=eval_prompts)
    assert shots != pick_shots(train, 5, seed=4, exclude=eval_prompts)
    used = {int(s.messages[0].content.split()[1]) for s in shots}
    assert len(used) == 5 and all(i % 2 == 1 and i > 5 for i in used)
    prompt = with_shots(eval_prompts[0], shots)
    assert prompt[0] == Message("system", "Be brief.") and prompt[-1] == eval_prompts[0][1]
    demos = prompt[1:-1]
    assert [m.role for m in demos] == ["user", "assistant"] * 5
    assert [m.content for m in demos[::2]] == [s.messages[0].content for s in shots]
    assert not any(m.train for m in demos)  # shots are context: the loss metric never scores them
    with pytest.raises(TunesmithError, match="only 12 available"):
        pick_shots(train, 13, seed=0, exclude=eval_prompts)


def test_fewshot_in_the_cli_draws_from_train_data_and_records_sources(env, tmp_path):
    overlap = tmp_path / "train_overlap.jsonl"
    _write(overlap, env.eval_prompts[:6] + _prompts(3, seed=9, length=2))
    out = tmp_path / "out"
    code = main(["eval", "--data", str(env.eval), "--candidates", "base,base+fewshot:3", "--train-data",
                 str(overlap), "--base", str(env.model), "--out", str(out), *COMMON])
    assert code == 0
    shots = json.loads((out / "results.json").read_text())["fewshot"]["base+fewshot:3"]
    assert sorted(shots) == [f"{overlap}:{line}" for line in (7, 8, 9)]  # the only rows not in the eval set
    code = main(["eval", "--data", str(env.eval), "--candidates", "base,base+fewshot:4", "--train-data",
                 str(overlap), "--base", str(env.model), "--out", str(out), *COMMON])
    assert code == 2  # a clear error: only 3 training examples are not eval prompts


def test_candidates_share_one_base_load_and_swap_adapters(env, tmp_path, monkeypatch):
    loads = []
    real = engine_module.load_model_and_tokenizer

    def counting(*args, **kwargs):
        loads.append(args[0] if args else kwargs.get("spec"))
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_module, "load_model_and_tokenizer", counting)
    created = []
    real_engine = engine_module.Engine

    class Spy(real_engine):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            created.append(self)

    monkeypatch.setattr("tunesmith.eval.run.Engine", Spy)
    result = tunesmith.evaluate(env.eval, [str(env.fit), str(env.noop), "base", f"{env.fit}+fewshot:2"],
                                metrics=["exact"], train_data=env.train, device="cpu", precision="fp32",
                                max_new_tokens=8)
    assert loads == [str(env.model)]  # the base is loaded once, for every candidate
    (engine,) = created
    assert sorted(engine.adapters.names) == ["candidate0", "candidate1"]  # the fit run is attached once
    out = result.main.outputs
    assert out[str(env.noop)] == out["base"]  # a zero adapter answers exactly as the base model
    assert out[str(env.fit)] == [LABEL] * 12 and out["base"] != [LABEL] * 12
    assert result.main.tuned == [str(env.fit), str(env.noop), f"{env.fit}+fewshot:2"]


def test_shared_prefix_generation_equals_plain_generation(env, monkeypatch):
    from tunesmith.eval.candidates import Candidate
    from tunesmith.model.generate import Generator

    system = Message("system", "Answer with the label only. " * 4)
    prompts = [(system, Message("user", p)) for p in env.eval_prompts[:6]]
    engine = engine_module.Engine(str(env.model), [Candidate("fit", env.fit)], device="cpu", precision="fp32",
                                  batch_size=4, max_new_tokens=6)
    prefixes = []
    real = Generator._prefix_cache
    monkeypatch.setattr(Generator, "_prefix_cache", lambda self, p, r: prefixes.append(len(p)) or real(self, p, r))
    for candidate in (None, Candidate("fit", env.fit)):
        engine.use(candidate)
        engine.generator.share_prefix = True
        shared = engine.generator.generate(prompts)
        engine.generator.share_prefix = False
        assert engine.generator.generate(prompts) == shared
    assert len(prefixes) == 4 and min(prefixes) >= 16  # 2 batches x 2 candidates ran the prefix once each


def test_require_win_fails_against_itself_and_passes_a_planted_win(env, tmp_path, capsys):
    out = tmp_path / "noop"
    code = main(["eval", "--data", str(env.eval), "--candidates", f"base,{env.noop}", "--metric", "exact",
                 "--require-win", "--out", str(out), *COMMON])
    assert code == 6  # the verdict's own exit code
    err = capsys.readouterr().err
    assert f"{env.noop} does NOT beat base" in err and "The fine-tune does NOT win" in err
    assert json.loads((out / "results.json").read_text())["won"] is False  # written before failing

    out = tmp_path / "fit"
    code = main(["eval", "--data", str(env.eval), "--candidates", f"base,{env.fit}", "--metric", "exact",
                 "--require-win", "--out", str(out), *COMMON])
    assert code == 0
    err = capsys.readouterr().err
    assert f"{env.fit} beats base by +100.0 pts" in err and "The fine-tune wins" in err


def test_results_and_reports_with_per_example_outputs(env, tmp_path):
    out = tmp_path / "out"
    code = main(["eval", "--data", str(env.eval), "--candidates", f"base,{env.fit}", "--metric", "exact",
                 "--metric", "contains", "--out", str(out), "--max-examples", "5", *COMMON])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["n"] == 5 and results["candidates"] == ["base", str(env.fit)]
    assert results["metrics"] == ["exact", "contains"]
    held = [json.loads(line) for line in env.eval.read_text().splitlines()]
    prompts = {"user: " + row["messages"][0]["content"] for row in held}
    for row in results["examples"]:
        assert row["prompt"] in prompts and row["reference"] == LABEL
        assert row["outputs"][str(env.fit)] == LABEL and row["scores"]["exact"][str(env.fit)] == 1.0
        assert row["scores"]["exact"]["base"] == float(row["outputs"]["base"].strip() == LABEL)
    md = (out / "report.md").read_text()
    assert "# Eval report (5 examples)" in md and f"{env.fit} beats base" not in md  # n = 5: not significant
    assert f"{env.fit} does NOT beat base" in md
    html = (out / "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and "<svg" in html


def test_loss_metric_matches_a_hand_computation_and_lower_is_better(env):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = tunesmith.evaluate(env.eval, ["base", str(env.fit)], metrics=["loss"], device="cpu", precision="fp32")
    (comparison,) = result.main.comparisons
    assert comparison.higher_is_better is False and comparison.unit == "nats"
    assert result.main.outputs == {}  # loss alone needs no generation
    (pair,) = comparison.pairs
    assert pair.outcome == "win" and pair.diff < 0 and "lower is better" in pair.verdict

    tok = AutoTokenizer.from_pretrained(env.model)
    base = AutoModelForCausalLM.from_pretrained(env.model, dtype=torch.float32)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(env.model, dtype=torch.float32),
                                      str(env.fit / "adapter"))
    scores = result.main.results["examples"]
    for i in (0, 7):
        prompt = [{"role": "user", "content": env.eval_prompts[i]}]
        context = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        answer = LABEL + "<|im_end|>"  # the content and the end-of-turn token are scored, the newline is not
        ids = tok(context + answer, add_special_tokens=False, return_tensors="pt")["input_ids"]
        start = len(tok(context, add_special_tokens=False)["input_ids"])
        for name, model in (("base", base), (str(env.fit), tuned)):
            with torch.no_grad():
                logp = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
            picked = logp[torch.arange(start - 1, ids.shape[1] - 1), ids[0, start:]]
            assert scores[i]["scores"]["loss"][name] == pytest.approx(-picked.mean().item(), rel=1e-4)


class _Judge(BaseHTTPRequestHandler):
    """OpenAI-compatible judge that prefers the response equal to the label."""

    asked: list = []

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        text = body["messages"][-1]["content"]
        first = text.split("[Response A]\n", 1)[1].split("\n\n[Response B]\n", 1)[0]
        second = text.split("\n\n[Response B]\n", 1)[1].split("\n\nReply with", 1)[0]
        type(self).asked.append((body["model"], first, second))
        verdict = "A" if first == LABEL else "B" if second == LABEL else "tie"
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": verdict}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def judge_url():
    _Judge.asked = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_judge_end_to_end_over_http(env, tmp_path, judge_url):
    out = tmp_path / "out"
    code = main(["eval", "--data", str(env.eval), "--candidates", f"base,{env.fit}", "--metric", "exact",
                 "--judge", f"{judge_url}#label-judge", "--out", str(out), *COMMON])
    assert code == 0
    assert len(_Judge.asked) == 24 and {a[0] for a in _Judge.asked} == {"label-judge"}  # 12 pairs, both orders
    assert sum(1 for _, first, _ in _Judge.asked if first == LABEL) == 12
    (judged,) = json.loads((out / "results.json").read_text())["judge"]
    assert (judged["tuned"], judged["baseline"]) == (str(env.fit), "base")
    assert (judged["wins"], judged["ties"], judged["losses"], judged["win_rate"]) == (12, 0, 0, 1.0)
    assert judged["outcomes"] == ["win"] * 12
    assert f"{env.fit} vs base (judge, both orders): 100% win / 0% tie / 0% loss" in (out / "report.md").read_text()


def test_local_judge_that_is_the_base_model_reuses_it(env, tmp_path, monkeypatch):
    loads = []
    real = engine_module.load_model_and_tokenizer
    monkeypatch.setattr(engine_module, "load_model_and_tokenizer", lambda *a, **k: loads.append(1) or real(*a, **k))
    result = tunesmith.evaluate(env.eval, ["base", str(env.fit)], metrics=["exact"], judge=str(env.model),
                                device="cpu", precision="fp32", max_new_tokens=4, max_examples=3)
    judged = result.main.judge[(str(env.fit), "base")]
    assert len(loads) == 1  # the judge runs on the already loaded base model
    assert judged.n == 3 and len(judged.raw) == 3
    assert all(first and second for first, second in judged.raw)  # the outputs differ, so it was asked twice


def test_regression_set_is_reported_separately(env, tmp_path):
    out = tmp_path / "out"
    code = main(["eval", "--data", str(env.eval), "--candidates", f"base+fewshot:2,{env.fit}+fewshot:2",
                 "--train-data", str(env.train), "--metric", "exact", "--regression", str(env.general),
                 "--out", str(out), *COMMON])
    assert code == 0
    reg = json.loads((out / "regression" / "results.json").read_text())
    assert reg["set"] == "regression" and reg["n"] == 8
    assert reg["candidates"] == ["base", str(env.fit)]  # few-shot dropped: tuned run vs the plain base
    assert all(row["outputs"][str(env.fit)] == LABEL for row in reg["examples"])  # it forgot everything else
    md = (out / "report.md").read_text()
    assert "regression set (8 examples, see regression/report.md)" in md
    assert "what the fine-tune broke" in (out / "regression" / "report.md").read_text()


def test_eval_at_the_end_of_train_writes_run_json(env):
    info = json.loads((env.fit / "run.json").read_text())
    summary = info["eval"]
    assert summary == env.run.info["eval"]
    assert summary["candidates"] == ["base", "base+fewshot:2", "tuned"] and summary["n"] == 12
    assert summary["won"] is True and summary["reasons"] == []
    assert summary["scores"]["exact"]["tuned"]["mean"] == 1.0
    assert summary["scores"]["loss"]["tuned"]["mean"] < summary["scores"]["loss"]["base"]["mean"]
    results = json.loads((env.fit / "eval" / "results.json").read_text())
    shots = results["fewshot"]["base+fewshot:2"]
    assert len(shots) == 2 and all(s.startswith(str(env.train)) for s in shots)
    assert (env.fit / "eval" / "report.html").exists()


def test_candidate_errors_are_clear(env, tmp_path, monkeypatch):
    loads = []
    monkeypatch.setattr(engine_module, "load_model_and_tokenizer", lambda *a, **k: loads.append(a))
    with pytest.raises(TunesmithError, match="only works inside a config"):
        parse_candidates("base,tuned")
    with pytest.raises(TunesmithError, match="unknown candidate 'runs/nope'"):
        parse_candidates("base,runs/nope")
    with pytest.raises(TunesmithError, match="positive integer"):
        parse_candidates("base+fewshot:0")
    with pytest.raises(TunesmithError, match="listed twice"):
        parse_candidates("base, base")
    other = shutil.copytree(env.noop, tmp_path / "other")
    info = json.loads((other / "run.json").read_text())
    info["base_model"]["sha256"] = "0" * 64
    info["model"] = "some/other-model"
    (other / "run.json").write_text(json.dumps(info))
    with pytest.raises(TunesmithError, match="different base models"):
        tunesmith.evaluate(env.eval, [str(env.noop), str(other)], device="cpu")
    with pytest.raises(TunesmithError, match="needs training examples"):
        tunesmith.evaluate(env.eval, ["base+fewshot:2", str(env.noop)], device="cpu")
    assert main(["eval", "--data", str(env.eval), "--candidates", "base", "--base", str(env.model),
                 "--metric", "bleu", *COMMON]) == 2
    assert main(["eval", "--data", str(env.eval), "--candidates", str(env.noop), "--regression",
                 str(tmp_path / "missing.jsonl"), *COMMON]) == 2
    assert main(["eval", "--data", str(env.eval), "--candidates", str(env.noop), "--judge", "http://x:1",
                 *COMMON]) == 2  # no '#MODEL'
    assert loads == []  # every one of these failed before a model was loaded


def test_run_datasets_use_the_training_eval_split(env):
    from tunesmith.config import parse_config
    from tunesmith.data.formats import prompt_messages
    from tunesmith.data.load import load_data
    from tunesmith.eval.run import run_datasets

    cfg = parse_config({"model": str(env.model), "data": {"train": str(env.train), "eval_split": 0.25},
                        "train": {"seed": 5}, "eval": {"candidates": ["base+fewshot:2", "tuned"]}})
    held_out, train = run_datasets(cfg, needs_train=True)
    expected_train, expected_held = load_data(cfg.data, seed=5)  # the split training made
    assert held_out == expected_held.examples and train == expected_train.examples
    assert len(held_out) == 6 and len(train) == 18
    assert not {prompt_messages(x) for x in held_out} & {prompt_messages(x) for x in train}


# ---------------------------------------------------------------- the ladder, end to end

class _Endpoint(BaseHTTPRequestHandler):
    """An OpenAI-compatible model that answers the label; `fail_after` makes it go down after N requests."""

    asked: list = []
    fail_after: int | None = None

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).asked.append(body["messages"][-1]["content"])
        if self.fail_after is not None and len(self.asked) > self.fail_after:
            data = b'{"error": "down"}'
            self.send_response(503)
        else:
            data = json.dumps({"choices": [{"message": {"role": "assistant", "content": LABEL},
                                            "finish_reason": "stop"}],
                               "usage": {"prompt_tokens": 40, "completion_tokens": 4}}).encode()
            self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def endpoint():
    _Endpoint.asked, _Endpoint.fail_after = [], None
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Endpoint)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1#gpt-4o-mini"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_the_ladder_end_to_end(env, tmp_path, endpoint, capsys):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Answer with the label.")
    out = tmp_path / "out"
    cands = f"base,base+labels,base+rag:2,knn:3,base+prompt:{prompt},{endpoint},{env.fit}"
    code = main(["eval", "--data", str(env.eval), "--candidates", cands, "--train-data", str(env.train),
                 "--out", str(out), "--require-worth", *COMMON])
    assert code == 6  # every training answer is the label, so a vote of neighbours is as good: not worth it
    err = capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    usage = results["usage"]
    names = ["base", "base+labels", "base+rag:2", "knn:3", f"base+prompt:{prompt}", endpoint, str(env.fit)]
    assert results["candidates"] == names and set(usage) == set(names)
    assert all(row["outputs"]["knn:3"] == LABEL for row in results["examples"])  # every neighbour says so
    assert usage["base+labels"]["prompt_tokens"] > usage["base"]["prompt_tokens"]  # the label list is in it
    assert usage["base+labels"]["cacheable_tokens"] > usage["base"]["cacheable_tokens"]  # ... shared by all
    assert usage[endpoint]["prompt_tokens"] == 40 and usage[endpoint]["new_tokens"] == 4  # as the server says
    assert usage[endpoint]["usd_per_1k"] == pytest.approx((40 * 0.15 + 4 * 0.60) / 1e6 * 1000)  # shipped prices
    assert usage["knn:3"]["ran_on"].startswith("majority of 3 nearest") and usage["knn:3"]["prompt_tokens"] is None
    for name in names:
        if name != endpoint:
            assert usage[name]["usd_per_1k"] > 0 and usage[name]["latency_p50"] > 0
    assert len(_Endpoint.asked) == 12
    ladder = [r["name"] for r in results["ladder"]]
    costs = [r["usd_per_1k"] for r in results["ladder"]]
    assert sorted(ladder) == sorted(names) and costs == sorted(costs)
    worth = results["worth"]
    assert (worth["tuned"], worth["baseline"], worth["worth_it"]) == (str(env.fit), "knn:3", False)
    assert worth["line"].startswith(f"fine-tuning is not worth it: knn:3 is within the interval of {env.fit}")
    assert f"note: knn:3 comes close to {env.fit}: +0.0 pts (95% CI +0.0 … +0.0): a vote of similar training " \
           "examples, you may not need a language model" in err and f"note: {endpoint} comes close" in err
    assert worth["line"] in err and "ladder (cheapest first; * = fine-tuned)" in err
    assert f"--require-worth: {worth['line']}" in err
    html = (out / "report.html").read_text()
    assert "log scale" in html and "The ladder" in html and "<script" not in html
    assert "## The ladder (exact, cheapest first)" in (out / "report.md").read_text()
    rag = results["prompts_added"]["base+rag:2"]["rag"]
    eval_prompts = set(env.eval_prompts)
    train_rows = env.train.read_text().splitlines()
    for sources in rag:  # retrieved shots are training rows, never eval prompts
        for src in sources:
            line = int(src.rsplit(":", 1)[1])
            assert json.loads(train_rows[line - 1])["messages"][0]["content"] not in eval_prompts


def test_endpoint_answers_survive_a_failure_and_resume_asks_only_the_rest(env, tmp_path, endpoint, capsys):
    out = tmp_path / "out"
    args = ["eval", "--data", str(env.eval), "--candidates", f"base,{endpoint}", "--base", str(env.model),
            "--out", str(out), "--endpoint-retries", "0", "--endpoint-concurrency", "1", *COMMON]
    _Endpoint.fail_after = 5
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{endpoint}: endpoint at http://127.0.0.1:" in err and "HTTP 503" in err
    assert "the 5 answers received are kept in" in err and "--resume" in err
    _Endpoint.asked, _Endpoint.fail_after = [], None
    assert main([*args, "--resume"]) == 0
    assert len(_Endpoint.asked) == 7  # only the 7 answers it had not given
    err = capsys.readouterr().err
    assert "12 answers of base kept from before" in err and f"5 answers of {endpoint} kept from before" in err
    resumed = json.loads((out / "results.json").read_text())
    assert [row["outputs"][endpoint] for row in resumed["examples"]] == [LABEL] * 12


def test_cut_off_answers_are_counted_and_the_limit_defaults_from_the_references(env, tmp_path, capsys):
    from transformers import AutoTokenizer

    out = tmp_path / "out"
    code = main(["eval", "--data", str(env.eval), "--candidates", f"base,{env.fit}", "--out", str(out),
                 "--device", "cpu", "--precision", "fp32", "--max-new-tokens", "3"])
    assert code == 0
    err = capsys.readouterr().err
    label_tokens = len(AutoTokenizer.from_pretrained(env.model)(LABEL, add_special_tokens=False)["input_ids"])
    assert label_tokens + 1 > 3
    assert f"12 reference(s) are longer than max_new_tokens 3 (the longest is {label_tokens + 1} tokens)" in err
    results = json.loads((out / "results.json").read_text())
    assert results["usage"][str(env.fit)]["cut_off"] == 12  # even the fine-tune is cut: the warning was right
    assert f"12 of 12 answers of {env.fit} stopped at max_new_tokens (3)" in err
    assert all(row["answers"][str(env.fit)]["hit_limit"] for row in results["examples"])
    assert f"12 of 12 answers of {env.fit} stopped" in (out / "report.md").read_text()

    code = main(["eval", "--data", str(env.eval), "--candidates", f"base,{env.fit}", "--out", str(out),
                 "--device", "cpu", "--precision", "fp32"])  # auto
    results = json.loads((out / "results.json").read_text())
    assert results["max_new_tokens"] == label_tokens + 1 + 8
    assert results["usage"][str(env.fit)]["cut_off"] == 0
    assert [row["answers"][str(env.fit)]["new_tokens"] for row in results["examples"]] == [label_tokens + 1] * 12
    assert all(row["outputs"][str(env.fit)] == LABEL for row in results["examples"])


def _stage_run(env, root: Path) -> Path:
    """A two-stage run laid out as `tunesmith train` writes one: stage 1 the no-op adapter, stage 2 the fit one,
    the run's own adapter the last stage's."""
    run = root / "ms"
    shutil.copytree(env.noop, run / "stages" / "1-sft")
    shutil.copytree(env.fit, run / "stages" / "2-dpo", ignore=shutil.ignore_patterns("eval", "checkpoints"))
    shutil.copytree(env.fit / "adapter", run / "adapter")
    info = json.loads((env.fit / "run.json").read_text())
    info["stages"] = [str(run / "stages" / "1-sft"), str(run / "stages" / "2-dpo")]
    info.pop("eval", None)
    (run / "run.json").write_text(json.dumps(info))
    return run


def test_each_stage_is_compared_with_the_stage_before(env, tmp_path, capsys):
    run = _stage_run(env, tmp_path)
    out = tmp_path / "out"
    assert main(["eval", "--data", str(env.eval), "--candidates", f"base,{run}", "--out", str(out), *COMMON]) == 0
    err = capsys.readouterr().err
    first = str(run / "stages" / "1-sft")
    results = json.loads((out / "results.json").read_text())
    assert results["candidates"] == ["base", first, str(run)]
    pairs = [(p["tuned"], p["baseline"]) for p in results["comparisons"][0]["pairs"]]
    assert pairs == [(first, "base"), (str(run), first), (str(run), "base")]
    assert f"{run} beats {first} by +100.0 pts" in err  # the second stage, against the first
    assert f"{first} does NOT beat base" in err
    assert f"The fine-tune does NOT win: 1 comparison(s) are not significant wins ({first} vs base)." in err
    assert main(["eval", "--data", str(env.eval), "--candidates", f"base,{run}", "--out", str(out), "--no-stages",
                 *COMMON]) == 0
    assert json.loads((out / "results.json").read_text())["candidates"] == ["base", str(run)]


def test_qlora_baselines_run_on_the_unquantised_base(env, tmp_path):
    pytest.importorskip("bitsandbytes")
    qrun = shutil.copytree(env.fit, tmp_path / "qfit", ignore=shutil.ignore_patterns("eval", "checkpoints"))
    info = json.loads((qrun / "run.json").read_text())
    info.update(adapter_kind="qlora", quantize_embeddings=False, base_dtype="fp32", double_quant=True)
    (qrun / "run.json").write_text(json.dumps(info))
    result = tunesmith.evaluate(env.eval, ["base", str(qrun), str(env.fit)], device="cpu", precision="fp32",
                                max_new_tokens=8, max_examples=4)
    usage = result.main.usage
    assert usage["base"].ran_on == f"{env.model} (fp32, cpu)"
    assert usage[str(env.fit)].ran_on == f"{env.model} (fp32, cpu) + lora adapter"
    assert usage[str(qrun)].ran_on == f"{env.model} (NF4 4-bit, cpu) + qlora adapter"
    plain = tunesmith.evaluate(env.eval, ["base"], base=str(env.model), device="cpu", precision="fp32",
                               max_new_tokens=8, max_examples=4)
    assert result.main.outputs["base"] == plain.main.outputs["base"]  # the baseline is the unquantised base
    assert "NF4 4-bit" in json.dumps(result.main.results["usage"])


def test_require_worth_and_the_exit_codes(env, tmp_path, capsys, monkeypatch):
    args = ["eval", "--data", str(env.eval), "--out", str(tmp_path / "o"), *COMMON]
    assert main([*args, "--candidates", f"base,{env.fit}", "--require-worth"]) == 0
    assert main([*args, "--candidates", f"base,{env.noop}", "--require-worth"]) == 6
    err = capsys.readouterr().err
    assert "--require-worth: fine-tuning is not worth it: base is within the interval of" in err

    def boom(*a, **k):
        raise RuntimeError("something broke\nsecond line")

    monkeypatch.setattr("tunesmith.eval.run.evaluate", boom)
    assert main([*args, "--candidates", "base"]) == 70
    err = capsys.readouterr().err
    assert "internal error: RuntimeError: something broke (rerun with --debug" in err and "Traceback" not in err
    assert "second line" not in err
    assert main(["--debug", *args, "--candidates", "base"]) == 70
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("TUNESMITH_DEBUG", "1")
    assert main([*args, "--candidates", "base"]) == 70
    assert "Traceback" in capsys.readouterr().err


def test_cli_flags_build_the_eval_config_and_defaults_live_there(env, tmp_path, monkeypatch):
    from tunesmith.config import EvalConfig
    from tunesmith.errors import ConfigError
    from tunesmith.eval.run import eval_config

    seen = {}
    monkeypatch.setattr("tunesmith.eval.run.evaluate", lambda data, **kw: seen.update(kw, data=data))
    assert main(["eval", "--data", "d.jsonl", "--candidates", "base,base+labels"]) == 0
    settings = {k: v for k, v in seen.items() if k in EvalConfig.model_fields and k != "data"}
    assert settings == {"candidates": "base,base+labels", "out": "eval"}  # nothing else: no second set of defaults
    cfg = eval_config(None, dict(settings))
    assert cfg == EvalConfig(candidates=["base", "base+labels"], out="eval")
    assert cfg.max_new_tokens == "auto" and cfg.batch_size == 16 and cfg.metrics == ["exact"]
    main(["eval", "--data", "d", "--candidates", "base", "--max-new-tokens", "12", "--no-stages", "--resume",
          "--rate-limit", "30", "--out", "x"])
    cfg = eval_config(None, {k: v for k, v in seen.items() if k in EvalConfig.model_fields and k != "data"})
    assert (cfg.max_new_tokens, cfg.by_stage, cfg.resume, cfg.endpoint_rate_limit) == (12, False, True, 30.0)
    with pytest.raises(ConfigError, match=r"eval\.batch_size.*greater than or equal to 1"):
        eval_config({"batch_size": 0}, {})
    with pytest.raises(ConfigError, match=r"eval\.max_new_token.*unknown key.*did you mean 'max_new_tokens'"):
        eval_config(EvalConfig(), {"max_new_token": 3})
    assert main(["eval", "--data", "d", "--candidates", "base", "--batch-size", "0"]) == 0  # validated in evaluate


def test_evaluate_takes_an_eval_config(env, tmp_path):
    from tunesmith.config import EvalConfig

    cfg = EvalConfig(candidates=["base", str(env.fit)], metrics=["exact"], max_new_tokens=8, max_examples=4,
                     device="cpu", precision="fp32", out=str(tmp_path / "o"))
    result = tunesmith.evaluate(env.eval, cfg)
    assert result.won is False and result.main.results["n"] == 4  # 4 examples are too few to be significant
    assert (tmp_path / "o" / "results.json").exists()
    again = tunesmith.evaluate(env.eval, cfg.model_dump(), max_examples=4)
    assert again.main.outputs == result.main.outputs


def test_embedding_retrieval_and_documents_end_to_end(env, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "faq.md").write_text("Cards arrive within a week.\n\nThe fox is quick and brown.")
    result = tunesmith.evaluate(env.eval, ["knn:1:embed", "base+rag:1:embed", "base+docs:1"], train_data=env.train,
                                docs=str(docs), base=str(env.model), device="cpu", precision="fp32",
                                max_new_tokens=4, max_examples=4)
    assert result.main.outputs["knn:1:embed"] == [LABEL] * 4
    added = result.main.results["prompts_added"]
    assert all(len(s) == 1 for s in added["base+rag:1:embed"]["rag"]) and len(added["base+docs:1"]["docs"]) == 4
    # with a separate encoder folder (any Hugging Face model; here the tiny one) instead of the base model
    again = tunesmith.evaluate(env.eval, ["knn:2:embed"], train_data=env.train, embedder=str(env.model),
                               base=str(env.model), device="cpu", precision="fp32", max_examples=4)
    assert again.main.outputs["knn:2:embed"] == [LABEL] * 4
    from tunesmith.eval.candidates import Candidate

    engine = engine_module.Engine(str(env.model), [Candidate("base")], device="cpu", precision="fp32", batch_size=2)
    vectors = engine.embed(["hello world", "the quick brown fox", "hello world"])
    assert vectors.shape == (3, 64) and np.allclose(vectors[0], vectors[2], atol=1e-5)
    assert not np.allclose(vectors[0], vectors[1])


def test_prompt_inputs_fail_before_a_model_is_loaded(env, tmp_path, monkeypatch):
    loads = []
    monkeypatch.setattr(engine_module, "load_model_and_tokenizer", lambda *a, **k: loads.append(a))
    free = tmp_path / "free.jsonl"
    _write(free, _prompts(3, seed=4, length=3), answer=" ".join(["a long free text answer"] * 5))
    with pytest.raises(TunesmithError, match="label-style training data"):
        tunesmith.evaluate(env.eval, ["base+labels"], train_data=free, base=str(env.model), device="cpu")
    with pytest.raises(TunesmithError, match="pass --docs FOLDER"):
        tunesmith.evaluate(env.eval, ["base+docs:2"], base=str(env.model), device="cpu")
    with pytest.raises(TunesmithError, match="no such folder"):
        tunesmith.evaluate(env.eval, ["base+docs:2"], docs=str(tmp_path / "nope"), base=str(env.model))
    with pytest.raises(TunesmithError, match="loss metric needs log-probs"):
        tunesmith.evaluate(env.eval, ["base", "knn:2"], metrics=["loss"], train_data=env.train, base=str(env.model))
    with pytest.raises(TunesmithError, match="--resume needs the output folder"):
        tunesmith.evaluate(env.eval, ["base"], resume=True, base=str(env.model))
    assert loads == []


def test_max_examples_is_a_seeded_sample_in_file_order_not_the_first_n():
    from tunesmith.eval.run import subsample

    rows = [_conv(f"q{i}", LABEL if i < 50 else "other", i + 1) for i in range(100)]  # sorted by label
    picked = subsample(rows, 10, seed=0)
    lines = [ex.source.line for ex in picked]
    assert len(picked) == 10 and lines == sorted(lines) and lines != list(range(1, 11))
    assert {ex.messages[-1].content for ex in picked} == {LABEL, "other"}  # both halves of a sorted file
    assert [ex.source.line for ex in subsample(rows, 10, seed=0)] == lines  # the same sample every time
    assert [ex.source.line for ex in subsample(rows, 10, seed=1)] != lines  # sample_seed picks another
    assert subsample(rows, 200, seed=0) == rows and subsample(rows, None, seed=0) == rows

"""Training across processes with torchrun on CPU (gloo, 2 processes): DDP and FSDP2 give the same maths as
one process at the same global batch, a kill -9 resumes bit-identically and across world sizes, a rank that
dies stops the others in bounded time, and bad setups fail before any work."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tunesmith
from pref_utils import pair_rows, quiet, steps, write_jsonl
from tunesmith.errors import TunesmithError

HERE = Path(__file__).resolve().parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist-data")
    pairs = write_jsonl(root / "pairs.jsonl", pair_rows(16))
    sft = write_jsonl(root / "sft.jsonl", [{"messages": [{"role": "user", "content": r["prompt"]},
                                                         {"role": "assistant", "content": r["chosen"]}]}
                                           for r in pair_rows(16)])
    return {"sft": str(sft), "dpo": str(pairs)}


def config(tiny_dir, out: Path, name: str, method: str, data: dict, adapter: str = "lora", **train) -> dict:
    return {"name": name, "output_dir": str(out), "model": str(tiny_dir), "device": "cpu", "precision": "fp32",
            "method": method, "adapter": adapter, "data": {"train": data[method], "max_length": 64},
            "method_args": {"reference_cache": False} if method == "dpo" else {},
            "train": {"micro_batch_size": 2, "global_batch_size": 8, "max_steps": 4, "lr": 5e-3,
                      "warmup_ratio": 0.0, "schedule": "constant", **train}}


def launch(jobs: list[dict], tmp: Path, timeout: float = 600) -> tuple[subprocess.CompletedProcess, dict]:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    out = tmp / "results.jsonl"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), str(HERE)]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*TORCHRUN, str(HERE / "dist_driver.py"), str(tmp / "jobs.json"), str(out)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    results = {r["name"]: r for r in map(json.loads, out.read_text().splitlines())} if out.exists() else {}
    return proc, results


def with_eval(cfg: dict) -> dict:
    """Evaluate on the training file every 2 steps (5 examples: the 2 ranks' eval shares are unequal)."""
    eval_file = Path(cfg["data"]["train"]).with_suffix(".eval.jsonl")
    eval_file.write_text("".join(Path(cfg["data"]["train"]).read_text().splitlines(True)[:5]))
    return {**cfg, "data": {**cfg["data"], "eval": str(eval_file)}, "train": {**cfg["train"], "eval_every": 2}}


def losses(run_dir: Path, key: str = "loss") -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted((run_dir / "adapter").glob("*.safetensors"))
    return {k: v for f in files for k, v in load_file(f).items()}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))


JOBS = [("sft", "lora"), ("dpo", "lora"), ("sft", "full"), ("dpo", "full")]


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_two_processes_train_the_same_maths_as_one(tiny_dir, tmp_path, data, engine):
    """Global batch 8 = micro-batch 2 x accumulation 4 x 1 process = 2 x 2 x 2 processes: per-step losses and
    final weights within 1e-5 (fp32; the order of the reduction is the only difference)."""
    jobs = [{"config": with_eval(config(tiny_dir, tmp_path / "two", f"{m}-{a}", m, data, a, parallel=engine))}
            for m, a in JOBS]
    proc, results = launch(jobs, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all(results[j["config"]["name"]].get("ok") for j in jobs), results
    assert f"2 processes, {engine}" in proc.stderr
    for m, a in JOBS:
        one = tunesmith.train(with_eval(config(tiny_dir, tmp_path / "one", f"{m}-{a}", m, data, a)),
                              progress=False, evaluate=False, console=quiet()[0])
        two = tmp_path / "two" / f"{m}-{a}"
        assert len(losses(two)) == 4
        assert losses(two) == pytest.approx(losses(one.path), abs=1e-5), (m, a)
        assert len(losses(two, "eval_loss")) == 2  # an eval pass between steps leaves training exact
        assert losses(two, "eval_loss") == pytest.approx(losses(one.path, "eval_loss"), abs=1e-5), (m, a)
        w1, w2 = weights(one.path), weights(two)
        assert w1.keys() == w2.keys() and w1
        for k in w1:
            torch.testing.assert_close(w2[k], w1[k], atol=1e-5, rtol=0)
        assert json.loads((two / "run.json").read_text())["steps"] == 4


def test_the_eval_after_training_splits_the_answers_across_ranks_and_equals_one_process(tiny_dir, tmp_path, data):
    """Each rank generates its share (rank r: prompts r, r + 2, ...), rank 0 writes the one report, and every
    answer and score equals the same eval run in one process on the same run."""
    eval_file = tmp_path / "held.jsonl"
    eval_file.write_text("".join(Path(data["sft"]).read_text().splitlines(True)[:7]))  # 7: shares of 4 and 3
    settings = {"candidates": ["base", "tuned"], "metrics": ["exact", "loss"], "max_new_tokens": 8}
    cfg = {**config(tiny_dir, tmp_path / "two", "sft-eval", "sft", data), "eval": {"data": str(eval_file), **settings}}
    proc, results = launch([{"config": cfg, "evaluate": True}], tmp_path / "job")
    assert proc.returncode == 0 and results["sft-eval"]["ok"], proc.stderr[-3000:]
    logged = [json.loads(line) for rank in (0, 1)
              for line in (tmp_path / "job" / f"results.jsonl.answers.rank{rank}").read_text().splitlines()]
    assert sorted((r["rank"], r["candidate"], r["prompts"]) for r in logged) == [
        (0, "base", 4), (0, "tuned", 4), (1, "base", 3), (1, "tuned", 3)]
    assert (proc.stdout + proc.stderr).count("evaluating base, tuned on 7 examples") == 1  # rank 0 alone talks
    run_dir = tmp_path / "two" / "sft-eval"
    two = json.loads((run_dir / "eval" / "results.json").read_text())
    assert json.loads((run_dir / "run.json").read_text())["eval"]["scores"]["loss"]["tuned"]["mean"] > 0

    tunesmith.evaluate(str(eval_file), settings, tuned_run=run_dir, out=str(tmp_path / "one"), device="cpu",
                             precision="fp32", base=str(tiny_dir), console=quiet()[0])
    alone = json.loads((tmp_path / "one" / "results.json").read_text())
    assert [r["outputs"] for r in two["examples"]] == [r["outputs"] for r in alone["examples"]]
    for metric in ("exact", "loss"):
        for cand in ("base", "tuned"):
            assert [r["scores"][metric][cand] for r in two["examples"]] == pytest.approx(
                [r["scores"][metric][cand] for r in alone["examples"]], abs=1e-5), (metric, cand)


class _Echo(BaseHTTPRequestHandler):
    """An OpenAI-compatible endpoint that answers "echo: <question>" and keeps every question it was asked."""

    asked: list[str] = []

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        question = body["messages"][-1]["content"]
        type(self).asked.append(question)
        data = json.dumps({"choices": [{"index": 0, "finish_reason": "stop", "message": {
            "role": "assistant", "content": f"echo: {question}"}}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 3}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def test_a_standalone_eval_under_torchrun_asks_the_endpoint_once_per_question(tiny_dir, tmp_path, data):
    """`torchrun -m tunesmith eval`: the ranks split the local answers, rank 0 alone asks the endpoint (it
    charges per query), and the results equal the same eval in one process."""
    run = tunesmith.train(config(tiny_dir, tmp_path / "runs", "sft", "sft", data), progress=False, evaluate=False,
                          console=quiet()[0])
    eval_file = tmp_path / "held.jsonl"
    eval_file.write_text("".join(Path(data["sft"]).read_text().splitlines(True)[:5]))
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1#echo"
    args = ["eval", "--data", str(eval_file), "--candidates", f"base,{run.path},{url}", "--metric", "exact",
            "--device", "cpu", "--precision", "fp32", "--max-new-tokens", "8"]
    env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src"), "OMP_NUM_THREADS": "1", "TUNESMITH_API_KEY": "k"}
    try:
        _Echo.asked = []
        proc = subprocess.run([*TORCHRUN, "-m", "tunesmith", *args, "--out", str(tmp_path / "two")],
                              capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert len(_Echo.asked) == 5 and len(set(_Echo.asked)) == 5  # each question once, by one rank
        _Echo.asked = []
        alone = subprocess.run([sys.executable, "-m", "tunesmith", *args, "--out", str(tmp_path / "one")],
                               capture_output=True, text=True, timeout=600, env=env)
        assert alone.returncode == 0, alone.stderr[-3000:]
        assert len(_Echo.asked) == 5
    finally:
        server.shutdown()
        server.server_close()
    two, one = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("two", "one"))
    assert [r["outputs"] for r in two["examples"]] == [r["outputs"] for r in one["examples"]]
    assert [r["scores"] for r in two["examples"]] == [r["scores"] for r in one["examples"]]
    assert all(r["outputs"][url].startswith("echo: ") for r in two["examples"])


def test_kill_9_resumes_bit_identically_and_across_world_sizes(tiny_dir, tmp_path, data, monkeypatch):
    """A 2-process run killed (kill -9 of every rank) after step 2 and resumed with 2 processes ends
    bit-identical to an uninterrupted one; the same checkpoint resumed in 1 process, and a 1-process
    checkpoint resumed in 2, continue at the same global batch (within reduction-order rounding)."""
    base = dict(save_every=1, max_steps=5)
    cfg = lambda name: config(tiny_dir, tmp_path / "runs", name, "sft", data, **base)  # noqa: E731
    proc, _ = launch([{"config": cfg("whole")}, {"config": cfg("cut"), "kill_at": 2}], tmp_path / "a")
    assert proc.returncode != 0  # the run was killed
    cut = tmp_path / "runs" / "cut"
    assert sorted(p.name for p in (cut / "checkpoints").iterdir()) == ["step-000001", "step-000002"]
    shutil.copytree(cut, tmp_path / "runs" / "two-to-one")

    from tunesmith.train import loop  # a 1-process run stopped after step 2 (its checkpoint is written first)

    real = loop.Trainer.fit

    def stop_after_two(self, on_record=None):
        def record(rec):
            on_record(rec)
            if self.state.step == 2:
                raise KeyboardInterrupt
        return real(self, record)

    monkeypatch.setattr(loop.Trainer, "fit", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        tunesmith.train(cfg("one-to-two"), progress=False, evaluate=False, console=quiet()[0])
    monkeypatch.setattr(loop.Trainer, "fit", real)

    proc, results = launch([{"config": cfg("cut"), "resume": "auto"},
                            {"config": cfg("one-to-two"), "resume": "auto"}], tmp_path / "b")
    assert proc.returncode == 0, proc.stderr[-3000:]
    whole = weights(tmp_path / "runs" / "whole")
    resumed = weights(cut)
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)
    assert losses(cut) == losses(tmp_path / "runs" / "whole")

    tunesmith.train(cfg("two-to-one"), progress=False, evaluate=False, resume="auto", console=quiet()[0])
    for name in ("two-to-one", "one-to-two"):
        other = weights(tmp_path / "runs" / name)
        for k in whole:
            torch.testing.assert_close(other[k], whole[k], atol=1e-5, rtol=0)
        assert losses(tmp_path / "runs" / name) == pytest.approx(losses(tmp_path / "runs" / "whole"), abs=1e-5)


def test_a_rank_that_dies_stops_the_others_and_the_last_checkpoint_loads(tiny_dir, tmp_path, data):
    cfg = config(tiny_dir, tmp_path / "runs", "dies", "sft", data, save_every=1, max_steps=6, dist_timeout_s=60)
    started = time.time()
    proc, _ = launch([{"config": cfg, "die_at": 3, "die_rank": 1}], tmp_path / "a", timeout=240)
    assert proc.returncode != 0 and time.time() - started < 180
    assert "exitcode" in proc.stderr and "-9" in proc.stderr  # torchrun names the rank that died and how
    run = tunesmith.train(cfg, progress=False, evaluate=False, resume="auto", console=quiet()[0])
    assert [r["step"] for r in steps(run)] == list(range(1, 7))


def test_the_launcher_reports_a_failed_process_and_the_checkpoint_to_resume(tiny_dir, tmp_path, data):
    """`tunesmith train --nproc 2` starts torchrun; when the processes fail it says so in one line."""
    from tunesmith.cli import main as cli_main

    bad = config(tiny_dir, tmp_path / "runs", "bad", "sft", {"sft": str(tmp_path / "missing.jsonl")})
    path = tmp_path / "bad.yaml"
    path.write_text(json.dumps(bad))
    env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "tunesmith", "train", str(path), "--nproc", "2", "--no-progress"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode != 0
    assert "starting 2 processes" in proc.stderr and "a training process failed" in proc.stderr
    assert "No checkpoint was written" in proc.stderr
    assert cli_main is not None


def test_processes_that_disagree_on_the_config_stop_before_any_work(tiny_dir, tmp_path, data):
    cfg = config(tiny_dir, tmp_path / "runs", "mixed", "sft", data)
    proc, results = launch([{"config": cfg, "rank_overrides": {"1": {"train": {**cfg["train"], "seed": 7}}}},
                            {"config": {**cfg, "name": "after"}}], tmp_path / "a")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "disagree on the config" in results["mixed"]["error"]
    assert results["after"]["ok"]  # the process group is still usable


def test_bad_setups_fail_before_any_work(tiny_dir, tmp_path, data, monkeypatch):
    from tunesmith.config import parse_config
    from tunesmith.train.parallel import setup_parallel
    from tunesmith.train.recipe import with_accumulation

    cfg = parse_config(config(tiny_dir, tmp_path, "x", "sft", data, micro_batch_size=3))
    with pytest.raises(TunesmithError, match="global_batch_size 8 is not micro_batch_size 3 x 2"):
        with_accumulation(cfg, 2)
    assert with_accumulation(parse_config(config(tiny_dir, tmp_path, "x", "sft", data)), 2).train.grad_accum == 2

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.distributed, "is_available", lambda: False)
    with pytest.raises(TunesmithError, match="no torch.distributed"):
        setup_parallel("ddp")
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    qlora = config(tiny_dir, tmp_path, "q", "sft", data, parallel="fsdp")
    qlora["adapter"] = "qlora"
    with pytest.raises(TunesmithError, match="QLoRA with FSDP2 needs CUDA"):
        tunesmith.train(qlora, progress=False, evaluate=False, console=quiet()[0])

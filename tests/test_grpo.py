"""GRPO end to end on the tiny model: the CLI and the API, metrics, a constant reward leaving the weights
unchanged, skipped zero-advantage groups giving the update computing them gives, SFT -> GRPO with a KL term
to the SFT stage, QLoRA and full fine-tuning, the held-out reward, and the early errors."""

import json

import pytest
import torch
import yaml
from rich.console import Console
from safetensors.torch import load_file

import tunesmith
from tunesmith.cli import main
from tunesmith.errors import TrainingAborted, TunesmithError
from tunesmith.train import checkpoint

WORDS = ["hello world", "quick brown fox", "lazy dog", "card balance", "transfer arrive", "exchange rate",
         "top up", "card linking"]
REWARDS = """
def varied(prediction, reference, example):
    return float(len(prediction) % 3)

def constant(prediction, reference, example):
    return 0.5

def mixed(prediction, reference, example):
    return 0.5 if example["steady"] else float(len(prediction) % 4)

def boom(prediction, reference, example):
    raise KeyError("label")
"""


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))


def write_data(tmp_path, n=8):
    rows = [{"prompt": f"say {WORDS[i % 8]}", "reference": WORDS[i % 8], "steady": i % 2 == 0} for i in range(n)]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "rw.py").write_text(REWARDS)
    return path


def config(tiny_dir, tmp_path, reward="varied", name="g", method_args=None, **train):
    data = write_data(tmp_path)
    rewards = [f"python:{tmp_path / 'rw.py'}:{reward}"] if isinstance(reward, str) else reward
    return {"model": str(tiny_dir), "output_dir": str(tmp_path / "runs"), "name": name, "precision": "fp32",
            "device": "cpu", "threads": 1, "method": "grpo", "data": {"train": str(data), "max_length": 48},
            "adapter": {"kind": "lora", "r": 4, "alpha": 8},
            "method_args": {"group_size": 4, "max_new_tokens": 6, "rewards": rewards, **(method_args or {})},
            "train": {"lr": 2e-2, "max_steps": 2, "micro_batch_size": 2, "grad_accum": 2, "warmup_ratio": 0.0,
                      "schedule": "constant", **train}}


def records(run):
    return [r for r in run.metrics if "loss" in r]


def test_cli_trains_and_logs_the_rollout_metrics(tiny_dir, tmp_path):
    cfg = config(tiny_dir, tmp_path, reward=[f"python:{tmp_path / 'rw.py'}:varied", "f1", {"reward": "length:3",
                                                                                       "weight": 0.5}])
    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path), "--no-progress"]) == 0
    run_dir = tmp_path / "runs" / "g"
    logged = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in logged if "loss" in r]
    assert len(steps) == 2
    for key in ("reward", "reward/python", "reward/f1", "reward/length", "reward_std", "zero_std_groups",
                "clip_fraction", "completion_length", "completion_cut", "logp_gap", "gen_tokens_per_s",
                "train_tokens_per_s", "gen_s"):
        assert key in steps[0], key
    r = steps[0]
    # the total is the weighted sum of the functions, per completion, averaged over the step
    assert r["reward"] == pytest.approx(r["reward/python"] + r["reward/f1"] + 0.5 * r["reward/length"], abs=1e-6)
    assert r["logp_gap"] < 1e-5  # generating pass and training forward agree (fp32)
    assert 1 <= r["completion_length"] <= 6 and r["gen_tokens"] == 4 * 4 * r["completion_length"]
    assert "Reward (GRPO)" in (run_dir / "report.html").read_text()
    table = (run_dir / "report.md").read_text()
    assert all(f"| {k} |" in table for k in ("reward", "reward/f1", "reward/length", "clip_fraction", "logp_gap"))
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_constant_reward_gives_zero_advantages_and_unchanged_weights(tiny_dir, tmp_path, beta):
    from tunesmith.model.adapters import apply_adapter
    from tunesmith.model.load import load_model_and_tokenizer

    cfg = config(tiny_dir, tmp_path, reward="constant", method_args={"beta": beta}, max_steps=3)
    run = tunesmith.train(cfg, progress=False)
    steps = records(run)
    assert all(r["zero_std_groups"] == 1.0 and r["reward"] == 0.5 and r["grad_norm"] == 0.0 for r in steps)
    if beta:
        assert all(r["kl"] == 0.0 for r in steps)  # the reference was computed, and the policy never left it
    trained = load_file(str(run.adapter / "adapter_model.safetensors"))
    model, _ = load_model_and_tokenizer(str(tiny_dir), precision="fp32")
    torch.manual_seed(0)  # the run's seed: the same fresh adapter
    fresh = apply_adapter(model, tunesmith.config.AdapterConfig(r=4, alpha=8))
    start = {k.replace(".default", ""): v for k, v in fresh.state_dict().items() if "lora_" in k}
    assert trained.keys() == start.keys() and all(torch.equal(trained[k], start[k]) for k in trained)


def test_skipping_zero_advantage_groups_gives_the_same_update(tiny_dir, tmp_path):
    from tunesmith.config import parse_config
    from tunesmith.train import recipe

    def first_step(skip: bool):
        cfg = parse_config(config(tiny_dir, tmp_path, reward="mixed", name=f"skip{skip}", max_steps=1))
        st = recipe.prepare_stage(cfg, cfg.run_dir, Console(quiet=True))
        mbs = st.trainer.source.step(0)
        groups = [g for mb in mbs for g in mb.items]
        if not skip:
            for g in groups:
                g.train = True
            mbs = [st.trainer.source.collator("train", groups)]
        st.trainer.source.step = lambda s: mbs
        record = st.trainer.train_step()
        weights = {n: p.detach().clone() for n, p in st.model.named_parameters() if p.requires_grad}
        return record, weights, sum(not g.train for g in groups), sum(mb.batch.n_seqs for mb in mbs)

    skipped, w_skip, n_skipped, run_skip = first_step(True)
    full, w_full, _, run_full = first_step(False)
    assert n_skipped > 0 and run_skip < run_full  # some groups had nothing to learn and were not run
    assert skipped["loss"] == pytest.approx(full["loss"], abs=1e-7)
    assert skipped["grad_norm"] == pytest.approx(full["grad_norm"], rel=1e-5)
    for key in ("reward", "reward_std", "zero_std_groups", "clip_fraction", "completion_length"):
        assert skipped[key] == pytest.approx(full[key], abs=1e-6), key  # metrics count the skipped groups too
    for n in w_skip:
        torch.testing.assert_close(w_skip[n], w_full[n], atol=1e-7, rtol=1e-5)


def test_sft_then_grpo_with_a_kl_term_to_the_sft_model(tiny_dir, tmp_path):
    sft_rows = [{"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w}]}
                for w in WORDS]
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps(r) + "\n" for r in sft_rows))
    cfg = config(tiny_dir, tmp_path, reward=["f1"])
    grpo_args = {**cfg.pop("method_args"), "beta": 0.05}
    cfg.pop("method")
    cfg["stages"] = [{"method": "sft", "data": str(sft), "train": {"max_steps": 4, "grad_accum": 1}},
                     {"method": "grpo", "data": str(sft), "method_args": grpo_args, "train": {"max_steps": 2}}]
    run = tunesmith.train(cfg, progress=False)
    grpo = records(run.stages[1])
    assert len(grpo) == 2 and "kl" in grpo[0] and "reward/f1" in grpo[0]
    assert grpo[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # step 0: the policy is the SFT stage it starts from
    assert grpo[1]["kl"] > 0 or grpo[0]["grad_norm"] == 0
    info = json.loads((run.stages[1].path / "run.json").read_text())
    assert info["method"] == "grpo" and info["reference"]["key"] is None  # live reference


@pytest.mark.parametrize("kind", ["qlora", "full"])
def test_qlora_and_full_fine_tuning(tiny_dir, tmp_path, kind):
    cfg = config(tiny_dir, tmp_path, method_args={"beta": 0.05}, max_steps=2, lr=1e-3)
    cfg["adapter"] = {"kind": kind} if kind == "full" else {"kind": "qlora", "r": 4, "alpha": 8}
    run = tunesmith.train(cfg, progress=False)
    steps = records(run)
    assert len(steps) == 2 and all(r["grad_norm"] > 0 for r in steps)
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-5)


def test_held_out_prompts_are_answered_and_scored_during_training(tiny_dir, tmp_path):
    cfg = config(tiny_dir, tmp_path, max_steps=2, eval_every=2)
    cfg["data"]["eval_split"] = 0.25
    run = tunesmith.train(cfg, progress=False)
    last = records(run)[-1]
    assert {"eval_reward", "eval_reward/python", "eval_completion_length", "eval_loss"} <= set(last)


def test_iterations_reuse_a_sampled_batch_and_clip(tiny_dir, tmp_path):
    cfg = config(tiny_dir, tmp_path, method_args={"iterations": 2, "epsilon": 0.01}, max_steps=4, lr=5e-2)
    steps = records(tunesmith.train(cfg, progress=False))
    assert len(steps) == 4
    assert "gen_s" in steps[0] and "gen_s" not in steps[1] and "gen_s" in steps[2]  # sampled every 2 steps
    assert steps[0]["clip_fraction"] == 0.0  # on policy: old log-probs are the generating pass's, ratio 1
    assert steps[1]["clip_fraction"] > 0  # the second pass over a batch is off policy and gets clipped


def test_early_errors(tiny_dir, tmp_path):
    with pytest.raises(TunesmithError, match=r"reward python.*raised KeyError.*prompts\.jsonl:1"):
        tunesmith.train(config(tiny_dir, tmp_path, reward="boom"), progress=False)
    with pytest.raises(TunesmithError, match=r"cannot import"):
        tunesmith.train(config(tiny_dir, tmp_path, reward=["python:no_such_module_x:f"]), progress=False)
    cfg = config(tiny_dir, tmp_path, reward=["exact"])
    (tmp_path / "noref.jsonl").write_text(json.dumps({"prompt": "q"}) + "\n")
    cfg["data"]["train"] = str(tmp_path / "noref.jsonl")
    with pytest.raises(TunesmithError, match=r"exact.*noref\.jsonl:1 has no reference answer"):
        tunesmith.train(cfg, progress=False)
    (tmp_path / "noprompt.jsonl").write_text(json.dumps({"messages": [{"role": "assistant", "content": "x"}]}))
    cfg["data"]["train"] = str(tmp_path / "noprompt.jsonl")
    with pytest.raises(TunesmithError, match=r"noprompt\.jsonl:1.*no prompt"):
        tunesmith.train(cfg, progress=False)


def test_a_reward_failing_during_training_names_the_answer(tiny_dir, tmp_path):
    """The first example's reference passes the check before training; the sampled answers do not."""
    (tmp_path / "picky.py").write_text("def f(prediction, reference, example):\n"
                                       "    return 1.0 if prediction == reference else None\n")
    cfg = config(tiny_dir, tmp_path, reward=[f"python:{tmp_path / 'picky.py'}:f"])
    with pytest.raises(TrainingAborted, match=r"returned None for the answer .* at .*prompts\.jsonl:\d+"):
        tunesmith.train(cfg, progress=False)


# ---------------------------------------------------------------- exact resume

def resume_config(tiny_dir, tmp_path):
    cfg = config(tiny_dir, tmp_path, name="r", method_args={"iterations": 2}, max_steps=6, micro_batch_size=4,
                 grad_accum=1, save_every=1, keep_last=6)
    cfg["adapter"]["dropout"] = 0.1  # the global RNG matters too
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def final_state(run_dir):
    ck = run_dir / "checkpoints" / "step-000006"
    losses = [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    return load_file(ck / "trainable.safetensors"), load_file(ck / "optimizer.safetensors"), losses


@pytest.fixture(scope="module")
def uninterrupted(tiny_dir, tmp_path_factory):
    from test_resume import drive

    tmp = tmp_path_factory.mktemp("straight")
    done = drive(resume_config(tiny_dir, tmp))
    assert done.returncode == 0, done.stderr[-2000:]
    return final_state(tmp / "runs" / "r")


# one micro-batch per step: forward call k is step k; a batch is sampled at steps 1, 3, 5 and trained on twice
@pytest.mark.parametrize("kill_at,pending", [(2, True), (3, False)])
def test_kill_9_then_resume_is_bit_identical(tiny_dir, tmp_path, uninterrupted, kill_at, pending):
    import signal

    from test_resume import drive

    config_path = resume_config(tiny_dir, tmp_path)
    killed = drive(config_path, kill_at)
    assert killed.returncode == -signal.SIGKILL
    latest = checkpoint.latest(tmp_path / "runs" / "r" / "checkpoints")
    assert latest.name == f"step-{kill_at - 1:06d}"
    # resuming mid-way through a sampled batch needs that batch: the policy that sampled it is gone
    assert (latest / "source.json").exists() == pending
    resumed = drive(config_path, 0, "SIGKILL", "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    weights, optim, losses = final_state(tmp_path / "runs" / "r")
    ref_w, ref_o, ref_losses = uninterrupted
    assert weights.keys() == ref_w.keys() and all(torch.equal(weights[k], ref_w[k]) for k in weights)
    assert all(torch.equal(optim[k], ref_o[k]) for k in optim)
    assert losses == ref_losses and len(losses) == 6


def test_online_methods_refuse_to_run_in_several_processes(tiny_dir, tmp_path):
    from types import SimpleNamespace

    from tunesmith.config import parse_config
    from tunesmith.methods import get_method
    from tunesmith.train.recipe import refuse_online_parallel

    cfg = parse_config(config(tiny_dir, tmp_path))
    two = SimpleNamespace(world_size=2, rank=0)
    with pytest.raises(TunesmithError, match=r"'grpo' samples its batches .* runs in one process only.*2 processes"):
        refuse_online_parallel(cfg, get_method("grpo", cfg.method_args), two)
    refuse_online_parallel(cfg, get_method("sft", cfg.method_args.model_copy(update={"rewards": []})), two)


def test_plan_counts_every_prompt_with_its_answers_at_their_longest(tiny_dir, tmp_path):
    plan = tunesmith.plan(config(tiny_dir, tmp_path), device="cpu")
    # 2 steps x 2 micro-batches x 2 prompts, each answered 4 times with up to 6 tokens
    assert plan.data.examples == 8 and plan.data.steps == 2
    assert plan.data.target_tokens == 8 * 4 * 6
    assert plan.worst_batch.rows >= 1 and any("samples its batches" in n for n in plan.notes)


def test_progress_line_shows_the_rollout_metrics():
    from tunesmith.train.progress import rollout_info

    record = {"reward": 1.25, "reward/json_schema": 1.0, "reward/label": 0.5, "reward_std": 0.4, "kl": 0.0012,
              "clip_fraction": 0.02, "completion_length": 11.5, "gen_tokens_per_s": 812.0,
              "train_tokens_per_s": 2400.0}
    assert rollout_info(record) == ("  reward 1.250  (json_schema 1.00, label 0.50)  std 0.400  kl 0.0012  "
                                    "clip 0.020  len 11.5  gen 812  train 2,400")
    assert rollout_info({"loss": 1.0}) == ""


def test_grpo_under_torchrun_stops_with_a_clear_error(tiny_dir, tmp_path):
    """Two real gloo processes: both stop before loading the model, naming the one-process limit."""
    from test_distributed import launch

    cfg = config(tiny_dir, tmp_path, name="dist")
    proc, results = launch([{"config": cfg}], tmp_path / "launch", timeout=300)
    assert "error" in results.get("dist", {}), proc.stderr[-2000:]
    assert "'grpo' samples its batches during training and runs in one process only" in results["dist"]["error"]
    assert "2 processes" in results["dist"]["error"]
    assert not (tmp_path / "runs" / "dist" / "adapter").exists()


@pytest.mark.parametrize("sample_rows,batches", [(16, 2), (1, 4)])
def test_a_steps_prompts_are_sampled_together_up_to_sample_rows(tiny_dir, tmp_path, monkeypatch, sample_rows,
                                                                batches):
    from tunesmith.model.sampling import Sampler

    calls = []
    original = Sampler._chunk

    def counting(self, prompts, settings, generator):
        calls.append(len(prompts))
        return original(self, prompts, settings, generator)

    monkeypatch.setattr(Sampler, "_chunk", counting)
    cfg = config(tiny_dir, tmp_path, method_args={"sample_rows": sample_rows})  # 2 steps of 2 x 2 prompts, G 4
    run = tunesmith.train(cfg, console=Console(file=open("/dev/null", "w")), progress=False, evaluate=False)
    assert len(records(run)) == 2
    # 16 rows: a step's 4 prompts (16 completions) in one batch; 1 row: never fewer than a micro-batch (2)
    assert calls == [4 // (batches // 2)] * batches

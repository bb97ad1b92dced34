"""`tunesmith plan`: the plan of every shipped example config, shipped architectures on listed GPUs (verdicts,
advice, cost), the data side against the recipe's own rendering, calibration, and `tunesmith train` refusing a
run that cannot fit before it loads the model."""

import json
from pathlib import Path

import pytest
import yaml

import tunesmith
from tunesmith.cli import main as cli_main
from tunesmith.errors import TunesmithError
from tunesmith.plan import check_fits, devices, plan_run
from tunesmith.plan.architecture import SHIPPED, load_architecture
from tunesmith.plan.devices import GIB, get_device
from tunesmith.prices import load_prices

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(p for p in (ROOT / "examples").rglob("*.yaml") if "slurm" not in p.parts)  # CPU-sized
SLURM_70B = ROOT / "examples" / "slurm" / "llama-70b-qlora.yaml"


def rows(path: Path, n: int) -> Path:
    labels = ["card_arrival", "exchange_rate", "top_up_failed", "card_linking"]
    path.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": "hello world " * (1 + i % 5) + str(i)},
        {"role": "assistant", "content": labels[i % 4]}]}) + "\n" for i in range(n)))
    return path


def tiny_config(tiny_dir, tmp_path, **train) -> dict:
    return {"model": str(tiny_dir), "output_dir": str(tmp_path / "runs"), "name": "t", "precision": "fp32",
            "device": "cpu", "data": {"train": str(rows(tmp_path / "train.jsonl", train.pop("n", 12)))},
            "train": {"lr": 1e-2, "max_steps": 3, "micro_batch_size": 4, "warmup_ratio": 0.0, **train}}


# ---------------------------------------------------------------- architectures and devices

def test_shipped_architectures_build_on_the_meta_device_with_their_published_sizes():
    sizes = {"llama-3.1-8b": 8.03e9, "llama-3.1-70b": 70.55e9, "qwen2.5-7b": 7.62e9, "qwen2.5-32b": 32.76e9,
             "mistral-7b": 7.25e9, "gemma-2-9b": 9.24e9, "smollm2-135m": 134.5e6}
    assert set(sizes) == set(SHIPPED)
    for name, expected in sizes.items():
        arch = load_architecture(name)
        assert arch.total_numel == pytest.approx(expected, rel=0.005), name
        assert load_architecture(SHIPPED[name][0]).total_numel == arch.total_numel  # by hub id too


@pytest.mark.slow
def test_default_model_matches_its_shipped_config(tmp_path):
    here = load_architecture("default")
    shipped = load_architecture("smollm2-135m")
    assert (here.total_numel, here.layers, here.hidden, here.tied) == \
        (shipped.total_numel, shipped.layers, shipped.hidden, shipped.tied)


def test_devices_come_from_the_price_table_and_user_files(tmp_path):
    h100 = get_device("h100-80gb")
    assert h100.kind == "cuda" and h100.bf16_flops == 989e12
    assert h100.memory_bytes == int((79.6 - devices.CUDA_RESERVE_GIB) * GIB)
    for name, entry in load_prices()["devices"].items():
        assert entry["hourly_usd"] > 0 and entry["price_source"] and entry["price_read"], name
    own = tmp_path / "prices.yaml"
    own.write_text(yaml.safe_dump({"devices": {"my-gpu": {"memory_gib": 12, "bf16_tflops": 50,
                                                          "fp32_tflops": 10, "hourly_usd": 0.1}}}))
    mine = get_device("my-gpu", own)
    assert mine.hourly_usd == 0.1 and mine.memory_bytes == int(11 * GIB)
    with pytest.raises(TunesmithError, match="unknown device 'h100'"):
        get_device("h100")


# ---------------------------------------------------------------- plans

@pytest.mark.slow
@pytest.mark.parametrize("path", EXAMPLES, ids=[str(p.relative_to(ROOT)) for p in EXAMPLES])
def test_every_example_config_plans_and_fits_this_machine(path):
    cfg = tunesmith.load_config(path)
    plan = tunesmith.plan(cfg, device="cpu")
    assert plan.fits, plan.verdict
    assert plan.peak_bytes > sum(plan.memory.weights.values())
    assert plan.data.steps >= 1 and plan.data.tokens > 0
    assert plan.time is not None and plan.time.total_s > 0
    as_json = json.loads(json.dumps(plan.as_dict(), default=str))
    assert as_json["fits"] is True and as_json["peak_bytes"] == plan.peak_bytes
    if cfg.stages:
        assert len(plan.stages) == len(cfg.stages)
        assert plan.peak_bytes == max(s.peak_bytes for s in plan.stages)


def test_the_70b_qlora_example_plans_as_its_docs_say():
    """docs/distributed.md: 4 x 24 GB GPUs hold it sharded; 2 do not (the bf16 embedding and head are gathered)."""
    cfg = tunesmith.load_config(SLURM_70B, ["data.max_examples=64"])
    four = tunesmith.plan(cfg, device="rtx4090-24gb", nproc=4, parallel="fsdp")
    two = tunesmith.plan(cfg, device="rtx4090-24gb", nproc=2, parallel="fsdp")
    assert four.fits and not two.fits
    assert four.peak_bytes / 2**30 == pytest.approx(17.5, abs=0.3)  # the docs' figures (activations vary
    assert two.peak_bytes / 2**30 == pytest.approx(27.4, abs=0.3)   # a little with the examples sampled)


@pytest.mark.slow
def test_data_side_counts_what_the_recipe_renders():
    """Examples, steps and tokens of the banking77 plan equal the recipe's own rendering and the loop's batch plan."""
    from tunesmith.data.load import load_data
    from tunesmith.data.plan import BatchPlan
    from tunesmith.data.render import Renderer
    from tunesmith.methods import get_method
    from tunesmith.model.load import load_tokenizer

    cfg = tunesmith.load_config(ROOT / "examples/banking77/config.yaml", ["data.max_examples=300"])
    plan = tunesmith.plan(cfg, device="cpu")
    train_ds, _ = load_data(cfg.data, cfg.train.seed)
    renderer = Renderer(load_tokenizer("default"), cfg.data.max_length)
    items = [x for x in (get_method("sft").render(renderer, ex) for ex in train_ds.examples) if x is not None]
    assert plan.data.examples == len(items)
    assert plan.data.steps == BatchPlan.from_config([len(x) for x in items], cfg.train).total_steps
    assert plan.data.tokens == sum(len(x) for x in items)  # one epoch: every example once
    assert plan.data.target_tokens == sum(x.n_target for x in items) - len(items) * 0


@pytest.mark.slow  # the default model's tokenizer stands in for the shipped models'
def test_big_models_on_listed_gpus_get_verdicts_advice_and_cost(tiny_dir, tmp_path):
    cfg = tiny_config(tiny_dir, tmp_path, max_steps=None, epochs=1, micro_batch_size=8)
    cfg.update(model="llama-3.1-8b", precision="auto")
    lora = plan_run(tunesmith.parse_config(cfg), device="h100-80gb")
    assert lora.fits and lora.precision == "bf16"
    assert any("tokenizer is not on this machine" in n for n in lora.notes)
    # an 8B LoRA: bf16 base (2 bytes a weight) plus adapters and their states
    assert 15 * GIB < lora.peak_bytes < 30 * GIB
    hours = lora.time.total_s / 3600
    assert lora.cost_usd == pytest.approx(hours * 3.78)

    full = plan_run(tunesmith.parse_config({**cfg, "adapter": "full"}), device="rtx4090-24gb")
    assert not full.fits
    assert "does not fit on rtx4090-24gb" in full.verdict
    fixes = {a.change: a for a in full.advice}
    assert fixes["adapter.kind=lora"].peak_bytes < full.peak_bytes
    with pytest.raises(TunesmithError, match="cannot fit") as e:
        check_fits(full)
    assert "--force" in e.value.hint

    qlora = plan_run(tunesmith.parse_config({**cfg, "model": "llama-3.1-70b", "adapter": "qlora"}),
                     device="a100-80gb")
    assert qlora.fits  # a 70B base in NF4 is about 0.56 bytes a weight
    sharded = plan_run(tunesmith.parse_config({**cfg, "model": "llama-3.1-70b", "adapter": "full"}),
                       device="h100-80gb", nproc=8, parallel="fsdp")
    one = plan_run(tunesmith.parse_config({**cfg, "model": "llama-3.1-70b", "adapter": "full"}), device="h100-80gb")
    assert sharded.parallel == "fsdp" and sharded.peak_bytes < one.peak_bytes / 4
    assert sharded.cost_usd == pytest.approx(sharded.time.total_s / 3600 * 3.78 * 8)


@pytest.mark.slow  # the default model's tokenizer stands in for the shipped models'
def test_plan_cli_prints_and_writes_json(tiny_dir, tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tiny_dir, tmp_path)))
    assert cli_main(["plan", str(path), "--device", "a10-24gb", "--set", "adapter.kind=dora"]) == 0
    out = capsys.readouterr().out
    assert "verdict: fits on a10-24gb" in out and "with dora" in out and "cost: $" in out
    assert cli_main(["plan", str(path), "--json", "--model", "qwen2.5-7b", "--device", "h100-80gb"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["device"] == "h100-80gb" and data["fits"] and data["memory"]["weights"]
    assert cli_main(["plan", str(path), "--device", "nope"]) == 2
    assert "unknown device" in capsys.readouterr().err


def test_calibrate_runs_real_steps_and_times_the_run(tiny_dir, tmp_path):
    cfg = tunesmith.parse_config(tiny_config(tiny_dir, tmp_path, n=40, max_steps=None, epochs=1))
    plan = plan_run(cfg, device="cpu", calibrate=True)
    cal = plan.calibration
    assert cal.steps == 3 and all(s > 0 for s in cal.step_s) and cal.flops_per_s > 0
    assert plan.time.source.startswith("calibrated on this machine")
    # 40 examples / 4 = 10 steps, each about as long as a calibrated one
    per_step = plan.time.train_s / plan.data.steps
    assert 0.2 < per_step / (sum(cal.step_s) / len(cal.step_s)) < 5
    assert not (tmp_path / "runs" / "calibrate").exists()  # calibration leaves nothing behind
    with pytest.raises(TunesmithError, match="on this machine"):
        plan_run(cfg, device="h100-80gb", calibrate=True)


# ---------------------------------------------------------------- tunesmith train and the plan

def _small_cpu(monkeypatch, gib: float):
    monkeypatch.setattr(devices, "_meminfo", lambda key: int(gib * GIB))  # MemTotal and MemAvailable


def test_train_refuses_before_loading_the_model(tiny_dir, tmp_path, monkeypatch):
    _small_cpu(monkeypatch, 0.05)  # 50 MiB: less than the libraries alone

    def no_load(*a, **k):
        raise AssertionError("the model must not be loaded for a run the plan refuses")

    from tunesmith.model import load

    monkeypatch.setattr(load, "load_model_and_tokenizer", no_load)
    with pytest.raises(TunesmithError, match="cannot fit") as e:
        tunesmith.train(tiny_config(tiny_dir, tmp_path), progress=False)
    assert "--force" in e.value.hint and "does not fit on cpu" in e.value.message
    assert not (tmp_path / "runs" / "t" / "run.json").exists()


def test_force_trains_anyway_and_run_json_records_the_plan(tiny_dir, tmp_path, monkeypatch, capsys):
    _small_cpu(monkeypatch, 0.05)
    cfg = tiny_config(tiny_dir, tmp_path)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli_main(["train", str(path), "--no-progress"]) == 2
    assert "cannot fit" in capsys.readouterr().err
    assert cli_main(["train", str(path), "--no-progress", "--force"]) == 0
    info = json.loads((tmp_path / "runs" / "t" / "run.json").read_text())
    assert info["plan"]["fits"] is False and info["plan"]["peak_bytes"] > 0
    assert info["plan"]["measured"]["peak_rss_bytes"] > 0
    # the config key does the same as --force
    run = tunesmith.train({**cfg, "train": {**cfg["train"], "ignore_plan": True}}, progress=False)
    assert run.info["plan"]["fits"] is False


def test_train_prints_the_plan_when_it_fits(tiny_dir, tmp_path, capsys):
    run = tunesmith.train(tiny_config(tiny_dir, tmp_path), progress=False)
    err = capsys.readouterr().err
    assert "plan for t: sft with lora" in err and "verdict: fits on cpu" in err
    assert run.info["plan"]["fits"] is True
    measured = run.info["plan"]["measured"]["peak_rss_bytes"]
    assert measured > 0

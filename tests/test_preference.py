"""Preference methods end to end on the tiny model: DPO/IPO/ORPO/SimPO/KTO through `tunesmith.train`, the batch
layout, KTO's mismatched sequences and batch plan, and what adapter training leaves untouched."""

import json
import math
from pathlib import Path

import pytest
import torch

import tunesmith
from pref_utils import kto_rows, pair_rows, quiet, run_config, steps, write_jsonl
from tunesmith.config import MethodConfig, TrainConfig, parse_config
from tunesmith.data.batching import Batch
from tunesmith.data.plan import BatchPlan
from tunesmith.data.render import IGNORE, Tokenized, TokenizedPair, TokenizedUnpaired
from tunesmith.errors import ConfigError, TunesmithError
from tunesmith.methods import get_method
from tunesmith.methods.logps import SeqLogps
from tunesmith.methods.preference import drop_lone_example, mismatched_sequence
from tunesmith.train.source import Collator, PlannedSource, planned_items

HH = Path(__file__).resolve().parents[1] / "examples" / "hh-rlhf" / "harmless-test.jsonl.gz"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def pairs(tmp_path):
    return write_jsonl(tmp_path / "pairs.jsonl", pair_rows())


# ---------------------------------------------------------------- batch layout (no model)

def _seq(ids, n_prompt, source=None):
    return Tokenized(tuple(ids), tuple([IGNORE] * n_prompt + list(ids[n_prompt:])), source)


def test_paired_collate_puts_chosen_first_then_rejected_in_one_batch():
    method = get_method("dpo", MethodConfig(share_prompt=False))  # shared prompts: tests/test_shared_prompt.py
    items = [TokenizedPair(_seq([5, 6, 7, 8], 2), _seq([5, 6, 9], 2)),
             TokenizedPair(_seq([10, 11, 12], 1), _seq([10, 13, 14, 15, 16], 1))]
    for pack in (None, 64):
        batch = method.collate(items, pad_id=2, pack_length=pack)
        assert batch.n_seqs == 4 and method.units(batch) == 2
        for sid, expected in enumerate([items[0].chosen, items[1].chosen, items[0].rejected, items[1].rejected]):
            assert batch.input_ids[batch.seq_ids == sid].tolist() == list(expected.input_ids)
    assert batch.input_ids.shape[0] == 1  # packed: all four sequences share one row, kept apart by seq ids


def test_paired_loss_sums_over_pairs_and_reports_metric_sums():
    method = get_method("dpo", MethodConfig(beta=0.5))
    batch = Batch(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, 1), 4, [], {"pairs": 2})
    policy = SeqLogps(torch.tensor([-1.0, -2.0, -3.0, -1.5]), torch.tensor([2.0, 2.0, 3.0, 3.0]))
    ref = SeqLogps(torch.tensor([-2.0, -2.0, -2.0, -2.0]), torch.ones(4))
    loss, m = method.loss(policy, ref, batch)
    # pair 0: chosen ratio +1, rejected -1 -> beta*h = 1; pair 1: chosen 0, rejected +0.5 -> -0.25
    expected = -torch.nn.functional.logsigmoid(torch.tensor([1.0, -0.25])).sum()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert m["rewards/chosen"].item() == pytest.approx(0.5 * (1 + 0))
    assert m["rewards/rejected"].item() == pytest.approx(0.5 * (-1 + 0.5))
    assert m["rewards/margins"].item() == pytest.approx(1.0 - 0.25)
    assert m["rewards/accuracies"].item() == 1.0
    assert m["logps/chosen"].item() == pytest.approx(-3.0) and m["logps/rejected"].item() == pytest.approx(-4.5)


def test_default_beta_per_method():
    assert get_method("dpo").beta == 0.1 and get_method("kto").beta == 0.1
    assert get_method("simpo").beta == 2.0
    assert get_method("simpo", MethodConfig(beta=3.0)).beta == 3.0
    with pytest.raises(TunesmithError, match="unknown training method"):
        get_method("ppo")


def test_mismatched_sequence_splices_prompt_and_other_completion():
    a = _seq([1, 20, 21, 22, 30, 31, 2], 4)  # prompt 1 20 21 22, completion 30 31 2
    b = _seq([1, 40, 41, 50, 51, 52, 2], 3)  # prompt 1 40 41, completion 50 51 52 2
    kl = mismatched_sequence(a, b, max_length=None)
    assert kl.input_ids == (1, 20, 21, 22, 50, 51, 52, 2)
    assert kl.labels == (IGNORE,) * 4 + (50, 51, 52, 2)
    cut = mismatched_sequence(a, b, max_length=6)
    assert cut.input_ids == (1, 20, 21, 22, 50, 51) and cut.n_target == 2


def test_kto_collate_pairs_prompt_i_with_completion_of_next():
    method = get_method("kto")
    items = [TokenizedUnpaired(_seq([1, 10 + i, 100 + i, 2], 2), label=i % 2 == 0) for i in range(3)]
    batch = method.collate(items, pad_id=2, pack_length=None)
    assert batch.n_seqs == 6 and method.units(batch) == 3
    assert batch.extra["desirable"].tolist() == [True, False, True]
    for i in range(3):
        j = (i + 1) % 3
        assert batch.input_ids[batch.seq_ids == 3 + i].tolist() == [1, 10 + i, 100 + j, 2]
    with pytest.raises(TunesmithError, match="at least 2 examples"):
        method.collate(items[:1], pad_id=2, pack_length=None)


def test_kto_lone_example_is_left_out():
    assert drop_lone_example(list(range(9)), 4) == (list(range(8)), 1)
    assert drop_lone_example(list(range(10)), 4) == (list(range(10)), 0)
    with pytest.raises(TunesmithError, match="at least 2"):
        drop_lone_example([0], 4)


def test_the_reference_pass_sees_exactly_the_micro_batches_the_loop_runs():
    """KTO's mismatched pairs depend on which examples share a micro-batch: the precomputed reference scores
    the micro-batches of the one batch plan the loop's source also reads, over every step of the run."""
    method = get_method("kto")
    items = [TokenizedUnpaired(_seq([1] + [7] * (3 + i % 5) + [2], 2), True) for i in range(11)]
    cfg = TrainConfig(micro_batch_size=4, grad_accum=3, epochs=2.5, seed=3)
    plan = BatchPlan.from_config([method.length(x) for x in items], cfg)
    source = PlannedSource(plan, items, Collator(method, 2, None, torch.device("cpu")))
    ran = [mb.items for s in range(source.total_steps) for mb in source.step(s)]
    assert ran == planned_items(plan, items, None, cfg.micro_batch_size)["train"]
    assert source.total_steps == 3 and len(ran) == 9  # an epoch is 3 micro-batches = one step; 2.5 epochs


def test_config_checks_for_preference_methods():
    with pytest.raises(ConfigError) as e:
        parse_config({"method": "kto", "data": {"train": "x"}, "train": {"micro_batch_size": 1}})
    assert [p.where for p in e.value.problems] == ["train.micro_batch_size"]
    with pytest.raises(ConfigError) as e:
        parse_config({"method": "orpo", "data": {"train": "x"}, "method_args": {"beta": 0.2}})
    assert e.value.problems[0].where == "method_args.beta" and "orpo_lambda" in e.value.problems[0].hint
    with pytest.raises(ConfigError) as e:
        parse_config({"method": "ipo", "data": {"train": "x"}, "method_args": {"label_smoothing": 0.1}})
    assert e.value.problems[0].where == "method_args.label_smoothing"
    with pytest.raises(ConfigError) as e:
        parse_config({"stages": [{"method": "sft", "data": "a"},
                                 {"method": "kto", "data": "b", "train": {"micro_batch_size": 1},
                                  "method_args": {"bta": 1}}]})
    assert {p.where for p in e.value.problems} == {"stages[1].train.micro_batch_size", "stages[1].method_args.bta"}
    assert parse_config({"method": "simpo", "data": {"train": "x"}}).method_args.beta is None
    parse_config({"method": "dpo", "data": {"train": "x"}, "method_args": {"label_smoothing": 0.1}})


# ---------------------------------------------------------------- training runs

@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_step_zero_policy_equals_reference(tiny_dir, tmp_path, pairs, adapter):
    """Before the first update the policy is the reference: DPO loss = ln 2, rewards 0. Micro-batches of 3
    with packing differ from the reference pass's batches, so this also checks batch-independence."""
    cfg = run_config(tiny_dir, tmp_path / "runs", "dpo", pairs, adapter={"kind": adapter},
                     train={"max_steps": 1, "micro_batch_size": 3, "grad_accum": 3})
    first = steps(tunesmith.train(cfg, progress=False, console=quiet()[0]))[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert abs(first[key]) < 1e-5, (key, first[key])


LEARN = {
    "dpo": ({"lr": 3e-3}, {}),
    "ipo": ({"lr": 3e-3}, {}),
    "orpo": ({"lr": 1e-2}, {"orpo_lambda": 1.0}),
    "simpo": ({"lr": 3e-3}, {}),
}


@pytest.mark.parametrize("method", sorted(LEARN))
def test_reward_accuracy_rises(tiny_dir, tmp_path, pairs, method):
    train, margs = LEARN[method]
    cfg = run_config(tiny_dir, tmp_path / "runs", method, pairs, train={"max_steps": 25, **train},
                     method_args=margs)
    records = steps(tunesmith.train(cfg, progress=False, console=quiet()[0]))
    acc = [r["rewards/accuracies"] for r in records]
    assert len(acc) == 25
    assert acc[0] < 0.9 and all(a > 0.9 for a in acc[-3:]), acc
    margins = [r["rewards/margins"] for r in records]
    assert sum(margins[-3:]) / 3 > margins[0] + 0.05


def test_kto_loss_falls_and_logs_kl(tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "kto.jsonl", kto_rows())
    cfg = run_config(tiny_dir, tmp_path / "runs", "kto", data, method_args={"beta": 0.5},
                     train={"max_steps": 20, "grad_accum": 2})
    records = steps(tunesmith.train(cfg, progress=False, console=quiet()[0]))
    losses = [r["loss"] for r in records]
    assert losses[0] == pytest.approx(0.5, abs=1e-5)  # policy == reference: every loss is 1 - sigmoid(0)
    assert sum(losses[-3:]) / 3 < losses[0] - 0.1, losses
    kls = [r["kl"] for r in records]
    assert all(math.isfinite(k) and k >= 0 for k in kls) and max(kls) > 0
    assert records[-1]["rewards/accuracies"] > 0.9


def test_kto_drops_a_lone_example_and_runs_every_batch(tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "kto.jsonl", kto_rows()[:9])  # 9 examples, micro-batch 4 -> one left over
    cfg = run_config(tiny_dir, tmp_path / "runs", "kto", data, train={"max_steps": 5, "micro_batch_size": 4},
                     data={"eval": str(data)})
    cfg["train"]["eval_every"] = 5
    console, buf = quiet()
    run = tunesmith.train(cfg, progress=False, console=console)
    assert "left out 1 train example(s)" in buf.getvalue() and "left out 1 eval example(s)" in buf.getvalue()
    assert math.isfinite(steps(run)[-1]["eval_loss"]) and "eval_kl" in steps(run)[-1]


def _setup(tiny_dir, tmp_path, method_name, data_file, **train):
    """What the recipe does before the loop, by hand: model + fresh LoRA, rendered items, reference."""
    from tunesmith.config import RunConfig
    from tunesmith.data.load import load_data
    from tunesmith.data.render import Renderer
    from tunesmith.methods.reference import build_reference
    from tunesmith.model.adapters import apply_adapter
    from tunesmith.model.device import make_runtime
    from tunesmith.model.load import load_model_and_tokenizer

    cfg = RunConfig.model_validate(run_config(tiny_dir, tmp_path / "runs", method_name, data_file, train=train))
    rt = make_runtime("cpu", "fp32")
    model, tok = load_model_and_tokenizer(str(tiny_dir), device="cpu", precision="fp32", dtype="fp32")
    model = apply_adapter(model, cfg.adapter)
    method = get_method(method_name, cfg.method_args)
    items = [method.render(Renderer(tok, 64), ex) for ex in load_data(cfg.data, 0)[0].examples]
    items = method.prepare(items, cfg.train.micro_batch_size, "train")[0]  # as the recipe does
    plan = BatchPlan.from_config([method.length(x) for x in items], cfg.train)
    reference = build_reference(model, method, planned_items(plan, items, None, cfg.train.micro_batch_size), cfg,
                                rt, tok, 64, quiet()[0])
    return cfg, rt, model, method, items, plan, reference


def test_kto_reference_equals_the_policy_before_training_for_every_planned_batch(tiny_dir, tmp_path):
    """Every completion and every mismatched sequence of every micro-batch the run will form: the cached
    reference equals the step-0 policy's log-probs, in the batch's sequence order."""
    from tunesmith.methods.logps import sequence_logps

    data = write_jsonl(tmp_path / "kto.jsonl", kto_rows())
    cfg, rt, model, method, items, plan, reference = _setup(tiny_dir, tmp_path, "kto", data, micro_batch_size=3,
                                                            max_steps=4, grad_accum=2)
    model.train()
    groups = list(plan.micro_batches())
    assert len(groups) > 6  # more than one epoch: different pairings per epoch
    for indices in groups:
        batch = method.collate([items[i] for i in indices], 2, 64)
        with torch.no_grad():
            policy = sequence_logps(model, batch)
        ref = reference("train", [items[i] for i in indices], batch)
        assert ref.logp_sum.shape == (2 * len(indices),)
        torch.testing.assert_close(ref.logp_sum, policy.logp_sum, atol=1e-4, rtol=0)
        torch.testing.assert_close(ref.n_tokens, policy.n_tokens)


def test_adapter_training_leaves_base_bit_identical_and_changes_every_adapter_tensor(tiny_dir, tmp_path, pairs):
    from transformers import AutoModelForCausalLM

    from tunesmith.model.adapters import optimizer_param_groups
    from tunesmith.train.loop import Trainer

    cfg, rt, model, method, items, plan, reference = _setup(tiny_dir, tmp_path, "dpo", pairs)
    base_before = {k: v.clone() for k, v in model.named_parameters() if "lora_" not in k}
    lora_before = {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}
    groups = optimizer_param_groups(model, cfg.adapter, 3e-3, 0.0)
    train = cfg.train.model_copy(update={"max_steps": 4})
    source = PlannedSource(BatchPlan.from_config(plan.lengths, train), items, Collator(method, 2, 64, rt.device))
    trainer = Trainer(model, method, source, train, rt, torch.optim.AdamW(groups, lr=3e-3), reference=reference)
    trainer.fit()
    fresh = dict(AutoModelForCausalLM.from_pretrained(tiny_dir).named_parameters())
    for name, before in base_before.items():
        plain = name.replace("base_model.model.", "").replace(".base_layer", "")
        assert torch.equal(dict(model.named_parameters())[name], before), name
        assert torch.equal(before, fresh[plain]), name
    assert lora_before and all(not torch.equal(v, dict(model.named_parameters())[k]) for k, v in lora_before.items())


@pytest.mark.slow
def test_dpo_on_real_hh_rlhf_pairs_with_the_default_model(tmp_path, monkeypatch):
    """64 short real hh-rlhf pairs, SmolLM2-135M on CPU, one epoch: the mean reward margin on 16 of the trained
    pairs grows from 0 (policy == reference before the first step)."""
    import gzip

    monkeypatch.delenv("TUNESMITH_CACHE")  # reuse the converted default model
    rows = [json.loads(line) for line in gzip.open(HH, "rt", encoding="utf-8")]
    short = [r for r in rows if len(r["chosen"]) <= 250 and len(r["rejected"]) <= 250][:64]
    train_file = write_jsonl(tmp_path / "hh64.jsonl", short)
    eval_file = write_jsonl(tmp_path / "hh16.jsonl", short[:16])
    cfg = {"name": "hh", "output_dir": str(tmp_path), "model": "default", "device": "cpu", "precision": "auto",
           "method": "dpo", "method_args": {"beta": 0.1, "reference_cache": False},
           "data": {"train": str(train_file), "eval": str(eval_file), "format": "hh_rlhf", "skip_invalid": True,
                    "max_length": 256, "truncation": "drop"},
           "adapter": {"kind": "lora", "r": 16, "alpha": 32},
           "train": {"max_steps": 4, "micro_batch_size": 16, "lr": 1e-3, "warmup_ratio": 0.0,
                     "schedule": "constant", "eval_every": 4}}
    run = tunesmith.train(cfg, progress=False, console=quiet()[0])
    records = steps(run)
    info = json.loads((run.path / "run.json").read_text())
    assert info["data"]["examples"] >= 60 and len(records) == 4
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=2e-2)  # bf16 (where native): equal up to rounding
    assert records[-1]["eval_rewards/margins"] > 0.05, records[-1]
    assert records[-1]["eval_rewards/accuracies"] > 0.5, records[-1]


def test_likelihood_displacement_is_reported_and_sft_weight_counters_it(tiny_dir, tmp_path):
    """SFT on the chosen answers, then DPO on pairs whose answers differ in one word: plain DPO grows the
    margin by pushing the chosen answers down too (likelihood displacement) and says so (console, run.json);
    the chosen-NLL term (method_args.sft_weight) keeps them likely."""
    from pref_utils import WORDS
    from tunesmith.methods.preference import likelihood_displacement

    assert likelihood_displacement([{"logps/chosen": v} for v in (-0.5, -0.6, -2.0, -3.0)], "dpo")
    assert not likelihood_displacement([{"logps/chosen": v} for v in (-3.0, -2.0, -1.0, -0.5)], "dpo")
    rows = [{"prompt": f"say {w}", "chosen": f"{w} ok", "rejected": f"{w} no"} for w in WORDS]
    pairs = write_jsonl(tmp_path / "near.jsonl", rows)
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"messages": [{"role": "user", "content": r["prompt"]},
                                                             {"role": "assistant", "content": r["chosen"]}]}
                                               for r in rows])
    out = {}
    for weight in (0.0, 1.0):
        dpo = {"method": "dpo", "data": str(pairs), "train": {"max_steps": 12},
               "method_args": {"sft_weight": weight} if weight else {}}
        cfg = {"name": f"w{weight}", "output_dir": str(tmp_path / "runs"), "model": str(tiny_dir), "device": "cpu",
               "precision": "fp32", "data": {"max_length": 64},
               "train": {"micro_batch_size": 8, "lr": 1e-2, "warmup_ratio": 0.0, "schedule": "constant"},
               "stages": [{"method": "sft", "data": str(sft), "train": {"max_steps": 30}}, dpo]}
        console, buf = quiet()
        stage = tunesmith.train(cfg, progress=False, console=console).stages[1]
        out[weight] = steps(stage), stage.info["warnings"], buf.getvalue()
    (plain, warned, console), (weighted, kept, _) = out[0.0], out[1.0]
    assert warned and "likelihood displacement" in warned[0] and warned[0] in console
    assert "nll/chosen" in weighted[-1] and "nll/chosen" not in plain[-1]
    assert weighted[-1]["logps/chosen"] > plain[-1]["logps/chosen"] + 5
    assert kept == likelihood_displacement(weighted, "dpo")

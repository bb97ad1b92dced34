"""The one batch plan: epoch-aligned steps (no step reaches into the next epoch), sharding by rank that adds
up to the single-process step, and what a run actually trains on."""

import json

import pytest

import tunesmith
from tunesmith.data.plan import BatchPlan, eval_chunks


def test_a_short_last_step_instead_of_running_into_the_next_epoch():
    plan = BatchPlan(lengths=[5] * 10, micro_batch_size=2, grad_accum=4, epochs=1)
    assert (plan.per_epoch, plan.steps_per_epoch, plan.total_steps) == (5, 2, 2)
    steps = [plan.step(s) for s in range(plan.total_steps)]
    assert [len(s) for s in steps] == [4, 1]  # the old plan took 3 more micro-batches from epoch 2
    seen = [i for s in steps for mb in s for i in mb]
    assert sorted(seen) == list(range(10))  # exactly one epoch
    assert [plan.epoch_at(s) for s in (0, 1, 2)] == [0.0, 0.8, 1.0]


def test_fractional_epochs_and_max_steps_continue_epoch_by_epoch():
    plan = BatchPlan(lengths=list(range(1, 12)), micro_batch_size=4, grad_accum=2, epochs=2.5, seed=3,
                     group_by_length=False)
    assert (plan.per_epoch, plan.steps_per_epoch, plan.total_steps) == (3, 2, 5)
    assert [len(plan.step(s)) for s in range(5)] == [2, 1, 2, 1, 2]
    assert plan.step(2) == plan.order(1)[:2] and plan.step(4) == plan.order(2)[:2]
    assert plan.order(0) != plan.order(1)  # each epoch its own seeded order
    capped = BatchPlan(lengths=list(range(1, 12)), micro_batch_size=4, grad_accum=2, max_steps=7)
    assert capped.total_steps == 7 and capped.step(6) == capped.order(3)[:2]


@pytest.mark.parametrize("world", [2, 3])
def test_the_ranks_of_a_step_add_up_to_the_single_process_step(world):
    lengths = [3 + (7 * i) % 11 for i in range(37)]
    one = BatchPlan(lengths, micro_batch_size=3, grad_accum=2 * world, epochs=2)
    many = BatchPlan(lengths, micro_batch_size=3, grad_accum=2, world_size=world, epochs=2)
    assert one.total_steps == many.total_steps
    for s in range(one.total_steps):
        shards = [many.shard(s, r) for r in range(world)]
        assert sorted(mb for shard in shards for mb in shard) == sorted(one.step(s))
        assert all(len(shard) <= 2 for shard in shards)
    assert list(one.micro_batches()) == list(many.micro_batches())


def test_eval_chunks_are_in_file_order_and_shard_by_rank():
    assert eval_chunks(7, 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert eval_chunks(7, 3, rank=1, world_size=2) == [[3, 4, 5]]


def test_a_run_with_a_ragged_last_accumulation_trains_one_epoch(tiny_dir, tmp_path):
    """10 examples, micro-batch 2, accum 4, epochs 1: two steps over exactly the 10 examples (the old loop
    took a third step's worth from the second epoch and trained 1.6 epochs)."""
    from test_train import write_rows

    data = write_rows(tmp_path / "train.jsonl", 10)
    cfg = {"model": str(tiny_dir), "output_dir": str(tmp_path / "runs"), "precision": "fp32", "device": "cpu",
           "data": {"train": str(data)}, "train": {"micro_batch_size": 2, "grad_accum": 4, "epochs": 1}}
    run = tunesmith.train(cfg, progress=False)
    records = [m for m in run.metrics if "step" in m]
    assert [r["epoch"] for r in records] == [0.8, 1.0]
    rendered = json.loads((run.path / "run.json").read_text())["data"]["render"]["rendered"]
    lengths_trained = sum(r["target_tokens"] for r in records)
    from tunesmith.data.load import load_data
    from tunesmith.data.render import Renderer
    from tunesmith.model.load import load_tokenizer

    renderer = Renderer(load_tokenizer(str(tiny_dir)), 1024)
    expected = sum(renderer.sft(ex).n_target for ex in load_data(run.config.data, 0)[0].examples)
    assert rendered == 10 and lengths_trained == expected

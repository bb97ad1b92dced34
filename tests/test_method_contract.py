"""One contract, run over every registered method (as PEFT runs one tester over every adapter kind): each
renders, collates and scores through the declared interface only; reference methods get the reference,
reference-free ones do not need it; shared prompts change nothing; at step 0 (policy == reference) the losses
take their known values."""

import math
import re
from pathlib import Path

import pytest
import torch

from tunesmith.config import METHOD_ARGS, MethodConfig, RewardConfig
from tunesmith.data.render import Renderer
from tunesmith.data.types import Conversation, Document, Message, Preference, Prompt, Unpaired
from tunesmith.methods import METHODS, Method, get_method
from tunesmith.methods.logps import sequence_logps
from tunesmith.model.load import load_model_and_tokenizer
from tunesmith.model.sampling import Sampler

SRC = Path(__file__).resolve().parents[1] / "src" / "tunesmith"
WORDS = ["hello world", "quick brown fox", "lazy dog", "card balance", "transfer arrive", "exchange rate"]


def examples(kind: str) -> list:
    u = [(Message("user", f"say {w}"),) for w in WORDS]
    a = [(Message("assistant", w),) for w in WORDS]
    if kind == "sft":
        return [Conversation(p + c) for p, c in zip(u, a, strict=True)]
    if kind == "preference":
        return [Preference(p, a[i], a[(i + 2) % 6]) for i, p in enumerate(u)]
    if kind == "prompt":
        return [Prompt(p, w) for p, w in zip(u, WORDS, strict=True)]
    if kind == "document":
        return [Document(f"{w} and {v} " * 3) for w, v in zip(WORDS, WORDS[1:] + WORDS[:1], strict=True)]
    return [Unpaired(p, a[(i + i % 2) % 6], i % 2 == 0) for i, p in enumerate(u)]


def args_for(name: str, **kw) -> MethodConfig:
    """Settings every method can run with (an online method needs rewards and a sampling budget)."""
    if METHODS[name] is METHODS["grpo"]:
        kw = {"rewards": [RewardConfig(reward="f1")], "group_size": 3, "max_new_tokens": 6, **kw}
    return MethodConfig(**kw)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    model, tok = load_model_and_tokenizer(str(tiny_dir), precision="fp32")
    return model.eval(), tok


def scored(method: Method, tiny):
    model, tok = tiny
    items = [method.render(Renderer(tok, 64), ex) for ex in examples(method.example_kind)]
    items, _ = method.prepare(items, 3, "train")
    if method.online:  # its items for a batch are sampled answers to the rendered prompts
        prompts = [[(i, items[i]) for i in range(4)]]
        chunks, _ = method.rollout(Sampler(model, tok), prompts, torch.Generator().manual_seed(0),
                                   lambda its: method.collate(its, tok.pad_token_id, 64))
        items = [g for c in chunks for g in c]
        for g in items:
            g.train = True  # every group in the batch, whatever its rewards
    batch = method.collate(items[:4], tok.pad_token_id, 64)
    assert batch.n_seqs == len(method.batch_sequences(items[:4]))
    with torch.no_grad():
        policy = method.policy_logps(model, batch, 1024)
    return items, batch, policy


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_keeps_the_contract(name, tiny):
    method = get_method(name, args_for(name))
    assert isinstance(method, Method) and method.name == name
    items, batch, policy = scored(method, tiny)
    for sid, seq in enumerate(method.batch_sequences(items[:4])):  # a shared prompt sits under its first seq
        got = batch.input_ids[batch.seq_ids == sid].tolist()
        assert got and list(seq.input_ids[-len(got):]) == got
    reference = policy if method.needs_reference else None
    loss, metrics = method.loss(policy, reference, batch)
    assert loss.shape == () and math.isfinite(float(loss)) and method.units(batch) > 0
    for v in metrics.values():  # a sum over the units, or a (sum, count) pair with its own count
        values = v if isinstance(v, tuple) else (v,)
        assert all(torch.as_tensor(x).shape == () and math.isfinite(float(x)) for x in values)
    if method.needs_reference:
        with pytest.raises(Exception, match="reference"):
            method.loss(policy, None, batch)
    assert method.diagnose([]) == []


@pytest.mark.parametrize("name,step0", [("dpo", math.log(2)), ("ipo", None), ("kto", 0.5)])
def test_at_step_zero_policy_equals_reference(name, step0, tiny):
    method = get_method(name, MethodConfig(beta=0.1))
    _, batch, policy = scored(method, tiny)
    loss, metrics = method.loss(policy, policy, batch)
    per_unit = float(loss) / method.units(batch)
    expected = step0 if step0 is not None else (1 / (2 * 0.1)) ** 2  # IPO: (0 - 1/(2 beta))^2
    assert per_unit == pytest.approx(expected, rel=1e-6)
    if "rewards/margins" in metrics:
        assert float(metrics["rewards/margins"]) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("name", [n for n in sorted(METHODS) if "share_prompt" in METHOD_ARGS[n]])
def test_shared_prompts_give_the_same_log_probs(name, tiny):
    on = scored(get_method(name, args_for(name, share_prompt=True)), tiny)
    off = scored(get_method(name, args_for(name, share_prompt=False)), tiny)
    assert on[1].n_computed_tokens < off[1].n_computed_tokens  # the prompt really was computed once
    if hasattr(on[2], "logp_sum"):
        torch.testing.assert_close(on[2].logp_sum, off[2].logp_sum, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(on[2].n_tokens, off[2].n_tokens)
    else:  # per-token log-probs (GRPO): each prompt's completions attend to one copy of it; the rows are laid
        # out differently, so compare sequence by sequence (a sequence's tokens stay in order within its row)
        def by_sequence(t):
            order = torch.sort(t.seq, stable=True).indices
            return t.seq[order], t.logp[order]

        (seq_on, lp_on), (seq_off, lp_off) = by_sequence(on[2]), by_sequence(off[2])
        assert torch.equal(seq_on, seq_off)
        torch.testing.assert_close(lp_on, lp_off, atol=1e-5, rtol=1e-5)


def test_nothing_outside_methods_asks_a_method_for_more_than_its_interface():
    """No hasattr/getattr on methods and no branching on a method's name outside methods/."""
    pattern = re.compile(r"hasattr\(method|getattr\(method|hasattr\(self\.method|getattr\(self\.method|"
                         r"cfg\.method ==|\.method == \"|method\.name ==")
    offenders = [f"{p.relative_to(SRC)}:{i}" for p in SRC.rglob("*.py") if "methods" not in p.parts
                 for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []


def test_sequence_logps_is_the_default_policy(tiny):
    method = get_method("sft")
    _, batch, policy = scored(method, tiny)
    with torch.no_grad():
        direct = sequence_logps(tiny[0], batch)
    torch.testing.assert_close(policy.logp_sum, direct.logp_sum)

"""GRPO's losses: hand-worked values, and TRL 1.16's GRPOTrainer loss on identical per-token inputs (value and
gradient) for every loss type, with and without the KL term and clip-higher."""

import math

import pytest
import torch

from tunesmith.methods.rl_losses import (
    group_advantages,
    group_std,
    grpo_loss_sum,
    grpo_terms,
    grpo_units,
    kl_k3,
)


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0, 0, 1, 2, 2, 2, 2])
    std = math.sqrt(4 * 0.25 / 3)  # Bessel: sum of squared deviations / (G - 1)
    a = 0.5 / (std + 1e-4)
    torch.testing.assert_close(group_advantages(r, 4), torch.tensor([a, -a, -a, a, 0, 0, 0, 0]))
    torch.testing.assert_close(group_std(r, 4), torch.tensor([std, 0.0]))
    torch.testing.assert_close(group_advantages(r, 4, "none"), torch.tensor([.5, -.5, -.5, .5, 0, 0, 0, 0]))
    batch_std = math.sqrt((2 * 0.0625 + 2 * 1.5625 + 4 * 0.5625) / 7)  # mean 1.25 over all 8
    b = 0.5 / (batch_std + 1e-4)
    torch.testing.assert_close(group_advantages(r, 4, "batch"), torch.tensor([b, -b, -b, b, 0, 0, 0, 0]))
    constant = group_advantages(torch.full((6,), 0.7), 3)
    assert torch.equal(constant, torch.zeros(6))  # no signal: exactly zero, not 1e-8
    with pytest.raises(ValueError, match="groups"):
        group_advantages(torch.ones(5), 2)


def test_clipped_surrogate_by_hand():
    old = torch.log(torch.tensor([0.5, 0.5, 0.5, 0.5]))
    ratio = torch.tensor([1.3, 0.7, 0.7, 1.3])
    logp = (old + ratio.log()).requires_grad_()
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    out = grpo_terms(logp, old, adv, epsilon=0.2)
    # +A, r 1.3 -> clipped to 1.2; -A, r 0.7 -> clipped to 0.8; the other two keep r
    torch.testing.assert_close(out.losses, torch.tensor([-1.2, 0.8, -0.7, 1.3]))
    assert out.clipped_high.tolist() == [True, False, False, False]
    assert out.clipped_low.tolist() == [False, True, False, False]
    out.losses.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([0.0, 0.0, -0.7, 1.3]))  # d(-rA)/dlogp = -rA; 0 if clipped
    higher = grpo_terms(logp, old, adv, epsilon=0.2, epsilon_high=0.28)  # DAPO's clip-higher
    torch.testing.assert_close(higher.losses[0], torch.tensor(-1.28))
    on_policy = grpo_terms(old.clone(), old, adv)
    torch.testing.assert_close(on_policy.losses, -adv)
    assert on_policy.kl is None


def test_kl_term_by_hand():
    logp, ref = torch.log(torch.tensor([0.5, 0.2])), torch.log(torch.tensor([0.25, 0.2]))
    expected = 0.5 - math.log(0.5) - 1  # exp(d) - d - 1 with d = log(0.25 / 0.5)
    torch.testing.assert_close(kl_k3(logp, ref), torch.tensor([expected, 0.0]))
    out = grpo_terms(logp, logp, torch.zeros(2), ref_logp=ref, beta=0.1)
    torch.testing.assert_close(out.losses, 0.1 * torch.tensor([expected, 0.0]))  # on policy: ratio 1
    assert grpo_terms(logp, logp, torch.zeros(2), ref_logp=ref, beta=0.0).kl is None  # beta 0: no KL at all


def test_normalisations_by_hand():
    losses = torch.tensor([1.0, 2, 3, 4, 5])
    seq = torch.tensor([0, 0, 0, 1, 1])
    # grpo: mean per sequence (2 and 4.5) summed, over 2 sequences; dapo: over 5 tokens; dr_grpo: 2 x 4 tokens
    assert float(grpo_loss_sum(losses, seq, 2, "grpo")) / grpo_units("grpo", 2, 5, 4) == pytest.approx(3.25)
    assert float(grpo_loss_sum(losses, seq, 2, "dapo")) / grpo_units("dapo", 2, 5, 4) == pytest.approx(3.0)
    assert float(grpo_loss_sum(losses, seq, 2, "dr_grpo")) / grpo_units("dr_grpo", 2, 5, 4) == pytest.approx(1.875)


# ---------------------------------------------------------------- against TRL

@pytest.fixture(scope="module")
def trl_trainer(tiny_dir, tmp_path_factory):
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), use_cpu=True, per_device_train_batch_size=4,
                      num_generations=4, max_completion_length=6, report_to="none", save_strategy="no",
                      disable_tqdm=True, logging_steps=1)
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_dir),
                          reward_funcs=[lambda completions, **kw: [0.0] * len(completions)], args=args,
                          train_dataset=datasets.Dataset.from_list([{"prompt": "hello"}] * 4),
                          processing_class=AutoTokenizer.from_pretrained(tiny_dir))
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def trl_loss(trainer, logps, mask, old, ref, adv, loss_type, beta, eps, eps_high):
    trainer.loss_type, trainer.beta = loss_type, beta
    trainer.epsilon_low, trainer.epsilon_high = eps, eps if eps_high is None else eps_high
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (logps, torch.zeros_like(logps), None)
    b, t = mask.shape
    inputs = {"prompt_ids": torch.ones(b, 2, dtype=torch.long), "prompt_mask": torch.ones(b, 2, dtype=torch.long),
              "completion_ids": torch.ones(b, t, dtype=torch.long), "completion_mask": mask,
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": mask.sum()}
    return trainer._compute_loss(trainer.model, inputs)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta,eps_high", [(0.0, None), (0.04, None), (0.04, 0.28)])
def test_loss_and_gradient_match_trl(trl_trainer, loss_type, beta, eps_high):
    g = torch.Generator().manual_seed(0)
    b, t = 4, 6
    lengths = torch.tensor([6, 3, 1, 5])
    mask = (torch.arange(t)[None] < lengths[:, None]).long()
    base = torch.log(torch.rand(b, t, generator=g) * 0.9 + 0.05)
    old = base + 0.6 * torch.randn(b, t, generator=g)  # ratios spread wide enough for both clips to act
    ref = base + 0.5 * torch.randn(b, t, generator=g)
    adv = torch.randn(b, generator=g)
    theirs_logps = base.clone().requires_grad_()
    theirs = trl_loss(trl_trainer, theirs_logps, mask, old, ref, adv, loss_type, beta, 0.2, eps_high)
    theirs.backward()

    keep = mask.bool()
    mine_logps = base[keep].clone().requires_grad_()  # the trained tokens, row by row: tunesmith's layout
    seq = torch.arange(b)[:, None].expand(b, t)[keep]
    terms = grpo_terms(mine_logps, old[keep], adv[seq], ref[keep], beta, 0.2, eps_high)
    assert bool(terms.clipped_low.any()) and bool(terms.clipped_high.any())
    mine = grpo_loss_sum(terms.losses, seq, b, loss_type) / grpo_units(loss_type, b, int(keep.sum()), t)
    mine.backward()
    torch.testing.assert_close(mine, theirs.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(mine_logps.grad, theirs_logps.grad[keep], rtol=1e-5, atol=1e-7)
    assert torch.all(theirs_logps.grad[~keep] == 0)

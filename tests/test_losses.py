"""Tests for tunesmith.methods.losses: hand-worked values, cross-checks against TRL 1.16's own loss code,
gradchecks, and property tests."""

from __future__ import annotations

import math
from collections import defaultdict
from types import MethodType, SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tunesmith.errors import TunesmithError
from tunesmith.methods.losses import (
    KTOOut,
    PreferenceOut,
    chosen_nll,
    dpo_loss,
    ipo_loss,
    kto_loss,
    kto_mismatched_indices,
    orpo_loss,
    sft_nll,
    simpo_loss,
)

T = torch.tensor


def f64(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def close(actual: torch.Tensor, expected, tol: float = 1e-6) -> None:
    torch.testing.assert_close(
        actual.double(), torch.as_tensor(expected, dtype=torch.float64), rtol=0, atol=tol
    )


# ---------------------------------------------------------------- 1. hand-worked values


def test_dpo_hand_worked():
    # chosen log-ratio -1 - (-3) = 2, rejected -4 - (-2) = -2, h = 4, beta*h = 2.
    # loss = -log sigmoid(2) = log(1 + e^-2) = log(1.1353352832) = 0.1269280110
    out = dpo_loss(f64(-1.0), f64(-4.0), f64(-3.0), f64(-2.0), beta=0.5)
    assert isinstance(out, PreferenceOut)
    close(out.losses, [0.1269280110])
    close(out.chosen_rewards, [1.0])  # 0.5 * 2
    close(out.rejected_rewards, [-1.0])  # 0.5 * -2
    # cDPO, eps = 0.25: 0.75 * log(1+e^-2) + 0.25 * log(1+e^2); log(1+e^2) = 2 + log(1+e^-2)
    # => log(1+e^-2) + 0.25 * 2 = 0.6269280110
    smoothed = dpo_loss(f64(-1.0), f64(-4.0), f64(-3.0), f64(-2.0), beta=0.5, label_smoothing=0.25)
    close(smoothed.losses, [0.6269280110])


def test_ipo_hand_worked():
    # beta = 0.25 -> target margin 1/(2*beta) = 2. Log-ratios: chosen 2, rejected -2.
    # summed (no token counts): h = 4, loss = (4 - 2)^2 = 4
    args = (f64(-1.0), f64(-4.0), f64(-3.0), f64(-2.0))
    close(ipo_loss(*args, beta=0.25).losses, [4.0])
    # per token: chosen 2 / 2 tokens = 1, rejected -2 / 4 tokens = -0.5, h = 1.5, loss = (1.5 - 2)^2 = 0.25
    out = ipo_loss(*args, beta=0.25, chosen_tokens=T([2]), rejected_tokens=T([4]))
    close(out.losses, [0.25])
    close(out.chosen_rewards, [0.5])  # rewards stay beta * summed log-ratio, as in TRL
    close(out.rejected_rewards, [-0.5])
    with pytest.raises(ValueError, match="both"):
        ipo_loss(*args, chosen_tokens=T([2]))


def test_orpo_hand_worked():
    # chosen: 2 tokens, mean log-prob ln 0.5 -> odds 0.5/0.5 = 1, log odds 0
    # rejected: 3 tokens, mean log-prob ln 0.2 -> odds 0.2/0.8 = 1/4, log odds -ln 4
    # log odds ratio = ln 4; -log sigmoid(ln 4) = log(1 + 1/4) = ln 1.25 = 0.2231435513
    # NLL = -ln 0.5 = 0.6931471806; lam = 0.1 -> loss = 0.6931471806 + 0.0223143551 = 0.7154615357
    out = orpo_loss(f64(2 * math.log(0.5)), f64(3 * math.log(0.2)), T([2]), T([3]), lam=0.1)
    close(out.losses, [0.7154615357])
    close(out.chosen_rewards, [-0.0693147181])  # 0.1 * ln 0.5
    close(out.rejected_rewards, [-0.1609437912])  # 0.1 * ln 0.2


def test_simpo_hand_worked():
    # beta = 2, gamma = 0.5.
    # ex 0: chosen -2 over 4 tokens -> 2 * -0.5 = -1; rejected -3 over 4 -> 2 * -0.75 = -1.5
    #       margin -1 + 1.5 - 0.5 = 0 -> loss ln 2 = 0.6931471806
    # ex 1: chosen -1 over 4 -> -0.5; rejected -2 over 2 -> -2; margin -0.5 + 2 - 0.5 = 1
    #       -> loss log(1 + e^-1) = 0.3132616875
    out = simpo_loss(f64(-2.0, -1.0), f64(-3.0, -2.0), T([4, 4]), T([4, 2]), beta=2.0, gamma=0.5)
    close(out.losses, [0.6931471806, 0.3132616875])
    close(out.chosen_rewards, [-1.0, -0.5])
    close(out.rejected_rewards, [-1.5, -2.0])
    # label smoothing 0.1 on ex 1: 0.9 * log(1+e^-1) + 0.1 * (1 + log(1+e^-1)) = 0.3132616875 + 0.1
    smoothed = simpo_loss(f64(-1.0), f64(-2.0), T([4]), T([2]), beta=2.0, gamma=0.5, label_smoothing=0.1)
    close(smoothed.losses, [0.4132616875])


def test_kto_hand_worked():
    # KL pairs: policy - ref = [1, 3] -> mean 2 = z0. beta = 1.
    # ex 0 desirable, r = 2:           w_d * (1 - sigmoid(2 - 2)) = 2 * 0.5 = 1.0
    # ex 1 undesirable, r = 2 - ln 3:  w_u * (1 - sigmoid(z0 - r)) = 1 - sigmoid(ln 3) = 1 - 3/4 = 0.25
    r1 = 2 - math.log(3)
    out = kto_loss(
        f64(-1.0, -5.0 + r1),
        f64(-3.0, -5.0),
        f64(-2.0, -1.0),
        f64(-3.0, -4.0),
        desirable=T([True, False]),
        beta=1.0,
        desirable_weight=2.0,
        undesirable_weight=1.0,
    )
    assert isinstance(out, KTOOut)
    close(out.losses, [1.0, 0.25])
    close(out.rewards, [2.0, r1])
    close(out.kl, 2.0)
    # a negative KL estimate is clamped to 0: z0 = 0, desirable r = 0 -> 1 - sigmoid(0) = 0.5
    clamped = kto_loss(f64(-1.0, -1.0), f64(-1.0, -1.0), f64(-4.0, -6.0), f64(-3.0, -3.0), T([True, True]))
    close(clamped.kl, 0.0)
    close(clamped.losses, [0.5, 0.5])
    with pytest.raises(ValueError, match="bool"):
        kto_loss(f64(-1.0), f64(-1.0), f64(-1.0), f64(-1.0), desirable=T([1]))


def test_sft_nll_and_kto_indices():
    # -(-3 - 5) / (1 + 3) = 2
    close(sft_nll(f64(-3.0, -5.0), T([1, 3])), 2.0)
    close(sft_nll(f64(-6.0), 3), 2.0)
    assert kto_mismatched_indices(3).tolist() == [1, 2, 0]
    perm = kto_mismatched_indices(5)
    assert sorted(perm.tolist()) == list(range(5)) and all(perm[i] != i for i in range(5))
    with pytest.raises(TunesmithError, match="micro_batch_size"):
        kto_mismatched_indices(1)


def test_mismatched_shapes_rejected():
    with pytest.raises(ValueError, match="same shape"):
        dpo_loss(f64(-1.0, -2.0), f64(-1.0), f64(-1.0), f64(-1.0))


# ---------------------------------------------------------------- 2. DPO at policy == reference


def test_dpo_at_reference_is_ln2():
    g = torch.Generator().manual_seed(0)
    chosen, rejected = -50 * torch.rand(16, generator=g), -50 * torch.rand(16, generator=g)
    for smoothing in (0.0, 0.2):
        out = dpo_loss(
            chosen, rejected, chosen.clone(), rejected.clone(), beta=0.3, label_smoothing=smoothing
        )
        close(out.losses, torch.full((16,), math.log(2)))
        close(out.chosen_rewards, torch.zeros(16))
        close(out.rejected_rewards, torch.zeros(16))


# ---------------------------------------------------------------- 3. TRL 1.16 cross-checks


def random_batch(batch: int, seed: int):
    """Random summed log-probs (float64) and completion token counts for a preference batch."""
    g = torch.Generator().manual_seed(seed)
    logps = [-(0.05 + 3 * torch.rand(batch, generator=g, dtype=torch.float64)) for _ in range(4)]
    counts = [torch.randint(1, 9, (batch,), generator=g) for _ in range(2)]
    logps[0], logps[1] = (
        logps[0] * counts[0],
        logps[1] * counts[1],
    )  # mean per-token log-prob in (-3.05, -0.05)
    return logps, counts


def fake_accelerator():
    return SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)


def fake_model(per_token_logps: dict[int, torch.Tensor]):
    """Stands in for TRL's fused-LM-head model output: returns the given per-token log-probs, chosen by
    the sequence width of input_ids (the only thing TRL reads back from the model besides logging)."""

    def forward(input_ids, **_):
        logps = per_token_logps[input_ids.shape[1]]
        zeros = torch.zeros_like(logps)
        return SimpleNamespace(log_probs=logps, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    forward.training = True
    return forward


def sequences(sums: torch.Tensor, counts: torch.Tensor, width: int):
    """input_ids/completion_mask of the given width whose completion tokens' log-probs add up to `sums`."""
    mask = torch.zeros(len(sums), width, dtype=torch.long)
    for i, n in enumerate(counts.tolist()):
        mask[i, 1 : 1 + n] = 1  # position 0 is the prompt
    per_token = mask[:, 1:].double() * (sums / counts)[:, None]
    return torch.zeros_like(mask), mask, per_token


def trl_dpo(loss_type: str | list[str], beta: float, smoothing: float, pc, pr, rc, rr, nc, nr,
            weights: list[float] | None = None):
    """TRL's DPOTrainer._compute_loss on a fake trainer/model with precomputed reference log-probs.
    Returns (batch-mean loss, mean chosen reward, mean rejected reward)."""
    from trl.trainer.dpo_trainer import DPOTrainer

    width = 12
    input_ids, mask, per_token = sequences(torch.cat([pc, pr]), torch.cat([nc, nr]), width)
    model = fake_model({width: per_token})
    trainer = SimpleNamespace(
        model=model,
        accelerator=fake_accelerator(),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type] if isinstance(loss_type, str) else loss_type,
        loss_weights=weights or [1.0],
        beta=beta,
        label_smoothing=smoothing,
        use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = dict(
        input_ids=input_ids,
        attention_mask=torch.ones_like(mask),
        completion_mask=mask,
        ref_chosen_logps=rc,
        ref_rejected_logps=rr,
    )
    loss = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    metrics = trainer._metrics["train"]
    return loss, metrics["rewards/chosen"][-1], metrics["rewards/rejected"][-1]


def test_dpo_matches_trl_sigmoid():
    (pc, pr, rc, rr), (nc, nr) = random_batch(8, seed=1)
    ours = dpo_loss(pc, pr, rc, rr, beta=0.2)
    loss, chosen_reward, rejected_reward = trl_dpo("sigmoid", 0.2, 0.0, pc, pr, rc, rr, nc, nr)
    close(ours.losses.mean(), loss.item(), 1e-5)
    close(ours.chosen_rewards.mean(), chosen_reward, 1e-5)
    close(ours.rejected_rewards.mean(), rejected_reward, 1e-5)
    for i in range(8):  # per example: TRL only returns the batch mean, so feed it one pair at a time
        one = [x[i : i + 1] for x in (pc, pr, rc, rr, nc, nr)]
        close(ours.losses[i], trl_dpo("sigmoid", 0.2, 0.0, *one)[0].item(), 1e-5)


def test_cdpo_matches_trl_and_paper_formula():
    """TRL 1.16's "sigmoid" DPO ignores label_smoothing; its conservative-DPO form survives only inside the
    "aot" loss, which sorts the batch and so equals cDPO for a batch of one pair. We check against that, and
    against the cDPO formula written independently in numpy."""
    (pc, pr, rc, rr), (nc, nr) = random_batch(6, seed=2)
    beta, eps = 0.3, 0.15
    ours = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)
    for i in range(6):
        one = [x[i : i + 1] for x in (pc, pr, rc, rr, nc, nr)]
        close(ours.losses[i], trl_dpo("aot", beta, eps, *one)[0].item(), 1e-5)
    h = beta * ((pc - rc) - (pr - rr)).numpy()
    log_sigmoid = lambda z: -np.logaddexp(0.0, -z)  # noqa: E731
    close(ours.losses, -(1 - eps) * log_sigmoid(h) - eps * log_sigmoid(-h), 1e-5)


def test_ipo_matches_trl():
    (pc, pr, rc, rr), (nc, nr) = random_batch(8, seed=3)
    ours = ipo_loss(pc, pr, rc, rr, beta=0.1, chosen_tokens=nc, rejected_tokens=nr)
    loss, chosen_reward, rejected_reward = trl_dpo("ipo", 0.1, 0.0, pc, pr, rc, rr, nc, nr)
    close(ours.losses.mean(), loss.item(), 1e-5)
    close(ours.chosen_rewards.mean(), chosen_reward, 1e-5)
    close(ours.rejected_rewards.mean(), rejected_reward, 1e-5)
    for i in range(8):
        one = [x[i : i + 1] for x in (pc, pr, rc, rr, nc, nr)]
        close(ours.losses[i], trl_dpo("ipo", 0.1, 0.0, *one)[0].item(), 1e-5)
    # The paper's summed form is TRL's per-token form when every completion is one token long.
    summed = ipo_loss(pc, pr, rc, rr, beta=0.1)
    ones = torch.ones(8, dtype=torch.long)
    close(summed.losses.mean(), trl_dpo("ipo", 0.1, 0.0, pc, pr, rc, rr, ones, ones)[0].item(), 1e-5)


def test_orpo_matches_trl_odds_ratio_loss():
    """TRL's ORPOTrainer.odds_ratio_loss takes mean per-token log-probs and returns lam * log sigmoid(log odds
    ratio) (its `beta` is ORPO's lambda). Its NLL term is a token-weighted batch mean over prompt + completion,
    computed inside a model forward, so ours (per-example, completion only) is checked by formula instead."""
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    (pc, pr, _, _), (nc, nr) = random_batch(8, seed=4)
    ours = orpo_loss(pc, pr, nc, nr, lam=0.25)
    trainer = SimpleNamespace(beta=0.25, accelerator=fake_accelerator())
    trl_losses, trl_chosen, trl_rejected, _, _ = ORPOTrainer.odds_ratio_loss(trainer, pc / nc, pr / nr)
    nll = -(pc / nc)
    close(ours.losses - nll, -trl_losses, 1e-5)
    close(ours.chosen_rewards, trl_chosen, 1e-5)
    close(ours.rejected_rewards, trl_rejected, 1e-5)
    # odds written out in probability space (fine for these moderate values): log(p/(1-p))
    p_c, p_r = np.exp((pc / nc).numpy()), np.exp((pr / nr).numpy())
    ratio = np.log(p_c / (1 - p_c)) - np.log(p_r / (1 - p_r))
    close(ours.losses, -np.log(p_c) + 0.25 * np.log1p(np.exp(-ratio)), 1e-5)


def test_simpo_matches_trl_cpo_loss():
    """TRL's CPOTrainer.cpo_loss with loss_type="simpo" computes -log sigmoid(beta*(avg_w - avg_l - gamma/beta)),
    i.e. the paper's margin gamma (its simpo_gamma is NOT a gamma/beta ratio). It takes mean per-token log-probs."""
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    (pc, pr, _, _), (nc, nr) = random_batch(8, seed=5)
    for smoothing in (0.0, 0.1):
        ours = simpo_loss(pc, pr, nc, nr, beta=2.5, gamma=1.2, label_smoothing=smoothing)
        trainer = SimpleNamespace(
            beta=2.5,
            simpo_gamma=1.2,
            label_smoothing=smoothing,
            loss_type="simpo",
            alpha=0.0,
            accelerator=fake_accelerator(),
        )
        trl_losses, trl_chosen, trl_rejected = CPOTrainer.cpo_loss(trainer, pc / nc, pr / nr)
        close(ours.losses, trl_losses, 1e-5)
        close(ours.chosen_rewards, trl_chosen, 1e-5)
        close(ours.rejected_rewards, trl_rejected, 1e-5)


def trl_kto(beta, w_d, w_u, policy, ref, policy_kl, ref_kl, desirable, counts, kl_counts):
    """TRL's KTOTrainer._compute_loss on a fake trainer/model with precomputed reference log-probs."""
    from trl.trainer.kto_trainer import KTOTrainer

    ids, mask, per_token = sequences(policy, counts, 10)
    kl_ids, kl_mask, kl_per_token = sequences(policy_kl, kl_counts, 14)  # different width picks the KL output
    model = fake_model({10: per_token, 14: kl_per_token})
    trainer = SimpleNamespace(
        model=model,
        accelerator=fake_accelerator(),
        calculate_KL=True,
        precompute_ref_logps=True,
        loss_type="kto",
        beta=beta,
        desirable_weight=w_d,
        undesirable_weight=w_u,
        aux_loss_enabled=False,
        _metrics={"train": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    trainer._compute_kl_logps = MethodType(KTOTrainer._compute_kl_logps, trainer)
    inputs = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(mask),
        completion_mask=mask,
        label=desirable,
        KL_input_ids=kl_ids,
        KL_attention_mask=torch.ones_like(kl_mask),
        KL_completion_mask=kl_mask,
        ref_logps=ref,
        ref_KL_logps=ref_kl,
    )
    loss = KTOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    return loss, trainer._metrics["train"]


def test_kto_matches_trl():
    (policy, ref, policy_kl, ref_kl), (counts, kl_counts) = random_batch(8, seed=6)
    policy, policy_kl = policy + 1.0, policy_kl + 3.0  # a positive KL estimate so z0 is not clamped to 0
    desirable = T([True, False, True, True, False, False, True, False])
    ours = kto_loss(
        policy, ref, policy_kl, ref_kl, desirable, beta=0.5, desirable_weight=1.3, undesirable_weight=0.7
    )
    assert ours.kl.item() > 0
    loss, metrics = trl_kto(0.5, 1.3, 0.7, policy, ref, policy_kl, ref_kl, desirable, counts, kl_counts)
    close(ours.losses.mean(), loss.item(), 1e-5)
    close(ours.kl, metrics["kl"][-1], 1e-5)
    close(ours.rewards[desirable].mean(), metrics["rewards/chosen"][-1], 1e-5)
    close(ours.rewards[~desirable].mean(), metrics["rewards/rejected"][-1], 1e-5)
    for i in range(8):  # one example at a time against the full KL batch gives TRL's per-example loss
        one = [x[i : i + 1] for x in (policy, ref)]
        loss_i, _ = trl_kto(
            0.5, 1.3, 0.7, *one, policy_kl, ref_kl, desirable[i : i + 1], counts[i : i + 1], kl_counts
        )
        close(ours.losses[i], loss_i.item(), 1e-5)


# ---------------------------------------------------------------- 4. gradients


def grad_inputs(*values):
    return tuple(torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in values)


def test_gradcheck_all_losses():
    chosen, rejected, ref_c, ref_r = grad_inputs(
        [-3.0, -7.5, -1.2], [-4.0, -2.5, -9.0], [-3.5, -6.0, -1.0], [-3.0, -3.0, -8.0]
    )
    nc, nr = T([3, 5, 2]), T([4, 1, 6])
    checks = {
        "dpo": lambda a, b, c, d: dpo_loss(a, b, c, d, beta=0.4, label_smoothing=0.1).losses,
        "ipo": lambda a, b, c, d: ipo_loss(a, b, c, d, beta=0.4).losses,
        "ipo_tokens": lambda a, b, c, d: ipo_loss(a, b, c, d, 0.4, nc, nr).losses,
        "orpo": lambda a, b, c, d: orpo_loss(a, b, nc, nr, lam=0.3).losses,
        "simpo": lambda a, b, c, d: simpo_loss(a, b, nc, nr, label_smoothing=0.1).losses,
        "kto": lambda a, b, c, d: (
            kto_loss(a, c, f64(-2, -3, -1), f64(-3, -3.5, -2), T([True, False, True])).losses
        ),
        "sft_nll": lambda a, b, c, d: sft_nll(a, nc),
    }
    for name, fn in checks.items():
        assert torch.autograd.gradcheck(fn, (chosen, rejected, ref_c, ref_r)), name


def test_rewards_and_kl_are_detached():
    a, b, c, d = grad_inputs([-1.0], [-2.0], [-1.5], [-1.0])
    n = T([2])
    for out in (dpo_loss(a, b, c, d), ipo_loss(a, b, c, d), orpo_loss(a, b, n, n), simpo_loss(a, b, n, n)):
        assert out.losses.requires_grad and not out.chosen_rewards.requires_grad
        assert not out.rejected_rewards.requires_grad
    kto = kto_loss(a, c, b, d, T([True]))
    assert kto.losses.requires_grad and not kto.rewards.requires_grad and not kto.kl.requires_grad


# ---------------------------------------------------------------- property tests

logp_sums = st.floats(-1e4, 0.0, allow_nan=False)
logratio_terms = st.floats(-1e4, 1e4, allow_nan=False)
token_counts = st.integers(1, 4096)


def all_finite(out_losses: torch.Tensor, *inputs: torch.Tensor) -> bool:
    out_losses.sum().backward()
    return bool(torch.isfinite(out_losses).all()) and all(bool(torch.isfinite(x.grad).all()) for x in inputs)


@settings(max_examples=60, deadline=None)
@given(st.lists(logratio_terms, min_size=4, max_size=4), st.floats(1e-3, 10.0), st.floats(0.0, 0.49))
def test_reference_losses_finite(values, beta, smoothing):
    columns = [[v] for v in values]
    a, b, c, d = grad_inputs(*columns)
    assert all_finite(dpo_loss(a, b, c, d, beta=beta, label_smoothing=smoothing).losses, a, b)
    a, b, c, d = grad_inputs(*columns)
    assert all_finite(ipo_loss(a, b, c, d, beta=beta).losses, a, b)
    a, b, c, d = grad_inputs(*columns)
    assert all_finite(kto_loss(a, c, b, d, T([values[0] > 0]), beta=beta).losses, a, c)


@settings(max_examples=60, deadline=None)
@given(logp_sums, logp_sums, token_counts, token_counts, st.floats(1e-3, 10.0))
def test_reference_free_losses_finite(chosen, rejected, n_chosen, n_rejected, beta):
    nc, nr = T([n_chosen]), T([n_rejected])
    a, b = grad_inputs([chosen], [rejected])
    assert all_finite(orpo_loss(a, b, nc, nr, lam=beta).losses, a, b)
    a, b = grad_inputs([chosen], [rejected])
    assert all_finite(simpo_loss(a, b, nc, nr, beta=beta).losses, a, b)
    # float32 log-softmax can return exactly 0 for confident tokens: ORPO's odds must stay finite there
    a, b = (
        torch.zeros(1, requires_grad=True),
        torch.tensor([rejected], dtype=torch.float32, requires_grad=True),
    )
    assert all_finite(orpo_loss(a, b, nc, nr).losses, a, b)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-50, 50), min_size=4, max_size=4), st.floats(1e-3, 0.5), st.floats(1e-3, 0.3))
def test_dpo_decreases_as_chosen_log_ratio_increases(values, step, beta):
    pc, pr, rc, rr = f64(*values)
    steps = pc + step * torch.arange(5, dtype=torch.float64)  # raises the chosen log-ratio
    losses = dpo_loss(steps, pr.expand(5), rc.expand(5), rr.expand(5), beta=beta).losses
    assert (losses[1:] < losses[:-1]).all()


# ---------------------------------------------------------------- chosen NLL (RPO) and DPO-Positive


def test_sft_weight_matches_trl_rpo_when_chosen_answers_are_equally_long():
    """TRL 1.16 writes RPO as loss_type [sigmoid, sft] with weights [1, alpha]; its sft term averages over all
    chosen tokens of the batch, tunesmith's over each pair's tokens and then the pairs — the same number when
    every chosen answer has the same length (and a batch-independent one when they differ)."""
    (pc, pr, rc, rr), (_, nr) = random_batch(6, seed=7)
    nc = torch.full((6,), 5)
    alpha = 0.7
    ours = dpo_loss(pc, pr, rc, rr, beta=0.2).losses + alpha * chosen_nll(pc, nc)
    trl = trl_dpo(["sigmoid", "sft"], 0.2, 0.0, pc, pr, rc, rr, nc, nr, weights=[1.0, alpha])[0]
    close(ours.mean(), trl.item(), 1e-5)


def test_chosen_nll_by_hand():
    close(chosen_nll(torch.tensor([-6.0, -1.0]), torch.tensor([3.0, 4.0])), torch.tensor([2.0, 0.25]))


def test_dpo_positive_by_hand():
    """beta 1: pair 0's chosen log-prob fell 2 nats below the reference, so lambda 0.5 takes 1 nat off its
    margin; pair 1's chosen rose, so nothing changes."""
    pc, pr = torch.tensor([-5.0, -1.0]), torch.tensor([-9.0, -4.0])
    rc, rr = torch.tensor([-3.0, -2.0]), torch.tensor([-4.0, -2.0])
    # margins: pair 0 (-2) - (-5) = 3, pair 1 (+1) - (-2) = 3
    out = dpo_loss(pc, pr, rc, rr, beta=1.0, dpop_lambda=0.5)
    close(out.losses, -torch.nn.functional.logsigmoid(torch.tensor([2.0, 3.0])))
    close(dpo_loss(pc, pr, rc, rr, beta=1.0).losses, -torch.nn.functional.logsigmoid(torch.tensor([3.0, 3.0])))

"""Preference methods: DPO, IPO, ORPO, SimPO (paired) and KTO (unpaired).

Paired methods put every pair's chosen sequence and rejected sequence into ONE batch — chosen first (seq ids
0..B-1), then rejected (B..2B-1) — so both go through one forward pass, packed like any other batch. With
`share_prompt` (default) the prompt the two share is computed once and each completion attends to that copy
(`data.batching.collate`, `share=`): same log-probs, fewer tokens to run. The loss is a sum over pairs; the
loop divides by the pairs of the whole accumulated batch.

KTO scores each completion and, for its reference point z0, one mismatched sequence per example: the prompt
of example i with the completion of example (i + 1) % B of the same micro-batch (`kto_mismatched_indices`).

Logged metrics (per pair / per example, averaged over the logging step):
  rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies   (as defined by each loss)
  logps/chosen, logps/rejected   SUMMED log-probs of each completion's trained tokens
  KTO: kl (z0), rewards/accuracies (reward on its label's side of z0), rewards/signed, logps
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..config import MethodConfig
from ..data.batching import Batch, collate, shared_prefix
from ..data.render import IGNORE, Renderer, Tokenized, TokenizedPair, TokenizedUnpaired
from ..data.types import Preference, Unpaired
from ..errors import TunesmithError
from .base import MethodBase, Split
from .logps import SeqLogps
from .losses import (
    KTOOut,
    PreferenceOut,
    chosen_nll,
    dpo_loss,
    ipo_loss,
    kto_loss,
    kto_mismatched_indices,
    orpo_loss,
    simpo_loss,
)


class PairedMethod(MethodBase):
    """Shared shape of DPO, IPO, ORPO and SimPO; subclasses supply `pair_loss` and their default beta."""

    name = "paired"
    example_kind = "preference"
    needs_reference = False
    default_beta: float | None = None

    def __init__(self, args: MethodConfig):
        self.args = args
        self.beta = args.beta if args.beta is not None else self.default_beta

    def render(self, renderer: Renderer, example: Preference) -> TokenizedPair | None:
        return renderer.preference(example)

    def length(self, item: TokenizedPair) -> int:
        """Tokens the pair costs to run: its prompt counts once when it is shared."""
        shared = shared_prefix(item.chosen, item.rejected) if self.args.share_prompt else 0
        return len(item.chosen) + len(item.rejected) - shared

    def batch_sequences(self, items: Sequence[TokenizedPair]) -> list[Tokenized]:
        return [p.chosen for p in items] + [p.rejected for p in items]

    def collate(self, items: Sequence[TokenizedPair], pad_id: int, pack_length: int | None) -> Batch:
        n = len(items)
        share = [(i, n + i) for i in range(n)] if self.args.share_prompt else []
        return collate(self.batch_sequences(items), pad_id, pack_length, extra={"pairs": n}, share=share)

    def units(self, batch: Batch) -> int:
        return batch.extra["pairs"]

    def loss(self, policy: SeqLogps, reference: SeqLogps | None, batch: Batch
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        n = batch.extra["pairs"]
        chosen, rejected = policy.split(n)
        ref = reference.split(n) if reference is not None else (None, None)
        out = self.pair_loss(chosen, rejected, *ref)
        losses, metrics = out.losses, pair_metrics(out, chosen, rejected)
        if self.args.sft_weight:
            nll = chosen_nll(chosen.logp_sum, chosen.n_tokens)
            losses = losses + self.args.sft_weight * nll
            metrics["nll/chosen"] = nll.detach().sum()
        return losses.sum(), metrics

    def pair_loss(self, chosen: SeqLogps, rejected: SeqLogps, ref_chosen: SeqLogps | None,
                  ref_rejected: SeqLogps | None) -> PreferenceOut:
        raise NotImplementedError

    def diagnose(self, history: Sequence[dict]) -> list[str]:
        return likelihood_displacement(history, self.name)


def likelihood_displacement(history: Sequence[dict], method: str) -> list[str]:
    """A warning when the chosen answers' log-prob fell markedly over the stage while the method optimised
    its margin: the model then prefers the chosen answer only relatively and may answer worse than before.
    Compares the mean of the first and the last tenth of the logged steps."""
    values = [r["logps/chosen"] for r in history if "logps/chosen" in r]
    if len(values) < 4:
        return []
    k = max(1, len(values) // 10)
    first, last = sum(values[:k]) / k, sum(values[-k:]) / k
    if first - last <= max(1.0, 0.5 * abs(first)):
        return []
    return [f"{method}: the chosen answers' log-prob fell from {first:.2f} to {last:.2f} per pair while the "
            "margin was optimised (likelihood displacement): the model may now answer worse than before this "
            "stage. Compare it with the previous stage on held-out data; method_args.sft_weight (e.g. 0.2-1.0) "
            "keeps the chosen answers likely, method_args.dpop_lambda (DPO-Positive) forbids the drop"]


def pair_metrics(out: PreferenceOut, chosen: SeqLogps, rejected: SeqLogps) -> dict[str, torch.Tensor]:
    """Per-batch SUMS over pairs (the loop divides by the number of pairs)."""
    c, r = out.chosen_rewards, out.rejected_rewards
    return {
        "rewards/chosen": c.sum(),
        "rewards/rejected": r.sum(),
        "rewards/margins": (c - r).sum(),
        "rewards/accuracies": (c > r).float().sum(),
        "logps/chosen": chosen.logp_sum.detach().sum(),
        "logps/rejected": rejected.logp_sum.detach().sum(),
    }


def _need(ref: SeqLogps | None, name: str) -> SeqLogps:
    if ref is None:
        raise TunesmithError(f"{name} needs reference log-probs and none were given",
                             "this is a bug in tunesmith: the recipe builds the reference for every "
                             "method with needs_reference")
    return ref


class DPO(PairedMethod):
    name = "dpo"
    needs_reference = True
    default_beta = 0.1

    def pair_loss(self, chosen, rejected, ref_chosen, ref_rejected):
        rc, rr = _need(ref_chosen, self.name), _need(ref_rejected, self.name)
        return dpo_loss(chosen.logp_sum, rejected.logp_sum, rc.logp_sum, rr.logp_sum, self.beta,
                        self.args.label_smoothing, self.args.dpop_lambda)


class IPO(PairedMethod):
    name = "ipo"
    needs_reference = True
    default_beta = 0.1

    def pair_loss(self, chosen, rejected, ref_chosen, ref_rejected):
        rc, rr = _need(ref_chosen, self.name), _need(ref_rejected, self.name)
        return ipo_loss(chosen.logp_sum, rejected.logp_sum, rc.logp_sum, rr.logp_sum, self.beta,
                        chosen.n_tokens, rejected.n_tokens)


class ORPO(PairedMethod):
    name = "orpo"

    def pair_loss(self, chosen, rejected, ref_chosen, ref_rejected):
        return orpo_loss(chosen.logp_sum, rejected.logp_sum, chosen.n_tokens, rejected.n_tokens,
                         self.args.orpo_lambda)


class SimPO(PairedMethod):
    name = "simpo"
    default_beta = 2.0

    def pair_loss(self, chosen, rejected, ref_chosen, ref_rejected):
        return simpo_loss(chosen.logp_sum, rejected.logp_sum, chosen.n_tokens, rejected.n_tokens, self.beta,
                          self.args.simpo_gamma, self.args.label_smoothing)


# ---------------------------------------------------------------- KTO

def completion_start(seq: Tokenized) -> int:
    """Index of the first trained token: everything before it is the prompt."""
    return next(i for i, label in enumerate(seq.labels) if label != IGNORE)


def mismatched_sequence(prompt_of: Tokenized, completion_of: Tokenized, max_length: int | None) -> Tokenized:
    """The prompt of one example followed by the completion of another (token-level splice, as TRL does).
    A rendered item always has a trained token within max_length, so its prompt leaves room for at least
    one completion token; the completion is cut on the right to fit."""
    p, c = completion_start(prompt_of), completion_start(completion_of)
    room = len(completion_of) - c if max_length is None else max(1, max_length - p)
    ids = prompt_of.input_ids[:p] + completion_of.input_ids[c:c + room]
    labels = (IGNORE,) * p + completion_of.labels[c:c + room]
    return Tokenized(ids, labels, prompt_of.source)


class KTO(MethodBase):
    """Each completion, and for the reference point z0 one mismatched sequence per example: the prompt of
    example i with the completion of example (i + 1) % B of the same micro-batch."""

    name = "kto"
    example_kind = "unpaired"
    needs_reference = True
    default_beta = 0.1

    def __init__(self, args: MethodConfig):
        self.args = args
        self.beta = args.beta if args.beta is not None else self.default_beta
        self.max_length: int | None = None

    def render(self, renderer: Renderer, example: Unpaired) -> TokenizedUnpaired | None:
        self.max_length = renderer.max_length  # mismatched sequences are cut to the same length
        return renderer.unpaired(example)

    def length(self, item: TokenizedUnpaired) -> int:
        return 2 * len(item.completion)  # the completion and (about as long) its mismatched sequence

    def prepare(self, items: list, micro_batch_size: int, split: Split) -> tuple[list, str | None]:
        kept, dropped = drop_lone_example(items, micro_batch_size, "training" if split == "train" else "eval")
        note = (f"kto: left out {dropped} {split} example(s) that would have formed a micro-batch of one "
                f"(micro_batch_size={micro_batch_size})") if dropped else None
        return kept, note

    def batch_sequences(self, items: Sequence[TokenizedUnpaired]) -> list[Tokenized]:
        partners = kto_mismatched_indices(len(items)).tolist()
        kl = [mismatched_sequence(items[i].completion, items[j].completion, self.max_length)
              for i, j in enumerate(partners)]
        return [x.completion for x in items] + kl

    def collate(self, items: Sequence[TokenizedUnpaired], pad_id: int, pack_length: int | None) -> Batch:
        desirable = torch.tensor([x.label for x in items], dtype=torch.bool)
        return collate(self.batch_sequences(items), pad_id, pack_length,
                       extra={"examples": len(items), "desirable": desirable})

    def units(self, batch: Batch) -> int:
        return batch.extra["examples"]

    def loss(self, policy: SeqLogps, reference: SeqLogps | None, batch: Batch
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        n = batch.extra["examples"]
        ref = _need(reference, self.name)
        pol, pol_kl = policy.split(n)
        ref_main, ref_kl = ref.split(n)
        out = kto_loss(pol.logp_sum, ref_main.logp_sum, pol_kl.logp_sum, ref_kl.logp_sum,
                       batch.extra["desirable"], self.beta, self.args.kto_desirable_weight,
                       self.args.kto_undesirable_weight)
        return out.losses.sum(), kto_metrics(out, batch.extra["desirable"], pol, self.beta)


def kto_metrics(out: KTOOut, desirable: torch.Tensor, policy: SeqLogps, beta: float) -> dict[str, torch.Tensor]:
    """Per-batch SUMS over examples. An example counts as right when its implied reward lies on its label's
    side of the reference point (reward > beta*z0 for desirable, < for undesirable): then its loss is below
    half its weight. rewards/signed is +reward for desirable and -reward for undesirable examples."""
    n = desirable.shape[0]
    sign = desirable.float() * 2 - 1
    point = beta * out.kl
    return {
        "kl": out.kl * n,
        "rewards/accuracies": ((out.rewards - point) * sign > 0).float().sum(),
        "rewards/signed": (out.rewards * sign).sum(),
        "logps": policy.logp_sum.detach().sum(),
    }


def drop_lone_example(items: list, micro_batch_size: int, what: str = "training") -> tuple[list, int]:
    """KTO cannot score a micro-batch of one example (it has no other completion to mismatch with). When the
    item count leaves one example over, that last example is left out. Returns (items, how many dropped)."""
    if len(items) < 2:
        raise TunesmithError(f"KTO needs at least 2 {what} examples, got {len(items)}",
                             "add examples: KTO's KL term pairs each prompt with another example's completion")
    if micro_batch_size > 1 and len(items) % micro_batch_size == 1:
        return list(items[:-1]), 1
    return list(items), 0

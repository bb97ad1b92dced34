"""GRPO: online training with verifiable rewards (docs/grpo.md).

Each step, the step's prompts (chosen by the batch plan, like any method's examples) are answered G times
each by the current policy (`rollout`, called by train/rollout.py; model/sampling.py samples with a KV
cache, each prompt computed once for its G answers), every answer is scored by the rewards
(methods/rewards.py), advantages are normalised within each prompt's group, and the loss is the clipped
surrogate over the completion tokens, plus beta x KL to the reference when beta > 0 (methods/rl_losses.py).

Batches: a micro-batch holds whole groups; the G completions of a prompt attend to one copy of the prompt
(`data.batching.collate(share=)`, exact). The policy's log-probs are taken at the sampling temperature, as
the sampler scores its draws. Old log-probs (the ratio's denominator): with `iterations: 1` every sampled
batch is trained on once, on policy, so they are the policy's own log-probs, detached (ratio 1, exactly);
with more iterations they are the generating pass's log-probs in fp32 (exact), and under reduced precision
one no-grad forward right after sampling (the cached generating pass rounds differently there).

Units (what the loop divides the step's loss sum by): completions (grpo), completions x max_new_tokens
(dr_grpo), completion tokens (dapo), of the whole step. A group whose rewards are all equal has advantages
of exactly 0; with beta 0 its loss and gradient are exactly 0, so it is not run at all — it stays in the
units and the metrics, so the update is the one computing it would give.

Metrics (per step; `(sum, count)` pairs the loop divides by their own count): reward (weighted total),
reward/<name> per reward function, reward_std (within groups), zero_std_groups, completion_length,
completion_cut (share that hit max_new_tokens), clip_fraction / clip_low / clip_high, kl (beta > 0), and
logp_gap: |training log-prob - generating-pass log-prob| per token (about 1e-6 in fp32).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..config import MethodConfig
from ..data.batching import Batch, collate
from ..data.render import IGNORE, Renderer, Tokenized, TokenizedPrompt
from ..data.types import Prompt
from ..errors import TrainingAborted, TunesmithError
from ..model.sampling import Sampler, SamplingSettings
from .base import MethodBase, Split
from .logps import TokenLogps, token_logps
from .rewards import Answer, ChoiceReward, build_rewards, missing_references, score_answers
from .rl_losses import group_advantages, group_std, grpo_loss_sum, grpo_terms, grpo_units
from .scoring import normalize

DEFAULT_BETA = 0.0  # TRL 1.16's default: no KL term, and no reference forward


@dataclass
class Group:
    """One prompt's G sampled completions and what they earned."""

    prompt: TokenizedPrompt
    index: int  # the prompt's index among the run's rendered prompts
    tokens: list[list[int]]
    gen_logps: list[list[float]]  # from the generating pass
    stopped: list[bool]
    rewards: dict[str, list[float]]  # per reward function, unweighted
    total: list[float]  # the weighted sum: what advantages are computed from
    advantages: list[float]
    old_logps: list[list[float]] | None = None  # set when the batch is trained on more than once
    train: bool = True  # False: every advantage is 0 and there is no KL term, so it is counted, not run

    def sequences(self) -> list[Tokenized]:
        p = self.prompt.input_ids
        return [Tokenized(p + tuple(t), (IGNORE,) * len(p) + tuple(t), self.prompt.source) for t in self.tokens]

    def to_json(self) -> dict:
        return {"index": self.index, "tokens": self.tokens, "gen_logps": self.gen_logps, "stopped": self.stopped,
                "rewards": self.rewards, "total": self.total, "advantages": self.advantages,
                "old_logps": self.old_logps, "train": self.train}


class GRPO(MethodBase):
    name = "grpo"
    example_kind = "prompt"
    online = True

    def __init__(self, args: MethodConfig):
        self.args = args
        self.beta = args.beta if args.beta is not None else DEFAULT_BETA
        self.needs_reference = self.beta > 0
        self.sampling = SamplingSettings(args.group_size, args.max_new_tokens, args.temperature, args.top_p,
                                         args.top_k)
        self.rewards = build_rewards(args.rewards, args.max_new_tokens)
        self.chunk = 1024  # logits chunk of the extra old-log-prob pass (reduced precision, iterations > 1)

    # ---- data ----------------------------------------------------------------------------------------
    def render(self, renderer: Renderer, example: Prompt) -> TokenizedPrompt | None:
        return renderer.prompt(example, reserve=self.args.max_new_tokens)

    def length(self, item: TokenizedPrompt | Group) -> int:
        if isinstance(item, Group):
            return sum(len(s) for s in item.sequences())
        return len(item) + self.args.max_new_tokens

    def prepare(self, items: list, micro_batch_size: int, split: Split) -> tuple[list, str | None]:
        """Rewards that compare with references get them from the data, or the run stops here, before the
        first step; so does a reward that raises or returns a non-number on a first answer."""
        for r in self.rewards:
            if isinstance(r, ChoiceReward) and r.labels is None and split == "train":
                r.labels = frozenset(normalize(x.example.reference) for x in items if x.example.reference)
        missing = missing_references(self.rewards, items)
        if missing:
            raise TunesmithError(missing, "give every example a reference answer (its assistant turn, "
                                          "completion or a `reference` column), or name another column with "
                                          "the reward's reference: setting")
        if items and split == "train":
            first = items[0]
            score_answers(self.rewards, [Answer(first.example.reference or "", first, 1, True)])
        return items, None

    def batch_sequences(self, items: Sequence[Group]) -> list[Tokenized]:
        return [s for g in items if g.train for s in g.sequences()]

    def collate(self, items: Sequence[Group], pad_id: int, pack_length: int | None) -> Batch:
        trained = [g for g in items if g.train]
        seqs, share = [], []
        for g in trained:
            share.append(tuple(range(len(seqs), len(seqs) + len(g.tokens))))
            seqs += g.sequences()
        extra = {"advantages": torch.tensor([a for g in trained for a in g.advantages], dtype=torch.float32),
                 "prompt_len": torch.tensor([len(g.prompt) for g in trained for _ in g.tokens], dtype=torch.long),
                 "gen_logps": _padded([x for g in trained for x in g.gen_logps]),
                 "old_logps": _padded([x for g in trained for x in g.old_logps])
                 if trained and all(g.old_logps is not None for g in trained) else None,
                 "units": self._units(items), "stats": group_stats(items),
                 "skipped_tokens": sum(len(t) for g in items if not g.train for t in g.tokens)}
        return collate(seqs, pad_id, pack_length, extra=extra, share=share if self.args.share_prompt else [])

    def _units(self, items: Sequence[Group]) -> int:
        n = sum(len(g.tokens) for g in items)
        tokens = sum(len(t) for g in items for t in g.tokens)
        return grpo_units(self.args.loss_type, n, tokens, self.args.max_new_tokens)

    def units(self, batch: Batch) -> int:
        return batch.extra["units"]

    # ---- loss ----------------------------------------------------------------------------------------
    def policy_logps(self, model: torch.nn.Module, batch: Batch, chunk: int) -> TokenLogps:
        return TokenLogps(*token_logps(model, batch, chunk, self.args.temperature))

    def loss(self, policy: TokenLogps, reference: TokenLogps | None, batch: Batch
             ) -> tuple[torch.Tensor, dict[str, Any]]:
        if self.needs_reference and reference is None:
            raise TunesmithError("grpo with beta > 0 needs reference log-probs and none were given",
                                 "this is a bug in tunesmith: the recipe builds a live reference for it")
        ex = batch.extra
        seq, logp = policy.seq, policy.logp
        at = completion_index(batch, ex["prompt_len"])
        gen = ex["gen_logps"][seq, at]
        old = ex["old_logps"][seq, at] if ex["old_logps"] is not None else logp.detach()
        terms = grpo_terms(logp, old, ex["advantages"][seq], reference.logp if reference is not None else None,
                           self.beta, self.args.epsilon, self.args.epsilon_high)
        loss_sum = grpo_loss_sum(terms.losses, seq, batch.n_seqs, self.args.loss_type)
        n = float(logp.numel() + ex["skipped_tokens"])
        metrics: dict[str, Any] = dict(ex["stats"])
        metrics.update({"clip_low": (terms.clipped_low.sum(), n), "clip_high": (terms.clipped_high.sum(), n),
                        "clip_fraction": ((terms.clipped_low | terms.clipped_high).sum(), n),
                        "logp_gap": ((logp.detach() - gen).abs().sum(), float(logp.numel()))})
        if terms.kl is not None:
            metrics["kl"] = (terms.kl.sum(), float(logp.numel()))
        return loss_sum, metrics

    # ---- sampling ------------------------------------------------------------------------------------
    def rollout(self, sampler: Sampler, prompts: list[list[tuple[int, TokenizedPrompt]]],
                generator: torch.Generator, collate: Callable[[list[Group]], Batch]
                ) -> tuple[list[list[Group]], dict[str, float]]:
        flat = [x for mb in prompts for x in mb]
        if not flat:
            return [], {}
        size = max(len(mb) for mb in prompts)
        together = max(size, self.args.sample_rows // self.sampling.group_size)
        sampled, stats = sampler.sample([p.input_ids for _, p in flat], self.sampling, generator, chunk=together)
        groups = self._score(sampler, flat, sampled)
        if self.args.iterations > 1:
            self._old_logps(sampler, groups, collate)
        trained = [g for g in groups if g.train]
        chunks = [trained[k:k + size] for k in range(0, len(trained), size)]
        chunks[0] = [g for g in groups if not g.train] + chunks[0]  # counted with the first micro-batch
        return chunks, {"gen_s": stats.seconds, "gen_tokens": float(stats.new_tokens),
                        "gen_prompt_tokens": float(stats.prompt_tokens),
                        "gen_tokens_per_s": stats.new_tokens / stats.seconds if stats.seconds else 0.0}

    def _score(self, sampler: Sampler, flat: list[tuple[int, TokenizedPrompt]], sampled) -> list[Group]:
        answers = [Answer(sampler.decode(c), p, len(c.tokens), c.stopped)
                   for (_, p), group in zip(flat, sampled, strict=True) for c in group]
        try:
            values = score_answers(self.rewards, answers)
        except TunesmithError as e:
            raise TrainingAborted(e.message, e.hint) from None
        g = self.sampling.group_size
        total = torch.tensor([sum(r.weight * v[k] for r, v in zip(self.rewards, values, strict=True))
                              for k in range(len(answers))], dtype=torch.float32)
        adv = group_advantages(total, g, self.args.scale_rewards).tolist()
        groups = []
        for j, ((index, prompt), group) in enumerate(zip(flat, sampled, strict=True)):
            span = slice(j * g, (j + 1) * g)
            advantages = adv[span]
            groups.append(Group(prompt, index, [c.tokens for c in group], [c.logps for c in group],
                                [c.stopped for c in group],
                                {r.name: v[span] for r, v in zip(self.rewards, values, strict=True)},
                                total[span].tolist(), advantages,
                                train=self.beta > 0 or any(a != 0 for a in advantages)))
        if not any(x.train for x in groups):
            groups[0].train = True  # one group run gives the step its (exactly zero) gradients
        return groups

    def _old_logps(self, sampler: Sampler, groups: list[Group], collate: Callable[[list[Group]], Batch]) -> None:
        """The policy's log-probs at sampling time, for the batch's later iterations."""
        if sampler.exact:
            for g in groups:
                g.old_logps = [list(x) for x in g.gen_logps]
            return
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(sampler.precision)
        was_training = sampler.model.training
        sampler.model.eval()
        try:
            for g in groups:
                batch = collate([g])
                with torch.no_grad(), torch.autocast(batch.input_ids.device.type, dtype=dtype):
                    out = self.policy_logps(sampler.model, batch, self.chunk)
                values, seq = out.logp.float().cpu(), out.seq.cpu()
                g.old_logps = [values[seq == k].tolist() for k in range(len(g.tokens))]
        finally:
            sampler.model.train(was_training)

    def plan_items(self, items: Sequence[TokenizedPrompt]) -> list[Group]:
        """Each prompt with G answers of max_new_tokens (their longest), every group trained."""
        g, n = self.sampling.group_size, self.args.max_new_tokens
        return [Group(p, i, [[p.input_ids[-1]] * n for _ in range(g)], [[0.0] * n for _ in range(g)],
                      [False] * g, {r.name: [0.0] * g for r in self.rewards}, [0.0] * g, [0.0] * g)
                for i, p in enumerate(items)]

    def dump_items(self, items: Sequence[Group]) -> list:
        return [g.to_json() for g in items]

    def load_items(self, data: list, prompts: Sequence[TokenizedPrompt]) -> list[Group]:
        return [Group(prompt=prompts[d["index"]], **d) for d in data]

    def diagnose(self, history: Sequence[dict]) -> list[str]:
        flat = [r for r in history if r.get("zero_std_groups", 0) >= 0.999]
        if history and len(flat) == len([r for r in history if "zero_std_groups" in r]):
            return ["grpo: in every step each prompt's answers all earned the same reward, so nothing was "
                    "learned (the advantages were 0). Make the task harder or the rewards finer (partial "
                    "credit), raise method_args.temperature, or use a larger method_args.group_size"]
        return []


def completion_index(batch: Batch, prompt_len: torch.Tensor) -> torch.Tensor:
    """For every trained token (row-major order), its index within its sequence's completion."""
    mask = batch.labels[:, 1:] != IGNORE
    return batch.position_ids[:, 1:][mask] - prompt_len[batch.seq_ids[:, 1:][mask]]


def group_stats(items: Sequence[Group]) -> dict[str, tuple[float, float]]:
    """Per-completion and per-group metric sums with their counts, over every group of the items."""
    n = float(sum(len(g.tokens) for g in items))
    groups = float(len(items))
    out: dict[str, tuple[float, float]] = {
        "reward": (sum(sum(g.total) for g in items), n),
        "completion_length": (float(sum(len(t) for g in items for t in g.tokens)), n),
        "completion_cut": (float(sum(not s for g in items for s in g.stopped)), n),
    }
    if items:
        stds = group_std(torch.tensor([x for g in items for x in g.total]), len(items[0].tokens))
        out["reward_std"] = (float(stds.sum()), groups)
        out["zero_std_groups"] = (float((stds == 0).sum()), groups)
        for name in items[0].rewards:
            out[f"reward/{name}"] = (sum(sum(g.rewards[name]) for g in items), n)
    return out


def _padded(rows: Sequence[Sequence[float]]) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    out = torch.zeros((len(rows), max(width, 1)), dtype=torch.float32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, dtype=torch.float32)
    return out

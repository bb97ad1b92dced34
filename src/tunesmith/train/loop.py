"""The one training loop. It serves every method through `methods.base.Method`.

Per optimizer step: the step's micro-batches are collated, the loss of each is divided by the number of
units (target tokens or pairs) in the WHOLE accumulated batch, so micro-batch 1 x accum 4 and micro-batch
4 x accum 1 give the same update; then clipping, a non-finite guard, the optimizer and the schedule.
The order of micro-batches is a pure function of (seed, epoch), so a run can resume at any step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import TrainConfig
from ..data.batching import Batch, batch_order
from ..errors import TrainingAborted
from ..methods.base import Method
from ..methods.logps import SeqLogps, sequence_logps
from ..model.device import Runtime
from .schedule import lr_factor, warmup_steps

ReferenceFn = Callable[[Sequence[int], Batch], SeqLogps]


@dataclass
class TrainState:
    step: int = 0  # optimizer steps completed
    tokens: int = 0  # real (non-pad) tokens processed
    target_tokens: int = 0
    skipped_nonfinite: int = 0
    elapsed: float = 0.0
    history: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"step": self.step, "tokens": self.tokens, "target_tokens": self.target_tokens,
                "skipped_nonfinite": self.skipped_nonfinite, "elapsed": self.elapsed}


def plan_steps(n_items: int, cfg: TrainConfig) -> tuple[int, int]:
    """(micro-batches per epoch, optimizer steps of the run) for n_items examples."""
    per_epoch = math.ceil(n_items / cfg.micro_batch_size)
    return per_epoch, cfg.max_steps or max(1, math.ceil(per_epoch * cfg.epochs / cfg.grad_accum))


class Trainer:
    def __init__(self, model: torch.nn.Module, method: Method, items: Sequence[Any], cfg: TrainConfig,
                 runtime: Runtime, pad_id: int, optimizer: torch.optim.Optimizer,
                 eval_items: Sequence[Any] | None = None, reference: ReferenceFn | None = None,
                 pack_length: int | None = None, callbacks: Sequence[Callable[[Trainer, dict], None]] = ()):
        if not items:
            raise TrainingAborted("no training examples left after rendering", hint="check `tunesmith data check`")
        self.model, self.method, self.items, self.cfg, self.rt = model, method, items, cfg, runtime
        self.pad_id, self.optimizer, self.eval_items, self.reference = pad_id, optimizer, eval_items, reference
        self.pack_length = pack_length
        self.callbacks = list(callbacks)
        self.state = TrainState()
        self.lengths = [method.length(x) for x in items]
        self.per_epoch, self.total_steps = plan_steps(len(items), cfg)
        self.warmup = warmup_steps(self.total_steps, cfg.warmup_ratio, cfg.warmup_steps)
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self._orders: dict[int, list[list[int]]] = {}
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.stop_requested = False
        self.stop_signal: int | None = None

    # ---- the plan: which examples form micro-batch k -------------------------------------------------
    def micro_batch(self, k: int) -> list[int]:
        epoch, i = divmod(k, self.per_epoch)
        if epoch not in self._orders:
            self._orders = {epoch: batch_order(self.lengths, self.cfg.micro_batch_size, self.cfg.seed, epoch,
                                               self.cfg.group_by_length)}
        return self._orders[epoch][i]

    def epoch_of(self, step: int) -> float:
        return step * self.cfg.grad_accum / self.per_epoch

    # ---- one optimizer step --------------------------------------------------------------------------
    def collate(self, indices: Sequence[int], items: Sequence[Any] | None = None) -> Batch:
        items = self.items if items is None else items
        return self.method.collate([items[i] for i in indices], self.pad_id, self.pack_length).to(self.rt.device)

    def forward(self, indices: Sequence[int], batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with self.rt.autocast():
            policy = sequence_logps(self.model, batch, self.cfg.logits_chunk)
        ref = None
        if self.method.needs_reference:
            assert self.reference is not None, "this method needs reference log-probs"
            ref = self.reference(indices, batch)
        return self.method.loss(policy, ref, batch)

    def train_step(self) -> dict:
        step = self.state.step
        t0 = time.perf_counter()
        self.model.train()
        groups = [self.micro_batch(step * self.cfg.grad_accum + a) for a in range(self.cfg.grad_accum)]
        batches = [self.collate(g) for g in groups]
        units = sum(self.method.units(b) for b in batches)
        total_loss = torch.zeros((), device=self.rt.device)
        sums: dict[str, torch.Tensor] = {}
        for g, b in zip(groups, batches, strict=True):
            loss_sum, metrics = self.forward(g, b)
            (loss_sum / max(units, 1)).backward()
            total_loss += loss_sum.detach()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0) + v.detach().float()
        grad_norm = self._clip()
        loss = (total_loss / max(units, 1)).item()
        record = {"step": step + 1, "epoch": round(self.epoch_of(step + 1), 4), "loss": loss,
                  "grad_norm": grad_norm, "lr": self.optimizer.param_groups[0]["lr"]}
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            self._nonfinite(step, loss, grad_norm, batches)
            record["skipped"] = True
        else:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self._set_lr(self.state.step)
        real = sum(b.n_real_tokens for b in batches)
        target = sum(b.n_target_tokens for b in batches)
        dt = time.perf_counter() - t0
        self.state.tokens += real
        self.state.target_tokens += target
        self.state.elapsed += dt
        record.update({k: (v / max(units, 1)).item() for k, v in sums.items()})
        record.update({"tokens": real, "target_tokens": target, "tokens_per_s": real / dt if dt else 0.0,
                       "time": round(self.state.elapsed, 3)})
        return record

    def _clip(self) -> float:
        if self.cfg.max_grad_norm is not None:
            return float(torch.nn.utils.clip_grad_norm_(self.trainable, self.cfg.max_grad_norm))
        norms = [p.grad.detach().float().norm() for p in self.trainable if p.grad is not None]
        return float(torch.stack(norms).norm()) if norms else 0.0

    def _set_lr(self, step: int) -> None:
        f = lr_factor(min(step, self.total_steps - 1), self.total_steps, self.warmup, self.cfg.schedule)
        for g, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            g["lr"] = base * f

    def _nonfinite(self, step: int, loss: float, grad_norm: float, batches: Sequence[Batch]) -> None:
        self.state.skipped_nonfinite += 1
        if self.state.skipped_nonfinite <= self.cfg.skip_nonfinite:
            return
        sources = [s for b in batches for s in b.sources]
        raise TrainingAborted(
            f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} at step {step + 1} "
            f"(loss={loss}, grad_norm={grad_norm}); the optimizer step was not taken. "
            f"Batch rows: {', '.join(sources[:20])}",
            hint="lower train.lr, check these rows with `tunesmith data check`, use precision: fp32, or set "
                 "train.skip_nonfinite: N to skip up to N bad batches",
            exit_code=4,
        )

    # ---- evaluation loss -----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        if not self.eval_items:
            return {}
        self.model.eval()
        total, units = 0.0, 0
        sums: dict[str, float] = {}
        bs = self.cfg.micro_batch_size
        for k in range(0, len(self.eval_items), bs):
            idx = list(range(k, min(k + bs, len(self.eval_items))))
            batch = self.collate(idx, self.eval_items)
            with self.rt.autocast():
                policy = sequence_logps(self.model, batch, self.cfg.logits_chunk)
            ref = self.reference(idx, batch) if self.method.needs_reference and self.reference else None
            if self.method.needs_reference and ref is None:
                return {}
            loss_sum, metrics = self.method.loss(policy, ref, batch)
            total += float(loss_sum)
            units += self.method.units(batch)
            for name, v in metrics.items():
                sums[name] = sums.get(name, 0.0) + float(v)
        out = {"eval_loss": total / max(units, 1)}
        out.update({f"eval_{k}": v / max(units, 1) for k, v in sums.items() if k != "nll"})
        return out

    # ---- the loop ------------------------------------------------------------------------------------
    def fit(self, on_record: Callable[[dict], None] | None = None) -> TrainState:
        self._set_lr(self.state.step)
        while self.state.step < self.total_steps and not self.stop_requested:
            record = self.train_step()
            every = self.cfg.eval_every
            if every and (self.state.step % every == 0 or self.state.step == self.total_steps):
                record.update(self.evaluate())
            self.state.history.append(record)
            if on_record is not None:
                on_record(record)
            for cb in self.callbacks:
                cb(self, record)
        return self.state

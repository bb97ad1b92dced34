"""The one training loop. It serves every method through `methods.base.Method`, takes each step's batches
from a `BatchSource`, and leaves everything about processes to the parallel seam.

Per optimizer step: the step's micro-batches are run, the loss of each is divided by the number of units
(target tokens or pairs) in the WHOLE accumulated batch over every rank, so micro-batch 1 x accum 4, micro-
batch 4 x accum 1 and 2 processes x accum 2 give the same update; then clipping by the global gradient norm,
a non-finite guard every rank agrees on, the optimizer and the schedule.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from ..config import TrainConfig
from ..errors import TrainingAborted
from ..methods.base import Method
from ..methods.reference import Reference
from ..model.device import Runtime
from ..model.unwrap import reshard
from .checkpoint import Component, OptimizerState, RngState, TrainableWeights
from .parallel import SingleProcess
from .schedule import lr_factor, warmup_steps
from .source import BatchSource, MicroBatch


@dataclass
class TrainState:
    step: int = 0  # optimizer steps completed
    tokens: int = 0  # real (non-pad) tokens processed, all ranks
    target_tokens: int = 0
    skipped_nonfinite: int = 0
    elapsed: float = 0.0
    history: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"step": self.step, "tokens": self.tokens, "target_tokens": self.target_tokens,
                "skipped_nonfinite": self.skipped_nonfinite, "elapsed": self.elapsed}


class Policy(torch.nn.Module):
    """The method's policy log-probs of a batch as one module forward, so that DDP and FSDP2 (which hook a
    module's forward) see the whole computation: the body, the chunked LM head and the log-softmax."""

    def __init__(self, model: torch.nn.Module, method: Method, chunk: int):
        super().__init__()
        self.model, self.method, self.chunk = model, method, chunk

    def forward(self, batch):
        return self.method.policy_logps(self.model, batch, self.chunk)


class Trainer:
    def __init__(self, model: torch.nn.Module, method: Method, source: BatchSource, cfg: TrainConfig,
                 runtime: Runtime, optimizer: torch.optim.Optimizer, *, reference: Reference | None = None,
                 eval_source: Callable[[], Iterable[MicroBatch]] | None = None,
                 parallel: SingleProcess | None = None, policy: torch.nn.Module | None = None,
                 callbacks: Sequence[Callable[[Trainer, dict], None]] = ()):
        """`policy`: the (wrapped) `Policy` module of `model`; built here when not given."""
        self.model, self.method, self.source, self.cfg, self.rt = model, method, source, cfg, runtime
        self.optimizer, self.reference, self.eval_source = optimizer, reference, eval_source
        self.parallel = parallel or SingleProcess()
        self.policy = policy if policy is not None else self.parallel.wrap(Policy(model, method, cfg.logits_chunk))
        self.callbacks = list(callbacks)
        self.state = TrainState()
        self.total_steps = source.total_steps
        self.warmup = warmup_steps(self.total_steps, cfg.warmup_ratio, cfg.warmup_steps)
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.stop_requested = False
        self.stop_signal: int | None = None

    # ---- one micro-batch -----------------------------------------------------------------------------
    def forward(self, mb: MicroBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with self.rt.autocast():
            policy = self.policy(mb.batch)
        ref = None
        if self.method.needs_reference:
            if self.reference is None:
                raise TrainingAborted(f"{self.method.name} needs reference log-probs and none were set up",
                                      hint="this is a bug in tunesmith; please report it")
            ref = self.reference(mb.split, mb.items, mb.batch)
        return self.method.loss(policy, ref, mb.batch)

    # ---- one optimizer step --------------------------------------------------------------------------
    def train_step(self) -> dict:
        step = self.state.step
        t0 = time.perf_counter()
        self.model.train()
        mbs = self.source.step(step)  # padding micro-batches (weight 0) keep the ranks' collectives in step
        source_s = time.perf_counter() - t0  # making the batches: sampling, for an online method
        units = self.parallel.sum([float(sum(self.method.units(mb.batch) * mb.weight for mb in mbs))])[0]
        total_loss = torch.zeros((), device=self.rt.device)
        sums: dict[str, list] = {}
        for k, mb in enumerate(mbs):
            with self.parallel.accumulating(self.policy, last=k == len(mbs) - 1):
                loss_sum, metrics = self.forward(mb)
                (loss_sum * (mb.weight * self.parallel.world_size / max(units, 1))).backward()
            total_loss += loss_sum.detach() * mb.weight
            add_metrics(sums, metrics, mb.weight)
        grad_norm = self.parallel.clip(self.trainable, self.cfg.max_grad_norm)
        names = sorted(sums)
        reduced = self.parallel.sum([float(total_loss), *(float(x) for n in names for x in sums[n]),
                                     float(sum(mb.batch.n_real_tokens * mb.weight for mb in mbs)),
                                     float(sum(mb.batch.n_target_tokens * mb.weight for mb in mbs))])
        loss = reduced[0] / max(units, 1)
        record = {"step": step + 1, "epoch": round(self.source.epoch_at(step + 1), 4), "loss": loss,
                  "grad_norm": grad_norm, "lr": self.optimizer.param_groups[0]["lr"]}
        if self.parallel.all_finite(loss, grad_norm):
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self._nonfinite(step, loss, grad_norm, mbs)
            record["skipped"] = True
        self.state.step += 1
        self._set_lr(self.state.step)
        real, target = int(reduced[-2]), int(reduced[-1])
        dt = time.perf_counter() - t0
        self.state.tokens += real
        self.state.target_tokens += target
        self.state.elapsed += dt
        record.update(metric_means(names, sums, reduced[1:-2], units))
        source = self.source.step_metrics()
        if source:
            means = self.parallel.sum([float(source[n]) for n in sorted(source)])
            record.update({n: v / self.parallel.world_size for n, v in zip(sorted(source), means, strict=True)})
        train_s = dt - source_s
        record.update({"tokens": real, "target_tokens": target, "tokens_per_s": real / dt if dt else 0.0,
                       "train_tokens_per_s": real / train_s if train_s > 0 else 0.0,
                       "time": round(self.state.elapsed, 3)})
        return record

    def _set_lr(self, step: int) -> None:
        f = lr_factor(min(step, self.total_steps - 1), self.total_steps, self.warmup, self.cfg.schedule)
        for g, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            g["lr"] = base * f

    def _nonfinite(self, step: int, loss: float, grad_norm: float, mbs: Sequence[MicroBatch]) -> None:
        self.state.skipped_nonfinite += 1
        if self.state.skipped_nonfinite <= self.cfg.skip_nonfinite:
            return
        sources = [s for mb in mbs for s in mb.batch.sources]
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
        if self.eval_source is None:
            return {}
        self.model.eval()
        total, units = 0.0, 0.0
        sums: dict[str, list] = {}
        for mb in self.eval_source():
            with self.rt.autocast():
                policy = self.policy(mb.batch)
            ref = self.reference("eval", mb.items, mb.batch) if self.method.needs_reference else None
            loss_sum, metrics = self.method.loss(policy, ref, mb.batch)
            total += float(loss_sum) * mb.weight
            units += self.method.units(mb.batch) * mb.weight
            add_metrics(sums, metrics, mb.weight)
        reshard(self.policy)
        names = sorted(sums)
        reduced = self.parallel.sum([total, units, *(float(x) for n in names for x in sums[n])])
        out = {"eval_loss": reduced[0] / max(reduced[1], 1)}
        out.update({f"eval_{n}": v for n, v in metric_means(names, sums, reduced[2:], reduced[1]).items()})
        return out

    # ---- what a checkpoint holds ---------------------------------------------------------------------
    def components(self, extra: dict | None = None) -> dict[str, Component]:
        """Every part of the run a checkpoint saves and a resume restores, by file name."""
        return {"trainable": TrainableWeights(self.model, self.policy, self.parallel),
                "optimizer": OptimizerState(self.optimizer, self.model, self.policy, self.parallel),
                "rng": RngState(self.parallel), "state": Progress(self, extra or {}),
                "source": SourceState(self.source)}

    # ---- the loop ------------------------------------------------------------------------------------
    def fit(self, on_record: Callable[[dict], None] | None = None) -> TrainState:
        self._set_lr(self.state.step)
        while self.state.step < self.total_steps:
            self.stop_requested = self.parallel.any(self.stop_requested)  # every rank stops at the same step
            if self.stop_requested:
                break
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


def add_metrics(sums: dict[str, list], metrics: dict, weight: float = 1.0) -> None:
    """Accumulate a micro-batch's metrics: a sum (divided by the step's units when logged), or a (sum, count)
    pair (divided by its summed count: e.g. a mean over completions when the units are tokens). `weight` 0:
    a padding micro-batch, which counts nothing."""
    for name, v in metrics.items():
        pair = v if isinstance(v, tuple) else (v, None)
        got = sums.setdefault(name, [0.0] if pair[1] is None else [0.0, 0.0])
        for i, x in enumerate(pair[:len(got)]):
            got[i] = got[i] + (x.detach().float() if isinstance(x, torch.Tensor) else float(x)) * weight


def metric_means(names: list[str], sums: dict[str, list], reduced: Sequence[float], units: float) -> dict:
    """The logged value of each metric from its reduced sums (in `names` order, flattened)."""
    out, at = {}, 0
    for n in names:
        values = reduced[at:at + len(sums[n])]
        if len(values) == 2:
            out[n] = values[0] / values[1] if values[1] else 0.0
        else:
            out[n] = values[0] / max(units, 1)
        at += len(values)
    return out


class Progress:
    """The trainer's counters and metric history (plus run facts such as the reference key) as JSON."""

    def __init__(self, trainer: Trainer, extra: dict):
        self.trainer, self.extra = trainer, extra

    def state_dict(self) -> tuple[dict, dict]:
        s = self.trainer.state
        return {}, {"format": 1, **s.as_dict(), "history": s.history, **self.extra}

    def load_state_dict(self, tensors: dict, meta: dict) -> None:
        self.trainer.state = TrainState(step=meta["step"], tokens=meta["tokens"],
                                        target_tokens=meta["target_tokens"],
                                        skipped_nonfinite=meta["skipped_nonfinite"], elapsed=meta["elapsed"],
                                        history=list(meta["history"]))


class SourceState:
    def __init__(self, source: BatchSource):
        self.source = source

    def state_dict(self) -> tuple[dict, dict]:
        return {}, self.source.state_dict()

    def load_state_dict(self, tensors: dict, meta: dict) -> None:
        self.source.load_state_dict(meta)

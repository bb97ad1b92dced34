"""Running the loop safely: resume from the newest complete checkpoint, checkpoint every N steps, stop cleanly
on SIGTERM/SIGINT (finish the step, save, exit 75), and turn non-finite steps and out-of-memory into clear
errors that leave the last good checkpoint in place."""

from __future__ import annotations

import signal
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console

from ..config import RunConfig
from ..errors import TrainingAborted, TunesmithError
from . import checkpoint
from .loop import Trainer, TrainState
from .progress import TrainProgress
from .rundir import RunDir, write_json

EXIT_SIGNAL = 75  # stopped by SIGTERM/SIGINT after saving a checkpoint; rerun with --resume auto
EXIT_NONFINITE = 4
EXIT_OOM = 5


def resolve_resume(run_path: Path, resume: str | None) -> Path | None:
    """`auto` → newest complete checkpoint of this run (None if there is none); a path → that checkpoint."""
    if resume in (None, "", "never"):
        return None
    if resume == "auto":
        return checkpoint.latest(run_path / "checkpoints")
    path = Path(resume)
    if not path.is_dir():
        raise TunesmithError(f"--resume {resume}: no such checkpoint folder",
                             "use --resume auto, or a folder like runs/<name>/checkpoints/step-000200")
    return path


@contextmanager
def stop_on_signals(trainer: Trainer):
    """SIGTERM/SIGINT ask the loop to stop after the current step instead of killing it mid-write."""
    def request_stop(signum, frame):
        trainer.stop_requested = True
        trainer.stop_signal = signum

    installed = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            installed[sig] = signal.signal(sig, request_stop)
        except ValueError:  # not the main thread: leave signals alone
            pass
    try:
        yield
    finally:
        for sig, old in installed.items():
            signal.signal(sig, old)


def run_loop(trainer: Trainer, run: RunDir, cfg: RunConfig, console: Console, progress: bool,
             resume: str | None = None, extra_state: dict | None = None, examples: int = 0) -> TrainState:
    root = run.path / "checkpoints"
    start = resolve_resume(run.path, resume)
    if start is not None:
        checkpoint.load(trainer.components(), start)
        console.print(f"resumed from {start} (step {trainer.state.step} of {trainer.total_steps})")
    run.log({"event": "start", "total_steps": trainer.total_steps, "examples": examples}, truncate=True)
    for record in trainer.state.history:
        run.log(record)

    def save() -> Path:
        return checkpoint.save(trainer.components(extra_state), root, trainer.state.step,
                               keep_last=cfg.train.keep_last, write=run.is_main)

    with TrainProgress(trainer.total_steps, console, enabled=progress and run.is_main, label=cfg.method) as bar:
        def on_record(record: dict) -> None:
            run.log(record)
            s = trainer.state
            rate = s.tokens / s.elapsed if s.elapsed else 0.0
            eta = s.elapsed / s.step * (trainer.total_steps - s.step) if s.step else 0.0
            bar.update(record, rate, eta)
            every = cfg.train.save_every
            if every and (s.step % every == 0 or s.step == trainer.total_steps):
                save()

        try:
            with stop_on_signals(trainer):
                state = trainer.fit(on_record)
        except TrainingAborted as e:
            _diagnose(run, trainer, e)
            raise
        except MemoryError:
            raise _oom(cfg) from None
        except RuntimeError as e:
            if "out of memory" in str(e).lower():
                raise _oom(cfg) from None
            raise
    run.close()
    if trainer.stop_requested and state.step < trainer.total_steps:
        where = save()
        raise TrainingAborted(f"stopped by signal at step {state.step} of {trainer.total_steps}; checkpoint saved "
                              f"in {where}", hint="resume with: tunesmith train CONFIG --resume auto",
                              exit_code=EXIT_SIGNAL)
    return state


def _diagnose(run: RunDir, trainer: Trainer, error: TrainingAborted) -> None:
    if run.is_main:
        good = checkpoint.latest(run.path / "checkpoints")
        write_json(run.path / "failure.json", {"step": trainer.state.step + 1, "error": error.message,
                                               "last_good_checkpoint": str(good) if good else None,
                                               "history_tail": trainer.state.history[-5:]})
        run.close()


def _oom(cfg: RunConfig) -> TrainingAborted:
    t = cfg.train
    tips = [f"a smaller micro-batch with more accumulation (--set train.micro_batch_size={max(1, t.micro_batch_size // 2)}"
            f" --set train.grad_accum={t.grad_accum * 2}, the same effective batch)"]
    if not t.grad_checkpointing:
        tips.append("gradient checkpointing (--set train.grad_checkpointing=true)")
    if cfg.adapter.kind != "qlora":
        tips.append("a 4-bit base (--set adapter.kind=qlora)")
    tips.append(f"a shorter data.max_length (now {cfg.data.max_length})")
    return TrainingAborted("out of memory during training; no checkpoint was written for the failed step",
                           hint="try " + "; ".join(tips), exit_code=EXIT_OOM)

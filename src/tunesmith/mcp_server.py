"""`tunesmith mcp`: a Model Context Protocol server, so that any MCP client can drive tunesmith.

Tools: `data_check`, `plan`, `train` (a background job) with `train_status`, `train_stop` and `jobs`, `evaluate`
and `export`. Training runs as its own `tunesmith train` process: the server stays responsive, a job survives a
slow client, and stopping one is tunesmith's SIGTERM path (finish the step, save a checkpoint, exit 75), so
`train(..., resume="auto")` continues it. Jobs still running when the server shuts down are asked to stop that
way; each runs in its own session, so a client that kills the server's process group does not kill a job
mid-step.
Errors come back as tool errors with tunesmith's message and hint. Paths are relative to the server's working
directory. Needs the `mcp` package (`pip install 'tunesmith[mcp]'`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import wraps
from pathlib import Path
from typing import Any

from .errors import TunesmithError

LOG_TAIL = 20


@dataclass
class Job:
    """One `tunesmith train` process started by the server."""

    id: str
    config: str
    run: Path
    log: Path
    process: subprocess.Popen
    started: float = field(default_factory=time.time)
    stop_requested: bool = False

    def state(self) -> str:
        code = self.process.poll()
        if code is None:
            return "stopping" if self.stop_requested else "running"
        return {0: "finished", 75: "stopped"}.get(code, "failed")

    def status(self) -> dict[str, Any]:
        from .train.rundir import read_metrics

        records = read_metrics(self.run)
        steps = [r for r in records if "step" in r]
        start = next((r for r in reversed(records) if r.get("event") == "start"), {})
        out: dict[str, Any] = {"job": self.id, "state": self.state(), "exit_code": self.process.poll(),
                               "pid": self.process.pid,
                               "run": str(self.run), "log": str(self.log),
                               "elapsed_s": round(time.time() - self.started, 1),
                               "step": steps[-1]["step"] if steps else 0, "total_steps": start.get("total_steps")}
        if steps:
            last = steps[-1]
            out["last"] = {k: v for k, v in last.items() if isinstance(v, (int, float))}
            evals = [r for r in steps if "eval_loss" in r]
            if evals:
                out["last_eval_loss"] = evals[-1]["eval_loss"]
            if out["total_steps"] and out["state"] == "running":
                done = last["time"] / last["step"]
                out["eta_s"] = round(done * (out["total_steps"] - last["step"]), 1)
        if out["state"] != "running":
            info = _read_json(self.run / "run.json")
            if "eval" in info:
                out["eval"] = {k: info["eval"][k] for k in ("verdicts", "scores", "won") if k in info["eval"]}
            if out["state"] in ("failed", "stopped"):
                out["log_tail"] = self.log.read_text(errors="replace").splitlines()[-LOG_TAIL:]
        return out


class Jobs:
    def __init__(self) -> None:
        self.jobs: dict[str, Job] = {}

    def start(self, config: str, overrides: list[str], resume: str | None) -> Job:
        from .config import load_config

        cfg = load_config(config, overrides)  # every config problem is reported now, not in a log later
        run = cfg.run_dir.resolve()
        busy = [j for j in self.jobs.values() if j.run == run and j.process.poll() is None]
        if busy:
            raise TunesmithError(f"job {busy[0].id} is still training {run}",
                                 "wait for it (train_status) or stop it (train_stop) first")
        run.mkdir(parents=True, exist_ok=True)
        log = run / "train.log"
        cmd = [sys.executable, "-m", "tunesmith", "train", str(config)]  # the log gets a line per phase
        cmd += [f"--set={o}" for o in overrides] + (["--resume", resume] if resume else [])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (_package_root(), os.environ.get(
            "PYTHONPATH")) if p)}
        with open(log, "w") as fh:
            # Its own session: a client that kills the server's process group on exit does not kill the job
            # mid-step; the server asks it to stop instead (stop_all).
            process = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                       start_new_session=True)
        job = Job(f"{cfg.name}-{len(self.jobs) + 1}", str(config), run, log, process)
        self.jobs[job.id] = job
        return job

    def get(self, job_id: str) -> Job:
        if job_id not in self.jobs:
            known = ", ".join(self.jobs) or "none"
            raise TunesmithError(f"no job '{job_id}'", f"jobs of this server: {known}")
        return self.jobs[job_id]

    def stop(self, job_id: str) -> Job:
        job = self.get(job_id)
        if job.process.poll() is None:
            job.stop_requested = True
            job.process.send_signal(signal.SIGTERM)
        return job

    def stop_all(self) -> None:
        """Ask every running job to stop: each finishes its step, saves a checkpoint and exits on its own (the
        server does not wait: clients give a closing server a few seconds only)."""
        for job in self.jobs.values():
            if job.process.poll() is None:
                self.stop(job.id)


def _package_root() -> str:
    return str(Path(__file__).resolve().parents[1])


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _plain(value: Any) -> Any:
    """JSON-safe (paths, tuples, dataclasses)."""
    return json.loads(json.dumps(value, default=str))


# ---------------------------------------------------------------- the tools

def data_check(data: str | list[str], model: str | None = None, eval_data: str | None = None,
               max_length: int = 1024, format: str = "auto", system_prompt: str | None = None) -> dict[str, Any]:
    """Check training data before training on it: every invalid row (file, line, field and fix), duplicates,
    near duplicates, conflicting answers, leakage into eval_data, token lengths (with `model`, e.g. "default")
    and label balance. `errors` must be fixed; `warnings` are worth a look."""
    from .data.doctor import check_data
    from .model.load import load_tokenizer

    tokenizer = load_tokenizer(model) if model else None
    report = check_data(data, tokenizer, max_length, eval_data, format=format, system_prompt=system_prompt)
    return _plain({**report.to_dict(), "error_count": len(report.errors), "warning_count": len(report.warnings)})


def plan(config: str, overrides: list[str] | None = None, device: str | None = None, nproc: int = 1,
         parallel: str = "auto", calibrate: bool = False) -> dict[str, Any]:
    """Before training: a run config's memory per device (by part), time and cost, and whether it fits
    `device` ("cpu", "cuda", or a device of the price table such as "h100-80gb"; default: the config's), with
    the changes that make it fit. `nproc` GPUs with `parallel` "ddp" or "fsdp"; `calibrate` measures a few real
    training steps on this machine instead of assuming a utilisation. `text` is the plan as `tunesmith plan`
    prints it."""
    from .api import plan as plan_run
    from .plan.report import format_plan

    result = plan_run(config, overrides or [], device=device, nproc=nproc, parallel=parallel, calibrate=calibrate)
    return _plain({**result.as_dict(), "text": format_plan(result)})


def train(config: str, overrides: list[str] | None = None, resume: str | None = None) -> dict[str, Any]:
    """Start training a run config (YAML) in the background; returns the job id at once. `overrides` are
    KEY=VALUE strings like "train.lr=1e-4"; `resume="auto"` continues a stopped run from its newest checkpoint.
    Follow it with train_status; the comparison eval of the config's eval: section runs at the end."""
    job = JOBS.start(config, list(overrides or []), resume)
    return job.status()


def train_status(job: str) -> dict[str, Any]:
    """A training job's state (running, stopping, finished, stopped, failed), its step of total_steps, the last
    step's metrics (loss, lr, grad_norm, tokens_per_s, ...), an ETA; when done, the eval's verdicts and
    scores; when failed or stopped, the end of its log."""
    return JOBS.get(job).status()


def train_stop(job: str) -> dict[str, Any]:
    """Stop a training job cleanly: it finishes the current step, saves a checkpoint and exits (state
    "stopped"); train(config, resume="auto") continues it."""
    return JOBS.stop(job).status()


def jobs() -> list[dict[str, Any]]:
    """Every training job this server started, with its state and progress."""
    return [j.status() for j in JOBS.jobs.values()]


def evaluate(data: str, candidates: list[str] | None = None, metrics: list[str] | None = None,
             base: str | None = None, train_data: str | None = None, out: str | None = None,
             max_examples: int | None = None, max_new_tokens: int | str = "auto",
             settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Compare candidates on held-out data (JSONL with reference answers), cheapest first: "knn:5", "base",
    "base+labels", "base+fewshot:5", "base+rag:5", run folders such as "runs/my-run", OpenAI-compatible
    endpoints. Metrics: exact, loss, choice, f1, json_fields, ... `settings`: any other key of a config's eval:
    section (docs/config.md), e.g. {"batch_size": 8, "require_worth": true}. Returns each candidate's score with
    a 95% interval, paired comparisons with p-values, cost per query, verdict lines and whether fine-tuning was
    worth it; reports go to `out` when given."""
    from .api import evaluate as run_eval

    chosen = {"candidates": candidates or ["base"], "metrics": metrics or ["exact"], "base": base,
              "train_data": train_data, "out": out, "max_examples": max_examples, "max_new_tokens": max_new_tokens}
    result = run_eval(data, {**(settings or {}), **{k: v for k, v in chosen.items() if v is not None}})
    return _plain(result.summary())


def export(run: str, format: str, out: str | None = None, dtype: str | None = None,
           name: str | None = None) -> dict[str, Any]:
    """Export a finished run: format "peft" (an adapter vLLM serves), "merged" (a standalone checkpoint), "gguf",
    "gguf-lora" or "ollama". Returns where it was written, its checks and the commands that serve it."""
    from .export.run import export_run

    result = export_run(run, format, out, dtype, name)
    return _plain({"format": result.format, "path": Path(result.path).resolve(), "checks": result.checks,
                   "commands": result.commands, "problems": result.problems})


JOBS = Jobs()
TOOLS: list[Callable[..., Any]] = [data_check, plan, train, train_status, train_stop, jobs, evaluate, export]


def _as_tool(fn: Callable[..., Any]) -> Callable[..., Any]:
    """tunesmith's errors become tool errors that carry the message and the hint, not a traceback."""
    from mcp.server.mcpserver.exceptions import ToolError

    @wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        from .console import quiet

        try:
            with quiet():
                return fn(*args, **kwargs)
        except TunesmithError as e:
            raise ToolError(e.message + (f"\nhint: {e.hint}" if e.hint else "")) from None

    return call


def build_server():
    """The MCP server with every tool registered."""
    try:
        from mcp.server import MCPServer
    except ImportError:
        raise TunesmithError("`tunesmith mcp` needs the mcp package, which is not installed",
                             "pip install 'tunesmith[mcp]'") from None
    from . import __version__

    @asynccontextmanager
    async def lifespan(server):
        try:
            yield None
        finally:
            JOBS.stop_all()  # a training job saves a checkpoint and can be resumed

    server = MCPServer("tunesmith", version=__version__, lifespan=lifespan, log_level="WARNING",
                       instructions="Fine-tune an open language model on the user's data and prove it was "
                                    "worth it: data_check the data, train a YAML run config (background job: "
                                    "poll train_status), evaluate against the base model, export for serving.")
    for fn in TOOLS:
        server.add_tool(_as_tool(fn))
    return server


def serve() -> None:
    """Serve the tools over stdio until the client closes the connection."""
    build_server().run("stdio")

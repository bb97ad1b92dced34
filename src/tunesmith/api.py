"""The Python API. It mirrors the CLI: `tunesmith.train(config)` is `tunesmith train CONFIG`."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from rich.console import Console

from .config import EvalConfig, RunConfig, load_config, parse_config
from .console import make_console, phase, quiet
from .eval.run import EvalResult
from .eval.run import evaluate as _evaluate
from .plan import Plan
from .train.recipe import Run


def _as_config(config: RunConfig | dict | str | Path, overrides: list[str] | None = None) -> RunConfig:
    if isinstance(config, RunConfig):
        if overrides:
            return load_config(None, overrides, base=config.model_dump(mode="json"))
        return config
    if isinstance(config, dict):
        return load_config(None, overrides, base=config) if overrides else parse_config(config)
    return load_config(config, overrides)


def plan(config: RunConfig | dict | str | Path, overrides: list[str] | None = None, device: str | None = None,
         nproc: int = 1, parallel: str = "auto", prices: str | Path | None = None, calibrate: bool = False,
         console: Console | None = None) -> Plan:
    """Memory per device, time and cost of a run before it starts (`tunesmith plan`), with a verdict for
    `device` (None: the config's device; or a device of the price table, e.g. "h100-80gb") and the changes
    that make it fit. `calibrate=True` measures throughput with a few real steps on this machine."""
    from .plan import plan_run

    return plan_run(_as_config(config, overrides), device=device, nproc=nproc, parallel=parallel, prices=prices,
                    calibrate=calibrate, console=console)


def train(config: RunConfig | dict | str | Path, overrides: list[str] | None = None,
          console: Console | None = None, progress: bool = True, evaluate: bool = True,
          resume: str | None = None, force: bool = False, verbose: bool | None = None) -> Run:
    """Train as the config says (a RunConfig, a dict, or a YAML path) and return the run. When the config has
    an `eval:` section, the comparison eval runs at the end. `resume="auto"` continues from the newest complete
    checkpoint of the run (or starts fresh when there is none); a checkpoint folder resumes from that one.
    `verbose=True` (or TUNESMITH_VERBOSE=1) also shows the libraries' own progress bars, logs and warnings.

    Before loading the model the run is planned (`plan`) for the device it is about to use; a run the plan
    says cannot fit is refused unless `force=True` or `train.ignore_plan: true`."""
    from .train.recipe import train as run_training
    from .train.trackers import Trackers

    cfg = _as_config(config, overrides)
    console = console or make_console()
    with quiet(verbose):
        planned = _plan_before_training(cfg, console, force, progress)
        with Trackers(cfg, console) as trackers:  # trackers finish after the eval
            run = run_training(cfg, console=console, progress=progress, resume=resume, trackers=trackers)
            if planned is not None:
                _record_plan(run, planned)
            if evaluate and cfg.eval is not None:  # under torchrun every rank answers its share (eval/shards.py)
                from .eval.run import evaluate_run

                run.info["eval"] = evaluate_run(run, console=console)
    return run


@functools.wraps(_evaluate)
def evaluate(*args: Any, verbose: bool | None = None, **kwargs: Any) -> EvalResult:
    with quiet(verbose):
        return _evaluate(*args, **kwargs)


def _plan_before_training(cfg: RunConfig, console: Console | None, force: bool, progress: bool = True
                          ) -> Plan | None:
    """Plan the run on the device it will use, print the verdict, refuse what cannot fit."""
    import os

    from .errors import TunesmithError
    from .model.device import pick_device
    from .plan import check_fits, plan_run
    from .plan.report import format_plan

    console = console or Console(stderr=True)
    if pick_device(cfg.device).type == "mps":
        console.print("[yellow]plan: no plans for Apple MPS devices yet; training without one")
        return None
    world, main = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0)) == 0
    try:
        with phase("plan", console=console, enabled=progress and main):
            planned = plan_run(cfg, nproc=world, parallel=getattr(cfg.train, "parallel", "auto"))
    except TunesmithError:
        raise
    except Exception as e:  # noqa: BLE001 - a plan that cannot be made must not stop a run the user started
        console.print(f"[yellow]plan: could not plan this run ({type(e).__name__}: {e}); training anyway")
        return None
    if main:
        console.print(format_plan(planned), highlight=False, markup=False)
    if not (force or cfg.train.ignore_plan):
        check_fits(planned)
    elif not planned.fits and main:
        console.print("[yellow]plan: the run is not expected to fit; going ahead as asked (--force)")
    return planned


def _record_plan(run: Run, planned: Plan) -> None:
    """Add the plan, and what the run measured to compare with it, to run.json."""
    import json
    import os
    import resource

    import torch

    from .train.rundir import write_json

    if int(os.environ.get("RANK", 0)) != 0:
        return
    measured = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if torch.cuda.is_available():
        measured["peak_cuda_allocated_bytes"] = torch.cuda.max_memory_allocated()
        measured["peak_cuda_reserved_bytes"] = torch.cuda.max_memory_reserved()
    record = {**planned.as_dict(), "measured": measured}
    run.info["plan"] = record
    path = run.path / "run.json"
    if path.exists():
        info = json.loads(path.read_text())
        info["plan"] = record
        write_json(path, info)


class ChatModel:
    """A loaded model (optionally with adapters) that answers lists of messages."""

    def __init__(self, model, tokenizer, device, precision: str, adapters=None, system_prompt: str | None = None,
                 adapter_system_prompts: dict[str, str | None] | None = None):
        from .model.generate import Generator

        self.model, self.tokenizer, self.adapters = model, tokenizer, adapters
        self.generator = Generator(model, tokenizer, device=device, precision=precision, system_prompt=system_prompt)
        self._adapter_system_prompts = adapter_system_prompts or {}

    @property
    def system_prompt(self) -> str | None:
        """The system message put in front of prompts that have none (the one training used, for a run)."""
        return self.generator.renderer.system_prompt or None

    @system_prompt.setter
    def system_prompt(self, text: str | None) -> None:
        self.generator.renderer.system_prompt = text or None

    def generate(self, prompts: list[list[dict]], **kwargs: Any) -> list[str]:
        return self.generator.generate(prompts, **kwargs)

    def use(self, name: str | None) -> None:
        """Switch to adapter `name` (None = the base model), and to the system message that adapter's run
        trained with. Only for models opened with open_adapters."""
        if self.adapters is None:
            raise ValueError("this model was not opened with adapters; use tunesmith.open_adapters")
        self.adapters.use(name)
        self.system_prompt = self._adapter_system_prompts.get(name) if name else None


def check_data(data: str | list[str], model: str | None = None, **options: Any):
    """`tunesmith data check`: load `data` leniently and report what is wrong or suspicious about it (a
    `tunesmith.data.doctor.Report`; `.errors`, `.warnings`, `.write(path)` for the full JSON). With `model`,
    token lengths (documents: windows) are measured with its tokenizer and chat template. `options` are those of
    `tunesmith.data.doctor.check_data` (eval_spec, max_length, truncation, window_overlap, ...)."""
    from .data.doctor import check_data as check
    from .model.load import load_tokenizer

    return check(data, load_tokenizer(model) if model else None, **options)


def open_model(target: str | Path | None = None, device: str = "auto", precision: str = "auto",
               system_prompt: str | None = None, allow_pickle_weights: bool = False) -> ChatModel:
    """A run folder (base + its adapter) or a model spec ("default", HF dir, .gguf, hub id).

    system_prompt: put in front of prompts that have no system message. None (default): for a run, the
    system message every training example carried (run.json `system_prompt`), else none; "" sends none.
    allow_pickle_weights: also load a model spec whose weights are pickle files (a run uses its config's)."""
    from .model.device import make_runtime
    from .model.load import load_model_and_tokenizer
    from .model.runs import is_run_dir, load_run, run_system_prompt

    rt = make_runtime(device, precision)
    dtype = "fp32" if rt.precision == "fp32" else rt.precision
    with quiet():
        if target is not None and is_run_dir(target):
            model, tok, info = load_run(target, device=rt.device, precision=rt.precision, dtype=dtype)
            if system_prompt is None:
                system_prompt = run_system_prompt(target, info)
        else:
            model, tok = load_model_and_tokenizer(str(target) if target else "default", device=rt.device,
                                                  precision=rt.precision, dtype=dtype,
                                                  allow_pickle_weights=allow_pickle_weights)
    return ChatModel(model, tok, rt.device, rt.precision, system_prompt=system_prompt or None)


def open_adapters(base: str | None, adapters: dict[str, str | Path], device: str = "auto",
                  precision: str = "auto") -> ChatModel:
    """Load the base once and attach several adapters (run folders or adapter folders); switch with .use(),
    which also switches to the system message the adapter's run trained with (none for the base)."""
    from .model.device import make_runtime
    from .model.load import load_model_and_tokenizer
    from .model.runs import base_load_options, is_run_dir, run_info, run_system_prompt
    from .model.swap import AdapterSet

    rt = make_runtime(device, precision)
    dirs = {n: Path(p) / "adapter" if is_run_dir(p) else Path(p) for n, p in adapters.items()}
    systems = {n: run_system_prompt(p) for n, p in adapters.items() if is_run_dir(p)}
    options: dict = {}
    if base is None:
        runs = [p for p in adapters.values() if is_run_dir(p)]
        base = run_info(runs[0])["model"] if runs else "default"
        options = base_load_options(runs[0]) if runs else {}
    with quiet():
        model, tok = load_model_and_tokenizer(base, device=rt.device, precision=rt.precision,
                                              dtype="fp32" if rt.precision == "fp32" else rt.precision, **options)
        aset = AdapterSet(model)
        for name, d in dirs.items():
            aset.add(name, d)
    return ChatModel(aset.model, tok, rt.device, rt.precision, adapters=aset, adapter_system_prompts=systems)


def export_run(run: str | Path, format: str, out: str | Path | None = None, dtype: str | None = None,
               name: str | None = None):
    """`tunesmith export RUN --format ...`: peft | merged | gguf | gguf-lora | ollama, each with a model card
    (README.md) and, for GGUF, the serving-parity checks. Returns an ExportResult (path, checks, commands)."""
    from .export.run import export_run as run_export

    return run_export(run, format, out, dtype, name)


def push(run: str | Path, repo_id: str, what: str = "adapter", private: bool = False, dry_run: bool = False,
         dtype: str | None = None):
    """`tunesmith push RUN REPO_ID`: export the run (adapter | merged | gguf) and upload it to the Hugging Face
    Hub; dry_run lists what would be uploaded and sends nothing. Returns a PushResult."""
    from .export.push import push_run

    return push_run(run, repo_id, what=what, private=private, dry_run=dry_run, dtype=dtype)


def serve_mcp() -> None:
    """`tunesmith mcp`: serve data check, plan, train, eval and export as MCP tools over stdio (docs/mcp.md)."""
    from .mcp_server import serve

    serve()


__all__ = ["ChatModel", "EvalConfig", "EvalResult", "Plan", "Run", "RunConfig", "check_data", "evaluate",
           "export_run", "load_config", "open_adapters", "open_model", "parse_config", "plan", "push", "serve_mcp",
           "train"]

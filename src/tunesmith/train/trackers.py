"""Experiment trackers (`train.report_to`): TensorBoard, MLflow, Weights & Biases and Trackio.

Each tracker receives exactly what the run writes to metrics.jsonl (every step record, under the names of
`metric_name`), the config, and at the end the comparison eval's scores and the run's reports as artifacts.
Offline first: without their own environment variables they write locally (TensorBoard event files in the
run folder, an MLflow file store next to the runs, W&B in offline mode, Trackio's local database). Only the
main process (rank 0) reports. Each library is imported only when its tracker is asked for.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Protocol

from rich.console import Console

from ..config import RunConfig, dump_config
from ..console import make_console
from ..errors import TunesmithError

REPORT_FILES = ("config.yaml", "report.md", "report.html", "eval/report.md", "eval/report.html",
                "eval/results.json")
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow-skinny", "wandb": "wandb", "trackio": "trackio"}


def metric_name(key: str, stage: str | None = None) -> str:
    """The tracker's name for a metrics.jsonl key: `loss` -> `train/loss`, `eval_loss` -> `eval/loss`;
    a multi-stage run puts the stage in front (`1-sft/train/loss`)."""
    name = f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"
    return f"{stage}/{name}" if stage else name


def step_metrics(record: dict, stage: str | None = None) -> dict[str, float]:
    """The numbers of one step record, named for trackers (the step itself is the x axis, not a metric)."""
    out = {}
    for key, value in record.items():
        if key == "step" or not isinstance(value, (int, float)):
            continue
        out[metric_name(key, stage)] = float(value)
    return out


def eval_scores(summary: dict) -> dict[str, float]:
    """The comparison eval's numbers from run.json's `eval` entry: each candidate's mean and 95% interval per
    metric, each tuned-vs-baseline difference with its p-value, and whether the fine-tune won."""
    out: dict[str, float] = {}
    for metric, by_candidate in summary.get("scores", {}).items():
        for candidate, s in by_candidate.items():
            for part in ("mean", "lo", "hi"):
                out[f"comparison/{metric}/{candidate}/{part}"] = float(s[part])
    for p in summary.get("pairs", []):
        prefix = f"comparison/{p['metric']}/{p['tuned']}-vs-{p['baseline']}"
        out[f"{prefix}/diff"], out[f"{prefix}/p"] = float(p["diff"]), float(p["p"])
    if "won" in summary:
        out["comparison/won"] = float(bool(summary["won"]))
    return out


def flat_config(cfg: RunConfig) -> dict[str, Any]:
    """The config as dotted keys (`train.lr`), lists and empty sections as JSON text."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif isinstance(value, (list, dict)):
            out[prefix] = json.dumps(value)
        else:
            out[prefix] = value

    walk("", cfg.model_dump(mode="json"))
    return out


class Backend(Protocol):
    name: str

    def log(self, metrics: dict[str, float], step: int) -> None: ...
    def scores(self, scores: dict[str, float], step: int) -> None: ...
    def artifacts(self, files: list[Path], root: Path) -> None: ...
    def close(self, ok: bool) -> None: ...


def _import(tracker: str, module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise TunesmithError(f"train.report_to: {tracker} needs the {PACKAGES[tracker]} package, which is not "
                             "installed", hint=f"pip install 'tunesmith[{tracker}]', or remove {tracker} from "
                                              "train.report_to") from None


class TensorBoard:
    """Event files in RUN/tensorboard (or $TENSORBOARD_LOGGING_DIR/NAME): scalars, and the config and reports
    as text. A new run of the same name purges the old run's points (as metrics.jsonl is rewritten)."""

    name = "tensorboard"

    def __init__(self, cfg: RunConfig, config_text: str):
        _import("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        root = os.environ.get("TENSORBOARD_LOGGING_DIR")
        self.where = Path(root) / cfg.name if root else cfg.run_dir / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.where), purge_step=1)
        self.writer.add_text("config", f"```yaml\n{config_text}```", 0)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def scores(self, scores: dict[str, float], step: int) -> None:
        self.log(scores, step)

    def artifacts(self, files: list[Path], root: Path) -> None:
        for f in files:
            if f.suffix == ".md":
                self.writer.add_text(f.relative_to(root).as_posix(), f.read_text())

    def close(self, ok: bool) -> None:
        self.writer.close()

    def describe(self) -> str:
        return f"{self.where} (view: tensorboard --logdir {self.where})"


class MLflow:
    """A run in $MLFLOW_TRACKING_URI, else a file store in OUTPUT_DIR/mlruns; experiment
    $MLFLOW_EXPERIMENT_NAME (default tunesmith). Config as params, reports as artifacts under report/."""

    name = "mlflow"
    PARAM_LIMIT = 6000

    def __init__(self, cfg: RunConfig, config_text: str):
        _import("mlflow", "mlflow")
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            uri = (Path(cfg.output_dir).resolve() / "mlruns").as_uri()
            # MLflow keeps its file store for local use behind this switch; tunesmith chose it, so it opts in.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.uri = uri
        self.client = MlflowClient(uri)
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "tunesmith"
        found = self.client.get_experiment_by_name(experiment)
        exp_id = found.experiment_id if found else self.client.create_experiment(experiment)
        self.run_id = self.client.create_run(exp_id, run_name=cfg.name).info.run_id
        from mlflow.entities import Param

        params = [Param(k, str(v)[: self.PARAM_LIMIT]) for k, v in flat_config(cfg).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        self.client.log_text(self.run_id, config_text, "config.yaml")

    def log(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def scores(self, scores: dict[str, float], step: int) -> None:
        self.log(scores, step)

    def artifacts(self, files: list[Path], root: Path) -> None:
        for f in files:
            sub = f.parent.relative_to(root).as_posix()
            self.client.log_artifact(self.run_id, str(f), "report" if sub == "." else f"report/{sub}")

    def close(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")

    def describe(self) -> str:
        return f"{self.uri} (run {self.run_id})"


class WandB:
    """A W&B run, offline unless $WANDB_MODE says otherwise (sync later with `wandb sync`); $WANDB_PROJECT
    (default tunesmith), $WANDB_ENTITY, $WANDB_DIR (default the run folder), $WANDB_NAME (default the run's
    name). Reports as one artifact of type report, scores in the run summary and history."""

    name = "wandb"

    def __init__(self, cfg: RunConfig, config_text: str):
        wandb = _import("wandb", "wandb")
        env = os.environ
        kwargs = {"mode": None if env.get("WANDB_MODE") else "offline",
                  "project": None if env.get("WANDB_PROJECT") else "tunesmith",
                  "dir": None if env.get("WANDB_DIR") else str(cfg.run_dir),
                  "name": None if env.get("WANDB_NAME") else cfg.name}
        if kwargs["dir"]:
            Path(kwargs["dir"]).mkdir(parents=True, exist_ok=True)
        self.wandb = wandb
        self.run = wandb.init(config=cfg.model_dump(mode="json"), settings=wandb.Settings(console="off", silent=True),
                              reinit="finish_previous", **{k: v for k, v in kwargs.items() if v is not None})
        self.artifact_name = f"{cfg.name}-report"

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def scores(self, scores: dict[str, float], step: int) -> None:
        self.run.log(scores, step=step)
        self.run.summary.update(scores)

    def artifacts(self, files: list[Path], root: Path) -> None:
        art = self.wandb.Artifact(self.artifact_name, type="report")
        for f in files:
            art.add_file(str(f), name=f.relative_to(root).as_posix())
        self.run.log_artifact(art)

    def close(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)

    def describe(self) -> str:
        where = Path(self.run.dir).parent
        if self.run.settings.mode == "offline":
            return f"offline run in {where} (upload: wandb sync {where})"
        return f"{self.run.url or where}"


class Trackio:
    """A run in Trackio's local database ($TRACKIO_DIR, default ~/.cache/huggingface/trackio), project
    $TRACKIO_PROJECT (default tunesmith); $TRACKIO_SPACE_ID / $TRACKIO_SERVER_URL send it elsewhere, as
    trackio does. Reports as one artifact of type report."""

    name = "trackio"

    def __init__(self, cfg: RunConfig, config_text: str):
        import contextlib
        import io

        trackio = _import("trackio", "trackio")
        self.project = os.environ.get("TRACKIO_PROJECT") or "tunesmith"
        with contextlib.redirect_stdout(io.StringIO()):  # trackio prints its banner on stdout
            self.run = trackio.init(project=self.project, name=cfg.name, config=flat_config(cfg), embed=False,
                                    auto_log_cpu=False, auto_log_gpu=False)
        self.trackio = trackio
        self.artifact_name = f"{cfg.name}-report"

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def scores(self, scores: dict[str, float], step: int) -> None:
        self.run.log(scores, step=step)

    def artifacts(self, files: list[Path], root: Path) -> None:
        art = self.trackio.Artifact(self.artifact_name, type="report")
        for f in files:
            art.add_file(f, name=f.relative_to(root).as_posix())
        self.run.log_artifact(art)

    def close(self, ok: bool) -> None:
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):
            if self.trackio.context_vars.current_run.get() is self.run:
                self.trackio.finish()  # also forgets the run, so trackio's exit hook leaves it alone
            else:
                self.run.finish()

    def describe(self) -> str:
        from trackio.sqlite_storage import SQLiteStorage

        return f"{SQLiteStorage.get_project_db_path(self.project)} (view: trackio show --project {self.project})"


BACKENDS: dict[str, type] = {"tensorboard": TensorBoard, "mlflow": MLflow, "wandb": WandB, "trackio": Trackio}


class Trackers:
    """The trackers of one `tunesmith train`: opened when the first stage starts on the main process, fed by
    each stage's RunDir (every record written to metrics.jsonl), finished after the comparison eval.

    A multi-stage run is one tracker run: stage i's steps follow those of the stages before it, and its
    metric names start with the stage's name. A tracker that fails while training is switched off with a
    warning; training goes on."""

    def __init__(self, cfg: RunConfig, console: Console | None = None):
        self.cfg, self.names = cfg, list(dict.fromkeys(cfg.train.report_to))
        self.console = console or make_console()
        self.backends: list[Backend] = []
        self.opened = False
        self.started = time.time() - 1.0  # the run's files are newer than this (file times may be rounded down)
        self.totals: dict[str | None, int] = {}  # steps of each stage seen, in order
        self.last_step = 0
        self.pending: list[tuple[Path, str]] = []  # finished stages to replay when the trackers open

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(ok=exc_type is None)

    def attach(self, run, rt, stage: str | None = None) -> None:
        """Follow RunDir `run` of `stage` (None for a single-stage run). Opens the trackers on the first call;
        nothing happens on processes other than rank 0."""
        if not self.names or not rt.is_main:
            return
        if not self.opened:
            self._open()
        run.sinks.append(lambda record, truncate: self.record(record, stage))

    def finished_stage(self, stage_dir: Path, stage: str) -> None:
        """A stage finished by an earlier, interrupted invocation: its records go to the trackers too."""
        if self.names:
            self.pending.append((Path(stage_dir), stage))

    def record(self, record: dict, stage: str | None = None) -> None:
        if record.get("event") == "start":
            self.totals[stage] = int(record.get("total_steps", 0))
            return
        if "step" not in record:
            return
        self.totals.setdefault(stage, 0)
        order = list(self.totals)
        step = sum(self.totals[s] for s in order[:order.index(stage)]) + int(record["step"])
        self.last_step = max(self.last_step, step)
        self._each("log", step_metrics(record, stage), step)

    def finish(self, ok: bool = True) -> None:
        """Send the comparison eval's scores (from run.json) and the reports, then close every tracker."""
        if not self.opened:
            return
        root = self.cfg.run_dir

        def fresh(path: Path) -> bool:  # written by this run, not left by an earlier run of the same name
            return path.is_file() and path.stat().st_mtime >= self.started

        summary = _read_json(root / "run.json").get("eval") if fresh(root / "run.json") else None
        if summary:
            self._each("scores", eval_scores(summary), self.last_step)
        files = [root / f for f in REPORT_FILES if fresh(root / f)]
        if files:
            self._each("artifacts", files, root)
        self._each("close", ok)
        self.backends, self.opened = [], False

    def _open(self) -> None:
        config_text = dump_config(self.cfg)
        self.opened = True  # set first: when a later tracker fails to open, finish() closes the earlier ones
        for name in self.names:
            backend = BACKENDS[name](self.cfg, config_text)
            self.backends.append(backend)
            self.console.print(f"[dim]{name}: {backend.describe()}[/dim]", highlight=False)
        for stage_dir, stage in self.pending:
            from .rundir import read_metrics

            for record in read_metrics(stage_dir):
                self.record(record, stage)
        self.pending = []

    def _each(self, method: str, *args: Any) -> None:
        for backend in list(self.backends):
            try:
                getattr(backend, method)(*args)
            except Exception as e:  # noqa: BLE001 - a tracker must not stop training
                if isinstance(e, TunesmithError):
                    raise
                self.backends.remove(backend)
                self.console.print(f"[yellow]warning:[/yellow] {backend.name} stopped reporting: "
                                   f"{type(e).__name__}: {e}", highlight=False)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}

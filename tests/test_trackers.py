"""train.report_to: each tracker's own reader gets back what metrics.jsonl holds, the config, the comparison
eval's scores and the reports (TensorBoard's event reader, the MLflow client on its file store, W&B's
`wandb leet inspect` on the offline run file, Trackio's SQLite storage)."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tunesmith.config import parse_config
from tunesmith.errors import TunesmithError
from tunesmith.model.device import Runtime
from tunesmith.train.rundir import RunDir, read_metrics
from tunesmith.train.trackers import Trackers, eval_scores, flat_config, metric_name, step_metrics

ROOT = Path(__file__).resolve().parents[1]
LABELS = ["card_arrival", "exchange_rate", "top_up_failed", "card_linking"]


def write_data(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hello world " * (1 + i % 3) + str(i)},
                          {"role": "assistant", "content": LABELS[i % 4]}]} for i in range(24)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:16]) + "\n")
    (tmp_path / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows[16:]) + "\n")


def tiny_config(tiny_dir, tmp_path, report_to, **train):
    write_data(tmp_path)
    return {"name": "trk", "model": str(tiny_dir), "output_dir": str(tmp_path / "runs"), "device": "cpu",
            "precision": "fp32", "data": {"train": str(tmp_path / "train.jsonl"), "eval_split": 0.25},
            "train": {"max_steps": 6, "micro_batch_size": 4, "lr": 1e-2, "eval_every": 3, "report_to": report_to,
                      **train},
            "eval": {"data": str(tmp_path / "test.jsonl"), "candidates": ["base", "tuned"], "metrics": ["exact"],
                     "max_new_tokens": 4}}


def tracker_env(tmp_path):
    """The defaults (no tracker variables of the user's), with the trackers' caches inside tmp_path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MLFLOW_", "TRACKIO_", "TENSORBOARD_"))}
    return {**env, "PYTHONPATH": str(ROOT / "src"), "TRACKIO_DIR": str(tmp_path / "trackio"),
            "WANDB_DATA_DIR": str(tmp_path / "wandb-data"), "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
            "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config")}


# ---------------------------------------------------------------- pure functions, hand-worked

def test_names_and_numbers_of_a_step_record():
    record = {"step": 3, "epoch": 0.75, "loss": 1.5, "grad_norm": 0.25, "lr": 1e-3, "tokens": 40, "skipped": True,
              "eval_loss": 2.0, "eval_rewards_margin": 0.5, "note": "text"}
    assert step_metrics(record) == {"train/epoch": 0.75, "train/loss": 1.5, "train/grad_norm": 0.25,
                                    "train/lr": 1e-3, "train/tokens": 40.0, "train/skipped": 1.0,
                                    "eval/loss": 2.0, "eval/rewards_margin": 0.5}
    assert metric_name("loss", "2-dpo") == "2-dpo/train/loss"
    assert metric_name("eval_loss", "2-dpo") == "2-dpo/eval/loss"


def test_eval_scores_from_the_run_summary():
    summary = {"scores": {"exact": {"base": {"mean": 0.1, "lo": 0.0, "hi": 0.3},
                                    "tuned": {"mean": 0.8, "lo": 0.6, "hi": 0.95}}},
               "pairs": [{"metric": "exact", "tuned": "tuned", "baseline": "base", "diff": 0.7, "lo": 0.5,
                          "hi": 0.9, "p": 0.001, "outcome": "win"}], "won": True}
    assert eval_scores(summary) == {
        "comparison/exact/base/mean": 0.1, "comparison/exact/base/lo": 0.0, "comparison/exact/base/hi": 0.3,
        "comparison/exact/tuned/mean": 0.8, "comparison/exact/tuned/lo": 0.6, "comparison/exact/tuned/hi": 0.95,
        "comparison/exact/tuned-vs-base/diff": 0.7, "comparison/exact/tuned-vs-base/p": 0.001,
        "comparison/won": 1.0}


def test_flat_config_has_dotted_keys():
    flat = flat_config(parse_config({"data": {"train": "t.jsonl"}, "train": {"lr": 3e-4, "report_to": "tensorboard"}}))
    assert flat["train.lr"] == 3e-4
    assert flat["train.report_to"] == '["tensorboard"]'  # the single-name shorthand became a list
    assert flat["adapter.kind"] == "lora" and flat["eval"] is None


class Recorder:
    """A tracker backend that remembers every call."""

    name = "recorder"

    def __init__(self, fail_on=None):
        self.calls, self.fail_on = [], fail_on

    def log(self, metrics, step):
        if self.fail_on == step:
            raise ConnectionError("tracker server went away")
        self.calls.append((step, metrics))

    def scores(self, scores, step):
        self.calls.append(("scores", step, scores))

    def artifacts(self, files, root):
        self.calls.append(("artifacts", [f.relative_to(root).as_posix() for f in files]))

    def close(self, ok):
        self.calls.append(("close", ok))

    def describe(self):
        return "in memory"


CPU = Runtime(torch.device("cpu"), "fp32")


def recording(tmp_path, monkeypatch, *backends):
    """Trackers whose tensorboard and mlflow backends are the given recorders."""
    from tunesmith.train import trackers as module

    names = ["tensorboard", "mlflow"][: len(backends)]
    for name, backend in zip(names, backends, strict=True):
        monkeypatch.setitem(module.BACKENDS, name, lambda cfg, text, b=backend: b)
    return Trackers(parse_config({"output_dir": str(tmp_path), "name": "x", "data": {"train": "t.jsonl"}, "train": {"report_to": names}}))


def test_stages_continue_the_step_axis_and_carry_their_name(tmp_path, monkeypatch):
    """A stage finished by an earlier, interrupted invocation is replayed first; the next stage's steps follow
    it, and a resumed stage's rewritten metrics.jsonl (start event, then its history) is mirrored as written."""
    rec = Recorder()
    trackers = recording(tmp_path, monkeypatch, rec)
    sft = RunDir(tmp_path / "x" / "stages" / "1-sft")
    sft.log({"event": "start", "total_steps": 3}, truncate=True)
    for s in (1, 2, 3):
        sft.log({"step": s, "loss": 1.0 / s})
    sft.close()
    trackers.finished_stage(sft.path, "1-sft")
    dpo = RunDir(tmp_path / "x" / "stages" / "2-dpo")
    trackers.attach(dpo, CPU, "2-dpo")
    dpo.log({"event": "start", "total_steps": 2}, truncate=True)
    dpo.log({"step": 1, "loss": 0.69, "rewards_margin": 0.0})
    dpo.log({"step": 2, "loss": 0.6, "rewards_margin": 0.2})
    (tmp_path / "x" / "report.md").write_text("# report")
    (tmp_path / "x" / "run.json").write_text(json.dumps({"eval": {"won": False}}))
    trackers.finish(ok=True)
    assert rec.calls == [(1, {"1-sft/train/loss": 1.0}), (2, {"1-sft/train/loss": 0.5}),
                         (3, {"1-sft/train/loss": 1 / 3}),
                         (4, {"2-dpo/train/loss": 0.69, "2-dpo/train/rewards_margin": 0.0}),
                         (5, {"2-dpo/train/loss": 0.6, "2-dpo/train/rewards_margin": 0.2}),
                         ("scores", 5, {"comparison/won": 0.0}), ("artifacts", ["report.md"]), ("close", True)]


def test_a_failing_tracker_is_switched_off_and_the_rest_goes_on(tmp_path, monkeypatch):
    """...and a run that fails sends no scores or reports that an earlier run of the same name left behind."""
    bad, good = Recorder(fail_on=2), Recorder()
    trackers = recording(tmp_path, monkeypatch, bad, good)
    run = RunDir(tmp_path / "x")
    for name, text in (("report.md", "# an earlier run's report"), ("run.json", '{"eval": {"won": true}}')):
        (run.path / name).write_text(text)
        os.utime(run.path / name, (time.time() - 3600, time.time() - 3600))  # left by an earlier run
    trackers.attach(run, CPU)
    for s in (1, 2, 3):
        run.log({"step": s, "loss": float(s)})
    with pytest.raises(KeyError):
        with trackers:  # an exception in training: the trackers still close, marked as failed
            raise KeyError("boom")
    assert bad.calls == [(1, {"train/loss": 1.0})]
    assert good.calls == [(1, {"train/loss": 1.0}), (2, {"train/loss": 2.0}), (3, {"train/loss": 3.0}),
                          ("close", False)]


def test_only_rank_zero_reports(tmp_path):
    cfg = parse_config({"output_dir": str(tmp_path), "name": "x", "data": {"train": "t.jsonl"}, "train": {"report_to": ["tensorboard"]}})
    trackers = Trackers(cfg)
    run = RunDir(tmp_path / "x", is_main=False)
    trackers.attach(run, Runtime(torch.device("cpu"), "fp32", rank=1, world_size=2))
    assert not trackers.opened and run.sinks == [] and not (tmp_path / "x" / "tensorboard").exists()


def test_a_missing_package_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` fail
    cfg = parse_config({"output_dir": str(tmp_path), "name": "x", "data": {"train": "t.jsonl"}, "train": {"report_to": "wandb"}})
    with pytest.raises(TunesmithError) as err:
        Trackers(cfg).attach(RunDir(tmp_path / "x"), CPU)
    assert "wandb" in err.value.message and "tunesmith[wandb]" in err.value.hint


def test_unknown_tracker_is_a_config_error():
    from tunesmith.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        parse_config({"data": {"train": "t.jsonl"}, "train": {"report_to": ["tensorbored"]}})
    assert "train.report_to" in str(err.value)


# ---------------------------------------------------------------- round trips through each library's reader

@pytest.fixture(scope="module")
def tracked_run(tiny_dir, tmp_path_factory):
    """One short run through the CLI that reports to all four trackers (a subprocess, so that trackio reads
    TRACKIO_DIR at import and W&B's service starts and stops with it)."""
    tmp = tmp_path_factory.mktemp("tracked")
    cfg = tiny_config(tiny_dir, tmp, ["tensorboard", "mlflow", "wandb", "trackio"])
    (tmp / "config.yaml").write_text(yaml.safe_dump(cfg))
    done = subprocess.run([sys.executable, "-m", "tunesmith", "train", str(tmp / "config.yaml"), "--no-progress"],
                          capture_output=True, text=True, timeout=900, env=tracker_env(tmp), cwd=tmp)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp / "runs" / "trk"
    steps = [r for r in read_metrics(run) if "step" in r]
    info = json.loads((run / "run.json").read_text())
    assert len(steps) == 6 and "eval_loss" in steps[2] and info["eval"]["scores"]
    return tmp, run, steps, info, done.stderr


def expected_series(steps):
    """metric name -> [(step, value)] as metrics.jsonl has them."""
    out = {}
    for r in steps:
        for name, value in step_metrics(r).items():
            out.setdefault(name, []).append((r["step"], value))
    return out


def close(a, b, rel=0.0):
    return all(s1 == s2 and (v1 == v2 or math.isclose(v1, v2, rel_tol=rel)) for (s1, v1), (s2, v2)
               in zip(a, b, strict=True))


def test_tensorboard_round_trip(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util.tensor_util import make_ndarray

    _, run, steps, info, _ = tracked_run
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    want = expected_series(steps)
    for name, series in want.items():
        got = [(e.step, e.value) for e in acc.Scalars(name)]
        assert close(got, series, rel=1e-6), name  # TensorBoard stores float32
    for name, value in eval_scores(info["eval"]).items():
        assert [(e.step, e.value) for e in acc.Scalars(name)] == [(6, pytest.approx(value, rel=1e-6))]
    texts = {tag: make_ndarray(acc.Tensors(tag)[0].tensor_proto)[0].decode() for tag in acc.Tags()["tensors"]}
    assert "lr: 0.01" in texts["config/text_summary"]
    assert texts["report.md/text_summary"] == (run / "report.md").read_text()
    assert texts["eval/report.md/text_summary"] == (run / "eval" / "report.md").read_text()


def test_mlflow_round_trip(tracked_run, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    _, run, steps, info, _ = tracked_run
    client = MlflowClient((run.parent / "mlruns").as_uri())
    exp = client.get_experiment_by_name("tunesmith")
    (found,) = client.search_runs([exp.experiment_id])
    assert found.info.run_name == "trk" and found.info.status == "FINISHED"
    for name, series in expected_series(steps).items():
        got = sorted((m.step, m.value) for m in client.get_metric_history(found.info.run_id, name))
        assert close(got, series), name
    for name, value in eval_scores(info["eval"]).items():
        assert [(m.step, m.value) for m in client.get_metric_history(found.info.run_id, name)] == [(6, value)]
    assert found.data.params["train.lr"] == "0.01" and found.data.params["train.max_steps"] == "6"
    listed = {a.path for a in client.list_artifacts(found.info.run_id, "report")}
    assert {"report/config.yaml", "report/report.md", "report/report.html", "report/eval"} <= listed
    local = client.download_artifacts(found.info.run_id, "report/eval/results.json", str(run.parent))
    assert json.loads(Path(local).read_text()) == json.loads((run / "eval" / "results.json").read_text())


def test_wandb_offline_round_trip(tracked_run):
    tmp, run, steps, info, stderr = tracked_run
    (wandb_file,) = run.glob("wandb/offline-run-*/run-*.wandb")
    wandb_cli = Path(sys.executable).with_name("wandb")
    out = subprocess.run([str(wandb_cli), "leet", "inspect", "--json", str(wandb_file)], capture_output=True,
                         text=True, timeout=120, env=tracker_env(tmp))
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    history = {int(r["history"]["step"]["num"]): r["history"]["item"] for r in records if r["type"] == "history"}
    for name, series in expected_series(steps).items():
        got = [(s, history[s][name]) for s, _ in series]
        assert close(got, series), name
    scores = eval_scores(info["eval"])
    summary = {}
    for r in records:
        if r["type"] == "summary":
            summary.update(r["summary"].get("update", {}))
    assert {k: summary[k] for k in scores} == scores
    (run_record,) = [r["run"] for r in records if r["type"] == "run"]
    assert run_record["display_name"] == "trk" and run_record["project"] == "tunesmith"
    assert run_record["config"]["update"]["train"]["lr"] == 0.01
    (artifact,) = [r["artifact"] for r in records if r["type"] == "artifact"]
    assert artifact["type"] == "report"
    paths = {c["path"] for c in artifact["manifest"]["contents"]}
    assert {"config.yaml", "report.md", "report.html", "eval/report.md", "eval/results.json"} <= paths
    assert "wandb sync" in stderr  # the console says how to upload the offline run


def test_trackio_round_trip(tracked_run, monkeypatch):
    import trackio.sqlite_storage as storage

    tmp, run, steps, info, _ = tracked_run
    monkeypatch.setattr(storage, "TRACKIO_DIR", tmp / "trackio")  # where the training process wrote
    logs = storage.SQLiteStorage.get_logs("tunesmith", "trk")
    by_step = {}
    for row in logs:
        by_step.setdefault(row["step"], {}).update(row)
    for name, series in expected_series(steps).items():
        got = [(s, by_step[s][name]) for s, _ in series]
        assert close(got, series), name
    for name, value in eval_scores(info["eval"]).items():
        assert by_step[6][name] == value
    config = storage.SQLiteStorage.get_run_config("tunesmith", "trk")
    assert config["train.lr"] == 0.01 and config["name"] == "trk"
    (artifact,) = storage.SQLiteStorage.get_artifacts("tunesmith")
    assert artifact["name"] == "trk-report" and artifact["type"] == "report" and artifact["size_bytes"] > 0


DRIVER = """
import os, signal, sys
sys.path[:0] = [{src!r}]
from tunesmith.cli import main
from tunesmith.train import loop
orig = loop.Trainer.train_step
def train_step(self):
    if self.state.step == int(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGKILL)
    return orig(self)
loop.Trainer.train_step = train_step
sys.exit(main(["train", sys.argv[1], "--no-progress", "--no-eval"] + sys.argv[3:]))
"""


def test_tensorboard_after_kill_and_resume_matches_metrics_jsonl(tiny_dir, tmp_path):
    """Killed after step 4 with a checkpoint at step 2, resumed: the event files show each step once, with
    the values metrics.jsonl ends up with (the run's earlier points are purged, as metrics.jsonl is rewritten)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_config(tiny_dir, tmp_path, ["tensorboard"], save_every=2)
    cfg.pop("eval")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(src=str(ROOT / "src")))
    env = tracker_env(tmp_path)
    killed = subprocess.run([sys.executable, str(driver), str(tmp_path / "config.yaml"), "4"], env=env,
                            capture_output=True, text=True, timeout=900)
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = subprocess.run([sys.executable, str(driver), str(tmp_path / "config.yaml"), "-1", "--resume", "auto"],
                             env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr
    run = tmp_path / "runs" / "trk"
    steps = [r for r in read_metrics(run) if "step" in r]
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    for name, series in expected_series(steps).items():
        assert close([(e.step, e.value) for e in acc.Scalars(name)], series, rel=1e-6), name

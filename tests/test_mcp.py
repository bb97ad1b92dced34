"""`tunesmith mcp`, driven by the MCP SDK's own client over stdio: list the tools and call each of them on a
tiny model."""

import json
import os
import signal
import sys
import time
from pathlib import Path

import anyio
import yaml
from mcp import Client, StdioServerParameters

ROOT = Path(__file__).resolve().parents[1]
LABELS = ["card_arrival", "exchange_rate", "top_up_failed", "card_linking"]
TOOLS = {"data_check", "plan", "train", "train_status", "train_stop", "jobs", "evaluate", "export"}


def workspace(tiny_dir, tmp_path, max_steps=4, name="mcp-run"):
    rows = [{"messages": [{"role": "user", "content": "hello world " * (1 + i % 3) + str(i)},
                          {"role": "assistant", "content": LABELS[i % 4]}]} for i in range(16)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:12] + rows[:1]) + "\n")
    (tmp_path / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows[12:]) + "\n")
    cfg = {"name": name, "model": str(tiny_dir), "device": "cpu", "precision": "fp32",
           "data": {"train": "train.jsonl"},
           "train": {"max_steps": max_steps, "micro_batch_size": 4, "lr": 1e-2, "save_every": 2},
           "eval": {"data": "test.jsonl", "candidates": ["base", "tuned"], "max_new_tokens": 3}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))


def server(cwd):
    env = {"PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    if "TUNESMITH_CACHE" in os.environ:
        env["TUNESMITH_CACHE"] = os.environ["TUNESMITH_CACHE"]
    return Client(StdioServerParameters(command=sys.executable, args=["-m", "tunesmith", "mcp"], env=env,
                                        cwd=str(cwd)), read_timeout_seconds=900)


async def call(client, tool, **args):
    result = await client.call_tool(tool, args)
    if result.is_error:
        return "error", result.content[0].text
    return "ok", result.structured_content


async def wait_for(client, job, states, timeout=900):  # generous: CI machines are shared
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, status = await call(client, "train_status", job=job)
        if status["state"] in states:
            return status
        await anyio.sleep(0.5)
    raise AssertionError(f"job {job} did not reach {states}: {status}")


def test_a_client_checks_trains_evaluates_and_exports(tiny_dir, tmp_path):
    workspace(tiny_dir, tmp_path)

    async def scenario():
        async with server(tmp_path) as client:
            listed = await client.list_tools()
            assert {t.name for t in listed.tools} == TOOLS
            assert all(t.description for t in listed.tools)

            kind, report = await call(client, "data_check", data="train.jsonl")
            assert kind == "ok" and report["examples"] == 13 and report["error_count"] == 0
            assert any(f["code"] == "exact_duplicates" for f in report["findings"]), report["findings"]

            kind, planned = await call(client, "plan", config="config.yaml")
            assert kind == "ok" and planned["fits"] is True and planned["device"] == "cpu", planned
            assert planned["data"]["steps"] == 4 and planned["verdict"] in planned["text"]
            kind, text = await call(client, "plan", config="config.yaml", nproc=0)
            assert kind == "error" and "at least one process" in text and "hint:" in text

            kind, text = await call(client, "train", config="config.yaml", overrides=["train.lr=-1"])
            assert kind == "error" and "train.lr" in text  # the config's problem, before any job starts

            kind, started = await call(client, "train", config="config.yaml")
            assert kind == "ok" and started["state"] == "running", started
            done = await wait_for(client, started["job"], {"finished", "failed"})
            assert done["state"] == "finished", done
            assert done["step"] == done["total_steps"] == 4 and done["exit_code"] == 0
            assert done["last"]["loss"] > 0 and done["eval"]["scores"]["exact"]["tuned"]["mean"] >= 0
            run = tmp_path / "runs" / "mcp-run"
            assert Path(done["run"]) == run and (run / "adapter" / "adapter_model.safetensors").exists()
            kind, listed_jobs = await call(client, "jobs")
            assert [j["job"] for j in listed_jobs["result"]] == [started["job"]]

            kind, summary = await call(client, "evaluate", data="test.jsonl", candidates=["base", "runs/mcp-run"],
                                       metrics=["exact", "loss"], max_new_tokens=3, settings={"batch_size": 2})
            assert kind == "ok" and summary["n"] == 4, summary
            assert set(summary["scores"]) == {"exact", "loss"} and summary["verdicts"]
            kind, text = await call(client, "evaluate", data="test.jsonl", settings={"batch_sise": 2})
            assert kind == "error" and "eval.batch_sise" in text  # settings reach the eval's config check
            on_disk = json.loads((run / "run.json").read_text())["eval"]["scores"]["exact"]
            assert summary["scores"]["exact"]["base"] == on_disk["base"]  # the same eval, two ways

            kind, exported = await call(client, "export", run="runs/mcp-run", format="peft")
            assert kind == "ok", exported
            assert Path(exported["path"]) == run / "export" / "peft"
            assert (run / "export" / "peft" / "adapter_config.json").exists() and exported["commands"]

            kind, text = await call(client, "export", run="runs/mcp-run", format="onnx")
            assert kind == "error" and "unknown export format" in text and "hint:" in text

    anyio.run(scenario)


def test_a_stopped_job_resumes_and_a_closing_server_stops_its_jobs(tiny_dir, tmp_path):
    workspace(tiny_dir, tmp_path, max_steps=3000)  # never reached: both jobs are stopped early

    async def scenario():
        async with server(tmp_path) as client:
            _, started = await call(client, "train", config="config.yaml", overrides=["eval=null"])
            job = started["job"]
            deadline = time.monotonic() + 900
            while (await call(client, "train_status", job=job))[1]["step"] < 2:
                assert time.monotonic() < deadline
                await anyio.sleep(0.3)
            kind, _ = await call(client, "train_stop", job=job)
            stopped = await wait_for(client, job, {"stopped", "failed", "finished"})
            assert stopped["state"] == "stopped" and stopped["exit_code"] == 75, stopped
            assert any("--resume auto" in line for line in stopped["log_tail"])
            kind, text = await call(client, "train_status", job="nope")
            assert kind == "error" and job in text

            _, resumed = await call(client, "train", config="config.yaml", overrides=["eval=null"], resume="auto")
            while True:  # until the resumed job trains steps the first one did not
                _, status = await call(client, "train_status", job=resumed["job"])
                assert status["state"] == "running", status
                if status["step"] > stopped["step"]:
                    break
                await anyio.sleep(0.3)
            return stopped, resumed
        # leaving the block closes the server while the resumed job trains

    stopped, resumed = anyio.run(scenario)
    run = tmp_path / "runs" / "mcp-run"
    log = Path(resumed["log"]).read_text()
    assert "resumed from" in log and f"step {stopped['step']}" in log
    deadline = time.monotonic() + 900
    while "stopped by signal" not in Path(resumed["log"]).read_text():  # the server stopped it on shutdown
        if time.monotonic() > deadline:  # the job outlives the server by design: do not leave it training
            os.kill(resumed["pid"], signal.SIGKILL)
            raise AssertionError(Path(resumed["log"]).read_text()[-2000:])
        time.sleep(0.3)
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step-"))

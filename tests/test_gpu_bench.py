"""bench/gpu: the prepared GPU run's CPU dry run (every step that can run without CUDA, tiny model, the varlen
path through the reference kernel), its bounded search, and the wheel slimming of `make gpu-wheels`."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench" / "gpu"))

from fit import bounded_search  # noqa: E402
from publish import publish  # noqa: E402
from wheels import SLIM, slim_wheel  # noqa: E402


def _search(limit, lo=1024, hi=65536, probes=8):
    calls = []
    found = bounded_search(lambda n: calls.append(n) or n <= limit, lo, hi, probes)
    return found, calls


def test_bounded_search_doubles_then_bisects():
    found, calls = _search(5000)
    assert calls == [1024, 2048, 4096, 8192, 6144, 5120] and found["largest"] == 4096
    assert found["first_failure"] == 5120
    found, calls = _search(40000, probes=5)  # out of probes while bisecting: the best length proven so far
    assert calls == [1024, 2048, 4096, 8192, 16384] and found["largest"] == 16384 and found["first_failure"] is None


def test_bounded_search_edges():
    found, calls = _search(10**9)
    assert found["largest"] == 65536 and found["first_failure"] is None and calls[-1] == 65536
    found, calls = _search(100)
    assert found["largest"] is None and calls == [1024]
    found, _ = _search(30000, hi=24576)  # hi is not a power-of-two multiple of lo: it is probed itself
    assert found["largest"] == 24576


def test_slim_wheel_drops_the_other_cuda_libraries_and_rewrites_record(tmp_path):
    wheel = tmp_path / "bnb-1.0-py3-none-any.whl"
    members = {"bnb/__init__.py": b"x = 1\n", "bnb/libbnb_cpu.so": b"c" * 100, "bnb/libbnb_cuda130.so": b"a" * 100,
               "bnb/libbnb_cuda128.so": b"b" * 5000, "bnb-1.0.dist-info/METADATA": b"Name: bnb\n"}
    with zipfile.ZipFile(wheel, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
        z.writestr("bnb-1.0.dist-info/RECORD", "".join(f"{n},sha256=x,{len(d)}\n" for n, d in members.items()))
    slim_wheel(wheel, re.compile(r"libbnb_(cpu|cuda130)\.so$"), re.compile(r"libbnb_\w+\.so$"))
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        record = z.read("bnb-1.0.dist-info/RECORD").decode().splitlines()
    assert "bnb/libbnb_cuda128.so" not in names and {"bnb/libbnb_cpu.so", "bnb/libbnb_cuda130.so"} <= names
    listed = {line.split(",")[0] for line in record}
    assert listed == names and all(",sha256=" in line for line in record if not line.endswith("RECORD,,"))


def test_trimmed_pyarrow_and_pandas_still_serve_datasets(tmp_path):
    """The parts `make gpu-wheels` leaves out of pyarrow and pandas: the installed packages without them, in a
    folder named site-packages ahead of the real ones, still let datasets build, map and hash a dataset."""
    import pandas
    import pyarrow

    site = tmp_path / "site-packages"
    dropped = []
    for module in (pyarrow, pandas):
        root = Path(module.__file__).parent
        drop = next(pattern for prefix, pattern in SLIM if prefix == root.name + "-")
        for f in root.rglob("*"):
            rel = f"{root.name}/{f.relative_to(root).as_posix()}"
            if f.is_dir() or "__pycache__" in rel:
                continue
            if drop.search(rel):
                dropped.append(rel)
                continue
            (site / rel).parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(f, site / rel)  # $ORIGIN of a hard link is the new folder: no fallback to the real one
            except OSError:
                shutil.copy2(f, site / rel)
    assert any("libarrow_flight" in d for d in dropped) and any("libarrow_s3" in d for d in dropped)
    assert any(d.startswith("pandas/tests/") for d in dropped)
    code = ("import datasets, pandas, pyarrow, pyarrow.parquet, pyarrow.dataset, pyarrow.fs\n"
            f"assert pyarrow.__file__.startswith({str(site)!r}) and pandas.__file__.startswith({str(site)!r})\n"
            "ds = datasets.Dataset.from_list([{'a': [1, 2, 3]}, {'a': [4]}]).map(lambda r: {'n': len(r['a'])})\n"
            "assert ds['n'] == [3, 1] and ds.to_pandas().shape == (2, 2) and ds._fingerprint\n"
            "print('served')\n")
    env = {**os.environ, "PYTHONPATH": str(site), "HF_DATASETS_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0 and "served" in proc.stdout, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-dry")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu" / "run.py"), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=env)
    records = {r["step"]: r for r in json.loads((out / "results.json").read_text())}
    return proc, records, out


def test_dry_run_passes_every_step_it_can_run_on_a_cpu(dry_run):
    proc, steps, out = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    skipped = {name for name, r in steps.items() if r["status"].startswith("skipped")}
    assert skipped == {"speed:sft:tunesmith-compile"}, {n: steps[n]["status"] for n in skipped}
    assert all(r["status"] == "ok" for n, r in steps.items() if n not in skipped)
    assert (out / "results.md").read_text().count("## ") == len(steps)


def test_dry_run_checks_the_varlen_path_and_the_rest_of_correctness(dry_run):
    checks = dry_run[1]["correctness"]["checks"]
    varlen = checks["varlen"]
    assert varlen["kernel"] == "reference" and varlen["ok"]
    for layout in ("packed", "shared"):
        r = varlen[layout]
        assert r["kernels_used"] == {"reference": 1}
        assert r["max_logp_diff_per_token"] < 1e-4 < r["leak_logp_diff_per_token"]
    assert abs(checks["dpo_step0_ln2"]["loss"] - 0.693147) < 1e-4
    assert checks["resume_bit_identical"]["bit_identical"]
    assert checks["qlora_step"]["ok"] and checks["optimizers"]["ok"]
    assert "need CUDA" in checks["liger_head"]["skipped"]


def test_dry_run_speed_fit_and_imports(dry_run):
    steps = dry_run[1]
    assert steps["imports"]["imported_before_baselines"] == []  # tunesmith's path needs none of them
    for name in ("speed:sft:tunesmith", "speed:dpo:tunesmith", "speed:sft:hf", "speed:sft:trl", "speed:dpo:trl"):
        assert steps[name]["tokens_per_s"] > 0 and steps[name]["mfu"] > 0, name
    assert steps["speed:sft:tunesmith-sdpa"]["attention"]["batches"] == {"sdpa": 4}  # 3 steps, check_head
    assert "| tunesmith |" in steps["summary"]["table"] and "vs trl" in steps["summary"]["table"]
    for kind in ("lora", "qlora"):
        assert steps[f"fit:{kind}"]["largest_fitting_length"] == 256


def test_publish_replaces_the_gpu_section_of_the_benchmarks_page(dry_run, tmp_path):
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# Benchmarks\n\n## Memory\n\nkept\n\n## On a GPU\n\nNot measured yet.\n\n## Later\n\nkept too\n")
    for _ in range(2):
        publish(dry_run[2] / "results.json", doc, date="2030-01-01")
    text = doc.read_text()
    assert text.count("## On a GPU") == 1 and "Not measured yet" not in text and text.count("kept") == 2
    assert "2030-01-01" in text and "- dpo_step0_ln2: ok (loss 0.693147)" in text and "| tunesmith |" in text
    assert "`tunesmith plan` against the measured peak" in text and "| sft:tunesmith |" in text


def test_dry_run_compares_the_plan_with_what_the_runs_measured(dry_run):
    planner = dry_run[1]["planner"]
    rows = {r["run"]: r for r in planner["rows"]}
    for name in ("sft:tunesmith", "sft:tunesmith-sdpa", "dpo:tunesmith", "dpo:tunesmith-sdpa"):
        row = rows[name]  # on a CPU the plan and the run both speak of the process's peak RSS
        assert row["measured"] == "peak RSS" and row["predicted_mib"] > 100 and row["measured_mib"] > 100
        assert row["error"] == pytest.approx((row["predicted_mib"] - row["measured_mib"]) / row["measured_mib"])
    fits = [r for r in rows.values() if r["run"].startswith("fit:")]
    assert {r["run"] for r in fits} >= {"fit:lora 256 tokens", "fit:qlora 256 tokens"}
    assert all(r["predicted_mib"] > 0 and r["error"] is None for r in fits)  # no CUDA peak to compare on a CPU
    # the prediction grows with the sequence
    lora = sorted((int(r["run"].split()[1]), r["predicted_mib"]) for r in fits if r["run"].startswith("fit:lora "))
    assert [p for _, p in lora] == sorted(p for _, p in lora) and lora[0][1] < lora[-1][1]
    assert "| sft:tunesmith |" in planner["table"]


def test_the_shipped_tokenizer_is_unpacked_from_its_gzipped_json(tmp_path, monkeypatch):
    import gzip

    import models

    from tiny import build_tokenizer

    original = build_tokenizer(tmp_path / "original")
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    for f in (tmp_path / "original").iterdir():
        if f.name == "tokenizer.json":
            (shipped / "tokenizer.json.gz").write_bytes(gzip.compress(f.read_bytes()))
        else:
            (shipped / f.name).write_bytes(f.read_bytes())
    monkeypatch.setattr(models, "SHIPPED_TOKENIZER", shipped)
    tok = models.tokenizer_dir(tmp_path / "out")
    text = "hello world, what is my exchange rate?"
    assert tok.encode(text) == original.encode(text) and len(tok) == len(original)

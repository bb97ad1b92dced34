"""`make gpu-wheels`: on a CPU machine with PyPI, download the Python 3.12 manylinux wheels the GPU run needs
and the lent machine lacks (it has torch, transformers, peft, accelerate, triton, tensorboard), into .whl/
(ignored by git; it travels with the tree), and print their total size against what may travel.

bitsandbytes ships one CUDA library per CUDA release (43 MB in all); only the one for the machine's CUDA
(`--cuda`, default 13.0) and the CPU one are kept. The default model's tokenizer is copied to .whl/tokenizer
when a tunesmith cache holds it, gzipped (the GPU run trains a tokenizer of its own otherwise).

TRL (the speed steps' baseline) needs datasets, which needs pyarrow and pandas: 67 MiB of wheels as published,
more than may travel. They are cut to what datasets loads: pyarrow without its Flight and S3 libraries, headers
and tests, pandas without its tests (about 45 MiB together). When they still do not fit beside the rest, they
are left out and the GPU run's TRL steps say "skipped" (`--no-trl` leaves them out in any case).
`--extra NAME==VER ...` adds packages.

    python bench/gpu/wheels.py [--cuda 13.0] [--no-trl] [--extra NAME==VER ...] [--dest .whl]
"""

from __future__ import annotations

import argparse
import base64
import gzip
import hashlib
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BUDGET_MIB = 64
MARGIN_MIB = 1.5  # untracked files and what the copy adds beside the tracked tree and the wheels
WHEELS = [  # what tunesmith's training path imports beyond the machine's packages, and the GPU steps' extras
    "pydantic==2.14.4", "pydantic-core==2.50.5", "annotated-types==0.8.0", "typing-inspection==0.4.5",
    "typing-extensions==4.15.0", "rich==15.0.0", "markdown-it-py==4.3.0", "mdurl==0.1.2", "pygments==2.21.0",
    "bitsandbytes==0.50.2", "liger-kernel==0.8.5",
]
# TRL and what it and datasets import beyond the GPU machine's packages (torch brings jinja2, filelock and fsspec;
# transformers huggingface_hub, numpy, pyyaml, tqdm; accelerate psutil)
TRL_WHEELS = ["trl==1.16.0", "datasets==5.2.0", "pyarrow==26.0.1", "pandas==3.1.1", "dill==0.4.1",
              "multiprocess==0.70.19", "xxhash==4.1.0", "python-dateutil==2.9.0.post0", "six==1.17.0"]
# (wheel name prefix, members to drop): the parts of pyarrow and pandas that neither datasets nor TRL loads
SLIM = [("pyarrow-", re.compile(r"^pyarrow/(libarrow_flight|libarrow_s3|libarrow_python_flight|_flight|_s3fs|"
                                r"_pyarrow_cpp_tests|libarrow_python\.so$|libarrow_python\.so\.\d+\.\d+\.\d+$|"
                                r"include/|src/|tests/)")),
        ("pandas-", re.compile(r"^pandas/tests/"))]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]


def download(spec: str, dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(dest), spec]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def slim_wheel(wheel: Path, keep: re.Pattern, drop: re.Pattern) -> int:
    """Rewrite `wheel` without the members matching `drop` (unless they match `keep`), its RECORD updated to
    match; returns the bytes saved."""
    before = wheel.stat().st_size
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        kept = [i for i in src.infolist() if keep.search(i.filename) or not drop.search(i.filename)]
        record = next(i for i in kept if i.filename.endswith(".dist-info/RECORD"))
        lines = []
        for info in kept:
            if info is record:
                continue
            data = src.read(info)
            dst.writestr(info, data)
            lines.append(_record_line(info.filename, data))
        lines.append(f"{record.filename},,")
        dst.writestr(record, "\n".join(lines) + "\n")
    os.replace(tmp, wheel)
    return before - wheel.stat().st_size


def find_tokenizer() -> Path | None:
    roots = [os.environ.get("TUNESMITH_CACHE"), ROOT / ".cache" / "tunesmith", Path.home() / ".cache" / "tunesmith"]
    for root in filter(None, roots):
        for found in sorted(Path(root).glob("models/SmolLM2-135M-Instruct*/tokenizer.json")):
            return found.parent
    return None


def tree_mib() -> float:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True).stdout.split("\0")
    return sum((ROOT / f).stat().st_size for f in files if f and (ROOT / f).is_file()) / 2**20


def add_trl(dest: Path, room_mib: float) -> float:
    """Download TRL and the packages datasets needs into dest/trl-staging, cut pyarrow and pandas down, and move
    them into `dest` when they fit in `room_mib`; returns the MiB added (0 when they do not fit)."""
    staging = dest / "trl-staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    for spec in TRL_WHEELS:
        download(spec, staging)
    for prefix, drop in SLIM:
        for wheel in staging.glob(f"{prefix}*.whl"):
            saved = slim_wheel(wheel, re.compile(r"(?!)"), drop)
            print(f"{wheel.name}: {saved / 2**20:.1f} MiB of parts datasets does not load left out")
    size = sum(p.stat().st_size for p in staging.glob("*.whl")) / 2**20
    if size > room_mib:
        print(f"TRL and datasets: {size:.1f} MiB, {room_mib:.1f} MiB left: left out (the TRL steps will be skipped)")
        shutil.rmtree(staging)
        return 0.0
    for wheel in staging.glob("*.whl"):
        os.replace(wheel, dest / wheel.name)
    staging.rmdir()
    return size


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dest", default=str(ROOT / ".whl"))
    ap.add_argument("--cuda", default="13.0", help="the GPU machine's CUDA (torch.version.cuda)")
    ap.add_argument("--no-trl", action="store_true", help="leave out TRL and datasets (the TRL steps are skipped)")
    ap.add_argument("--extra", nargs="*", default=[], help="more NAME==VERSION wheels")
    args = ap.parse_args(argv)
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    trl_names = tuple(re.split(r"[=<>]", spec)[0].replace("-", "_").lower() + "-" for spec in TRL_WHEELS)
    for old in dest.glob("*.whl"):  # a set from an earlier call: decided again below
        if old.name.lower().startswith(trl_names):
            old.unlink()
    for spec in WHEELS + args.extra:
        download(spec, dest)
    cuda = args.cuda.replace(".", "")
    for wheel in dest.glob("bitsandbytes-*.whl"):
        saved = slim_wheel(wheel, re.compile(rf"libbitsandbytes_(cpu|cuda{cuda})\.so$"),
                           re.compile(r"libbitsandbytes_\w+\.so$"))
        print(f"{wheel.name}: kept the CPU and CUDA {args.cuda} libraries ({saved / 2**20:.1f} MiB less)")
    tok = find_tokenizer()
    if tok is not None:
        (dest / "tokenizer").mkdir(exist_ok=True)
        for name in ("tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
            if (tok / name).exists():
                shutil.copy(tok / name, dest / "tokenizer" / name)
        with open(tok / "tokenizer.json", "rb") as src, gzip.open(dest / "tokenizer" / "tokenizer.json.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)  # 3.4 MiB as JSON, under 1 MiB compressed
        (dest / "tokenizer" / "tokenizer.json").unlink(missing_ok=True)
    else:
        print("no SmolLM2 tokenizer in a tunesmith cache (run `make demo` once); the GPU run will train its own")
    tree = tree_mib()
    if not args.no_trl:
        add_trl(dest, BUDGET_MIB - MARGIN_MIB - tree - _mib(dest))
    total = _mib(dest)
    for p in sorted(dest.glob("*.whl")):
        print(f"  {p.stat().st_size / 2**20:6.1f} MiB  {p.name}")
    print(f"{dest}: {total:.1f} MiB; with the tracked tree ({tree:.1f} MiB): {total + tree:.1f} of {BUDGET_MIB} MiB")
    return 0 if total + tree <= BUDGET_MIB else 1


def _mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


if __name__ == "__main__":
    sys.exit(main())

"""glibc allocator settings (model/allocator.py): freed activation-sized buffers stay in the process, so a
loop that frees and reallocates them stops page-faulting them in again."""

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")

PROBE = """
import resource, torch
from tunesmith.model.allocator import keep_freed_memory
on = keep_freed_memory()
sizes = [(k * 7919) % 24 + 1 for k in range(40)]  # 1 to 24 MiB, mixed, like a step's activations


def step():
    live = [torch.ones(s * 2**18) for s in sizes]
    del live


step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(on, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def probe(env_value: str | None) -> tuple[bool, int]:
    import os

    env = {k: v for k, v in os.environ.items() if k != "TUNESMITH_MALLOC"}
    if env_value:
        env["TUNESMITH_MALLOC"] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, check=True)
    on, faults = out.stdout.split()
    return on == "True", int(faults)


def test_freed_buffers_are_reused_without_page_faults():
    on, faults = probe(None)
    off, faults_default = probe("default")
    assert on and not off
    pages_per_step = sum((k * 7919) % 24 + 1 for k in range(40)) * 2**20 // 4096
    assert faults < pages_per_step // 20  # kept: reused without faulting
    assert faults_default > 10 * faults  # glibc's defaults: freed buffers go back and fault in again

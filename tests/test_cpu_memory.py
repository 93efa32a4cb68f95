"""deeparch_kernels.keep_freed_memory: glibc's malloc keeps freed blocks, so reallocating them
takes no page faults. Process-wide and permanent, so each effect is checked in a fresh process."""
import platform
import subprocess
import sys
from pathlib import Path

import pytest

import deeparch_kernels as dk
from deeparch_kernels import cpu_memory

ROOT = Path(__file__).resolve().parents[1]
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# A 40 MiB tensor allocated, written and freed, again and again: above glibc's largest dynamic
# mmap threshold (32 MiB), so each one is a fresh mapping that faults on every page it touches,
# unless keep_freed_memory has it served from (and kept on) the heap.
_FAULTS = """
import resource, sys, torch
import deeparch_kernels as dk
torch.set_num_threads(1)
if sys.argv[1] == "keep":
    assert dk.keep_freed_memory() is True
    assert dk.cpu_memory.kept_freed_memory() == dk.cpu_memory.DEFAULT_LIMIT
def step():
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(40 << 18).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
# The first few blocks can land in new places while the heap settles (each such step faults its
# 10,240 pages once); the median step shows the steady state.
faults = sorted(step() for _ in range(11))
print(faults[5])
"""


def _faults_per_step(mode: str) -> float:
    p = subprocess.run([sys.executable, "-c", _FAULTS, mode], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    return float(p.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_freed_blocks_are_reused_without_page_faults():
    pages = (40 << 20) // 4096
    assert _faults_per_step("system") > pages / 2  # the default: a fresh mapping each time
    assert _faults_per_step("keep") < 16  # kept: the same pages again


@pytest.mark.parametrize("limit", [0, 1000, (1 << 20) - 1, 2**31, -5, 1.5e9, True, "1G", None])
def test_bad_limit_is_refused_naming_it(limit):
    with pytest.raises(ValueError, match="keep_freed_memory: limit must be an int of bytes"):
        dk.keep_freed_memory(limit)


def test_not_glibc_changes_nothing(monkeypatch):
    monkeypatch.setattr(cpu_memory, "_mallopt", lambda: None)
    monkeypatch.setattr(cpu_memory, "_kept", None)
    assert dk.keep_freed_memory() is False
    assert cpu_memory.kept_freed_memory() is None


def test_refusal_by_mallopt_is_an_error(monkeypatch):
    monkeypatch.setattr(cpu_memory, "_mallopt", lambda: (lambda param, value: 0))
    monkeypatch.setattr(cpu_memory, "_kept", None)
    with pytest.raises(RuntimeError, match="mallopt refused"):
        dk.keep_freed_memory(1 << 24)
    assert cpu_memory.kept_freed_memory() is None

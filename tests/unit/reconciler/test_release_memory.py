"""`reconciler.loop.release_free_memory`: what a first push frees (a hundred proxies' ~2 MB responses,
taken from glibc's heap) goes back to the system once pushes settle, not kept as holes in the heap."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = r"""
import gc, sys
from reconciler.loop import GcSettler, release_free_memory

def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))

now = [0.0]
settle = GcSettler(clock=lambda: now[0])
settle()  # the first settle is the full pass: what follows is a light one
big = bytearray(4 << 20)  # mapped, then freed: glibc's mmap threshold rises to 4 MiB, as after a push
del big
blocks = [bytearray(1 << 20) for _ in range(64)]  # 64 responses of 1 MiB, now from the heap
keep = blocks[-1]  # the last one lives on: the heap's top is in use, so free() alone trims nothing
del blocks
before = rss_mb()
if sys.argv[1] == "release":
    assert release_free_memory()
elif sys.argv[1] == "settle":
    now[0] += 10
    assert settle() is False  # a light pass
gc.unfreeze()
print(before - rss_mb())
"""


def given_back_mb(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=60, check=True)
    return float(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_what_a_push_freed_is_given_back_once_pushes_settle() -> None:
    assert given_back_mb("keep") < 8  # free() alone: the holes stay in the process
    assert given_back_mb("release") > 48  # malloc_trim: the 63 freed MiB go back
    assert given_back_mb("settle") > 48  # and the settle after every push (its light pass) calls it

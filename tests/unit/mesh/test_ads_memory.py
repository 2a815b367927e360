"""`mesh.xds.server.pin_mmap_threshold`: big transient buffers (a first push's responses) are mapped and
returned whole, even after glibc's own threshold would have moved past them."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = r"""
import ctypes, sys
import mesh.xds.server as server

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "pin":
    assert server.pin_mmap_threshold()
big = bytearray(4 << 20)  # mapped (above every threshold), then freed: glibc's own threshold rises to 4 MiB
del big
before = libc.mallinfo2().hblkhd
block = bytearray(1 << 20)  # a 1 MiB response
print(libc.mallinfo2().hblkhd - before)
"""


def mapped_after_a_big_free(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=60, check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_pinned_threshold_maps_a_response_that_glibc_would_take_from_the_heap() -> None:
    assert mapped_after_a_big_free("default") == 0  # glibc moved its threshold: from the heap, kept on free
    assert mapped_after_a_big_free("pin") >= 1 << 20  # mapped: unmapped whole when freed

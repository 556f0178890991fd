"""keep_freed_memory: after it, glibc serves a large block from the heap instead of mmap."""

import subprocess
import sys

import pytest

CHECK = r"""
import ctypes, ctypes.util, sys
from chestdx.train.memory import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                               "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = MallInfo2
BLOCK = 64 << 20

def mmapped_bytes_for_block():
    before = libc.mallinfo2().hblkhd
    p = libc.malloc(BLOCK)
    grown = libc.mallinfo2().hblkhd - before
    libc.free(p)
    return grown

first = mmapped_bytes_for_block()
assert keep_freed_memory() is True
second = mmapped_bytes_for_block()
print(first >= BLOCK, second == 0)
"""


def test_large_blocks_stay_on_the_heap():
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc only")
    env = {"PATH": "/usr/bin:/bin"}  # no MALLOC_* thresholds from the caller
    run = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, env=env)
    if "mallinfo2" in run.stderr:
        pytest.skip("C library without mallinfo2 (not glibc >= 2.33)")
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["True", "True"]  # mmapped before, heap after


def test_user_thresholds_are_left_alone(monkeypatch):
    from chestdx.train.memory import keep_freed_memory

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1048576")
    assert keep_freed_memory() is False

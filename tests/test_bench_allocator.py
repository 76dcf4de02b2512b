"""benchmarks/bench_compress.pin_allocator: with glibc's malloc thresholds fixed, the activations a forward
frees stay in the heap for the next one instead of being unmapped or trimmed and faulted in again
(benchmarks/prune_round.md)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"

PROBE = """
import ctypes, ctypes.util, sys
sys.path.insert(0, {bench!r})
import torch
from bench_compress import pin_allocator
pinned = pin_allocator() if sys.argv[1] == "pin" else False
def forward():  # like one forward: eight 2 MB activations alive together, written, then all freed
    return [torch.ones(1 << 19) for _ in range(8)]
class Info(ctypes.Structure):  # glibc's struct mallinfo2: ten size_t counters, `arena` first
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
mallinfo2 = ctypes.CDLL(ctypes.util.find_library("c")).mallinfo2
mallinfo2.restype = Info
before = mallinfo2().arena
for _ in range(3):
    forward()
print(pinned, (mallinfo2().arena - before) >> 20)  # MB of heap the freed activations left mapped
"""


def heap_after_forwards(mode: str) -> tuple[str, int]:
    """(pinned?, MB of heap still mapped after three 16 MB 'forwards') in a fresh interpreter."""
    # glibc's initial thresholds (128 KB), fixed: without this its dynamic adjustment differs from one
    # process to the next (the very variation pin_allocator removes), and the unpinned run with it
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    out = subprocess.run([sys.executable, "-c", PROBE.format(bench=str(BENCH)), mode], capture_output=True,
                         text=True, check=True, env=env).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(sys.platform != "linux", reason="mallopt thresholds are glibc's (Linux)")
def test_pinned_thresholds_keep_freed_activations_in_the_heap():
    pinned, kept = heap_after_forwards("pin")
    _, kept_by_default = heap_after_forwards("default")
    assert pinned == "True"
    assert kept >= 16  # the next forward reuses these pages: no page faults
    assert kept_by_default < 8  # glibc mmapped them, or trimmed the heap top once they were freed

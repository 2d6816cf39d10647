"""glibc malloc keeps freed blocks for reuse in the server process (cpu_memory)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest
from roberta_server.cpu_memory import MMAP_THRESHOLD_MAX
from roberta_server.launcher import ServerProcess

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")

# Run in a fresh interpreter each time: malloc settings are process-wide and cannot be unset.
PROBE = """
import ctypes, json, sys, threading
from roberta_server.cpu_memory import retain_freed_memory

libc = ctypes.CDLL(None)
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split())]
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = (ctypes.c_void_p,)
result = {"applied": retain_freed_memory() if sys.argv[1] == "retain" else None}

def batch():
    before = libc.mallinfo2()
    blocks = [libc.malloc(8 << 20) for _ in range(8)]  # 64 MiB, as big as a batch's activations
    result["mapped"] = libc.mallinfo2().hblks - before.hblks
    for b in blocks:
        libc.free(b)
    result["kept"] = libc.mallinfo2().fordblks - before.fordblks

# On a thread of its own, as the server's executor runs batches.
thread = threading.Thread(target=batch)
thread.start()
thread.join()
print(json.dumps(result))
"""


def _probe(mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


def test_freed_blocks_stay_in_the_heap_for_the_next_batch():
    default = _probe("default")
    # glibc's defaults: each 8 MiB block gets a mapping of its own, returned on free.
    assert default["mapped"] == 8
    assert default["kept"] < 1 << 20
    retained = _probe("retain")
    assert retained["applied"] is True
    assert retained["mapped"] == 0
    # All 64 MiB, less what the probe had free before. It is more than one 64 MiB heap of a
    # thread's own arena, which glibc would unmap once emptied: the one shared arena keeps it.
    assert retained["kept"] >= 60 << 20


def test_the_server_sets_malloc_before_loading_the_model():
    with ServerProcess("--model", "random:tiny", "--device", "cpu") as server:
        server.wait_ready()
        messages = [r.get("message") for r in server.logs]
        record = server.logs[messages.index("malloc keeps freed memory")]
        assert record["mmap_threshold"] == MMAP_THRESHOLD_MAX
        assert messages.index("malloc keeps freed memory") < messages.index("serving")
        assert server.terminate() == 0

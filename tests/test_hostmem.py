"""hostmem: with glibc kept from unmapping, a large block freed on a worker thread is reused without page faults."""
import platform
import subprocess
import sys

import pytest

from jaxsae import configlib, hostmem

# A worker thread allocates and touches 64 MiB (16k pages) twice; the minor page faults of the second pass.
_SCRIPT = """
import ctypes, resource, sys, threading
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "keep":
    from jaxsae import hostmem
    assert hostmem.keep_freed_memory()
out = []
def work():
    for _ in range(2):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        p = libc.malloc(64 << 20)
        ctypes.memset(p, 1, 64 << 20)
        out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        libc.free(p)
t = threading.Thread(target=work); t.start(); t.join()
print(out[1])
"""

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")


def _faults(mode: str) -> int:
    return int(subprocess.run([sys.executable, "-c", _SCRIPT, mode], check=True, capture_output=True,
                              text=True).stdout)


@glibc
def test_keep_freed_memory_reuses_large_blocks():
    pages = (64 << 20) // 4096
    assert _faults("default") > pages // 2  # glibc's default unmaps the block, so its pages fault again
    assert _faults("keep") < pages // 20


@glibc
def test_commands_apply_it(monkeypatch):
    calls = []
    monkeypatch.setattr(hostmem, "keep_freed_memory", lambda: calls.append(1) or True)
    assert configlib.run(lambda argv: 0, []) == 0 and calls == [1]

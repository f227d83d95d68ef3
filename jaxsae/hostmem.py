"""Host allocator setting for CPU runs: glibc keeps freed memory for reuse instead of unmapping it.

XLA:CPU allocates an executable's temporaries as one block per call, and torch allocates its large tensors
afresh per op. glibc serves blocks of 32 MiB or more (its largest dynamic mmap threshold) with a fresh mmap
and unmaps them on free, and an allocation on a worker thread's arena does so at any size over that arena's
64 MiB heap. Each call then faults in every page again: an 8-seed SAE step (246 MiB of temporaries) took
82k faults per step, and sparsify's step took 0.59-0.78 s against 0.42-0.52 s with freed memory kept
(benchmarks/README.md, ninth set; the JAX step's own time moved less than the host's noise).
`keep_freed_memory()` puts every thread on the main arena, serves large blocks from the heap (no mmap) and
never trims it, so a block freed by one step is reused by the next. The cost: resident memory stays at its
peak. Commands (`configlib.run`) call it first thing, unless `JAXSAE_HOST_MALLOC=default` is set in the
environment (how the benchmarks time glibc's defaults); call it yourself before the first JAX computation in
your own scripts, since threads that already allocated keep their arenas.
"""
from __future__ import annotations

import ctypes
import os
import platform

# mallopt parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_INT_MAX = 2**31 - 1
ENV = "JAXSAE_HOST_MALLOC"  # `default` leaves glibc as it is; anything else (or unset) keeps freed memory


def setting() -> str:
    """`keep` or `default`: what `keep_freed_memory` does in this environment (benchmarks record it)."""
    return "default" if os.environ.get(ENV, "keep") == "default" else "keep"


def keep_freed_memory() -> bool:
    """Set glibc's malloc to keep and reuse freed memory (one arena, no mmap, no trim); False if not glibc or
    the environment says `default`."""
    if setting() == "default" or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _INT_MAX))
    return all(mallopt(ctypes.c_int(opt), ctypes.c_int(value)) == 1 for opt, value in settings)

"""Test setup: 8 CPU devices so every test exercises sharding (jax_num_cpu_devices, which, unlike
--xla_force_host_platform_device_count, also works with CPU collectives across processes: openxla/xla#16430),
and one persistent XLA compilation cache per test session."""
import atexit
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Most of a short test's CPU time is XLA compiling programs another test (or the other xdist worker, or a
# command a smoke test starts) has already compiled. A persistent cache in a fresh temporary folder, made by the
# first process of the session (the xdist controller) and inherited through the environment by its workers and
# their subprocesses, compiles each program once. It cannot make a test pass wrongly: an entry's key hashes the
# program, the compile options, the XLA flags, the devices and the jax/jaxlib versions, so a hit is the
# executable the same compile would produce; the folder starts empty, so nothing from older code or another
# session is read; and it is removed when the session ends. JAXSAE_TEST_JIT_CACHE=0 turns it off.
_CACHE_ENV = "JAXSAE_TEST_JIT_CACHE"
if os.environ.get(_CACHE_ENV) != "0":
    if not os.environ.get(_CACHE_ENV):  # the session's first process: make the folder, remove it at exit
        os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="jaxsae-test-jit-")
        atexit.register(shutil.rmtree, os.environ[_CACHE_ENV], True)
    os.environ.update(JAX_COMPILATION_CACHE_DIR=os.environ[_CACHE_ENV],
                      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",  # tiny programs too: they add up
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")

# The suite's programs are tiny and run once or a few times, so compiling them well costs more than it saves:
# LLVM at optimisation level 0, and XLA:CPU's older loop emitters for fusions instead of the MLIR-based fusion
# emitters (on tests/test_lime.py CPU time 114 -> 70 s with the first, 48 -> 25 s more with the second). Float
# semantics stay IEEE (fast-math is off either way); the tests' tolerances and the memory tests' bounds hold under
# both. Test-only: large programs run slower with them (benchmarks.sae_step's step 0.43 -> 0.73 s, two runs each,
# not under the quiet protocol). Appended to XLA_FLAGS before jax starts, so the commands and jobs tests start
# inherit them. JAXSAE_TEST_XLA_FAST=0: XLA's defaults.
_flags = os.environ.get("XLA_FLAGS", "")
if os.environ.get("JAXSAE_TEST_XLA_FAST") != "0" and "xla_backend_optimization_level" not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false".strip()

import jax  # noqa: E402

# Plain jax_num_cpu_devices, not distributed.use_cpu_devices: memory tests (test_matryoshka) bound XLA's planned
# temporaries under the default scheduler; the jobs tests start go through distributed.initialize.
jax.config.update("jax_num_cpu_devices", 8)  # before the backend starts: no test has touched a device yet
jax.config.update("jax_default_matmul_precision", "highest")
if os.environ.get(_CACHE_ENV) != "0":  # a plugin may have imported jax before the variables above were set
    jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_ENV])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


# The files that take longest run first, so under xdist the other worker fills in around them instead of one
# worker finishing them alone at the end. Whole files move, in their own order: module fixtures are set up once.
_FIRST = ("test_smoke.py", "test_multiprocess.py", "test_interop.py", "test_browse.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(_FIRST)))  # stable: each file keeps its order


@pytest.fixture(params=["cpu_kernels", "xla"])
def sparse_backend(request, monkeypatch):
    """Runs a test through jaxsae.cpu_kernels (XLA:CPU's default when built) and through the XLA paths that
    GPU and TPU run (the kernels reported unavailable)."""
    from jaxsae import cpu_kernels
    if request.param == "xla":
        monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    # JAX caches traces of jitted and custom-derivative functions by function and input types, not by what
    # `available` says: without clearing, a path traced earlier in this process would run under either setting.
    jax.clear_caches()
    yield request.param
    jax.clear_caches()

"""Several processes, one program: JAX's multi-controller runtime and per-process data.

Every process runs the same command; `initialize(cfg)` joins them with `jax.distributed.initialize`, after
which `jax.devices()` lists the devices of all processes and a mesh spans them. Each process then reads only
the rows of each global batch its devices hold (`process_rows`) and `global_array` assembles the global
jax.Array with `jax.make_array_from_process_local_data`. Files a run writes once (logs, summaries, SAE folders)
are written by process 0 (`is_main`); orbax checkpoints are written by all processes together.

On CPU (tests, and a laptop standing in for a pod) processes talk through gloo, and `cpu_devices` sets how many
devices each process has (`jax_num_cpu_devices`). `python -m jaxsae.launch -n N -- CMD ...` starts N local
processes with the right flags.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import socket
import sys
import threading
import time

import jax
import numpy as np
from jax.experimental import multihost_utils


@dataclasses.dataclass(frozen=True)
class DistConfig:
    coordinator: str = ""  # HOST:PORT of process 0's coordination service; empty: one process (or distributed=auto)
    num_processes: int = 1  # processes in the job (with coordinator)
    process_id: int = 0  # this process's id in [0, num_processes) (with coordinator)
    distributed: str = "off"  # off | auto: let jax.distributed.initialize() detect TPU pods, SLURM or Open MPI
    cpu_devices: int = 0  # CPU only: devices per process (jax_num_cpu_devices); 0 keeps JAX's default
    init_timeout_s: int = 60  # give up when the coordinator does not answer within this many seconds
    heartbeat_timeout_s: int = 30  # a peer silent this long is declared lost and every process stops


def check(cfg: DistConfig) -> None:
    """One-line errors for an impossible setting, before anything starts."""
    if cfg.distributed not in ("off", "auto"):
        raise ValueError(f"distributed must be off or auto, got {cfg.distributed!r}")
    if cfg.num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {cfg.num_processes}")
    if not 0 <= cfg.process_id < cfg.num_processes:
        raise ValueError(f"process_id={cfg.process_id} is out of range for num_processes={cfg.num_processes}")
    if cfg.num_processes > 1 and not cfg.coordinator:
        raise ValueError(f"num_processes={cfg.num_processes} needs coordinator=HOST:PORT (or distributed=auto)")
    if cfg.coordinator and not re.fullmatch(r"[^\s:]+:\d{1,5}", cfg.coordinator):
        raise ValueError(f"coordinator must be HOST:PORT, got {cfg.coordinator!r}")
    if cfg.cpu_devices < 0 or cfg.init_timeout_s < 1 or cfg.heartbeat_timeout_s < 1:
        raise ValueError(f"cpu_devices must be >= 0 and the timeouts >= 1 s, got {cfg}")


def check_split(cfg: DistConfig, mesh: dict[str, int], batch_size: int) -> None:
    """One-line errors, before any process joins, for a mesh or batch that cannot be split over the processes.

    `mesh` gives the size of each axis of `jaxsae.sharding.AXES` (missing ones are 1); batch rows split over
    data x fsdp. Processes hold contiguous runs of the mesh's devices (`jax.devices()` lists them by process).
    """
    check(cfg)
    sizes = [int(mesh.get(a, 1)) for a in ("seed", "data", "fsdp", "model")]
    n, P = int(np.prod(sizes)), cfg.num_processes
    shown = " x ".join(f"{a}={s}" for a, s in zip(("seed", "data", "fsdp", "model"), sizes) if s > 1) or "1 device"
    if n % P:
        raise ValueError(f"num_processes={P} does not divide the mesh ({shown} = {n} devices) into equal parts")
    if P > 1 and cfg.cpu_devices and cfg.cpu_devices * P != n:
        raise ValueError(f"the mesh ({shown} = {n} devices) must use every device of the job, but num_processes={P} "
                         f"x cpu_devices={cfg.cpu_devices} = {P * cfg.cpu_devices}")
    ways = sizes[1] * sizes[2]
    if batch_size % ways:
        raise ValueError(f"batch_size={batch_size} does not split into the {ways} row blocks of data x fsdp "
                         f"(over num_processes={P})")


# XLA:CPU may run a program's independent collectives at the same time on its small thread pool. With several
# CPU devices on few cores, two devices can then enter two all-reduces in different orders while every pool
# thread waits inside one of them: a deadlock (one process aborts with "Termination timeout for `all reduce
# RendezvousKey...`"; across processes the job stalls with no CPU use). Seen in 4 of 6 runs of
# benchmarks/multiprocess's 1 x 4 job at its default size; XLA's memory-ordered scheduler did not deadlock there.
CPU_COLLECTIVES_XLA_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def use_cpu_devices(n: int) -> None:
    """n CPU devices in this process (`jax_num_cpu_devices`), scheduled so their collectives cannot deadlock.

    Call before JAX starts its backend (XLA reads XLA_FLAGS once); an explicit setting of the flag is kept.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if n > 1 and "xla_cpu_enable_concurrency_optimized_scheduler" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {CPU_COLLECTIVES_XLA_FLAG}".strip()
    jax.config.update("jax_num_cpu_devices", n)


def initialize(cfg: DistConfig) -> None:
    """Join the job described by `cfg` (a no-op for one process); call before any JAX computation."""
    check(cfg)
    if cfg.cpu_devices:
        use_cpu_devices(cfg.cpu_devices)
    if cfg.distributed == "off" and not cfg.coordinator:
        return
    if jax.distributed.is_initialized():
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # only CPU clients read it
    kwargs = dict(initialization_timeout=cfg.init_timeout_s, heartbeat_timeout_seconds=cfg.heartbeat_timeout_s)
    if cfg.coordinator and cfg.process_id != 0:
        _wait_for(cfg.coordinator, cfg.init_timeout_s)
    if cfg.coordinator:
        kwargs.update(coordinator_address=cfg.coordinator, num_processes=cfg.num_processes, process_id=cfg.process_id)
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # XLA reports a missing coordinator as a generic runtime error
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConnectionError(f"could not join the job at coordinator {cfg.coordinator or '(auto)'} within "
                              f"{cfg.init_timeout_s} s as process {cfg.process_id} of {cfg.num_processes}: "
                              f"{first}") from None


def _wait_for(address: str, timeout_s: float) -> None:
    """Return once `address` accepts TCP connections; a one-line error after `timeout_s` (XLA would abort)."""
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise ConnectionError(f"coordinator {address} did not answer within {timeout_s} s") from None
            time.sleep(0.2)


def is_main() -> bool:
    """True in the one process that writes shared files (process 0)."""
    return jax.process_index() == 0


def process_box(sharding: jax.sharding.Sharding, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """The block of a global array of `shape` that this process's devices hold, as one slice per axis."""
    blocks = {tuple(s.indices(n)[:2] for s, n in zip(index, shape))
              for index in sharding.addressable_devices_indices_map(shape).values()}
    if not blocks:
        raise ValueError(f"process {jax.process_index()} holds no device of the mesh ({len(sharding.device_set)} of "
                         f"{jax.device_count()} devices); under several processes the mesh must use every device")
    box = tuple(slice(min(b[a][0] for b in blocks), max(b[a][1] for b in blocks)) for a in range(len(shape)))
    if sum(int(np.prod([stop - start for start, stop in b])) for b in blocks) != \
            int(np.prod([s.stop - s.start for s in box])):
        raise ValueError(f"this process's devices do not hold one block of the global array {shape} under "
                         f"{sharding}; order the mesh so that each process's devices are contiguous")
    return box


def global_array(sharding: jax.sharding.Sharding, local: np.ndarray, shape: tuple[int, ...]) -> jax.Array:
    """The global array of `shape` from this process's block (`process_box`) of it."""
    return jax.make_array_from_process_local_data(sharding, local, shape)


def to_host(tree):
    """A pytree of (possibly multi-process sharded) arrays as numpy on every process (a collective: all call it)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def gather(x: np.ndarray) -> np.ndarray:
    """[num_processes, *x.shape]: every process's numpy `x` (same shape and dtype in all), bit for bit (a collective)."""
    x = np.ascontiguousarray(x)
    if jax.process_count() == 1:
        return x[None]
    bytes_ = np.atleast_1d(x).reshape(-1).view(np.uint8)  # as raw bytes: float64 survives without jax_enable_x64
    out = np.asarray(multihost_utils.process_allgather(bytes_, tiled=False))
    return out.reshape(jax.process_count(), -1).view(x.dtype).reshape(jax.process_count(), *x.shape)


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (a no-op for one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


class Watchdog:
    """Ends this process with one line naming the step it is stuck in, once a step outlasts `timeout_s`.

    A collective that a peer never joins (a peer alive but stuck, so JAX's heartbeat stays content) blocks inside
    XLA where no Python exception reaches: a thread watching the clock is the only way to turn it into an error.
    Use `with dog.step("timed step 3"): ...` around each blocking call; the launcher then stops the other processes.
    """

    EXIT_CODE = 124  # as `timeout` exits

    def __init__(self, timeout_s: float, prog: str = "jaxsae"):
        if timeout_s <= 0:
            raise ValueError(f"a watchdog needs timeout_s > 0, got {timeout_s}")
        self.timeout_s, self.prog = timeout_s, prog
        self._what, self._since, self._who = None, 0.0, "process"
        threading.Thread(target=self._watch, daemon=True).start()

    @contextlib.contextmanager
    def step(self, what: str):
        self._who = f"process {jax.process_index()} of {jax.process_count()}"  # read here, not in the watcher
        self._what, self._since = what, time.monotonic()
        try:
            yield
        finally:
            self._what = None

    def _watch(self) -> None:
        while True:
            time.sleep(min(1.0, self.timeout_s / 10))
            what, since = self._what, self._since
            if what is not None and time.monotonic() - since > self.timeout_s:
                print(f"{self.prog}: error: {self._who} stuck for more than {self.timeout_s:g} s in {what}",
                      file=sys.stderr, flush=True)
                os._exit(self.EXIT_CODE)  # the stuck call holds the main thread: no clean exit is possible


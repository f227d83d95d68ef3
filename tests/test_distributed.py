"""jaxsae.distributed's process-local set-up (the multi-process jobs themselves: tests/test_multiprocess.py)."""
import os
import subprocess
import sys

from jaxsae import distributed

_PROBE = ("import os, jax; from jaxsae import distributed; distributed.use_cpu_devices({n}); "
          "print(jax.device_count(), os.environ.get('XLA_FLAGS', ''))")


def _probe(n: int, xla_flags: str | None) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    if xla_flags is not None:
        env["XLA_FLAGS"] = xla_flags
    out = subprocess.run([sys.executable, "-c", _PROBE.format(n=n)], env=env, capture_output=True, text=True,
                         check=True).stdout.strip().splitlines()[-1]
    count, _, flags = out.partition(" ")
    return int(count), flags


def test_several_cpu_devices_get_the_collective_safe_schedule_and_keep_other_flags():
    count, flags = _probe(4, "--xla_cpu_multi_thread_eigen=true")
    assert count == 4
    assert flags.split() == ["--xla_cpu_multi_thread_eigen=true", distributed.CPU_COLLECTIVES_XLA_FLAG]


def test_an_explicit_scheduler_setting_is_left_alone():
    assert _probe(2, "--xla_cpu_enable_concurrency_optimized_scheduler=true") == (
        2, "--xla_cpu_enable_concurrency_optimized_scheduler=true")

"""Test setup: 8 CPU devices so every test exercises sharding (jax_num_cpu_devices, which, unlike
--xla_force_host_platform_device_count, also works with CPU collectives across processes: openxla/xla#16430)."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)  # before the backend starts: no test has touched a device yet
jax.config.update("jax_default_matmul_precision", "highest")

"""Scale on paper: compile a training step for a mesh of fake CPU devices and read XLA's own accounting.

`jaxsae plan d_in=2304 d_sae=65536 k=64 n_seeds=8 batch_size=4096 mesh_seed=8 mesh_data=4 mesh_model=2` lowers
the SAE ensemble's step for that mesh (the process gets as many CPU devices as the mesh needs), and prints per
device: argument (state + batch), output, and temporary bytes from `compiled.memory_analysis()`, FLOPs and bytes
accessed from `compiled.cost_analysis()`, the step time those imply on a stated accelerator (a roofline: the
slower of FLOPs at `peak_tflops` and bytes at `hbm_gbps`), and the activation rate each process must be fed.
CPU buffer assignment is not a TPU's or GPU's: temporaries are an upper-bound estimate, the state is exact.
`lime_jax plan` does the same for the LM trainer with `compiled_stats`.
"""
from __future__ import annotations

import dataclasses
import json
import sys

import numpy as np


@dataclasses.dataclass(frozen=True)
class PlanConfig:
    peak_tflops: float = 459.0  # accelerator peak, dense TFLOP/s per device (TPU v5p bf16: 459; H100 SXM bf16: 989)
    hbm_gbps: float = 2765.0  # accelerator memory bandwidth, GB/s per device (TPU v5p: 2765; H100 SXM: 3350)
    devices_per_process: int = 4  # devices each host drives (TPU v5p: 4; an 8-GPU node: 8)
    mfu: float = 0.5  # fraction of peak to expect in practice, for the step-time estimate


def compiled_stats(jitted, *abstract_args) -> dict:
    """Per-device bytes and FLOPs of `jitted` lowered for `abstract_args` (jax.ShapeDtypeStruct pytrees)."""
    compiled = jitted.lower(*abstract_args).compile()
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"argument_bytes": int(mem.argument_size_in_bytes), "output_bytes": int(mem.output_size_in_bytes),
            "alias_bytes": int(mem.alias_size_in_bytes), "temp_bytes": int(mem.temp_size_in_bytes),
            "flops": float(cost.get("flops", 0.0)), "bytes_accessed": float(cost.get("bytes accessed", 0.0))}


def roofline(stats: dict, plan: PlanConfig) -> dict:
    """Step time (s) at `mfu` of peak, bounded below by moving `bytes_accessed` at the HBM bandwidth."""
    compute_s = stats["flops"] / (plan.peak_tflops * 1e12 * plan.mfu)
    memory_s = stats["bytes_accessed"] / (plan.hbm_gbps * 1e9)
    return {"step_s": max(compute_s, memory_s), "compute_s": compute_s, "memory_s": memory_s,
            "bound": "compute" if compute_s >= memory_s else "memory"}


def plan_sae(sae_cfg, train_cfg, plan: PlanConfig) -> dict:
    """The SAE ensemble step of `train_cfg`'s mesh: memory per device, FLOPs, step time, data rate per process."""
    import jax
    import jax.numpy as jnp

    from jaxsae import sharding, train

    mesh = sharding.make_mesh(train_cfg.mesh_seed, train_cfg.mesh_data, train_cfg.mesh_model)
    step = train.make_train_step(sae_cfg, train_cfg, mesh=mesh)
    S, B, D = train_cfg.n_seeds, train_cfg.batch_size, sae_cfg.d_in
    batch = jax.ShapeDtypeStruct((S, B, D) if train_cfg.data_order == "per_seed" else (B, D), jnp.float32)
    stats = compiled_stats(step, train._abstract_state(sae_cfg, train_cfg), batch)
    time_ = roofline(stats, plan)
    processes = max(1, mesh.size // plan.devices_per_process)
    rows = B * (S if train_cfg.data_order == "per_seed" else 1)
    state_bytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize
                      for x in jax.tree.leaves(train._abstract_state(sae_cfg, train_cfg)))
    return {"what": "sae", "devices": mesh.size, "mesh": dict(mesh.shape), "processes": processes,
            "state_bytes_total": state_bytes, **stats, **time_,
            "tokens_per_s_per_seed": B / time_["step_s"],
            "activation_MBps_per_process": rows * D * 2 / time_["step_s"] / processes / 1e6,  # float16 caches
            "steps_for_1B_tokens": int(np.ceil(1e9 / B))}


def human(result: dict) -> str:
    """One readable paragraph of a plan's numbers."""
    gib = 2.0**30
    return (f"{result['what']} on {result['devices']} devices {result['mesh']} ({result['processes']} processes): "
            f"per device {result['argument_bytes'] / gib:.2f} GiB state+batch, {result['temp_bytes'] / gib:.2f} GiB "
            f"temporaries (CPU estimate), {result['flops'] / 1e12:.3f} TFLOP per step; step "
            f"{result['step_s'] * 1e3:.1f} ms ({result['bound']}-bound)")


def main(argv=None) -> int:
    """`jaxsae plan [SAEConfig, TrainConfig and PlanConfig fields]`: JSON line + a readable line."""
    import jax

    from jaxsae import configlib, sae, train

    argv = list(argv or [])
    defaults = [sae.SAEConfig(), train.TrainConfig(), PlanConfig()]
    if any(a in ("-h", "--help", "help") for a in argv):
        print("\n\n".join(configlib.help_text(c) for c in defaults))
        return 0
    sae_argv, train_argv, plan_argv = configlib.split_argv(argv, defaults)
    sae_cfg = configlib.override(sae.SAEConfig(), sae_argv)
    train_cfg = configlib.override(train.TrainConfig(), train_argv)
    plan = configlib.override(PlanConfig(), plan_argv)
    jax.config.update("jax_num_cpu_devices", train_cfg.mesh_seed * train_cfg.mesh_data * train_cfg.mesh_model)
    result = plan_sae(sae_cfg, train_cfg, plan)
    print(json.dumps(result))
    print(human(result), file=sys.stderr)
    return 0

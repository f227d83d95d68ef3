"""`lime_jax plan [TrainConfig, LlamaConfig and jaxsae.plan.PlanConfig fields]`: the LM step on paper.

Compiles the Llama/LIMe train step for the (data, fsdp) mesh on as many fake CPU devices as it needs and reports
per-device memory and FLOPs from XLA (`jaxsae.plan.compiled_stats`), the step time at a stated accelerator peak,
the model FLOPs utilisation that time implies against `LlamaConfig.flops_per_token`, and the token rate each
process must be fed. E.g. the paper's 1.2B run: `lime_jax plan preset=paper_1b routing=dynamic dtype=bfloat16
remat=true mesh_data=8 mesh_fsdp=32 batch_size=1024 seq_len=2048`.
"""
from __future__ import annotations

import json
import sys

import numpy as np

from jaxsae import configlib, plan as jplan


def plan_lm(model_cfg, cfg, plan: jplan.PlanConfig) -> dict:
    """Memory per device, FLOPs, step time and data rate of the LM train step on `cfg`'s mesh."""
    import jax
    import jax.numpy as jnp

    from lime_jax import sharding, train

    mesh = sharding.make_mesh(cfg.mesh_data, cfg.mesh_fsdp)
    step = train.make_train_step(model_cfg, cfg, mesh)
    tokens = jax.ShapeDtypeStruct((cfg.batch_size, cfg.seq_len), jnp.int32)
    abstract = train.abstract_state(model_cfg, cfg)
    stats = jplan.compiled_stats(step, abstract, tokens)
    time_ = jplan.roofline(stats, plan)
    processes = max(1, mesh.size // plan.devices_per_process)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    model_flops = model_cfg.flops_per_token * tokens_per_step / mesh.size  # forward + backward, per device
    return {"what": f"lm ({model_cfg.routing})", "devices": mesh.size, "mesh": dict(mesh.shape),
            "processes": processes, "params": model_cfg.num_params,
            "state_bytes_total": sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(abstract)),
            **stats, **time_, "model_flops_per_device": model_flops,
            "tokens_per_s": tokens_per_step / time_["step_s"],
            "token_ids_per_s_per_process": tokens_per_step / time_["step_s"] / processes}


def main(argv=None) -> int:
    import jax

    from lime_jax import config, train

    argv = list(argv or [])
    if any(a in ("-h", "--help", "help") for a in argv):
        print(configlib.help_text(jplan.PlanConfig()))
        return 0
    train_argv, model_argv, plan_argv = configlib.split_argv(argv, [train.TrainConfig, config.LlamaConfig,
                                                                    jplan.PlanConfig])
    plan = configlib.override(jplan.PlanConfig(), plan_argv)
    cfg = configlib.override(train.TrainConfig(), train_argv)
    model_cfg = configlib.override(train.PRESETS[cfg.preset](), model_argv)
    jax.config.update("jax_num_cpu_devices", cfg.mesh_data * cfg.mesh_fsdp)
    result = plan_lm(model_cfg, cfg, plan)
    print(json.dumps(result))
    print(jplan.human(result), file=sys.stderr)
    return 0

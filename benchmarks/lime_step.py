"""One full training step (forward, backward, AdamW) of Llama and the three LIMe routers at one shape.

Run from the repository root: `python -m benchmarks.lime_step [--shape L,D,B,T] [--vocab V] [--rounds N]
[--depths 2,4,8]`. Prints one JSON line per implementation (`llama`, `lime_static`, `lime_dynamic`,
`lime_v2`): median step time over rounds (each round times every implementation once, so all see the same
machine load), `tokens_per_s`, the ratio to Llama, the FLOPs formula's ratio, and `peak_bytes`, XLA's planned
memory of the compiled step (arguments + outputs + temporaries - aliased; the CPU runtime reports no
measured peak). Then, for each depth in --depths, one line per implementation with `temp_bytes` (the step's
temporaries: activations saved for the backward pass and workspace), to show how activation memory grows
with depth.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from lime_jax import config, train

IMPLS = {"llama": "none", "lime_static": "static", "lime_dynamic": "dynamic", "lime_v2": "v2"}


def _model(routing: str, L: int, D: int, T: int, vocab: int) -> config.LlamaConfig:
    """The experiment's deep-narrow shape: MHA with head width 32, d_ff = 3 D."""
    return config.tiny(vocab=vocab, d_model=D, n_layers=L, n_heads=D // 32, n_kv_heads=D // 32, head_dim=32,
                       d_ff=3 * D, max_len=T, routing=routing)


def _compiled(model_cfg: config.LlamaConfig, train_cfg: train.TrainConfig, B: int, T: int):
    """(compiled step, its memory analysis) from abstract inputs."""
    step = train.make_train_step(model_cfg, train_cfg)
    state = train.abstract_state(model_cfg, train_cfg)
    compiled = step.lower(state, jax.ShapeDtypeStruct((B, T), jnp.int32)).compile()
    return step, compiled.memory_analysis()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="12,64,8,128", help="L,D,B,T: layers, d_model, sequences, positions")
    ap.add_argument("--vocab", type=int, default=8192, help="vocabulary size (the experiment keeps 8192 tokens)")
    ap.add_argument("--rounds", type=int, default=5, help="timing rounds (median reported)")
    ap.add_argument("--depths", default="2,4,8", help="depths for the compile-only memory scan ('' skips)")
    args = ap.parse_args()
    L, D, B, T = (int(s) for s in args.shape.split(","))
    train_cfg = train.TrainConfig(seq_len=T, batch_size=B, num_steps=1000)
    meta = {"machine": f"{platform.machine()} {jax.devices()[0].device_kind}, {jax.device_count()} device(s)",
            "L": L, "D": D, "B": B, "T": T, "vocab": args.vocab}

    steps, states, mems = {}, {}, {}
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, args.vocab, (B, T)), jnp.int32)
    for name, routing in IMPLS.items():
        model_cfg = _model(routing, L, D, T, args.vocab)
        steps[name], mems[name] = _compiled(model_cfg, train_cfg, B, T)
        states[name] = train.init_state(jax.random.key(0), model_cfg, train_cfg)
        states[name], m = steps[name](states[name], tokens)  # warm-up: compile and first run
        jax.block_until_ready(m)
    times = {name: [] for name in IMPLS}
    for _ in tqdm.trange(args.rounds, desc="rounds"):
        for name in IMPLS:
            t0 = time.perf_counter()
            states[name], m = steps[name](states[name], tokens)
            jax.block_until_ready(m)
            times[name].append(time.perf_counter() - t0)
    base = np.median(times["llama"])
    base_flops = _model("none", L, D, T, args.vocab).flops_per_token
    for name, routing in IMPLS.items():
        t, mem = float(np.median(times[name])), mems[name]
        peak = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
        print(json.dumps({"impl": name, **meta, "step_s": round(t, 4), "tokens_per_s": round(B * T / t, 1),
                          "speed_vs_llama": round(base / t, 4),
                          "flops_vs_llama": round(_model(routing, L, D, T, args.vocab).flops_per_token / base_flops, 4),
                          "peak_bytes": int(peak), "temp_bytes": int(mem.temp_size_in_bytes)}), flush=True)

    for depth in [int(s) for s in args.depths.split(",") if s]:
        for name, routing in IMPLS.items():
            # The timed depth was compiled above; compiling it again would only cost time.
            mem = mems[name] if depth == L else _compiled(_model(routing, depth, D, T, args.vocab), train_cfg, B, T)[1]
            print(json.dumps({"impl": name, "depth_scan": True, **meta, "L": depth,
                              "temp_bytes": int(mem.temp_size_in_bytes)}), flush=True)


if __name__ == "__main__":
    main()

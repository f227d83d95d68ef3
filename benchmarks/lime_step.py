"""One full training step (forward, backward, AdamW) of Llama and the three LIMe routers at one shape.

Run from the repository root: `python -m benchmarks.lime_step [--shape L,D,B,T] [--d_models 64,128,256] [--vocab
V] [--rounds N] [--depths 2,4,8]`. For each width (--d_models, default: the D of --shape) prints one JSON line
per implementation (`llama`, `lime_static`, `lime_dynamic`, `lime_v2`): median `step_s` over rounds (each round
times every implementation once, back to back, starting one further along each round), `tokens_per_s`,
`speed_vs_llama` (the median over rounds of Llama's step time over this one's in the same round, so that a drift
of the host's speed between rounds cancels) and its per-round values, the FLOPs
formula's ratio, `peak_bytes`, XLA's planned memory of the compiled step (arguments + outputs + temporaries -
aliased; the CPU runtime reports no measured peak), and `load_avg_1m` before and after the timed rounds (a
figure counts only on a quiet machine). Then, for each depth in --depths, one line per implementation with
`temp_bytes` (the step's temporaries: activations saved for the backward pass and workspace), to show how
activation memory grows with depth.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from jaxsae import configlib, hostmem
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


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="12,64,8,128", help="L,D,B,T: layers, d_model, sequences, positions")
    ap.add_argument("--d_models", default="", help="widths to sweep, e.g. 64,128,256 (default: D of --shape)")
    ap.add_argument("--vocab", type=int, default=8192, help="vocabulary size (the experiment keeps 8192 tokens)")
    ap.add_argument("--rounds", type=int, default=5, help="timing rounds (median reported)")
    ap.add_argument("--depths", default="2,4,8",
                    help="depths for the compile-only memory scan at the last width ('' skips)")
    args = ap.parse_args(argv)
    L, D, B, T = (int(s) for s in args.shape.split(","))
    for width in [int(s) for s in args.d_models.split(",") if s] or [D]:
        mems = _time_width(L, width, B, T, args)
    for depth in [int(s) for s in args.depths.split(",") if s]:
        for name, routing in IMPLS.items():
            # At the last width; the timed depth was compiled above, and compiling it again would only cost time.
            cfg = _model(routing, depth, width, T, args.vocab)
            mem = mems[name] if depth == L else _compiled(cfg, _train_cfg(B, T), B, T)[1]
            print(json.dumps({"impl": name, "depth_scan": True, "L": depth, "D": width, "B": B, "T": T,
                              "temp_bytes": int(mem.temp_size_in_bytes)}), flush=True)


def _load_avg_1m() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def _train_cfg(B: int, T: int) -> train.TrainConfig:
    return train.TrainConfig(seq_len=T, batch_size=B, num_steps=1000)


def _time_width(L: int, D: int, B: int, T: int, args) -> dict:
    """Times every implementation at one width, prints their lines; returns their memory analyses."""
    train_cfg = _train_cfg(B, T)
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
    load_before = _load_avg_1m()
    names = list(IMPLS)
    for r in tqdm.trange(args.rounds, desc=f"rounds at D={D}"):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            states[name], m = steps[name](states[name], tokens)
            jax.block_until_ready(m)
            times[name].append(time.perf_counter() - t0)
    load_after = _load_avg_1m()
    base_flops = _model("none", L, D, T, args.vocab).flops_per_token
    for name, routing in IMPLS.items():
        t, mem = float(np.median(times[name])), mems[name]
        ratios = [b / x for b, x in zip(times["llama"], times[name])]
        peak = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
        print(json.dumps({"impl": name, **meta, "step_s": round(t, 4), "tokens_per_s": round(B * T / t, 1),
                          "speed_vs_llama": round(float(np.median(ratios)), 4),
                          "speed_vs_llama_rounds": [round(r, 4) for r in ratios],
                          "flops_vs_llama": round(_model(routing, L, D, T, args.vocab).flops_per_token / base_flops, 4),
                          "peak_bytes": int(peak), "temp_bytes": int(mem.temp_size_in_bytes),
                          "malloc": hostmem.setting(), "load_avg_1m": load_before, "load_avg_1m_after": load_after}),
              flush=True)
    return mems


if __name__ == "__main__":
    sys.exit(configlib.run(main, prog="python -m benchmarks.lime_step"))

"""One full TopK SAE training step (forward, backward, Adam, decoder-grad projection, renormalisation).

Run from the repository root: `python -m benchmarks.sae_step [--shape B,D,M,K] [--rounds N] [--aux]`.
Prints one JSON line per implementation:
- `jaxsae`: `sae.loss` (its sparse custom-VJP TopK path) in a jitted step, one seed;
- `jaxsae_vmap8`: the same step vmapped over 8 seeds sharing the batch; `tokens_per_s` counts
  seed·tokens (8·B per step), so it is comparable with one seed's tokens/s;
- `sae_lens` (SAELens `TopKTrainingSAE`) and `sparsify` (EleutherAI `SparseCoder`), PyTorch on the same
  CPU, from the optional `bench` extra; skipped with a note when not installed.
Each round times every implementation once, and once the dense B×D @ D×M matmul in JAX (and in torch when
torch is used), so all of them see the same machine load; figures are medians over the rounds.
`step_over_matmul` = step time / the JAX matmul time of the same rounds (per seed for `jaxsae_vmap8`).
`peak_bytes`: how far one step raises the process's resident-set high-water mark (VmHWM, reset through
/proc/self/clear_refs just before the step) over its resident set, the most over the rounds; JAX lines add
`xla_temp_bytes`, XLA's planned temporaries for the step. `load_avg_1m` = [before, after] the run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from jaxsae import configlib, hostmem, sae


def load_avg_1m() -> float:
    """The 1-minute load average, rounded: a figure taken above ~0.5 (before the run) is not a quiet one."""
    return round(os.getloadavg()[0], 2)


def _vm_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return None


def peak_rss_bytes(fn) -> int | None:
    """Run fn() and return how far it raised the resident-set high-water mark over the resident set before it
    (Linux: VmHWM is reset through /proc/self/clear_refs); None where /proc cannot do that."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        fn()
        return None
    base_kib = _vm_kib("VmRSS")
    fn()
    peak_kib = _vm_kib("VmHWM")
    return None if base_kib is None or peak_kib is None else max(peak_kib - base_kib, 0) * 1024


def jax_step(cfg: sae.SAEConfig, seeds: int, dead: bool):
    """(step, state): a jitted train step for `seeds` SAEs (vmapped when > 1) and its initial state."""
    tx = optax.adam(1e-4)
    dead_M = (jnp.arange(cfg.d_sae) % 8 == 0) if dead else None

    def one(params, opt_state, x_BxD):
        (loss, _), grads = jax.value_and_grad(sae.loss, has_aux=True)(params, x_BxD, cfg, dead_M)
        grads = sae.project_decoder_grads(params, grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        return sae.normalize_decoder(optax.apply_updates(params, updates)), opt_state, loss

    keys = jax.random.split(jax.random.key(0), seeds)
    params = jax.vmap(lambda k: sae.init(k, cfg))(keys)
    if seeds == 1:
        params = jax.tree.map(lambda a: a[0], params)
        return jax.jit(one, donate_argnums=(0, 1)), (params, tx.init(params))
    step = jax.vmap(one, in_axes=(0, 0, None))
    return jax.jit(step, donate_argnums=(0, 1)), (params, jax.vmap(tx.init)(params))


def torch_steps(B, D, M, K, dead: bool):
    """{name: (step_fn, note)} for the PyTorch libraries that are installed."""
    try:
        import torch
    except ImportError:
        return {}, {"sae_lens": "torch not installed", "sparsify": "torch not installed"}
    torch.manual_seed(0)
    out, notes = {}, {}
    dead_mask = (torch.arange(M) % 8 == 0) if dead else None
    try:
        from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
        from sae_lens.saes.sae import TrainStepInput

        model = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D, d_sae=M, k=K))
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)

        def sae_lens_step(x):
            step_input = TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=dead_mask,
                                        n_training_steps=0, is_logging_step=False)
            loss = model.training_forward_pass(step_input).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        out["sae_lens"] = sae_lens_step
    except ImportError as e:
        notes["sae_lens"] = f"not installed ({e})"
    try:
        from sparsify import SparseCoder, SparseCoderConfig

        coder = SparseCoder(D, SparseCoderConfig(num_latents=M, k=K))
        opt2 = torch.optim.Adam(coder.parameters(), lr=1e-4)

        def sparsify_step(x):
            fwd = coder(x, dead_mask=dead_mask)
            loss = fwd.fvu + (fwd.auxk_loss / 32 if dead else 0.0)
            opt2.zero_grad(set_to_none=True)
            loss.backward()
            coder.remove_gradient_parallel_to_decoder_directions()
            opt2.step()
            coder.set_decoder_norm_to_unit_norm()

        out["sparsify"] = sparsify_step
    except ImportError as e:
        notes["sparsify"] = f"not installed ({e})"
    return out, notes


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="4096,576,4608,32", help="B,D,M,K")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds (medians are reported)")
    ap.add_argument("--aux", action="store_true", help="flag 1/8 of the latents dead so AuxK runs")
    ap.add_argument("--impls", default="jaxsae,jaxsae_vmap8,sae_lens,sparsify", help="comma-separated")
    args = ap.parse_args(argv)
    load_before = load_avg_1m()
    B, D, M, K = (int(v) for v in args.shape.split(","))
    impls = args.impls.split(",")
    cfg = sae.SAEConfig(d_in=D, d_sae=M, k=K, aux_k=512 if args.aux else 0)
    x_BxD = jax.random.normal(jax.random.key(1), (B, D), jnp.float32)
    W_DxM = jax.random.normal(jax.random.key(2), (D, M), jnp.float32)
    matmul = jax.jit(lambda a, b: a @ b)

    timers = {"matmul": lambda: matmul(x_BxD, W_DxM).block_until_ready()}
    seeds_of = {"jaxsae": 1, "jaxsae_vmap8": 8}
    xla_temp = {}
    for name in [n for n in impls if n in seeds_of]:
        step, state = jax_step(cfg, seeds_of[name], args.aux)
        xla_temp[name] = int(step.lower(*state, x_BxD).compile().memory_analysis().temp_size_in_bytes)
        box = [state]

        def run(step=step, box=box):
            params, opt_state, loss = step(*box[0], x_BxD)
            box[0] = (params, opt_state)
            loss.block_until_ready()

        timers[name] = run
    torch_fns, notes = torch_steps(B, D, M, K, args.aux) if {"sae_lens", "sparsify"} & set(impls) else ({}, {})
    if torch_fns:
        import torch

        x_t, W_t = torch.from_numpy(np.array(x_BxD)), torch.from_numpy(np.array(W_DxM))
        timers["torch_matmul"] = lambda: x_t @ W_t
        for name, fn in torch_fns.items():
            if name in impls:
                timers[name] = lambda fn=fn: fn(x_t)

    for fn in timers.values():  # compile / warm up
        fn()
    times = {name: [] for name in timers}
    peaks = {name: [] for name in timers}
    for _ in tqdm.trange(args.rounds, desc="rounds", disable=None):
        for name, fn in timers.items():
            t0 = time.perf_counter()
            peaks[name].append(peak_rss_bytes(fn))
            times[name].append(time.perf_counter() - t0)
    med = {name: float(np.median(ts)) for name, ts in times.items()}
    load = [load_before, load_avg_1m()]
    common = {"B": B, "d_in": D, "d_sae": M, "k": K, "aux": args.aux, "rounds": args.rounds,
              "matmul_s": round(med["matmul"], 4), "cpus": os.cpu_count(), "machine": platform.machine(),
              "malloc": hostmem.setting(), "load_avg_1m": load, "load_avg_1m_before": load[0],
              "load_avg_1m_after": load[1], "jax": jax.__version__}
    if "torch_matmul" in med:
        common["torch_matmul_s"] = round(med["torch_matmul"], 4)
    for name in impls:
        if name not in med:
            print(json.dumps({"impl": name, "skipped": notes.get(name, "unknown impl"), **common}))
            continue
        seeds = seeds_of.get(name, 1)
        known = [p for p in peaks[name] if p is not None]
        print(json.dumps({"impl": name, "seeds": seeds, "step_s": round(med[name], 4),
                          "tokens_per_s": round(seeds * B / med[name], 1),
                          "step_over_matmul": round(med[name] / (seeds * med["matmul"]), 3),
                          "peak_bytes": max(known) if known else None,
                          **({"xla_temp_bytes": xla_temp[name]} if name in xla_temp else {}), **common}))


if __name__ == "__main__":
    sys.exit(configlib.run(main, prog="python -m benchmarks.sae_step"))

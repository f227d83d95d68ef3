"""Training-step time and peak memory: TopK vs HierarchicalTopK (B×K×D reference and memory-lean custom_vjp).

Run: `python -m benchmarks.htopk_step [key=value ...]` from the repository root. Prints one JSON line per
(impl, K). Every measurement runs in a fresh subprocess so that one measurement's allocations cannot hide
another's; the impls take turns for `rounds` rounds so that load from other processes hits them alike, and
`step_s` is the best step over all rounds (the median is printed too). On a machine shared with other
jobs, wall time mostly measures the load, so `step_cpu_s` (median CPU seconds of the process, all threads,
per step) is printed as well: it counts the step's work. Peak memory is measured two ways:
- `peak_bytes`: the rise of the process's resident-set high-water mark (VmHWM) over its resident set after
  compiling the step and building its inputs (the mark is reset via /proc/self/clear_refs just before the
  first run), i.e. what running the step adds;
- `xla_temp_bytes`: XLA's own buffer assignment for the step (`compiled.memory_analysis()`), a cross-check.
`tokens_per_s` = B / `step_s`; `step_over_matmul` = `step_s` / the best time of the dense B×D @ D×M encoder
matmul, timed in the same child after every step; `load_avg_1m` = [before, after] the whole run.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time

import numpy as np
import tqdm

from jaxsae import configlib, hostmem

# htopk_scan_autodiff: the lean forward as a plain lax.scan differentiated by JAX, to show why the lean
# loss needs its own backward (autodiff stores the B×D carry of every step, i.e. B×K×D again).
IMPLS = ("topk", "htopk_reference", "htopk", "htopk_scan_autodiff")


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    batch: int = 4096  # tokens per step (B)
    d_in: int = 576  # input width (D), SmolLM2-135M's d_model
    d_sae: int = 4608  # latents (M)
    ks: tuple[int, ...] = (32, 64, 128)  # active latents per token (K)
    impls: tuple[str, ...] = IMPLS  # which losses to time: topk, htopk_reference, htopk, htopk_scan_autodiff
    tile: int = 256  # batch rows processed together by the lean loss
    reps: int = 3  # timed steps per round, after the first (memory-measuring) one
    rounds: int = 2  # rounds of fresh subprocesses, impls interleaved
    impl: str = ""  # internal: set in the child process that measures one (impl, K)
    k: int = 0  # internal: the K of that child


def _vm_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _scan_autodiff_prefix_mse(vals_BxK, idx_BxK, W_dec_MxD, b_dec_D, x_BxD):
    """(mse_K, r_BxD) by a running-residual scan over K, left to JAX's autodiff."""
    import jax
    import jax.numpy as jnp

    def step(r_BxD, inputs):
        v_B, i_B = inputs
        r_BxD = r_BxD + v_B[:, None] * W_dec_MxD[i_B]
        return r_BxD, jnp.mean(r_BxD * r_BxD)

    r_BxD, mse_K = jax.lax.scan(step, b_dec_D - x_BxD, (vals_BxK.T, idx_BxK.T))
    return mse_K, r_BxD


def measure(cfg: BenchConfig) -> dict:
    """Compile one Adam training step of the chosen loss, then time it and measure its peak memory."""
    import jax
    import jax.numpy as jnp
    import optax

    from jaxsae import htopk, sae

    sae_cfg = sae.SAEConfig(d_in=cfg.d_in, d_sae=cfg.d_sae, k=cfg.k)
    if cfg.impl == "topk":
        loss_fn = lambda p, x: sae.loss(p, x, sae_cfg)  # noqa: E731
    elif cfg.impl == "htopk_scan_autodiff":
        def loss_fn(p, x):
            mse_K, _ = _scan_autodiff_prefix_mse(*sae.encode(p, x, sae_cfg), p["W_dec"], p["b_dec"], x)
            return jnp.mean(mse_K), {}
    else:
        h_cfg = htopk.HTopKConfig(lean=cfg.impl == "htopk", tile=cfg.tile)
        loss_fn = lambda p, x, f=htopk.make_loss_fn(sae_cfg, h_cfg): f(p, x, None)  # noqa: E731
    opt = optax.adam(1e-4)

    def step(params, opt_state, x_BxD):
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x_BxD)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    params = sae.init(jax.random.key(0), sae_cfg)
    opt_state = opt.init(params)
    x_BxD = jnp.asarray(np.random.default_rng(0).standard_normal((cfg.batch, cfg.d_in), np.float32))
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, x_BxD).compile()
    mem = compiled.memory_analysis()
    jax.block_until_ready((params, opt_state, x_BxD))

    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
        f.write("5")
    base_kib = _vm_kib("VmRSS")
    params, opt_state, loss = compiled(params, opt_state, x_BxD)
    jax.block_until_ready(loss)
    peak_kib = _vm_kib("VmHWM")

    matmul = jax.jit(lambda x, W: x @ W)
    W_DxM = jnp.asarray(np.random.default_rng(1).standard_normal((cfg.d_in, cfg.d_sae), np.float32))
    jax.block_until_ready(matmul(x_BxD, W_DxM))
    times, cpu_times, matmul_times = [], [], []
    for _ in range(cfg.reps):
        t0, c0 = time.perf_counter(), time.process_time()
        params, opt_state, loss = compiled(params, opt_state, x_BxD)
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        t0 = time.perf_counter()
        jax.block_until_ready(matmul(x_BxD, W_DxM))
        matmul_times.append(time.perf_counter() - t0)
    if not np.isfinite(float(loss)):
        raise FloatingPointError(f"{cfg.impl} K={cfg.k}: non-finite loss {float(loss)}")
    return {"impl": cfg.impl, "K": cfg.k, "B": cfg.batch, "d_in": cfg.d_in, "d_sae": cfg.d_sae,
            "times": times, "cpu_times": cpu_times, "matmul_times": matmul_times, "peak_bytes": (peak_kib - base_kib) * 1024, "xla_temp_bytes": int(mem.temp_size_in_bytes),
            "device": str(jax.devices()[0].platform)}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)  # the children get the same overrides
    cfg = configlib.parse(BenchConfig(), argv)
    if cfg is None:
        return 0
    unknown = [i for i in cfg.impls if i not in IMPLS]
    if unknown:
        raise ValueError(f"unknown impls {unknown}; expected a subset of {IMPLS}")
    if cfg.impl:
        print(json.dumps(measure(cfg)), flush=True)
        return 0
    date = time.strftime("%Y-%m-%d", time.gmtime())
    load_before = round(os.getloadavg()[0], 2)
    lines = []
    for k in cfg.ks:
        runs = {impl: [] for impl in cfg.impls}
        for _ in tqdm.trange(cfg.rounds, desc=f"K={k}"):
            for impl in cfg.impls:
                child = [sys.executable, "-m", "benchmarks.htopk_step", *argv, f"impl={impl}", f"k={k}"]
                out = subprocess.run(child, capture_output=True, text=True)
                if out.returncode != 0:
                    raise RuntimeError(f"{impl} K={k} failed:\n{out.stderr[-3000:]}")
                runs[impl].append(json.loads(out.stdout.strip().splitlines()[-1]))
        for impl, rs in runs.items():
            times = [t for r in rs for t in r.pop("times")]
            cpu_times = [t for r in rs for t in r.pop("cpu_times")]
            matmul_times = [t for r in rs for t in r.pop("matmul_times")]
            lines.append({**rs[0], "step_s": min(times), "step_s_median": float(np.median(times)),
                          "step_cpu_s": float(np.median(cpu_times)), "tokens_per_s": round(cfg.batch / min(times), 1),
                          "matmul_s": min(matmul_times), "step_over_matmul": round(min(times) / min(matmul_times), 3),
                          "peak_bytes": max(r["peak_bytes"] for r in rs), "rounds": cfg.rounds, "date": date})
    load = [load_before, round(os.getloadavg()[0], 2)]
    for line in lines:  # printed at the end, so that every line carries the load after the whole run
        print(json.dumps({**line, "malloc": hostmem.setting(), "load_avg_1m": load, "load_avg_1m_before": load[0],
                          "load_avg_1m_after": load[1]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(configlib.run(main, prog="python -m benchmarks.htopk_step"))

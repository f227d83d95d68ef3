"""Training-step time and peak memory: TopK vs HierarchicalTopK (B×K×D reference and memory-lean custom_vjp).

Run: `python -m benchmarks.htopk_step [key=value ...]` from the repository root. Prints one JSON line per
(impl, K). Per K and round, each impl's peak memory is measured in a fresh subprocess of its own, so that one
impl's allocations cannot hide another's; then one more subprocess compiles every impl's step and times them
step by step in turn (`reps` steps each, the order rotated every step), so that a drift in the host's speed or
load from other processes hits them alike. `step_s` is the best step over all rounds (the median is printed
too); `step_vs_topk` is the median over turns of an impl's step over TopK's in the same turn
(`step_vs_topk_turns`), which one unusually fast or slow step does not move. On a machine shared with other
jobs, wall time mostly measures the load, so `step_cpu_s` (median CPU seconds of the process, all threads, per
step) is printed as well: it counts the step's work. Peak memory is measured two ways:
- `peak_bytes`: the rise of the process's resident-set high-water mark (VmHWM) over its resident set after
  compiling the step and building its inputs (the mark is reset via /proc/self/clear_refs just before the
  first run), i.e. what running the step adds;
- `xla_temp_bytes`: XLA's own buffer assignment for the step (`compiled.memory_analysis()`), a cross-check.
`tokens_per_s` = B / `step_s`; `step_over_matmul` = `step_s` / the best time of the dense B×D @ D×M encoder
matmul, timed in the timing subprocess after every turn; `load_avg_1m` = [before, after] the whole run.
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
    reps: int = 3  # timed steps per impl and round, after an untimed first one
    rounds: int = 2  # rounds of fresh subprocesses (one per impl for memory, one timing them all)
    impl: str = ""  # internal: set in the child process that measures one impl's memory ("time": the timing child)
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


def _compiled_step(impl: str, cfg: BenchConfig):
    """(compiled Adam training step of impl's loss, its params, optimiser state, x_BxD, XLA's temp bytes)."""
    import jax
    import jax.numpy as jnp
    import optax

    from jaxsae import htopk, sae

    sae_cfg = sae.SAEConfig(d_in=cfg.d_in, d_sae=cfg.d_sae, k=cfg.k)
    if impl == "topk":
        loss_fn = lambda p, x: sae.loss(p, x, sae_cfg)  # noqa: E731
    elif impl == "htopk_scan_autodiff":
        def loss_fn(p, x):
            mse_K, _ = _scan_autodiff_prefix_mse(*sae.encode(p, x, sae_cfg), p["W_dec"], p["b_dec"], x)
            return jnp.mean(mse_K), {}
    else:
        h_cfg = htopk.HTopKConfig(lean=impl == "htopk", tile=cfg.tile)
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
    jax.block_until_ready((params, opt_state, x_BxD))
    return compiled, params, opt_state, x_BxD, int(compiled.memory_analysis().temp_size_in_bytes)


def measure_memory(cfg: BenchConfig) -> dict:
    """Peak memory of one first step of cfg.impl's loss, alone in this process."""
    import jax

    compiled, params, opt_state, x_BxD, temp_bytes = _compiled_step(cfg.impl, cfg)
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
        f.write("5")
    base_kib = _vm_kib("VmRSS")
    params, opt_state, loss = compiled(params, opt_state, x_BxD)
    jax.block_until_ready(loss)
    peak_kib = _vm_kib("VmHWM")
    return {"impl": cfg.impl, "K": cfg.k, "B": cfg.batch, "d_in": cfg.d_in, "d_sae": cfg.d_sae,
            "peak_bytes": (peak_kib - base_kib) * 1024, "xla_temp_bytes": temp_bytes,
            "device": str(jax.devices()[0].platform)}


def measure_times(cfg: BenchConfig) -> dict:
    """{impl: (wall seconds, CPU seconds) per step}, every impl's step compiled in this process and timed step by
    step in turn, and "matmul": the encoder matmul's seconds, timed after each turn."""
    import jax
    import jax.numpy as jnp

    steps = {impl: list(_compiled_step(impl, cfg)[:4]) for impl in cfg.impls}
    matmul = jax.jit(lambda x, W: x @ W)
    x_BxD = next(iter(steps.values()))[3]
    W_DxM = jnp.asarray(np.random.default_rng(1).standard_normal((cfg.d_in, cfg.d_sae), np.float32))
    jax.block_until_ready(matmul(x_BxD, W_DxM))
    out = {impl: {"times": [], "cpu_times": []} for impl in steps}
    out["matmul"] = {"times": []}

    def run(impl):
        compiled, params, opt_state, x = steps[impl]
        params, opt_state, loss = compiled(params, opt_state, x)
        jax.block_until_ready(loss)
        steps[impl][1:3] = params, opt_state
        return loss

    for impl in steps:  # the first step (untimed): allocations and the kernels' first touch of their buffers
        run(impl)
    order = list(steps)
    for rep in range(cfg.reps):
        for impl in order[rep % len(order):] + order[:rep % len(order)]:
            t0, c0 = time.perf_counter(), time.process_time()
            loss = run(impl)
            out[impl]["times"].append(time.perf_counter() - t0)
            out[impl]["cpu_times"].append(time.process_time() - c0)
            if not np.isfinite(float(loss)):
                raise FloatingPointError(f"{impl} K={cfg.k}: non-finite loss {float(loss)}")
        t0 = time.perf_counter()
        jax.block_until_ready(matmul(x_BxD, W_DxM))
        out["matmul"]["times"].append(time.perf_counter() - t0)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)  # the children get the same overrides
    cfg = configlib.parse(BenchConfig(), argv)
    if cfg is None:
        return 0
    unknown = [i for i in cfg.impls if i not in IMPLS]
    if unknown:
        raise ValueError(f"unknown impls {unknown}; expected a subset of {IMPLS}")
    if cfg.impl:
        print(json.dumps(measure_times(cfg) if cfg.impl == "time" else measure_memory(cfg)), flush=True)
        return 0
    date = time.strftime("%Y-%m-%d", time.gmtime())
    load_before = round(os.getloadavg()[0], 2)
    lines = []

    def child(impl, k):
        out = subprocess.run([sys.executable, "-m", "benchmarks.htopk_step", *argv, f"impl={impl}", f"k={k}"],
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"{impl} K={k} failed:\n{out.stderr[-3000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    for k in cfg.ks:
        mems = {impl: [] for impl in cfg.impls}
        timed = []
        for _ in tqdm.trange(cfg.rounds, desc=f"K={k}"):
            for impl in cfg.impls:
                mems[impl].append(child(impl, k))
            timed.append(child("time", k))
        matmul_s = min(t for r in timed for t in r["matmul"]["times"])
        for impl, rs in mems.items():
            times = [t for r in timed for t in r[impl]["times"]]
            cpu_times = [t for r in timed for t in r[impl]["cpu_times"]]
            extra = {}
            if impl != "topk" and "topk" in mems:  # this impl's step over TopK's in the same turn
                paired = [t / t0 for r in timed for t, t0 in zip(r[impl]["times"], r["topk"]["times"])]
                extra = {"step_vs_topk": round(float(np.median(paired)), 3),
                         "step_vs_topk_turns": [round(x, 3) for x in paired]}
            lines.append({**rs[0], "step_s": min(times), "step_s_median": float(np.median(times)),
                          "step_cpu_s": float(np.median(cpu_times)), "tokens_per_s": round(cfg.batch / min(times), 1),
                          "matmul_s": matmul_s, "step_over_matmul": round(min(times) / matmul_s, 3), **extra,
                          "peak_bytes": max(r["peak_bytes"] for r in rs), "rounds": cfg.rounds, "date": date})
    load = [load_before, round(os.getloadavg()[0], 2)]
    for line in lines:  # printed at the end, so that every line carries the load after the whole run
        print(json.dumps({**line, "malloc": hostmem.setting(), "load_avg_1m": load, "load_avg_1m_before": load[0],
                          "load_avg_1m_after": load[1]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(configlib.run(main, prog="python -m benchmarks.htopk_step"))

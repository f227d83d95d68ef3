"""Seed-ensemble step throughput (vmapped S seeds vs S separate 1-seed steps) and CacheSource read speed.

Run: `python -m benchmarks.train_step [key=value ...]` from the repository root. Prints JSON lines:
- `{"bench": "hlo", ...}`: [..., B, n·M]-shaped matmuls in the compiled train step vs in the bare vmapped
  value_and_grad of the loss (with AuxK); equal counts mean the firing statistics (`sae.encode` on the same params and
  batch) were merged with the loss's encoder by XLA and cost no extra matmul.
- `{"bench": "step", "seeds": S, ...}`: best step time over `reps` timed steps after one warm-up step (the
  ensemble sizes take turns), and tokens·seeds/s; `vs_separate` is S·t(1 seed)/t(S seeds), the speed-up
  over running the seeds one by one. Also `impl` (`jaxsae_S{S}`), `tokens_per_s` (= tokens·seeds/s),
  `step_over_matmul` (best step / S / the best dense B×D @ D×M encoder matmul, timed in the same turns, i.e. per
  seed), `peak_bytes` (the most one step raised the resident-set high-water mark, see
  `benchmarks.sae_step.peak_rss_bytes`), `xla_temp_bytes` and `load_avg_1m` ([before, after] the whole run).
- `{"bench": "cache", ...}`: float16 cache on local disk → float32 batches through the shuffle buffer.
"""
from __future__ import annotations

import dataclasses
import json
import re
import sys
import tempfile
import time

import jax
import numpy as np
import tqdm

from benchmarks.sae_step import load_avg_1m, peak_rss_bytes
from jaxsae import configlib, data, sae, train


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    batch: int = 1024  # tokens per step per seed (B)
    d_in: int = 576  # input width (D), SmolLM2-135M's d_model
    d_sae: int = 4608  # latents (M)
    k: int = 32  # active latents per token
    activation: str = "topk"  # SAE activation, see SAEConfig
    aux_k: int = 0  # AuxK latents (SAEConfig.aux_k); its [B, aux_k, D] gather dominates CPU steps when > 0
    seeds: tuple[int, ...] = (1, 2, 4)  # ensemble sizes to time
    reps: int = 5  # timed steps per ensemble size, taken in turns
    cache_tokens: int = 2**17  # tokens in the cache for the read benchmark (0 skips it)
    cache_batches: int = 32  # batches read in the cache benchmark


def _bxm_dots(compiled_text: str, b: int, m: int) -> int:
    """Matmuls whose output is [..., B, n·M]: [S, B, M], [B, M] (XLA:CPU's encoder loop) or seeds side by side."""
    dims = [[int(d) for d in s.split(",")] for s in re.findall(r"= f32\[([\d,]+)\]\S* dot\(", compiled_text)]
    return sum(len(d) >= 2 and d[-2] == b and d[-1] % m == 0 for d in dims)


def bench_hlo(cfg: BenchConfig, sae_cfg: sae.SAEConfig) -> dict:
    b, m = 40, 96  # tiny shapes: the HLO structure does not depend on size
    small = dataclasses.replace(sae_cfg, d_in=24, d_sae=m, k=min(sae_cfg.k, 4), aux_k=8)
    tcfg = train.TrainConfig(batch_size=b, num_steps=10, n_seeds=2)
    state = train.init_state(jax.random.key(0), small, tcfg)
    x = np.zeros((b, 24), np.float32)
    step_text = train.make_train_step(small, tcfg).lower(state, x).compile().as_text()
    # The dead mask is an argument (as in the step), not a constant that XLA would fold AuxK away with.
    grad = jax.jit(jax.vmap(jax.value_and_grad(lambda p, x, dead_M: sae.loss(p, x, small, dead_M)[0]),
                            in_axes=(0, None, None)))
    grad_text = grad.lower(state.params, x, np.zeros((m,), bool)).compile().as_text()
    return {"bench": "hlo", "activation": small.activation, "bxm_dots_step": _bxm_dots(step_text, b, m),
            "bxm_dots_loss_grad": _bxm_dots(grad_text, b, m)}


def bench_steps(cfg: BenchConfig, sae_cfg: sae.SAEConfig) -> list[dict]:
    """Compile every ensemble size first, then time them in turns so that outside load hits them alike."""
    x = np.random.default_rng(0).normal(size=(cfg.batch, cfg.d_in)).astype(np.float32)
    runs, first, xla_temp = {}, {}, {}
    for n in tqdm.tqdm(cfg.seeds, desc="compile", file=sys.stderr):
        tcfg = train.TrainConfig(batch_size=cfg.batch, num_steps=1000, n_seeds=n)
        step, state = train.make_train_step(sae_cfg, tcfg), train.init_state(jax.random.key(0), sae_cfg, tcfg)
        xla_temp[n] = int(step.lower(state, x).compile().memory_analysis().temp_size_in_bytes)
        t0 = time.perf_counter()
        state, m = step(state, x)
        jax.block_until_ready(m)
        first[n], runs[n] = time.perf_counter() - t0, [step, state]
    matmul = jax.jit(lambda a, b: a @ b)
    W_DxM = np.random.default_rng(1).normal(size=(cfg.d_in, cfg.d_sae)).astype(np.float32)
    jax.block_until_ready(matmul(x, W_DxM))
    times, peaks, matmul_times = {n: [] for n in cfg.seeds}, {n: [] for n in cfg.seeds}, []

    def one_step(n):
        runs[n][1], m = runs[n][0](runs[n][1], x)
        jax.block_until_ready(m)

    for _ in tqdm.trange(cfg.reps, desc="time", file=sys.stderr):
        for n in cfg.seeds:
            t0 = time.perf_counter()
            peaks[n].append(peak_rss_bytes(lambda: one_step(n)))  # noqa: B023 (called at once)
            times[n].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        jax.block_until_ready(matmul(x, W_DxM))
        matmul_times.append(time.perf_counter() - t0)
    one = min(times[1]) if 1 in times else None
    rows = []
    for n in cfg.seeds:
        best = min(times[n])
        known = [p for p in peaks[n] if p is not None]
        rows.append({"bench": "step", "impl": f"jaxsae_S{n}", "seeds": n, "batch": cfg.batch, "d_in": cfg.d_in,
                     "d_sae": cfg.d_sae, "k": cfg.k, "activation": cfg.activation, "aux_k": cfg.aux_k,
                     "compile_and_first_s": round(first[n], 3), "step_s": round(best, 4),
                     "median_step_s": round(float(np.median(times[n])), 4),
                     "tokens_x_seeds_per_s": round(n * cfg.batch / best, 1),
                     "tokens_per_s": round(n * cfg.batch / best, 1),
                     "step_over_matmul": round(best / n / min(matmul_times), 3),
                     "peak_bytes": max(known) if known else None, "xla_temp_bytes": xla_temp[n],
                     **({"vs_separate": round(n * one / best, 2)} if one else {})})
    return rows


def bench_cache(cfg: BenchConfig) -> dict:
    with tempfile.TemporaryDirectory() as d:
        rng = np.random.default_rng(0)
        with data.CacheWriter(d, {"model": "bench"}, d_in=cfg.d_in, shard_tokens=2**15) as w:
            for _ in range(cfg.cache_tokens // 2**14):
                w.add(rng.normal(size=(2**14, cfg.d_in)).astype(np.float32))
        source = data.CacheSource(d)
        t0 = time.perf_counter()
        it = source.batches(4096, seed=0)
        next(it)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in tqdm.trange(cfg.cache_batches - 1, desc="cache", file=sys.stderr):
            next(it)
        rest = time.perf_counter() - t0
    return {"bench": "cache", "d_in": cfg.d_in, "dtype": "float16", "cache_tokens": source.num_tokens,
            "buffer_tokens": source.buffer_tokens, "first_batch_s": round(first, 3),
            "tokens_per_s": round((cfg.cache_batches - 1) * 4096 / rest, 1)}


def main(argv: list[str] | None = None) -> int:
    cfg = configlib.parse(BenchConfig(), argv)
    if cfg is None:
        return 0
    load_before = load_avg_1m()
    sae_cfg = sae.SAEConfig(d_in=cfg.d_in, d_sae=cfg.d_sae, k=cfg.k, activation=cfg.activation, aux_k=cfg.aux_k)
    print(json.dumps(bench_hlo(cfg, sae_cfg)), flush=True)
    rows = bench_steps(cfg, sae_cfg)
    load = [load_before, load_avg_1m()]
    for row in rows:
        print(json.dumps({**row, "load_avg_1m": load, "load_avg_1m_before": load[0], "load_avg_1m_after": load[1]}),
              flush=True)
    if cfg.cache_tokens:
        print(json.dumps(bench_cache(cfg)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(configlib.run(main, prog="python -m benchmarks.train_step"))

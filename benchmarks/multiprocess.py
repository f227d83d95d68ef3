"""The SAE ensemble step on 1 process x 4 CPU devices vs 2 processes x 2 (JAX's multi-controller runtime, gloo).

Run: `python -m benchmarks.multiprocess [key=value ...]` from the repository root (`help` lists the fields). For
each mesh layout in `meshes` it runs two jobs in turn, `rounds` times: `python -m benchmarks.multiprocess
mode=worker cpu_devices=4 ...` (one process) and `python -m jaxsae.launch -n 2 --cpu-devices 2 -- python -m
benchmarks.multiprocess mode=worker ...` (two). A worker joins the job (`jaxsae.distributed.initialize` from the
key=value options the launcher appends), builds the step with `jaxsae.train.make_train_step(..., mesh=
jaxsae.sharding.make_mesh(...))` on all 4 devices, feeds global batches of random rows with
`jaxsae.distributed.global_array` (each process builds only its block), times `steps` steps after `warmup`
(each step blocked on, so step times do not overlap) and prints from process 0 only.

On a machine with fewer cores than devices the two layouts share the same cores: the ratio measures what the
runtime costs (cross-process collectives over gloo, per-process dispatch, host transfers), not a speed-up.
Mesh layouts are `SEEDxDATA` (seed axis outer): `2x2` puts the seeds across processes (no gradient crosses a
process), `1x4` splits every batch across them (each step all-reduces the gradients over gloo).
JSON lines, one per job (best round): `{"impl": "1proc_4dev" | "2proc_2dev", "mesh", "processes",
"devices_per_process", "step_s", "median_step_s", "tokens_per_s", "seed_tokens_per_s", "compile_and_first_s",
"job_s", "final_loss", "load_avg_1m_before", "load_avg_1m_after"}` (`tokens_per_s`: rows per second each seed
trains on; load averages around that job), then per mesh `{"bench": "overhead", "mesh", "overhead",
"median_overhead", "final_loss_max_rel_diff"}`: overhead = 2-process step / 1-process step (> 1: slower); the
loss difference checks both jobs trained the same thing (float32 rounding of reordered reductions only).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from jaxsae import configlib, distributed

DEVICES = 4  # devices in every job: 1 process x 4, or 2 processes x 2
JOBS = (("1proc_4dev", 1, 4), ("2proc_2dev", 2, 2))  # (impl, processes, devices per process)


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    mode: str = "compare"  # compare: run both jobs per mesh, print the comparison; worker: one job (compare runs it)
    meshes: tuple[str, ...] = ("2x2", "1x4")  # mesh layouts SEEDxDATA over the 4 devices (a worker takes one)
    n_seeds: int = 4  # ensemble size S (divisible by the seed axis)
    batch: int = 4096  # rows per step, one batch shared by all seeds (divisible by the data axis)
    d_in: int = 576  # input width D (SmolLM2-135M's d_model)
    d_sae: int = 2304  # latents M
    k: int = 32  # active latents per token (TopK, no AuxK)
    warmup: int = 2  # untimed steps (compilation, first collectives)
    steps: int = 10  # timed steps per job
    rounds: int = 1  # every job runs this many times, jobs alternating; the best round is reported
    job_timeout_s: int = 1800  # a job that runs longer is an error
    step_timeout_s: int = 300  # a worker stuck this long in one step (compile, a step, the final gather) exits naming it


def load_avg_1m() -> float:
    """The 1-minute load average (the machine is shared: figures mean little when it is high)."""
    return float(Path("/proc/loadavg").read_text().split()[0])


def parse_mesh(text: str) -> tuple[int, int]:
    """"SxD" -> (seed, data) devices; their product must be DEVICES."""
    m = re.fullmatch(r"(\d+)x(\d+)", text.strip())
    if not m or int(m[1]) * int(m[2]) != DEVICES:
        raise ValueError(f"mesh {text!r} must be SEEDxDATA with SEED * DATA = {DEVICES}, e.g. 2x2 or 1x4")
    return int(m[1]), int(m[2])


def _split(argv: list[str]) -> tuple[list[str], list[str]]:
    """key=value options of DistConfig (what the launcher appends) apart from the rest."""
    dist_fields = {f.name for f in dataclasses.fields(distributed.DistConfig)}
    mine = [a for a in argv if a.split("=", 1)[0].strip().lstrip("-").replace("-", "_") not in dist_fields]
    return mine, [a for a in argv if a not in mine]


def worker(cfg: BenchConfig, dist_cfg: distributed.DistConfig) -> None:
    """One job: join it, time the step on the global mesh, print one JSON line from process 0."""
    distributed.initialize(dist_cfg)  # before any JAX computation (bounded by init_timeout_s)
    import jax

    from jaxsae import sae, sharding, train

    if len(cfg.meshes) != 1:
        raise ValueError(f"a worker runs one mesh, got meshes={list(cfg.meshes)}")
    seed_axis, data_axis = parse_mesh(cfg.meshes[0])
    if jax.device_count() != DEVICES:
        raise ValueError(f"the job has {jax.device_count()} devices, the benchmark compares layouts of {DEVICES}")
    dog = distributed.Watchdog(cfg.step_timeout_s, prog="benchmarks.multiprocess")
    mesh = sharding.make_mesh(seed=seed_axis, data=data_axis)
    sae_cfg = sae.SAEConfig(d_in=cfg.d_in, d_sae=cfg.d_sae, k=cfg.k, activation="topk", aux_k=0)
    tcfg = train.TrainConfig(batch_size=cfg.batch, n_seeds=cfg.n_seeds, num_steps=10**6)
    step = train.make_train_step(sae_cfg, tcfg, mesh=mesh)  # checks S, M and B divide over the mesh
    abstract = jax.eval_shape(lambda: train.init_state(jax.random.key(0), sae_cfg, tcfg))
    state_sh = sharding.state_shardings(mesh, abstract)
    with dog.step("the initial state"):
        state = jax.jit(lambda key: train.init_state(key, sae_cfg, tcfg), out_shardings=state_sh)(jax.random.key(0))
        jax.block_until_ready(state)

    shape = (cfg.batch, cfg.d_in)
    batch_sh = sharding.batch_sharding(mesh, per_seed=False)
    rows = distributed.process_box(batch_sh, shape)[0]
    # Two global batches, the same for any process count; each process keeps only its rows.
    pool = [np.random.default_rng(i).normal(size=shape).astype(np.float32)[rows] for i in range(2)]

    def one(i: int):
        nonlocal state
        with dog.step(f"step {i} ({'compile and warm-up' if i < cfg.warmup else 'timed'})"):
            state, m = step(state, distributed.global_array(batch_sh, pool[i % 2], shape))
            return jax.block_until_ready(m)

    t0 = time.perf_counter()
    for i in range(cfg.warmup):
        one(i)
    first = time.perf_counter() - t0
    times = []
    for i in range(cfg.steps):
        t0 = time.perf_counter()
        m = one(cfg.warmup + i)
        times.append(time.perf_counter() - t0)
    with dog.step("the final loss gather (a collective)"):
        loss = distributed.to_host(m["loss"])  # a collective: every process calls it
    if distributed.is_main():
        print(json.dumps({"step_s": min(times), "median_step_s": float(np.median(times)), "compile_and_first_s": first,
                          "final_loss": np.asarray(loss, np.float64).tolist(), "devices": jax.device_count(),
                          "processes": jax.process_count()}), flush=True)
    if jax.process_count() > 1:
        with dog.step("jax.distributed.shutdown (its barrier waits for every process)"):
            jax.distributed.shutdown()


def run_job(cfg: BenchConfig, mesh: str, processes: int, devices: int) -> dict:
    """Start one job as a user would, and return process 0's JSON line (plus wall time and load)."""
    opts = [f"{f.name}={','.join(map(str, v)) if isinstance(v, tuple) else v}"
            for f in dataclasses.fields(cfg) for v in [getattr(cfg, f.name)] if f.name not in ("mode", "meshes")]
    me = [sys.executable, "-m", "benchmarks.multiprocess", "mode=worker", f"meshes={mesh}", *opts]
    if processes == 1:
        cmd = me + [f"cpu_devices={devices}"]
    else:
        cmd = [sys.executable, "-m", "jaxsae.launch", "-n", str(processes), "--cpu-devices", str(devices), "--", *me]
    env = dict(os.environ)  # the devices come from cpu_devices (jax_num_cpu_devices), never from XLA_FLAGS
    env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")).strip()
    before, t0 = load_avg_1m(), time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=cfg.job_timeout_s)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"job {processes}x{devices} mesh {mesh} ran past job_timeout_s={cfg.job_timeout_s}") from None
    job_s, after = time.perf_counter() - t0, load_avg_1m()
    lines = [re.sub(r"^\[\d+\] ", "", line) for line in proc.stdout.splitlines()]
    rows = [json.loads(line) for line in lines if line.startswith("{")]
    if proc.returncode or len(rows) != 1:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
        raise RuntimeError(f"job {processes}x{devices} mesh {mesh} exited {proc.returncode} with {len(rows)} result "
                           "lines:\n" + "\n".join(tail))
    return {**rows[0], "job_s": job_s, "load_avg_1m_before": before, "load_avg_1m_after": after}


def compare(cfg: BenchConfig) -> None:
    for mesh in cfg.meshes:
        parse_mesh(mesh)
    for name in ("steps", "rounds", "n_seeds", "batch"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {cfg.warmup}")
    results = {}
    for _ in range(cfg.rounds):
        for mesh in cfg.meshes:
            for impl, processes, devices in JOBS:
                print(f"[multiprocess] mesh {mesh}: {processes} process(es) x {devices} devices", file=sys.stderr,
                      flush=True)
                results.setdefault((mesh, impl), []).append(run_job(cfg, mesh, processes, devices))
    for mesh in cfg.meshes:
        best = {}
        for impl, processes, devices in JOBS:
            r = min(results[mesh, impl], key=lambda r: r["step_s"])
            best[impl] = r
            print(json.dumps({
                "impl": impl, "mesh": mesh, "processes": processes, "devices_per_process": devices,
                "n_seeds": cfg.n_seeds, "batch": cfg.batch, "d_in": cfg.d_in, "d_sae": cfg.d_sae, "k": cfg.k,
                "steps": cfg.steps, "step_s": round(r["step_s"], 4), "median_step_s": round(r["median_step_s"], 4),
                "tokens_per_s": round(cfg.batch / r["step_s"], 1),
                "seed_tokens_per_s": round(cfg.n_seeds * cfg.batch / r["step_s"], 1),
                "compile_and_first_s": round(r["compile_and_first_s"], 3), "job_s": round(r["job_s"], 2),
                "final_loss": r["final_loss"], "load_avg_1m_before": r["load_avg_1m_before"],
                "load_avg_1m_after": r["load_avg_1m_after"]}), flush=True)
        one, two = best["1proc_4dev"], best["2proc_2dev"]
        a, b = np.asarray(one["final_loss"]), np.asarray(two["final_loss"])
        print(json.dumps({"bench": "overhead", "mesh": mesh, "overhead": round(two["step_s"] / one["step_s"], 3),
                          "median_overhead": round(two["median_step_s"] / one["median_step_s"], 3),
                          "final_loss_max_rel_diff": float(np.max(np.abs(a - b) / np.abs(a)))}), flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    mine, dist_argv = _split(argv)
    cfg = configlib.parse(BenchConfig(), mine)
    if cfg is None:
        return 0
    if cfg.mode == "worker":
        worker(cfg, configlib.override(distributed.DistConfig(), dist_argv))
    elif cfg.mode == "compare":
        if dist_argv:
            raise ValueError(f"{dist_argv} are set by the benchmark itself (mode=worker only)")
        compare(cfg)
    else:
        raise ValueError(f"mode must be compare or worker, got {cfg.mode!r}")
    return 0


if __name__ == "__main__":
    sys.exit(configlib.run(main, prog="python -m benchmarks.multiprocess"))

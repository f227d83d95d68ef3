"""Seed-ensemble SAE training: one jitted step vmapped over S seeds, sharded over (seed, data, model).

`train_step(state, batch)` per seed: grad of `loss_fn` → remove the decoder-norm component of dW_dec →
global-norm clip → Adam with warm-up + decay → renormalise decoder rows → update firing stats (a latent is
dead once it has not fired for `dead_after_tokens` tokens; the dead mask feeds the next step's AuxK).
`fit` runs it over an activation source with a progress bar, a JSON-lines log, orbax checkpoints that also
record the data position (resuming gives the same final state bit for bit; damaged checkpoints are skipped,
see `jaxsae.checkpoint`), and saves every seed in the SAELens layout. On a source of several layers
(`stream.LayersSource`, `jaxsae train source=model layers=3,5`) it trains one S-seed ensemble per layer in the same
step: L*S members, fed by one LM forward per batch. `jaxsae train key=value ...` is the command line.

Extending a run: `fit` on an `out_dir` that holds a finished or interrupted run, with `num_steps`/`num_tokens`
changed and nothing else that matters, continues it from its checkpoint. The warm-up + decay schedule is
defined over the NEW total, so the run resumes at its step s on `lr_schedule(new config)(s)` (a finished run's
learning rate jumps back up from its final value to the new curve's value at s); one line on stderr says so and
config.json records the new total. A total below the checkpointed step is an error.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from jaxsae import checkpoint, configlib, data, distributed, io, metrics, sae, sharding

# tokens_since_fired saturates here instead of overflowing int32 on long runs.
_SINCE_MAX = 2**30


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    lr: float = 4e-4  # peak Adam learning rate
    warmup_steps: int = 100  # linear warm-up from 0 to lr over this many steps
    decay: str = "cosine"  # after warm-up, lr goes to final_lr_frac * lr at the last step: cosine | linear | constant
    final_lr_frac: float = 0.1  # learning rate at the last step, as a fraction of lr
    b1: float = 0.9  # Adam beta1
    b2: float = 0.999  # Adam beta2
    eps: float = 1e-8  # Adam epsilon
    grad_clip: float = 1.0  # clip each seed's gradient to this global norm (0 disables)
    batch_size: int = 4096  # tokens per step, per seed
    num_steps: int = 0  # optimiser steps; 0 means num_tokens // batch_size
    num_tokens: int = 10_000_000  # tokens per seed, used when num_steps is 0
    n_seeds: int = 4  # ensemble size S
    seed: int = 0  # base seed: the S init keys are split from it and the data orders derive from it
    data_order: str = "same"  # same: every seed sees the same batches; per_seed: each seed its own order
    dead_after_tokens: int = 10_000_000  # a latent that has not fired for this many tokens is dead (AuxK target)
    mesh_seed: int = 1  # devices along the mesh's seed axis
    mesh_data: int = 1  # devices along the mesh's data (batch) axis
    mesh_model: int = 1  # devices along the mesh's model (latent) axis
    checkpoint_every: int = 1000  # steps between checkpoints (0: only the last step)
    keep_checkpoints: int = 2  # how many of the latest checkpoints stay on disk
    log_every: int = 100  # steps between lines of metrics.jsonl
    out_dir: str = "runs/train"  # run folder: config.json, metrics.jsonl, checkpoints/, seed_{s}/

    def __post_init__(self):
        if self.decay not in ("cosine", "linear", "constant"):
            raise ValueError(f"decay must be cosine, linear or constant, got {self.decay!r}")
        if self.data_order not in ("same", "per_seed"):
            raise ValueError(f"data_order must be same or per_seed, got {self.data_order!r}")
        if not 0.0 <= self.final_lr_frac <= 1.0:
            raise ValueError(f"final_lr_frac must be in [0, 1], got {self.final_lr_frac}")
        for name in ("batch_size", "n_seeds", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.total_steps < 1:
            raise ValueError(
                f"no steps to train: num_steps={self.num_steps}, num_tokens={self.num_tokens}, "
                f"batch_size={self.batch_size}"
            )

    @property
    def total_steps(self) -> int:
        return self.num_steps or self.num_tokens // self.batch_size

    @property
    def data_seeds(self) -> list[int]:
        """The seed of each ensemble member's data order (one shared seed for data_order=same)."""
        if self.data_order == "same":
            return [self.seed]
        return [self.seed * 100_003 + s for s in range(self.n_seeds)]


class TrainState(NamedTuple):
    """Everything a step reads and writes; every leaf has a leading seed axis S (L*S members for L layers)."""

    params: dict  # SAE params, e.g. W_enc [S, D, M]
    opt_state: Any  # optax state (Adam moments mirror params)
    step: jax.Array  # [S] int32, steps taken
    tokens_since_fired: jax.Array  # [S, M] int32, saturating at 2^30
    fire_count: jax.Array  # [S, M] float32, tokens on which each latent fired


def lr_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warm-up from 0, then cosine / linear / constant down to `final_lr_frac * lr` at the last step."""
    warm = min(cfg.warmup_steps, cfg.total_steps)
    rest = max(cfg.total_steps - warm, 1)
    after = {
        "cosine": lambda: optax.cosine_decay_schedule(cfg.lr, rest, alpha=cfg.final_lr_frac),
        "linear": lambda: optax.linear_schedule(cfg.lr, cfg.lr * cfg.final_lr_frac, rest),
        "constant": lambda: optax.constant_schedule(cfg.lr),
    }[cfg.decay]()
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warm), after], [warm])


def optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping (of one seed's gradients, under the seed vmap) then Adam on `lr_schedule`."""
    clip = optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity()
    return optax.chain(clip, optax.adam(lr_schedule(cfg), cfg.b1, cfg.b2, cfg.eps))


def init_state(key: jax.Array, sae_cfg: sae.SAEConfig, train_cfg: TrainConfig, b_dec_init=None) -> TrainState:
    """S independently initialised SAEs (keys split from `key`) and their optimiser state."""
    keys = jax.random.split(key, train_cfg.n_seeds)
    params = jax.vmap(lambda k: sae.init(k, sae_cfg, b_dec_init))(keys)
    S, M = train_cfg.n_seeds, sae_cfg.d_sae
    return TrainState(
        params=params,
        opt_state=jax.vmap(optimizer(train_cfg).init)(params),
        step=jnp.zeros((S,), jnp.int32),
        tokens_since_fired=jnp.zeros((S, M), jnp.int32),
        fire_count=jnp.zeros((S, M), jnp.float32),
    )


def fire_counts(params: dict, x_BxD: jax.Array, sae_cfg: sae.SAEConfig) -> jax.Array:
    """[M] number of tokens of the batch on which each latent fired."""
    code = sae.encode(params, x_BxD, sae_cfg)
    if isinstance(code, sae.Code):
        return jnp.zeros((sae_cfg.d_sae,), jnp.float32).at[code.idx_BxK].add((code.vals_BxK > 0).astype(jnp.float32))
    return jnp.sum(code != 0, axis=0).astype(jnp.float32)


@functools.lru_cache(maxsize=16)  # configs are hashable: equal arguments reuse one compiled step
def make_train_step(sae_cfg: sae.SAEConfig, train_cfg: TrainConfig, loss_fn: Callable | None = None, mesh=None):
    """Jitted `train_step(state, batch) -> (state, metrics [S])`; batch [B, D] (data_order=same) or [S, B, D].

    `loss_fn(params, x_BxD, dead_M) -> (scalar, metrics)` is for one seed (default: `sae.loss`). Firing
    stats come from `sae.encode` on the pre-update params, which XLA merges with the loss's own encoder.
    """
    if loss_fn is None:
        loss_fn = lambda params, x_BxD, dead_M: sae.loss(params, x_BxD, sae_cfg, dead_M)  # noqa: E731
    tx = optimizer(train_cfg)
    lr = lr_schedule(train_cfg)
    S, B, D = train_cfg.n_seeds, train_cfg.batch_size, sae_cfg.d_in
    per_seed = train_cfg.data_order == "per_seed"

    def seed_step(state: TrainState, x_BxD: jax.Array):
        dead_M = state.tokens_since_fired >= train_cfg.dead_after_tokens
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, x_BxD, dead_M)
        grads = sae.project_decoder_grads(state.params, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = sae.normalize_decoder(optax.apply_updates(state.params, updates))
        fired_M = fire_counts(state.params, x_BxD, sae_cfg)
        since_M = jnp.where(fired_M > 0, 0, jnp.minimum(state.tokens_since_fired + B, _SINCE_MAX))
        out = {**aux, "loss": loss, "dead_frac": jnp.mean(dead_M), "grad_norm": optax.global_norm(grads),
               "lr": lr(state.step)}
        return TrainState(params, opt_state, state.step + 1, since_M, state.fire_count + fired_M), out

    def train_step(state: TrainState, batch: jax.Array):
        want = (S, B, D) if per_seed else (B, D)
        if batch.shape != want:
            raise ValueError(f"batch must have shape {want} (data_order={train_cfg.data_order}), got {batch.shape}")
        return jax.vmap(seed_step, in_axes=(0, 0 if per_seed else None))(state, batch)

    if mesh is None:
        return jax.jit(train_step, donate_argnums=0)
    sharding.check_sae_divides(mesh, S, sae_cfg.d_sae, B)
    state_sh = sharding.state_shardings(mesh, _abstract_state(sae_cfg, train_cfg))
    batch_sh = sharding.batch_sharding(mesh, per_seed)
    return jax.jit(train_step, in_shardings=(state_sh, batch_sh),
                   out_shardings=(state_sh, NamedSharding(mesh, P("seed"))), donate_argnums=0)


def _abstract_state(sae_cfg, train_cfg) -> TrainState:
    return jax.eval_shape(lambda: init_state(jax.random.key(0), sae_cfg, train_cfg))


def evaluate(params: dict, sae_cfg: sae.SAEConfig, x_NxD: np.ndarray, chunk: int = 4096) -> dict:
    """Per-seed EV, L0 and dead fraction (latents that never fire) of an ensemble on normalised tokens x_NxD."""

    @jax.jit
    def update(params, stats_S, l0_sum_S, fires_SxM, x_BxD):
        def one(p, st):
            code = sae.encode(p, x_BxD, sae_cfg)
            x_hat_BxD = sae.decode(p, code, sae_cfg)
            return (metrics.ev_stats_update(st, x_BxD, x_hat_BxD), metrics.l0(code) * x_BxD.shape[0],
                    fire_counts(p, x_BxD, sae_cfg))
        stats_S, l0_S, fires_SxM_batch = jax.vmap(one)(params, stats_S)
        return stats_S, l0_sum_S + l0_S, fires_SxM + fires_SxM_batch

    S = jax.tree.leaves(params)[0].shape[0]
    stats_S = jax.vmap(lambda _: metrics.ev_stats_init(sae_cfg.d_in))(jnp.arange(S))
    l0_sum_S, fires_SxM = jnp.zeros((S,)), jnp.zeros((S, sae_cfg.d_sae))
    for i in range(0, len(x_NxD), chunk):
        stats_S, l0_sum_S, fires_SxM = update(params, stats_S, l0_sum_S, fires_SxM, jnp.asarray(x_NxD[i : i + chunk]))
    return {"ev": (1.0 - jax.vmap(metrics.ev_stats_fvu)(stats_S)).tolist(), "l0": (l0_sum_S / len(x_NxD)).tolist(),
            "dead_frac": jax.vmap(metrics.dead_fraction)(fires_SxM).tolist()}


# Fields that do not change what is computed (the mesh only reorders float reductions; a run folder may be moved).
_RESUME_MAY_CHANGE = {"log_every", "checkpoint_every", "keep_checkpoints", "mesh_seed", "mesh_data", "mesh_model",
                      "out_dir"}
# Fields that set the run's length: a resumed run may change them, on the schedule over the new total (`_set_length`).
_LENGTH = {"num_steps", "num_tokens"}


def _read_config(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is damaged ({type(err).__name__}: {err}); restore it or use a new out_dir") from None


def field_defaults(cls) -> dict:
    """{field: default} of a config dataclass's fields that have one."""
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def check_run_config(out: Path, run: dict, resuming: bool, may_change, write: bool = True,
                     defaults: dict | None = None) -> dict | None:
    """Write config.json for a new run (None); for a resumed one check it matches but for `may_change`, and return it.

    `defaults` ({group: {field: value}}) fills fields a run folder's config.json lacks because they were added to
    the config after the run was written: a new field's default keeps the old behaviour, so such a run resumes.
    """
    path = out / "config.json"
    if not resuming:
        if write:
            path.write_text(json.dumps(run, indent=1))
        return None
    old = _read_config(path)
    filled = {g: {k: v for k, v in fields.items() if k not in old.get(g, {})} for g, fields in (defaults or {}).items()}
    if any(filled.values()):
        for g, fields in filled.items():
            old.setdefault(g, {}).update(fields)
        if write:  # the folder's record gains the fields it was run with, nothing it holds changes
            path.write_text(json.dumps(old, indent=1))
    diff = [f"{g}.{k}: {old.get(g, {}).get(k)!r} -> {v!r}" for g in run for k, v in run[g].items()
            if old.get(g, {}).get(k) != v and k not in may_change]
    if diff:
        raise ValueError(f"{out} holds a run with another configuration; use a new out_dir. Differences: {diff}")
    return old


def set_run_length(out: Path, old: dict, start: int, lengths: dict, old_total: int, total: int, schedule: str,
                   write: bool = True) -> None:
    """A resumed run's new total of `total` steps, set by `lengths` (the train fields that set it; one of them is
    the total itself): at least the restored step; if changed, a line on stderr says so and config.json records
    `lengths` under "train"."""
    if total < start:
        given = ", ".join(f"{k}={v}" for k, v in lengths.items())
        says = f"is fewer than the {start} steps" if len(lengths) == 1 else f"give {total} steps, fewer than the {start}"
        raise ValueError(f"{given} {says} already taken by the checkpoint in {out}")
    if total != old_total and write:
        print(f"{out}: run length {old_total} -> {total} steps; resuming at step {start} on the warm-up + "
              f"{schedule} schedule redefined over {total} steps", file=sys.stderr, flush=True)
        old["train"].update(lengths)
        (out / "config.json").write_text(json.dumps(old, indent=1))


def _check_config(out: Path, sae_cfg, train_cfg, resuming: bool, write: bool = True, more: dict | None = None
                  ) -> dict | None:
    """`check_run_config` for an SAE run; `more`: further groups of settings, e.g. {"stream": {"layers": [3, 5]}}."""
    run = {"sae": dataclasses.asdict(sae_cfg), "train": dataclasses.asdict(train_cfg), **(more or {})}
    defaults = {"sae": field_defaults(type(sae_cfg)), "train": field_defaults(type(train_cfg))}
    return check_run_config(out, run, resuming, _RESUME_MAY_CHANGE | _LENGTH, write, defaults)


def _set_length(out: Path, old: dict, train_cfg: TrainConfig, start: int, write: bool = True) -> None:
    """`set_run_length` for an SAE run, whose length is num_steps or else num_tokens // batch_size."""
    old_train = old["train"]
    old_total = old_train["num_steps"] or old_train["num_tokens"] // old_train["batch_size"]
    set_run_length(out, old, start, {"num_steps": train_cfg.num_steps, "num_tokens": train_cfg.num_tokens},
                   old_total, train_cfg.total_steps, train_cfg.decay, write)


def _compute_part(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with the fields that do not change the step reset, so equal computations share one compile."""
    return dataclasses.replace(cfg, **{k: getattr(TrainConfig, k) for k in _RESUME_MAY_CHANGE})


def _members_cfg(train_cfg: TrainConfig, n_layers: int) -> TrainConfig:
    """The step's config for one ensemble per layer (n_layers > 0): L*S members on the seed axis, each its own batch."""
    if not n_layers:
        return train_cfg
    return dataclasses.replace(train_cfg, n_seeds=n_layers * train_cfg.n_seeds, data_order="per_seed")


@functools.lru_cache(maxsize=8)
def _compiled(sae_cfg, train_cfg, loss_fn, mesh, n_layers: int = 0):
    """(train_step, init(key, b_dec_init), state shardings), reused across `fit` calls on one mesh. `n_layers` > 0:
    that many ensembles on the seed axis, each initialised as a one-layer run is (the same S keys)."""
    step_cfg = _members_cfg(train_cfg, n_layers)
    state_sh = sharding.state_shardings(mesh, _abstract_state(sae_cfg, step_cfg))

    def init(key, b_dec_init):
        state = init_state(key, sae_cfg, train_cfg, b_dec_init)
        return jax.tree.map(lambda a: jnp.concatenate([a] * n_layers), state) if n_layers else state

    return make_train_step(sae_cfg, step_cfg, loss_fn, mesh), jax.jit(init, out_shardings=state_sh), state_sh


def fit(source, sae_cfg: sae.SAEConfig, train_cfg: TrainConfig, loss_fn: Callable | None = None,
        b_dec_init=None) -> TrainState:
    """Train the ensemble on `source`, resuming from `out_dir`'s latest intact checkpoint if there is one.

    A source of several layers (`stream.LayersSource`) gets one ensemble per layer: member l*S + s is layer l's seed
    s, starts as seed s of a one-layer run does, and is saved to L{layer}/seed_{s}/ with its layer's Normalizer.
    """
    if source.d_in != sae_cfg.d_in:
        raise ValueError(f"source d_in={source.d_in} but sae d_in={sae_cfg.d_in}")
    mesh = sharding.make_mesh(train_cfg.mesh_seed, train_cfg.mesh_data, train_cfg.mesh_model)
    n_layers = len(source.layers) if hasattr(source, "member_batches") else 0  # 0: one ensemble, no layer axis
    step_cfg = _members_cfg(train_cfg, n_layers)
    step_fn, init, state_sh = _compiled(sae_cfg, _compute_part(train_cfg), loss_fn, mesh, n_layers)
    out = Path(train_cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manager = checkpoint.manager(out, train_cfg.keep_checkpoints)
    position = {"data_order": train_cfg.data_order, "data_seeds": train_cfg.data_seeds,
                "batch_size": train_cfg.batch_size, "num_tokens_in_source": source.num_tokens}
    main_process = distributed.is_main()  # files written once are written by process 0
    old_cfg = _check_config(out, sae_cfg, train_cfg, resuming=bool(manager.all_steps()), write=main_process,
                            more={"stream": {"layers": list(source.layers)}} if n_layers else {})
    restored = checkpoint.restore_latest(manager, _abstract_state(sae_cfg, step_cfg), state_sh, position)
    if restored is None:
        start, state = 0, init(jax.random.key(train_cfg.seed), b_dec_init)
    else:
        start, state = restored
        _set_length(out, old_cfg, train_cfg, start, write=main_process)
    if main_process:
        checkpoint.trim_log(out / "metrics.jsonl", start)

    # Each process reads only its block of every global batch: rows over (data, fsdp), seeds over seed.
    per_seed, S, B = step_cfg.data_order == "per_seed", step_cfg.n_seeds, train_cfg.batch_size
    shape = (S, B, sae_cfg.d_in) if per_seed else (B, sae_cfg.d_in)
    batch_sh = sharding.batch_sharding(mesh, per_seed)
    box = distributed.process_box(batch_sh, shape)
    rows = None if (box[-2].start, box[-2].stop) == (0, B) else (box[-2].start, box[-2].stop)
    if n_layers:  # this process's members, each normalised with its layer's Normalizer
        batches = source.member_batches(B, train_cfg.n_seeds, train_cfg.data_seeds, box[0], start, rows)
    elif per_seed:
        batches = data.stacked_batches(source, B, train_cfg.data_seeds[box[0]], start, rows)
    else:  # a source of one's own needs `rows` only under several processes
        batches = source.batches(B, train_cfg.data_seeds[0], start, **({"rows": rows} if rows else {}))
    normalize = (None if n_layers else source.normalizer) or (lambda x: x)
    total = train_cfg.total_steps
    try:
        with open(out / "metrics.jsonl", "a") if main_process else open(os.devnull, "w") as log, \
                tqdm(total=total, initial=start, desc="train", disable=not main_process) as bar:
            for step in range(start, total):
                x = distributed.global_array(batch_sh, np.asarray(normalize(next(batches)), np.float32), shape)
                state, m = step_fn(state, x)
                done = step + 1
                save = (train_cfg.checkpoint_every and done % train_cfg.checkpoint_every == 0) or done == total
                if save or done % train_cfg.log_every == 0:
                    m = distributed.to_host(m)
                    if not np.all(np.isfinite(m["loss"])):  # never checkpoint a diverged state
                        raise FloatingPointError(f"non-finite loss at step {done}, per seed: {m['loss'].tolist()}")
                if done % train_cfg.log_every == 0 or done == total:
                    line = {"step": done, "tokens": done * train_cfg.batch_size,
                            **{k: np.round(np.asarray(v, np.float64), 6).tolist() for k, v in m.items()}}
                    log.write(json.dumps(line) + "\n")
                    log.flush()
                    bar.set_postfix(loss=float(np.mean(m["loss"])), l0=float(np.mean(m["l0"])))
                if save:
                    checkpoint.save(manager, done, state, position)
                bar.update(1)
    finally:
        manager.wait_until_finished()
        manager.close()

    params = distributed.to_host(state.params)
    members = source.members(train_cfg.n_seeds) if n_layers else [
        (f"seed_{s}", source.normalizer, {"seed": s}, getattr(source, "manifest", None)) for s in range(S)]
    for i, (folder, normalizer, extra, manifest) in enumerate(members if main_process else []):
        io.save_saelens(out / folder, jax.tree.map(lambda a: a[i], params), sae_cfg, normalizer,
                        extra={**extra, "steps": total, "train_cfg": dataclasses.asdict(train_cfg)}, overwrite=True,
                        metadata=io.saelens_metadata(manifest))
    return state


@dataclasses.dataclass(frozen=True)
class RunConfig:
    source: str = "synthetic"  # activation cache folder, "model" (stream from `model`, no cache) or "synthetic"
    heldout: str = ""  # cache folder for the final summary; empty: a fresh synthetic sample / the training source
    eval_tokens: int = 16384  # tokens in the final summary's evaluation slice
    synthetic_tokens: int = 65536  # synthetic source: number of training tokens
    synthetic_features: int = 256  # synthetic source: number of ground-truth directions
    synthetic_k: int = 8  # synthetic source: directions summed per token
    model: str = "smollm2-135m"  # source=model: a registered model name or a "module:factory" spec
    layer: int = 14  # source=model: residual stream after this block
    layers: tuple[int, ...] = ()  # source=model: several blocks fed by one forward, one ensemble each (L{layer}/seed_{s})
    corpus: str = "general"  # source=model: the model's named corpus (its train split) to stream
    tokens: str = ""  # source=model: stream these token contexts instead (.npy of int [N, T]); overrides corpus
    ctx_len: int = 256  # source=model: tokens per context
    ctx_batch: int = 16  # source=model: contexts per model forward


def main(argv: list[str] | None = None) -> int:
    """`jaxsae train [key=value ...]`: fields of SAEConfig, TrainConfig and RunConfig."""
    argv = list(sys.argv[1:] if argv is None else argv)
    defaults = [sae.SAEConfig(), TrainConfig(), RunConfig(), distributed.DistConfig()]
    if any(a in ("-h", "--help", "help") for a in argv):
        print("\n\n".join(configlib.help_text(c) for c in defaults))
        return 0
    sae_argv, train_argv, run_argv, dist_argv = configlib.split_argv(argv, defaults)
    run = configlib.override(RunConfig(), run_argv)
    train_cfg = configlib.override(TrainConfig(), train_argv)
    dist_cfg = configlib.override(distributed.DistConfig(), dist_argv)
    distributed.check_split(dist_cfg, {"seed": train_cfg.mesh_seed, "data": train_cfg.mesh_data,
                                       "model": train_cfg.mesh_model}, train_cfg.batch_size)
    if run.layers and (run.source != "model" or run.heldout):
        raise ValueError(f"layers={','.join(map(str, run.layers))} needs source=model and no heldout= (a cache holds "
                         f"one layer), got source={run.source!r} heldout={run.heldout!r}")
    distributed.initialize(dist_cfg)
    sharding.make_mesh(train_cfg.mesh_seed, train_cfg.mesh_data, train_cfg.mesh_model)  # an impossible mesh fails first
    if run.source == "model":
        from jaxsae import adapter, harvest, stream

        model = adapter.load(run.model)
        tokens = np.load(run.tokens, mmap_mode="r") if run.tokens else \
            harvest.corpus_tokens(model, harvest.HarvestConfig(corpus=run.corpus, ctx_len=run.ctx_len))
        source = stream.LayersSource(model, tokens, run.layers, run.ctx_batch) if run.layers else \
            stream.ModelSource(model, tokens, run.layer, run.ctx_batch)
        d_in = source.d_in
    elif run.source == "synthetic":
        d_in = configlib.override(sae.SAEConfig(), sae_argv).d_in
        make = functools.partial(data.synthetic_source, d_in, n_features=run.synthetic_features, k=run.synthetic_k)
        source = make(run.synthetic_tokens, seed=train_cfg.seed)
    else:
        source = data.CacheSource(run.source)
        d_in = source.d_in
    sae_cfg = configlib.override(sae.SAEConfig(), [f"d_in={d_in}"] + sae_argv)
    if sae_cfg.d_in != source.d_in:
        raise ValueError(f"d_in={sae_cfg.d_in} was given, but the source {run.source} has d_in={source.d_in}")
    state = fit(source, sae_cfg, train_cfg)

    if run.heldout:
        eval_source, eval_on = data.CacheSource(run.heldout), run.heldout
    elif run.source == "synthetic":
        eval_source, eval_on = make(run.eval_tokens, seed=train_cfg.seed, sample=1), "synthetic held-out sample"
    else:
        eval_source, eval_on = source, f"{run.source} (training source, not held out)"
    x = next(eval_source.batches(run.eval_tokens, seed=12345))
    params, since_SxM = distributed.to_host((state.params, state.tokens_since_fired))
    if run.layers:  # one summary per layer, in its folder, of its S members
        S = train_cfg.n_seeds
        parts = {f"L{layer}": (jax.tree.map(lambda a: a[i * S : (i + 1) * S], params), since_SxM[i * S : (i + 1) * S],
                               source.normalizers[layer](x[layer])) for i, layer in enumerate(source.layers)}
    else:
        parts = {"": (params, since_SxM, (source.normalizer or (lambda a: a))(x))}
    for folder, (params, since_SxM, x_NxD) in parts.items():
        out = Path(train_cfg.out_dir) / folder
        summary = evaluate(params, sae_cfg, x_NxD)
        summary.update(dead_frac_train=np.mean(since_SxM >= train_cfg.dead_after_tokens, axis=1).tolist(),
                       eval_on=eval_on, eval_tokens=len(x_NxD), steps=train_cfg.total_steps, out_dir=str(out))
        if distributed.is_main():
            print(json.dumps(summary))
            (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(configlib.run(main, prog="python -m jaxsae.train"))

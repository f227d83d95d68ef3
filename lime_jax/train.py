"""Llama / LIMe language-model training from scratch: AdamW, cosine schedule, sharded jit, orbax, resume.

`train_step(state, tokens_BxT)`: next-token loss → global-norm clip → Adam moments → decoupled weight decay
(matrices only: not norm gains, not routers) → learning rate from the schedule, times `router_lr_mult` for
the LIMe routers (the paper's separate optimiser groups: 1e-2 against 1e-3). `fit` feeds packed contexts in a
fixed order per (seed, epoch), logs JSON lines (loss, tokens/s, MFU whose FLOPs count routing), checkpoints
state and data position with orbax (a killed run resumes to the same result bit for bit, from the newest
checkpoint that is not damaged: `jaxsae.checkpoint`) and writes
summary.json with the held-out loss. `lime_jax train key=value ...` is the command line: keys of
TrainConfig and of LlamaConfig (applied on top of `preset`).

Extending a run: `fit` on an `out_dir` that holds a finished or interrupted run, with `num_steps` changed and
nothing else that matters, continues it from its checkpoint. The warm-up + cosine schedule is defined over the
NEW num_steps, so the run resumes at its step s on `lr_schedule(new config)(s)` (a finished run's learning rate
jumps back up from min_lr to the new curve's value at s); one line on stderr says so and config.json records the
new num_steps. Fewer steps than the checkpoint has taken is an error.

Continuing a pretrained model: `fit(..., init_params=params)` starts from those params (e.g. SmolLM2 from
`lime_jax.gguf`, converted with `model.to_lime`) instead of a random init. `trainable="router"` trains only the
LIMe routers: every other weight is frozen (no gradient is computed for it, its update is exactly zero, no
weight decay), so a retrofit can be judged with the pretrained model left exactly as it was.
`trainable="router_current"` (v2) trains only the routers' current-layer blocks (a mix of the layer's own K/V
heads): the control that tells cross-layer routing from extra fast-learning parameters.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from jaxsae import checkpoint, configlib, distributed
from jaxsae import train as jaxsae_train
from lime_jax import config, model, sharding

PRESETS = {"tiny": config.tiny, "paper_1b": config.paper_1b, "smollm2_135m": config.smollm2_135m}
TRAINABLE = ("all", "router", "router_current")
# Dense peak FLOP/s per device for MFU (bf16 tensor cores; the H100/H200 figure is Levanter's table).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12, "TPU v5p": 459e12,
              "TPU v5 lite": 197e12, "TPU v6 lite": 918e12}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    preset: str = "tiny"  # model preset: tiny | paper_1b | smollm2_135m (LlamaConfig keys override its fields)
    corpus: str = "general"  # lime_jax.corpora name: trains on its train split, evaluates on its heldout split
    seq_len: int = 256  # tokens per training sequence (packed contexts; 256 is cached already); at most max_len
    batch_size: int = 8  # sequences per step, over all devices
    num_steps: int = 300  # optimiser steps
    lr: float = 1e-3  # peak learning rate (paper: 1e-3)
    router_lr_mult: float = 10.0  # LIMe routers learn at router_lr_mult * lr (paper: 1e-2 against 1e-3)
    min_lr: float = 1e-6  # learning rate at the last step, the end of the cosine
    warmup_steps: int = 30  # linear warm-up from 0 to lr (paper: 200 of 20k steps)
    weight_decay: float = 0.1  # AdamW decoupled decay on matrices and embeddings; none on norm gains and routers
    b1: float = 0.9  # Adam beta1
    b2: float = 0.95  # Adam beta2
    eps: float = 1e-8  # Adam epsilon
    grad_clip: float = 1.0  # clip the gradient to this global norm (0 disables)
    trainable: str = "all"  # weights that learn: all | router (LIMe routers) | router_current (v2: current layer)
    seed: int = 0  # parameter init key and data order
    mesh_data: int = 1  # devices along the mesh's data axis
    mesh_fsdp: int = 1  # devices along the mesh's fsdp axis (batch and d_model of every weight split over it)
    checkpoint_every: int = 100  # steps between orbax checkpoints (0: only the last step; else a multiple of log_every)
    keep_checkpoints: int = 2  # how many of the latest checkpoints stay on disk
    log_every: int = 10  # steps between lines of metrics.jsonl (loss averaged over those steps)
    eval_batches: int = 8  # held-out batches (of batch_size sequences) in summary.json's heldout_loss
    peak_flops: float = 0.0  # per-device peak FLOP/s for MFU; 0: look up the device kind (CPU: no MFU logged)
    out_dir: str = "runs/lime"  # run folder: config.json, metrics.jsonl, checkpoints/, summary.json

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"preset={self.preset!r} not in {sorted(PRESETS)}")
        for name in ("seq_len", "batch_size", "num_steps", "log_every", "keep_checkpoints", "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.checkpoint_every % self.log_every:  # a resumed run then logs the same interval averages
            raise ValueError(f"checkpoint_every={self.checkpoint_every} must be a multiple of "
                             f"log_every={self.log_every}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"need 0 <= min_lr <= lr, got min_lr={self.min_lr}, lr={self.lr}")
        if self.trainable not in TRAINABLE:
            raise ValueError(f"trainable={self.trainable!r} not in {TRAINABLE}")


class TrainState(NamedTuple):
    params: dict  # lime_jax.model parameters
    opt_state: Any  # optax state (Adam moments mirror params)
    step: jax.Array  # int32 scalar, steps taken


def lr_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warm-up from 0 to lr, then cosine down to min_lr at the last step."""
    warm = min(cfg.warmup_steps, cfg.num_steps - 1)
    return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warm, max(cfg.num_steps, warm + 1), cfg.min_lr)


def _is_router(path) -> bool:
    return any(isinstance(k, jax.tree_util.DictKey) and k.key == "router" for k in path)


def _decays(path, leaf) -> bool:
    """Weight decay on matrices and embeddings; not on norm gains ([L, D] stacked or [D]) nor routers."""
    name = path[-1].key
    return not (_is_router(path) or name.endswith("norm"))


def _learns(path, cfg: TrainConfig) -> bool:
    """Whether the parameter at `path` is trained under cfg.trainable."""
    return cfg.trainable == "all" or _is_router(path)


def optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """clip → Adam → decoupled weight decay (masked) → -lr(step) → x router_lr_mult on the routers.

    trainable="router": the frozen weights' gradients are zero (`make_train_step` puts them behind stop_gradient),
    so their Adam moments stay zero and their update is exactly 0, and they are left out of the weight decay.
    Their (zero) moments are kept rather than dropped, so the state has one layout for checkpoints and sharding.
    """
    decay_mask = lambda params: jax.tree_util.tree_map_with_path(  # noqa: E731
        lambda p, x: _decays(p, x) and _learns(p, cfg), params)
    router_mask = lambda params: jax.tree_util.tree_map_with_path(lambda p, _: _is_router(p), params)  # noqa: E731
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity(),
        optax.scale_by_adam(cfg.b1, cfg.b2, cfg.eps),
        optax.add_decayed_weights(cfg.weight_decay, decay_mask),
        optax.scale_by_learning_rate(lr_schedule(cfg)),
        optax.masked(optax.scale(cfg.router_lr_mult), router_mask),
    )


def _check_trainable(model_cfg: config.LlamaConfig, cfg: TrainConfig) -> None:
    if cfg.trainable == "router" and model_cfg.routing == "none":
        raise ValueError("trainable='router' needs a LIMe model (routing static, dynamic or v2), got routing='none'")
    if cfg.trainable == "router_current" and model_cfg.routing != "v2":
        raise ValueError(f"trainable='router_current' needs routing='v2', got routing={model_cfg.routing!r}")


def _frozen_as_constants(params: dict, cfg: TrainConfig) -> dict:
    """params with the frozen ones behind stop_gradient: autodiff then never computes their (unused) gradients.

    router_current: of the v2 router [L-1, K, L, K] (row i is layer i + 1's) only the current-layer blocks get a
    gradient; the entries reading earlier layers get none, so from `model.to_lime` they stay exactly zero.
    """
    if cfg.trainable == "all":
        return params

    def leaf(path, x):
        if not _learns(path, cfg):
            return jax.lax.stop_gradient(x)
        if cfg.trainable == "router_current":
            layer_Rx1 = jnp.arange(1, x.shape[0] + 1)[:, None]
            current_Rx1xJx1 = (jnp.arange(x.shape[2])[None, :] == layer_Rx1)[:, None, :, None]
            return jnp.where(current_Rx1xJx1, x, jax.lax.stop_gradient(x))
        return x

    return jax.tree_util.tree_map_with_path(leaf, params)


def init_state(key: jax.Array, model_cfg: config.LlamaConfig, cfg: TrainConfig) -> TrainState:
    return state_from_params(model.init(key, model_cfg), cfg)


def state_from_params(params: dict, cfg: TrainConfig) -> TrainState:
    """Step 0 of training `params` (fresh optimiser state)."""
    return TrainState(params, optimizer(cfg).init(params), jnp.zeros((), jnp.int32))


def loss_fn(params: dict, tokens_BxT: jax.Array, model_cfg: config.LlamaConfig) -> jax.Array:
    """Mean next-token negative log-likelihood (nats)."""
    return model.token_nll(model.apply(params, tokens_BxT, model_cfg), tokens_BxT).mean()


def make_train_step(model_cfg: config.LlamaConfig, cfg: TrainConfig, mesh=None):
    """Jitted `train_step(state, tokens_BxT) -> (state, {"loss", "grad_norm", "lr"})`, sharded over `mesh`.

    grad_norm is over the trained parameters (the frozen ones' gradients are zero).
    """
    _check_trainable(model_cfg, cfg)
    tx, lr = optimizer(cfg), lr_schedule(cfg)

    def frozen_loss(params, tokens_BxT, model_cfg):
        return loss_fn(_frozen_as_constants(params, cfg), tokens_BxT, model_cfg)

    def train_step(state: TrainState, tokens_BxT: jax.Array):
        if mesh is not None:  # the model pins its activations to the batch split of the context mesh
            with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
                loss, grads = jax.value_and_grad(frozen_loss)(state.params, tokens_BxT, model_cfg)
        else:
            loss, grads = jax.value_and_grad(frozen_loss)(state.params, tokens_BxT, model_cfg)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "lr": lr(state.step)}
        return TrainState(params, opt_state, state.step + 1), metrics

    if mesh is None:
        return jax.jit(train_step, donate_argnums=0)
    sharding.check_divides(mesh, model_cfg.d_model, cfg.batch_size)
    state_sh = sharding.tree_shardings(mesh, abstract_state(model_cfg, cfg))
    return jax.jit(train_step, in_shardings=(state_sh, sharding.batch_sharding(mesh)),
                   out_shardings=(state_sh, NamedSharding(mesh, P())), donate_argnums=0)


def abstract_state(model_cfg: config.LlamaConfig, cfg: TrainConfig) -> TrainState:
    return jax.eval_shape(lambda: init_state(jax.random.key(0), model_cfg, cfg))


def batch_rows(step: int, batch_size: int, num_contexts: int, seed: int) -> np.ndarray:
    """Row ids of step `step`'s batch: epoch e reads a fixed permutation (seed, e) in order, tail dropped."""
    per_epoch = num_contexts // batch_size
    if per_epoch < 1:
        raise ValueError(f"{num_contexts} contexts are fewer than one batch of {batch_size}")
    epoch, i = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(num_contexts)
    return np.sort(order[i * batch_size:(i + 1) * batch_size])


@functools.partial(jax.jit, static_argnames="model_cfg")
def _nll_sum(params, tokens_BxT, model_cfg):
    return model.token_nll(model.apply(params, tokens_BxT, model_cfg), tokens_BxT).sum()


def evaluate(params: dict, model_cfg: config.LlamaConfig, tokens_NxT, batch_size: int) -> float:
    """Mean next-token loss (nats) over all rows of tokens_NxT, in batches (the tail batch included)."""
    total = sum(float(_nll_sum(params, jnp.asarray(tokens_NxT[i:i + batch_size]), model_cfg))
                for i in range(0, len(tokens_NxT), batch_size))
    return total / (len(tokens_NxT) * (tokens_NxT.shape[1] - 1))


def peak_flops(cfg: TrainConfig) -> float | None:
    """Per-device peak FLOP/s: the config's, else the device kind's from PEAK_FLOPS, else None."""
    if cfg.peak_flops > 0:
        return cfg.peak_flops
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_FLOPS.items() if k.lower() in kind.lower()), None)


def _compute_part(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with the fields that do not change the step reset, so equal computations share one compile."""
    return dataclasses.replace(cfg, **{k: getattr(TrainConfig, k) for k in _NOT_COMPUTED})


_NOT_COMPUTED = ("out_dir", "log_every", "checkpoint_every", "keep_checkpoints", "eval_batches", "peak_flops")
_RESUME_MAY_CHANGE = ("out_dir", "eval_batches", "peak_flops", "keep_checkpoints")


@functools.lru_cache(maxsize=8)
def _compiled(model_cfg: config.LlamaConfig, cfg: TrainConfig, mesh):
    """(train_step, init(key) -> sharded state, from_params(params) -> sharded state, state shardings), reused
    across `fit` calls on one mesh."""
    state_sh = sharding.tree_shardings(mesh, abstract_state(model_cfg, cfg))
    init = jax.jit(lambda key: init_state(key, model_cfg, cfg), out_shardings=state_sh)
    from_params = jax.jit(lambda params: state_from_params(params, cfg), out_shardings=state_sh)
    return make_train_step(model_cfg, cfg, mesh), init, from_params, state_sh


def _check_params(params: dict, model_cfg: config.LlamaConfig) -> None:
    """init_params must have the tree and shapes of model.init(key, model_cfg)."""
    want = jax.eval_shape(lambda: model.init(jax.random.key(0), model_cfg))
    if jax.tree.structure(params) != jax.tree.structure(want):
        raise ValueError(f"init_params do not have the parameter tree of the model (routing={model_cfg.routing!r}): "
                         f"{jax.tree.structure(params)}")
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(want)):
        if tuple(jnp.shape(a)) != b.shape:
            raise ValueError(f"init_params{jax.tree_util.keystr(path)} has shape {tuple(jnp.shape(a))}, the model "
                             f"needs {b.shape}")


def fit(model_cfg: config.LlamaConfig, cfg: TrainConfig, tokens_NxT=None, heldout_NxT=None,
        init_params: dict | None = None) -> TrainState:
    """Train on `tokens_NxT` (default: the corpus's packed train contexts), resuming from out_dir's checkpoint.

    Writes out_dir/summary.json (final_loss, heldout_loss on `heldout_NxT` or the corpus's heldout split,
    flops, tokens, num_params, tokens_per_s). Token arrays need `len`, `.shape` and row indexing.
    `init_params`: start from these parameters (a pretrained model) instead of `model.init(key(seed))`; a run
    that has a checkpoint resumes from it either way.
    """
    if cfg.seq_len > model_cfg.max_len:
        raise ValueError(f"seq_len={cfg.seq_len} exceeds the model's max_len={model_cfg.max_len}")
    _check_trainable(model_cfg, cfg)
    if init_params is not None:
        _check_params(init_params, model_cfg)
    if tokens_NxT is None:
        from lime_jax import corpora
        tokens_NxT = corpora.token_contexts(cfg.corpus, "train", cfg.seq_len)
    if tokens_NxT.ndim != 2 or tokens_NxT.shape[1] != cfg.seq_len:
        raise ValueError(f"training tokens must be [N, seq_len={cfg.seq_len}], got shape {tokens_NxT.shape}")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    main_process = distributed.is_main()  # files written once are written by process 0
    run = {"model": dataclasses.asdict(model_cfg), "train": dataclasses.asdict(cfg)}
    # A run from given params must not resume one from a random init, nor the reverse.
    run["init"] = {"from": "random" if init_params is None else "init_params"}
    old_cfg = jaxsae_train.check_run_config(out, run, resuming=(out / "config.json").exists(),
                                            may_change=_RESUME_MAY_CHANGE + ("num_steps",), write=main_process,
                                            defaults={"model": jaxsae_train.field_defaults(config.LlamaConfig),
                                                      "train": jaxsae_train.field_defaults(TrainConfig),
                                                      "init": {"from": "random"}})
    mesh = sharding.make_mesh(cfg.mesh_data, cfg.mesh_fsdp)
    step_fn, init, from_params, state_sh = _compiled(model_cfg, _compute_part(cfg), mesh)
    batch_sh = sharding.batch_sharding(mesh)
    position = {"corpus": cfg.corpus, "seed": cfg.seed, "batch_size": cfg.batch_size,
                "num_contexts": len(tokens_NxT), "seq_len": cfg.seq_len}
    manager = checkpoint.manager(out, cfg.keep_checkpoints)
    restored = checkpoint.restore_latest(manager, abstract_state(model_cfg, cfg), state_sh, position)
    if restored is None:
        start, state = 0, init(jax.random.key(cfg.seed)) if init_params is None else from_params(init_params)
    else:
        start, state = restored[0], TrainState(*restored[1])
    if old_cfg is not None:
        jaxsae_train.set_run_length(out, old_cfg, start, {"num_steps": cfg.num_steps}, old_cfg["train"]["num_steps"],
                                    cfg.num_steps, "cosine", write=main_process)
    if main_process:
        checkpoint.trim_log(out / "metrics.jsonl", start)
    shape = (cfg.batch_size, cfg.seq_len)
    lo, hi = (lambda b: (b.start, b.stop))(distributed.process_box(batch_sh, shape)[0])  # this process's rows

    seq_cfg = dataclasses.replace(model_cfg, max_len=cfg.seq_len)  # FLOPs at the trained length
    flops_per_step = seq_cfg.flops_per_token * cfg.batch_size * cfg.seq_len
    peak = peak_flops(cfg)
    losses, seconds, tic, last = [], 0.0, time.perf_counter(), {}
    try:
        with open(out / "metrics.jsonl", "a") if main_process else open(os.devnull, "w") as log, \
                tqdm(total=cfg.num_steps, initial=start, desc="train", disable=not main_process) as bar:
            for step in range(start, cfg.num_steps):
                rows = batch_rows(step, cfg.batch_size, len(tokens_NxT), cfg.seed)[lo:hi]  # read only these
                batch = distributed.global_array(batch_sh, np.asarray(tokens_NxT[rows], np.int32), shape)
                state, m = step_fn(state, batch)
                losses.append(m["loss"])
                done = step + 1
                save = (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == cfg.num_steps
                if done % cfg.log_every == 0 or done == cfg.num_steps:
                    m, loss = distributed.to_host((m, jnp.stack(losses).mean()))
                    if not np.isfinite(loss):  # never checkpoint a diverged state
                        raise FloatingPointError(f"non-finite loss at step {done}: {loss}")
                    now = time.perf_counter()
                    # The first interval includes compilation; tokens/s is per interval.
                    tokens_per_s = len(losses) * cfg.batch_size * cfg.seq_len / (now - tic)
                    seconds += now - tic
                    last = {"step": done, "tokens": done * cfg.batch_size * cfg.seq_len, "flops": done * flops_per_step,
                            "loss": round(float(loss), 6), "grad_norm": round(float(m["grad_norm"]), 6),
                            "lr": float(m["lr"]), "tokens_per_s": round(tokens_per_s, 1)}
                    if peak:
                        last["mfu"] = round(tokens_per_s * seq_cfg.flops_per_token / (peak * mesh.size), 5)
                    log.write(json.dumps(last) + "\n")
                    log.flush()
                    bar.set_postfix(loss=last["loss"], tok_s=last["tokens_per_s"])
                    losses, tic = [], time.perf_counter()
                if save:
                    checkpoint.save(manager, done, state, position)
                bar.update(1)
    finally:
        manager.wait_until_finished()
        manager.close()

    if heldout_NxT is None:
        from lime_jax import corpora
        heldout_NxT = corpora.token_contexts(cfg.corpus, "heldout", cfg.seq_len)
    heldout_NxT = heldout_NxT[: cfg.eval_batches * cfg.batch_size]
    if not last:  # resumed a finished run: the log's last line holds the final training loss
        last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    summary = {"final_loss": last["loss"],
               "heldout_loss": evaluate(distributed.to_host(state.params), model_cfg, heldout_NxT, cfg.batch_size),
               "heldout_tokens": int(heldout_NxT.shape[0] * (heldout_NxT.shape[1] - 1)),
               "flops": cfg.num_steps * flops_per_step, "tokens": cfg.num_steps * cfg.batch_size * cfg.seq_len,
               "num_params": model_cfg.num_params, "routing": model_cfg.routing, "trainable": cfg.trainable,
               "train_seconds": round(seconds, 2), "device": jax.devices()[0].device_kind, "devices": mesh.size}
    if main_process:
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return state


def load_params(out_dir: str | Path) -> tuple[dict, config.LlamaConfig]:
    """(params, model config) of a run folder's latest intact checkpoint, on the default device."""
    out = Path(out_dir)
    run = json.loads((out / "config.json").read_text())
    model_cfg, cfg = config.LlamaConfig(**run["model"]), TrainConfig(**run["train"])
    with ocp.CheckpointManager((out / "checkpoints").absolute()) as manager:
        abstract = abstract_state(model_cfg, cfg)
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        # Reading only: a damaged checkpoint is warned about and skipped, not moved.
        restored = checkpoint.restore_latest(manager, abstract, jax.tree.map(lambda _: device, abstract), None,
                                             set_aside=False)
    if restored is None:
        raise FileNotFoundError(f"no checkpoint in {out / 'checkpoints'}")
    return TrainState(*restored[1]).params, model_cfg


def main(argv: list[str] | None = None) -> int:
    """`lime_jax train [key=value ...]`: fields of TrainConfig and LlamaConfig (routing=static, n_layers=16, ...)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help", "help") for a in argv):
        print("\n\n".join(configlib.help_text(c) for c in (TrainConfig(), config.tiny(), distributed.DistConfig())))
        return 0
    train_argv, model_argv, dist_argv = configlib.split_argv(argv, [TrainConfig, config.LlamaConfig,
                                                                    distributed.DistConfig])
    cfg = configlib.override(TrainConfig(), train_argv)
    model_cfg = configlib.override(PRESETS[cfg.preset](), model_argv)
    dist_cfg = configlib.override(distributed.DistConfig(), dist_argv)
    distributed.check_split(dist_cfg, {"data": cfg.mesh_data, "fsdp": cfg.mesh_fsdp}, cfg.batch_size)
    distributed.initialize(dist_cfg)
    fit(model_cfg, cfg)
    if distributed.is_main():
        print((Path(cfg.out_dir) / "summary.json").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(configlib.run(main, prog="python -m lime_jax.train"))

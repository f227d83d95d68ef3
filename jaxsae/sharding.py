"""The one mesh vocabulary of both trainers: axes ("seed", "data", "fsdp", "model") and the helpers around them.

  seed   ensemble members (SAE seeds)                     fsdp   batch rows too, and the d_model axis of LM weights
  data   batch rows                                       model  SAE latents M
A mesh always has all four axes (unused ones have size 1), so one PartitionSpec means the same thing to every
trainer. Batches split their rows over ("data", "fsdp"). Each model keeps its own table of parameter specs
(`SAESpecs` here, `lime_jax.sharding.Specs` for Llama/LIMe); jit with the resulting shardings and XLA inserts
the collectives. Over several processes (`jax.distributed`), `jax.devices()` lists every process's devices
and the mesh spans them.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("seed", "data", "fsdp", "model")
BATCH = ("data", "fsdp")  # the axes batch rows split over


def make_mesh(seed: int = 1, data: int = 1, model: int = 1, fsdp: int = 1, devices=None) -> Mesh:
    """A mesh with every axis of AXES over the first seed*data*fsdp*model of `devices` (default: jax.devices())."""
    devices = jax.devices() if devices is None else devices
    sizes = {"seed": seed, "data": data, "fsdp": fsdp, "model": model}
    n = int(np.prod(list(sizes.values())))
    if min(sizes.values()) < 1 or n > len(devices):
        shown = " x ".join(f"{a}={s}" for a, s in sizes.items() if s != 1 or a in ("seed", "data", "model"))
        raise ValueError(f"mesh {shown} = {n} devices, but {len(devices)} are available")
    return Mesh(np.asarray(devices[:n]).reshape([sizes[a] for a in AXES]), AXES)


def check_divides(mesh: Mesh, **sizes: tuple[int, str | tuple[str, ...]]) -> None:
    """Each `name=(size, axes)` must split evenly over the product of those mesh axes."""
    for name, (size, axes) in sizes.items():
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        parts = int(np.prod([mesh.shape[a] for a in axes]))
        if size % parts:
            where = f"mesh axis {axes[0]!r}" if len(axes) == 1 else f"mesh axes {axes}"
            raise ValueError(f"{name}={size} does not divide over {where} of size {parts}")


def tree_shardings(mesh: Mesh, tree, spec_of: Callable[[tuple, object], P]):
    """NamedShardings for every leaf of a (possibly abstract) pytree, from `spec_of(path, leaf)`."""
    return jax.tree_util.tree_map_with_path(lambda p, x: NamedSharding(mesh, spec_of(p, x)), tree)


@dataclasses.dataclass(frozen=True)
class SAESpecs:
    """PartitionSpecs of a seed-ensemble SAE training state (leading seed axis S) and of its batches."""

    W_enc: P = P("seed", None, "model")  # [S, D, M]
    b_enc: P = P("seed", "model")  # [S, M]
    W_dec: P = P("seed", "model", None)  # [S, M, D]
    b_dec: P = P("seed", None)  # [S, D]
    threshold: P = P("seed", "model")  # [S, M], JumpReLU
    per_latent: P = P("seed", "model")  # [S, M] firing statistics
    per_seed: P = P("seed")  # anything else: step, Adam count, metrics
    batch: P = P(BATCH, None)  # [B, D], one batch shared by every seed
    batch_per_seed: P = P("seed", BATCH, None)  # [S, B, D], each seed its own order

    def leaf(self, path, leaf) -> P:
        """The spec of a state leaf: by parameter name (Adam moments mirror params), else by rank."""
        names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        if names and names[-1] in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
            return getattr(self, names[-1])
        attrs = [k.name for k in path if isinstance(k, jax.tree_util.GetAttrKey)]
        if attrs and attrs[-1] in ("tokens_since_fired", "fire_count"):
            return self.per_latent
        return self.per_seed if leaf.ndim >= 1 else P()


def state_shardings(mesh: Mesh, state, specs: SAESpecs = SAESpecs()):
    """NamedShardings for every leaf of a (possibly abstract) SAE training state."""
    return tree_shardings(mesh, state, specs.leaf)


def batch_sharding(mesh: Mesh, per_seed: bool, specs: SAESpecs = SAESpecs()) -> NamedSharding:
    """Where an SAE batch lives: rows over ("data", "fsdp"), and seeds over "seed" for per-seed orders."""
    return NamedSharding(mesh, specs.batch_per_seed if per_seed else specs.batch)


def check_sae_divides(mesh: Mesh, n_seeds: int, d_sae: int, batch_size: int) -> None:
    """Seeds over "seed", latents over "model", batch rows over ("data", "fsdp")."""
    check_divides(mesh, n_seeds=(n_seeds, "seed"), d_sae=(d_sae, "model"), batch_size=(batch_size, BATCH))

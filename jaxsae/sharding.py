"""Device mesh ("seed", "data", "model") and the PartitionSpecs of a seed-ensemble training state.

Seeds split over "seed", the batch over "data", and the latent axis M (W_enc [S,D,M], b_enc [S,M],
W_dec [S,M,D], threshold, their Adam moments and the per-latent firing stats) over "model". jit with
these in/out shardings and XLA inserts the collectives (a psum of gradients over "data", gathers for TopK
over "model").

Multi-host: call `jax.distributed.initialize()` before anything else on every host; `jax.devices()` then
lists the devices of all hosts and `make_mesh` spans them. The step then needs global arrays: build each
batch with `jax.make_array_from_process_local_data(batch_sharding(...), local_rows)` (the sources are
deterministic given the seed, so each host can read its own rows of the same stream). `train.fit` feeds
host numpy arrays and is single-host only; it has not been run on several hosts.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("seed", "data", "model")


def make_mesh(seed: int = 1, data: int = 1, model: int = 1, devices=None) -> Mesh:
    """A (seed, data, model) mesh over the first seed*data*model of `devices` (default: jax.devices())."""
    devices = jax.devices() if devices is None else devices
    n = seed * data * model
    if min(seed, data, model) < 1 or n > len(devices):
        raise ValueError(
            f"mesh seed={seed} x data={data} x model={model} = {n} devices, but {len(devices)} are available"
        )
    return Mesh(np.asarray(devices[:n]).reshape(seed, data, model), AXES)


@dataclasses.dataclass(frozen=True)
class Specs:
    """PartitionSpecs of the training state (leading seed axis S) and of the batches."""

    W_enc: P = P("seed", None, "model")  # [S, D, M]
    b_enc: P = P("seed", "model")  # [S, M]
    W_dec: P = P("seed", "model", None)  # [S, M, D]
    b_dec: P = P("seed", None)  # [S, D]
    threshold: P = P("seed", "model")  # [S, M], JumpReLU
    per_latent: P = P("seed", "model")  # [S, M] firing statistics
    per_seed: P = P("seed")  # anything else: step, Adam count, metrics
    batch: P = P("data", None)  # [B, D], one batch shared by every seed
    batch_per_seed: P = P("seed", "data", None)  # [S, B, D], each seed its own order

    def leaf(self, path, leaf) -> P:
        """The spec of a state leaf: by parameter name (Adam moments mirror params), else by rank."""
        names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        if names and names[-1] in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
            return getattr(self, names[-1])
        attrs = [k.name for k in path if isinstance(k, jax.tree_util.GetAttrKey)]
        if attrs and attrs[-1] in ("tokens_since_fired", "fire_count"):
            return self.per_latent
        return self.per_seed if leaf.ndim >= 1 else P()


def check_divides(mesh: Mesh, n_seeds: int, d_sae: int, batch_size: int) -> None:
    """Every sharded size must divide evenly over its mesh axis."""
    sizes = (("n_seeds", n_seeds, "seed"), ("d_sae", d_sae, "model"), ("batch_size", batch_size, "data"))
    for what, size, axis in sizes:
        if size % mesh.shape[axis]:
            raise ValueError(f"{what}={size} does not divide over mesh axis {axis!r} of size {mesh.shape[axis]}")


def state_shardings(mesh: Mesh, state, specs: Specs = Specs()):
    """NamedShardings for every leaf of a (possibly abstract) training state."""
    return jax.tree_util.tree_map_with_path(lambda p, x: NamedSharding(mesh, specs.leaf(p, x)), state)


def batch_sharding(mesh: Mesh, per_seed: bool, specs: Specs = Specs()) -> NamedSharding:
    return NamedSharding(mesh, specs.batch_per_seed if per_seed else specs.batch)

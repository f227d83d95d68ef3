"""Mesh ("data", "fsdp") and the PartitionSpecs of Llama/LIMe parameters, optimiser state and batches.

The batch splits over both axes (FSDP is data parallelism whose parameters are also split). Each weight
splits its d_model axis D over "fsdp": D is in every matrix and divides evenly in every preset, so one rule
covers them all and XLA all-gathers a weight just before its matmul. Norm gains and the routers stay
replicated (the largest, the 1.2B preset's dynamic router, is 0.75% of the model). Adam moments mirror the
parameters (matched by name); scalars are replicated.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp")


def make_mesh(data: int = 1, fsdp: int = 1, devices=None) -> Mesh:
    """A (data, fsdp) mesh over the first data*fsdp of `devices` (default: jax.devices())."""
    devices = jax.devices() if devices is None else devices
    if min(data, fsdp) < 1 or data * fsdp > len(devices):
        raise ValueError(f"mesh data={data} x fsdp={fsdp} needs {data * fsdp} devices, {len(devices)} available")
    return Mesh(np.asarray(devices[: data * fsdp]).reshape(data, fsdp), AXES)


@dataclasses.dataclass(frozen=True)
class Specs:
    """PartitionSpecs by parameter name (shapes as in lime_jax.model), plus the batch and everything else."""

    embed: P = P(None, "fsdp")  # [V, D]
    unembed: P = P("fsdp", None)  # [D, V]
    wq: P = P(None, "fsdp", None, None)  # [L, D, N, H]
    wk: P = P(None, "fsdp", None, None)  # [L, D, K, H]
    wv: P = P(None, "fsdp", None, None)  # [L, D, K, H]
    wo: P = P(None, None, None, "fsdp")  # [L, N, H, D]
    w_gate: P = P(None, "fsdp", None)  # [L, D, F]
    w_up: P = P(None, "fsdp", None)  # [L, D, F]
    w_down: P = P(None, None, "fsdp")  # [L, F, D]
    batch: P = P(AXES, None)  # [B, T] token ids: sequences over every device

    def leaf(self, path, leaf) -> P:
        """The spec of a parameter or optimiser-state leaf, found by its last dict key."""
        names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        name = names[-1] if names else ""
        spec = getattr(self, name, None)
        return spec if isinstance(spec, P) and len(spec) == leaf.ndim else P()


def check_divides(mesh: Mesh, d_model: int, batch_size: int) -> None:
    """d_model must split over "fsdp" and the batch over every device."""
    if d_model % mesh.shape["fsdp"]:
        raise ValueError(f"d_model={d_model} does not divide over mesh axis 'fsdp' of size {mesh.shape['fsdp']}")
    if batch_size % mesh.size:
        raise ValueError(f"batch_size={batch_size} does not divide over the mesh's {mesh.size} devices")


def tree_shardings(mesh: Mesh, tree, specs: Specs = Specs()):
    """NamedShardings for every leaf of a (possibly abstract) params or train-state pytree."""
    return jax.tree_util.tree_map_with_path(lambda p, x: NamedSharding(mesh, specs.leaf(p, x)), tree)


def batch_sharding(mesh: Mesh, specs: Specs = Specs()) -> NamedSharding:
    return NamedSharding(mesh, specs.batch)

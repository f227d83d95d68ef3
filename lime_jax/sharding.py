"""The PartitionSpecs of Llama/LIMe parameters, optimiser state and batches, on jaxsae.sharding's mesh axes.

The batch splits over both axes (FSDP is data parallelism whose parameters are also split). Each weight
splits its d_model axis D over "fsdp": D is in every matrix and divides evenly in every preset, so one rule
covers them all and XLA all-gathers a weight just before its matmul. Norm gains and the routers stay
replicated (the largest, the 1.2B preset's dynamic router, is 0.75% of the model). Adam moments mirror the
parameters (matched by name); scalars are replicated. The mesh and its axis names are jaxsae.sharding's, shared
with the SAE trainer (its "seed" and "model" axes have size 1 here).
"""
from __future__ import annotations

import dataclasses

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxsae import sharding
from jaxsae.sharding import BATCH


def make_mesh(data: int = 1, fsdp: int = 1, devices=None) -> Mesh:
    """The shared mesh with `data` x `fsdp` devices (seed and model axes of size 1)."""
    return sharding.make_mesh(data=data, fsdp=fsdp, devices=devices)


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
    batch: P = P(BATCH, None)  # [B, T] token ids: sequences over every device

    def leaf(self, path, leaf) -> P:
        """The spec of a parameter or optimiser-state leaf, found by its last dict key."""
        names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        name = names[-1] if names else ""
        spec = getattr(self, name, None)
        return spec if isinstance(spec, P) and len(spec) == leaf.ndim else P()


def check_divides(mesh: Mesh, d_model: int, batch_size: int) -> None:
    """d_model must split over "fsdp" and the batch over every device."""
    sharding.check_divides(mesh, d_model=(d_model, "fsdp"), batch_size=(batch_size, BATCH))


def tree_shardings(mesh: Mesh, tree, specs: Specs = Specs()):
    """NamedShardings for every leaf of a (possibly abstract) params or train-state pytree."""
    return sharding.tree_shardings(mesh, tree, specs.leaf)


def batch_sharding(mesh: Mesh, specs: Specs = Specs()) -> NamedSharding:
    return NamedSharding(mesh, specs.batch)


def _auto_mesh():
    """The context mesh when it has the batch axes and lets XLA choose shardings (Auto axes), else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not all(a in mesh.axis_names for a in BATCH):
        return None
    if any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
        return None  # explicit meshes carry their shardings in the types already
    return mesh


def constrain_batch(x: jax.Array) -> jax.Array:
    """x with its leading (batch) axis split over the context mesh's batch axes; x itself outside a mesh."""
    if _auto_mesh() is None:
        return x
    return jax.lax.with_sharding_constraint(x, P(BATCH, *[None] * (x.ndim - 1)))


def constrain_embedded(h_BxTxD: jax.Array) -> jax.Array:
    """Embedding rows as gathered from the fsdp-split table (batch over "data", D over "fsdp"), then batch-split.

    Left free, the gather's D tiling spreads through the residual stream of an unrolled LIMe layer loop, and
    the backward pass then asks for the whole batch's [B, T, D] cotangent on every device (an "involuntary
    full rematerialization"). Pinned here, the forward is one all-to-all over "fsdp" and the table's gradient
    is a scatter-add of each device's own rows.
    """
    if _auto_mesh() is None:
        return h_BxTxD
    h_BxTxD = jax.lax.with_sharding_constraint(h_BxTxD, P("data", None, "fsdp"))
    return jax.lax.with_sharding_constraint(h_BxTxD, P(BATCH, None, None))

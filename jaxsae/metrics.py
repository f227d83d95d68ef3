"""SAE evaluation metrics, pure jnp: FVU / explained variance (also streamed), L0, dead latents, firing histogram.

FVU = Σ‖x − x̂‖² / Σ‖x − x̄‖², x̄ the per-dimension mean over the whole evaluation set; EV = 1 − FVU.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxsae.sae import Code


def fvu(x_NxD: jax.Array, x_hat_NxD: jax.Array) -> jax.Array:
    """Fraction of variance unexplained, centring by the per-dimension mean of x."""
    err = jnp.sum((x_NxD - x_hat_NxD) ** 2)
    return err / jnp.sum((x_NxD - x_NxD.mean(0)) ** 2)


def explained_variance(x_NxD: jax.Array, x_hat_NxD: jax.Array) -> jax.Array:
    """1 − FVU."""
    return 1.0 - fvu(x_NxD, x_hat_NxD)


class EVStats(NamedTuple):
    """Running sums for FVU over many batches; `mean_D`/`m2` merge like Chan et al. (no cancellation)."""

    n: jax.Array  # tokens seen
    mean_D: jax.Array  # per-dimension mean of x so far
    m2: jax.Array  # Σ‖x − mean‖² so far
    err: jax.Array  # Σ‖x − x̂‖² so far


def ev_stats_init(d: int) -> EVStats:
    """Empty accumulator for inputs of width d."""
    z = jnp.zeros((), jnp.float32)
    return EVStats(z, jnp.zeros((d,), jnp.float32), z, z)


def ev_stats_update(stats: EVStats, x_BxD: jax.Array, x_hat_BxD: jax.Array) -> EVStats:
    """Add one batch; the result equals the stats of the concatenated batches."""
    b = jnp.asarray(x_BxD.shape[0], jnp.float32)
    mean_b_D = x_BxD.mean(0)
    m2_b = jnp.sum((x_BxD - mean_b_D) ** 2)
    n = stats.n + b
    delta_D = mean_b_D - stats.mean_D
    mean_D = stats.mean_D + delta_D * (b / n)
    m2 = stats.m2 + m2_b + jnp.sum(delta_D**2) * stats.n * b / n
    return EVStats(n, mean_D, m2, stats.err + jnp.sum((x_BxD - x_hat_BxD) ** 2))


def ev_stats_fvu(stats: EVStats) -> jax.Array:
    """FVU of everything accumulated."""
    return stats.err / stats.m2


def l0(code: Code | jax.Array) -> jax.Array:
    """Mean number of nonzero latents per token, from a TopK `Code` or dense acts [B, M]."""
    nonzero = code.vals_BxK != 0 if isinstance(code, Code) else code != 0
    return jnp.mean(jnp.sum(nonzero, axis=-1))


def dead_fraction(fire_counts_M: jax.Array) -> jax.Array:
    """Fraction of latents that never fired."""
    return jnp.mean(fire_counts_M == 0)


def firing_histogram(freq_M: jax.Array, bins: int = 40, lo: float = -7.0, hi: float = 0.0):
    """(counts [bins], edges [bins + 1]) of log10 firing frequency; dead latents land in the lowest bin."""
    log_freq_M = jnp.clip(jnp.log10(jnp.maximum(freq_M, 10.0**lo)), lo, hi)
    return jnp.histogram(log_freq_M, bins=bins, range=(lo, hi))

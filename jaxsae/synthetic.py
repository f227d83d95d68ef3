"""A synthetic activation model with two kinds of ground-truth features, and how well SAEs recover each.

x = Σ_atomic g_a · m_a · u_a + Σ_groups g_k · (z_k B_k) + noise, where
  - atomic feature a: a fixed unit direction u_a, gate g_a ~ Bernoulli(p_atomic), magnitude m_a ~ U[0.5, 1.5];
  - low-rank group k: a random r-dim subspace with orthonormal basis B_k [r, D], gate g_k ~ Bernoulli(p_group),
    and z_k ~ N(0, I_r / r) · 1 (mean squared norm 1): isotropic inside the subspace, so no basis of it is
    preferred and an SAE can only recover the subspace, not particular directions.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxsae import stability


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    d: int = 64  # ambient dimension D
    n_atomic: int = 96  # atomic features (fixed unit directions)
    p_atomic: float = 0.03  # firing probability of each atomic feature per sample
    n_groups: int = 6  # low-rank groups
    group_rank: int = 4  # dimension r of each group's subspace
    p_group: float = 0.08  # firing probability of each group per sample
    noise: float = 0.01  # std of isotropic Gaussian noise per dimension

    def __post_init__(self):
        if self.d < 1 or self.n_atomic < 0 or self.n_groups < 0 or not 1 <= self.group_rank <= self.d:
            raise ValueError(f"need d >= 1, n_atomic, n_groups >= 0 and 1 <= group_rank <= d, got {self}")
        for name in ("p_atomic", "p_group"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be a probability, got {getattr(self, name)}")
        if self.noise < 0:
            raise ValueError(f"noise must be >= 0, got {self.noise}")


def make_model(key: jax.Array, cfg: SyntheticConfig) -> dict:
    """Ground truth: unit atomic directions [A, D] and orthonormal group bases [G, r, D]."""
    ka, kg = jax.random.split(key)
    atomic_AxD = stability.unit_rows(jax.random.normal(ka, (cfg.n_atomic, cfg.d)))
    g_GxDxr = jax.random.normal(kg, (cfg.n_groups, cfg.d, cfg.group_rank))
    basis_GxDxr, _ = jnp.linalg.qr(g_GxDxr)
    return {"atomic_AxD": atomic_AxD, "groups_GxRxD": jnp.swapaxes(basis_GxDxr, 1, 2)}


def sample(key: jax.Array, model: dict, cfg: SyntheticConfig, n: int) -> jax.Array:
    """n activations x_NxD drawn from the model."""
    kg, km, kh, kz, kn = jax.random.split(key, 5)
    on_NxA = jax.random.bernoulli(kg, cfg.p_atomic, (n, cfg.n_atomic))
    mag_NxA = jax.random.uniform(km, (n, cfg.n_atomic), minval=0.5, maxval=1.5)
    x_NxD = jnp.einsum("NA,AD->ND", on_NxA * mag_NxA, model["atomic_AxD"])
    on_NxG = jax.random.bernoulli(kh, cfg.p_group, (n, cfg.n_groups))
    z_NxGxR = jax.random.normal(kz, (n, cfg.n_groups, cfg.group_rank)) / np.sqrt(cfg.group_rank)
    x_NxD += jnp.einsum("NG,NGR,GRD->ND", on_NxG, z_NxGxR, model["groups_GxRxD"])
    return x_NxD + cfg.noise * jax.random.normal(kn, x_NxD.shape)


def assign_latents(dec_MxD, model: dict, min_energy: float = 0.5) -> np.ndarray:
    """For each latent: the group index whose subspace holds ≥ `min_energy` of its unit direction, else −1."""
    u_MxD = stability.unit_rows(dec_MxD)
    energy_MxG = jnp.sum(jnp.einsum("MD,GRD->MGR", u_MxD, model["groups_GxRxD"]) ** 2, axis=-1)
    best_M = jnp.argmax(energy_MxG, axis=1)
    return np.where(np.asarray(jnp.max(energy_MxG, axis=1)) >= min_energy, np.asarray(best_M), -1)


def rotate_within_groups(key: jax.Array, dec_MxD, group_M: np.ndarray, model: dict) -> jax.Array:
    """Each group's latents with their in-subspace component turned by one random rotation of that subspace."""
    dec_MxD = jnp.asarray(dec_MxD)
    G, R, _ = model["groups_GxRxD"].shape
    for g, k in zip(range(G), jax.random.split(key, G)):
        B_RxD = model["groups_GxRxD"][g]
        rot_RxR, _ = jnp.linalg.qr(jax.random.normal(k, (R, R)))
        coef_MxR = dec_MxD @ B_RxD.T
        turned_MxD = dec_MxD + (coef_MxR @ rot_RxR.T - coef_MxR) @ B_RxD
        dec_MxD = jnp.where(jnp.asarray(group_M == g)[:, None], turned_MxD, dec_MxD)
    return dec_MxD


def recovery(dec_SxMxD, model: dict, cfg: SyntheticConfig, tau: float = 0.7, cos_SxSxM=None) -> dict:
    """Atomic features: per-latent recovery; low-rank groups: subspace overlap and per-latent stability.

    - atomic_latent_recovery: mean over seeds and atomic features of the best |cos| of any latent;
      atomic_frac_recovered: fraction with best |cos| ≥ 0.9.
    - lowrank_subspace_overlap: mean over seeds and groups of the overlap (mean cos² of principal angles)
      between the true r-dim subspace and the top-r span of the latents assigned to that group
      (0 for a group with no latents; capped by #latents / r).
    - lowrank_subspace_containment: the same against the full span of the group's latents (rank = their
      count, usually a little above r), i.e. how much of the true subspace those latents can express.
    - atomic/lowrank_latent_stability: mean stability (at τ) of the latents matched to an atomic feature
      (|cos| ≥ 0.9) and of the latents assigned to a group.
    - lowrank_latent_stability_random_rotation: the same after turning every seed's group latents by an
      independent random rotation of the group's subspace: the chance level when the basis chosen inside
      the subspace is arbitrary (it keeps each seed's geometry, e.g. how densely it tiles the subspace).
    """
    dec_SxMxD = jnp.asarray(dec_SxMxD)
    S = dec_SxMxD.shape[0]
    if cos_SxSxM is None:
        cos_SxSxM = stability.best_matches(dec_SxMxD, search_dtype="float32")
    p_SxM = stability.stability(cos_SxSxM, tau)
    atomic_best, overlaps, contained, atomic_p, lowrank_p, lat_per_group, rotated = [], [], [], [], [], [], []
    groups_SxM = np.stack([assign_latents(dec_SxMxD[s], model) for s in range(S)])
    for s, key in zip(range(S), jax.random.split(jax.random.key(0), S)):
        rotated.append(rotate_within_groups(key, dec_SxMxD[s], groups_SxM[s], model))
    p_rot_SxM = stability.stability(stability.best_matches(jnp.stack(rotated), search_dtype="float32"), tau)
    for s in range(S):
        cos_AxM = stability.cosine_matrix(model["atomic_AxD"], dec_SxMxD[s])
        atomic_best.append(cos_AxM.max(1))
        atomic_p.append(p_SxM[s][cos_AxM.max(0) >= 0.9])
        group_M = groups_SxM[s]
        lowrank_p.append(p_SxM[s][group_M >= 0])
        for g in range(cfg.n_groups):
            mine = np.flatnonzero(group_M == g)
            lat_per_group.append(len(mine))
            if len(mine) == 0:
                overlaps.append(0.0)
                contained.append(0.0)
                continue
            truth_Dxr = model["groups_GxRxD"][g].T
            # Normalise by the true rank so that too few latents cannot score a perfect overlap.
            for out, r in ((overlaps, min(len(mine), cfg.group_rank)), (contained, min(len(mine), cfg.d))):
                Q_Dxr = stability.span_basis(dec_SxMxD[s][mine], r)
                out.append(stability.subspace_overlap(Q_Dxr, truth_Dxr) * min(r, cfg.group_rank) / cfg.group_rank)
    atomic_best = np.concatenate(atomic_best)
    mean = lambda xs: float(np.mean(np.concatenate(xs))) if sum(map(len, xs)) else float("nan")  # noqa: E731
    return {
        "atomic_latent_recovery": float(atomic_best.mean()),
        "atomic_frac_recovered": float(np.mean(atomic_best >= 0.9)),
        "atomic_latent_stability": mean(atomic_p),
        "lowrank_subspace_overlap": float(np.mean(overlaps)) if overlaps else float("nan"),
        "lowrank_subspace_containment": float(np.mean(contained)) if contained else float("nan"),
        "lowrank_latent_stability": mean(lowrank_p),
        "lowrank_latent_stability_random_rotation": mean([p_rot_SxM[s][groups_SxM[s] >= 0] for s in range(S)]),
        "lowrank_latents_per_group": float(np.mean(lat_per_group)) if lat_per_group else float("nan"),
    }

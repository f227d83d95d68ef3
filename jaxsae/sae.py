"""Sparse autoencoders: TopK, BatchTopK, JumpReLU and ReLU/L1, as pure functions over a params dict.

Params use the SAELens orientation: W_enc [D, M], b_enc [M], W_dec [M, D], b_dec [D] (+ threshold [M]
for JumpReLU). The encoder sees x − b_dec (OpenAI, sparsify, Anthropic); with `decoder_bias=False`
b_dec is kept at zero and never used, so the output is exactly zero unless latents fire.

Loss convention: "mse" is the per-element mean, mean over tokens AND dimensions of (x − x̂)²
(the HierarchicalTopK reference uses the same, so its K-prefix loss equals this TopK loss). The
sparsity penalties are divided by D as well, so `l1_coeff` and `l0_coeff` mean what they mean with a
summed-over-D MSE (Anthropic's λ = 5, Gemma Scope's λ): loss = (1/D)·(‖x − x̂‖² + λ·penalty), per token.

AuxK (Gao et al. 2024): among latents flagged dead, the top `aux_k` pre-activations of each token
reconstruct the stop-gradient residual e = x − x̂ without b_dec (b_dec is already in x̂). The loss is
the FVU of that fit, Σ‖e − ê‖² / Σ‖e − ē‖² over the batch, scaled by min(#dead / aux_k, 1) as in
sparsify, so it is exactly zero when nothing is dead.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

ACTIVATIONS = ("topk", "batchtopk", "jumprelu", "relu")


@dataclasses.dataclass(frozen=True)
class SAEConfig:
    d_in: int = 576  # width of the input activations (D)
    d_sae: int = 4608  # number of latents (M)
    activation: str = "topk"  # topk | batchtopk | jumprelu | relu
    k: int = 32  # active latents per token (topk) or on average over the batch (batchtopk)
    l1_coeff: float = 5.0  # relu: L1 penalty weight on latent activations times decoder norms
    jumprelu_bandwidth: float = 0.001  # jumprelu: straight-through rectangle-kernel width
    jumprelu_init_threshold: float = 0.001  # jumprelu: initial threshold
    l0_coeff: float = 1.0  # jumprelu: L0 penalty weight
    aux_k: int = 512  # AuxK: dead latents used to model the residual (0 disables; capped at d_sae)
    aux_coeff: float = 1 / 32  # AuxK loss weight
    decoder_bias: bool = True  # False for Boost residual SAEs: output is exactly zero unless latents fire

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; expected one of {ACTIVATIONS}")
        if self.d_in < 1 or self.d_sae < 1:
            raise ValueError(f"d_in and d_sae must be >= 1, got d_in={self.d_in}, d_sae={self.d_sae}")
        if self.activation in ("topk", "batchtopk") and not 1 <= self.k <= self.d_sae:
            raise ValueError(f"k must be in [1, d_sae={self.d_sae}], got k={self.k}")
        if self.aux_k < 0:
            raise ValueError(f"aux_k must be >= 0, got aux_k={self.aux_k}")
        if self.jumprelu_bandwidth <= 0:
            raise ValueError(f"jumprelu_bandwidth must be > 0, got {self.jumprelu_bandwidth}")


class Code(NamedTuple):
    """TopK code: the K largest activations of each token, sorted descending, and their latent ids."""

    vals_BxK: jax.Array
    idx_BxK: jax.Array


def init(key: jax.Array, cfg: SAEConfig, b_dec_init: jax.Array | None = None) -> dict:
    """Unit-norm random decoder rows, encoder = decoder transpose, zero biases."""
    W_dec_MxD = jax.random.normal(key, (cfg.d_sae, cfg.d_in), jnp.float32)
    W_dec_MxD = W_dec_MxD / jnp.linalg.norm(W_dec_MxD, axis=-1, keepdims=True)
    if b_dec_init is None:
        b_dec_D = jnp.zeros((cfg.d_in,), jnp.float32)
    elif not cfg.decoder_bias:
        raise ValueError("b_dec_init given but decoder_bias=False (b_dec must stay zero)")
    elif jnp.shape(b_dec_init) != (cfg.d_in,):
        raise ValueError(f"b_dec_init must have shape ({cfg.d_in},), got {jnp.shape(b_dec_init)}")
    else:
        b_dec_D = jnp.asarray(b_dec_init, jnp.float32)
    params = {"W_enc": W_dec_MxD.T, "b_enc": jnp.zeros((cfg.d_sae,), jnp.float32),
              "W_dec": W_dec_MxD, "b_dec": b_dec_D}
    if cfg.activation == "jumprelu":
        params["threshold"] = jnp.full((cfg.d_sae,), cfg.jumprelu_init_threshold, jnp.float32)
    return params


def _check_input(x_BxD: jax.Array, cfg: SAEConfig):
    if x_BxD.ndim != 2 or x_BxD.shape[-1] != cfg.d_in:
        raise ValueError(f"x must have shape [B, d_in={cfg.d_in}], got {tuple(x_BxD.shape)}")


def _b_dec(params: dict, cfg: SAEConfig) -> jax.Array:
    return params["b_dec"] if cfg.decoder_bias else jnp.zeros_like(params["b_dec"])


def pre_activations(params: dict, x_BxD: jax.Array, cfg: SAEConfig) -> jax.Array:
    """Encoder pre-activations (x − b_dec) W_enc + b_enc, dense [B, M]."""
    _check_input(x_BxD, cfg)
    return (x_BxD - _b_dec(params, cfg)) @ params["W_enc"] + params["b_enc"]


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _jumprelu(z_BxM, threshold_M, bandwidth):
    return z_BxM * (z_BxM > threshold_M)


@_jumprelu.defjvp
def _jumprelu_jvp(eps, primals, tangents):
    # Straight-through estimator (Rajamanoharan et al. 2024): d/dθ = −(θ/ε)·rect((z − θ)/ε).
    z, theta = primals
    dz, dtheta = tangents
    on = z > theta
    rect = (jnp.abs(z - theta) < eps / 2) / eps
    return z * on, dz * on - dtheta * theta * rect


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _step(z_BxM, threshold_M, bandwidth):
    return (z_BxM > threshold_M).astype(z_BxM.dtype)


@_step.defjvp
def _step_jvp(eps, primals, tangents):
    # L0's straight-through estimator: only the threshold gets a gradient, −(1/ε)·rect((z − θ)/ε).
    z, theta = primals
    _, dtheta = tangents
    rect = (jnp.abs(z - theta) < eps / 2) / eps
    return (z > theta).astype(z.dtype), -dtheta * rect


def _batchtopk(pre_BxM: jax.Array, k: int) -> jax.Array:
    """Keep the B·k largest (ReLU'd) activations across the whole batch."""
    B, M = pre_BxM.shape
    acts_BM = jax.nn.relu(pre_BxM).reshape(-1)
    _, idx = jax.lax.top_k(acts_BM, B * k)
    return jnp.zeros_like(acts_BM).at[idx].set(acts_BM[idx]).reshape(B, M)


def encode(params: dict, x_BxD: jax.Array, cfg: SAEConfig) -> Code | jax.Array:
    """TopK: `Code` (sorted descending); the other activations: dense acts [B, M]."""
    pre_BxM = pre_activations(params, x_BxD, cfg)
    if cfg.activation == "topk":
        vals_BxK, idx_BxK = jax.lax.top_k(pre_BxM, cfg.k)
        return Code(jax.nn.relu(vals_BxK), idx_BxK)
    if cfg.activation == "batchtopk":
        return _batchtopk(pre_BxM, cfg.k)
    if cfg.activation == "jumprelu":
        return _jumprelu(pre_BxM, params["threshold"], cfg.jumprelu_bandwidth)
    return jax.nn.relu(pre_BxM)


def decode(params: dict, code: Code | jax.Array, cfg: SAEConfig) -> jax.Array:
    """x̂ = acts W_dec + b_dec; a `Code` gathers its K decoder rows per token and never forms [B, M]."""
    if isinstance(code, Code):
        x_hat_BxD = jnp.einsum("BK,BKD->BD", code.vals_BxK, params["W_dec"][code.idx_BxK])
    else:
        x_hat_BxD = code @ params["W_dec"]
    return x_hat_BxD + _b_dec(params, cfg)


def apply(params: dict, x_BxD: jax.Array, cfg: SAEConfig) -> jax.Array:
    """Reconstruction x̂ of x."""
    return decode(params, encode(params, x_BxD, cfg), cfg)


def _aux_loss(params, pre_BxM, resid_BxD, dead_M, cfg):
    """AuxK: FVU of the residual modelled by the top `aux_k` dead pre-activations, 0 if none dead."""
    aux_k = min(cfg.aux_k, cfg.d_sae)
    e_BxD = jax.lax.stop_gradient(resid_BxD)
    masked_BxM = jnp.where(dead_M, pre_BxM, -jnp.inf)
    vals_BxA, idx_BxA = jax.lax.top_k(masked_BxM, aux_k)
    vals_BxA = jnp.where(jnp.isfinite(vals_BxA), jax.nn.relu(vals_BxA), 0.0)
    e_hat_BxD = jnp.einsum("BA,BAD->BD", vals_BxA, params["W_dec"][idx_BxA])
    var = jnp.sum((e_BxD - e_BxD.mean(0)) ** 2)
    num_dead = jnp.sum(dead_M)
    scale = jnp.minimum(num_dead / aux_k, 1.0) * (var > 0)
    return scale * jnp.sum((e_BxD - e_hat_BxD) ** 2) / jnp.where(var > 0, var, 1.0)


def loss(params: dict, x_BxD: jax.Array, cfg: SAEConfig, dead_M: jax.Array | None = None):
    """Training loss of one SAE on one batch and its scalar metrics ("mse", "aux", "l0", "fvu", ...)."""
    pre_BxM = pre_activations(params, x_BxD, cfg)
    D = cfg.d_in
    metrics = {}
    if cfg.activation == "topk":
        vals_BxK, idx_BxK = jax.lax.top_k(pre_BxM, cfg.k)
        code = Code(jax.nn.relu(vals_BxK), idx_BxK)
        l0 = jnp.mean(jnp.sum(code.vals_BxK > 0, axis=-1))
        penalty = 0.0
    else:
        if cfg.activation == "batchtopk":
            code = _batchtopk(pre_BxM, cfg.k)
            penalty = 0.0
        elif cfg.activation == "jumprelu":
            code = _jumprelu(pre_BxM, params["threshold"], cfg.jumprelu_bandwidth)
            l0_BxM = _step(pre_BxM, params["threshold"], cfg.jumprelu_bandwidth)
            penalty = cfg.l0_coeff * jnp.mean(jnp.sum(l0_BxM, -1)) / D
        else:
            code = jax.nn.relu(pre_BxM)
            l1 = jnp.mean(code @ jnp.linalg.norm(params["W_dec"], axis=-1))
            metrics["l1"] = l1
            penalty = cfg.l1_coeff * l1 / D
        l0 = jnp.mean(jnp.sum(code != 0, axis=-1))
    x_hat_BxD = decode(params, code, cfg)
    resid_BxD = x_BxD - x_hat_BxD
    mse = jnp.mean(resid_BxD**2)
    if dead_M is None or cfg.aux_k == 0:
        aux = jnp.zeros(())
    else:
        aux = _aux_loss(params, pre_BxM, resid_BxD, dead_M, cfg)
    total = mse + penalty + cfg.aux_coeff * aux
    var = jnp.sum((x_BxD - x_BxD.mean(0)) ** 2)
    fvu = jnp.sum(resid_BxD**2) / jnp.where(var > 0, var, 1.0)
    metrics.update(loss=total, mse=mse, aux=aux, l0=l0, fvu=jax.lax.stop_gradient(fvu))
    return total, metrics


def normalize_decoder(params: dict) -> dict:
    """Rows of W_dec rescaled to unit norm."""
    W_dec_MxD = params["W_dec"]
    norm_Mx1 = jnp.linalg.norm(W_dec_MxD, axis=-1, keepdims=True)
    return {**params, "W_dec": W_dec_MxD / jnp.maximum(norm_Mx1, 1e-12)}


def project_decoder_grads(params: dict, grads: dict) -> dict:
    """Remove from each row of dW_dec its component along that decoder row (keeps norms fixed to first order)."""
    W_dec_MxD, g_MxD = params["W_dec"], grads["W_dec"]
    along_M = jnp.einsum("MD,MD->M", W_dec_MxD, g_MxD) / jnp.maximum(jnp.sum(W_dec_MxD**2, -1), 1e-12)
    return {**grads, "W_dec": g_MxD - along_M[:, None] * W_dec_MxD}


def batchtopk_to_jumprelu(params: dict, cfg: SAEConfig, x_NxD: jax.Array, batch_size: int = 4096):
    """Freeze a BatchTopK SAE into a JumpReLU one with ONE scalar threshold for all latents.

    The threshold is the mean, over the full batches of `x_NxD`, of the smallest positive activation that
    BatchTopK keeps (Bussmann et al. 2024); a per-latent threshold would be noisy for rare latents.
    """
    if cfg.activation != "batchtopk":
        raise ValueError(f"expected a batchtopk config, got activation={cfg.activation!r}")
    _check_input(x_NxD, cfg)
    num_batches = x_NxD.shape[0] // batch_size
    if num_batches < 1:
        raise ValueError(f"need at least batch_size={batch_size} rows, got {x_NxD.shape[0]}")

    @jax.jit
    def min_kept(x_BxD):
        acts_BxM = _batchtopk(pre_activations(params, x_BxD, cfg), cfg.k)
        return jnp.min(jnp.where(acts_BxM > 0, acts_BxM, jnp.inf))

    xs = x_NxD[: num_batches * batch_size].reshape(num_batches, batch_size, cfg.d_in)
    theta = jnp.mean(jnp.stack([min_kept(x) for x in xs]))
    new_cfg = dataclasses.replace(cfg, activation="jumprelu")
    return {**params, "threshold": jnp.full((cfg.d_sae,), theta, jnp.float32)}, new_cfg

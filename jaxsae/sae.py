"""Sparse autoencoders: TopK, BatchTopK, JumpReLU and ReLU/L1, as pure functions over a params dict.

Params use the SAELens orientation: W_enc [D, M], b_enc [M], W_dec [M, D], b_dec [D] (+ threshold [M]
for JumpReLU). The encoder sees x − b_dec (OpenAI, sparsify, Anthropic); with `decoder_bias=False`
b_dec is kept at zero and never used, so the output is exactly zero unless latents fire.

Loss convention: "mse" is the per-element mean, mean over tokens AND dimensions of (x − x̂)²
(the HierarchicalTopK reference uses the same, so its K-prefix loss equals this TopK loss). The
sparsity penalties are divided by D as well, so `l1_coeff` and `l0_coeff` mean what they mean with a
summed-over-D MSE (Anthropic's λ = 5, Gemma Scope's λ): loss = (1/D)·(‖x − x̂‖² + λ·penalty), per token.

AuxK (Gao et al. 2024): among latents flagged dead (the first `aux_max_dead` of them by id, to bound the
cost), the top `aux_k` pre-activations of each token
reconstruct the stop-gradient residual e = x − x̂ without b_dec (b_dec is already in x̂). The loss is
the FVU of that fit, Σ‖e − ê‖² / Σ‖e − ē‖² over the batch, scaled by min(#dead / aux_k, 1) as in
sparsify, so it is exactly zero when nothing is dead.

Speed (TopK training): `loss` runs encode+decode through a `jax.custom_vjp` whose only dense work is the
forward encoder matmul. The backward touches just the K selected latents of each token: dW_dec and dW_enc
are scatter-adds of B·K rows, d(vals) a gather-dot, and d(b_dec) through the encoder input is
−W_enc·d(b_enc) (a mat-vec) rather than a B×D×M product. No gradient w.r.t. x is formed unless asked for.
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
    aux_max_dead: int = 512  # AuxK: only the first this-many dead latents (by id) are candidates; bounds its cost
    decoder_bias: bool = True  # False for Boost residual SAEs: output is exactly zero unless latents fire

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; expected one of {ACTIVATIONS}")
        if self.d_in < 1 or self.d_sae < 1:
            raise ValueError(f"d_in and d_sae must be >= 1, got d_in={self.d_in}, d_sae={self.d_sae}")
        if self.activation in ("topk", "batchtopk") and not 1 <= self.k <= self.d_sae:
            raise ValueError(f"k must be in [1, d_sae={self.d_sae}], got k={self.k}")
        if self.aux_k < 0 or self.aux_max_dead < 1:
            raise ValueError(f"need aux_k >= 0 and aux_max_dead >= 1, got aux_k={self.aux_k}, "
                             f"aux_max_dead={self.aux_max_dead}")
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


def _gather_rows(W_MxD: jax.Array, idx_N: jax.Array) -> jax.Array:
    return jnp.asarray(W_MxD).at[idx_N].get(mode="promise_in_bounds")


def _col(a_BxK: jax.Array, k) -> jax.Array:
    return jax.lax.dynamic_index_in_dim(a_BxK, k, 1, keepdims=False)


def _gather_sum(vals_BxK: jax.Array, idx_BxK: jax.Array, W_MxD: jax.Array) -> jax.Array:
    """Σ_k vals[:, k] · W[idx[:, k]] as one unrolled loop: XLA fuses the gathers, nothing [B, K, D] is built."""
    B, K = vals_BxK.shape

    def add_row(k, acc_BxD):
        return acc_BxD + _col(vals_BxK, k)[:, None] * _gather_rows(W_MxD, _col(idx_BxK, k))

    return jax.lax.fori_loop(0, K, add_row, jnp.zeros((B, W_MxD.shape[1]), vals_BxK.dtype), unroll=min(K, 32))


def _top_k(pre_BxM: jax.Array, k: int) -> Code:
    # The barrier keeps XLA:CPU on its TopK kernel: fusing the slice into consumers turns it into a full sort.
    vals_BxK, idx_BxK = jax.lax.optimization_barrier(jax.lax.top_k(pre_BxM, k))
    return Code(jax.nn.relu(vals_BxK), idx_BxK)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _topk_autoencode(W_enc_DxM, b_enc_M, W_dec_MxD, b_dec_D, x_BxD, k):
    """(x̂, Code) of a TopK SAE, with the sparse backward below."""
    return _topk_autoencode_fwd(W_enc_DxM, b_enc_M, W_dec_MxD, b_dec_D, x_BxD, k)[0]


def _topk_autoencode_fwd(W_enc_DxM, b_enc_M, W_dec_MxD, b_dec_D, x_BxD, k):
    x_in_BxD = x_BxD - b_dec_D
    code = _top_k(x_in_BxD @ W_enc_DxM + b_enc_M, k)
    x_hat_BxD = _gather_sum(code.vals_BxK, code.idx_BxK, W_dec_MxD) + b_dec_D
    return (x_hat_BxD, code), (W_enc_DxM, W_dec_MxD, x_in_BxD, code)


def _topk_autoencode_bwd(k, res, cts):
    W_enc_DxM, W_dec_MxD, x_in_BxD, (vals_BxK, idx_BxK) = res
    g_BxD, (g_vals_BxK, _) = cts
    D, M = W_enc_DxM.shape
    x_in1_BxE = jnp.concatenate([x_in_BxD, jnp.ones_like(x_in_BxD[:, :1])], 1)  # last column -> d(b_enc)

    def one_k(kk, carry):
        # For the kk-th selected latent of every token: d(val) = g·W_dec[idx]; ReLU gate; two scatter-adds.
        dW_dec_MxD, dW_enc1_MxE = carry
        i_B, v_B = _col(idx_BxK, kk), _col(vals_BxK, kk)
        dval_B = jnp.sum(g_BxD * _gather_rows(W_dec_MxD, i_B), -1) + _col(g_vals_BxK, kk)
        dpre_B = jnp.where(v_B > 0, dval_B, 0.0)
        dW_dec_MxD = dW_dec_MxD.at[i_B].add(v_B[:, None] * g_BxD, mode="promise_in_bounds")
        dW_enc1_MxE = dW_enc1_MxE.at[i_B].add(dpre_B[:, None] * x_in1_BxE, mode="promise_in_bounds")
        return dW_dec_MxD, dW_enc1_MxE

    zeros = (jnp.zeros((M, D), g_BxD.dtype), jnp.zeros((M, D + 1), g_BxD.dtype))
    dW_dec_MxD, dW_enc1_MxE = jax.lax.fori_loop(0, k, one_k, zeros)
    db_enc_M = dW_enc1_MxE[:, D]
    # x_in = x − b_dec, so through the encoder d(b_dec) = −Σ_b dx_in[b] = −W_enc·d(b_enc).
    db_dec_D = g_BxD.sum(0) - W_enc_DxM @ db_enc_M
    # dx is only formed if the caller differentiates w.r.t. x (else XLA drops it).
    dpre_BxK = jnp.where(vals_BxK > 0, _dvals(g_BxD, g_vals_BxK, idx_BxK, W_dec_MxD), 0.0)
    dx_BxD = _gather_sum(dpre_BxK, idx_BxK, W_enc_DxM.T)
    return dW_enc1_MxE[:, :D].T, db_enc_M, dW_dec_MxD, db_dec_D, dx_BxD


def _dvals(g_BxD, g_vals_BxK, idx_BxK, W_dec_MxD):
    """d(vals) = g·W_dec[idx] + the direct cotangent of vals."""
    W_BxKxD = _gather_rows(W_dec_MxD, idx_BxK)
    return jnp.einsum("BD,BKD->BK", g_BxD, W_BxKxD) + g_vals_BxK


_topk_autoencode.defvjp(_topk_autoencode_fwd, _topk_autoencode_bwd)


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
        return _top_k(pre_BxM, cfg.k)
    if cfg.activation == "batchtopk":
        return _batchtopk(pre_BxM, cfg.k)
    if cfg.activation == "jumprelu":
        return _jumprelu(pre_BxM, params["threshold"], cfg.jumprelu_bandwidth)
    return jax.nn.relu(pre_BxM)


def decode(params: dict, code: Code | jax.Array, cfg: SAEConfig) -> jax.Array:
    """x̂ = acts W_dec + b_dec; a `Code` gathers its K decoder rows per token and never forms [B, M]."""
    if isinstance(code, Code):
        x_hat_BxD = _gather_sum(code.vals_BxK, code.idx_BxK, params["W_dec"])
    else:
        x_hat_BxD = code @ params["W_dec"]
    return x_hat_BxD + _b_dec(params, cfg)


def apply(params: dict, x_BxD: jax.Array, cfg: SAEConfig) -> jax.Array:
    """Reconstruction x̂ of x."""
    return decode(params, encode(params, x_BxD, cfg), cfg)


def _aux_loss(params, x_BxD, resid_BxD, dead_M, cfg):
    """AuxK: FVU of the residual modelled by the top `aux_k` dead pre-activations, 0 if none dead.

    Only the first `aux_max_dead` dead latents (by id) are candidates, gathered into a dense [B, N]
    problem: its cost is N/M of the encoder matmul, whatever the activation.
    """
    N = min(cfg.aux_max_dead, cfg.d_sae)
    A = min(cfg.aux_k, N)
    num_dead = jnp.sum(dead_M)
    ids_N = jnp.nonzero(dead_M, size=N, fill_value=0)[0]
    pre_BxN = (x_BxD - _b_dec(params, cfg)) @ params["W_enc"][:, ids_N] + params["b_enc"][ids_N]
    pre_BxN = jnp.where(jnp.arange(N) < num_dead, pre_BxN, -jnp.inf)
    if A < N:  # keep each token's A largest; the rest of the [B, N] block is zero
        kth_Bx1 = jax.lax.top_k(jax.lax.stop_gradient(pre_BxN), A)[0][:, -1:]
        pre_BxN = jnp.where(pre_BxN >= kth_Bx1, pre_BxN, -jnp.inf)
    acts_BxN = jnp.where(jnp.isfinite(pre_BxN), jax.nn.relu(pre_BxN), 0.0)
    e_BxD = jax.lax.stop_gradient(resid_BxD)
    e_hat_BxD = acts_BxN @ params["W_dec"][ids_N]
    var = jnp.sum((e_BxD - e_BxD.mean(0)) ** 2)
    scale = jnp.minimum(num_dead / A, 1.0) * (var > 0)
    return scale * jnp.sum((e_BxD - e_hat_BxD) ** 2) / jnp.where(var > 0, var, 1.0)


def loss(params: dict, x_BxD: jax.Array, cfg: SAEConfig, dead_M: jax.Array | None = None):
    """Training loss of one SAE on one batch and its scalar metrics ("mse", "aux", "l0", "fvu", ...)."""
    _check_input(x_BxD, cfg)
    D = cfg.d_in
    metrics = {}
    penalty = 0.0
    if cfg.activation == "topk":
        x_hat_BxD, code = _topk_autoencode(params["W_enc"], params["b_enc"], params["W_dec"],
                                           _b_dec(params, cfg), x_BxD, cfg.k)
    else:
        pre_BxM = pre_activations(params, x_BxD, cfg)
        if cfg.activation == "batchtopk":
            code = _batchtopk(pre_BxM, cfg.k)
        elif cfg.activation == "jumprelu":
            code = _jumprelu(pre_BxM, params["threshold"], cfg.jumprelu_bandwidth)
            l0_BxM = _step(pre_BxM, params["threshold"], cfg.jumprelu_bandwidth)
            penalty = cfg.l0_coeff * jnp.mean(jnp.sum(l0_BxM, -1)) / D
        else:
            code = jax.nn.relu(pre_BxM)
            l1 = jnp.mean(code @ jnp.linalg.norm(params["W_dec"], axis=-1))
            metrics["l1"] = l1
            penalty = cfg.l1_coeff * l1 / D
        x_hat_BxD = decode(params, code, cfg)
    l0 = jnp.mean(jnp.sum((code.vals_BxK if isinstance(code, Code) else code) != 0, axis=-1))
    resid_BxD = x_BxD - x_hat_BxD
    mse = jnp.mean(resid_BxD**2)
    if dead_M is None or cfg.aux_k == 0:
        aux = jnp.zeros(())
    else:
        aux = _aux_loss(params, x_BxD, resid_BxD, dead_M, cfg)
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

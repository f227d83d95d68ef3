"""Matryoshka BatchTopK SAEs (Bussmann, Nabeshima, Karvonen, Nanda, ICML 2025; Nabeshima 2024): nested latent prefixes.

The latents are ordered, and the prefix widths m_1 < m_2 < … < m_P = M cut them into nested dictionaries:
prefix p is latents [0, m_p). BatchTopK picks its B·k activations once, over all M latents; prefix p then
reconstructs from its own latents only, x̂_p = b_dec + acts[:, :m_p] W_dec[:m_p], and every x̂_p must
reconstruct x. So the first m_1 latents are themselves a small SAE, and a smaller SAE is served by cutting the
dictionary (a budget by latent prefix, where HierarchicalTopK budgets by activation rank within each token).

Loss: Σ_p w_p · MSE_p + aux_coeff · AuxK, with MSE_p = mean over tokens and D of (x̂_p − x)², jaxsae's MSE
convention, and w_p = 1/P by default (the mean over prefixes, as `htopk` averages its prefixes). The references
differ from this only by constant factors, which leave the minimiser unchanged and Adam's steps nearly so (they
change the weight of AuxK relative to the MSE, and where gradient clipping bites):
- the paper and SAELens sum over prefixes the per-token squared error summed over D, i.e. weights (1,)·P and a
  factor D (SAELens adds each inner level's loss to the full BatchTopK loss);
- dictionary_learning averages w_p · (per-token sum over D) over the prefixes with w_p = 1/P by default, i.e.
  Σ_p MSE_p · D/P²;
- the `GlobalBatchTopKMatryoshkaSAE` training code averages per-element MSEs over P + 1 terms, the extra one
  being the b_dec-only reconstruction (a width-0 prefix);
- Nabeshima's code samples fresh prefix widths every step rather than fixing them.
AuxK is `sae.aux_loss` on the residual of the full reconstruction x̂_P (what SAELens and dictionary_learning do
by default), so with widths = (M,) the loss is exactly `sae.loss` of the BatchTopK SAE.

`prefix_mse` is a `jax.custom_vjp` over running [T, D] tensors: the forward adds one decoder block per prefix to
the running residual r_p = x̂_p − x; the backward walks the prefixes in reverse, rebuilding r_p by subtraction
and summing the residual gradients into G_p = Σ_{q≥p} 2·w_q·r_q/(B·D), the gradient of every term of block p.
Both walk the batch in row tiles of T = `tile` rows, which bounds the temporaries to about P·T·D floats: XLA
may run a tile's P block products in any order (on CPU it runs them all first), so without tiles P [B, D]
products can be alive at once. No [P, B, D] tensor is formed.

Serving: BatchTopK selects over a batch, so, like the plain BatchTopK SAEs here, a trained Matryoshka SAE is
frozen with `sae.batchtopk_to_jumprelu` (one global threshold, chosen with the selection over all latents). A
JumpReLU latent fires independently of the others, so `truncate_params` of the JumpReLU SAE to width m_p gives
exactly the prefix reconstruction.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from jaxsae import sae


@dataclasses.dataclass(frozen=True)
class MatryoshkaConfig:
    widths: tuple[int, ...] = ()  # cumulative prefix widths m_1 < … < m_P = d_sae; empty = (d_sae,): plain BatchTopK
    weights: tuple[float, ...] = ()  # loss weight w_p of each prefix's MSE; empty = 1/P each (the mean over prefixes)
    tile: int = 1024  # rows per tile of the prefix walk (temporaries ~ P·tile·D floats); 0 = the whole batch at once

    def __post_init__(self):
        ws = self.widths
        if any(int(m) != m or m < 1 for m in ws):
            raise ValueError(f"matryoshka widths must be positive integers, got {ws}")
        if any(a >= b for a, b in zip(ws, ws[1:])):
            raise ValueError(f"matryoshka widths must be strictly increasing, got {ws}")
        if self.weights and len(self.weights) != max(len(ws), 1):
            raise ValueError(f"need one weight per prefix ({max(len(ws), 1)}), got weights={self.weights}")
        if self.tile < 0:
            raise ValueError(f"tile must be >= 0, got {self.tile}")
        if any(not math.isfinite(w) or w < 0 for w in self.weights) or (self.weights and sum(self.weights) <= 0):
            raise ValueError(f"weights must be finite, >= 0 and not all zero, got {self.weights}")


def prefix_widths(d_sae: int, cfg: MatryoshkaConfig = MatryoshkaConfig()) -> tuple[int, ...]:
    """The prefix widths (m_1, …, m_P = d_sae) of `cfg` for an SAE with d_sae latents."""
    widths = cfg.widths or (d_sae,)
    if widths[-1] != d_sae:
        raise ValueError(f"the last matryoshka width must equal d_sae={d_sae}, got widths={widths}")
    return widths


def prefix_weights(d_sae: int, cfg: MatryoshkaConfig = MatryoshkaConfig()) -> jax.Array:
    """Loss weights w_P of the prefixes: `cfg.weights`, or 1/P each."""
    P = len(prefix_widths(d_sae, cfg))
    return jnp.asarray(cfg.weights or (1.0 / P,) * P, jnp.float32)


def _blocks(widths: tuple[int, ...]) -> list[tuple[int, int]]:
    """[(lo, hi)] latent ranges of the decoder blocks that each prefix adds."""
    return list(zip((0,) + tuple(widths[:-1]), widths))


def _check(acts_BxM, W_dec_MxD, b_dec_D, x_BxD, widths):
    """The four arrays as jax arrays, after checking that their shapes and the widths agree."""
    acts_BxM, W_dec_MxD, b_dec_D, x_BxD = map(jnp.asarray, (acts_BxM, W_dec_MxD, b_dec_D, x_BxD))
    (B, M), D = acts_BxM.shape, x_BxD.shape[-1]
    if W_dec_MxD.shape != (M, D) or b_dec_D.shape != (D,) or x_BxD.shape != (B, D):
        raise ValueError(f"shapes disagree: acts {acts_BxM.shape}, W_dec {W_dec_MxD.shape}, b_dec {b_dec_D.shape}, "
                         f"x {x_BxD.shape}")
    prefix_widths(M, MatryoshkaConfig(tuple(widths)))
    return acts_BxM, W_dec_MxD, b_dec_D, x_BxD


def _row_tile(B: int, tile: int) -> int:
    """The largest divisor of B that is at most `tile` (0: B), so that equal row tiles cover the batch."""
    return max(t for t in range(1, min(tile or B, B) + 1) if B % t == 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def prefix_mse(acts_BxM, W_dec_MxD, b_dec_D, x_BxD, widths: tuple[int, ...], tile: int = 1024):
    """(mse_P, mse_P[p] = mean((x̂_p − x)²); r_BxD = x̂_P − x) of dense acts and widths ending at M, tile by tile."""
    return _fwd(acts_BxM, W_dec_MxD, b_dec_D, x_BxD, widths, tile)[0]


# Both passes walk the batch in tiles of T rows (`lax.scan`) and, inside a tile, the prefix blocks; the tiles,
# not the order of the blocks, are what bound the temporaries (see the module docstring).
def _fwd(acts_BxM, W_dec_MxD, b_dec_D, x_BxD, widths, tile):
    acts_BxM, W_dec_MxD, b_dec_D, x_BxD = _check(acts_BxM, W_dec_MxD, b_dec_D, x_BxD, widths)
    (B, M), D = acts_BxM.shape, x_BxD.shape[1]
    T = _row_tile(B, tile)

    def one_tile(sse_P, tile_in):
        a_TxM, x_TxD = tile_in
        r_TxD = (b_dec_D - x_TxD).astype(jnp.float32)
        for p, (lo, hi) in enumerate(_blocks(widths)):
            r_TxD = r_TxD + a_TxM[:, lo:hi] @ W_dec_MxD[lo:hi]
            sse_P = sse_P.at[p].add(jnp.sum(r_TxD * r_TxD))
        return sse_P, r_TxD

    tiles = (acts_BxM.reshape(B // T, T, M), x_BxD.reshape(B // T, T, D))
    sse_P, r_NxTxD = jax.lax.scan(one_tile, jnp.zeros((len(widths),), jnp.float32), tiles)
    r_BxD = r_NxTxD.reshape(B, D)
    return (sse_P / (B * D), r_BxD), (acts_BxM, W_dec_MxD, b_dec_D, x_BxD, r_BxD)


def _bwd(widths, tile, res, cts):
    acts_BxM, W_dec_MxD, b_dec_D, x_BxD, r_BxD = res
    ct_P, ct_r_BxD = cts
    (B, M), D = acts_BxM.shape, x_BxD.shape[1]
    T = _row_tile(B, tile)
    coef_P = 2.0 * ct_P / (B * D)  # d(mse_p)/d(r_p) = coef_p · r_p

    def one_tile(dW_MxD, tile_in):
        a_TxM, r_TxD, G_TxD = tile_in  # r starts as r_P, G as the cotangent of r_P
        dacts = []
        for p, (lo, hi) in reversed(list(enumerate(_blocks(widths)))):
            G_TxD = G_TxD + coef_P[p] * r_TxD  # now Σ_{q≥p}: block p is in every prefix q ≥ p
            dacts.append(G_TxD @ W_dec_MxD[lo:hi].T)
            dW_MxD = dW_MxD.at[lo:hi].add(a_TxM[:, lo:hi].T @ G_TxD)
            r_TxD = r_TxD - a_TxM[:, lo:hi] @ W_dec_MxD[lo:hi]
        return dW_MxD, (jnp.concatenate(dacts[::-1], axis=1), G_TxD)

    tiles = (acts_BxM.reshape(B // T, T, M), r_BxD.reshape(B // T, T, D),
             ct_r_BxD.astype(jnp.float32).reshape(B // T, T, D))
    dW_dec_MxD, (dacts_NxTxM, G_NxTxD) = jax.lax.scan(one_tile, jnp.zeros((M, D), jnp.float32), tiles)
    G_BxD = G_NxTxD.reshape(B, D)
    # b_dec and −x sit in every prefix, so their gradient is the full suffix sum G_1.
    return (dacts_NxTxM.reshape(B, M).astype(acts_BxM.dtype), dW_dec_MxD.astype(W_dec_MxD.dtype),
            jnp.sum(G_BxD, axis=0).astype(b_dec_D.dtype), (-G_BxD).astype(x_BxD.dtype))


prefix_mse.defvjp(_fwd, _bwd)


def matryoshka_mse(acts_BxM, W_dec_MxD, b_dec_D, x_BxD, cfg: MatryoshkaConfig = MatryoshkaConfig()):
    """(loss = Σ_p w_p · mse_p, mse_P, r_BxD = x̂_P − x) for dense acts of an SAE with ordered latents."""
    M = jnp.shape(acts_BxM)[1]
    mse_P, r_BxD = prefix_mse(acts_BxM, W_dec_MxD, b_dec_D, x_BxD, prefix_widths(M, cfg), cfg.tile)
    return jnp.dot(prefix_weights(M, cfg), mse_P), mse_P, r_BxD


def make_loss_fn(sae_cfg: sae.SAEConfig, cfg: MatryoshkaConfig = MatryoshkaConfig()):
    """`loss_fn(params, x_BxD, dead_M) -> (loss, metrics)` for `train.make_train_step`: Matryoshka MSE + AuxK."""
    if sae_cfg.activation != "batchtopk":
        raise ValueError(f"Matryoshka needs a batchtopk SAE, got activation={sae_cfg.activation!r}")
    widths, w_P = prefix_widths(sae_cfg.d_sae, cfg), prefix_weights(sae_cfg.d_sae, cfg)

    def loss_fn(params, x_BxD, dead_M=None):
        acts_BxM = sae.encode(params, x_BxD, sae_cfg)  # one BatchTopK selection over all M latents
        mse_P, r_BxD = prefix_mse(acts_BxM, params["W_dec"], sae._b_dec(params, sae_cfg), x_BxD, widths, cfg.tile)
        mmse = jnp.dot(w_P, mse_P)
        aux = sae.aux_loss(params, x_BxD, -r_BxD, dead_M, sae_cfg)
        total = mmse + sae_cfg.aux_coeff * aux
        var = jnp.sum((x_BxD - x_BxD.mean(0)) ** 2)
        fvu_P = jax.lax.stop_gradient(mse_P * x_BxD.size / jnp.where(var > 0, var, 1.0))
        fired_BxM = acts_BxM != 0
        metrics = dict(loss=total, mmse=mmse, mse=mse_P[-1], aux=aux, l0=jnp.mean(jnp.sum(fired_BxM, -1)),
                       l0_p1=jnp.mean(jnp.sum(fired_BxM[:, : widths[0]], -1)), fvu=fvu_P[-1],
                       **{f"fvu_p{p + 1}": fvu_P[p] for p in range(len(widths))})
        return total, metrics

    return loss_fn


def _check_width(width: int, M: int):
    if not 1 <= width <= M:
        raise ValueError(f"prefix width must lie in 1..d_sae={M}, got {width}")


def truncate(acts_BxM: jax.Array, width: int) -> jax.Array:
    """The code of the first `width` latents, acts_Bxm; decode it with `truncate_params`' SAE."""
    if isinstance(acts_BxM, sae.Code):
        raise ValueError("truncate takes dense acts [B, M] (batchtopk/jumprelu/relu), got a TopK Code")
    _check_width(width, acts_BxM.shape[1])
    return acts_BxM[:, :width]


def prefix_recon(params: dict, acts_BxM: jax.Array, sae_cfg: sae.SAEConfig, width: int) -> jax.Array:
    """x̂ of the prefix of `width` latents: b_dec + acts[:, :width] W_dec[:width]."""
    return truncate(acts_BxM, width) @ params["W_dec"][:width] + sae._b_dec(params, sae_cfg)


def truncate_params(params: dict, sae_cfg: sae.SAEConfig, width: int) -> tuple[dict, sae.SAEConfig]:
    """(params, cfg) of the SAE made of the first `width` latents; needs latents that fire independently."""
    if sae_cfg.activation not in ("jumprelu", "relu"):
        raise ValueError(f"cannot cut a {sae_cfg.activation} SAE (its selection couples the latents); convert it "
                         "with sae.batchtopk_to_jumprelu first")
    _check_width(width, sae_cfg.d_sae)
    cut = {"W_enc": lambda a: a[:, :width], "W_dec": lambda a: a[:width], "b_dec": lambda a: a}
    new = {name: cut.get(name, lambda a: a[:width])(a) for name, a in params.items()}
    return new, dataclasses.replace(sae_cfg, d_sae=width)

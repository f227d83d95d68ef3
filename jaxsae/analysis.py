"""Analysis of trained SAEs: latent groups, ablated reconstructions, top-activating contexts, pooled SAEs.

Shapes: S seeds, M latents, D = d_in, N activation rows, G latent groups (keep-masks), E chosen latents,
C token contexts of length T, R cache rows mapped to (context, position), W latents of a pooled SAE.

- Groups. `stability_groups` splits the alive latents by per-feature stability p (see `jaxsae.stability`);
  `random_size_matched` / `random_freq_matched` draw random latents matched to a group in size, or in count per
  firing-frequency bin (`frequency_bins`); `ablation_groups` builds all six the stability experiment ablates.
- Ablation. Ablating a group zeroes its latents' activations AFTER the TopK selection, so the other latents keep
  their values (nothing moves up into the freed slots): `ablate`, `ablated_apply`, `ablated_ev` (EV per keep-mask,
  firing frequency and mean activation), `ablated_recon_fn` (for `evaluate.ce_metrics`).
- Contexts. Cache row r is the r-th kept position, in row-major order, of the contexts the cache was harvested
  from (`harvest.kept_positions`: it drops the first `skip_first` positions and every excluded token, e.g.
  <|endoftext|>); `row_positions` / `cache_row_positions` give that map and `top_contexts` the highest activations
  of each latent with a window of token ids and per-token activations (plain JSON-able data).
- Pooling. `pooled_sae` gathers the greedily-kept unique latents of several seeds into one SAE and
  `refit_encoder` trains its encoder with the decoder held fixed.
"""
from __future__ import annotations

import functools
import os
from typing import Callable, Iterator, NamedTuple, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from jaxsae import data, harvest, sae, stability, train

RECON_FN = Callable[[jax.Array], jax.Array]


# ---------------------------------------------------------------- groups


def frequency_bins(freq_SxM: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """(edges [n_bins + 1] of log10 frequency, bin_SxM): quantile bins of the alive latents of all seeds; -1 if silent.

    Bin b holds edges[b] <= log10 f < edges[b + 1]; the last bin also holds its upper edge (the largest frequency).
    """
    freq_SxM = np.asarray(freq_SxM, np.float64)
    chex.assert_rank(freq_SxM, 2)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    alive_SxM = freq_SxM > 0
    if not alive_SxM.any():
        raise ValueError(f"no latent fires (all {freq_SxM.size} firing frequencies are 0)")
    log_SxM = np.log10(np.where(alive_SxM, freq_SxM, 1.0))
    edges = np.quantile(log_SxM[alive_SxM], np.linspace(0, 1, n_bins + 1))
    bin_SxM = np.clip(np.searchsorted(edges, log_SxM, side="right") - 1, 0, n_bins - 1)
    return edges, np.where(alive_SxM, bin_SxM, -1)


def stability_groups(p_SxM: np.ndarray, freq_SxM: np.ndarray, stable_min: float) -> dict[str, np.ndarray]:
    """{"stable", "unstable"} as bool [S, M]: alive latents with p >= stable_min, and the other alive ones."""
    p_SxM, freq_SxM = np.asarray(p_SxM), np.asarray(freq_SxM)
    chex.assert_rank(p_SxM, 2)
    chex.assert_equal_shape([p_SxM, freq_SxM])
    alive_SxM = freq_SxM > 0
    return {"stable": alive_SxM & (p_SxM >= stable_min), "unstable": alive_SxM & (p_SxM < stable_min)}


def random_freq_matched(rng: np.random.Generator, group_SxM: np.ndarray, pool_SxM: np.ndarray,
                        bin_SxM: np.ndarray) -> np.ndarray:
    """bool [S, M]: per seed and bin, as many latents drawn (without replacement) from `pool` as `group` has there."""
    group_SxM, pool_SxM, bin_SxM = np.asarray(group_SxM, bool), np.asarray(pool_SxM, bool), np.asarray(bin_SxM)
    chex.assert_rank(group_SxM, 2)
    chex.assert_equal_shape([group_SxM, pool_SxM, bin_SxM])
    out_SxM = np.zeros_like(group_SxM)
    for s in range(len(group_SxM)):
        for b in np.unique(bin_SxM[s][group_SxM[s]]):
            want = int(np.sum(group_SxM[s] & (bin_SxM[s] == b)))
            have_M = np.flatnonzero(pool_SxM[s] & (bin_SxM[s] == b))
            if want > len(have_M):
                raise ValueError(f"seed {s}, bin {b}: the group has {want} latents, the pool only {len(have_M)}")
            out_SxM[s, rng.choice(have_M, want, replace=False)] = True
    return out_SxM


def random_size_matched(rng: np.random.Generator, group_SxM: np.ndarray, pool_SxM: np.ndarray) -> np.ndarray:
    """bool [S, M]: per seed, as many latents drawn (without replacement) from `pool` as `group` holds."""
    return random_freq_matched(rng, group_SxM, pool_SxM, np.zeros(np.shape(group_SxM), np.int64))


def ablation_groups(rng: np.random.Generator, p_SxM: np.ndarray, freq_SxM: np.ndarray, stable_min: float,
                    n_bins: int) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """(groups, edges, bin_SxM): stable, unstable, and random alive latents matched to each in size
    (`random_size_{name}`) and in count per log-frequency bin (`random_freq_{name}`), all bool [S, M]."""
    edges, bin_SxM = frequency_bins(freq_SxM, n_bins)
    groups = stability_groups(p_SxM, freq_SxM, stable_min)
    alive_SxM = np.asarray(freq_SxM) > 0
    for name in ("stable", "unstable"):
        groups[f"random_size_{name}"] = random_size_matched(rng, groups[name], alive_SxM)
        groups[f"random_freq_{name}"] = random_freq_matched(rng, groups[name], alive_SxM, bin_SxM)
    return groups, edges, bin_SxM


# ---------------------------------------------------------------- ablated reconstruction


def ablate(code: sae.Code | jax.Array, keep_M: jax.Array) -> sae.Code | jax.Array:
    """The code with the activations of latents outside bool `keep_M` zeroed; the others keep their values."""
    keep_M = jnp.asarray(keep_M)
    chex.assert_rank(keep_M, 1)
    chex.assert_type(keep_M, bool)
    if isinstance(code, sae.Code):
        return sae.Code(jnp.where(keep_M[code.idx_BxK], code.vals_BxK, 0.0), code.idx_BxK)
    chex.assert_axis_dimension(code, 1, keep_M.shape[0])
    return jnp.where(keep_M, code, 0.0)


def ablated_apply(params: dict, x_BxD: jax.Array, sae_cfg: sae.SAEConfig, keep_M: jax.Array) -> jax.Array:
    """x̂ of x with the latents outside `keep_M` zeroed after the selection."""
    return sae.decode(params, ablate(sae.encode(params, x_BxD, sae_cfg), keep_M), sae_cfg)


def _fired_and_sum(code: sae.Code | jax.Array, M: int) -> tuple[jax.Array, jax.Array]:
    """([M] tokens on which each latent fired, [M] sum of its activations) over a batch."""
    if isinstance(code, sae.Code):
        zeros_M = jnp.zeros((M,), jnp.float32)
        return (zeros_M.at[code.idx_BxK].add((code.vals_BxK > 0).astype(jnp.float32)),
                zeros_M.at[code.idx_BxK].add(code.vals_BxK))
    return jnp.sum(code > 0, axis=0).astype(jnp.float32), jnp.sum(code, axis=0)


@functools.partial(jax.jit, static_argnames=("sae_cfg",))
def _seed_pass(params, x_BxD, keep_GxM, sae_cfg):
    """One seed, one batch: squared error under each keep-mask [G], firing counts [M], activation sums [M]."""
    code = sae.encode(params, x_BxD, sae_cfg)

    def sq_err(keep_M):
        return jnp.sum((x_BxD - sae.decode(params, ablate(code, keep_M), sae_cfg)) ** 2)

    return (jax.lax.map(sq_err, keep_GxM), *_fired_and_sum(code, sae_cfg.d_sae))


class AblationStats(NamedTuple):
    """What `ablated_ev` measures per seed."""

    ev_SxG: np.ndarray  # EV = 1 − Σ‖x − x̂‖² / Σ‖x − x̄‖² with keep-mask g applied
    freq_SxM: np.ndarray  # fraction of the rows on which each latent fired (unablated)
    mean_act_SxM: np.ndarray  # mean activation of each latent on the rows where it fired (0 if never)


def ablated_ev(params_S: dict, sae_cfg: sae.SAEConfig, x_NxD: np.ndarray, keep_SxGxM: np.ndarray,
               chunk: int = 4096) -> AblationStats:
    """Per seed: EV under each bool keep-mask, firing frequency and mean activation when firing, over rows x_NxD."""
    keep_SxGxM = np.asarray(keep_SxGxM)
    chex.assert_rank([x_NxD, keep_SxGxM], [2, 3])
    chex.assert_type(keep_SxGxM, bool)
    S, G, M = keep_SxGxM.shape
    chex.assert_shape(params_S["W_dec"], (S, M, sae_cfg.d_in))
    chex.assert_axis_dimension(x_NxD, 1, sae_cfg.d_in)
    if len(x_NxD) == 0:
        raise ValueError("ablated_ev needs at least one row, got x_NxD of shape (0, D)")
    x_NxD = np.asarray(x_NxD, np.float32)
    var = float(np.sum((x_NxD.astype(np.float64) - x_NxD.mean(0, dtype=np.float64)) ** 2))
    err_SxG, fired_SxM, act_SxM = np.zeros((S, G)), np.zeros((S, M)), np.zeros((S, M))
    for s in tqdm(range(S), desc="EV per seed", disable=S == 1):
        params = jax.tree.map(lambda a: jnp.asarray(a[s]), params_S)
        keep_GxM = jnp.asarray(keep_SxGxM[s])
        for i in range(0, len(x_NxD), chunk):
            e_G, f_M, a_M = _seed_pass(params, jnp.asarray(x_NxD[i:i + chunk]), keep_GxM, sae_cfg)
            err_SxG[s] += np.asarray(e_G, np.float64)
            fired_SxM[s] += np.asarray(f_M, np.float64)
            act_SxM[s] += np.asarray(a_M, np.float64)
    return AblationStats(1.0 - err_SxG / var, fired_SxM / len(x_NxD), act_SxM / np.maximum(fired_SxM, 1))


@functools.partial(jax.jit, static_argnames=("sae_cfg",))
def _ablated_recon(params, normalizer, keep_M, h_BxTxD, sae_cfg):
    B, T, D = h_BxTxD.shape
    x_NxD = normalizer(h_BxTxD.reshape(B * T, D).astype(jnp.float32))
    x_hat_NxD = normalizer.invert(ablated_apply(params, x_NxD, sae_cfg, keep_M))
    return x_hat_NxD.reshape(B, T, D).astype(h_BxTxD.dtype)


def ablated_recon_fn(params: dict, sae_cfg: sae.SAEConfig, normalizer: data.Normalizer | None,
                     keep_M: np.ndarray) -> RECON_FN:
    """h_BxTxD -> the SAE's reconstruction with the latents outside `keep_M` zeroed, in the model's scale (jitted)."""
    keep_M = jnp.asarray(keep_M)
    chex.assert_shape(keep_M, (sae_cfg.d_sae,))
    chex.assert_type(keep_M, bool)
    if normalizer is None:
        normalizer = data.Normalizer(np.zeros(sae_cfg.d_in, np.float32), 1.0)
    params = jax.tree.map(jnp.asarray, params)
    return lambda h_BxTxD: _ablated_recon(params, normalizer, keep_M, h_BxTxD, sae_cfg)


# ---------------------------------------------------------------- top-activating contexts


def row_positions(tokens_CxT: np.ndarray, skip_first: int, exclude_tokens: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(ctx_R, pos_R): the context and position of each row a harvest of these contexts writes, in cache order."""
    tokens_CxT = np.asarray(tokens_CxT)
    chex.assert_rank(tokens_CxT, 2)
    chex.assert_type(tokens_CxT, int)
    # Harvest writes h[keep] batch by batch of whole contexts: row-major order of the one mask.
    ctx_R, pos_R = np.nonzero(harvest.kept_positions(tokens_CxT, skip_first, exclude_tokens))
    return ctx_R, pos_R


def cache_row_positions(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens_CxT, ctx_R, pos_R) of the cache at `path`: its first R rows come from these contexts and positions."""
    manifest = data.CacheSource(path).manifest
    tokens_CxT = harvest.cache_contexts(path)
    return (tokens_CxT, *row_positions(tokens_CxT, int(manifest["skip_first"]), manifest["exclude_tokens"]))


def cache_rows(source: data.CacheSource, n: int) -> np.ndarray:
    """float32 [min(n, rows), D]: the first n rows of a cache in stored order (row r is `cache_row_positions`' r)."""
    return source.head(n)


@functools.partial(jax.jit, static_argnames=("sae_cfg",))
def _latent_acts(params, x_BxD, latents_E, sae_cfg):
    code = sae.encode(params, x_BxD, sae_cfg)
    if isinstance(code, sae.Code):  # a latent outside a row's top k has activation 0 there
        hit_BxKxE = code.idx_BxK[..., None] == latents_E
        return jnp.sum(jnp.where(hit_BxKxE, code.vals_BxK[..., None], 0.0), axis=1)
    return code[:, latents_E]


def latent_acts(params: dict, sae_cfg: sae.SAEConfig, x_NxD: np.ndarray, latents_E: Sequence[int],
                chunk: int = 4096) -> np.ndarray:
    """float32 [N, E]: the activations of the chosen latents on the (normalised) rows x_NxD."""
    latents_E = jnp.asarray(latents_E, jnp.int32)
    chex.assert_rank([x_NxD, latents_E], [2, 1])
    chex.assert_axis_dimension(x_NxD, 1, sae_cfg.d_in)
    if len(latents_E) and not (0 <= int(latents_E.min()) and int(latents_E.max()) < sae_cfg.d_sae):
        raise ValueError(f"latent ids must lie in [0, {sae_cfg.d_sae}), got {np.asarray(latents_E).tolist()}")
    params = jax.tree.map(jnp.asarray, params)
    out = [np.asarray(_latent_acts(params, jnp.asarray(x_NxD[i:i + chunk], jnp.float32), latents_E, sae_cfg))
           for i in range(0, len(x_NxD), chunk)]
    return np.concatenate(out) if out else np.zeros((0, len(latents_E)), np.float32)


def top_contexts(acts_RxE: np.ndarray, tokens_CxT: np.ndarray, ctx_R: np.ndarray, pos_R: np.ndarray, k: int = 3,
                 window: int = 6, latents: Sequence[int] | None = None) -> list[dict]:
    """The k highest positive activations of each latent (column of acts_RxE, rows = cache rows 0..R-1).

    Per latent: {"latent", "examples": [{"context", "position", "act", "start", "tokens", "acts", "max_pos"}]}, where
    `tokens` are the ids of positions [start, position + window] ∩ the context (start = position − window, clipped),
    `acts` the latent's activation at each of them (None where the rows do not cover the position: dropped
    positions such as <|endoftext|>, or rows beyond R), and tokens[max_pos] the max-activating one. Ties go to the
    earlier row. Everything is a plain int, float or list.
    """
    acts_RxE, tokens_CxT = np.asarray(acts_RxE, np.float32), np.asarray(tokens_CxT)
    ctx_R, pos_R = np.asarray(ctx_R), np.asarray(pos_R)
    chex.assert_rank([acts_RxE, tokens_CxT, ctx_R, pos_R], [2, 2, 1, 1])
    chex.assert_equal_shape([ctx_R, pos_R])
    R, E = acts_RxE.shape
    if R > len(ctx_R):
        raise ValueError(f"acts has {R} rows but the row map covers only {len(ctx_R)} (the cache's full contexts)")
    if k < 1 or window < 0:
        raise ValueError(f"need k >= 1 and window >= 0, got k={k}, window={window}")
    latents = list(range(E)) if latents is None else [int(i) for i in latents]
    if len(latents) != E:
        raise ValueError(f"{len(latents)} latent ids for {E} columns of acts")
    C, T = tokens_CxT.shape
    row_CxT = np.full((C, T), -1, np.int64)  # which of the R rows holds each position (-1: none)
    row_CxT[ctx_R[:R], pos_R[:R]] = np.arange(R)
    out = []
    for e in range(E):
        a_R = acts_RxE[:, e]
        examples = []
        for r in np.lexsort((np.arange(R), -a_R))[:k]:  # by activation, descending; ties by row
            if not a_R[r] > 0:
                break
            c, t = int(ctx_R[r]), int(pos_R[r])
            start, stop = max(0, t - window), min(T, t + window + 1)
            rows = row_CxT[c, start:stop]
            examples.append({"context": c, "position": t, "act": float(a_R[r]), "start": start,
                             "tokens": tokens_CxT[c, start:stop].tolist(),
                             "acts": [float(a_R[i]) if i >= 0 else None for i in rows], "max_pos": t - start})
        out.append({"latent": latents[e], "examples": examples})
    return out


# ---------------------------------------------------------------- pooled SAE


def pooled_sae(params_S: dict, p_SxM: np.ndarray, freq_SxM: np.ndarray, width: int,
               tau: float) -> tuple[dict, np.ndarray, np.ndarray]:
    """(params, seed_W, latent_W): unique latents of S seeds as one SAE of at most `width` latents.

    Candidates are the alive latents (freq > 0), most stable first, then most frequent, then by (seed, latent);
    one is kept when its decoder |cos| to every kept one is < τ (`stability.pool_unique`). Each kept latent brings
    its decoder row, encoder column and encoder bias (and JumpReLU threshold); b_dec is the seeds' mean.
    """
    p_SxM, freq_SxM = np.asarray(p_SxM), np.asarray(freq_SxM)
    chex.assert_rank(p_SxM, 2)
    chex.assert_equal_shape([p_SxM, freq_SxM])
    S, M = p_SxM.shape
    chex.assert_shape(params_S["W_dec"], (S, M, None))
    if unknown := set(params_S) - {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}:
        raise ValueError(f"pooled_sae does not know how to pool params {sorted(unknown)}")
    order_N = np.lexsort((-freq_SxM.ravel(), -p_SxM.ravel()))  # last key first: p, then freq, then index
    order_N = order_N[freq_SxM.ravel()[order_N] > 0]
    if len(order_N) == 0:
        raise ValueError("pooled_sae: no latent of any seed fires")
    W_dec_SxMxD = np.asarray(params_S["W_dec"])
    kept_W = stability.pool_unique(W_dec_SxMxD.reshape(S * M, -1), order_N, width, tau)
    seed_W, latent_W = np.divmod(kept_W, M)
    params = {"W_dec": W_dec_SxMxD[seed_W, latent_W],
              "W_enc": np.asarray(params_S["W_enc"])[seed_W, :, latent_W].T,
              "b_enc": np.asarray(params_S["b_enc"])[seed_W, latent_W],
              "b_dec": np.asarray(params_S["b_dec"]).mean(0)}
    if "threshold" in params_S:
        params["threshold"] = np.asarray(params_S["threshold"])[seed_W, latent_W]
    return params, seed_W, latent_W


def refit_encoder(params: dict, sae_cfg: sae.SAEConfig, batches: Iterator[np.ndarray], train_cfg: train.TrainConfig,
                  normalizer: data.Normalizer | None = None, frozen: Sequence[str] = ("W_dec",)) -> dict:
    """`train_cfg.total_steps` steps of `sae.loss` (no AuxK) on `batches` of raw [B, D] rows, training every param
    but `frozen`, which come back unchanged bit for bit; clipping, Adam and schedule are `train.optimizer`'s."""
    if missing := set(frozen) - set(params):
        raise ValueError(f"frozen names params the SAE does not have: {sorted(missing)}")
    chex.assert_shape(params["W_dec"], (sae_cfg.d_sae, sae_cfg.d_in))
    fixed = {n: jnp.asarray(v) for n, v in params.items() if n in frozen}
    free = {n: jnp.asarray(v) for n, v in params.items() if n not in frozen}
    tx = train.optimizer(train_cfg)
    normalize = normalizer or (lambda x: x)

    @jax.jit
    def step(free, opt_state, fixed, x_BxD):
        # The frozen params are arguments (not closed-over constants) and outside the differentiated tree.
        grads = jax.grad(lambda p: sae.loss({**p, **fixed}, x_BxD, sae_cfg)[0])(free)
        updates, opt_state = tx.update(grads, opt_state, free)
        return optax.apply_updates(free, updates), opt_state

    opt_state = tx.init(free)
    for _ in tqdm(range(train_cfg.total_steps), desc="refit encoder"):
        x_BxD = jnp.asarray(normalize(next(batches)), jnp.float32)
        chex.assert_shape(x_BxD, (None, sae_cfg.d_in))
        free, opt_state = step(free, opt_state, fixed, x_BxD)
    return {**jax.device_get(free), **{n: params[n] for n in frozen}}


# ---------------------------------------------------------------- feature browser tables


@functools.partial(jax.jit, static_argnames=("block",))
def _best_partner(a_MxD, b_NxD, ea_MxD, eb_NxD, block: int):
    """(argmax_M, max_M) over the rows of b of each row of a; unit rows in, exact float32 products."""
    M, D = a_MxD.shape
    nb = -(-M // block)
    hi = jax.lax.Precision.HIGHEST

    def tiles(x_MxD):
        return jnp.pad(x_MxD, ((0, nb * block - M), (0, 0))).reshape(nb, block, D)

    def one(x):
        a_bxD, ea_bxD = x
        sim_bxN = jnp.abs(jnp.einsum("bd,nd->bn", a_bxD, b_NxD, precision=hi))
        if ea_bxD is not None:
            sim_bxN = jnp.minimum(sim_bxN, jnp.abs(jnp.einsum("bd,nd->bn", ea_bxD, eb_NxD, precision=hi)))
        return jnp.argmax(sim_bxN, axis=1), jnp.max(sim_bxN, axis=1)

    idx_nbxb, best_nbxb = jax.lax.map(one, (tiles(a_MxD), None if ea_MxD is None else tiles(ea_MxD)))
    return idx_nbxb.reshape(-1)[:M], best_nbxb.reshape(-1)[:M]


def best_partners(dec_SxMxD: np.ndarray, seed: int, enc_SxMxD: np.ndarray | None = None,
                  block: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """(idx_SxM, cos_SxM): for latent i of seed `seed`, the latent idx[s, i] of seed s with the highest |cos| to it
    and that |cos| (with encoder directions, the score min(|cos_dec|, |cos_enc|) of `stability.best_matches`).

    Row `seed` is each latent itself with score 1. Ties go to the lower index. float32 throughout, so cos[s]
    equals `best_matches(..., search_dtype="float32")[seed, s]` up to rounding.
    """
    dec_SxMxD = np.asarray(dec_SxMxD, np.float32)
    chex.assert_rank(dec_SxMxD, 3)
    S, M, _ = dec_SxMxD.shape
    if not 0 <= seed < S:
        raise ValueError(f"seed must index one of the {S} seeds, got {seed}")
    if enc_SxMxD is not None:
        enc_SxMxD = np.asarray(enc_SxMxD, np.float32)
        if enc_SxMxD.shape != dec_SxMxD.shape:
            raise ValueError(f"enc_SxMxD must match dec_SxMxD {dec_SxMxD.shape}, got {enc_SxMxD.shape}")
    for name, x in (("dec_SxMxD", dec_SxMxD), ("enc_SxMxD", enc_SxMxD)):
        if x is not None and not np.all(np.isfinite(x)):
            raise ValueError(f"{name} holds NaN or inf values")
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    block = min(block, M)
    dec = stability.unit_rows(dec_SxMxD)
    enc = None if enc_SxMxD is None else stability.unit_rows(enc_SxMxD)
    idx_SxM, cos_SxM = np.tile(np.arange(M), (S, 1)), np.ones((S, M), np.float32)
    for s in range(S):
        if s != seed:
            ea, eb = (None, None) if enc is None else (enc[seed], enc[s])
            i_M, c_M = _best_partner(dec[seed], dec[s], ea, eb, block)
            idx_SxM[s], cos_SxM[s] = np.asarray(i_M), np.asarray(c_M)
    return idx_SxM, cos_SxM


class ActivationSummary(NamedTuple):
    """Per latent (column of an activation matrix), over its rows."""

    freq_E: np.ndarray  # fraction of the rows on which the latent is > 0
    mean_E: np.ndarray  # mean of its positive activations (0 if it never fires)
    max_E: np.ndarray  # its largest activation (0 if it never fires): the histogram's upper edge
    hist_ExB: np.ndarray  # int counts of its positive activations in B equal bins of [0, max]


def activation_summary(acts_RxE: np.ndarray, n_bins: int) -> ActivationSummary:
    """Firing frequency, mean and max when firing, and a histogram of each latent's positive activations.

    Bin b of latent e holds b/B · max_e <= a < (b+1)/B · max_e (the last bin also holds max_e), as `np.histogram`
    with range (0, max_e) bins them.
    """
    acts_RxE = np.asarray(acts_RxE, np.float64)
    chex.assert_rank(acts_RxE, 2)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    R, E = acts_RxE.shape
    if R == 0:
        raise ValueError(f"activation_summary needs at least one row, got acts of shape {acts_RxE.shape}")
    fired_RxE = acts_RxE > 0
    count_E = fired_RxE.sum(0)
    max_E = np.where(fired_RxE, acts_RxE, 0.0).max(0)
    mean_E = np.where(fired_RxE, acts_RxE, 0.0).sum(0) / np.maximum(count_E, 1)
    r, e = np.nonzero(fired_RxE)
    b = np.minimum((acts_RxE[r, e] / max_E[e] * n_bins).astype(np.int64), n_bins - 1)
    hist_ExB = np.bincount(e * n_bins + b, minlength=E * n_bins).reshape(E, n_bins)
    return ActivationSummary(count_E / R, mean_E, max_E, hist_ExB)


def stability_by_frequency(p_SxM: np.ndarray, freq_SxM: np.ndarray,
                           n_bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(edges [n_bins + 1] of log10 frequency, mean_p_B, count_B): mean stability of the alive latents of all seeds
    in each quantile bin of firing frequency (`frequency_bins`); mean_p is NaN in an empty bin."""
    p_SxM = np.asarray(p_SxM, np.float64)
    chex.assert_equal_shape([p_SxM, np.asarray(freq_SxM)])
    edges, bin_SxM = frequency_bins(freq_SxM, n_bins)
    alive = bin_SxM >= 0
    count_B = np.bincount(bin_SxM[alive], minlength=n_bins)
    sum_B = np.bincount(bin_SxM[alive], weights=p_SxM[alive], minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return edges, np.where(count_B > 0, sum_B / np.maximum(count_B, 1), np.nan), count_B


def stability_by_tau(p_by_tau: dict, alive_SxM: np.ndarray, stable_min: float) -> dict[str, dict]:
    """Per τ (keyed str(τ)), over the alive latents of all seeds: mean p, the fractions stable (p >= stable_min),
    with p = 1 and with p = 0, and `hist`, the count of latents at each level p = j / (S - 1), j = 0..S-1."""
    alive_SxM = np.asarray(alive_SxM, bool)
    S, n = alive_SxM.shape[0], int(alive_SxM.sum())
    if S < 2 or n == 0:
        raise ValueError(f"stability needs at least 2 seeds and one alive latent, got {S} seeds and {n} alive")
    out = {}
    for tau, p_SxM in p_by_tau.items():
        p_A = np.asarray(p_SxM, np.float64)[alive_SxM]
        levels_A = np.rint(p_A * (S - 1)).astype(int)  # p takes the values j / (S - 1)
        out[str(tau)] = {"mean": float(p_A.mean()), "frac_stable": float(np.mean(p_A >= stable_min)),
                         "frac_p1": float(np.mean(p_A == 1)), "frac_p0": float(np.mean(p_A == 0)),
                         "hist": np.bincount(levels_A, minlength=S).tolist()}
    return out

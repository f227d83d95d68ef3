"""SAE Boost (Koriagin et al. 2025): residual SAEs trained on a frozen base SAE's error, and their stitched export.

A residual SAE reads the same (normalised) activation x as the base, but is trained to reconstruct the
base's error e = x − x̂_base; it has no decoder bias, so it adds nothing unless one of its latents fires.
The boosted model is x̂ = x̂_base(x) + Σ_d x̂_res,d(x). With JumpReLU activations every latent fires on its
own, so the sum equals ONE SAE whose dictionaries are concatenated ("stitched"), saved like any other.

A residual carries the hash of the base params, the layer and d_in it was trained against, so it cannot
be added to the wrong base or summed with a residual from another layer.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxsae import io, sae
from jaxsae.data import Normalizer


@dataclasses.dataclass(frozen=True)
class ResidualInfo:
    base_hash: str  # params_hash of the base SAE the residual was trained against
    layer: int  # model layer of the activations (residual stream after this block)
    d_in: int  # width of the activations


class Residual(NamedTuple):
    """One residual SAE: its params (no seed axis), config and provenance."""

    params: dict
    cfg: sae.SAEConfig
    info: ResidualInfo


def params_hash(params: dict) -> str:
    """Hex digest of an SAE's params (names, shapes and float32 bytes), to recognise its base later."""
    h = hashlib.sha256()
    for name in sorted(params):
        a = np.ascontiguousarray(np.asarray(params[name], np.float32))
        h.update(f"{name}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def residual_config(base_cfg: sae.SAEConfig, d_sae: int = 1024, k: int = 5, aux_k: int = 256) -> sae.SAEConfig:
    """The paper's residual: BatchTopK during training, no decoder bias, same d_in as the base."""
    return sae.SAEConfig(d_in=base_cfg.d_in, d_sae=d_sae, activation="batchtopk", k=k, aux_k=aux_k,
                         aux_coeff=base_cfg.aux_coeff, decoder_bias=False)


def residual_loss_fn(base_params: dict, base_cfg: sae.SAEConfig, res_cfg: sae.SAEConfig):
    """`loss_fn(params, x_BxD, dead_M) -> (loss, metrics)` of a residual on a frozen base, for the trainer.

    The base is closed over (it is not part of the optimised state) and behind stop_gradient, so no
    gradient is computed for it even if a caller passes traced base params.
    """
    if res_cfg.decoder_bias:
        raise ValueError("a residual SAE must have decoder_bias=False (it must add nothing unless it fires)")
    if res_cfg.d_in != base_cfg.d_in:
        raise ValueError(f"residual d_in={res_cfg.d_in} does not match the base's d_in={base_cfg.d_in}")

    def loss_fn(params, x_BxD, dead_M=None):
        x_hat_base_BxD = jax.lax.stop_gradient(sae.apply(base_params, x_BxD, base_cfg))
        e_BxD = x_BxD - x_hat_base_BxD  # the target; the encoder still reads x
        acts = sae.encode(params, x_BxD, res_cfg)
        resid_BxD = e_BxD - sae.decode(params, acts, res_cfg)
        mse = jnp.mean(resid_BxD**2)
        aux = sae.aux_loss(params, x_BxD, resid_BxD, dead_M, res_cfg)  # on the part of e still missed
        total = mse + res_cfg.aux_coeff * aux
        var = jnp.sum((x_BxD - x_BxD.mean(0)) ** 2)
        metrics = {
            "loss": total, "mse": mse, "aux": aux,
            "l0": jnp.mean(jnp.sum(acts != 0, axis=-1)),
            # FVU of the boosted reconstruction (of x), and of the base alone, on this batch.
            "fvu": jax.lax.stop_gradient(jnp.sum(resid_BxD**2) / var),
            "fvu_base": jnp.sum(e_BxD**2) / var,
        }
        return total, metrics

    return loss_fn


def check_residuals(base_params: dict, base_cfg: sae.SAEConfig, residuals: Sequence[Residual]) -> None:
    """Raise ValueError unless every residual was trained on this base, at one layer, with this d_in."""
    base_hash = params_hash(base_params)
    for i, r in enumerate(residuals):
        if r.cfg.decoder_bias:
            raise ValueError(f"residual {i} has decoder_bias=True; residual SAEs must not have a decoder bias")
        if r.info.d_in != base_cfg.d_in or r.cfg.d_in != base_cfg.d_in:
            raise ValueError(f"residual {i} has d_in={r.cfg.d_in} (trained on {r.info.d_in}), "
                             f"the base has d_in={base_cfg.d_in}")
        if r.info.base_hash != base_hash:
            raise ValueError(f"residual {i} was trained against base {r.info.base_hash}, not this base {base_hash}")
    layers = sorted({r.info.layer for r in residuals})
    if len(layers) > 1:
        raise ValueError(f"cannot sum residuals trained on different layers: {layers}")


def boosted_apply(base_params: dict, base_cfg: sae.SAEConfig, residuals: Sequence[Residual], x_BxD: jax.Array):
    """x̂ = x̂_base + Σ x̂_res over the residuals (checked against the base first; close over params to jit)."""
    check_residuals(base_params, base_cfg, residuals)
    x_hat_BxD = sae.apply(base_params, x_BxD, base_cfg)
    for r in residuals:
        x_hat_BxD = x_hat_BxD + sae.apply(r.params, x_BxD, r.cfg)
    return x_hat_BxD


def stitch(base_params: dict, base_cfg: sae.SAEConfig, residuals: Sequence[Residual]) -> tuple[dict, sae.SAEConfig]:
    """One JumpReLU SAE with the base's and the residuals' dictionaries concatenated; same output as boosted_apply."""
    check_residuals(base_params, base_cfg, residuals)
    for name, cfg in [("base", base_cfg)] + [(f"residual {i}", r.cfg) for i, r in enumerate(residuals)]:
        if cfg.activation != "jumprelu":
            raise ValueError(f"stitching needs JumpReLU SAEs (each latent fires on its own); the {name} is "
                             f"{cfg.activation!r}: convert it with sae.batchtopk_to_jumprelu first")
    b_dec_D = base_params["b_dec"] if base_cfg.decoder_bias else jnp.zeros((base_cfg.d_in,), jnp.float32)
    parts = [base_params] + [
        # The stitched encoder sees x − b_dec_base; a residual read x, so fold b_dec_base into its b_enc.
        {**r.params, "b_enc": r.params["b_enc"] + b_dec_D @ r.params["W_enc"]} for r in residuals
    ]
    params = {
        "W_enc": jnp.concatenate([p["W_enc"] for p in parts], axis=1),
        "b_enc": jnp.concatenate([p["b_enc"] for p in parts]),
        "W_dec": jnp.concatenate([p["W_dec"] for p in parts], axis=0),
        "b_dec": jnp.asarray(b_dec_D),
        "threshold": jnp.concatenate([p["threshold"] for p in parts]),
    }
    cfg = dataclasses.replace(base_cfg, d_sae=params["W_dec"].shape[0], decoder_bias=True)
    return params, cfg


def save_residual(path: str | os.PathLike, residual: Residual, normalizer: Normalizer | None = None,
                  overwrite: bool = False) -> Path:
    """A SAELens folder (like any SAE here) whose cfg.json also records the residual's provenance."""
    return io.save_saelens(path, residual.params, residual.cfg, normalizer,
                           extra={"boost": dataclasses.asdict(residual.info)}, overwrite=overwrite)


def load_residual(path: str | os.PathLike) -> tuple[Residual, Normalizer | None]:
    """Read a folder written by save_residual."""
    params, cfg, normalizer = io.load_saelens(path)
    info = json.loads((Path(path) / io.CFG).read_text())["jaxsae"].get("boost")
    if info is None:
        raise ValueError(f"{path} holds a plain SAE, not a residual (no 'boost' provenance in {io.CFG})")
    return Residual(params, cfg, ResidualInfo(**info)), normalizer


def extend(key: jax.Array, base_params: dict, base_cfg: sae.SAEConfig, new_latents: int, k: int) -> tuple[dict, sae.SAEConfig]:
    """Baseline "extended SAE": the base's latents plus `new_latents` fresh ones, all trainable, BatchTopK k."""
    cfg = dataclasses.replace(base_cfg, d_sae=base_cfg.d_sae + new_latents, activation="batchtopk", k=k)
    fresh = sae.init(key, dataclasses.replace(base_cfg, d_sae=new_latents, activation="batchtopk", k=1))
    params = {n: jnp.concatenate([base_params[n], fresh[n]], axis=0 if n == "W_dec" else -1)
              for n in ("W_enc", "b_enc", "W_dec")}
    return {**params, "b_dec": jnp.asarray(base_params["b_dec"])}, cfg


def jumprelu_at_firing_rate(params: dict, cfg: sae.SAEConfig, x_NxD: jax.Array, rate: float,
                            chunk: int = 4096) -> tuple[dict, sae.SAEConfig]:
    """Freeze a BatchTopK SAE into JumpReLU form with ONE threshold under which a fraction `rate` of the rows
    of x_NxD fire at least one latent (fewer if that would need a negative threshold, which is clamped to 0).

    `sae.batchtopk_to_jumprelu` sets the threshold on the residual's own domain; this sets it on text the
    residual should leave alone (general text), to bound how often it fires there.
    """
    if cfg.activation != "batchtopk":
        raise ValueError(f"expected a batchtopk config, got activation={cfg.activation!r}")
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"rate must lie in [0, 1), got {rate}")
    x_NxD = jnp.asarray(x_NxD)
    if x_NxD.ndim != 2 or x_NxD.shape[0] < 1:
        raise ValueError(f"need activations [N >= 1, d_in={cfg.d_in}], got shape {x_NxD.shape}")
    top = jax.jit(lambda x: jnp.max(sae.pre_activations(params, x, cfg), axis=-1))
    max_N = np.concatenate([np.asarray(top(x_NxD[i:i + chunk])) for i in range(0, x_NxD.shape[0], chunk)])
    n_fire = int(np.floor(rate * len(max_N)))
    # A row fires iff its largest pre-activation exceeds θ; θ = the (N − n_fire)-th smallest leaves n_fire above it.
    theta = max(float(np.sort(max_N)[len(max_N) - n_fire - 1]), 0.0)
    new_cfg = dataclasses.replace(cfg, activation="jumprelu")
    return {**params, "threshold": jnp.full((cfg.d_sae,), theta, jnp.float32)}, new_cfg


def firing(params: dict, cfg: sae.SAEConfig, x_NxD: jax.Array, chunk: int = 4096) -> dict:
    """{"l0": mean latents active per row, "any": fraction of rows with at least one active latent} of an SAE
    with dense activations (a residual, alone) on the rows of x_NxD."""
    if cfg.activation == "topk":
        raise ValueError("firing needs an SAE with dense activations (jumprelu, batchtopk, relu), got topk")
    x_NxD = jnp.asarray(x_NxD)
    count = jax.jit(lambda x: jnp.sum(sae.encode(params, x, cfg) != 0, axis=-1))
    n_N = np.concatenate([np.asarray(count(x_NxD[i:i + chunk])) for i in range(0, x_NxD.shape[0], chunk)])
    return {"l0": float(n_N.mean()), "any": float(np.mean(n_N > 0))}

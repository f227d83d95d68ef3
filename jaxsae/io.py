"""SAELens folder layout: `sae_weights.safetensors` + `cfg.json`, readable by SAELens and by us.

Weights use SAELens's names and orientation (W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc, b_dec,
+ threshold for JumpReLU). `cfg.json` carries the SAELens keys (both the v6 flat `k` and the older
`activation_fn_kwargs`), and our own SAEConfig and Normalizer under "jaxsae". A folder that SAELens wrote
(no "jaxsae" key) loads with its activations taken as-is (normalize_activations must be "none"); its
`apply_b_dec_to_input=false` is folded into b_enc, since our encoder always sees x − b_dec.

SAELens has no inference class for BatchTopK (it saves those as JumpReLU): a "batchtopk" folder loads
here, but convert it with `sae.batchtopk_to_jumprelu` before handing it to SAELens.

Saving refuses to overwrite an existing SAE folder unless `overwrite=True`: a finished SAE is a result,
and silently replacing it with a different run's weights is the worse failure.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from jaxsae import sae
from jaxsae.data import Normalizer

WEIGHTS = "sae_weights.safetensors"
CFG = "cfg.json"
# Our activation name -> SAELens architecture name.
_ARCH = {"topk": "topk", "batchtopk": "batchtopk", "jumprelu": "jumprelu", "relu": "standard"}


def save_saelens(path: str | os.PathLike, params: dict, sae_cfg: sae.SAEConfig, normalizer: Normalizer | None = None,
                 extra: dict | None = None, overwrite: bool = False) -> Path:
    """Write one SAE (params without a seed axis) as a SAELens folder; returns the folder."""
    path = Path(path)
    if (path / WEIGHTS).exists() and not overwrite:
        raise FileExistsError(f"{path / WEIGHTS} exists; pass overwrite=True to replace it")
    names = ["W_enc", "b_enc", "W_dec", "b_dec"] + (["threshold"] if sae_cfg.activation == "jumprelu" else [])
    weights = {n: np.ascontiguousarray(np.asarray(params[n], np.float32)) for n in names}
    want = {"W_enc": (sae_cfg.d_in, sae_cfg.d_sae), "b_enc": (sae_cfg.d_sae,), "W_dec": (sae_cfg.d_sae, sae_cfg.d_in),
            "b_dec": (sae_cfg.d_in,), "threshold": (sae_cfg.d_sae,)}
    for n, w in weights.items():
        if w.shape != want[n]:
            raise ValueError(f"save_saelens: {n} has shape {w.shape}, config says {want[n]}")
        if not np.all(np.isfinite(w)):
            raise ValueError(f"save_saelens: {n} holds {int(np.sum(~np.isfinite(w)))} non-finite values")
    cfg = {
        "architecture": _ARCH[sae_cfg.activation],
        "d_in": sae_cfg.d_in,
        "d_sae": sae_cfg.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,  # our encoder sees x − b_dec, as SAELens does when this is true
        "normalize_activations": "none",  # the Normalizer is ours, under "jaxsae"; inputs arrive normalised
        "reshape_activations": "none",
        "activation_fn_str": {"topk": "topk", "batchtopk": "topk"}.get(sae_cfg.activation, "relu"),
        "activation_fn_kwargs": {"k": sae_cfg.k} if sae_cfg.activation in ("topk", "batchtopk") else {},
        "jaxsae": {
            "sae_cfg": dataclasses.asdict(sae_cfg),
            "normalizer": normalizer.to_dict() if normalizer is not None else None,
            **(extra or {}),
        },
    }
    if sae_cfg.activation in ("topk", "batchtopk"):
        cfg["k"] = sae_cfg.k
    path.mkdir(parents=True, exist_ok=True)
    # Weights first, config last: a folder with cfg.json is complete.
    save_file(weights, str(path / (WEIGHTS + ".tmp")))
    os.replace(path / (WEIGHTS + ".tmp"), path / WEIGHTS)
    (path / (CFG + ".tmp")).write_text(json.dumps(cfg, indent=1))
    os.replace(path / (CFG + ".tmp"), path / CFG)
    return path


def load_saelens(path: str | os.PathLike) -> tuple[dict, sae.SAEConfig, Normalizer | None]:
    """Read a SAELens folder (ours or SAELens's own) into (params, SAEConfig, Normalizer or None)."""
    path = Path(path)
    for f in (CFG, WEIGHTS):
        if not (path / f).is_file():
            raise FileNotFoundError(f"not a SAELens folder: {path / f} is missing")
    cfg = json.loads((path / CFG).read_text())
    weights = load_file(str(path / WEIGHTS))
    ours = cfg.get("jaxsae")
    if ours:
        sae_cfg = sae.SAEConfig(**ours["sae_cfg"])
        normalizer = Normalizer.from_dict(ours["normalizer"]) if ours.get("normalizer") else None
    else:
        sae_cfg, normalizer = _from_saelens_cfg(cfg, path), None
    known = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")
    params = {n: np.asarray(w, np.float32) for n, w in weights.items() if n in known}
    missing = {"W_enc", "b_enc", "W_dec", "b_dec"} - set(params)
    if sae_cfg.activation == "jumprelu" and "threshold" not in params:
        missing.add("threshold")
    if missing:
        raise ValueError(f"{path / WEIGHTS} lacks {sorted(missing)} (has {sorted(weights)})")
    if params["W_enc"].shape != (sae_cfg.d_in, sae_cfg.d_sae) or params["W_dec"].shape != (sae_cfg.d_sae, sae_cfg.d_in):
        raise ValueError(
            f"{path}: W_enc {params['W_enc'].shape} / W_dec {params['W_dec'].shape} do not match "
            f"d_in={sae_cfg.d_in}, d_sae={sae_cfg.d_sae}"
        )
    if not ours and cfg.get("apply_b_dec_to_input") is False:
        # Our encoder sees x − b_dec: x W_enc + b_enc = (x − b_dec) W_enc + (b_enc + b_dec W_enc).
        params["b_enc"] = params["b_enc"] + params["b_dec"] @ params["W_enc"]
    return params, sae_cfg, normalizer


def _from_saelens_cfg(cfg: dict, path: Path) -> sae.SAEConfig:
    """An SAEConfig for a folder SAELens wrote (its v5 or v6 cfg.json)."""
    arch = cfg.get("architecture", "standard")
    activation = {v: k for k, v in _ARCH.items()}.get(arch)
    if activation is None:
        raise ValueError(f"{path / CFG}: architecture {arch!r} is not one of {sorted(_ARCH.values())}")
    if cfg.get("normalize_activations", "none") != "none":
        raise ValueError(
            f"{path / CFG}: normalize_activations={cfg['normalize_activations']!r} is not supported; "
            "fold the scaling into the weights first"
        )
    fields = {"d_in": int(cfg["d_in"]), "d_sae": int(cfg["d_sae"]), "activation": activation, "aux_k": 0}
    if activation in ("topk", "batchtopk"):
        k = cfg.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))
        if k is None:
            raise ValueError(f"{path / CFG}: a {arch} SAE needs k (top-level or in activation_fn_kwargs)")
        fields["k"] = int(k)
    return sae.SAEConfig(**fields)

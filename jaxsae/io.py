"""SAE folders on disk: ours, SAELens's and sparsify's; exports fold the Normalizer in, so they read raw activations.

Layouts (weights in safetensors, float32, SAELens orientation W_enc [D, M], W_dec [M, D] unless said):
- jaxsae = a SAELens folder: `sae_weights.safetensors` (W_enc, b_enc, W_dec, b_dec, + threshold for JumpReLU) and
  `cfg.json` with SAELens 6's keys and `metadata` block, plus our SAEConfig, Normalizer and extras under "jaxsae".
  `jaxsae_exact.safetensors` beside them keeps the training-space vectors (see the fold below).
- SAELens (any version that wrote `architecture`): standard (ReLU), topk, jumprelu; BatchTopK and Matryoshka inference
  folders are jumprelu; the training checkpoints `batchtopk`/`matryoshka_batchtopk` load as our batchtopk.
- sparsify (EleutherAI, `eai-sparsify`): one folder per hookpoint holding `cfg.json` + `sae.safetensors` with
  encoder.weight [M, D], encoder.bias, W_dec [M, D], b_dec; TopK only.

The fold. jaxsae trains on x_n = (x − μ)/s (μ the mean, s a scalar) and reconstructs x̂ = s·x̂_n + μ. With
pre = (x_n − b_dec) W_enc + b_enc, multiplying by s gives s·pre = (x − b_dec') W_enc + b_enc' where
b_dec' = s·b_dec + μ and b_enc' = s·b_enc. ReLU, TopK, BatchTopK and JumpReLU with θ' = s·θ all commute with a
positive scale (the same latents fire, each s times larger): acts' = s·acts and acts' W_dec + b_dec' = s·x̂_n + μ.
Both matrices stay as trained, bit for bit and with unit-norm decoder rows; only the three vectors change. Those are
also written unfolded to `jaxsae_exact.safetensors` so that loading gives back exactly the trained params (a base's
hash in jaxsae.boost must survive a round trip); without that file the vectors are unfolded arithmetically.

Saving refuses to overwrite an existing SAE folder unless `overwrite=True`: a finished SAE is a result, and silently
replacing it with a different run's weights is the worse failure. `load_any(path)` opens any of the three.
"""
from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from jaxsae import sae
from jaxsae.data import Normalizer

WEIGHTS = "sae_weights.safetensors"  # SAELens's weights file (ours too)
CFG = "cfg.json"  # SAELens's and sparsify's config file
SPARSIFY_WEIGHTS = "sae.safetensors"  # sparsify's weights file
EXACT = "jaxsae_exact.safetensors"  # our training-space b_enc, b_dec (+ threshold), to undo the fold exactly
# The SAELens config layout we write; SAELens reads a cfg.json without a version >= 6 as a pre-6.0 one.
SAELENS_FORMAT_VERSION = "6.0.0"
# Our activation name -> SAELens architecture name (SAELens itself has no inference "batchtopk").
_ARCH = {"topk": "topk", "batchtopk": "batchtopk", "jumprelu": "jumprelu", "relu": "standard"}
# Harvest's model name -> the name TransformerLens (and so SAELens's tools) know it by.
_TL_MODEL = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M"}
_VECTORS = ("b_enc", "b_dec", "threshold")  # what the fold changes


# --- the fold ---------------------------------------------------------------------------------------------
def _check_scalar_scale(normalizer: Normalizer) -> float:
    s = np.asarray(normalizer.scale, np.float64)
    if s.ndim != 0 or not np.isfinite(s) or s <= 0:
        raise ValueError(f"can only fold a positive scalar Normalizer scale, got {normalizer.scale!r}")
    return float(s)


def fold_normalizer(params: dict, sae_cfg: sae.SAEConfig, normalizer: Normalizer | None) -> dict:
    """Params that map RAW x to raw x̂ exactly as `normalizer.invert(sae.apply(params, normalizer(x)))` (see above)."""
    out = {n: np.asarray(a, np.float32) for n, a in params.items()}
    b_dec_D = out["b_dec"] if sae_cfg.decoder_bias else np.zeros_like(out["b_dec"])
    if normalizer is None:
        return {**out, "b_dec": b_dec_D}
    s, mean_D = _check_scalar_scale(normalizer), np.asarray(normalizer.mean_D, np.float64)
    out["b_enc"] = (s * out["b_enc"].astype(np.float64)).astype(np.float32)
    out["b_dec"] = (s * b_dec_D.astype(np.float64) + mean_D).astype(np.float32)
    if "threshold" in out:
        out["threshold"] = (s * out["threshold"].astype(np.float64)).astype(np.float32)
    return out


def unfold_normalizer(raw: dict, normalizer: Normalizer | None) -> dict:
    """The inverse of `fold_normalizer`, to float32 rounding of the three vectors (matrices are untouched)."""
    out = {n: np.asarray(a, np.float32) for n, a in raw.items()}
    if normalizer is None:
        return out
    s, mean_D = _check_scalar_scale(normalizer), np.asarray(normalizer.mean_D, np.float64)
    out["b_enc"] = (out["b_enc"].astype(np.float64) / s).astype(np.float32)
    out["b_dec"] = ((out["b_dec"].astype(np.float64) - mean_D) / s).astype(np.float32)
    if "threshold" in out:
        out["threshold"] = (out["threshold"].astype(np.float64) / s).astype(np.float32)
    return out


# --- files ------------------------------------------------------------------------------------------------
def _read_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as float32 numpy (bfloat16 files go through ml_dtypes via flax)."""
    try:
        tensors = load_file(str(path))
    except TypeError:  # numpy has no bfloat16
        from safetensors.flax import load_file as load_jax

        tensors = load_jax(str(path))
    except Exception as e:  # a truncated or foreign file: name it, one line
        first = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"cannot read {path}: {type(e).__name__}: {first}") from None
    return {n: np.asarray(a).astype(np.float32) for n, a in tensors.items()}


def _write_atomic(path: Path, tensors: dict | None = None, text: str | None = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    if tensors is not None:
        save_file({n: np.ascontiguousarray(a, np.float32) for n, a in tensors.items()}, str(tmp))
    else:
        tmp.write_text(text)
    os.replace(tmp, path)


def _read_cfg(path: Path) -> dict:
    try:
        cfg = json.loads((path / CFG).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path / CFG} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path / CFG} holds a {type(cfg).__name__}, not a JSON object")
    return cfg


def _check_params(params: dict, sae_cfg: sae.SAEConfig, who: str) -> dict:
    names = ["W_enc", "b_enc", "W_dec", "b_dec"] + (["threshold"] if sae_cfg.activation == "jumprelu" else [])
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"{who}: params lack {missing} (have {sorted(params)})")
    weights = {n: np.asarray(params[n], np.float32) for n in names}
    want = {"W_enc": (sae_cfg.d_in, sae_cfg.d_sae), "b_enc": (sae_cfg.d_sae,), "W_dec": (sae_cfg.d_sae, sae_cfg.d_in),
            "b_dec": (sae_cfg.d_in,), "threshold": (sae_cfg.d_sae,)}
    for n, w in weights.items():
        if w.shape != want[n]:
            raise ValueError(f"{who}: {n} has shape {w.shape}, config says {want[n]}")
        if not np.all(np.isfinite(w)):
            raise ValueError(f"{who}: {n} holds {int(np.sum(~np.isfinite(w)))} non-finite values")
    return weights


def _prepare(path: Path, weights_file: str, overwrite: bool) -> None:
    if (path / weights_file).exists() and not overwrite:
        raise FileExistsError(f"{path / weights_file} exists; pass overwrite=True to replace it")
    path.mkdir(parents=True, exist_ok=True)
    # cfg.json goes first and comes back last: a crash in between leaves a folder that is plainly incomplete,
    # never new (folded) weights under an old config that says they are in training space.
    (path / CFG).unlink(missing_ok=True)


def _ours(sae_cfg: sae.SAEConfig, normalizer: Normalizer | None, extra: dict | None) -> dict:
    return {"sae_cfg": dataclasses.asdict(sae_cfg),
            "normalizer": normalizer.to_dict() if normalizer is not None else None, "folded": True, **(extra or {})}


def _unfold_ours(path: Path, raw: dict, ours: dict, sae_cfg: sae.SAEConfig) -> tuple[dict, Normalizer | None]:
    """Training-space params of one of our folders: matrices as stored, vectors from EXACT (checked) or unfolded."""
    normalizer = Normalizer.from_dict(ours["normalizer"]) if ours.get("normalizer") else None
    if not ours.get("folded"):  # written before the fold: the weights are the training-space params
        return raw, normalizer
    if not (path / EXACT).is_file():
        return unfold_normalizer(raw, normalizer), normalizer
    exact = _read_tensors(path / EXACT)
    params = {**raw, **{n: exact[n] for n in _VECTORS if n in raw and n in exact}}
    refold = fold_normalizer(params, sae_cfg, normalizer)
    for n in _VECTORS:
        tol = 1e-6 * (np.abs(raw[n]).max() + 1e-30) if n in raw else 0.0
        if n in raw and not (n in exact and np.allclose(refold[n], raw[n], rtol=1e-6, atol=tol)):
            raise ValueError(f"{path / EXACT} does not match the weights beside it ({n}); was one of them replaced?")
    return params, normalizer


# --- SAELens ----------------------------------------------------------------------------------------------
def saelens_metadata(manifest: dict | None) -> dict:
    """SAELens 6's `metadata` fields for an SAE trained on an activation cache with this manifest ({} if none)."""
    if not manifest or "layer" not in manifest or "model" not in manifest:  # not a harvested cache: nothing to say
        return {}
    layer, hook = int(manifest["layer"]), manifest.get("hook", "resid_post")
    return {
        "model_name": _TL_MODEL.get(manifest["model"], manifest["model"]),
        "model_class_name": "HookedTransformer",
        "hook_name": f"blocks.{layer}.hook_{hook}",  # TransformerLens naming: our layer l is after block l
        "hook_layer": layer,
        "hook_head_index": None,
        "model_from_pretrained_kwargs": {},
        "context_size": int(manifest["ctx_len"]) if "ctx_len" in manifest else None,
        "prepend_bos": False,  # contexts are windows of a packed token stream, documents joined by <|endoftext|>
        "seqpos_slice": [int(manifest.get("skip_first", 0)), None],  # the attention-sink first positions are skipped
        "exclude_special_tokens": [int(t) for t in manifest.get("exclude_tokens", [])],  # and so is every such token
        "dataset_path": manifest.get("corpus"),  # the name of a local corpus of the model's package, not a HF dataset
    }


def save_saelens(path: str | os.PathLike, params: dict, sae_cfg: sae.SAEConfig, normalizer: Normalizer | None = None,
                 extra: dict | None = None, overwrite: bool = False, metadata: dict | None = None) -> Path:
    """Write one SAE (params without a seed axis) as a SAELens folder right on raw activations; returns the folder.

    `metadata`: SAELens `metadata` fields (`saelens_metadata(cache_manifest)`); `extra` goes under "jaxsae".
    """
    path = Path(path)
    weights = _check_params(params, sae_cfg, "save_saelens")
    if sae_cfg.activation == "jumprelu" and np.any(weights["threshold"] < 0):
        # SAELens's JumpReLU is ReLU(z)·(z > θ): below zero it cuts what ours, z·(z > θ), lets through.
        warnings.warn(f"save_saelens: {int(np.sum(weights['threshold'] < 0))} JumpReLU thresholds are negative; "
                      "SAELens zeroes those latents' negative activations, jaxsae does not", stacklevel=2)
    folded = fold_normalizer(weights, sae_cfg, normalizer)
    k = {"k": sae_cfg.k} if sae_cfg.activation in ("topk", "batchtopk") else {}
    cfg = {
        "architecture": _ARCH[sae_cfg.activation],
        "d_in": sae_cfg.d_in,
        "d_sae": sae_cfg.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,  # our encoder sees x − b_dec, as SAELens's does when this is true
        "normalize_activations": "none",  # the Normalizer is folded into the weights: inputs are raw activations
        "reshape_activations": "none",
        **k,
        **({"rescale_acts_by_decoder_norm": False} if sae_cfg.activation == "topk" else {}),
        # Pre-6.0 readers look for these.
        "activation_fn_str": "topk" if k else "relu",
        "activation_fn_kwargs": k,
        "metadata": {"sae_lens_version": SAELENS_FORMAT_VERSION, "sae_lens_training_version": None, **(metadata or {})},
        "jaxsae": _ours(sae_cfg, normalizer, extra),
    }
    _prepare(path, WEIGHTS, overwrite)
    _write_atomic(path / WEIGHTS, folded)
    _write_atomic(path / EXACT, {n: weights[n] for n in _VECTORS if n in weights})
    _write_atomic(path / CFG, text=json.dumps(cfg, indent=1))
    return path


def load_saelens(path: str | os.PathLike) -> tuple[dict, sae.SAEConfig, Normalizer | None]:
    """Read a SAELens folder (ours or SAELens's own) into (params, SAEConfig, Normalizer or None).

    Ours come back exactly as trained, with their Normalizer. SAELens's come back as params on raw activations
    (Normalizer None) that give SAELens's forward; what SAELens computes and we cannot raises a one-line ValueError.
    """
    path = Path(path)
    for f in (CFG, WEIGHTS):
        if not (path / f).is_file():
            raise FileNotFoundError(f"not a SAELens folder: {path / f} is missing")
    cfg = _read_cfg(path)
    weights = _read_tensors(path / WEIGHTS)
    ours = cfg.get("jaxsae")
    if not ours:
        params, sae_cfg = _from_saelens(cfg, weights, path)
        return params, sae_cfg, None
    sae_cfg = sae.SAEConfig(**ours["sae_cfg"])
    raw = {n: w for n, w in weights.items() if n in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")}
    _check_params(raw, sae_cfg, str(path / WEIGHTS))
    params, normalizer = _unfold_ours(path, raw, ours, sae_cfg)
    return params, sae_cfg, normalizer


def _saelens_major(cfg: dict) -> int:
    version = cfg.get("sae_lens_version") or (cfg.get("metadata") or {}).get("sae_lens_version")
    try:
        return int(str(version).split(".")[0]) if version else 0
    except ValueError:
        return 0


# SAELens architectures: ours for it, and the tensors its folder holds beyond W_enc, b_enc, W_dec, b_dec.
_FROM_SAELENS = {"standard": ("relu", ()), "topk": ("topk", ()), "jumprelu": ("jumprelu", ("threshold",)),
                 # SAELens training checkpoints (`save_model` of a training SAE); their inference folders are jumprelu
                 "batchtopk": ("batchtopk", ("topk_threshold",)),
                 "matryoshka_batchtopk": ("batchtopk", ("topk_threshold",))}


def _from_saelens(cfg: dict, w: dict, path: Path) -> tuple[dict, sae.SAEConfig]:
    """(params on raw activations, SAEConfig) giving SAELens's forward of a folder it wrote (v5 or v6 cfg.json)."""
    where = path / CFG
    pre6 = _saelens_major(cfg) < 6
    arch = cfg.get("architecture", "standard")
    act_fn = cfg.get("activation_fn_str", cfg.get("activation_fn"))
    kwargs_k = (cfg.get("activation_fn_kwargs") or {}).get("k")
    if arch == "standard" and act_fn not in (None, "relu"):
        if pre6 and act_fn == "topk" and kwargs_k is not None:
            arch = "topk"  # SAELens reads a pre-6.0 `standard` + `activation_fn_str: topk` folder as TopK
        else:
            raise ValueError(f"{where}: architecture 'standard' with activation_fn_str={act_fn!r} is not supported "
                             "(SAELens would run it as ReLU)")
    if arch not in _FROM_SAELENS:
        raise ValueError(f"{where}: architecture {arch!r} is not supported; jaxsae reads {sorted(_FROM_SAELENS)}")
    activation, more = _FROM_SAELENS[arch]
    norm = cfg.get("normalize_activations", "none")
    if norm not in ("none", None, False):
        raise ValueError(f"{where}: normalize_activations={norm!r} is not supported; fold the normalisation into "
                         "the weights first")
    if cfg.get("finetuning_scaling_factor"):
        raise ValueError(f"{where}: finetuning_scaling_factor={cfg['finetuning_scaling_factor']!r} is not supported")
    names = ("W_enc", "b_enc", "W_dec", "b_dec") + more
    missing, unknown = [n for n in names if n not in w], sorted(set(w) - set(names))
    if missing or unknown:
        raise ValueError(f"{path / WEIGHTS}: a {arch} SAE needs tensors {list(names)}; missing {missing}, "
                         f"unexpected {unknown}")
    d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    if w["W_enc"].shape != (d_in, d_sae) or w["W_dec"].shape != (d_sae, d_in):
        raise ValueError(f"{path}: W_enc {w['W_enc'].shape} / W_dec {w['W_dec'].shape} do not match "
                         f"d_in={d_in}, d_sae={d_sae}")
    fields = {"d_in": d_in, "d_sae": d_sae, "activation": activation, "aux_k": 0}
    if activation in ("topk", "batchtopk"):
        k = cfg.get("k", kwargs_k)
        if k is None or float(k) != int(float(k)):
            raise ValueError(f"{where}: a {arch} SAE needs an integer k (top-level or in activation_fn_kwargs), "
                             f"got {k!r}")
        fields["k"] = int(float(k))
    W_enc, b_enc, W_dec, b_dec = (w[n].astype(np.float64) for n in ("W_enc", "b_enc", "W_dec", "b_dec"))
    if not cfg.get("apply_b_dec_to_input", True):
        # Our encoder sees x − b_dec: x W_enc + b_enc = (x − b_dec) W_enc + (b_enc + b_dec W_enc).
        b_enc = b_enc + b_dec @ W_enc
    if cfg.get("rescale_acts_by_decoder_norm") and activation in ("topk", "batchtopk"):
        # SAELens ranks pre·‖W_dec‖ and decodes acts/‖W_dec‖ · W_dec: the same as scaling the encoder's
        # columns by the norms and the decoder's rows by their inverse (what its own `fold_W_dec_norm` does).
        norm_M = np.maximum(np.linalg.norm(W_dec, axis=1), 1e-8)
        W_enc, b_enc, W_dec = W_enc * norm_M, b_enc * norm_M, W_dec / norm_M[:, None]
    params = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    if activation == "jumprelu":
        # SAELens: ReLU(z)·(z > θ), which is z·(z > max(θ, 0)), ours.
        params["threshold"] = np.maximum(w["threshold"].astype(np.float64), 0.0)
    return {n: a.astype(np.float32) for n, a in params.items()}, sae.SAEConfig(**fields)


def rewrite_folded(path: str | os.PathLike) -> bool:
    """Rewrite one of our folders saved before the fold so SAELens reads it right; False if it already was."""
    path = Path(path)
    cfg = _read_cfg(path) if (path / CFG).is_file() else {}
    ours = cfg.get("jaxsae")
    if not ours:
        raise ValueError(f"{path} is not a jaxsae SAE folder (no 'jaxsae' key in {path / CFG})")
    if ours.get("folded"):
        return False
    params, sae_cfg, normalizer = load_saelens(path)
    extra = {k: v for k, v in ours.items() if k not in ("sae_cfg", "normalizer", "folded")}
    metadata = {k: v for k, v in (cfg.get("metadata") or {}).items() if not k.startswith("sae_lens")}
    save_saelens(path, params, sae_cfg, normalizer, extra=extra, overwrite=True, metadata=metadata)
    return True


# --- sparsify ---------------------------------------------------------------------------------------------
def save_sparsify(path: str | os.PathLike, params: dict, sae_cfg: sae.SAEConfig, normalizer: Normalizer | None = None,
                  extra: dict | None = None, overwrite: bool = False) -> Path:
    """Write a TopK SAE as a sparsify hookpoint folder (e.g. `run/layers.14`), right on raw activations."""
    path = Path(path)
    if sae_cfg.activation != "topk":
        raise ValueError(f"save_sparsify: sparsify runs TopK SAEs only, got activation={sae_cfg.activation!r}")
    weights = _check_params(params, sae_cfg, "save_sparsify")
    folded = fold_normalizer(weights, sae_cfg, normalizer)
    cfg = {"activation": "topk", "expansion_factor": max(1, sae_cfg.d_sae // sae_cfg.d_in), "normalize_decoder": True,
           "num_latents": sae_cfg.d_sae, "k": sae_cfg.k, "multi_topk": False, "skip_connection": False,
           "transcode": False, "d_in": sae_cfg.d_in, "jaxsae": _ours(sae_cfg, normalizer, extra)}
    _prepare(path, SPARSIFY_WEIGHTS, overwrite)
    _write_atomic(path / SPARSIFY_WEIGHTS, {"encoder.weight": folded["W_enc"].T, "encoder.bias": folded["b_enc"],
                                            "W_dec": folded["W_dec"], "b_dec": folded["b_dec"]})
    _write_atomic(path / EXACT, {n: weights[n] for n in _VECTORS if n in weights})
    _write_atomic(path / CFG, text=json.dumps(cfg, indent=1))
    return path


def load_sparsify(path: str | os.PathLike) -> tuple[dict, sae.SAEConfig, Normalizer | None]:
    """Read a sparsify hookpoint folder (ours or sparsify's own) into (params, SAEConfig, Normalizer or None)."""
    path = Path(path)
    for f in (CFG, SPARSIFY_WEIGHTS):
        if not (path / f).is_file():
            raise FileNotFoundError(f"not a sparsify folder: {path / f} is missing")
    cfg = _read_cfg(path)
    where = path / CFG
    for key, ok in (("activation", "topk"), ("transcode", False), ("skip_connection", False)):
        if cfg.get(key, ok) != ok:
            raise ValueError(f"{where}: {key}={cfg[key]!r} is not supported (jaxsae reads {key}={ok!r})")
    w = _read_tensors(path / SPARSIFY_WEIGHTS)
    names = ("encoder.weight", "encoder.bias", "W_dec", "b_dec")
    missing, unknown = [n for n in names if n not in w], sorted(set(w) - set(names))
    if missing or unknown:
        raise ValueError(f"{path / SPARSIFY_WEIGHTS}: a sparsify SAE needs tensors {list(names)}; missing {missing}, "
                         f"unexpected {unknown}")
    d_in = int(cfg["d_in"])
    d_sae = int(cfg.get("num_latents") or d_in * int(cfg.get("expansion_factor", 32)))
    if w["encoder.weight"].shape != (d_sae, d_in) or w["W_dec"].shape != (d_sae, d_in):
        raise ValueError(f"{path}: encoder.weight {w['encoder.weight'].shape} / W_dec {w['W_dec'].shape} do not match "
                         f"d_in={d_in}, num_latents={d_sae}")
    raw = {"W_enc": np.ascontiguousarray(w["encoder.weight"].T), "b_enc": w["encoder.bias"], "W_dec": w["W_dec"],
           "b_dec": w["b_dec"]}
    ours = cfg.get("jaxsae")
    if ours:
        sae_cfg = sae.SAEConfig(**ours["sae_cfg"])
        params, normalizer = _unfold_ours(path, raw, ours, sae_cfg)
        return params, sae_cfg, normalizer
    # sparsify ranks ReLU(pre) and we rank pre, then ReLU: the same latents carry the same (nonzero) values.
    return raw, sae.SAEConfig(d_in=d_in, d_sae=d_sae, activation="topk", k=int(cfg.get("k", 32)), aux_k=0), None


# --- any folder -------------------------------------------------------------------------------------------
def detect_format(path: str | os.PathLike) -> str:
    """"jaxsae", "saelens" or "sparsify" for an SAE folder; a one-line error for anything else."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no SAE folder at {path}")
    if (path / CFG).is_file() and (path / WEIGHTS).is_file():
        return "jaxsae" if _read_cfg(path).get("jaxsae") else "saelens"
    if (path / CFG).is_file() and (path / SPARSIFY_WEIGHTS).is_file():
        return "sparsify"
    inside = sorted(p.name for p in path.iterdir() if p.is_dir() and (p / CFG).is_file())
    if inside:
        raise FileNotFoundError(f"{path} holds no SAE itself but folders that may: {inside[:8]}; pass one of them")
    raise FileNotFoundError(f"{path} is not an SAE folder: expected {CFG} with {WEIGHTS} (jaxsae, SAELens) "
                            f"or {SPARSIFY_WEIGHTS} (sparsify)")


def load_any(path: str | os.PathLike) -> tuple[dict, sae.SAEConfig, Normalizer | None]:
    """(params, SAEConfig, Normalizer or None) of a jaxsae, SAELens or sparsify folder."""
    return load_sparsify(path) if detect_format(path) == "sparsify" else load_saelens(path)

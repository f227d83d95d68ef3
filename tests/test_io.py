"""SAELens layout: our round trip, and folders written independently with numpy + safetensors.numpy."""
import json

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from jaxsae import io, sae
from jaxsae.data import Normalizer

D, M = 5, 12


def _saelens_forward(w, cfg, x):
    """SAELens's inference forward pass, written from its documented semantics in numpy."""
    sae_in = x - w["b_dec"] * cfg.get("apply_b_dec_to_input", True)
    pre = sae_in @ w["W_enc"] + w["b_enc"]
    if cfg["architecture"] == "topk":
        k = cfg.get("k") or cfg["activation_fn_kwargs"]["k"]
        keep = np.argsort(-pre, axis=1)[:, :k]
        acts = np.zeros_like(pre)
        np.put_along_axis(acts, keep, np.maximum(np.take_along_axis(pre, keep, 1), 0), 1)
    elif cfg["architecture"] == "jumprelu":
        acts = pre * (pre > w["threshold"])
    else:
        acts = np.maximum(pre, 0)
    return acts @ w["W_dec"] + w["b_dec"]


def _random_weights(rng, jumprelu=False):
    w = {"W_enc": rng.normal(size=(D, M)), "b_enc": rng.normal(size=M) * 0.1,
         "W_dec": rng.normal(size=(M, D)), "b_dec": rng.normal(size=D)}
    if jumprelu:
        w["threshold"] = np.abs(rng.normal(size=M)) * 0.5
    return {n: a.astype(np.float32) for n, a in w.items()}


@pytest.mark.parametrize("cfg", [
    {"architecture": "topk", "k": 3, "apply_b_dec_to_input": True, "normalize_activations": "none"},  # v6
    {"architecture": "topk", "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 4},
     "apply_b_dec_to_input": False, "hook_name": "blocks.3.hook_resid_post"},  # v5
    {"architecture": "jumprelu", "apply_b_dec_to_input": False, "normalize_activations": "none"},
    {"architecture": "standard", "apply_b_dec_to_input": True},
])
def test_loads_a_folder_saelens_wrote(tmp_path, cfg):
    rng = np.random.default_rng(0)
    w = _random_weights(rng, jumprelu=cfg["architecture"] == "jumprelu")
    cfg = dict(cfg, d_in=D, d_sae=M, dtype="float32", device="cpu")
    save_file(w, str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    params, sae_cfg, normalizer = io.load_saelens(tmp_path)
    assert normalizer is None and (sae_cfg.d_in, sae_cfg.d_sae) == (D, M)
    x = rng.normal(size=(9, D)).astype(np.float32)
    got = np.asarray(sae.apply(jax.tree.map(np.asarray, params), x, sae_cfg))
    np.testing.assert_allclose(got, _saelens_forward(w, cfg, x), rtol=1e-4, atol=1e-4)


def test_round_trip_and_overwrite_refused(tmp_path):
    cfg = sae.SAEConfig(d_in=D, d_sae=M, activation="jumprelu", k=2, aux_k=4)
    params = jax.tree.map(np.asarray, sae.init(jax.random.key(1), cfg))
    x = np.random.default_rng(1).normal(size=(20, D))
    norm = Normalizer.fit(x)
    io.save_saelens(tmp_path / "s", params, cfg, norm, extra={"seed": 3})
    on_disk = json.loads((tmp_path / "s" / "cfg.json").read_text())
    assert on_disk["architecture"] == "jumprelu" and on_disk["jaxsae"]["seed"] == 3
    p2, cfg2, norm2 = io.load_saelens(tmp_path / "s")
    assert cfg2 == cfg
    assert set(p2) == set(params)
    for n in params:
        np.testing.assert_array_equal(p2[n], params[n])
    np.testing.assert_allclose(norm2(x), norm(x), rtol=1e-6)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        io.save_saelens(tmp_path / "s", params, cfg)
    io.save_saelens(tmp_path / "s", params, cfg, overwrite=True)


def test_bad_inputs_are_named(tmp_path):
    cfg = sae.SAEConfig(d_in=D, d_sae=M, k=2)
    params = jax.tree.map(np.asarray, sae.init(jax.random.key(1), cfg))
    with pytest.raises(ValueError, match=r"W_dec has shape \(12, 4\)"):
        io.save_saelens(tmp_path / "a", {**params, "W_dec": params["W_dec"][:, :4]}, cfg)
    with pytest.raises(ValueError, match="b_enc holds 1 non-finite"):
        io.save_saelens(tmp_path / "b", {**params, "b_enc": np.r_[np.nan, params["b_enc"][1:]]}, cfg)
    with pytest.raises(FileNotFoundError, match="cfg.json is missing"):
        io.load_saelens(tmp_path / "nothing")
    save_file(_random_weights(np.random.default_rng(0)), str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps({"architecture": "gated", "d_in": D, "d_sae": M}))
    with pytest.raises(ValueError, match="architecture 'gated'"):
        io.load_saelens(tmp_path)

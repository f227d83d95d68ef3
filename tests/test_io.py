"""SAE folders without torch: the fold, our round trip, and SAELens/sparsify folders written here with numpy.

The references are numpy float64 forwards written from SAELens's and sparsify's documented semantics; the real
packages are checked in test_interop.py.
"""
import dataclasses
import json
import warnings

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from jaxsae import io, sae
from jaxsae.data import Normalizer

D, M = 5, 12
MANIFEST = {"model": "smollm2-135m", "hook": "resid_post", "layer": 14, "ctx_len": 256, "skip_first": 4,
            "exclude_tokens": [0], "corpus": "general", "split": "train"}


def _topk_relu(pre, k):
    keep = np.argsort(-pre, axis=1)[:, :k]
    acts = np.zeros_like(pre)
    np.put_along_axis(acts, keep, np.maximum(np.take_along_axis(pre, keep, 1), 0), 1)
    return acts


def _batchtopk_relu(pre, k):
    flat = np.maximum(pre, 0).reshape(-1)
    acts = np.zeros_like(flat)
    keep = np.argsort(-flat)[: pre.shape[0] * k]
    acts[keep] = flat[keep]
    return acts.reshape(pre.shape)


def _saelens_forward(w, cfg, x, arch=None):
    """SAELens's inference forward in numpy float64 (`arch` overrides cfg's, for pre-6.0 folders)."""
    w = {n: np.asarray(a, np.float64) for n, a in w.items()}
    arch = arch or cfg["architecture"]
    sae_in = x - w["b_dec"] * cfg.get("apply_b_dec_to_input", True)
    pre = sae_in @ w["W_enc"] + w["b_enc"]
    norm = np.linalg.norm(w["W_dec"], axis=1) if cfg.get("rescale_acts_by_decoder_norm") else np.ones(len(w["W_dec"]))
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    if arch == "topk":
        acts = _topk_relu(pre * norm, int(k)) / norm
    elif arch == "batchtopk":  # a training checkpoint, run with its training-time BatchTopK
        acts = _batchtopk_relu(pre * norm, int(k)) / norm
    elif arch == "jumprelu":
        acts = np.maximum(pre, 0) * (pre > w["threshold"])
    else:
        acts = np.maximum(pre, 0)
    return acts @ w["W_dec"] + w["b_dec"]


def _sparsify_forward(w, k, x):
    """sparsify's SparseCoder forward in numpy float64: TopK of ReLU(pre), decode, + b_dec."""
    w = {n: np.asarray(a, np.float64) for n, a in w.items()}
    pre = np.maximum((x - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"], 0)
    return _topk_relu(pre, k) @ w["W_dec"] + w["b_dec"]


def _random_weights(rng, jumprelu=False):
    w = {"W_enc": rng.normal(size=(D, M)), "b_enc": rng.normal(size=M) * 0.1,
         "W_dec": rng.normal(size=(M, D)), "b_dec": rng.normal(size=D)}
    if jumprelu:
        w["threshold"] = np.abs(rng.normal(size=M)) * 0.5
    return {n: a.astype(np.float32) for n, a in w.items()}


def _write(folder, weights, cfg, weights_file=io.WEIGHTS):
    folder.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(folder / weights_file))
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


def _rel(got, want):
    return float(np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want)))


def _trained_like(activation, key=1):
    """Random params of one SAE with non-zero biases (and thresholds), as training leaves them."""
    cfg = sae.SAEConfig(d_in=D, d_sae=M, activation=activation, k=3, aux_k=4)
    rng = np.random.default_rng(key)
    params = jax.tree.map(np.asarray, sae.init(jax.random.key(key), cfg))
    params = {**params, "b_enc": rng.normal(size=M).astype(np.float32) * 0.3,
              "b_dec": rng.normal(size=D).astype(np.float32)}
    if activation == "jumprelu":
        params["threshold"] = np.abs(rng.normal(size=M)).astype(np.float32) * 0.3
    return params, cfg


def _raw_and_normalizer(n=64, seed=2):
    """Raw activations far from normalised (mean ~30, scale ~40) and their Normalizer."""
    rng = np.random.default_rng(seed)
    x = (30 + 5 * rng.normal(size=D)) + 40 * rng.normal(size=(n, D))
    return x.astype(np.float32), Normalizer.fit(x)


@pytest.mark.parametrize("activation", ["topk", "jumprelu", "relu", "batchtopk"])
def test_folded_folder_is_right_on_raw_activations(tmp_path, activation):
    params, cfg = _trained_like(activation)
    x, norm = _raw_and_normalizer()
    io.save_saelens(tmp_path / "s", params, cfg, norm)
    want = norm.invert(np.asarray(sae.apply(params, norm(x).astype(np.float32), cfg), np.float64))
    on_disk = json.loads((tmp_path / "s" / "cfg.json").read_text())
    assert on_disk["normalize_activations"] == "none" and on_disk["apply_b_dec_to_input"] is True
    w = io._read_tensors(tmp_path / "s" / io.WEIGHTS)
    got = _saelens_forward(w, on_disk, x.astype(np.float64))
    assert _rel(got, want) < 1e-5
    # Only the vectors carry the fold: the matrices (and so unit-norm decoder rows) are exactly the trained ones.
    np.testing.assert_array_equal(w["W_enc"], params["W_enc"])
    np.testing.assert_array_equal(w["W_dec"], params["W_dec"])


def test_fold_of_a_decoder_free_residual_reconstructs_the_mean(tmp_path):
    params, cfg = _trained_like("jumprelu")
    cfg = dataclasses.replace(cfg, decoder_bias=False)
    params = {**params, "b_dec": np.zeros(D, np.float32)}
    x, norm = _raw_and_normalizer()
    io.save_saelens(tmp_path / "r", params, cfg, norm)
    w = io._read_tensors(tmp_path / "r" / io.WEIGHTS)
    want = norm.invert(np.asarray(sae.apply(params, norm(x).astype(np.float32), cfg), np.float64))
    assert _rel(_saelens_forward(w, {"architecture": "jumprelu"}, x.astype(np.float64)), want) < 1e-5
    p2, cfg2, _ = io.load_saelens(tmp_path / "r")
    assert cfg2 == cfg and not p2["b_dec"].any()


@pytest.mark.parametrize("activation", ["topk", "jumprelu", "relu", "batchtopk"])
def test_round_trip_is_exact(tmp_path, activation):
    params, cfg = _trained_like(activation)
    x, norm = _raw_and_normalizer()
    io.save_saelens(tmp_path / "s", params, cfg, norm, extra={"seed": 3})
    p2, cfg2, norm2 = io.load_saelens(tmp_path / "s")
    assert cfg2 == cfg and set(p2) == set(params)
    for n in params:
        np.testing.assert_array_equal(p2[n], params[n])
    np.testing.assert_allclose(norm2(x), norm(x), rtol=1e-6)
    assert json.loads((tmp_path / "s" / "cfg.json").read_text())["jaxsae"]["seed"] == 3
    # Without the exact vectors the fold is undone arithmetically: equal to float32 rounding.
    (tmp_path / "s" / io.EXACT).unlink()
    p3, _, _ = io.load_saelens(tmp_path / "s")
    for n in params:
        np.testing.assert_allclose(p3[n], params[n], rtol=1e-6, atol=1e-6)


def test_exact_vectors_that_do_not_match_are_refused(tmp_path):
    params, cfg = _trained_like("topk")
    _, norm = _raw_and_normalizer()
    io.save_saelens(tmp_path / "a", params, cfg, norm)
    io.save_saelens(tmp_path / "b", {**params, "b_enc": params["b_enc"] + 1}, cfg, norm)
    (tmp_path / "b" / io.EXACT).replace(tmp_path / "a" / io.EXACT)
    with pytest.raises(ValueError, match="does not match the weights beside it"):
        io.load_saelens(tmp_path / "a")


def test_a_folder_saved_before_the_fold_still_loads_and_can_be_rewritten(tmp_path):
    params, cfg = _trained_like("topk")
    x, norm = _raw_and_normalizer()
    old = {"architecture": "topk", "d_in": D, "d_sae": M, "k": 3, "normalize_activations": "none",
           "jaxsae": {"sae_cfg": dataclasses.asdict(cfg), "normalizer": norm.to_dict(), "seed": 1}}
    _write(tmp_path / "old", params, old)
    p2, cfg2, _ = io.load_saelens(tmp_path / "old")
    for n in params:
        np.testing.assert_array_equal(p2[n], params[n])
    assert io.rewrite_folded(tmp_path / "old") and not io.rewrite_folded(tmp_path / "old")
    on_disk = json.loads((tmp_path / "old" / "cfg.json").read_text())
    assert on_disk["jaxsae"]["seed"] == 1 and on_disk["jaxsae"]["folded"]
    want = norm.invert(np.asarray(sae.apply(params, norm(x).astype(np.float32), cfg), np.float64))
    assert _rel(_saelens_forward(io._read_tensors(tmp_path / "old" / io.WEIGHTS), on_disk, x), want) < 1e-5


def test_metadata_block():
    meta = io.saelens_metadata(MANIFEST)
    assert meta["hook_name"] == "blocks.14.hook_resid_post" and meta["hook_layer"] == 14
    assert meta["model_name"] == "HuggingFaceTB/SmolLM2-135M" and meta["context_size"] == 256
    assert meta["seqpos_slice"] == [4, None] and meta["exclude_special_tokens"] == [0] and meta["prepend_bos"] is False
    assert io.saelens_metadata(None) == {}


def test_metadata_is_written(tmp_path):
    params, cfg = _trained_like("relu")
    io.save_saelens(tmp_path / "s", params, cfg, metadata=io.saelens_metadata(MANIFEST))
    meta = json.loads((tmp_path / "s" / "cfg.json").read_text())["metadata"]
    # SAELens parses a cfg.json as its 6.x layout (and reads `metadata`) only when it carries a version >= 6.
    assert meta["sae_lens_version"] == io.SAELENS_FORMAT_VERSION and meta["hook_name"] == "blocks.14.hook_resid_post"


def test_negative_jumprelu_thresholds_warn_on_export(tmp_path):
    params, cfg = _trained_like("jumprelu")
    params["threshold"][0] = -0.1
    with pytest.warns(UserWarning, match="1 JumpReLU thresholds are negative"):
        io.save_saelens(tmp_path / "s", params, cfg)


def test_overwrite_refused(tmp_path):
    params, cfg = _trained_like("jumprelu")
    io.save_saelens(tmp_path / "s", params, cfg)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        io.save_saelens(tmp_path / "s", params, cfg)
    io.save_saelens(tmp_path / "s", params, cfg, overwrite=True)


@pytest.mark.parametrize("cfg,arch", [
    ({"architecture": "topk", "k": 3, "apply_b_dec_to_input": True, "normalize_activations": "none",
      "metadata": {"sae_lens_version": "6.54.12"}}, "topk"),
    ({"architecture": "topk", "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 4},
      "apply_b_dec_to_input": False, "hook_name": "blocks.3.hook_resid_post"}, "topk"),  # v5
    # pre-6.0: SAELens reads `standard` + `activation_fn_str: topk` as TopK
    ({"architecture": "standard", "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 2}}, "topk"),
    ({"architecture": "topk", "k": 3, "rescale_acts_by_decoder_norm": True,
      "metadata": {"sae_lens_version": "6.54.12"}}, "topk"),
    ({"architecture": "jumprelu", "apply_b_dec_to_input": False, "normalize_activations": "none"}, "jumprelu"),
    ({"architecture": "standard", "apply_b_dec_to_input": True, "normalize_activations": False}, "standard"),
    ({"architecture": "batchtopk", "k": 2.0, "rescale_acts_by_decoder_norm": True,
      "metadata": {"sae_lens_version": "6.54.12"}}, "batchtopk"),
])
def test_loads_a_folder_saelens_wrote(tmp_path, cfg, arch):
    rng = np.random.default_rng(0)
    w = _random_weights(rng, jumprelu=arch == "jumprelu")
    if arch == "jumprelu":
        w["threshold"][:3] = -0.3  # SAELens's ReLU still cuts below zero
    if arch == "batchtopk":
        w["topk_threshold"] = np.array(0.2, np.float32)
    cfg = dict(cfg, d_in=D, d_sae=M, dtype="float32", device="cpu")
    _write(tmp_path, w, cfg)
    params, sae_cfg, normalizer = io.load_any(tmp_path)
    assert io.detect_format(tmp_path) == "saelens"
    assert normalizer is None and (sae_cfg.d_in, sae_cfg.d_sae) == (D, M)
    x = rng.normal(size=(9, D)).astype(np.float32)
    got = np.asarray(sae.apply(jax.tree.map(np.asarray, params), x, sae_cfg))
    assert _rel(got, _saelens_forward(w, cfg, x.astype(np.float64), arch)) < 1e-5


@pytest.mark.parametrize("cfg,weights,match", [
    ({"architecture": "gated"}, {}, "architecture 'gated' is not supported"),
    ({"architecture": "abstopk", "k": 3}, {}, "architecture 'abstopk' is not supported"),
    ({"architecture": "jumprelu_transcoder", "d_out": D}, {}, "architecture 'jumprelu_transcoder'"),
    ({"architecture": "standard", "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 2},
      "metadata": {"sae_lens_version": "6.1.0"}}, {}, "activation_fn_str='topk' is not supported"),
    ({"architecture": "standard", "activation_fn_str": "tanh-relu"}, {}, "activation_fn_str='tanh-relu'"),
    ({"architecture": "topk", "k": 3, "normalize_activations": "layer_norm"}, {}, "normalize_activations='layer_norm'"),
    ({"architecture": "standard", "finetuning_scaling_factor": True}, {}, "finetuning_scaling_factor"),
    ({"architecture": "standard"}, {"r_mag": np.zeros(M, np.float32)}, r"unexpected \['r_mag'\]"),
    ({"architecture": "jumprelu"}, {}, r"missing \['threshold'\]"),
    ({"architecture": "batchtopk", "k": 2.5}, {"topk_threshold": np.zeros((), np.float32)}, "integer k"),
    ({"architecture": "topk"}, {}, "needs an integer k"),
])
def test_what_we_cannot_honour_is_named(tmp_path, cfg, weights, match):
    w = {**_random_weights(np.random.default_rng(0)), **weights}
    _write(tmp_path, w, dict(cfg, d_in=D, d_sae=M))
    with pytest.raises(ValueError, match=match):
        io.load_any(tmp_path)


def test_bad_inputs_are_named(tmp_path):
    cfg = sae.SAEConfig(d_in=D, d_sae=M, k=2)
    params = jax.tree.map(np.asarray, sae.init(jax.random.key(1), cfg))
    with pytest.raises(ValueError, match=r"W_dec has shape \(12, 4\)"):
        io.save_saelens(tmp_path / "a", {**params, "W_dec": params["W_dec"][:, :4]}, cfg)
    with pytest.raises(ValueError, match="b_enc holds 1 non-finite"):
        io.save_saelens(tmp_path / "b", {**params, "b_enc": np.r_[np.nan, params["b_enc"][1:]]}, cfg)
    with pytest.raises(FileNotFoundError, match="cfg.json is missing"):
        io.load_saelens(tmp_path / "nothing")
    with pytest.raises(ValueError, match="can only fold a positive scalar"):
        io.save_saelens(tmp_path / "c", params, cfg, Normalizer(np.zeros(D, np.float32), -1.0))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "cfg.json").write_text("{not json")
    (tmp_path / "d" / io.WEIGHTS).write_bytes(b"")
    with pytest.raises(ValueError, match="is not valid JSON"):
        io.load_any(tmp_path / "d")


# --- sparsify ----------------------------------------------------------------------------------------------
def _sparsify_weights(rng):
    return {"encoder.weight": rng.normal(size=(M, D)).astype(np.float32),
            "encoder.bias": (rng.normal(size=M) * 0.1).astype(np.float32),
            "W_dec": rng.normal(size=(M, D)).astype(np.float32), "b_dec": rng.normal(size=D).astype(np.float32)}


def test_loads_a_folder_sparsify_wrote(tmp_path):
    rng = np.random.default_rng(0)
    w = _sparsify_weights(rng)
    cfg = {"activation": "topk", "expansion_factor": 32, "normalize_decoder": True, "num_latents": M, "k": 3,
           "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": D}
    _write(tmp_path / "layers.14", w, cfg, io.SPARSIFY_WEIGHTS)
    assert io.detect_format(tmp_path / "layers.14") == "sparsify"
    params, sae_cfg, normalizer = io.load_any(tmp_path / "layers.14")
    assert normalizer is None and sae_cfg.activation == "topk" and sae_cfg.k == 3
    x = rng.normal(size=(9, D)).astype(np.float32)
    got = np.asarray(sae.apply(params, x, sae_cfg))
    assert _rel(got, _sparsify_forward(w, 3, x.astype(np.float64))) < 1e-5
    with pytest.raises(FileNotFoundError, match=r"folders that may: \['layers.14'\]"):
        io.load_any(tmp_path)


def test_sparsify_export_is_right_on_raw_activations_and_round_trips(tmp_path):
    params, cfg = _trained_like("topk")
    x, norm = _raw_and_normalizer()
    io.save_sparsify(tmp_path / "layers.14", params, cfg, norm)
    on_disk = json.loads((tmp_path / "layers.14" / "cfg.json").read_text())
    assert on_disk["num_latents"] == M and on_disk["k"] == 3 and on_disk["d_in"] == D
    want = norm.invert(np.asarray(sae.apply(params, norm(x).astype(np.float32), cfg), np.float64))
    w = io._read_tensors(tmp_path / "layers.14" / io.SPARSIFY_WEIGHTS)
    assert _rel(_sparsify_forward(w, 3, x.astype(np.float64)), want) < 1e-5
    p2, cfg2, norm2 = io.load_any(tmp_path / "layers.14")
    assert cfg2 == cfg and norm2 is not None
    for n in params:
        np.testing.assert_array_equal(p2[n], params[n])


@pytest.mark.parametrize("key,value", [("activation", "groupmax"), ("transcode", True), ("skip_connection", True)])
def test_sparsify_fields_we_cannot_honour_are_named(tmp_path, key, value):
    cfg = {"activation": "topk", "num_latents": M, "k": 3, "d_in": D, key: value}
    _write(tmp_path, _sparsify_weights(np.random.default_rng(0)), cfg, io.SPARSIFY_WEIGHTS)
    with pytest.raises(ValueError, match=f"{key}="):
        io.load_any(tmp_path)


def test_sparsify_export_refuses_other_activations(tmp_path):
    params, cfg = _trained_like("jumprelu")
    with pytest.raises(ValueError, match="TopK SAEs only, got activation='jumprelu'"):
        io.save_sparsify(tmp_path, params, cfg)


def test_detect_format(tmp_path):
    params, cfg = _trained_like("topk")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        io.save_saelens(tmp_path / "ours", params, cfg)
    assert io.detect_format(tmp_path / "ours") == "jaxsae"
    with pytest.raises(FileNotFoundError, match="no SAE folder at"):
        io.load_any(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="is not an SAE folder"):
        io.load_any(tmp_path / "empty")

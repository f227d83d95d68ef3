"""Interop against the real packages (CPU torch): SAELens (`sae-lens`) and sparsify (`eai-sparsify`) both ways.

scripts/install.sh installs them, so CI runs these with the rest of the suite. A missing package fails the run; only
JAXSAE_SKIP_INTEROP=1 skips this file, on purpose, where they are not installed.
"""
import json
import os

import pytest

if os.environ.get("JAXSAE_SKIP_INTEROP") == "1":
    pytest.skip("JAXSAE_SKIP_INTEROP=1: SAELens/sparsify interop tests skipped on request", allow_module_level=True)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sae_lens import SAE as LensSAE  # noqa: E402
from sae_lens import saes as lens  # noqa: E402
from sparsify import SparseCoder, SparseCoderConfig  # noqa: E402

from jaxsae import io, metrics, sae  # noqa: E402
from jaxsae.data import Normalizer  # noqa: E402

pytestmark = pytest.mark.interop

D, M, K, N = 48, 96, 4, 512
MANIFEST = {"model": "smollm2-135m", "hook": "resid_post", "layer": 14, "ctx_len": 256, "skip_first": 4,
            "exclude_tokens": [0], "corpus": "general", "split": "train"}


def _rel(got, want) -> float:
    """Largest elementwise difference over the largest magnitude of the reference."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def _ev(x, x_hat) -> float:
    """1 − Σ‖x − x̂‖² / Σ‖x − x̄‖², in float64 numpy."""
    x, x_hat = np.asarray(x, np.float64), np.asarray(x_hat, np.float64)
    return float(1 - np.sum((x - x_hat) ** 2) / np.sum((x - x.mean(0)) ** 2))


@pytest.fixture(scope="module")
def cache():
    """Raw activations far from normalised (mean ~20 per dimension, scale ~40): sparse sums of M unit directions.

    Returns (x, Normalizer, directions F, offset): x = offset + 60·(codes F + noise).
    """
    rng = np.random.default_rng(0)
    F_MxD = rng.normal(size=(M, D))
    F_MxD /= np.linalg.norm(F_MxD, axis=1, keepdims=True)
    codes = np.zeros((N, M))
    for row in codes:
        row[rng.choice(M, 3, replace=False)] = rng.uniform(1, 3, 3)
    offset_D = 20 + 4 * rng.normal(size=D)
    x = offset_D + 60 * (codes @ F_MxD + 0.05 * rng.normal(size=(N, D)))
    return x.astype(np.float32), Normalizer.fit(x), F_MxD.astype(np.float32), offset_D


# Encoder bias (and JumpReLU threshold) per activation, in normalised units, that give each a sparse code.
_BIAS = {"topk": -0.5, "batchtopk": -0.5, "jumprelu": 0.0, "relu": -1.5}


def _planted(activation, cache):
    """An SAE whose decoder is the data's dictionary, so its EV is far from trivial."""
    x, norm, F_MxD, offset_D = cache
    cfg = sae.SAEConfig(d_in=D, d_sae=M, activation=activation, k=K, aux_k=0)
    # x_n − b_dec with b_dec = (offset − μ)/s is 60·(codes F + noise)/s, which the dictionary codes sparsely.
    params = {"W_enc": F_MxD.T.copy(), "b_enc": np.full(M, _BIAS[activation], np.float32), "W_dec": F_MxD.copy(),
              "b_dec": ((offset_D - norm.mean_D) / norm.scale).astype(np.float32)}
    if activation == "jumprelu":
        params["threshold"] = np.full(M, 3.0, np.float32)
    return params, cfg


def _ours_raw(params, cfg, norm, x):
    """jaxsae's reconstruction of raw activations: normalise, SAE, invert."""
    return norm.invert(np.asarray(sae.apply(params, jnp.asarray(norm(x)), cfg), np.float64))


def _export_case(name, cache):
    """(params, cfg) of a planted SAE; "batchtopk->jumprelu" is frozen with sae.batchtopk_to_jumprelu."""
    if name != "batchtopk->jumprelu":
        return _planted(name, cache)
    x, norm, *_ = cache
    params, cfg = sae.batchtopk_to_jumprelu(*_planted("batchtopk", cache), jnp.asarray(norm(x)), batch_size=128)
    return jax.tree.map(np.asarray, params), cfg


@pytest.mark.parametrize("name", ["topk", "jumprelu", "relu", "batchtopk->jumprelu"])
def test_saelens_reads_our_export_right_on_raw_activations(tmp_path, cache, name):
    x, norm, *_ = cache
    params, cfg = _export_case(name, cache)
    io.save_saelens(tmp_path / "s", params, cfg, norm, metadata=io.saelens_metadata(MANIFEST))
    lens_sae = LensSAE.load_from_disk(tmp_path / "s")
    with torch.no_grad():
        x_t = torch.from_numpy(x)
        got, acts = lens_sae(x_t).numpy(), lens_sae.encode(x_t).numpy()
    want = _ours_raw(params, cfg, norm, x)
    ev_ours = float(metrics.explained_variance(jnp.asarray(x), jnp.asarray(want, jnp.float32)))  # jaxsae's EV
    assert ev_ours > 0.5, ev_ours  # a real reconstruction, not noise
    assert abs(_ev(x, got) - ev_ours) < 1e-4
    assert _rel(got, want) < 1e-5
    # The same latents fire (each s times larger in raw units).
    code = sae.encode(params, jnp.asarray(norm(x)), cfg)
    dense = np.zeros((N, M), bool)
    if isinstance(code, sae.Code):
        np.put_along_axis(dense, np.asarray(code.idx_BxK), np.asarray(code.vals_BxK) > 0, 1)
    else:
        dense = np.asarray(code) != 0
    np.testing.assert_array_equal(acts != 0, dense)
    meta = lens_sae.cfg.metadata
    assert (meta.hook_name, meta.model_name, meta.context_size) == ("blocks.14.hook_resid_post",
                                                                    "HuggingFaceTB/SmolLM2-135M", 256)
    assert meta.hook_layer == 14 and list(meta.seqpos_slice) == [4, None] and meta.prepend_bos is False
    # And we read our own folder back as trained.
    p2, cfg2, norm2 = io.load_any(tmp_path / "s")
    assert cfg2 == cfg and norm2 is not None
    for n in params:
        np.testing.assert_array_equal(p2[n], params[n])


def _randomise(module: torch.nn.Module, seed: int, threshold_neg: int = 0) -> None:
    """Every parameter (and a batchtopk threshold) random, biases non-zero, decoder norms far from 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim == 1 else 1.0))
            if name == "threshold":
                p.abs_()
                p[:threshold_neg] *= -1
        if hasattr(module, "topk_threshold"):
            module.topk_threshold = torch.tensor(0.3, dtype=torch.double)


def _lens_cases():
    """(name, build() -> SAELens module, how it saves, how SAELens loads it back) for what SAELens can save."""
    def make(cls, cfg_cls, **kw):
        return lambda: cls(cfg_cls(d_in=D, d_sae=M, **kw))

    return [
        ("standard", make(lens.StandardSAE, lens.StandardSAEConfig), "save_model", LensSAE),
        ("standard no b_dec in", make(lens.StandardSAE, lens.StandardSAEConfig, apply_b_dec_to_input=False),
         "save_model", LensSAE),
        ("topk", make(lens.TopKSAE, lens.TopKSAEConfig, k=K), "save_model", LensSAE),
        ("topk rescaled by decoder norm",
         make(lens.TopKSAE, lens.TopKSAEConfig, k=K, rescale_acts_by_decoder_norm=True), "save_model", LensSAE),
        ("jumprelu", make(lens.JumpReLUSAE, lens.JumpReLUSAEConfig), "save_model", LensSAE),
        ("jumprelu no b_dec in", make(lens.JumpReLUSAE, lens.JumpReLUSAEConfig, apply_b_dec_to_input=False),
         "save_model", LensSAE),
        ("topk (training)", make(lens.TopKTrainingSAE, lens.TopKTrainingSAEConfig, k=K), "save_inference_model",
         LensSAE),
        ("jumprelu (training)", make(lens.JumpReLUTrainingSAE, lens.JumpReLUTrainingSAEConfig), "save_model", LensSAE),
        ("batchtopk", make(lens.BatchTopKTrainingSAE, lens.BatchTopKTrainingSAEConfig, k=K), "save_inference_model",
         LensSAE),
        ("matryoshka", make(lens.MatryoshkaBatchTopKTrainingSAE, lens.MatryoshkaBatchTopKTrainingSAEConfig, k=K,
                             matryoshka_widths=[32, M]), "save_inference_model", LensSAE),
        ("batchtopk checkpoint", make(lens.BatchTopKTrainingSAE, lens.BatchTopKTrainingSAEConfig, k=K), "save_model",
         lens.BatchTopKTrainingSAE),
    ]


@pytest.mark.parametrize("case", _lens_cases(), ids=lambda c: c[0])
def test_every_saelens_architecture_we_honour_loads(tmp_path, case):
    name, build, save, loader = case
    module = build()
    _randomise(module, seed=len(name), threshold_neg=5)
    getattr(module, save)(tmp_path / "s")
    reference = loader.load_from_disk(tmp_path / "s")
    x = np.random.default_rng(1).normal(size=(64, D)).astype(np.float32) * 3 + 1
    with torch.no_grad():
        want = reference(torch.from_numpy(x)).numpy()
    params, cfg, normalizer = io.load_any(tmp_path / "s")
    assert normalizer is None and io.detect_format(tmp_path / "s") == "saelens"
    assert _rel(sae.apply(params, jnp.asarray(x), cfg), want) < 1e-5


def test_an_old_standard_plus_topk_folder_loads_as_saelens_reads_it(tmp_path):
    module = lens.StandardSAE(lens.StandardSAEConfig(d_in=D, d_sae=M))
    _randomise(module, seed=3)
    module.save_model(tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    del cfg["metadata"]  # no version: a pre-6.0 cfg.json
    cfg.update(activation_fn_str="topk", activation_fn_kwargs={"k": K}, hook_point="blocks.2.hook_resid_pre")
    (tmp_path / "s" / "cfg.json").write_text(json.dumps(cfg))
    reference = LensSAE.load_from_disk(tmp_path / "s")
    assert type(reference).__name__ == "TopKSAE"
    x = np.random.default_rng(2).normal(size=(64, D)).astype(np.float32)
    with torch.no_grad():
        want = reference(torch.from_numpy(x)).numpy()
    params, cfg, _ = io.load_any(tmp_path / "s")
    assert cfg.activation == "topk" and cfg.k == K
    assert _rel(sae.apply(params, jnp.asarray(x), cfg), want) < 1e-5


@pytest.mark.parametrize("build,arch", [
    (lambda: lens.GatedSAE(lens.GatedSAEConfig(d_in=D, d_sae=M)), "gated"),
    (lambda: lens.AbsTopKSAE(lens.AbsTopKSAEConfig(d_in=D, d_sae=M, k=K)), "abstopk"),
    (lambda: lens.MatchingPursuitSAE(lens.MatchingPursuitSAEConfig(d_in=D, d_sae=M)), "matching_pursuit"),
    (lambda: lens.Transcoder(lens.TranscoderConfig(d_in=D, d_sae=M, d_out=D, apply_b_dec_to_input=False)),
     "transcoder"),
    (lambda: lens.JumpReLUSkipTranscoder(lens.JumpReLUSkipTranscoderConfig(d_in=D, d_sae=M, d_out=D,
                                                                           apply_b_dec_to_input=False)),
     "jumprelu_skip_transcoder"),
])
def test_saelens_architectures_we_cannot_honour_are_named(tmp_path, build, arch):
    build().save_model(tmp_path / "s")
    with pytest.raises(ValueError, match=f"architecture '{arch}' is not supported"):
        io.load_any(tmp_path / "s")


# --- sparsify ----------------------------------------------------------------------------------------------
def _sparse_coder(params) -> SparseCoder:
    """A sparsify SparseCoder holding our params (W_enc is its encoder.weight transposed)."""
    sc = SparseCoder(D, SparseCoderConfig(num_latents=M, k=K))
    with torch.no_grad():
        sc.encoder.weight.copy_(torch.from_numpy(np.ascontiguousarray(params["W_enc"].T)))
        sc.encoder.bias.copy_(torch.from_numpy(params["b_enc"]))
        sc.W_dec.copy_(torch.from_numpy(params["W_dec"]))
        sc.b_dec.copy_(torch.from_numpy(params["b_dec"]))
    return sc


def test_a_folder_sparsify_wrote_loads(tmp_path):
    sc = SparseCoder(D, SparseCoderConfig(num_latents=M, k=K))
    _randomise(sc, seed=5)
    sc.save_to_disk(tmp_path / "layers.14")
    x = np.random.default_rng(3).normal(size=(64, D)).astype(np.float32)
    with torch.no_grad():
        want = sc(torch.from_numpy(x)).sae_out.numpy()
    params, cfg, normalizer = io.load_any(tmp_path / "layers.14")
    assert normalizer is None and io.detect_format(tmp_path / "layers.14") == "sparsify" and cfg.k == K
    assert _rel(sae.apply(params, jnp.asarray(x), cfg), want) < 1e-5


def test_sparsify_reads_our_export_right_on_raw_activations(tmp_path, cache):
    x, norm, *_ = cache
    params, cfg = _planted("topk", cache)
    io.save_sparsify(tmp_path / "layers.14", params, cfg, norm)
    sc = SparseCoder.load_from_disk(tmp_path / "layers.14")
    with torch.no_grad():
        got = sc(torch.from_numpy(x)).sae_out.numpy()
    want = _ours_raw(params, cfg, norm, x)
    assert abs(_ev(x, got) - _ev(x, want)) < 1e-4 and _rel(got, want) < 1e-5
    p2, cfg2, _ = io.load_any(tmp_path / "layers.14")
    assert cfg2 == cfg
    for n in params:
        np.testing.assert_array_equal(p2[n], params[n])


def _random_topk(seed):
    """TopK params whose every token has more than K positive pre-activations (sparsify's backward ignores its
    ReLU on the selected latents, ours masks it: they agree wherever the K kept values are positive)."""
    rng = np.random.default_rng(seed)
    W_dec = rng.normal(size=(M, D))
    W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
    return {"W_enc": (W_dec.T + 0.3 * rng.normal(size=(D, M))).astype(np.float32),
            "b_enc": (0.5 + 0.1 * rng.normal(size=M)).astype(np.float32),
            "W_dec": W_dec.astype(np.float32), "b_dec": (0.2 * rng.normal(size=D)).astype(np.float32)}


def test_topk_forward_fvu_and_gradients_equal_sparsify():
    """A second library's TopK SAE as the reference for our forward, FVU and custom VJP (one seed and vmapped)."""
    cfg = sae.SAEConfig(d_in=D, d_sae=M, activation="topk", k=K, aux_k=0)
    x = np.random.default_rng(7).normal(size=(64, D)).astype(np.float32) * 2
    seeds = [_random_topk(s) for s in (11, 12)]
    var = float(np.sum((x.astype(np.float64) - x.mean(0)) ** 2))

    def loss(p):
        return sae.loss(p, jnp.asarray(x), cfg)

    stacked = jax.tree.map(lambda *a: jnp.stack(a), *seeds)
    grads_S = jax.jit(jax.vmap(jax.grad(lambda p: loss(p)[0])))(stacked)  # the trainer's vmapped path
    for s, params in enumerate(seeds):
        sc = _sparse_coder(params)
        x_t = torch.from_numpy(x)
        out = sc(x_t)
        out.fvu.backward()
        assert (out.latent_acts > 0).all()
        (total, m), grads = jax.value_and_grad(loss, has_aux=True)(params)
        assert _rel(sae.apply(params, jnp.asarray(x), cfg), out.sae_out.detach().numpy()) < 1e-5
        code = sae.encode(params, jnp.asarray(x), cfg)
        np.testing.assert_array_equal(np.sort(np.asarray(code.idx_BxK), 1), np.sort(out.latent_indices.numpy(), 1))
        fvu = out.fvu.item()
        assert abs(float(m["fvu"]) / fvu - 1) < 1e-5
        # Our loss is the per-element MSE Σe²/(B·D), sparsify's Σe²/Σ‖x − x̄‖²: equal up to that factor.
        to_fvu = x.size / var
        assert abs(float(total) * to_fvu / fvu - 1) < 1e-5
        theirs = {"W_enc": sc.encoder.weight.grad.numpy().T, "b_enc": sc.encoder.bias.grad.numpy(),
                  "W_dec": sc.W_dec.grad.numpy(), "b_dec": sc.b_dec.grad.numpy()}
        for n, g in theirs.items():
            assert _rel(np.asarray(grads[n]) * to_fvu, g) < 1e-5, n
            assert _rel(np.asarray(grads_S[n][s]) * to_fvu, g) < 1e-5, n

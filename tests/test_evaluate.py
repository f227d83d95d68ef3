"""Evaluation against numpy references: CE splice on a tiny random model, EV / L0 / dead over a cache."""
import json

import jax
import numpy as np
import pytest

from jaxsae import evaluate as ev
from jaxsae import sae
from jaxsae.data import CacheSource, CacheWriter, Normalizer
from lime_jax import model as lm
from lime_jax.adapter import from_llama
from lime_jax.config import tiny

CFG = tiny(vocab=300, n_layers=4, d_model=32, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64, max_len=32)
PARAMS = lm.init(jax.random.key(1), CFG)
MODEL = from_llama("tiny", CFG, PARAMS)
TOKENS = np.random.default_rng(0).integers(1, CFG.vocab, (5, 16)).astype(np.int32)
TOKENS[1, 9] = TOKENS[3, 12] = TOKENS[4, 2] = 0  # <|endoftext|>: never spliced, its prediction not counted
SAE_CFG = sae.SAEConfig(d_in=32, d_sae=64, k=4)


def _late(skip_first):
    """[N, T] positions that are spliced: >= skip_first and not token 0."""
    return (np.arange(16)[None, :] >= skip_first) & (TOKENS != 0)


def _np_loss(logits_NxTxV, skip_first):
    """Mean next-token NLL predicted at the spliced positions, by a float64 log-softmax and a loop."""
    z = np.asarray(logits_NxTxV, np.float64)
    late, total, count = _late(skip_first), 0.0, 0
    for n in range(TOKENS.shape[0]):
        for t in range(TOKENS.shape[1] - 1):
            if late[n, t]:
                total += np.log(np.sum(np.exp(z[n, t] - z[n, t].max()))) + z[n, t].max() - z[n, t, TOKENS[n, t + 1]]
                count += 1
    return total / count


def _np_sae(params, x_NxD, k):
    """TopK SAE in numpy: encoder sees x − b_dec, keep the k largest pre-activations, ReLU, decode."""
    p = {n: np.asarray(v, np.float64) for n, v in params.items()}
    pre = (x_NxD - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    acts = np.zeros_like(pre)
    top = np.argsort(-pre, axis=1)[:, :k]
    np.put_along_axis(acts, top, np.maximum(np.take_along_axis(pre, top, 1), 0), 1)
    return acts @ p["W_dec"] + p["b_dec"], acts


def test_identity_splice_costs_nothing_and_clean_loss_matches_numpy():
    r = ev.ce_metrics(MODEL, TOKENS, layer=2, recon_fn=lambda h: h, skip_first=4, batch_size=2)
    assert r["ce_delta"] == 0.0 and r["loss_recovered"] == 1.0
    np.testing.assert_allclose(r["clean_loss"], _np_loss(lm.apply(PARAMS, TOKENS, CFG), 4), rtol=1e-5)


def test_zero_and_spliced_losses_match_numpy():
    skip = 3
    rng = np.random.default_rng(2)
    noise = rng.standard_normal((1, 16, 32)).astype(np.float32)
    recon = lambda h: h + noise  # noqa: E731
    r = ev.ce_metrics(MODEL, TOKENS, layer=1, recon_fn=recon, skip_first=skip, batch_size=2)
    late = _late(skip)[..., None]

    def np_run(fn):
        return _np_loss(lm.splice(PARAMS, TOKENS, CFG, 1, lambda h: np.where(late, fn(np.asarray(h)), h)), skip)

    clean, zero, spliced = np_run(lambda h: h), np_run(np.zeros_like), np_run(recon)
    np.testing.assert_allclose([r["clean_loss"], r["zero_loss"], r["spliced_loss"]], [clean, zero, spliced], rtol=1e-5)
    np.testing.assert_allclose(r["loss_recovered"], (zero - spliced) / (zero - clean), rtol=1e-4)
    again = ev.ce_metrics(MODEL, TOKENS, 1, recon, skip_first=skip, batch_size=3, baseline=r)
    np.testing.assert_allclose(again["spliced_loss"], r["spliced_loss"], rtol=1e-6)


def test_first_positions_and_endoftext_are_never_spliced():
    padded = np.concatenate([TOKENS, np.repeat(TOKENS[:1], 3, 0)])  # ce_metrics pads to batch_size=8 this way

    def wreck_unspliced(h):  # garbage exactly where the splice must keep the model's own residual
        return np.where(~((np.arange(16)[None, :] >= 4) & (padded != 0))[..., None], 1e4, np.asarray(h))

    r = ev.ce_metrics(MODEL, TOKENS, 2, wreck_unspliced, skip_first=4, batch_size=8)
    assert r["ce_delta"] == 0.0


def test_sae_recon_fn_matches_numpy():
    params = sae.init(jax.random.key(3), SAE_CFG)
    params = {**params, "b_dec": 0.1 * jax.random.normal(jax.random.key(4), (32,))}
    rng = np.random.default_rng(5)
    norm = Normalizer(rng.standard_normal(32).astype(np.float32), 3.0)
    h = rng.standard_normal((2, 6, 32)).astype(np.float32) * 3 + norm.mean_D
    x_hat, _ = _np_sae(params, (h.reshape(-1, 32) - norm.mean_D) / 3.0, SAE_CFG.k)
    want = (x_hat * 3.0 + norm.mean_D).reshape(2, 6, 32)
    np.testing.assert_allclose(ev.sae_recon_fn(params, SAE_CFG, norm)(h), want, rtol=1e-4, atol=1e-4)


def test_evaluate_sae_ev_l0_dead_match_numpy(tmp_path):
    rng = np.random.default_rng(6)
    x = (rng.standard_normal((512, 32)) * rng.uniform(0.5, 3, 32) + 7).astype(np.float16)
    with CacheWriter(tmp_path, {"layer": 0}, d_in=32, shard_tokens=200) as w:
        w.add(x)
    acts = CacheSource(tmp_path)
    params = sae.init(jax.random.key(7), SAE_CFG)
    r = ev.evaluate_sae(params, SAE_CFG, acts.normalizer, acts, batch_size=128)
    x64, norm = x.astype(np.float64), acts.normalizer
    y_hat, codes = _np_sae(params, (x64 - norm.mean_D) / norm.scale, SAE_CFG.k)
    x_hat = y_hat * norm.scale + norm.mean_D  # EV in the model's scale, not the normalised one
    want_ev = 1 - np.sum((x64 - x_hat) ** 2) / np.sum((x64 - x64.mean(0)) ** 2)
    np.testing.assert_allclose(r["ev"], want_ev, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(r["l0"], np.mean(np.sum(codes > 0, 1)), rtol=1e-6)
    assert r["dead_frac"] == pytest.approx(np.mean(~np.any(codes > 0, 0)))
    assert r["eval_tokens"] == 512


def test_bad_input_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="skip_first"):
        ev.ce_metrics(MODEL, TOKENS[:, :5], 1, lambda h: h, skip_first=4)
    with pytest.raises(FileNotFoundError, match="no SAE folder"):
        ev.find_saes(tmp_path)


def test_eval_cli_scores_every_seed_folder(tmp_path):
    from jaxsae import io

    rng = np.random.default_rng(8)
    x = (rng.standard_normal((256, 32)) + 2).astype(np.float16)
    cache = tmp_path / "acts" / "smollm2-135m" / "L14" / "toy_heldout"
    with CacheWriter(cache, {"layer": 14, "skip_first": 4, "exclude_tokens": [0]}, d_in=32) as w:
        w.add(x)
    norm = CacheSource(cache).normalizer
    for s in range(2):
        io.save_saelens(tmp_path / "run" / f"seed_{s}", sae.init(jax.random.key(s), SAE_CFG), SAE_CFG, norm)
    out = tmp_path / "eval.json"
    ev.main([f"sae={tmp_path / 'run'}", "corpora=toy", "ce_contexts=0", "batch_size=64",
             f"root={tmp_path / 'acts'}", f"out={out}"])
    rows = json.loads(out.read_text())
    assert [r["sae"].rsplit("/", 1)[1] for r in rows] == ["seed_0", "seed_1"]
    x64 = x.astype(np.float64)
    for s, r in enumerate(rows):
        y_hat, _ = _np_sae(sae.init(jax.random.key(s), SAE_CFG), (x64 - norm.mean_D) / norm.scale, SAE_CFG.k)
        x_hat = y_hat * norm.scale + norm.mean_D
        np.testing.assert_allclose(r["ev"], 1 - np.sum((x64 - x_hat) ** 2) / np.sum((x64 - x64.mean(0)) ** 2),
                                   rtol=1e-4, atol=1e-5)

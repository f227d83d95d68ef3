"""jaxsae.analysis against brute-force loops and a float64 numpy SAE forward."""
import json

import chex
import jax
import numpy as np
import pytest

from jaxsae import analysis, sae
from jaxsae.data import CacheSource, CacheWriter, Normalizer, ArraySource
from jaxsae.harvest import CONTEXTS
from jaxsae.train import TrainConfig


def _np_code(params, x_NxD, cfg):
    """Dense [N, M] activations of an SAE in float64 numpy: TopK picks the k largest pre-activations, then ReLU."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    pre = (np.asarray(x_NxD, np.float64) - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    if cfg.activation == "relu":
        return np.maximum(pre, 0)
    acts = np.zeros_like(pre)
    for n in range(len(pre)):
        top = np.argsort(-pre[n])[:cfg.k]
        acts[n, top] = np.maximum(pre[n, top], 0)
    return acts


def _np_recon(params, acts_NxM):
    return acts_NxM @ np.asarray(params["W_dec"], np.float64) + np.asarray(params["b_dec"], np.float64)


def _random_sae(key, cfg):
    """sae.init with the encoder, b_enc and b_dec moved off their (too symmetric) initial values."""
    k1, k2, k3, k4 = jax.random.split(key, 4)
    p = sae.init(k1, cfg)
    return {**p, "W_enc": p["W_enc"] + 0.5 * jax.random.normal(k2, p["W_enc"].shape),
            "b_enc": 0.1 * jax.random.normal(k3, p["b_enc"].shape),
            "b_dec": 0.3 * jax.random.normal(k4, p["b_dec"].shape)}


# ---------------------------------------------------------------- groups


def test_frequency_bins_by_loop():
    rng = np.random.default_rng(0)
    freq = 10 ** rng.uniform(-5, 0, (3, 40))
    freq[rng.random((3, 40)) < 0.2] = 0.0
    edges, bins = analysis.frequency_bins(freq, 4)
    alive = freq > 0
    # Quantile edges over all alive latents: distinct frequencies split 4 ways within one latent per bin.
    counts = [int(np.sum(bins == b)) for b in range(4)]
    assert sum(counts) == alive.sum() and max(counts) - min(counts) <= 2
    for s in range(3):
        for m in range(40):
            if not alive[s, m]:
                assert bins[s, m] == -1
                continue
            v = np.log10(freq[s, m])
            ref = max(b for b in range(4) if edges[b] <= v)  # the top edge itself belongs to the last bin
            assert bins[s, m] == ref


def test_stability_groups_partition_the_alive_latents():
    rng = np.random.default_rng(1)
    S, M = 4, 30
    p = rng.integers(0, S, (S, M)) / (S - 1)
    freq = np.where(rng.random((S, M)) < 0.25, 0.0, rng.random((S, M)))
    g = analysis.stability_groups(p, freq, 0.5)
    for s in range(S):
        for m in range(M):
            assert g["stable"][s, m] == (freq[s, m] > 0 and p[s, m] >= 0.5)
            assert g["unstable"][s, m] == (freq[s, m] > 0 and p[s, m] < 0.5)
    assert not np.any(g["stable"] & g["unstable"])
    np.testing.assert_array_equal(g["stable"] | g["unstable"], freq > 0)


def test_ablation_groups_match_size_and_frequency_histogram():
    rng = np.random.default_rng(2)
    S, M, n_bins = 3, 200, 5
    freq = 10 ** rng.uniform(-4, -0.5, (S, M))
    freq[rng.random((S, M)) < 0.1] = 0.0
    # Stable latents lean frequent, so a size-matched draw alone would not match their frequencies.
    p = (rng.random((S, M)) < np.clip(np.log10(np.maximum(freq, 1e-9)) + 3, 0.05, 0.95)).astype(float)
    groups, edges, bins = analysis.ablation_groups(np.random.default_rng(3), p, freq, 0.5, n_bins)
    assert set(groups) == {"stable", "unstable", "random_size_stable", "random_freq_stable",
                           "random_size_unstable", "random_freq_unstable"}
    alive = freq > 0
    for name in ("stable", "unstable"):
        target = groups[name]
        for kind in ("size", "freq"):
            rand = groups[f"random_{kind}_{name}"]
            assert not np.any(rand & ~alive), "random latents must be alive"
            np.testing.assert_array_equal(rand.sum(1), target.sum(1))
        for s in range(S):
            hist_target = [sum(1 for m in range(M) if target[s, m] and bins[s, m] == b) for b in range(n_bins)]
            hist_rand = [sum(1 for m in range(M) if groups[f"random_freq_{name}"][s, m] and bins[s, m] == b)
                         for b in range(n_bins)]
            assert hist_rand == hist_target
    # The draw is random, not the target itself.
    assert not np.array_equal(groups["random_freq_stable"], groups["stable"])


def test_matched_draw_refuses_a_pool_too_small():
    group = np.array([[True, True, False, False]])
    pool = np.array([[True, False, False, False]])
    with pytest.raises(ValueError, match="pool only 1"):
        analysis.random_size_matched(np.random.default_rng(0), group, pool)
    with pytest.raises(ValueError, match="n_bins"):
        analysis.frequency_bins(np.ones((1, 4)), 0)


# ---------------------------------------------------------------- ablated reconstruction


@pytest.mark.parametrize("activation", ["topk", "relu"])
def test_ablated_ev_matches_numpy(activation):
    S, M, D, N = 2, 16, 8, 37
    cfg = sae.SAEConfig(d_in=D, d_sae=M, k=3, activation=activation, aux_k=0)
    params_S = jax.vmap(lambda k: _random_sae(k, cfg))(jax.random.split(jax.random.key(0), S))
    rng = np.random.default_rng(4)
    x = rng.normal(size=(N, D)).astype(np.float32)
    keep = np.stack([np.ones((S, M), bool), rng.random((S, M)) < 0.6, np.zeros((S, M), bool)], axis=1)
    out = analysis.ablated_ev(params_S, cfg, x, keep, chunk=16)  # 37 rows: the last chunk is partial
    var = np.sum((x.astype(np.float64) - x.mean(0)) ** 2)
    for s in range(S):
        p = jax.tree.map(lambda a: np.asarray(a[s]), params_S)
        acts = _np_code(p, x, cfg)  # selection first, then the mask: the other latents keep their values
        for g in range(3):
            err = np.sum((x - _np_recon(p, acts * keep[s, g])) ** 2)
            np.testing.assert_allclose(out.ev_SxG[s, g], 1 - err / var, rtol=1e-5, atol=1e-5)
        fired = (acts > 0).sum(0)
        np.testing.assert_allclose(out.freq_SxM[s], fired / N)
        np.testing.assert_allclose(out.mean_act_SxM[s], acts.sum(0) / np.maximum(fired, 1), rtol=1e-5, atol=1e-6)
    assert np.all(np.abs(out.ev_SxG[:, 1] - out.ev_SxG[:, 0]) > 1e-3)  # the masks matter


def test_ablated_recon_fn_matches_numpy():
    D, M = 8, 16
    cfg = sae.SAEConfig(d_in=D, d_sae=M, k=4, aux_k=0)
    params = _random_sae(jax.random.key(1), cfg)
    rng = np.random.default_rng(5)
    norm = Normalizer(rng.normal(size=D).astype(np.float32), 3.0)
    keep = rng.random(M) < 0.5
    h = (rng.normal(size=(2, 5, D)) * 3 + 1).astype(np.float32)
    out = analysis.ablated_recon_fn(params, cfg, norm, keep)(h)
    x = (h.reshape(10, D) - norm.mean_D) / 3.0
    ref = _np_recon(params, _np_code(params, x, cfg) * keep) * 3.0 + norm.mean_D
    chex.assert_trees_all_close(np.asarray(out), ref.reshape(2, 5, D).astype(np.float32), rtol=1e-5, atol=1e-5)
    assert out.dtype == np.float32
    assert analysis.ablated_recon_fn(params, cfg, norm, keep)(h.astype(jax.numpy.bfloat16)).dtype == jax.numpy.bfloat16


# ---------------------------------------------------------------- top-activating contexts


def _tokens(C=7, T=12, V=20, seed=6):
    """Random tokens with <|endoftext|> (0) sprinkled in, also inside the skipped prefix."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, V, (C, T)).astype(np.int32)
    tokens[rng.random((C, T)) < 0.15] = 0
    tokens[0, 5] = tokens[1, 1] = 0
    return tokens


def test_row_positions_by_loop():
    tokens = _tokens()
    tokens[3, 8] = 5
    ctx, pos = analysis.row_positions(tokens, 3, (0, 5))
    ref = [(c, t) for c in range(tokens.shape[0]) for t in range(tokens.shape[1])
           if t >= 3 and tokens[c, t] not in (0, 5)]
    assert list(zip(ctx.tolist(), pos.tolist())) == ref


def test_top_contexts_from_a_cache_recompute_to_the_cached_activation(tmp_path):
    """A fake harvest (activation = embedding of the token) into a real cache; every top context's token,
    pushed through a numpy SAE, must give the activation reported for it."""
    C, T, V, D, skip = 7, 12, 20, 8, 3
    tokens = _tokens(C, T, V)
    emb_VxD = np.random.default_rng(7).normal(size=(V, D)).astype(np.float32)
    rows = [emb_VxD[tokens[c, t]] for c in range(C) for t in range(skip, T) if tokens[c, t] != 0]
    n_full = sum(1 for c in range(C - 1) for t in range(skip, T) if tokens[c, t] != 0)
    # The last context is cut short (a killed harvest): its rows have no full context in the cache.
    with CacheWriter(tmp_path, {"skip_first": skip, "exclude_tokens": [0]}, D, "float32", shard_tokens=7) as w:
        w.add(np.stack(rows[:n_full + 2]))
    np.save(tmp_path / CONTEXTS, tokens)
    assert any(tokens[c, t] == 0 for c in range(C - 1) for t in range(skip, T)), "the fixture must shift rows"

    got_tokens, ctx, pos = analysis.cache_row_positions(tmp_path)
    np.testing.assert_array_equal(got_tokens, tokens[:C - 1])
    assert len(ctx) == n_full
    x = analysis.cache_rows(CacheSource(tmp_path), 10_000)
    np.testing.assert_array_equal(x, np.stack(rows[:n_full + 2]))  # stored order, across shard boundaries
    for r in range(n_full):
        np.testing.assert_array_equal(x[r], emb_VxD[got_tokens[ctx[r], pos[r]]])

    cfg = sae.SAEConfig(d_in=D, d_sae=12, k=3, aux_k=0)
    params = _random_sae(jax.random.key(2), cfg)
    latents = [0, 5, 11]
    acts = analysis.latent_acts(params, cfg, x, latents, chunk=16)
    with pytest.raises(ValueError, match="row map covers only"):
        analysis.top_contexts(acts, got_tokens, ctx, pos)
    top = analysis.top_contexts(acts[:n_full], got_tokens, ctx, pos, k=3, window=2, latents=latents)
    json.dumps(top)  # plain data for a browser

    act_of = lambda tok: _np_code(params, emb_VxD[tok][None], cfg)[0]  # noqa: E731
    for e, feat in enumerate(top):
        assert feat["latent"] == latents[e]
        # Brute force over every kept (context, position): the k largest positive activations.
        ref = sorted(((act_of(tokens[c, t])[latents[e]], c, t) for c in range(C - 1) for t in range(skip, T)
                      if tokens[c, t] != 0), key=lambda a: -a[0])
        ref = [a for a in ref if a[0] > 0][:3]
        assert len(feat["examples"]) == len(ref) > 0
        for ex, (a_ref, _, _) in zip(feat["examples"], ref):
            c, t = ex["context"], ex["position"]
            np.testing.assert_allclose(ex["act"], a_ref, rtol=1e-5)
            np.testing.assert_allclose(act_of(tokens[c, t])[latents[e]], ex["act"], rtol=1e-5)
            assert ex["tokens"] == tokens[c, ex["start"]:t + 3].tolist() and ex["tokens"][ex["max_pos"]] == tokens[c, t]
            for i, a in enumerate(ex["acts"]):
                u = ex["start"] + i
                if u < skip or tokens[c, u] == 0:
                    assert a is None
                else:
                    np.testing.assert_allclose(a, act_of(tokens[c, u])[latents[e]], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- pooling and encoder refit


def test_pooled_sae_by_greedy_loop():
    rng = np.random.default_rng(8)
    S, M, D, tau, width = 3, 12, 6, 0.7, 14
    W_dec = rng.normal(size=(S, M, D))
    W_dec[1, :6] = W_dec[0, :6] + 0.05 * rng.normal(size=(6, D))  # near-copies across seeds: pooled once
    W_dec /= np.linalg.norm(W_dec, axis=-1, keepdims=True)
    params_S = {"W_dec": W_dec.astype(np.float32), "W_enc": rng.normal(size=(S, D, M)).astype(np.float32),
                "b_enc": rng.normal(size=(S, M)).astype(np.float32), "b_dec": rng.normal(size=(S, D)).astype(np.float32)}
    p = rng.integers(0, 3, (S, M)) / 2
    freq = rng.integers(0, 4, (S, M)) / 4  # ties in p and freq, and silent latents
    params, seed_W, latent_W = analysis.pooled_sae(params_S, p, freq, width, tau)

    cands = sorted(((s, m) for s in range(S) for m in range(M) if freq[s, m] > 0),
                   key=lambda sm: (-p[sm], -freq[sm], sm[0] * M + sm[1]))
    kept = []
    for s, m in cands:
        if len(kept) < width and all(abs(W_dec[s, m] @ W_dec[a, b]) < tau for a, b in kept):
            kept.append((s, m))
    assert list(zip(seed_W.tolist(), latent_W.tolist())) == kept
    for w, (s, m) in enumerate(kept):
        np.testing.assert_array_equal(params["W_dec"][w], params_S["W_dec"][s, m])
        np.testing.assert_array_equal(params["W_enc"][:, w], params_S["W_enc"][s, :, m])
        assert params["b_enc"][w] == params_S["b_enc"][s, m]
    np.testing.assert_allclose(params["b_dec"], params_S["b_dec"].mean(0), rtol=1e-6)


def _sparse_data(rng, W_dec_MxD, n, k):
    """x = codes @ W_dec with k active latents per row (values in [1, 2]); and the true supports."""
    M = len(W_dec_MxD)
    support_NxK = np.stack([rng.choice(M, k, replace=False) for _ in range(n)])
    codes = np.zeros((n, M), np.float32)
    np.put_along_axis(codes, support_NxK, rng.uniform(1, 2, (n, k)), axis=1)
    return (codes @ W_dec_MxD).astype(np.float32), support_NxK


def _support_recall(params, x, support_NxK, cfg):
    """Fraction of the true active latents that the SAE's TopK code selects (numpy forward)."""
    acts = _np_code(params, x, cfg)
    return np.mean([np.isin(support_NxK[n], np.flatnonzero(acts[n] > 0)).mean() for n in range(len(x))])


def test_refit_encoder_keeps_decoder_and_recovers_sparse_code():
    rng = np.random.default_rng(9)
    M, D, k = 24, 16, 3
    W_dec = rng.normal(size=(M, D)).astype(np.float32)
    W_dec /= np.linalg.norm(W_dec, axis=-1, keepdims=True)
    x, _ = _sparse_data(rng, W_dec, 4096, k)
    x_test, support = _sparse_data(rng, W_dec, 512, k)
    cfg = sae.SAEConfig(d_in=D, d_sae=M, k=k, aux_k=0)
    init = {"W_dec": W_dec, "W_enc": 0.3 * rng.normal(size=(D, M)).astype(np.float32),
            "b_enc": np.zeros(M, np.float32), "b_dec": np.zeros(D, np.float32)}
    tcfg = TrainConfig(lr=3e-2, warmup_steps=20, batch_size=128, num_steps=400, n_seeds=1)
    out = analysis.refit_encoder(init, cfg, ArraySource(x).batches(128, seed=0), tcfg)
    assert out["W_dec"].dtype == W_dec.dtype and out["W_dec"].tobytes() == W_dec.tobytes()
    # Reference: the matched filter W_enc = W_decᵀ, the encoder that knows the dictionary (recall 0.80 here).
    matched = {**init, "W_enc": W_dec.T.copy()}
    before, after, best = (_support_recall(p, x_test, support, cfg) for p in (init, out, matched))
    assert before < 0.2 and after > 0.95 * best, (before, after, best)
    fvu = lambda p: np.sum((x_test - _np_recon(p, _np_code(p, x_test, cfg))) ** 2) / np.sum(  # noqa: E731
        (x_test - x_test.mean(0)) ** 2)
    assert fvu(out) < 0.5 * fvu(init)
    frozen = analysis.refit_encoder(init, cfg, ArraySource(x).batches(128, seed=0),
                                    TrainConfig(lr=1e-2, num_steps=5, batch_size=128, n_seeds=1),
                                    frozen=("W_dec", "b_dec"))
    assert frozen["b_dec"].tobytes() == init["b_dec"].tobytes() and not np.array_equal(frozen["W_enc"], init["W_enc"])


def test_stability_by_tau_against_a_loop():
    """Per-τ summary over alive latents, against a loop that counts latent by latent."""
    rng = np.random.default_rng(3)
    S, M = 4, 12
    p_by_tau = {t: rng.integers(0, S, (S, M)) / (S - 1) for t in (0.5, 0.9)}
    alive = rng.random((S, M)) > 0.3
    got = analysis.stability_by_tau(p_by_tau, alive, stable_min=2 / 3)  # a level of p: `>=` matters
    assert list(got) == ["0.5", "0.9"]
    for t, p in p_by_tau.items():
        vals = [p[s, m] for s in range(S) for m in range(M) if alive[s, m]]
        hist = [0] * S
        for v in vals:
            hist[round(v * (S - 1))] += 1
        want = {"mean": sum(vals) / len(vals), "frac_stable": sum(v >= 2 / 3 for v in vals) / len(vals),
                "frac_p1": sum(v == 1 for v in vals) / len(vals), "frac_p0": sum(v == 0 for v in vals) / len(vals)}
        for k, v in want.items():
            assert got[str(t)][k] == pytest.approx(v), k
        assert got[str(t)]["hist"] == hist
    with pytest.raises(ValueError, match="0 alive"):
        analysis.stability_by_tau(p_by_tau, np.zeros((S, M), bool), 0.5)

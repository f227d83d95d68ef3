"""Matryoshka BatchTopK: prefix MSEs vs a numpy brute force, gradients vs finite differences, the trainer's
vmapped step, serving a prefix through JumpReLU, and recovery of a planted hierarchy by the first prefix."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsae import matryoshka, sae, train


def _dense_code(seed, B, M, D, density=0.4):
    rng = np.random.default_rng(seed)
    acts = rng.uniform(0.0, 2.0, (B, M)) * (rng.random((B, M)) < density)
    W = rng.standard_normal((M, D))
    b = rng.standard_normal(D)
    x = rng.standard_normal((B, D))
    return acts, W, b, x


# --- independent numpy references (float64) ---------------------------------------------------------
def np_prefix_mse(acts, W, b, x, widths):
    """Brute force: each prefix's reconstruction built from scratch, token by token."""
    B, D = x.shape
    out = np.zeros(len(widths))
    for p, m in enumerate(widths):
        for t in range(B):
            x_hat = b + sum(acts[t, i] * W[i] for i in range(m))
            out[p] += np.sum((x_hat - x[t]) ** 2)
    return out / (B * D)


def np_batchtopk_acts(params, x, k):
    """BatchTopK over the whole batch, encoder reading x − b_dec."""
    pre = np.maximum((x - params["b_dec"]) @ params["W_enc"] + params["b_enc"], 0.0)
    flat = pre.ravel()
    keep = np.argsort(-flat, kind="stable")[: x.shape[0] * k]
    acts = np.zeros_like(flat)
    acts[keep] = flat[keep]
    return acts.reshape(pre.shape)


def _np(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


@pytest.mark.parametrize("widths,tile", [((9,), 0), ((1, 9), 4), ((2, 5, 9), 1)])
def test_prefix_mse_matches_numpy_brute_force(widths, tile):
    acts, W, b, x = _dense_code(0, 6, 9, 4)  # tile 4 -> two row tiles of 3; tile 1 -> six of 1
    f32 = [a.astype(np.float32) for a in (acts, W, b, x)]
    mse_P, r_BxD = jax.jit(matryoshka.prefix_mse, static_argnums=(4, 5))(*f32, widths, tile)
    np.testing.assert_allclose(mse_P, np_prefix_mse(acts, W, b, x, widths), rtol=1e-5)
    np.testing.assert_allclose(r_BxD, b + acts @ W - x, rtol=1e-5, atol=1e-5)
    weights = tuple(np.linspace(0.5, 2.0, len(widths)))
    cfg = matryoshka.MatryoshkaConfig(widths, weights, tile)
    loss, _, _ = matryoshka.matryoshka_mse(*f32, cfg)
    np.testing.assert_allclose(loss, np.dot(weights, np_prefix_mse(acts, W, b, x, widths)), rtol=1e-5)
    loss_mean, _, _ = matryoshka.matryoshka_mse(*f32, matryoshka.MatryoshkaConfig(widths))
    np.testing.assert_allclose(loss_mean, np.mean(np_prefix_mse(acts, W, b, x, widths)), rtol=1e-5)


def test_prefix_mse_gradients_match_finite_differences():
    """Every input's gradient, both outputs weighted by arbitrary cotangents (negative ones too), against central
    differences of the float64 brute force (exact up to rounding: the loss is quadratic in each input)."""
    B, M, D, widths = 6, 8, 3, (2, 3, 8)
    acts, W, b, x = _dense_code(1, B, M, D)
    rng = np.random.default_rng(2)
    ct_P, ct_r = rng.standard_normal(len(widths)), rng.standard_normal((B, D))

    def np_scalar(acts, W, b, x):
        return np.dot(ct_P, np_prefix_mse(acts, W, b, x, widths)) + np.sum(ct_r * (b + acts @ W - x))

    def jax_scalar(acts, W, b, x):
        mse_P, r_BxD = matryoshka.prefix_mse(acts, W, b, x, widths, 4)  # two row tiles of 3
        return jnp.dot(ct_P.astype(np.float32), mse_P) + jnp.sum(ct_r.astype(np.float32) * r_BxD)

    args = [acts, W, b, x]
    grads = jax.jit(jax.grad(jax_scalar, argnums=(0, 1, 2, 3)))(*(a.astype(np.float32) for a in args))
    eps = 1e-4
    for i, (name, g) in enumerate(zip(("acts", "W_dec", "b_dec", "x"), grads)):
        fd = np.zeros_like(args[i])
        for j in np.ndindex(args[i].shape):
            up, dn = [a.copy() for a in args], [a.copy() for a in args]
            up[i][j] += eps
            dn[i][j] -= eps
            fd[j] = (np_scalar(*up) - np_scalar(*dn)) / (2 * eps)
        np.testing.assert_allclose(g, fd, rtol=1e-4, atol=1e-5, err_msg=name)


def _params(cfg, seed):
    p = sae.init(jax.random.key(seed), cfg)
    return {**p, "b_dec": jnp.linspace(-0.5, 0.5, cfg.d_in), "b_enc": jnp.linspace(-0.2, 0.1, cfg.d_sae)}


def test_loss_fn_matches_numpy_and_autodiff_brute_force():
    """The trainer's loss: value against numpy (BatchTopK once over all latents, then every prefix from scratch);
    gradients against autodiff of a jnp loop that rebuilds each prefix with its own matmul."""
    cfg = sae.SAEConfig(d_in=5, d_sae=12, activation="batchtopk", k=3, aux_k=0)
    mcfg = matryoshka.MatryoshkaConfig(widths=(3, 7, 12), weights=(1.0, 0.5, 2.0))
    params = _params(cfg, 0)
    x = jax.random.normal(jax.random.key(1), (16, 5))
    loss_fn = matryoshka.make_loss_fn(cfg, mcfg)
    (loss, m), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, x, None)

    p64, x64 = _np(params), np.asarray(x, np.float64)
    acts = np_batchtopk_acts(p64, x64, 3)
    mse = np_prefix_mse(acts, p64["W_dec"], p64["b_dec"], x64, mcfg.widths)
    np.testing.assert_allclose(loss, np.dot(mcfg.weights, mse), rtol=1e-5)
    var = np.sum((x64 - x64.mean(0)) ** 2)
    for p in range(3):
        np.testing.assert_allclose(m[f"fvu_p{p + 1}"], mse[p] * x64.size / var, rtol=1e-5)
    np.testing.assert_allclose(m["mse"], mse[-1], rtol=1e-5)
    np.testing.assert_allclose(m["l0"], 3.0)
    np.testing.assert_allclose(m["l0_p1"], np.mean(np.sum(acts[:, :3] > 0, -1)))

    def brute(params):
        acts = sae.encode(params, x, cfg)
        return sum(w * jnp.mean((params["b_dec"] + acts[:, :k] @ params["W_dec"][:k] - x) ** 2)
                   for w, k in zip(mcfg.weights, mcfg.widths))

    want = jax.jit(jax.grad(brute))(params)
    assert float(jnp.sum(jnp.abs(want["W_enc"]))) > 0
    for key in want:
        np.testing.assert_allclose(grads[key], want[key], rtol=1e-4, atol=1e-6, err_msg=key)


def test_single_prefix_is_the_batchtopk_loss():
    """widths = (d_sae,) with AuxK on: loss, metrics and gradients are `sae.loss` of the BatchTopK SAE."""
    cfg = sae.SAEConfig(d_in=6, d_sae=20, activation="batchtopk", k=3, aux_k=6)
    params = _params(cfg, 3)
    x = jax.random.normal(jax.random.key(4), (16, 6))
    dead = jnp.arange(20) % 3 == 0
    (l_m, m_m), g_m = jax.jit(jax.value_and_grad(matryoshka.make_loss_fn(cfg), has_aux=True))(params, x, dead)
    (l_b, m_b), g_b = jax.jit(jax.value_and_grad(sae.loss, has_aux=True), static_argnums=2)(params, x, cfg, dead)
    np.testing.assert_allclose(l_m, l_b, rtol=1e-5)
    assert float(m_m["aux"]) > 0
    for key in ("mse", "aux", "l0", "fvu"):
        np.testing.assert_allclose(m_m[key], m_b[key], rtol=1e-5, err_msg=key)
    for key in g_b:
        np.testing.assert_allclose(g_m[key], g_b[key], rtol=1e-4, atol=1e-6, err_msg=key)


def test_seed_vmap_matches_per_seed_loop():
    cfg = sae.SAEConfig(d_in=5, d_sae=16, activation="batchtopk", k=2, aux_k=4)
    loss_fn = matryoshka.make_loss_fn(cfg, matryoshka.MatryoshkaConfig(widths=(4, 16)))
    params_S = jax.vmap(lambda k: sae.init(k, cfg))(jax.random.split(jax.random.key(0), 3))
    x = jax.random.normal(jax.random.key(1), (12, 5))
    dead_SxM = jnp.zeros((3, 16), bool).at[:, ::2].set(True)
    grad_fn = jax.jit(jax.grad(lambda p, d: loss_fn(p, x, d)[0]))
    g_S = jax.jit(jax.vmap(grad_fn))(params_S, dead_SxM)
    for s in range(3):
        g = grad_fn(jax.tree.map(lambda a: a[s], params_S), dead_SxM[s])
        for key in g:
            np.testing.assert_allclose(g_S[key][s], g[key], rtol=1e-4, atol=1e-6, err_msg=key)


def test_prefix_mse_never_materialises_PxBxD():
    """XLA's buffer assignment: with row tiles the gradient's temporaries stay well below one [P, B, D] tensor
    of prefix residuals (they hold [B, M] d(acts), a few [B, D] and P·tile·D floats)."""
    B, M, D, widths = 512, 64, 64, tuple(range(4, 65, 4))
    acts, W, b, x = (a.astype(np.float32) for a in _dense_code(5, B, M, D))
    g = jax.jit(jax.grad(lambda a, W, b: matryoshka.prefix_mse(a, W, b, x, widths, 64)[0].sum(), argnums=(0, 1, 2)))
    assert g.lower(acts, W, b).compile().memory_analysis().temp_size_in_bytes < len(widths) * B * D * 4 / 3


# --- serving ---------------------------------------------------------------------------------------------
def test_truncated_jumprelu_serves_the_prefix():
    """After `batchtopk_to_jumprelu`, the SAE cut to width m gives the prefix reconstruction of the full one."""
    cfg = sae.SAEConfig(d_in=6, d_sae=24, activation="batchtopk", k=4)
    params = _params(cfg, 6)
    x = jax.random.normal(jax.random.key(7), (256, 6))
    jp, jcfg = sae.batchtopk_to_jumprelu(params, cfg, x, batch_size=64)
    acts = sae.encode(jp, x, jcfg)
    for m in (1, 5, 24):
        cut, cut_cfg = matryoshka.truncate_params(jp, jcfg, m)
        assert cut_cfg.d_sae == m and cut["W_dec"].shape == (m, 6) and cut["threshold"].shape == (m,)
        want = np.asarray(acts)[:, :m] @ np.asarray(jp["W_dec"])[:m] + np.asarray(jp["b_dec"])
        np.testing.assert_allclose(sae.apply(cut, x, cut_cfg), want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(matryoshka.prefix_recon(jp, acts, jcfg, m), want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(matryoshka.truncate(acts, m), np.asarray(acts)[:, :m])


def test_bad_inputs_raise():
    M = matryoshka.MatryoshkaConfig
    with pytest.raises(ValueError, match="strictly increasing"):
        M(widths=(4, 4, 8))
    with pytest.raises(ValueError, match="positive integers"):
        M(widths=(0, 8))
    with pytest.raises(ValueError, match="one weight per prefix"):
        M(widths=(4, 8), weights=(1.0,))
    with pytest.raises(ValueError, match="not all zero"):
        M(widths=(4, 8), weights=(0.0, 0.0))
    cfg = sae.SAEConfig(d_in=3, d_sae=8, activation="batchtopk", k=2)
    with pytest.raises(ValueError, match="d_sae=8.*\\(4, 6\\)"):
        matryoshka.make_loss_fn(cfg, M(widths=(4, 6)))
    with pytest.raises(ValueError, match="batchtopk"):
        matryoshka.make_loss_fn(dataclasses.replace(cfg, activation="topk"))
    with pytest.raises(ValueError, match="batchtopk_to_jumprelu"):
        matryoshka.truncate_params(sae.init(jax.random.key(0), cfg), cfg, 4)
    with pytest.raises(ValueError, match="1..d_sae=8, got 9"):
        matryoshka.truncate(jnp.zeros((2, 8)), 9)
    acts, W, b, x = _dense_code(0, 4, 8, 3)
    with pytest.raises(ValueError, match="shapes disagree"):
        matryoshka.prefix_mse(acts, W[:, :2], b, x, (8,))


# --- training --------------------------------------------------------------------------------------------
def _hierarchy(seed, n, D=20, G=4, C=3, p=0.3, p_child=0.9):
    """x = Σ parent_g + child_(g,c): G frequent parent directions, each with C children that fire only with it."""
    rng = np.random.default_rng(seed)
    dirs = rng.standard_normal((G + G * C, D))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    parent_NxG = rng.random((n, G)) < p
    mag_NxG = parent_NxG * rng.uniform(1, 2, (n, G))
    child_NxGC = np.zeros((n, G * C))
    which = rng.integers(0, C, (n, G))
    on = parent_NxG & (rng.random((n, G)) < p_child)
    for g in range(G):
        child_NxGC[np.arange(n), g * C + which[:, g]] = on[:, g] * rng.uniform(1, 2, n)
    return (mag_NxG @ dirs[:G] + child_NxGC @ dirs[G:]).astype(np.float32), dirs[:G]


def _train(sae_cfg, loss_fn, batches, n_seeds=2, lr=1e-2):
    tc = train.TrainConfig(n_seeds=n_seeds, batch_size=batches.shape[1], num_steps=len(batches), lr=lr,
                           warmup_steps=10, dead_after_tokens=10**9)
    state = train.init_state(jax.random.key(0), sae_cfg, tc)
    step = train.make_train_step(sae_cfg, tc, loss_fn)
    history = []
    for batch in batches:
        state, m = step(state, batch)
        history.append(m)
    return state.params, jax.device_get(history)


def test_first_prefix_recovers_the_planted_parents():
    """Parents fire often and each child only with its parent (4 parents × 3 children in D = 20). Trained equally
    (same data, steps, init), the Matryoshka SAE's first G latents explain far more variance than the first G of
    a plain BatchTopK SAE (whose latent order is arbitrary), even than the G plain latents carrying the most
    activation energy, and they point along the parent directions."""
    G, D, M, steps, B = 4, 20, 16, 300, 256
    x, parents_GxD = _hierarchy(0, B * steps + 2048, D=D, G=G)
    batches, x_eval = jnp.asarray(x[: B * steps].reshape(steps, B, D)), jnp.asarray(x[B * steps:])
    sae_cfg = sae.SAEConfig(d_in=D, d_sae=M, activation="batchtopk", k=3, aux_k=0)
    plain, _ = _train(sae_cfg, None, batches)
    mat, hist = _train(sae_cfg, matryoshka.make_loss_fn(sae_cfg, matryoshka.MatryoshkaConfig(widths=(G, M))), batches)
    # the trainer's seed-vmapped step with the Matryoshka loss: per-seed metrics, loss going down
    assert set(hist[-1]) >= {"loss", "mmse", "mse", "fvu", "fvu_p1", "fvu_p2", "l0_p1", "aux", "dead_frac"}
    assert hist[-1]["loss"].shape == (2,)
    assert np.all(np.mean([h["loss"] for h in hist[-10:]], 0) < 0.5 * np.mean([h["loss"] for h in hist[:10]], 0))

    @jax.jit
    def fvu_first_and_best(params):
        acts = sae.encode(params, x_eval, sae_cfg)
        var = jnp.sum((x_eval - x_eval.mean(0)) ** 2)
        first = matryoshka.prefix_recon(params, acts, sae_cfg, G)
        top = jnp.argsort(-jnp.sum(acts**2, 0))[:G]
        best = acts[:, top] @ params["W_dec"][top] + params["b_dec"]
        return jnp.sum((x_eval - first) ** 2) / var, jnp.sum((x_eval - best) ** 2) / var

    fvu_plain, fvu_plain_best = map(np.asarray, jax.vmap(fvu_first_and_best)(plain))
    fvu_mat, _ = map(np.asarray, jax.vmap(fvu_first_and_best)(mat))
    # measured (this data): Matryoshka 0.36, 0.38; plain first-G 0.91, 0.90; plain best-G 0.68, 0.66
    assert np.all(fvu_mat < 0.5), fvu_mat
    assert np.all(fvu_mat < fvu_plain - 0.3), (fvu_mat, fvu_plain)
    assert np.all(fvu_mat < fvu_plain_best - 0.1), (fvu_mat, fvu_plain_best)

    def parent_cos(dec_SxMxD):  # mean over parents of the best |cos| among the first G latents (measured 0.85, 0.86)
        return np.abs(np.asarray(dec_SxMxD[:, :G]) @ parents_GxD.T).max(1).mean(-1)

    assert np.all(parent_cos(mat["W_dec"]) > 0.7), parent_cos(mat["W_dec"])
    assert np.all(parent_cos(mat["W_dec"]) > parent_cos(plain["W_dec"]) + 0.1), parent_cos(plain["W_dec"])


@pytest.mark.slow
def test_matryoshka_ensemble_trains_sharded_like_unsharded():
    """The trainer's step with the Matryoshka loss on a (seed, data, model) = (2, 2, 2) mesh gives the unsharded
    result (the row tiles split the data-sharded batch, the prefix blocks the model-sharded latents)."""
    from jaxsae import sharding

    sae_cfg = sae.SAEConfig(d_in=8, d_sae=32, activation="batchtopk", k=4, aux_k=4)
    tc = train.TrainConfig(n_seeds=2, batch_size=16, num_steps=3, lr=1e-2, warmup_steps=0, dead_after_tokens=32)
    loss_fn = matryoshka.make_loss_fn(sae_cfg, matryoshka.MatryoshkaConfig(widths=(4, 12, 32), tile=4))
    x = jax.random.normal(jax.random.key(5), (16, 8))

    def run(mesh):
        state = train.init_state(jax.random.key(0), sae_cfg, tc)
        step = train.make_train_step(sae_cfg, tc, loss_fn, mesh)
        losses = []
        for _ in range(3):
            state, m = step(state, x)
            losses.append(np.asarray(m["loss"]))
        return state, np.stack(losses)

    state_1, loss_1 = run(None)
    state_8, loss_8 = run(sharding.make_mesh(seed=2, data=2, model=2))
    np.testing.assert_allclose(loss_8, loss_1, rtol=1e-4)
    np.testing.assert_allclose(state_8.params["W_dec"], state_1.params["W_dec"], rtol=1e-3, atol=1e-5)
    assert np.all(loss_1[-1] < loss_1[0])

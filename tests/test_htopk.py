"""HierarchicalTopK: reference vs a numpy brute force, lean custom_vjp vs reference, loss plumbing, memory."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsae import htopk, sae


def _code(seed, B, K, M, D):
    rng = np.random.default_rng(seed)
    vals = -np.sort(-rng.uniform(0.0, 2.0, (B, K)), axis=1).astype(np.float32)
    idx = np.stack([rng.choice(M, K, replace=False) for _ in range(B)]).astype(np.int32)
    W = rng.standard_normal((M, D)).astype(np.float32)
    b = rng.standard_normal(D).astype(np.float32)
    x = rng.standard_normal((B, D)).astype(np.float32)
    return vals, idx, W, b, x


def _numpy_prefix_mse(vals, idx, W, b, x):
    """Brute force: rebuild every prefix reconstruction token by token."""
    B, K = vals.shape
    out = np.zeros(K)
    for j in range(1, K + 1):
        for t in range(B):
            x_hat = b.astype(np.float64) + sum(vals[t, i] * W[idx[t, i]].astype(np.float64) for i in range(j))
            out[j - 1] += np.sum((x_hat - x[t]) ** 2)
    return out / (B * x.shape[1])


@pytest.mark.parametrize("B,K,M,D", [(5, 1, 7, 3), (6, 5, 11, 4)])
def test_reference_matches_numpy_brute_force(B, K, M, D):
    vals, idx, W, b, x = _code(0, B, K, M, D)
    mse_K, r_BxD = htopk.prefix_mse_reference(vals, idx, W, b, x)
    np.testing.assert_allclose(mse_K, _numpy_prefix_mse(vals, idx, W, b, x), rtol=1e-5)
    np.testing.assert_allclose(r_BxD, b + np.einsum("bk,bkd->bd", vals, W[idx]) - x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("K,tile", [(1, 8), (7, 5), (16, 1), (12, 64)])
def test_lean_matches_reference_values_and_grads(K, tile, sparse_backend):
    B, M, D = 12, 40, 6  # row tiles of 6, 4, 1 and 12
    vals, idx, W, b, x = _code(K, B, K, M, D)
    rng = np.random.default_rng(1)
    ct_K = rng.standard_normal(K).astype(np.float32)  # arbitrary prefix weights, negative ones included
    ct_r = rng.standard_normal((B, D)).astype(np.float32)

    def scalar(f):
        def g(vals, W, b, x):
            mse_K, r_BxD = f(vals, idx, W, b, x)
            return jnp.dot(ct_K, mse_K) + jnp.sum(ct_r * r_BxD)
        return g

    lean = scalar(lambda *a: htopk.prefix_mse(*a, tile))
    ref = scalar(htopk.prefix_mse_reference)
    np.testing.assert_allclose(htopk.prefix_mse(vals, idx, W, b, x, tile)[0],
                               htopk.prefix_mse_reference(vals, idx, W, b, x)[0], rtol=1e-5)
    g_lean = jax.jit(jax.grad(lean, argnums=(0, 1, 2, 3)))(vals, W, b, x)
    g_ref = jax.jit(jax.grad(ref, argnums=(0, 1, 2, 3)))(vals, W, b, x)
    for name, a, r in zip(("vals", "W_dec", "b_dec", "x"), g_lean, g_ref):
        np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-5, err_msg=name)


def test_prefix_subset_loss_and_grads():
    B, K, M, D = 8, 10, 30, 5
    vals, idx, W, b, x = _code(3, B, K, M, D)
    J = (1, 4, 10)
    want = np.mean(_numpy_prefix_mse(vals, idx, W, b, x)[np.array(J) - 1])
    for lean in (True, False):
        cfg = htopk.HTopKConfig(prefixes=J, lean=lean, tile=4)
        loss, _, _ = jax.jit(htopk.hierarchical_mse, static_argnums=5)(vals, idx, W, b, x, cfg)
        np.testing.assert_allclose(loss, want, rtol=1e-5)

    def f(lean):
        cfg = htopk.HTopKConfig(J, lean, 4)
        return jax.jit(jax.grad(lambda v, W: htopk.hierarchical_mse(v, idx, W, b, x, cfg)[0], argnums=(0, 1)))(vals, W)

    for a, r in zip(f(True), f(False)):
        np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-6)
    # prefixes beyond the largest j in J get no gradient
    assert np.all(np.asarray(f(True)[0])[:, 10:] == 0)


def test_bad_inputs_raise():
    vals, idx, W, b, x = _code(0, 4, 3, 10, 2)
    with pytest.raises(ValueError, match=r"1\.\.k=3.*\[4\]"):
        htopk.prefix_weights(3, (1, 4))
    with pytest.raises(ValueError, match="distinct"):
        htopk.prefix_weights(3, (2, 2))
    with pytest.raises(ValueError, match="idx_BxK shape"):
        htopk.prefix_mse(vals, idx[:, :2], W, b, x)
    with pytest.raises(ValueError, match="x_BxD"):
        htopk.prefix_mse_reference(vals, idx, W, b, x[:, :1])
    with pytest.raises(ValueError, match="integer"):
        htopk.prefix_mse(vals, idx.astype(np.float32), W, b, x)
    with pytest.raises(ValueError, match="topk"):
        htopk.make_loss_fn(sae.SAEConfig(d_in=2, d_sae=10, activation="relu"))
    with pytest.raises(ValueError, match="1..k=3"):
        htopk.make_loss_fn(sae.SAEConfig(d_in=2, d_sae=10, k=3), htopk.HTopKConfig(prefixes=(5,)))
    with pytest.raises(ValueError, match="truncation j"):
        htopk.truncate(sae.Code(jnp.asarray(vals), jnp.asarray(idx)), 4)


@pytest.mark.parametrize("lean", [True, False])
def test_last_prefix_only_equals_topk_loss(lean):
    """With J = {k} the HierarchicalTopK loss is the plain TopK loss, AuxK included, gradients too."""
    cfg = sae.SAEConfig(d_in=8, d_sae=48, k=6, aux_k=8)
    params = sae.init(jax.random.key(0), cfg)
    params["b_dec"] = jnp.linspace(-1, 1, 8)
    x = jax.random.normal(jax.random.key(1), (32, 8))
    dead = jnp.arange(48) % 3 == 0
    loss_fn = htopk.make_loss_fn(cfg, htopk.HTopKConfig(prefixes=(6,), lean=lean, tile=4))
    (l_h, m_h), g_h = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, x, dead)
    (l_t, m_t), g_t = jax.jit(jax.value_and_grad(sae.loss, has_aux=True), static_argnums=2)(params, x, cfg, dead)
    np.testing.assert_allclose(l_h, l_t, rtol=1e-5)
    assert float(m_h["aux"]) > 0
    for key in ("mse", "aux", "l0", "fvu"):
        np.testing.assert_allclose(m_h[key], m_t[key], rtol=1e-5, err_msg=key)
    for key in g_t:
        np.testing.assert_allclose(g_h[key], g_t[key], rtol=1e-4, atol=1e-6, err_msg=key)


def test_truncation_is_the_prefix_reconstruction():
    cfg = sae.SAEConfig(d_in=6, d_sae=30, k=8)
    params = sae.init(jax.random.key(2), cfg)
    x = jax.random.normal(jax.random.key(3), (10, 6))
    code = sae.encode(params, x, cfg)
    _, mse_K, _ = jax.jit(htopk.hierarchical_mse)(*code, params["W_dec"], params["b_dec"], x)
    vals, idx = np.asarray(code.vals_BxK), np.asarray(code.idx_BxK)
    want = _numpy_prefix_mse(vals, idx, np.asarray(params["W_dec"]), np.asarray(params["b_dec"]), np.asarray(x))
    for j in (1, 3, 8):
        x_hat = sae.decode(params, htopk.truncate(code, j), cfg)
        np.testing.assert_allclose(jnp.mean((x_hat - x) ** 2), want[j - 1], rtol=1e-5)
        np.testing.assert_allclose(mse_K[j - 1], want[j - 1], rtol=1e-5)
        # same as a TopK SAE with k = j: top_k is sorted, so truncation = re-encoding with smaller k
        cfg_j = dataclasses.replace(cfg, k=j)
        np.testing.assert_allclose(sae.apply(params, x, cfg_j), x_hat, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("prefixes", [(), (2, 3, 5)])
def test_fused_autoencode_matches_autodiff_reference(prefixes, sparse_backend):
    """The fused encoder + prefix loss (gradient formed in its forward) against JAX autodiff through `sae.encode`
    (dense top_k VJP) and the B×K×D reference: the loss, every gradient (params and x, the loss scaled by 3 so
    the backward's scaling counts), and the metric outputs, which carry no gradient."""
    cfg = sae.SAEConfig(d_in=6, d_sae=24, k=5)
    h_cfg = htopk.HTopKConfig(prefixes=prefixes, tile=4)
    params = sae.init(jax.random.key(7), cfg)
    params = {**params, "b_dec": jnp.linspace(-0.5, 0.5, 6), "b_enc": jnp.linspace(-0.2, 0.1, 24)}
    x = jax.random.normal(jax.random.key(8), (10, 6))
    J = np.array(prefixes or range(1, 6))

    def fused(params, x):
        loss, mse_K, r, code = htopk.autoencode_hierarchical_mse(params, x, cfg, h_cfg)
        return 3 * loss, (mse_K, r, code)

    def reference(params, x):
        code = sae.encode(params, x, cfg)
        mse_K, r = htopk.prefix_mse_reference(*code, params["W_dec"], params["b_dec"], x)
        return 3 * jnp.mean(mse_K[J - 1]), (mse_K, r, code)

    grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))  # noqa: E731
    (v_f, outs_f), (gp_f, gx_f) = grad(fused)(params, x)
    (v_r, outs_r), (gp_r, gx_r) = grad(reference)(params, x)
    np.testing.assert_allclose(v_f, v_r, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(outs_f), jax.tree.leaves(outs_r)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert float(jnp.sum(jnp.abs(gp_r["W_enc"]))) > 0
    for key in gp_r:
        np.testing.assert_allclose(gp_f[key], gp_r[key], rtol=1e-4, atol=1e-6, err_msg=key)
    np.testing.assert_allclose(gx_f, gx_r, rtol=1e-4, atol=1e-6)
    # the metric outputs are under stop_gradient: no gradient flows back through them
    g_metrics = jax.grad(lambda p: jnp.sum(htopk.autoencode_hierarchical_mse(p, x, cfg, h_cfg)[2]))(params)
    assert all(float(jnp.max(jnp.abs(g))) == 0 for g in jax.tree.leaves(g_metrics))


def test_lean_gradient_never_materialises_BxKxD():
    """XLA's buffer assignment: the lean step's temporaries stay below one B×K×D tensor; the reference's exceed it."""
    B, K, M, D = 256, 128, 256, 64
    vals, idx, W, b, x = _code(4, B, K, M, D)
    bkd_bytes = B * K * D * 4

    def temp_bytes(lean):
        cfg = htopk.HTopKConfig(lean=lean)
        f = jax.grad(lambda v, W, b: htopk.hierarchical_mse(v, idx, W, b, x, cfg)[0], argnums=(0, 1, 2))
        return jax.jit(f).lower(vals, W, b).compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes(True) < bkd_bytes / 4
    assert temp_bytes(False) > bkd_bytes

    # the trainer's fused path, whole-SAE gradient (its [B, M] pre-activations are small here)
    cfg = sae.SAEConfig(d_in=D, d_sae=M, k=K)
    params = sae.init(jax.random.key(0), cfg)
    for lean, ok in ((True, lambda t: t < bkd_bytes / 4), (False, lambda t: t > bkd_bytes)):
        loss_fn = htopk.make_loss_fn(cfg, htopk.HTopKConfig(lean=lean))
        g = jax.jit(jax.grad(lambda p: loss_fn(p, x, None)[0]))
        assert ok(g.lower(params).compile().memory_analysis().temp_size_in_bytes), lean


def test_seed_vmap_matches_per_seed_loop():
    cfg = sae.SAEConfig(d_in=5, d_sae=20, k=4, aux_k=4)
    loss_fn = htopk.make_loss_fn(cfg, htopk.HTopKConfig(tile=3))
    params_S = jax.vmap(lambda k: sae.init(k, cfg))(jax.random.split(jax.random.key(0), 3))
    x = jax.random.normal(jax.random.key(1), (12, 5))
    dead_SxM = jnp.zeros((3, 20), bool).at[:, ::2].set(True)
    grad_fn = jax.jit(jax.grad(lambda p, d: loss_fn(p, x, d)[0]))
    g_S = jax.jit(jax.vmap(grad_fn))(params_S, dead_SxM)
    for s in range(3):
        g = grad_fn(jax.tree.map(lambda a: a[s], params_S), dead_SxM[s])
        for key in g:
            np.testing.assert_allclose(g_S[key][s], g[key], rtol=1e-4, atol=1e-6, err_msg=key)


@pytest.mark.slow
def test_htopk_ensemble_trains_sharded_like_unsharded():
    """The trainer's vmapped step with the HTopK loss: on a (seed, data, model) = (2, 2, 2) mesh it gives
    the unsharded result, and the loss goes down."""
    from jaxsae import sharding, train

    sae_cfg = sae.SAEConfig(d_in=8, d_sae=32, k=4, aux_k=4)
    train_cfg = train.TrainConfig(n_seeds=2, batch_size=16, num_steps=3, lr=1e-2, warmup_steps=0,
                                  dead_after_tokens=32)
    loss_fn = htopk.make_loss_fn(sae_cfg, htopk.HTopKConfig(tile=3))
    x = jax.random.normal(jax.random.key(5), (16, 8))

    def run(mesh):
        state = train.init_state(jax.random.key(0), sae_cfg, train_cfg)
        step = train.make_train_step(sae_cfg, train_cfg, loss_fn, mesh)
        losses = []
        for _ in range(3):
            state, m = step(state, x)
            losses.append(np.asarray(m["loss"]))
        assert set(m) >= {"hmse", "mse", "aux", "fvu_j1", "dead_frac"}
        return state, np.stack(losses)

    state_1, loss_1 = run(None)
    state_8, loss_8 = run(sharding.make_mesh(seed=2, data=2, model=2))
    np.testing.assert_allclose(loss_8, loss_1, rtol=1e-4)
    np.testing.assert_allclose(state_8.params["W_dec"], state_1.params["W_dec"], rtol=1e-3, atol=1e-5)
    assert np.all(loss_1[-1] < loss_1[0])

"""jaxsae.sae against a separately written float64 numpy reference (values, finite-difference gradients)."""
import dataclasses

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsae import sae

D, M, B, K = 6, 16, 10, 3


# ---------------------------------------------------------------- numpy reference
def np_pre(p, x, bias=True):
    b_dec = p["b_dec"] if bias else 0.0
    return (x - b_dec) @ p["W_enc"] + p["b_enc"]


def np_acts(p, x, act, k, bias=True):
    """Dense [B, M] activations, by explicit loops where the selection logic matters."""
    pre = np_pre(p, x, bias)
    acts = np.zeros_like(pre)
    if act == "topk":
        for b in range(pre.shape[0]):
            order = np.argsort(-pre[b], kind="stable")[:k]
            acts[b, order] = np.maximum(pre[b, order], 0)
    elif act == "batchtopk":
        flat = np.maximum(pre, 0).ravel()
        keep = np.argsort(-flat, kind="stable")[: pre.shape[0] * k]
        acts.ravel()[keep] = flat[keep]
    elif act == "jumprelu":
        acts = np.where(pre > p["threshold"], pre, 0.0)
    else:
        acts = np.maximum(pre, 0)
    return acts


def np_centred_ss(e):
    """Σ_b ‖e_b − ē‖² as Σ_{b,b'} ‖e_b − e_b'‖² / 2B: exactly 0 for equal rows (no rounded mean)."""
    return np.sum((e[:, None] - e[None]) ** 2) / (2 * e.shape[0])


def np_aux(p, x, cfg, dead, e):
    """AuxK: FVU of residual e fitted by each token's top aux_k dead pre-activations (no b_dec); 0 if e is constant."""
    pre = np_pre(p, x, cfg.decoder_bias)
    e_hat = np.zeros_like(e)
    dead_ids = np.flatnonzero(dead)[: cfg.aux_max_dead]
    for b in range(x.shape[0]):
        top = dead_ids[np.argsort(-pre[b, dead_ids], kind="stable")[: cfg.aux_k]]
        e_hat[b] = np.maximum(pre[b, top], 0) @ p["W_dec"][top]
    var = np_centred_ss(e)
    if var == 0:
        return 0.0
    scale = min(dead.sum() / min(cfg.aux_k, cfg.aux_max_dead), 1.0)
    return scale * np.sum((e - e_hat) ** 2) / var


def np_loss(p, x, cfg, dead=None):
    """(total without aux, mse, aux, l0, residual) with the conventions of the sae docstring."""
    bias = cfg.decoder_bias
    acts = np_acts(p, x, cfg.activation, cfg.k, bias)
    # Row by row, so equal rows of x give bitwise-equal rows of e (a blocked matmul need not).
    e = x - np.stack([a @ p["W_dec"] for a in acts]) - (p["b_dec"] if bias else 0.0)
    mse = np.mean(e**2)
    total = mse
    if cfg.activation == "relu":
        total += cfg.l1_coeff * np.mean(acts @ np.linalg.norm(p["W_dec"], axis=1)) / cfg.d_in
    if cfg.activation == "jumprelu":
        total += cfg.l0_coeff * np.mean(np.sum(acts != 0, 1)) / cfg.d_in
    aux = np_aux(p, x, cfg, dead, e) if dead is not None and dead.any() else 0.0
    return total, mse, aux, np.mean(np.sum(acts != 0, 1)), e


def np_grads_fd(p, x, cfg, dead=None, eps=1e-6):
    """Central finite differences of the reference loss, the AuxK residual held fixed (stop-gradient)."""
    e_fixed = np_loss(p, x, cfg)[-1]

    def f(q):
        aux = np_aux(q, x, cfg, dead, e_fixed) if dead is not None else 0.0
        return np_loss(q, x, cfg)[0] + cfg.aux_coeff * aux

    grads = {}
    for name, v in p.items():
        g = np.zeros_like(v)
        for i in np.ndindex(v.shape):
            hi, lo = {**p, name: v.copy()}, {**p, name: v.copy()}
            hi[name][i] += eps
            lo[name][i] -= eps
            g[i] = (f(hi) - f(lo)) / (2 * eps)
        grads[name] = g
    return grads


def make_params(cfg, seed=0):
    rng = np.random.default_rng(seed)
    W_dec = rng.normal(size=(cfg.d_sae, cfg.d_in))
    W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
    p = {"W_enc": W_dec.T + 0.3 * rng.normal(size=(cfg.d_in, cfg.d_sae)),
         "b_enc": 0.1 * rng.normal(size=cfg.d_sae), "W_dec": W_dec, "b_dec": 0.2 * rng.normal(size=cfg.d_in)}
    if cfg.activation == "jumprelu":
        p["threshold"] = np.abs(0.3 * rng.normal(size=cfg.d_sae))
    return p


def to_jax(p):
    return {k: jnp.asarray(v, jnp.float32) for k, v in p.items()}


def data(seed=1, n=B):
    return np.random.default_rng(seed).normal(size=(n, D))


# ---------------------------------------------------------------- values
@pytest.mark.parametrize("act", sae.ACTIVATIONS)
@pytest.mark.parametrize("bias", [True, False])
def test_encode_decode_loss_match_numpy(act, bias):
    cfg = sae.SAEConfig(d_in=D, d_sae=M, activation=act, k=K, aux_k=4, decoder_bias=bias)
    p, x = make_params(cfg), data()
    if not bias:
        p["b_dec"] = np.zeros(D)
    jp, jx = to_jax(p), jnp.asarray(x, jnp.float32)
    ref_acts = np_acts(p, x, act, K, bias)
    code = sae.encode(jp, jx, cfg)
    if act == "topk":
        dense = np.zeros((B, M))
        np.put_along_axis(dense, np.asarray(code.idx_BxK), np.asarray(code.vals_BxK), axis=1)
        assert np.all(np.diff(np.asarray(code.vals_BxK), axis=1) <= 0), "TopK code must be sorted descending"
    else:
        dense = np.asarray(code)
    np.testing.assert_allclose(dense, ref_acts, atol=1e-5)
    x_hat_ref = ref_acts @ p["W_dec"] + (p["b_dec"] if bias else 0)
    np.testing.assert_allclose(sae.apply(jp, jx, cfg), x_hat_ref, atol=1e-5)
    dead = np.arange(M) % 3 == 0
    total, metrics = sae.loss(jp, jx, cfg, dead_M=jnp.asarray(dead))
    r_total, r_mse, r_aux, r_l0, _ = np_loss(p, x, cfg, dead)
    np.testing.assert_allclose(metrics["mse"], r_mse, rtol=1e-5)
    np.testing.assert_allclose(metrics["aux"], r_aux, rtol=1e-5)
    np.testing.assert_allclose(metrics["l0"], r_l0, rtol=1e-6)
    np.testing.assert_allclose(total, r_total + cfg.aux_coeff * r_aux, rtol=1e-5)


def test_decoder_bias_false_gives_zero_output_without_firing():
    cfg = sae.SAEConfig(d_in=D, d_sae=M, activation="relu", decoder_bias=False)
    p = to_jax(make_params(cfg))
    p["b_enc"] = jnp.full((M,), -100.0)
    assert np.all(np.asarray(sae.apply(p, jnp.asarray(data(), jnp.float32), cfg)) == 0)


# ---------------------------------------------------------------- gradients
@pytest.mark.parametrize("act", ["topk", "batchtopk", "relu", "jumprelu"])
@pytest.mark.parametrize("with_dead", [False, True])
def test_gradients_match_finite_differences(act, with_dead):
    cfg = sae.SAEConfig(d_in=D, d_sae=M, activation=act, k=K, aux_k=4, aux_coeff=0.5)
    p, x = make_params(cfg, seed=2), data(seed=3)
    dead = (np.arange(M) % 4 == 1) if with_dead else None
    jd = None if dead is None else jnp.asarray(dead)
    g = jax.grad(lambda q: sae.loss(q, jnp.asarray(x, jnp.float32), cfg, jd)[0])(to_jax(p))
    ref = np_grads_fd(p, x, cfg, dead)
    if act == "jumprelu":
        # The threshold gradient is the straight-through estimate, not a derivative: check it by formula.
        ref["threshold"] = np_jumprelu_threshold_grad(p, x, cfg)
        if with_dead:
            return  # aux adds nothing to the threshold, and the rest is covered without dead latents
    for name in ref:
        scale = max(1.0, np.abs(ref[name]).max())
        np.testing.assert_allclose(np.asarray(g[name]), ref[name], atol=2e-4 * scale, err_msg=name)


def np_jumprelu_threshold_grad(p, x, cfg):
    """dL/dθ_m = Σ_b rect((z−θ)/ε)/ε · (−θ_m · ∂L/∂a_bm − l0_coeff/(B·D))."""
    z = np_pre(p, x)
    theta, eps = p["threshold"], cfg.jumprelu_bandwidth
    acts = np.where(z > theta, z, 0.0)
    x_hat = acts @ p["W_dec"] + p["b_dec"]
    n = x.shape[0]
    dL_dacts = (2 * (x_hat - x) / (n * cfg.d_in)) @ p["W_dec"].T
    rect = (np.abs(z - theta) < eps / 2) / eps
    return np.sum(rect * (-theta * dL_dacts - cfg.l0_coeff / (n * cfg.d_in)), axis=0)


def test_jumprelu_threshold_gradient_nonzero_inside_window():
    cfg = sae.SAEConfig(d_in=D, d_sae=M, activation="jumprelu", jumprelu_bandwidth=0.5)
    p, x = make_params(cfg, seed=4), data(seed=5)
    g = jax.grad(lambda q: sae.loss(q, jnp.asarray(x, jnp.float32), cfg)[0])(to_jax(p))
    ref = np_jumprelu_threshold_grad(p, x, cfg)
    assert np.abs(ref).max() > 0
    np.testing.assert_allclose(g["threshold"], ref, atol=1e-5 * max(1, np.abs(ref).max()))


def dense_topk(W_enc, b_enc, W_dec, b_dec, x):
    """(x̂, ReLU'd top-K values) of a TopK SAE through a dense [B, M] code: plain jax autodiff applies."""
    pre = (x - b_dec) @ W_enc + b_enc
    vals, idx = jax.lax.top_k(pre, K)
    acts = jnp.zeros_like(pre).at[jnp.arange(x.shape[0])[:, None], idx].set(jax.nn.relu(vals))
    return acts @ W_dec + b_dec, jax.nn.relu(vals)


def test_topk_custom_vjp_equals_plain_autodiff(sparse_backend):
    """The sparse backward against jax autodiff of a dense TopK written here (also d/dx and d/dvals)."""
    cfg = sae.SAEConfig(d_in=D, d_sae=M, k=K)
    p, x = to_jax(make_params(cfg, seed=6)), jnp.asarray(data(seed=7, n=33), jnp.float32)
    w_vals = jnp.asarray(np.random.default_rng(8).normal(size=(33, K)), jnp.float32)

    def custom(W_enc, b_enc, W_dec, b_dec, x):
        x_hat, code = sae._topk_autoencode(W_enc, b_enc, W_dec, b_dec, x, K)
        return x_hat, code.vals_BxK

    def objective(f):
        def obj(*args):
            x_hat, vals = f(*args)
            return jnp.sum((x_hat - 0.5 * args[-1]) ** 2) + jnp.sum(w_vals * vals)
        return obj

    args = (p["W_enc"], p["b_enc"], p["W_dec"], p["b_dec"], x)
    want = jax.jit(jax.grad(objective(dense_topk), argnums=range(5)))(*args)
    got = jax.jit(jax.grad(objective(custom), argnums=range(5)))(*args)
    for name, g, w in zip(["W_enc", "b_enc", "W_dec", "b_dec", "x"], got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * float(jnp.abs(w).max()), err_msg=name)


def test_topk_loss_fused_gradient_equals_plain_autodiff(sparse_backend):
    """`loss`'s TopK MSE, whose forward forms the gradient, against autodiff of the dense TopK's MSE (also d/dx)."""
    cfg = sae.SAEConfig(d_in=D, d_sae=M, k=K)
    p, x = to_jax(make_params(cfg, seed=12)), jnp.asarray(data(seed=13, n=21), jnp.float32)

    def dense_mse(p, x):
        return jnp.mean((dense_topk(p["W_enc"], p["b_enc"], p["W_dec"], p["b_dec"], x)[0] - x) ** 2)

    (got_loss, metrics), got = jax.jit(jax.value_and_grad(lambda p, x: sae.loss(p, x, cfg), argnums=(0, 1),
                                                          has_aux=True))(p, x)
    want_loss, want = jax.jit(jax.value_and_grad(dense_mse, argnums=(0, 1)))(p, x)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["mse"], want_loss, rtol=1e-5)
    for name, g, w in [*((n, got[0][n], want[0][n]) for n in p), ("x", got[1], want[1])]:
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * float(jnp.abs(w).max()), err_msg=name)


@pytest.mark.parametrize("shared_x", [True, False])
def test_topk_gradients_under_vmap_equal_per_seed(shared_x, sparse_backend):
    """The seed-folding vmap rule: vmapped gradients (nested vmap for a shared batch) equal a loop over seeds."""
    cfg = sae.SAEConfig(d_in=D, d_sae=M, k=K, aux_k=4)
    S = 4
    params = jax.tree.map(lambda *a: jnp.stack(a), *[to_jax(make_params(cfg, seed=s)) for s in range(S)])
    xs = jnp.asarray(np.random.default_rng(11).normal(size=(S, 9, D)), jnp.float32)
    dead = jnp.arange(M) < 3

    def grads(p, x):
        return jax.grad(lambda p, x: sae.loss(p, x, cfg, dead)[0], argnums=(0, 1))(p, x)

    if shared_x:  # vmap(vmap(.)) over a 2×2 grid of seeds, the batch broadcast
        two = jax.tree.map(lambda a: a.reshape((2, 2) + a.shape[1:]), params)
        got = jax.jit(jax.vmap(jax.vmap(grads, in_axes=(0, None)), in_axes=(0, None)))(two, xs[0])
        got = jax.tree.map(lambda a: a.reshape((S,) + a.shape[2:]), got)
    else:
        got = jax.jit(jax.vmap(grads))(params, xs)
    grads_one = jax.jit(grads)
    for s in range(S):
        want = grads_one(jax.tree.map(lambda a: a[s], params), xs[0] if shared_x else xs[s])
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(g[s], w, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- AuxK
def test_aux_uses_only_first_aux_max_dead_latents():
    cfg = sae.SAEConfig(d_in=D, d_sae=M, k=K, aux_k=2, aux_max_dead=3)
    p, x = make_params(cfg, seed=9), data(seed=10)
    dead = np.arange(M) % 2 == 0  # 8 dead, only ids 0, 2, 4 are candidates
    _, metrics = sae.loss(to_jax(p), jnp.asarray(x, jnp.float32), cfg, jnp.asarray(dead))
    np.testing.assert_allclose(metrics["aux"], np_loss(p, x, cfg, dead)[2], rtol=1e-5)


def test_aux_zero_and_finite_when_nothing_dead():
    cfg = sae.SAEConfig(d_in=D, d_sae=M, k=K, aux_k=4)
    p, x = to_jax(make_params(cfg)), jnp.asarray(data(), jnp.float32)
    no_dead = jnp.zeros((M,), bool)
    total, metrics = sae.loss(p, x, cfg, no_dead)
    assert float(metrics["aux"]) == 0.0
    g = jax.grad(lambda q: sae.loss(q, x, cfg, no_dead)[0])(p)
    assert all(np.isfinite(np.asarray(v)).all() for v in g.values())
    total_none, _ = sae.loss(p, x, cfg, None)
    np.testing.assert_allclose(total, total_none, rtol=1e-6)


def test_aux_does_not_push_gradient_into_residual():
    """Stop-gradient on e: the aux term changes only the decoder rows of dead latents."""
    cfg = sae.SAEConfig(d_in=D, d_sae=M, k=K, aux_k=4, aux_coeff=1.0)
    p, x = to_jax(make_params(cfg)), jnp.asarray(data(), jnp.float32)
    dead = jnp.arange(M) >= M - 4
    g_all = jax.grad(lambda q: sae.loss(q, x, cfg, dead)[0])(p)
    g_mse = jax.grad(lambda q: sae.loss(q, x, cfg, None)[0])(p)
    d_dec = np.asarray(g_all["W_dec"] - g_mse["W_dec"])
    assert np.abs(d_dec[: M - 4]).max() < 1e-6 and np.abs(d_dec[M - 4 :]).max() > 0


@pytest.mark.parametrize("batch", ["repeated_rows", "zeros_with_biases"])
def test_aux_zero_with_finite_gradients_when_residual_has_no_variance(batch):
    """Every row the same: the float32 residual variance is rounding noise (it was ~1e-13 and aux ~1e14)."""
    cfg = sae.SAEConfig(d_in=D, d_sae=M, k=K, aux_k=4, aux_coeff=0.5)
    p = make_params(cfg, seed=14)  # non-zero b_enc and b_dec
    x = np.zeros((B, D)) if batch == "zeros_with_biases" else np.tile(data(seed=15)[:1], (B, 1))
    dead = np.arange(M) % 3 == 0
    jx, jdead = jnp.asarray(x, jnp.float32), jnp.asarray(dead)
    total, metrics = sae.loss(to_jax(p), jx, cfg, jdead)
    r_total, _, r_aux, _, e = np_loss(p, x, cfg, dead)
    assert np_centred_ss(e) == 0 and r_aux == 0.0  # the reference sees the exact zero variance
    assert float(metrics["aux"]) == 0.0
    np.testing.assert_allclose(total, r_total, rtol=1e-5)
    g = jax.grad(lambda q: sae.loss(q, jx, cfg, jdead)[0])(to_jax(p))
    ref = np_grads_fd(p, x, cfg, dead)
    for name in ref:
        scale = max(1.0, np.abs(ref[name]).max())
        np.testing.assert_allclose(np.asarray(g[name]), ref[name], atol=2e-4 * scale, err_msg=name)


def test_aux_uses_exactly_aux_k_latents_when_pre_activations_tie():
    """Dead latents 2..5 tie at the aux_k-th value for every token: only the lowest ids may join latent 1."""
    cfg = sae.SAEConfig(d_in=D, d_sae=M, k=K, aux_k=3, aux_coeff=1.0)
    p = make_params(cfg, seed=16)
    v_D = np.array([1.0, 0.5, 1.0, 0.0, 0.5, 1.0])  # dyadic weights, integer x: every dot product is exact
    p["W_enc"][:, :8] = -v_D[:, None]
    p["W_enc"][:, 1] = 2 * v_D
    p["W_enc"][:, 2:6] = v_D[:, None]
    p["b_enc"][:8], p["b_dec"][:] = 0.0, 0.0
    x = np.random.default_rng(17).integers(1, 4, (B, D)).astype(np.float64)
    dead = np.arange(M) < 8
    e = data(seed=18)
    jp, jx, jdead = to_jax(p), jnp.asarray(x, jnp.float32), jnp.asarray(dead)
    aux = sae.aux_loss(jp, jx, jnp.asarray(e, jnp.float32), jdead, cfg)
    np.testing.assert_allclose(aux, np_aux(p, x, cfg, dead, e), rtol=1e-5)
    g = jax.grad(lambda q: sae.aux_loss(q, jx, jnp.asarray(e, jnp.float32), jdead, cfg))(jp)
    used = np.flatnonzero(np.abs(np.asarray(g["W_dec"])).max(1) > 0)
    np.testing.assert_array_equal(used, [1, 2, 3])  # latent 1, then the two lowest ids of the tie


# ---------------------------------------------------------------- decoder constraints
def test_project_and_normalize_decoder():
    rng = np.random.default_rng(0)
    p = to_jax({"W_dec": rng.normal(size=(M, D)) * 3, "W_enc": np.zeros((D, M))})
    g = to_jax({"W_dec": rng.normal(size=(M, D)), "W_enc": rng.normal(size=(D, M))})
    proj = sae.project_decoder_grads(p, g)
    np.testing.assert_allclose(np.sum(np.asarray(p["W_dec"]) * np.asarray(proj["W_dec"]), 1), 0, atol=1e-5)
    W, G = np.asarray(p["W_dec"], np.float64), np.asarray(g["W_dec"], np.float64)
    ref = np.stack([G[m] - (G[m] @ W[m]) / (W[m] @ W[m]) * W[m] for m in range(M)])
    np.testing.assert_allclose(proj["W_dec"], ref, atol=1e-5)
    np.testing.assert_array_equal(proj["W_enc"], g["W_enc"])
    np.testing.assert_allclose(np.linalg.norm(sae.normalize_decoder(p)["W_dec"], axis=1), 1, rtol=1e-6)


def test_init_layout():
    cfg = sae.SAEConfig(d_in=D, d_sae=M, activation="jumprelu")
    b_dec = jnp.arange(D, dtype=jnp.float32)
    p = sae.init(jax.random.key(0), cfg, b_dec)
    assert {k: v.shape for k, v in p.items()} == {"W_enc": (D, M), "b_enc": (M,), "W_dec": (M, D),
                                                  "b_dec": (D,), "threshold": (M,)}
    np.testing.assert_allclose(np.linalg.norm(p["W_dec"], axis=1), 1, rtol=1e-6)
    np.testing.assert_array_equal(p["W_enc"], p["W_dec"].T)
    np.testing.assert_array_equal(p["b_dec"], b_dec)


# ---------------------------------------------------------------- TopK decode never forms [B, M]
def _all_eqns(jaxpr):
    """Every equation of a jaxpr, those in nested jaxprs (loops, custom rules) included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _all_eqns(sub)


def _shapes(eqn):
    return [tuple(v.aval.shape) for v in [*eqn.invars, *eqn.outvars] if hasattr(v.aval, "shape")]


def test_topk_decode_and_train_gradient_never_form_dense_BxM():
    B, M = 5, 101  # B differs from D and D + 1, so no weight ([D, M], or [D + 1, M] with b_enc) passes for [B, M]
    cfg = sae.SAEConfig(d_in=D, d_sae=M, k=K)
    p = sae.init(jax.random.key(0), cfg)
    idx = jnp.zeros((B, K), jnp.int32)
    f = lambda p, vals: jnp.sum(sae.decode(p, sae.Code(vals, idx), cfg) ** 2)  # noqa: E731
    eqns = list(_all_eqns(jax.make_jaxpr(jax.grad(f, argnums=(0, 1)))(p, jnp.ones((B, K))).jaxpr))
    bad = [e for e in eqns if any(s[-2:] == (B, M) or s[-3:] == (B, K, D) for s in _shapes(e))]
    assert not bad, bad
    # Train path: the only matmul touching [B, M] is the forward encoder of the platform switch's batched
    # branch (XLA:CPU's fused kernel has none); a dense backward would add two.
    g = lambda p: sae.loss(p, jnp.ones((B, D)), cfg)[0]  # noqa: E731
    dots = [e for e in _all_eqns(jax.make_jaxpr(jax.grad(g))(p).jaxpr) if e.primitive.name == "dot_general"]
    assert sum(any(s[-2:] == (B, M) for s in _shapes(e)) for e in dots) == 1


# ---------------------------------------------------------------- the encoders: XLA:CPU's fused kernel, the batched one
@pytest.mark.parametrize("shared", [True, False])
def test_encoders_equal_numpy_topk(shared):
    S, B_, M_ = 3, 256, 40
    rng = np.random.default_rng(0)
    W_enc, b_enc = rng.normal(size=(S, D, M_)).astype(np.float32), rng.normal(size=(S, M_)).astype(np.float32)
    W_dec, b_dec = rng.normal(size=(S, M_, D)).astype(np.float32), rng.normal(size=(S, D)).astype(np.float32)
    x = rng.normal(size=(1 if shared else S, B_, D)).astype(np.float32)
    vals, idx = sae._encode_seeds(K, W_enc, b_enc, b_dec, x)
    x_hat, = sae._decode_seeds(False, W_dec, b_dec, vals, idx, x)
    pre = np.einsum("SBD,SDM->SBM", np.broadcast_to(x, (S, B_, D)) - b_dec[:, None], W_enc) + b_enc[:, None]
    want_idx = np.argsort(-pre, axis=-1, kind="stable")[..., :K]
    np.testing.assert_array_equal(idx, want_idx)
    want_vals = np.maximum(np.take_along_axis(pre, want_idx, -1), 0)
    np.testing.assert_allclose(vals, want_vals, rtol=1e-5, atol=1e-5)
    want_x_hat = np.einsum("SBK,SBKD->SBD", want_vals, W_dec[np.arange(S)[:, None, None], want_idx]) + b_dec[:, None]
    np.testing.assert_allclose(x_hat, want_x_hat, rtol=1e-4, atol=1e-4)
    # The GPU/TPU encoder (all seeds' matmul at once), which XLA:CPU's platform switch never takes.
    b_row = b_enc - np.einsum("SD,SDM->SM", b_dec, W_enc)
    vals_b, idx_b = sae._encode_batched(K, jnp.asarray(x), jnp.asarray(W_enc), jnp.asarray(b_row))
    np.testing.assert_array_equal(idx_b, want_idx)
    np.testing.assert_allclose(vals_b, want_vals, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- BatchTopK -> JumpReLU
def test_batchtopk_to_jumprelu_keeps_l0_near_k():
    d, m, k = 16, 64, 4
    cfg = sae.SAEConfig(d_in=d, d_sae=m, activation="batchtopk", k=k)
    p = sae.init(jax.random.key(0), cfg)
    x = jax.random.normal(jax.random.key(1), (4096 + 1024, d))
    jp, jcfg = sae.batchtopk_to_jumprelu(p, cfg, x[:4096], batch_size=512)
    assert jcfg.activation == "jumprelu" and jp["threshold"].shape == (m,)
    l0 = float(jnp.mean(jnp.sum(sae.encode(jp, x[4096:], jcfg) != 0, -1)))
    assert abs(l0 - k) <= 0.2 * k, l0  # held-out L0 within ±20% of k


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("kw, word", [({"k": 0}, "k=0"), ({"k": 17}, "k=17"),
                                      ({"activation": "gelu"}, "gelu"), ({"aux_k": -1}, "aux_k=-1")])
def test_bad_config_raises(kw, word):
    with pytest.raises(ValueError, match=word):
        sae.SAEConfig(**{"d_in": D, "d_sae": M, "k": K, **kw})


def test_wrong_input_width_raises():
    cfg = sae.SAEConfig(d_in=D, d_sae=M, k=K)
    p = sae.init(jax.random.key(0), cfg)
    with pytest.raises(ValueError, match=r"d_in=6.*\(10, 5\)"):
        sae.loss(p, jnp.zeros((10, 5)), cfg)


def test_config_is_hashable_and_overridable():
    from jaxsae import configlib

    cfg = configlib.override(sae.SAEConfig(), ["k=64", "activation=batchtopk"])
    assert hash(cfg) == hash(dataclasses.replace(sae.SAEConfig(), k=64, activation="batchtopk"))
    with pytest.raises(ValueError, match="k=5000"):
        configlib.override(cfg, ["k=5000"])

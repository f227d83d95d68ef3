"""cpu_kernels: top_k and the fused encoder against a numpy selection under XLA's float order (and jax.lax.top_k);
the matmul against numpy; the sparse SAE kernels and LIMe's mix against numpy loops."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsae import cpu_kernels


def _reference(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top k per row by (XLA's total order on float bits, descending; then lower index), with numpy."""
    bits = x.astype(np.float32).view(np.int32).astype(np.int64)
    keys = np.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # -NaN < -inf < -0.0 < +0.0 < +inf < +NaN
    rows_NxM, keys_NxM = x.reshape(-1, x.shape[-1]), keys.reshape(-1, x.shape[-1])
    idx = np.stack([np.lexsort((np.arange(len(r)), -r))[:k] for r in keys_NxM])
    vals = np.take_along_axis(rows_NxM, idx, axis=1)
    return vals.reshape(x.shape[:-1] + (k,)), idx.reshape(x.shape[:-1] + (k,)).astype(np.int32)


def _same(got, want):
    np.testing.assert_array_equal(np.asarray(got[1]), want[1])
    np.testing.assert_array_equal(np.asarray(got[0]).view(np.int32), want[0].view(np.int32))  # -0.0, NaN bits


def test_kernel_is_built_on_cpu():
    # The suite runs on CPU with a C++ compiler (scripts/install.sh): a silent fallback would test lax.top_k.
    assert cpu_kernels.available()


@pytest.mark.parametrize("shape,k", [((64, 4608), 32), ((300, 257), 1), ((300, 257), 257), ((7, 100), 99),
                                     ((2, 3, 50), 5), ((1024, 96), 64)])
def test_random_rows_match_numpy_and_lax(shape, k):
    x = np.random.default_rng(sum(shape) + k).standard_normal(shape).astype(np.float32)
    got = jax.jit(cpu_kernels.top_k, static_argnums=1)(x, k)
    _same(got, _reference(x, k))
    _same(got, tuple(np.asarray(a) for a in jax.lax.top_k(x, k)))


def test_ties_zeros_infinities_and_nans():
    rng = np.random.default_rng(0)
    x = rng.integers(-3, 4, size=(512, 200)).astype(np.float32)  # many ties: the lower index must win
    x[::7, 5] = -0.0
    x[::11, 9] = np.inf
    x[::13, 17] = -np.inf
    x[::17, 23] = np.nan
    x[::19, 29] = -np.nan
    x[3] = -0.0
    x[4] = np.float32(-np.nan)
    for k in (1, 16, 150):
        _same(cpu_kernels.top_k(x, k), _reference(x, k))


def test_rows_ascending_and_descending():
    # Ascending rows raise the k-th best at every element (the buffer is cut back many times); descending never.
    x = np.stack([np.arange(5000, dtype=np.float32), -np.arange(5000, dtype=np.float32)] * 16)
    _same(cpu_kernels.top_k(x, 40), _reference(x, 40))


def test_vmap_and_gradient_follow_lax():
    x = jax.random.normal(jax.random.key(1), (3, 40, 70))
    _same(jax.vmap(lambda r: cpu_kernels.top_k(r, 8))(x), _reference(np.asarray(x), 8))
    w = jax.random.normal(jax.random.key(2), (3, 40, 8))
    ours = jax.grad(lambda x: jnp.sum(cpu_kernels.top_k(x, 8)[0] * w))(x)
    theirs = jax.grad(lambda x: jnp.sum(jax.lax.top_k(x, 8)[0] * w))(x)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def test_bad_k_is_one_line():
    with pytest.raises(ValueError, match=r"k=0 is not in \[1, 5\]"):
        cpu_kernels.top_k(jnp.zeros((2, 5)), 0)


def _sparse_case(B=70, D=45, M=90, K=6, seed=0):
    """A code with repeated latents across rows (scatter collisions) and a column count not a multiple of 32."""
    rng = np.random.default_rng(seed)
    idx = np.stack([rng.choice(M, K, replace=False) for _ in range(B)]).astype(np.int32)
    vals = rng.standard_normal((B, K)).astype(np.float32)
    W = rng.standard_normal((M, D)).astype(np.float32)
    rows = rng.standard_normal((B, D)).astype(np.float32)
    return vals, idx, W, rows


def _seeds_case(S=3):
    cases = [_sparse_case(seed=s) for s in range(S)]
    return tuple(np.stack([c[i] for c in cases]) for i in range(4))


def test_decoder_grads_match_loops():
    vals, idx, W, g = _seeds_case()
    (S, B, K), (M, D) = idx.shape, W.shape[1:]
    want_dv, want_dW = np.zeros((S, B, K)), np.zeros((S, M, D))
    for s in range(S):
        for b in range(B):
            for j in range(K):
                want_dv[s, b, j] = g[s, b] @ W[s, idx[s, b, j]]
                want_dW[s, idx[s, b, j]] += vals[s, b, j] * g[s, b]
    for got, want in ((jax.jit(cpu_kernels.decoder_grads)(g, W, idx, vals), (want_dv, want_dW)),
                      (jax.jit(cpu_kernels.decoder_grads)(g[1], W[1], idx[1], vals[1]), (want_dv[1], want_dW[1]))):
        for a, w in zip(got, want):  # S seeds, then one seed at rank 2
            np.testing.assert_allclose(a, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shared", [True, False])
def test_encoder_grads_match_loops(shared):
    vals, idx, _, rows = _seeds_case()
    x = rows[:1] if shared else rows
    (S, B, K), D, M = idx.shape, x.shape[2], 90
    rng = np.random.default_rng(9)
    b, W = rng.standard_normal((S, D)).astype(np.float32), rng.standard_normal((S, D, M)).astype(np.float32)
    want_dW, want_dc = np.zeros((S, D, M)), np.zeros((S, M))
    for s in range(S):
        for bb in range(B):
            for j in range(K):
                want_dW[s, :, idx[s, bb, j]] += vals[s, bb, j] * (x[0 if shared else s, bb] - b[s])
                want_dc[s, idx[s, bb, j]] += vals[s, bb, j]
    want_Wdc = np.einsum("SDM,SM->SD", W.astype(np.float64), want_dc)
    got = jax.jit(cpu_kernels.encoder_grads)(idx, vals, x, b, W)
    for a, w in zip(got, (want_dW, want_dc, want_Wdc)):
        np.testing.assert_allclose(a, w, rtol=1e-5, atol=1e-4)


def test_top_k_bias_equals_lax_on_the_sum():
    """The bias is added as each row is read: the same selection and values as lax.top_k of x + bias."""
    x = jax.random.normal(jax.random.key(3), (2, 50, 70))
    bias = jax.random.normal(jax.random.key(4), (2, 70))
    _same(jax.jit(cpu_kernels.top_k, static_argnums=1)(x, 9, bias), _reference(np.asarray(x + bias[:, None]), 9))
    _same(cpu_kernels.top_k(x[0], 9, bias[0]), _reference(np.asarray(x[0] + bias[0]), 9))
    _same(jax.vmap(lambda r, c: cpu_kernels.top_k(r, 9, c))(x, bias), _reference(np.asarray(x + bias[:, None]), 9))
    w = jax.random.normal(jax.random.key(5), (50, 9))
    ours = jax.grad(lambda x, c: jnp.sum(cpu_kernels.top_k(x, 9, c)[0] * w), argnums=(0, 1))(x[0], bias[0])
    theirs = jax.grad(lambda x, c: jnp.sum(jax.lax.top_k(x + c, 9)[0] * w), argnums=(0, 1))(x[0], bias[0])
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"bias of shape \(3, 70\)"):
        cpu_kernels.top_k(x, 9, jnp.zeros((3, 70)))


@pytest.mark.parametrize("S,X,B,D,M,k", [(1, 1, 50, 700, 45, 5), (3, 1, 13, 6, 40, 3), (2, 2, 37, 64, 300, 32),
                                         (1, 1, 24, 1300, 17, 17), (2, 1, 5, 0, 7, 3)])
def test_encode_top_k_equals_numpy_on_exact_products(S, X, B, D, M, k):
    """Small integers make every product exact in float32 whatever the order of the sums (and full of ties), so
    the fused kernel must select exactly what numpy's top-k of x W + b does: depths over one block (D > 640),
    widths and row counts that are not multiples of the register tile, seeds with shared and own inputs."""
    rng = np.random.default_rng(S * B + D + M)
    x = rng.integers(-3, 4, (X, B, D)).astype(np.float32)
    W = rng.integers(-3, 4, (S, D, M)).astype(np.float32)
    b = rng.integers(-20, 21, (S, M)).astype(np.float32)
    pre = np.einsum("SBD,SDM->SBM", np.broadcast_to(x, (S, B, D)).astype(np.float64), W) + b[:, None]
    _same(jax.jit(cpu_kernels.encode_top_k, static_argnums=3)(x, W, b, k), _reference(pre.astype(np.float32), k))


def test_encode_top_k_at_an_sae_shape_matches_float64():
    """Normal data at an SAE's shape: values within float32 rounding of numpy's float64 product, and each row's
    k-th value no lower than the float64 k-th best (less rounding): a valid top-k even where near-ties reorder."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((1, 500, 576)).astype(np.float32)
    W = (rng.standard_normal((1, 576, 4608)) / 24).astype(np.float32)
    b = rng.standard_normal((1, 4608)).astype(np.float32)
    vals, idx = (np.asarray(a) for a in cpu_kernels.encode_top_k(x, W, b, 32))
    pre = x[0].astype(np.float64) @ W[0] + b[0]
    np.testing.assert_allclose(vals[0], np.take_along_axis(pre, idx[0], -1), rtol=1e-5, atol=1e-5)
    assert np.all(np.diff(vals[0], axis=-1) <= 0) and all(len(set(r)) == 32 for r in idx[0])
    kth = -np.sort(-pre, axis=-1)[:, 31]
    assert np.all(vals[0, :, -1] >= kth - 1e-5)
    assert np.mean(np.sort(idx[0], -1) == np.sort(np.argsort(-pre, -1)[:, :32], -1)) > 0.999


def test_encode_top_k_rejects_bad_shapes_in_one_line():
    x, W, b = np.zeros((2, 4, 6), np.float32), np.zeros((3, 6, 10), np.float32), np.zeros((3, 10), np.float32)
    with pytest.raises(ValueError, match=r"x \(2, 4, 6\), W \(3, 6, 10\)"):
        cpu_kernels.encode_top_k(x, W, b, 2)
    with pytest.raises(ValueError, match="k=11"):
        cpu_kernels.encode_top_k(x[:1], W, b, 11)


@pytest.mark.parametrize("R,D,N", [(512, 576, 1536), (131, 1300, 40), (7, 5, 3), (1, 64, 200), (3, 2, 1),
                                   (20, 0, 9), (0, 4, 4)])
def test_matmul_equals_numpy_on_exact_products(R, D, N):
    """Small integers make every product exact whatever the order of the sums, so the kernel must equal numpy
    exactly: several depth blocks (D > 640), ragged row and column tiles, fewer rows than workers, D = 0."""
    rng = np.random.default_rng(R + D + N)
    x, W = (rng.integers(-3, 4, shape).astype(np.float32) for shape in ((R, D), (D, N)))
    got = np.asarray(jax.jit(cpu_kernels.matmul)(x, W))
    np.testing.assert_array_equal(got, x.astype(np.float64) @ W)


def test_matmul_gradients_and_bad_shapes():
    """Normal data: the product within float32 rounding of float64 numpy's, gradients equal to XLA's dot's; a
    shape mismatch is one line naming both shapes."""
    rng = np.random.default_rng(3)
    x, W, g = (rng.standard_normal(shape).astype(np.float32) for shape in ((300, 576), (576, 384), (300, 384)))
    np.testing.assert_allclose(cpu_kernels.matmul(x, W), x.astype(np.float64) @ W, rtol=1e-4, atol=1e-4)
    ours = jax.grad(lambda x, W: jnp.sum(cpu_kernels.matmul(x, W) * g), argnums=(0, 1))(x, W)
    np.testing.assert_allclose(ours[0], g.astype(np.float64) @ W.T, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ours[1], x.T.astype(np.float64) @ g, rtol=1e-4, atol=1e-3)
    with pytest.raises(ValueError, match=r"x \(3, 4\) and W \(5, 6\)"):
        cpu_kernels.matmul(np.zeros((3, 4), np.float32), np.zeros((5, 6), np.float32))


def _np_attention(q, k, v, cos, sin):
    """Causal GQA with rotate-half RoPE, one query at a time in float64."""
    (B, T, N, H), K = q.shape, k.shape[2]

    def rope(x):
        x1, x2, c, s = x[..., : H // 2], x[..., H // 2:], cos[:, None], sin[:, None]
        return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)

    q, k, v = rope(q.astype(np.float64)), rope(k.astype(np.float64)), v.astype(np.float64)
    o = np.zeros(q.shape)
    for b, n, t in np.ndindex(B, N, T):
        kv = n // (N // K)
        scores = k[b, : t + 1, kv] @ q[b, t, n] / np.sqrt(H)
        p = np.exp(scores - scores.max())
        o[b, t, n] = p @ v[b, : t + 1, kv] / p.sum()
    return o


@pytest.mark.parametrize("B,T,N,K,H", [(2, 128, 9, 3, 64), (2, 13, 6, 2, 8), (1, 40, 3, 3, 64),
                                       (1, 17, 4, 1, 36), (1, 1, 2, 1, 2), (0, 5, 2, 1, 4)])
def test_attention_matches_numpy_loop(B, T, N, K, H):
    """SmolLM2's attention shape, grouped and plain heads, ragged row tiles, key panels and value panels (H not a
    multiple of the vector width), one position, an empty batch."""
    rng = np.random.default_rng(T + H)
    q, k = (2 * rng.standard_normal(shape).astype(np.float32) for shape in ((B, T, N, H), (B, T, K, H)))
    v = rng.standard_normal((B, T, K, H)).astype(np.float32)
    cos, sin = cpu_kernels.rope_tables(T, H, 10000.0)
    expected = _np_attention(q, k, v, cos.astype(np.float64), sin.astype(np.float64))
    for fn in (cpu_kernels.attention, cpu_kernels.attention_xla):
        np.testing.assert_allclose(jax.jit(fn)(q, k, v, cos, sin), expected, rtol=1e-4, atol=2e-5)


def test_attention_gradient_and_bad_shapes():
    """The gradient against central differences of the numpy loop; a shape mismatch is one line naming them."""
    rng = np.random.default_rng(7)
    shapes = [(2, 11, 4, 8), (2, 11, 2, 8), (2, 11, 2, 8)] * 2  # q, k, v, then directions for each
    q, k, v, dq, dk, dv = (rng.standard_normal(s).astype(np.float32) for s in shapes)
    cos, sin = cpu_kernels.rope_tables(11, 8, 100.0)
    g = rng.standard_normal(q.shape)
    _, vjp = jax.vjp(lambda q, k, v: cpu_kernels.attention(q, k, v, cos, sin), q, k, v)
    ours = sum(np.sum(np.asarray(d, np.float64) * t) for d, t in zip(vjp(g.astype(np.float32)), (dq, dk, dv)))
    eps, c64, s64 = 1e-4, cos.astype(np.float64), sin.astype(np.float64)
    f = [_np_attention(q + e * dq.astype(np.float64), k + e * dk.astype(np.float64), v + e * dv.astype(np.float64),
                       c64, s64) for e in (eps, -eps)]
    np.testing.assert_allclose(ours, np.sum(g * (f[0] - f[1])) / (2 * eps), rtol=1e-4)
    with pytest.raises(ValueError, match=r"q \(2, 11, 4, 8\), k \(2, 11, 3, 8\)"):
        cpu_kernels.attention(q, np.zeros((2, 11, 3, 8), np.float32), v, cos, sin)
    with pytest.raises(ValueError, match=r"q \(11, 4, 8\)"):
        cpu_kernels.attention(q[0], k, v, cos, sin)


def test_htopk_walk_matches_loop():
    vals, idx, W, r = _sparse_case(seed=1)
    (B, K), (M, D) = idx.shape, W.shape
    coef = np.random.default_rng(2).uniform(0.1, 1.0, K).astype(np.float32)
    ct_r = np.random.default_rng(3).standard_normal((B, D)).astype(np.float32)
    dv, dW, G, sse = np.zeros((B, K)), np.zeros((M, D)), np.zeros((B, D)), np.zeros(K)
    for b in range(B):  # the recurrences of htopk._walk_back, one row at a time, in float64
        rb, gb = r[b].astype(np.float64), ct_r[b].astype(np.float64)
        for j in reversed(range(K)):
            gb = gb + coef[j] * rb
            dv[b, j] = gb @ W[idx[b, j]]
            sse[j] += rb @ rb
            dW[idx[b, j]] += vals[b, j] * gb
            rb = rb - vals[b, j] * W[idx[b, j]]
        G[b] = gb
    got = jax.jit(cpu_kernels.htopk_walk)(vals, idx, W, r, coef, ct_r)
    for g, w in zip(got, (dv, dW, G, sse)):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-4)
    got_sum = jax.jit(cpu_kernels.htopk_walk, static_argnums=6)(vals, idx, W, r, coef, ct_r, True)
    for g, w in zip(got_sum, (dv, dW, G.sum(0, keepdims=True), sse)):  # G as its column sums only
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=1e-3)


def test_out_of_range_index_is_an_error():
    vals, idx, W, rows = _sparse_case()
    idx[3, 2] = W.shape[0]
    with pytest.raises(Exception, match="latent index is out of range"):
        jax.block_until_ready(cpu_kernels.decoder_grads(rows, W, idx, vals))


@pytest.mark.parametrize("K,R,J,n,shape", [(2, 2, 16, 5, (3, 7, 64)), (8, 8, 16, 16, (2, 33, 64)),
                                           (3, 3, 4, 1, (5,)), (4, 4, 6, 3, (1500,)), (10, 2, 3, 2, (70,))])
def test_mix_sources_and_its_gradients_match_numpy_loops(K, R, J, n, shape, sparse_backend):
    """out[k] = sum_j sum_r w[k, r, j] src_j[r]; its gradients written out as loops in numpy (float64); the
    kernel and the XLA path."""
    rng = np.random.default_rng(K * 100 + n)
    w = rng.normal(size=(K, R, J)).astype(np.float32)
    src = [rng.normal(size=(R,) + shape).astype(np.float32) for _ in range(n)]
    g = rng.normal(size=(K,) + shape).astype(np.float32)
    out = np.zeros((K,) + shape)
    dw, ds = np.zeros((K, R, J)), [np.zeros((R,) + shape) for _ in range(n)]
    for k in range(K):
        for j in range(n):
            for r in range(R):
                out[k] += float(w[k, r, j]) * src[j][r]
                dw[k, r, j] = np.sum(g[k].astype(np.float64) * src[j][r])
                ds[j][r] += float(w[k, r, j]) * g[k]
    np.testing.assert_allclose(jax.jit(cpu_kernels.mix_sources)(w, tuple(src)), out, rtol=1e-5, atol=1e-5)
    got_dw, got_ds = jax.jit(jax.grad(lambda w, s: jnp.sum(cpu_kernels.mix_sources(w, s) * g), (0, 1)))(w, tuple(src))
    np.testing.assert_allclose(got_dw, dw, rtol=1e-4, atol=1e-3)  # dw sums up to ~4k products
    for a, b in zip(got_ds, ds):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_mix_sources_rejects_mismatched_sources_in_one_line():
    w = np.ones((2, 3, 2), np.float32)
    for sources in [(), (np.ones((3, 4)),) * 3, (np.ones((3, 4)), np.ones((3, 5))), (np.ones((2, 4)),)]:
        with pytest.raises(ValueError, match=r"mix_sources: w \[K, R, J\] = \(2, 3, 2\)"):
            cpu_kernels.mix_sources(w, tuple(jnp.asarray(s, jnp.float32) for s in sources))

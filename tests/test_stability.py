"""Stability metrics against brute-force numpy loops, scipy and closed-form cases."""
import itertools

import jax
import numpy as np
import pytest
import scipy.linalg
import scipy.optimize

from jaxsae import stability


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _brute_best(a, b, ea=None, eb=None):
    """Loop over every pair of rows: best min(|cos_dec|, |cos_enc|) of each row of a in b."""
    out = np.zeros(len(a))
    for i in range(len(a)):
        best = -1.0
        for j in range(len(b)):
            c = abs(np.dot(a[i], b[j])) / np.linalg.norm(a[i]) / np.linalg.norm(b[j])
            if ea is not None:
                c = min(c, abs(np.dot(ea[i], eb[j])) / np.linalg.norm(ea[i]) / np.linalg.norm(eb[j]))
            best = max(best, c)
        out[i] = best
    return out


@pytest.mark.parametrize("use_enc", [False, True])
@pytest.mark.parametrize("sharded", [False, True], ids=["one-device", "tiles-over-8-devices"])
def test_best_matches_equal_brute_force(use_enc, sharded):
    rng = np.random.default_rng(0)
    S, M, D = 3, 37, 8  # M not a multiple of the block: padding must never win
    dec = rng.normal(size=(S, M, D)).astype(np.float32)
    enc = rng.normal(size=(S, M, D)).astype(np.float32) if use_enc else None
    mesh = stability.search_mesh() if sharded else None  # 8 devices x 16 rows: most tiles are padding
    cos = stability.best_matches(dec, enc, block=16, search_dtype="float32", mesh=mesh)
    for s, t in itertools.permutations(range(S), 2):
        ref = _brute_best(dec[s], dec[t], *((enc[s], enc[t]) if use_enc else ()))
        np.testing.assert_allclose(cos[s, t], ref, atol=1e-5)
    p = stability.stability(cos, 0.5)
    ref_p = [[np.mean([_brute_best(dec[s][i:i + 1], dec[t], *((enc[s][i:i + 1], enc[t]) if use_enc else ()))[0] >= 0.5
                       for t in range(S) if t != s]) for i in range(M)] for s in range(S)]
    np.testing.assert_allclose(p, ref_p)


def test_bfloat16_search_within_its_error_bound():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(50, 24)), rng.normal(size=(70, 24))
    best_M, best_N = stability.cross_best(a, b, block=16, search_dtype="bfloat16")
    np.testing.assert_allclose(best_M, _brute_best(a, b), atol=2**-8)
    np.testing.assert_allclose(best_N, _brute_best(b, a), atol=2**-8)


def test_permuted_sign_flipped_copy_is_fully_stable():
    rng = np.random.default_rng(2)
    base = rng.normal(size=(64, 16))
    copies = []
    for _ in range(4):
        perm = rng.permutation(64)
        sign = rng.choice([-1.0, 1.0], size=(64, 1))
        copies.append(base[perm] * sign * rng.uniform(0.5, 2.0, size=(64, 1)))  # norms must not matter
    p = stability.stability(stability.best_matches(np.stack(copies)), 0.9)
    np.testing.assert_array_equal(p, 1.0)


def test_independent_random_dictionaries_are_unstable():
    # Best |cos| of one unit vector among 256 random ones in R^128 is ≈ sqrt(2 ln 512 / 128) ≈ 0.31.
    dec = np.random.default_rng(3).normal(size=(4, 256, 128))
    p = stability.stability(stability.best_matches(dec), 0.7)
    assert p.mean() < 0.01


def test_stability_against_references():
    rng = np.random.default_rng(4)
    base = rng.normal(size=(40, 12))
    refs = np.stack([base, base[::-1], rng.normal(size=(40, 12))])  # 2 of 3 hold every feature
    p = stability.stability_against(base[:10], refs, tau=0.99, search_dtype="float32")
    np.testing.assert_allclose(p, 2 / 3)


def test_hungarian_matches_brute_force_permutations():
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    cos = np.abs(_unit(a) @ _unit(b).T)
    best = max(sum(cos[i, perm[i]] for i in range(6)) for perm in itertools.permutations(range(6)))
    rows, cols, matched = stability.hungarian_match(a, b)
    assert len(set(cols)) == 6
    np.testing.assert_allclose(matched.sum(), best, rtol=1e-5)
    np.testing.assert_allclose(matched, cos[rows, cols], rtol=1e-5)


def test_hungarian_recovers_a_hidden_permutation():
    rng = np.random.default_rng(6)
    a = rng.normal(size=(30, 20))
    perm = rng.permutation(30)
    _, cols, matched = stability.hungarian_match(a, -a[perm] + 0.01 * rng.normal(size=(30, 20)))
    np.testing.assert_array_equal(perm[cols], np.arange(30))
    assert matched.min() > 0.99


def test_pw_mcc_formula():
    rng = np.random.default_rng(7)
    a, b = rng.normal(size=(20, 6)), rng.normal(size=(30, 6))
    ref = 0.5 * (_brute_best(a, b).mean() + _brute_best(b, a).mean())
    np.testing.assert_allclose(stability.pw_mcc(a, b, search_dtype="float32"), ref, rtol=1e-5)
    np.testing.assert_allclose(stability.pw_mcc(a, a, search_dtype="float32"), 1.0, rtol=1e-5)


@pytest.mark.parametrize("r,q", [(3, 3), (5, 2)])
def test_principal_angles_match_scipy(r, q):
    rng = np.random.default_rng(8)
    A, B = rng.normal(size=(20, r)), rng.normal(size=(20, q))
    ours = np.sort(np.asarray(stability.principal_angles(A, B)))
    ref = np.sort(scipy.linalg.subspace_angles(A, B))
    np.testing.assert_allclose(ours, ref, atol=2e-3)
    # Overlap is ‖QaᵀQb‖²_F / min(r, q) with orthonormal bases.
    Qa, Qb = scipy.linalg.orth(A), scipy.linalg.orth(B)
    np.testing.assert_allclose(stability.subspace_overlap(A, B), np.sum((Qa.T @ Qb) ** 2) / min(r, q), rtol=1e-4)


def test_span_basis_recovers_the_spanning_subspace():
    rng = np.random.default_rng(9)
    Q, _ = np.linalg.qr(rng.normal(size=(16, 3)))
    dirs = rng.normal(size=(40, 3)) @ Q.T  # 40 directions inside a 3-dim subspace
    np.testing.assert_allclose(stability.subspace_overlap(stability.span_basis(dirs, 3), Q), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="rank"):
        stability.span_basis(dirs, 17)


def test_random_subspace_overlap_is_r_over_d():
    assert abs(stability.random_subspace_overlap(jax.random.key(0), 60, 6, n=64) - 6 / 60) < 0.02


def test_pool_unique_matches_a_greedy_loop():
    rng = np.random.default_rng(10)
    base = rng.normal(size=(30, 10))
    dirs = np.concatenate([base, -base + 0.05 * rng.normal(size=base.shape), rng.normal(size=(30, 10))])
    order = rng.permutation(len(dirs))
    for width in (45, 1000):  # trimmed, and every unique feature
        kept = []
        for i in order:
            if len(kept) < width and all(abs(np.dot(_unit(dirs[i]), _unit(dirs[j]))) < 0.7 for j in kept):
                kept.append(i)
        np.testing.assert_array_equal(stability.pool_unique(dirs, order, width, 0.7), kept)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="NaN"):
        stability.best_matches(np.full((2, 3, 4), np.nan))
    with pytest.raises(ValueError, match="at least 2 seeds"):
        stability.best_matches(np.ones((1, 3, 4)))
    with pytest.raises(ValueError, match="last dim"):
        stability.cross_best(np.ones((3, 4)), np.ones((3, 5)))
    with pytest.raises(ValueError, match="tau"):
        stability.stability(np.ones((2, 2, 3)), 1.5)
    with pytest.raises(ValueError, match="order_N"):
        stability.pool_unique(np.ones((3, 4)), [0, 0, 1], 2)

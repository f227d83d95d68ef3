"""jaxsae.metrics against numpy written here."""
import jax.numpy as jnp
import numpy as np

from jaxsae import metrics
from jaxsae.sae import Code


def test_fvu_and_ev_match_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 7)) * np.arange(1, 8) + 5.0
    x_hat = x + 0.3 * rng.normal(size=x.shape)
    ref = sum(np.sum((x[i] - x_hat[i]) ** 2) for i in range(200)) / sum(
        np.sum((x[i] - x.mean(0)) ** 2) for i in range(200))
    np.testing.assert_allclose(metrics.fvu(jnp.asarray(x), jnp.asarray(x_hat)), ref, rtol=1e-5)
    np.testing.assert_allclose(metrics.explained_variance(jnp.asarray(x), jnp.asarray(x_hat)), 1 - ref, rtol=1e-5)


def test_streaming_ev_equals_ev_of_concatenation():
    rng = np.random.default_rng(1)
    # Large offset and uneven batch sizes: a naive Σx² − n·x̄² would lose digits in float32.
    chunks = [rng.normal(size=(n, 5)) + 100.0 for n in (3, 50, 17, 1, 64)]
    hats = [c + 0.1 * rng.normal(size=c.shape) for c in chunks]
    stats = metrics.ev_stats_init(5)
    for c, h in zip(chunks, hats):
        stats = metrics.ev_stats_update(stats, jnp.asarray(c, jnp.float32), jnp.asarray(h, jnp.float32))
    x, x_hat = np.concatenate(chunks), np.concatenate(hats)
    ref = np.sum((x - x_hat) ** 2) / np.sum((x - x.mean(0)) ** 2)
    np.testing.assert_allclose(metrics.ev_stats_fvu(stats), ref, rtol=1e-4)
    assert int(stats.n) == len(x)


def test_l0_code_and_dense():
    acts = np.array([[0, 1.5, 0, 2], [0, 0, 0, 0], [3, 1, 1, 1.0]])
    np.testing.assert_allclose(metrics.l0(jnp.asarray(acts)), np.mean([(r != 0).sum() for r in acts]))
    code = Code(jnp.array([[2.0, 1.0], [1.0, 0.0]]), jnp.array([[3, 1], [0, 2]]))
    np.testing.assert_allclose(metrics.l0(code), 1.5)


def test_dead_fraction_and_histogram():
    counts = np.array([0, 3, 0, 10, 1])
    np.testing.assert_allclose(metrics.dead_fraction(jnp.asarray(counts)), 2 / 5)
    freq = np.array([0.0, 1.5e-3, 2e-3, 0.5, 3e-6])  # no value on a bin edge
    hist, edges = metrics.firing_histogram(jnp.asarray(freq), bins=7, lo=-7.0, hi=0.0)
    ref, ref_edges = np.histogram(np.log10(np.maximum(freq, 1e-7)), bins=7, range=(-7, 0))
    np.testing.assert_array_equal(hist, ref)
    np.testing.assert_allclose(edges, ref_edges, rtol=1e-6)

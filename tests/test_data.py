"""Activation sources: cache round trip, deterministic shuffling and resume, corruption errors, Normalizer."""
import json

import ml_dtypes
import numpy as np
import pytest

from jaxsae import data

D = 6


def _rows(x):
    """Rows sorted lexicographically, to compare multisets of tokens."""
    return x[np.lexsort(x.T[::-1])]


def _write_cache(path, x, shard_tokens=7, dtype="float16"):
    with data.CacheWriter(path, {"model": "toy", "layer": 0}, d_in=x.shape[1], dtype=dtype,
                          shard_tokens=shard_tokens) as w:
        for part in np.array_split(x, 3):
            w.add(part)
    return w


def test_normalizer_fit_formula_and_invert():
    x = np.random.default_rng(0).normal(3.0, 2.0, (50, D))
    norm = data.Normalizer.fit(x)
    y = norm(x)
    assert np.allclose(y.mean(0), 0, atol=1e-5)
    assert np.isclose(np.mean(np.sum(y**2, 1)), D, rtol=1e-5)
    assert np.allclose(norm.invert(y), x, atol=1e-5)
    again = data.Normalizer.from_dict(json.loads(json.dumps(norm.to_dict())))
    assert np.allclose(again(x), y)


def test_cache_round_trip_one_epoch_is_a_permutation(tmp_path):
    x = np.random.default_rng(1).normal(size=(40, D)).astype(np.float32)
    w = _write_cache(tmp_path, x)
    assert w.num_tokens == 40
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [s["num_tokens"] for s in manifest["shards"]] == [7, 7, 7, 7, 7, 5]
    src = data.CacheSource(tmp_path, chunk_tokens=3, buffer_tokens=9)
    assert (src.d_in, src.num_tokens) == (D, 40)
    it = src.batches(8, seed=0)
    epoch = np.concatenate([next(it) for _ in range(5)])
    x16 = x.astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(_rows(epoch), _rows(x16))
    assert not np.array_equal(epoch, x16), "the stream should be shuffled"
    # Normalizer from the manifest's running sums == numpy formula on the stored values.
    mean = x16.astype(np.float64).mean(0)
    scale = np.sqrt(np.mean(np.sum((x16 - mean) ** 2, 1)) / D)
    np.testing.assert_allclose(src.normalizer.mean_D, mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(src.normalizer.scale, scale, rtol=1e-6)


def test_bfloat16_cache_round_trip(tmp_path):
    x = np.random.default_rng(2).normal(size=(10, D)).astype(np.float32)
    _write_cache(tmp_path, x, shard_tokens=4, dtype="bfloat16")
    got = next(data.CacheSource(tmp_path).batches(10, seed=0))
    want = x.astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(_rows(got), _rows(want))


@pytest.mark.parametrize("start", [1, 4, 7])
def test_shuffle_is_deterministic_and_resumes_across_epochs(tmp_path, start):
    x = np.random.default_rng(3).normal(size=(25, D)).astype(np.float32)
    _write_cache(tmp_path, x)
    src = data.CacheSource(tmp_path, chunk_tokens=2, buffer_tokens=6)
    a, b, c = (src.batches(4, seed=s) for s in (5, 5, 6))
    stream = [next(a) for _ in range(12)]  # 48 tokens: crosses an epoch boundary
    assert all(np.array_equal(s, next(b)) for s in stream)
    assert not all(np.array_equal(s, next(c)) for s in stream)
    resumed = src.batches(4, seed=5, start=start)
    for s in stream[start:]:
        np.testing.assert_array_equal(next(resumed), s)


def test_array_source_epochs_and_per_seed_orders():
    x = np.arange(12 * 2, dtype=np.float32).reshape(12, 2)
    src = data.ArraySource(x)
    it = src.batches(5, seed=0)
    stream = np.concatenate([next(it) for _ in range(6)])  # 30 tokens = 2.5 epochs
    np.testing.assert_array_equal(_rows(stream[:12]), x)
    np.testing.assert_array_equal(_rows(stream[12:24]), x)
    np.testing.assert_array_equal(next(src.batches(5, seed=0, start=3)), stream[15:20])
    s1 = next(data.stacked_batches(src, 5, seeds=[0, 1, 2]))
    s2 = next(data.stacked_batches(src, 5, seeds=[0, 1, 2]))
    assert s1.shape == (3, 5, 2)
    np.testing.assert_array_equal(s1, s2)
    assert not np.array_equal(s1[0], s1[1]) and not np.array_equal(s1[1], s1[2])


def test_truncated_missing_and_nan_shards_are_named(tmp_path):
    x = np.random.default_rng(4).normal(size=(21, D)).astype(np.float32)
    _write_cache(tmp_path, x)
    shard = tmp_path / "shard_000001.npy"
    raw = shard.read_bytes()
    shard.write_bytes(raw[:-10])
    with pytest.raises(ValueError, match="shard_000001.npy is truncated"):
        data.CacheSource(tmp_path)
    shard.write_bytes(raw)
    bad = np.load(shard, mmap_mode="r+")
    bad[3, 2] = np.nan
    bad.flush()
    del bad
    with pytest.raises(ValueError, match=r"shard_000001.npy row \d+ holds 1 non-finite"):
        list(zip(range(10), data.CacheSource(tmp_path).batches(7, seed=0)))
    shard.unlink()
    with pytest.raises(FileNotFoundError, match="shard_000001.npy is missing"):
        data.CacheSource(tmp_path)
    with pytest.raises(FileNotFoundError, match="manifest.json is missing"):
        data.CacheSource(tmp_path / "nowhere")


def test_writer_rejects_bad_input_and_mismatched_reopen(tmp_path):
    w = data.CacheWriter(tmp_path, {"model": "toy"}, d_in=D)
    with pytest.raises(ValueError, match=r"expects \[N, 6\].*\(4, 5\)"):
        w.add(np.zeros((4, 5)))
    x = np.ones((4, D))
    x[1, 1] = np.inf
    with pytest.raises(ValueError, match="1 non-finite"):
        w.add(x)
    with pytest.raises(ValueError, match="after casting to float16.*non-finite"):
        w.add(np.full((2, D), 1e6))  # overflows float16
    with pytest.raises(ValueError, match="model='toy'.*'other'"):
        data.CacheWriter(tmp_path, {"model": "other"}, d_in=D).close()
    with pytest.raises(ValueError, match="is empty"):
        data.CacheSource(tmp_path)


def test_interrupted_writer_resumes_without_half_shards(tmp_path):
    x = np.random.default_rng(5).normal(size=(30, D)).astype(np.float32)
    w = data.CacheWriter(tmp_path, {"model": "toy"}, d_in=D, shard_tokens=8)
    w.add(x[:20])  # two shards committed, 4 tokens still buffered when the process "dies"
    # A crash mid-write leaves a temporary file and maybe a renamed shard the manifest never listed.
    (tmp_path / "shard_000002.npy.tmp").write_bytes(b"partial")
    np.save(tmp_path / "shard_000002.npy", np.zeros((3, D), np.float16))
    w2 = data.CacheWriter(tmp_path, {"model": "toy"}, d_in=D, shard_tokens=8)
    assert w2.num_tokens == 16
    assert not list(tmp_path.glob("*.tmp"))
    w2.add(x[16:])
    w2.close()
    src = data.CacheSource(tmp_path)
    assert src.num_tokens == 30
    got = next(src.batches(30, seed=0))
    np.testing.assert_array_equal(_rows(got), _rows(x.astype(np.float16).astype(np.float32)))


@pytest.mark.parametrize("kind", ["cache", "array"])
def test_row_ranges_tile_the_global_batch(tmp_path, kind):
    """Processes reading rows [lo, hi) of every batch together read exactly the one-process stream."""
    x = np.random.default_rng(4).standard_normal((95, 6)).astype(np.float16)
    _write_cache(tmp_path / "c", x)
    src = data.CacheSource(tmp_path / "c", chunk_tokens=8, buffer_tokens=24) if kind == "cache" \
        else data.ArraySource(x.astype(np.float32))
    B, start, steps = 12, 5, 20  # 20 batches of 12 run over two epochs of 95 rows
    whole = [b for _, b in zip(range(steps), src.batches(B, seed=3, start=start))]
    for cuts in ([0, 6, 12], [0, 3, 6, 9, 12], [0, 1, 12]):
        parts = [src.batches(B, seed=3, start=start, rows=(lo, hi)) for lo, hi in zip(cuts, cuts[1:])]
        for want in whole:
            np.testing.assert_array_equal(np.concatenate([next(p) for p in parts]), want)
    with pytest.raises(ValueError, match=r"rows=\(4, 4\)"):
        next(src.batches(B, seed=3, rows=(4, 4)))


def test_synthetic_source_is_the_sum_of_its_draws():
    """Each token is the coefficient-weighted sum of its k drawn directions (a per-token loop as reference), the
    directions depend on the seed only, and another sample is other tokens."""
    d, n, f, k = 6, 40, 9, 3
    x = data.synthetic_source(d, n, n_features=f, k=k, seed=5).x_NxD
    dirs = np.random.default_rng([5, 0]).standard_normal((f, d))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    rng = np.random.default_rng([5, 1, 0])
    idx, coef = rng.integers(0, f, (n, k)), rng.exponential(1.0, (n, k))
    want = np.array([sum(coef[i, j] * dirs[idx[i, j]] for j in range(k)) for i in range(n)], np.float32)
    np.testing.assert_allclose(x, want, rtol=1e-6, atol=1e-6)
    assert not np.allclose(data.synthetic_source(d, n, n_features=f, k=k, seed=5, sample=1).x_NxD, x)

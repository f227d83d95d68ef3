"""Harvest on a tiny random-weight model: cache contents, manifest, Normalizer, kill-and-resume, bad input."""
import dataclasses
import json

import jax
import numpy as np
import pytest

from jaxsae import harvest as hv
from jaxsae.data import CacheSource, CacheWriter
from lime_jax import model as lm
from lime_jax.config import tiny

CFG = tiny(vocab=300, n_layers=4, d_model=32, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64, max_len=32)
PARAMS = lm.init(jax.random.key(1), CFG)
TOKENS = np.random.default_rng(0).integers(0, CFG.vocab, (12, 16)).astype(np.int32)
HCFG = hv.HarvestConfig(corpus="toy", split="train", num_tokens=100, layers=(1, 3), ctx_len=16, skip_first=4,
                        batch_size=4, shard_contexts=2, model="tiny")


def _reference(layer, n_ctx):
    """All contexts in one forward, first positions dropped: what the cache must hold (up to float16 rounding)."""
    h = np.asarray(lm.residuals(PARAMS, TOKENS[:n_ctx], CFG, layer)[layer])
    return h[:, HCFG.skip_first :].reshape(-1, CFG.d_model)


def _assert_cache_equals(x, ref):
    """float16 storage: equal up to one rounding (a shifted or duplicated context is off by O(1))."""
    assert x.shape == ref.shape
    np.testing.assert_allclose(x.astype(np.float32), ref, rtol=2e-3, atol=2e-3)


def _read(path):
    m = json.loads((path / "manifest.json").read_text())
    return m, np.concatenate([np.load(path / s["file"]) for s in m["shards"]])


def _dirs(tmp_path, name="c"):
    return {1: tmp_path / name / "L1", 3: tmp_path / name / "L3"}


def test_cache_holds_first_contexts_and_normalizer(tmp_path):
    dirs = _dirs(tmp_path)
    hv.harvest(PARAMS, CFG, TOKENS, HCFG, dirs)
    n_ctx = -(-100 // 12)  # 9 contexts of 12 kept rows
    for layer, path in dirs.items():
        m, x = _read(path)
        _assert_cache_equals(x, _reference(layer, n_ctx))
        assert m["num_tokens"] == n_ctx * 12 and m["skip_first"] == 4 and m["ctx_len"] == 16
        assert (m["layer"], m["hook"], m["corpus"], m["split"], m["dtype"]) == (layer, "resid_post", "toy", "train", "float16")
        assert all(s["num_tokens"] % 12 == 0 for s in m["shards"])  # whole contexts per shard
        x64 = x.astype(np.float64)
        mean = x64.mean(0)
        scale = np.sqrt(np.mean(np.sum((x64 - mean) ** 2, 1)) / CFG.d_model)
        src = CacheSource(path)
        np.testing.assert_allclose(src.normalizer.mean_D, mean, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(src.normalizer.scale, scale, rtol=1e-5)


@pytest.mark.parametrize("kill_at", [1, 4])
def test_killed_harvest_resumes_without_duplicates(tmp_path, monkeypatch, kill_at):
    """Kill on the kill_at-th shard write (layers write in turn, so L1 may be a shard ahead of L3), then resume."""
    dirs = _dirs(tmp_path)
    real_write = CacheWriter._write_shard
    calls = {"n": 0}

    def dying_write(self, x):
        calls["n"] += 1
        if calls["n"] == kill_at:
            (self.path / "shard_999999.npy.tmp").write_bytes(b"half a shard")  # a write cut off mid-file
            raise KeyboardInterrupt
        real_write(self, x)

    monkeypatch.setattr(CacheWriter, "_write_shard", dying_write)
    with pytest.raises(KeyboardInterrupt):
        hv.harvest(PARAMS, CFG, TOKENS, HCFG, dirs)
    assert all(hv.cache_tokens(p) < 108 for p in dirs.values())
    monkeypatch.setattr(CacheWriter, "_write_shard", real_write)
    hv.harvest(PARAMS, CFG, TOKENS, HCFG, dirs)
    for layer, path in dirs.items():
        m, x = _read(path)
        _assert_cache_equals(x, _reference(layer, 9))
        assert [s["file"] for s in m["shards"]] == [f"shard_{i:06d}.npy" for i in range(len(m["shards"]))]
        assert not list(path.glob("*.tmp"))


def test_extending_a_cache_appends_the_next_contexts(tmp_path):
    dirs = _dirs(tmp_path)
    hv.harvest(PARAMS, CFG, TOKENS, HCFG, dirs)
    hv.harvest(PARAMS, CFG, TOKENS, dataclasses.replace(HCFG, num_tokens=140), dirs)
    _assert_cache_equals(_read(dirs[3])[1], _reference(3, 12))


@pytest.mark.parametrize("change, match", [
    ({"layers": (4,)}, "layers"),
    ({"layers": (-1,)}, "layers"),
    ({"num_tokens": 10_000}, "needs"),
    ({"skip_first": 16}, "skip_first"),
])
def test_bad_config_fails_before_writing(tmp_path, change, match):
    cfg = dataclasses.replace(HCFG, **change)
    with pytest.raises(ValueError, match=match):
        hv.harvest(PARAMS, CFG, TOKENS, cfg, {l: tmp_path / str(l) for l in cfg.layers})
    assert not any(tmp_path.iterdir())


def test_empty_corpus_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="toy/train"):
        hv.harvest(PARAMS, CFG, TOKENS[:0], HCFG, _dirs(tmp_path))


def test_ensure_cache_reuses_a_big_enough_cache(tmp_path, monkeypatch):
    import lime_jax.corpora

    monkeypatch.setattr(lime_jax.corpora, "token_contexts", lambda name, split, ctx_len: TOKENS)
    monkeypatch.setattr(hv, "load_model", lambda name: (CFG, PARAMS))
    kw = dict(root=str(tmp_path), model="tiny", ctx_len=16, batch_size=4)
    path = hv.ensure_cache("toy", "heldout", 30, layer=2, **kw)
    assert hv.cache_tokens(path) == 36
    np.testing.assert_array_equal(hv.cache_contexts(path), TOKENS[:3])

    def no_model(name):
        raise AssertionError("the model must not be loaded when the cache is big enough")

    monkeypatch.setattr(hv, "load_model", no_model)
    assert hv.ensure_cache("toy", "heldout", 36, layer=2, **kw) == path

"""Harvest on a tiny random-weight model: cache contents, manifest, Normalizer, kill-and-resume, bad input."""
import dataclasses
import json

import jax
import numpy as np
import pytest

from jaxsae import harvest as hv
from jaxsae.data import CacheSource, CacheWriter
from lime_jax import model as lm
from lime_jax.adapter import from_llama
from lime_jax.config import tiny

CFG = tiny(vocab=300, n_layers=4, d_model=32, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64, max_len=32)
PARAMS = lm.init(jax.random.key(1), CFG)
MODEL = from_llama("tiny", CFG, PARAMS)
TOKENS = np.random.default_rng(0).integers(1, CFG.vocab, (12, 16)).astype(np.int32)
TOKENS[2, 7] = TOKENS[5, 3] = TOKENS[8, 10] = TOKENS[8, 11] = 0  # <|endoftext|>: its row is left out
# shard_tokens=20 does not divide the 12 (or fewer) rows of a context: shards end mid-context.
HCFG = hv.HarvestConfig(corpus="toy", split="train", num_tokens=100, layers=(1, 3), ctx_len=16, skip_first=4,
                        batch_size=4, shard_tokens=20, model="tiny")


def _kept_rows(n_ctx):
    """Rows each of the first n_ctx contexts contributes: positions >= 4 that are not token 0."""
    return [sum(1 for t in range(4, 16) if TOKENS[c, t] != 0) for c in range(n_ctx)]


def _contexts_for(num_tokens):
    """Fewest first contexts whose kept rows reach num_tokens, by a plain loop."""
    total, n = 0, 0
    while total < num_tokens:
        total, n = total + _kept_rows(n + 1)[n], n + 1
    return n


def _reference(layer, n_ctx):
    """All contexts in one forward, then a loop picking the kept rows: what the cache must hold (up to float16)."""
    h = np.asarray(lm.residuals(PARAMS, TOKENS[:n_ctx], CFG, layer)[layer])
    return np.stack([h[c, t] for c in range(n_ctx) for t in range(4, 16) if TOKENS[c, t] != 0])


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
    hv.harvest(MODEL, TOKENS, HCFG, dirs)
    n_ctx = _contexts_for(100)
    assert n_ctx == 9 and sum(_kept_rows(n_ctx)) == 105  # contexts 2 and 8 lose 1 and 2 rows
    for layer, path in dirs.items():
        m, x = _read(path)
        _assert_cache_equals(x, _reference(layer, n_ctx))
        assert m["num_tokens"] == 105 and m["skip_first"] == 4 and m["ctx_len"] == 16 and m["exclude_tokens"] == [0]
        assert (m["layer"], m["hook"], m["corpus"], m["split"]) == (layer, "resid_post", "toy", "train")
        assert m["dtype"] == "float16"
        np.testing.assert_array_equal(hv.cache_contexts(path), TOKENS[:n_ctx])
        x64 = x.astype(np.float64)
        mean = x64.mean(0)
        scale = np.sqrt(np.mean(np.sum((x64 - mean) ** 2, 1)) / CFG.d_model)
        src = CacheSource(path)
        np.testing.assert_allclose(src.normalizer.mean_D, mean, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(src.normalizer.scale, scale, rtol=1e-5)


@pytest.mark.parametrize("kill_at", [1, 4, 5])
def test_killed_harvest_resumes_without_duplicates(tmp_path, monkeypatch, kill_at):
    """Kill on the kill_at-th shard write (layers write in turn, so L1 may be shards ahead of L3), then resume."""
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
        hv.harvest(MODEL, TOKENS, HCFG, dirs)
    assert all(hv.cache_tokens(p) < 105 for p in dirs.values())
    monkeypatch.setattr(CacheWriter, "_write_shard", real_write)
    hv.harvest(MODEL, TOKENS, HCFG, dirs)
    for layer, path in dirs.items():
        m, x = _read(path)
        _assert_cache_equals(x, _reference(layer, 9))
        assert len(x) == 105
        assert [s["file"] for s in m["shards"]] == [f"shard_{i:06d}.npy" for i in range(len(m["shards"]))]
        assert not list(path.glob("*.tmp"))


def test_extending_a_cache_appends_the_next_contexts(tmp_path):
    dirs = _dirs(tmp_path)
    hv.harvest(MODEL, TOKENS, HCFG, dirs)
    hv.harvest(MODEL, TOKENS, dataclasses.replace(HCFG, num_tokens=130), dirs)
    _assert_cache_equals(_read(dirs[3])[1], _reference(3, _contexts_for(130)))


@pytest.mark.parametrize("change, match", [
    ({"layers": (4,)}, "layers"),
    ({"layers": (-1,)}, "layers"),
    ({"num_tokens": 10_000}, "asks for more"),
    ({"skip_first": 16}, "skip_first"),
])
def test_bad_config_fails_before_writing(tmp_path, change, match):
    cfg = dataclasses.replace(HCFG, **change)
    with pytest.raises(ValueError, match=match):
        hv.harvest(MODEL, TOKENS, cfg, {l: tmp_path / str(l) for l in cfg.layers})
    assert not any(tmp_path.iterdir())


def test_empty_corpus_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="toy/train"):
        hv.harvest(MODEL, TOKENS[:0], HCFG, _dirs(tmp_path))


def test_ensure_cache_reuses_a_big_enough_cache(tmp_path, monkeypatch):
    model = MODEL._replace(token_contexts=lambda name, split, ctx_len: TOKENS)
    monkeypatch.setattr(hv, "load_model", lambda name: model)
    kw = dict(root=str(tmp_path), model="tiny", ctx_len=16, batch_size=4)
    path = hv.ensure_cache("toy", "heldout", 30, layer=2, **kw)
    assert hv.cache_tokens(path) == 35  # 12 + 12 + 11 rows
    np.testing.assert_array_equal(hv.cache_contexts(path), TOKENS[:3])

    def no_model(name):
        raise AssertionError("the model must not be loaded when the cache is big enough")

    monkeypatch.setattr(hv, "load_model", no_model)
    assert hv.ensure_cache("toy", "heldout", 35, layer=2, **kw) == path


@pytest.mark.slow
def test_real_model_left_out_rows_are_the_attention_sinks(tmp_path):
    """SmolLM2 L14: position 0 and <|endoftext|> have norms in the thousands, every kept row is ordinary."""
    from lime_jax.gguf import find_smollm2_gguf

    try:
        find_smollm2_gguf()
    except FileNotFoundError:
        pytest.skip("SmolLM2 GGUF not installed")
    model = hv.load_model("smollm2-135m")
    tokens = np.random.default_rng(9).integers(1000, 20000, (2, 64)).astype(np.int32)
    tokens[0, 30] = tokens[1, 50] = 0
    cfg = hv.HarvestConfig(corpus="toy", split="train", num_tokens=100, ctx_len=64, batch_size=2)
    hv.harvest(model, tokens, cfg, {14: tmp_path})
    _, x = _read(tmp_path)
    h = np.asarray(model.residuals(model.params, tokens, (14,))[14])
    assert len(x) == 2 * 60 - 2 and np.linalg.norm(x.astype(np.float32), axis=1).max() < 1000
    assert min(np.linalg.norm(h[0, 0]), np.linalg.norm(h[0, 30]), np.linalg.norm(h[1, 50])) > 3000

"""Streaming from the model: the batches equal a brute-force stream built from one forward over every context."""
import copy

import jax
import numpy as np
import pytest

from jaxsae import adapter, data, stream
from lime_jax import model as lm
from lime_jax.adapter import from_llama
from lime_jax.config import tiny

CFG = tiny(vocab=300, n_layers=3, d_model=32, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64, max_len=16)
MODEL = from_llama("tiny", CFG, lm.init(jax.random.key(2), CFG))
TOKENS = np.random.default_rng(0).integers(1, CFG.vocab, (11, 16)).astype(np.int32)
TOKENS[2, 7] = TOKENS[5, 3] = TOKENS[8, 10] = TOKENS[8, 11] = 0  # dropped where >= skip_first: contexts give 12, 11 or 10 rows
LAYER = 1


def _reference_stream(seed, epochs):
    """Every context through the model at once, then a plain loop: epoch e visits contexts in rng([seed, e])'s order."""
    h = np.asarray(lm.residuals(MODEL.params, TOKENS, CFG, LAYER)[LAYER])
    keep = adapter.kept_positions(TOKENS, MODEL.skip_first, MODEL.exclude_tokens)
    rows = []
    for e in range(epochs):
        for c in np.random.default_rng([seed, e]).permutation(len(TOKENS)):
            rows += [h[c, t] for t in range(16) if keep[c, t]]
    return np.stack(rows)


@pytest.mark.parametrize("ctx_batch", [1, 3, 16])
def test_batches_equal_the_brute_force_stream(ctx_batch):
    src = stream.ModelSource(MODEL, TOKENS, LAYER, ctx_batch=ctx_batch)
    assert src.num_tokens == 11 * 12 - 3  # position 3 is skipped anyway
    want = _reference_stream(seed=5, epochs=3)
    B, start = 40, 2  # batches 2..8 (rows 80..360) cross the epoch boundaries at 129 and 258
    got = [b for _, b in zip(range(7), src.batches(B, seed=5, start=start))]
    np.testing.assert_allclose(np.concatenate(got), want[start * B : (start + 7) * B], rtol=1e-5, atol=1e-5)


def test_row_ranges_tile_the_batch_and_normalizer_fits_the_first_rows():
    src = stream.ModelSource(MODEL, TOKENS, LAYER, ctx_batch=4, normalizer_tokens=50)
    whole = [b for _, b in zip(range(5), src.batches(24, seed=1))]
    parts = [src.batches(24, seed=1, rows=r) for r in ((0, 5), (5, 17), (17, 24))]
    for want in whole:
        np.testing.assert_array_equal(np.concatenate([next(p) for p in parts]), want)
    h = np.asarray(lm.residuals(MODEL.params, TOKENS, CFG, LAYER)[LAYER])
    first = h[adapter.kept_positions(TOKENS, 4, (0,))][:50]  # corpus order: context 0's rows first
    ref = data.Normalizer.fit(first)
    np.testing.assert_allclose(src.normalizer.mean_D, ref.mean_D, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(src.normalizer.scale, ref.scale, rtol=1e-5)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="layer=7"):
        stream.ModelSource(MODEL, TOKENS, 7)
    with pytest.raises(ValueError, match="integer ids"):
        stream.ModelSource(MODEL, TOKENS.astype(np.float32), LAYER)
    with pytest.raises(ValueError, match="no position"):
        stream.ModelSource(MODEL, TOKENS[:, :4], LAYER)


def test_a_killed_streaming_run_resumes_to_the_same_result(tmp_path):
    from jaxsae import sae, train

    src = stream.ModelSource(MODEL, TOKENS, LAYER, ctx_batch=4)
    sae_cfg = sae.SAEConfig(d_in=CFG.d_model, d_sae=64, k=4)

    def cfg(out):
        return train.TrainConfig(num_steps=12, batch_size=24, n_seeds=2, checkpoint_every=4, log_every=4,
                                 warmup_steps=2, lr=3e-3, out_dir=str(tmp_path / out))

    whole = jax.device_get(train.fit(src, sae_cfg, cfg("whole")).params)

    class Killed(Exception):
        pass

    class DiesAfter:  # the same source, killed after 6 batches (checkpoint at step 4)
        d_in, num_tokens, normalizer = src.d_in, src.num_tokens, src.normalizer

        def batches(self, batch_size, seed, start=0):
            for i, b in enumerate(src.batches(batch_size, seed, start)):
                if i == 6:
                    raise Killed
                yield b

    with pytest.raises(Killed):
        train.fit(DiesAfter(), sae_cfg, cfg("resumed"))
    resumed = jax.device_get(train.fit(src, sae_cfg, cfg("resumed")).params)
    for name in whole:
        np.testing.assert_array_equal(resumed[name], whole[name], err_msg=name)


def test_one_forward_feeds_several_layers():
    """LayersSource: each layer's batches are the brute-force stream of that layer; one forward per chunk for all."""
    src = stream.LayersSource(MODEL, TOKENS, (0, 2), ctx_batch=3, normalizer_tokens=50)
    calls = []
    forward = src._forward
    src._forward = lambda params, t: calls.append(1) or forward(params, t)
    B, start = 40, 2
    got = [b for _, b in zip(range(7), src.batches(B, seed=5, start=start, rows=(10, 40)))]
    keep = adapter.kept_positions(TOKENS, MODEL.skip_first, MODEL.exclude_tokens)
    h = {layer: lm.residuals(MODEL.params, TOKENS, CFG, layer)[layer] for layer in (0, 2)}
    for layer in (0, 2):
        rows = np.stack([np.asarray(h[layer])[c, t] for e in range(3)
                         for c in np.random.default_rng([5, e]).permutation(len(TOKENS)) for t in range(16)
                         if keep[c, t]])
        want = [rows[(start + i) * B + 10 : (start + i + 1) * B] for i in range(7)]
        np.testing.assert_allclose(np.concatenate([g[layer] for g in got]), np.concatenate(want), rtol=1e-5,
                                   atol=1e-5)
        first = np.asarray(h[layer])[keep][:50]  # corpus order
        np.testing.assert_allclose(src.normalizers[layer].mean_D, first.mean(0), rtol=1e-5, atol=1e-5)
    one = stream.ModelSource(MODEL, TOKENS, 0, ctx_batch=3, normalizer_tokens=50)
    one_calls = []
    forward_one = one._forward
    one._forward = lambda params, t: one_calls.append(1) or forward_one(params, t)
    [b for _, b in zip(range(7), one.batches(B, seed=5, start=start, rows=(10, 40)))]
    assert len(calls) == len(one_calls) > 4  # as many forwards as one layer alone needs, across 3 epochs
    with pytest.raises(ValueError, match="distinct"):
        stream.LayersSource(MODEL, TOKENS, (1, 1))
    with pytest.raises(ValueError, match="layer=3"):
        stream.LayersSource(MODEL, TOKENS, (0, 3))


def _counted(src):
    """`src` with its forward passes counted in the returned list."""
    calls, forward = [], src._forward
    src._forward = lambda params, t: calls.append(1) or forward(params, t)
    return calls


def test_member_batches_are_each_layers_normalised_stream_in_blocks():
    """Member l*S + s is layer l on data seed s (per_seed) or on the one seed (same); a process's block of members
    and rows is that block of the whole batch."""
    src = stream.LayersSource(MODEL, TOKENS, (2, 0), ctx_batch=4, normalizer_tokens=50)
    ones = {layer: stream.ModelSource(MODEL, TOKENS, layer, ctx_batch=4, normalizer=src.normalizers[layer])
            for layer in (2, 0)}
    for seeds in ([7], [7, 8, 9]):
        whole = next(src.member_batches(24, 3, seeds, start=2))
        assert whole.shape == (6, 24, CFG.d_model) and whole.dtype == np.float32
        for i in range(6):
            layer, seed = (2, 0)[i // 3], seeds[i % 3 if len(seeds) > 1 else 0]
            raw = next(ones[layer].batches(24, seed, start=2))
            np.testing.assert_allclose(whole[i], (raw - src.normalizers[layer].mean_D) / src.normalizers[layer].scale,
                                       rtol=1e-6, atol=1e-6)
        block = next(src.member_batches(24, 3, seeds, slice(2, 5), start=2, rows=(6, 18)))
        np.testing.assert_array_equal(block, whole[2:5, 6:18])


@pytest.mark.parametrize("data_order", ["same", pytest.param("per_seed", marks=pytest.mark.slow)])
def test_two_layers_train_as_two_one_layer_runs_on_one_forward_per_batch(tmp_path, data_order):
    """L=2 ensembles of S=2 in one step: each layer's SAEs (and saved folders) equal a one-layer run's, and the
    run makes as many LM forwards as one one-layer run (one per chunk of contexts, whatever the number of layers)."""
    from jaxsae import io, sae, train

    sae_cfg = sae.SAEConfig(d_in=CFG.d_model, d_sae=64, k=4)

    def cfg(out):
        return train.TrainConfig(num_steps=6, batch_size=24, n_seeds=2, data_order=data_order, warmup_steps=2,
                                 lr=3e-3, log_every=3, checkpoint_every=0, out_dir=str(tmp_path / out))

    both = stream.LayersSource(MODEL, TOKENS, (2, 0), ctx_batch=4, normalizer_tokens=50)
    both_calls = _counted(both)
    params = jax.device_get(train.fit(both, sae_cfg, cfg("both")).params)
    for i, layer in enumerate((2, 0)):
        one = stream.ModelSource(MODEL, TOKENS, layer, ctx_batch=4, normalizer_tokens=50)
        one_calls = _counted(one)
        want = jax.device_get(train.fit(one, sae_cfg, cfg(f"one{layer}")).params)
        for name in want:
            np.testing.assert_allclose(params[name][2 * i : 2 * i + 2], want[name], rtol=1e-5, atol=1e-6,
                                       err_msg=f"layer {layer} {name}")
        for s in range(2):  # saved with that layer's normaliser folded in
            got_s, want_s = (io.load_any(tmp_path / d)[0] for d in (f"both/L{layer}/seed_{s}", f"one{layer}/seed_{s}"))
            for name in want_s:
                np.testing.assert_allclose(got_s[name], want_s[name], rtol=1e-5, atol=1e-6, err_msg=name)
        assert len(both_calls) == len(one_calls) > 2
    assert sorted(p.name for p in (tmp_path / "both").iterdir() if p.is_dir()) == ["L0", "L2", "checkpoints"]
    swapped = copy.copy(both)  # the same state shapes: only config.json tells the layers apart
    swapped.layers = (0, 2)
    with pytest.raises(ValueError, match=r"stream.layers: \[2, 0\] -> \[0, 2\]"):
        train.fit(swapped, sae_cfg, cfg("both"))


@pytest.mark.parametrize("argv, message", [
    (["source=synthetic", "layers=1,2"], "layers=1,2 needs source=model"),
    (["source=model", "layers=1,2", "heldout=some_cache"], "layers=1,2 needs source=model and no heldout="),
])
def test_layers_need_a_model_stream(tmp_path, argv, message):
    from jaxsae import train

    with pytest.raises(ValueError, match=message):
        train.main([*argv, f"out_dir={tmp_path / 'run'}"])
    assert not (tmp_path / "run").exists()

"""lime_jax.perplexity: sliding-window NLL against a per-token brute force, and the CLI."""
import json

import jax
import numpy as np
import pytest

from lime_jax import config, model, perplexity

CFG = config.tiny(vocab=61, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=8, d_ff=32, max_len=32)


def test_windows_score_every_target_once():
    for n, window, stride in [(5, 8, 3), (8, 8, 3), (23, 8, 3), (24, 6, 5)]:
        targets = [t for start, end, first in perplexity.window_bounds(n, window, stride) for t in range(first, end)]
        assert targets == list(range(1, n)), (n, window, stride)
        assert all(end - start <= window for start, end, _ in perplexity.window_bounds(n, window, stride))


def test_stride_one_equals_brute_force_bounded_context():
    """With stride 1, token t is predicted from exactly the min(t, window - 1) tokens before it."""
    params = model.init(jax.random.key(0), CFG)
    ids = np.random.default_rng(0).integers(0, CFG.vocab, 9)
    window = 4
    brute = []
    for t in range(1, len(ids)):
        ctx = ids[max(0, t - window + 1): t + 1][None].astype(np.int32)
        brute.append(float(model.token_nll(model.apply(params, ctx, CFG), ctx)[0, -1]))
    nll, count = perplexity.windowed_nll(params, CFG, ids, window, 1)
    assert count == len(ids) - 1
    assert nll == pytest.approx(np.mean(brute), rel=1e-5)


def test_short_text_equals_one_forward():
    params = model.init(jax.random.key(1), CFG)
    ids = np.random.default_rng(1).integers(0, CFG.vocab, 9)
    full = float(model.token_nll(model.apply(params, ids[None].astype(np.int32), CFG), ids[None]).mean())
    assert perplexity.windowed_nll(params, CFG, ids, 16, 8) == (pytest.approx(full, rel=1e-6), 8)


def test_bad_input(tmp_path):
    params = model.init(jax.random.key(2), CFG)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity.windowed_nll(params, CFG, np.array([3]), 8, 4)
    with pytest.raises(ValueError, match="stride=8, window=8"):
        perplexity.windowed_nll(params, CFG, np.arange(20), 8, 8)
    with pytest.raises(ValueError, match="max_len=32"):
        perplexity.windowed_nll(params, CFG, np.arange(20), 64, 8)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        perplexity.main([str(tmp_path / "missing.txt")])
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="no text"):
        perplexity.main([str(tmp_path / "empty.txt")])


@pytest.mark.slow
def test_cli_on_english_with_smollm2(tmp_path, capsys):
    (tmp_path / "en.txt").write_text(
        "Bees are flying insects closely related to wasps and ants, known for their role in pollination and, "
        "in the case of the best-known species, the western honey bee, for producing honey. There are over "
        "20,000 known species of bees, found on every continent except Antarctica, in every habitat on the "
        "planet that contains insect-pollinated flowering plants.")
    perplexity.main([str(tmp_path / "en.txt"), "--max-tokens", "60", "window=40", "stride=24"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["model"] == "SmolLM2-135M-Instruct.Q4_1" and out["tokens"] == 59
    assert 1.5 < out["nll_per_token"] < 4.0

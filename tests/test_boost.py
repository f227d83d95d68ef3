"""SAE Boost: residual loss vs a numpy reference, frozen base, boosted == stitched, provenance checks."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsae import boost, io, sae, train
from jaxsae.data import ArraySource, Normalizer

D, M_BASE, M_RES = 12, 24, 8


def _jumprelu_base(seed=0, b_dec_scale=0.3):
    """A random JumpReLU base SAE with a nonzero decoder bias and per-latent thresholds."""
    cfg = sae.SAEConfig(d_in=D, d_sae=M_BASE, activation="jumprelu", aux_k=0)
    rng = np.random.default_rng(seed)
    params = {
        "W_enc": (rng.standard_normal((D, M_BASE)) / np.sqrt(D)).astype(np.float32),
        "b_enc": (rng.standard_normal(M_BASE) * 0.1).astype(np.float32),
        "W_dec": (rng.standard_normal((M_BASE, D)) / np.sqrt(D)).astype(np.float32),
        "b_dec": (rng.standard_normal(D) * b_dec_scale).astype(np.float32),
        "threshold": rng.uniform(0.0, 0.3, M_BASE).astype(np.float32),
    }
    return params, cfg


def _residual(base_params, seed, activation="jumprelu", layer=14, k=2):
    cfg = sae.SAEConfig(d_in=D, d_sae=M_RES, activation=activation, k=k, aux_k=0, decoder_bias=False)
    rng = np.random.default_rng(100 + seed)
    params = {
        "W_enc": (rng.standard_normal((D, M_RES)) / np.sqrt(D)).astype(np.float32),
        "b_enc": (rng.standard_normal(M_RES) * 0.1).astype(np.float32),
        "W_dec": (rng.standard_normal((M_RES, D)) / np.sqrt(D)).astype(np.float32),
        "b_dec": np.zeros(D, np.float32),
        "threshold": rng.uniform(0.0, 0.3, M_RES).astype(np.float32),
    }
    return boost.Residual(params, cfg, boost.ResidualInfo(boost.params_hash(base_params), layer, D))


# --- independent numpy references -------------------------------------------------------------------
def np_jumprelu_apply(p, x, decoder_bias=True):
    b = p["b_dec"] if decoder_bias else 0.0
    pre = (x - b) @ p["W_enc"] + p["b_enc"]
    acts = np.where(pre > p["threshold"], pre, 0.0)
    return acts @ p["W_dec"] + b


def np_batchtopk_apply(p, x, k):
    pre = np.maximum(x @ p["W_enc"] + p["b_enc"], 0.0)  # no decoder bias: the encoder reads x
    flat = pre.ravel()
    keep = np.argsort(-flat, kind="stable")[: x.shape[0] * k]
    acts = np.zeros_like(flat)
    acts[keep] = flat[keep]
    return acts.reshape(pre.shape) @ p["W_dec"]


def test_residual_loss_matches_numpy_reference():
    base_p, base_cfg = _jumprelu_base()
    res = _residual(base_p, 0, activation="batchtopk", k=3)
    x = np.random.default_rng(1).standard_normal((32, D)).astype(np.float32)
    loss, metrics = boost.residual_loss_fn(base_p, base_cfg, res.cfg)(res.params, jnp.asarray(x), None)
    e = x - np_jumprelu_apply(base_p, x)
    want = np.mean((e - np_batchtopk_apply(res.params, x, 3)) ** 2)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    var = np.sum((x - x.mean(0)) ** 2)
    np.testing.assert_allclose(float(metrics["fvu_base"]), np.sum(e**2) / var, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["l0"]), 3.0)


def test_no_gradient_reaches_the_base():
    base_p, base_cfg = _jumprelu_base()
    res = _residual(base_p, 0, activation="batchtopk", k=3)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((32, D)), jnp.float32)

    def loss_of(base, params):
        return boost.residual_loss_fn(base, base_cfg, res.cfg)(params, x, None)[0]

    g_base, g_res = jax.grad(loss_of, argnums=(0, 1))(jax.tree.map(jnp.asarray, base_p), res.params)
    for name, g in g_base.items():
        assert not np.any(np.asarray(g)), f"gradient reached the frozen base's {name}"
    assert np.any(np.asarray(g_res["W_dec"])), "the residual itself must get a gradient"


def test_fit_trains_residual_and_leaves_base_untouched(tmp_path):
    rng = np.random.default_rng(3)
    # A domain whose tokens use directions the base never saw: the base misses them, the residual learns them.
    general_FxD = rng.standard_normal((16, D))
    domain_FxD = rng.standard_normal((6, D))
    dirs = np.concatenate([general_FxD, domain_FxD])
    idx = rng.integers(0, len(dirs), (2048, 3))
    x = np.einsum("nk,nkd->nd", rng.exponential(1.0, (2048, 3)), dirs[idx]).astype(np.float32)
    base_p, base_cfg = _jumprelu_base(b_dec_scale=0.0)
    base_before = jax.tree.map(np.array, base_p)
    res_cfg = boost.residual_config(base_cfg, d_sae=16, k=3, aux_k=4)
    train_cfg = train.TrainConfig(lr=3e-3, warmup_steps=5, batch_size=128, num_steps=60, n_seeds=1,
                                  log_every=20, checkpoint_every=0, out_dir=str(tmp_path / "res"))
    source = ArraySource(x, Normalizer(np.zeros(D, np.float32), 1.0))
    state = train.fit(source, res_cfg, train_cfg, loss_fn=boost.residual_loss_fn(base_p, base_cfg, res_cfg))
    for name in base_before:
        np.testing.assert_array_equal(base_p[name], base_before[name])
    res_params = jax.tree.map(lambda a: np.asarray(a[0]), state.params)
    np.testing.assert_array_equal(res_params["b_dec"], 0.0)
    e = x - np_jumprelu_apply(base_p, x)
    err_before = np.sum(e**2)
    err_after = np.sum((e - np_batchtopk_apply(res_params, x, 3)) ** 2)
    assert err_after < 0.8 * err_before, (err_after, err_before)


def test_boosted_matches_reference_and_stitched():
    base_p, base_cfg = _jumprelu_base()
    residuals = [_residual(base_p, 0), _residual(base_p, 1)]
    x = np.random.default_rng(4).standard_normal((64, D)).astype(np.float32)
    want = np_jumprelu_apply(base_p, x) + sum(np_jumprelu_apply(r.params, x, decoder_bias=False) for r in residuals)
    got = boost.boosted_apply(base_p, base_cfg, residuals, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    params, cfg = boost.stitch(base_p, base_cfg, residuals)
    assert cfg.d_sae == M_BASE + 2 * M_RES and cfg.activation == "jumprelu"
    np.testing.assert_allclose(np.asarray(sae.apply(params, jnp.asarray(x), cfg)), want, rtol=1e-5, atol=1e-5)


def test_stitched_and_residual_round_trip_through_saelens_files(tmp_path):
    base_p, base_cfg = _jumprelu_base()
    residuals = [_residual(base_p, 0), _residual(base_p, 1)]
    norm = Normalizer(np.arange(D, dtype=np.float32), 2.0)
    io.save_saelens(tmp_path / "stitched", *boost.stitch(base_p, base_cfg, residuals), norm)
    params, cfg, norm2 = io.load_saelens(tmp_path / "stitched")
    x = np.random.default_rng(5).standard_normal((16, D)).astype(np.float32)
    want = np.asarray(boost.boosted_apply(base_p, base_cfg, residuals, jnp.asarray(x)))
    np.testing.assert_allclose(np.asarray(sae.apply(params, jnp.asarray(x), cfg)), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(norm2.mean_D, norm.mean_D)
    boost.save_residual(tmp_path / "res0", residuals[0], norm)
    loaded, _ = boost.load_residual(tmp_path / "res0")
    assert loaded.info == residuals[0].info and loaded.cfg == residuals[0].cfg
    with pytest.raises(ValueError, match="not a residual"):
        boost.load_residual(tmp_path / "stitched")


def test_mismatches_raise_clear_errors():
    base_p, base_cfg = _jumprelu_base()
    other_p, _ = _jumprelu_base(seed=9)
    x = jnp.zeros((4, D))
    with pytest.raises(ValueError, match="trained against base"):
        boost.boosted_apply(base_p, base_cfg, [_residual(other_p, 0)], x)
    with pytest.raises(ValueError, match="different layers"):
        boost.stitch(base_p, base_cfg, [_residual(base_p, 0, layer=14), _residual(base_p, 1, layer=7)])
    r = _residual(base_p, 0)
    wide = r._replace(cfg=dataclasses.replace(r.cfg, d_in=D + 1), info=dataclasses.replace(r.info, d_in=D + 1))
    with pytest.raises(ValueError, match="d_in=13"):
        boost.boosted_apply(base_p, base_cfg, [wide], x)
    with pytest.raises(ValueError, match="convert it with sae.batchtopk_to_jumprelu"):
        boost.stitch(base_p, base_cfg, [_residual(base_p, 0, activation="batchtopk")])
    with pytest.raises(ValueError, match="decoder_bias=False"):
        boost.residual_loss_fn(base_p, base_cfg, dataclasses.replace(base_cfg, activation="batchtopk", k=2))


def test_extend_keeps_the_base_latents_first():
    base_p, base_cfg = _jumprelu_base()
    params, cfg = boost.extend(jax.random.key(0), base_p, base_cfg, new_latents=5, k=4)
    assert cfg.d_sae == M_BASE + 5 and cfg.activation == "batchtopk" and cfg.k == 4
    np.testing.assert_array_equal(np.asarray(params["W_enc"][:, :M_BASE]), base_p["W_enc"])
    np.testing.assert_array_equal(np.asarray(params["W_dec"][:M_BASE]), base_p["W_dec"])
    np.testing.assert_allclose(np.linalg.norm(np.asarray(params["W_dec"][M_BASE:]), axis=1), 1.0, rtol=1e-5)
    assert "threshold" not in params


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    """(config, summary) of the experiment on synthetic data; its out_dir keeps the base and residual runs, which
    the length-curve test resumes (finished: restored, not retrained) instead of training the same ones again."""
    from experiments import boost as exp

    tmp_path = tmp_path_factory.mktemp("boost")
    cfg = exp.BoostExperimentConfig(
        synthetic=True, synthetic_d_in=16, synthetic_tokens=1024, base_d_sae=32, base_k=2, base_steps=8,
        res_d_sae=8, res_k=1, res_steps=4, extend_latents=8, budgets=(128,), batch_size=64, eval_tokens=256,
        convert_tokens=128, out_dir=str(tmp_path / "runs"), results_dir=str(tmp_path / "results"))
    return cfg, exp.run(cfg)


shares_run = pytest.mark.xdist_group("boost_synthetic_run")  # one worker runs both: the run is made once


@pytest.mark.slow
@shares_run
def test_experiment_end_to_end_on_synthetic_data(synthetic_run):
    from experiments import boost as exp

    cfg, summary = synthetic_run
    assert set(summary["domains"]) == {"code", "russian"} == set(summary["all_residuals"])
    for rows in summary["domains"].values():
        assert set(rows) == {"base", "boosted", "finetuned", "extended"}
        for m in rows.values():
            assert {"domain_ev", "general_ev", "domain_ce_delta", "general_ce_delta"} <= set(m)
    assert summary["stitched_vs_boosted_max_abs_diff"] < 1e-4
    # The base is the same model in every domain's row and in the sweep.
    assert summary["domains"]["code"]["base"]["general_ev"] == summary["domains"]["russian"]["base"]["general_ev"]
    assert [r["unique_tokens"] for r in summary["budget_sweep"]["rows"]] == [128, 1024]
    assert "| base alone |" in exp.report(summary)
    loaded, _ = boost.load_residual(f"{cfg.out_dir}/residual_code/residual")
    assert loaded.cfg.activation == "jumprelu" and loaded.info.layer == cfg.layer


def test_experiment_rejects_a_sweep_domain_it_does_not_train():
    from experiments import boost as exp

    with pytest.raises(ValueError, match="sweep_domain='german'"):
        exp.BoostExperimentConfig(sweep_domain="german")


def _write_cache(root, corpus, split, n, layer=14):
    from jaxsae import data, harvest

    with data.CacheWriter(harvest.cache_dir(corpus, split, layer, str(root)), {"layer": layer, "skip_first": 4}, D) as w:
        if n:
            w.add(np.random.default_rng(n).standard_normal((n, D)).astype(np.float32))


@pytest.mark.parametrize("code_train_tokens, code_layer, match", [
    (0, 14, "is empty"), (10, 14, "holds 10 tokens, fewer than one batch"), (256, 7, "holds layer 7")])
def test_experiment_rejects_bad_domain_caches(tmp_path, code_train_tokens, code_layer, match):
    from experiments import boost as exp

    for corpus, split in [("general", "train"), ("general", "heldout"), ("code", "heldout")]:
        _write_cache(tmp_path, corpus, split, 256)
    _write_cache(tmp_path, "code", "train", code_train_tokens, layer=14)
    if code_layer != 14:  # a cache harvested at another layer, placed where layer 14's should be
        import json
        from jaxsae import harvest
        m_path = harvest.cache_dir("code", "train", 14, str(tmp_path)) / "manifest.json"
        m_path.write_text(json.dumps({**json.loads(m_path.read_text()), "layer": code_layer}))
    cfg = exp.BoostExperimentConfig(domains=("code",), sweep_domain="code", root=str(tmp_path), batch_size=64,
                                    budgets=(64,), ce_contexts=0)
    with pytest.raises(ValueError, match=match):
        exp._cache_corpora(cfg)


def test_threshold_at_a_general_firing_rate_matches_a_brute_force_count():
    rng = np.random.default_rng(5)
    res = _residual(_jumprelu_base()[0], 0, activation="batchtopk")
    x = rng.standard_normal((500, D)).astype(np.float32)
    pre = x @ res.params["W_enc"] + res.params["b_enc"]  # no decoder bias: the encoder reads x
    for rate in (0.0, 0.01, 0.1, 0.37):
        params, cfg = boost.jumprelu_at_firing_rate(res.params, res.cfg, x, rate, chunk=128)
        assert cfg.activation == "jumprelu" and np.ptp(np.asarray(params["threshold"])) == 0
        theta = float(params["threshold"][0])
        # brute force: count the rows in which some latent clears the threshold
        fired = sum(any(pre[n, m] > theta for m in range(M_RES)) for n in range(len(x)))
        assert fired == int(np.floor(rate * len(x))), rate
        stats = boost.firing(params, cfg, x, chunk=128)
        assert stats["any"] == pytest.approx(fired / len(x))
        assert stats["l0"] == pytest.approx(np.mean(np.sum(pre > theta, axis=1)))
    # a threshold that would have to be negative is clamped to 0 (then fewer rows fire than asked)
    shifted = {**res.params, "b_enc": res.params["b_enc"] - 100.0}
    params, _ = boost.jumprelu_at_firing_rate(shifted, res.cfg, x, 0.5)
    assert float(params["threshold"][0]) == 0.0
    with pytest.raises(ValueError, match="rate must lie"):
        boost.jumprelu_at_firing_rate(res.params, res.cfg, x, 1.0)
    with pytest.raises(ValueError, match="expected a batchtopk"):
        boost.jumprelu_at_firing_rate(res.params, dataclasses.replace(res.cfg, activation="jumprelu"), x, 0.1)


@pytest.mark.slow
@shares_run
def test_length_curve_on_synthetic_data(synthetic_run, tmp_path):
    from experiments import boost as exp

    # The same base and residuals (restored from the shared run's out_dir); only the curve's runs are new.
    cfg = dataclasses.replace(synthetic_run[0], budgets=(), baselines=False, res_curve=(2, 4, 6), curve_caps=(6, 4),
                              mix_steps=(4,), general_fire_rate=0.25, results_dir=str(tmp_path / "results"))
    summary = exp.run(cfg)
    assert set(summary["domains"]["code"]) == {"base", "boosted"}  # no baselines
    points = summary["residual_steps"]["points"]
    assert [(p["steps"], p["domain"], p["arm"]) for p in points] == [
        (2, "code", "domain"), (2, "russian", "domain"), (4, "code", "domain"), (4, "russian", "domain"),
        (4, "code", "mixed"), (4, "russian", "mixed"), (6, "code", "domain")]
    for p in points:
        g = p["general_rate_threshold"]
        assert 0.0 <= g["residual_fires_general"] <= 1.0 and g["residual_l0_general"] >= g["residual_fires_general"]
        assert p["passes"] == pytest.approx(p["steps"] * 64 / p["train_tokens"])
    # the general-rate threshold lets at most ~25% of (held-out) general tokens fire, unlike a domain threshold
    assert np.mean([p["general_rate_threshold"]["residual_fires_general"] for p in points]) < 0.5
    # a rerun resumes: every point is read back, nothing retrained
    again = exp.run(dataclasses.replace(cfg, curve_cached_only=True))
    assert again["residual_steps"]["points"] == points and again["residual_steps"]["missing"] == []
    longer = exp.run(dataclasses.replace(cfg, res_curve=(2, 4, 6, 8), curve_caps=(8, 4), curve_cached_only=True))
    assert longer["residual_steps"]["missing"] == ["domain/code@8"]
    assert len(summary["base_curve"]) >= 2 and "Length curve" in exp.report(summary)
    exp.plot_curve(summary, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 1000


def test_curve_config_errors():
    from experiments import boost as exp

    with pytest.raises(ValueError, match="res_curve must be increasing"):
        exp.BoostExperimentConfig(res_curve=(300, 100))
    with pytest.raises(ValueError, match="one cap per domain"):
        exp.BoostExperimentConfig(res_curve=(100,), curve_caps=(100,))
    with pytest.raises(ValueError, match="mix_steps"):
        exp.BoostExperimentConfig(res_curve=(100,), mix_steps=(300,))

"""The synthetic generator's structure, and the recovery metrics on hand-built dictionaries."""
import jax
import numpy as np
import pytest

from jaxsae import synthetic

CFG = synthetic.SyntheticConfig(d=32, n_atomic=20, p_atomic=0.1, n_groups=3, group_rank=4, p_group=0.2, noise=0.0)


def test_groups_have_the_rank_asked_for():
    model = synthetic.make_model(jax.random.key(0), CFG)
    only_group = synthetic.SyntheticConfig(d=32, n_atomic=20, p_atomic=0.0, n_groups=3, group_rank=4, p_group=1.0, noise=0.0)
    x = np.asarray(synthetic.sample(jax.random.key(1), {**model}, only_group, 200), np.float64)
    for g in range(3):
        B = np.asarray(model["groups_GxRxD"][g], np.float64)
        np.testing.assert_allclose(B @ B.T, np.eye(4), atol=1e-5)
        # One group alone: samples projected on it span exactly r dimensions.
        single = {"atomic_AxD": model["atomic_AxD"], "groups_GxRxD": model["groups_GxRxD"][g:g + 1]}
        xs = np.asarray(synthetic.sample(jax.random.key(g), single,
                                         synthetic.SyntheticConfig(**{**only_group.__dict__, "n_groups": 1}), 100))
        assert np.linalg.matrix_rank(xs, tol=1e-4) == 4
    # All three groups together span 3·r dimensions.
    assert np.linalg.matrix_rank(x, tol=1e-4) == 12


def test_atomic_features_are_unit_and_sparse():
    model = synthetic.make_model(jax.random.key(0), CFG)
    np.testing.assert_allclose(np.linalg.norm(model["atomic_AxD"], axis=1), 1.0, atol=1e-5)
    only_atomic = synthetic.SyntheticConfig(d=32, n_atomic=20, p_atomic=0.1, n_groups=3, group_rank=4, p_group=0.0, noise=0.0)
    x = np.asarray(synthetic.sample(jax.random.key(2), model, only_atomic, 4000))
    coef = x @ np.linalg.pinv(np.asarray(model["atomic_AxD"]))  # exact: 20 independent directions in R^32
    firing = np.abs(coef) > 1e-3
    assert abs(firing.mean() - 0.1) < 0.01
    assert coef[firing].min() > 0.5 - 1e-3 and coef[firing].max() < 1.5 + 1e-3


def test_recovery_of_a_ground_truth_dictionary():
    """Atomic directions + a freshly rotated basis of every group per seed: subspaces exact, latents not."""
    model = synthetic.make_model(jax.random.key(0), CFG)
    rng = np.random.default_rng(0)
    decs, rots = [], []
    for _ in range(3):
        rots.append([np.linalg.qr(rng.normal(size=(4, 4)))[0] for _ in range(3)])
        groups = [R @ np.asarray(B) for R, B in zip(rots[-1], model["groups_GxRxD"])]
        decs.append(np.concatenate([np.asarray(model["atomic_AxD"])] + groups))
    out = synthetic.recovery(np.stack(decs), model, CFG, tau=0.7)
    assert out["atomic_latent_recovery"] == pytest.approx(1.0, abs=1e-5)
    assert out["atomic_frac_recovered"] == 1.0
    assert out["atomic_latent_stability"] == 1.0
    assert out["lowrank_subspace_overlap"] == pytest.approx(1.0, abs=1e-4)
    assert out["lowrank_subspace_containment"] == pytest.approx(1.0, abs=1e-4)
    assert out["lowrank_latents_per_group"] == 4
    # Group latent i of seed s is matched in seed t iff row i of R_s R_tᵀ holds an entry ≥ 0.7 in magnitude
    # (other groups and atomic directions are far away in R^32 for this model).
    ref = np.mean([np.mean([np.abs(rots[s][g] @ rots[t][g].T)[i].max() >= 0.7 for t in range(3) if t != s])
                   for s in range(3) for g in range(3) for i in range(4)])
    assert out["lowrank_latent_stability"] == pytest.approx(ref)
    assert out["lowrank_latent_stability"] < out["atomic_latent_stability"]


def test_identical_group_bases_beat_the_random_rotation_baseline():
    model = synthetic.make_model(jax.random.key(0), CFG)
    dec = np.concatenate([np.asarray(model["atomic_AxD"])] + [np.asarray(B) for B in model["groups_GxRxD"]])
    out = synthetic.recovery(np.stack([dec, dec, dec]), model, CFG)
    assert out["lowrank_latent_stability"] == 1.0
    assert out["lowrank_latent_stability_random_rotation"] < 0.9
    # Rotating inside a group's subspace keeps the subspace and the latents' norms.
    group_M = synthetic.assign_latents(dec, model)
    turned = np.asarray(synthetic.rotate_within_groups(jax.random.key(1), dec, group_M, model))
    np.testing.assert_allclose(turned[group_M < 0], dec[group_M < 0])
    np.testing.assert_allclose(np.linalg.norm(turned, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(synthetic.assign_latents(turned, model), group_M)


def test_missing_group_latents_lower_the_overlap():
    model = synthetic.make_model(jax.random.key(0), CFG)
    half = [np.asarray(B)[:2] for B in model["groups_GxRxD"]]  # 2 of 4 basis vectors per group
    dec = np.concatenate([np.asarray(model["atomic_AxD"])] + half)
    out = synthetic.recovery(np.stack([dec, dec]), model, CFG)
    assert out["lowrank_subspace_overlap"] == pytest.approx(0.5, abs=1e-4)
    assert out["lowrank_subspace_containment"] == pytest.approx(0.5, abs=1e-4)


def test_bad_config_raises():
    with pytest.raises(ValueError, match="group_rank"):
        synthetic.SyntheticConfig(d=4, group_rank=5)
    with pytest.raises(ValueError, match="p_group"):
        synthetic.SyntheticConfig(p_group=1.5)

"""8 fake CPU devices: every (seed, data, model) mesh gives the 1-device result; bad sizes are named."""
import dataclasses

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxsae import data, sae, sharding, train

SAE = sae.SAEConfig(d_in=8, d_sae=16, k=3, aux_k=4)
TRAIN = train.TrainConfig(lr=3e-3, warmup_steps=1, batch_size=32, num_steps=5, n_seeds=8, data_order="per_seed",
                          dead_after_tokens=64)
STEPS = 5


def _run(mesh):
    x = np.random.default_rng(0).normal(size=(STEPS, 8, 32, 8)).astype(np.float32)
    step = train.make_train_step(SAE, TRAIN, mesh=mesh)
    state = train.init_state(jax.random.key(0), SAE, TRAIN)
    if mesh is not None:
        state = jax.device_put(state, sharding.state_shardings(mesh, state))
    for t in range(STEPS):
        state, metrics = step(state, x[t])
    return state, metrics


@pytest.fixture(scope="module")
def reference():
    return jax.device_get(_run(None))


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 4, 2)])
def test_sharded_equals_single_device(reference, shape):
    mesh = sharding.make_mesh(*shape)
    state, metrics = _run(mesh)
    assert state.params["W_enc"].sharding.spec == P("seed", None, "model")
    assert state.opt_state[1][0].nu["W_dec"].sharding.spec == P("seed", "model", None)
    assert state.tokens_since_fired.sharding.spec == P("seed", "model")
    # fp32 reductions split across devices reorder sums: agree to rtol 1e-5 after 5 steps.
    for a, b in zip(jax.tree.leaves(jax.device_get(state)), jax.tree.leaves(reference[0])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["loss"], reference[1]["loss"], rtol=1e-5)


def test_sizes_that_do_not_divide_are_named():
    with pytest.raises(ValueError, match="seed=3 x data=3 x model=1 = 9 devices, but 8"):
        sharding.make_mesh(3, 3, 1)
    mesh = sharding.make_mesh(2, 2, 2)
    with pytest.raises(ValueError, match="n_seeds=3 does not divide over mesh axis 'seed' of size 2"):
        train.make_train_step(SAE, dataclasses.replace(TRAIN, n_seeds=3), mesh=mesh)
    with pytest.raises(ValueError, match="d_sae=15 does not divide over mesh axis 'model' of size 2"):
        train.make_train_step(dataclasses.replace(SAE, d_sae=15), TRAIN, mesh=mesh)
    with pytest.raises(ValueError, match=r"batch_size=31 does not divide over mesh axes \('data', 'fsdp'\) of size 2"):
        train.make_train_step(SAE, dataclasses.replace(TRAIN, batch_size=31), mesh=mesh)


class _Killed(Exception):
    pass


def _dies_after(source, n):
    """`source` whose batch stream raises after `n` batches, like a job killed mid-run."""
    killed = data.ArraySource(source.x_NxD, source.normalizer)

    def batches(batch_size, seed, start=0):
        for i, b in enumerate(source.batches(batch_size, seed, start)):
            if i == n:
                raise _Killed
            yield b

    killed.batches = batches
    return killed


def test_resume_on_another_mesh(tmp_path):
    """A run killed on one device and resumed on a (2, 2, 2) mesh ends where an uninterrupted run does."""
    source = data.synthetic_source(8, 200, n_features=20, k=2, seed=0)
    cfg = dataclasses.replace(TRAIN, n_seeds=2, batch_size=16, num_steps=8, checkpoint_every=4)
    whole = train.fit(source, SAE, dataclasses.replace(cfg, out_dir=str(tmp_path / "whole")))
    with pytest.raises(_Killed):
        train.fit(_dies_after(source, 6), SAE, dataclasses.replace(cfg, out_dir=str(tmp_path / "moved")))
    moved = train.fit(source, SAE, dataclasses.replace(cfg, out_dir=str(tmp_path / "moved"), mesh_seed=2,
                                                       mesh_data=2, mesh_model=2))
    assert moved.params["W_dec"].sharding.spec == P("seed", "model", None)
    for a, b in zip(jax.tree.leaves(jax.device_get(whole)), jax.tree.leaves(jax.device_get(moved))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_shared_batch_over_the_data_axis_compiles_and_matches():
    """One batch for all seeds (data_order=same), split over data: XLA:CPU once aborted compiling this step."""
    cfg = dataclasses.replace(TRAIN, data_order="same", n_seeds=4)
    x = np.random.default_rng(1).normal(size=(3, 32, 8)).astype(np.float32)

    def run(mesh):
        step = train.make_train_step(SAE, cfg, mesh=mesh)
        state = train.init_state(jax.random.key(0), SAE, cfg)
        if mesh is not None:
            state = jax.device_put(state, sharding.state_shardings(mesh, state))
        for t in range(3):
            state, _ = step(state, x[t])
        return jax.device_get(state.params)

    ref, got = run(None), run(sharding.make_mesh(1, 4, 1))
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-5, atol=1e-6)

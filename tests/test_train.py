"""Seed-ensemble trainer: vmapped == separate runs, firing stats, schedule, kill-and-resume == uninterrupted."""
import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsae import data, io, sae, train

SAE = sae.SAEConfig(d_in=8, d_sae=32, k=3, aux_k=4)
TRAIN = train.TrainConfig(lr=3e-3, warmup_steps=2, batch_size=16, num_steps=5, n_seeds=3, data_order="per_seed",
                          dead_after_tokens=32, log_every=1)


def _copy(tree):
    return jax.tree.map(lambda a: np.array(a), tree)


def test_ensemble_equals_separate_single_seed_runs():
    x = np.random.default_rng(0).normal(size=(5, 3, 16, 8)).astype(np.float32)
    state = train.init_state(jax.random.key(0), SAE, TRAIN)
    separate = [jax.tree.map(lambda a: np.array(a[s : s + 1]), state) for s in range(3)]
    step3 = train.make_train_step(SAE, TRAIN)
    step1 = train.make_train_step(SAE, dataclasses.replace(TRAIN, n_seeds=1))
    for t in range(5):
        state, m3 = step3(state, x[t])
        for s in range(3):
            separate[s], m1 = step1(separate[s], x[t, s : s + 1])
            np.testing.assert_allclose(m1["loss"][0], m3["loss"][s], rtol=1e-5)
    assert float(np.max(m3["dead_frac"])) > 0, "some latents should be dead so AuxK is exercised"
    for s in range(3):
        for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(separate[s])):
            np.testing.assert_allclose(np.asarray(a)[s], np.asarray(b)[0], rtol=1e-5, atol=1e-6)
    assert not np.allclose(state.params["W_enc"][0], state.params["W_enc"][1]), "seeds must differ"


def test_shared_batch_equals_per_seed_copies():
    x = np.random.default_rng(1).normal(size=(16, 8)).astype(np.float32)
    same = dataclasses.replace(TRAIN, data_order="same")
    a, _ = train.make_train_step(SAE, same)(train.init_state(jax.random.key(1), SAE, same), x)
    b, _ = train.make_train_step(SAE, TRAIN)(train.init_state(jax.random.key(1), SAE, TRAIN), np.stack([x] * 3))
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match=r"batch must have shape \(16, 8\).*\(3, 16, 8\)"):
        train.make_train_step(SAE, same)(train.init_state(jax.random.key(1), SAE, same), np.stack([x] * 3))


def test_firing_stats_match_numpy_topk():
    cfg = dataclasses.replace(TRAIN, data_order="same")
    xs = np.random.default_rng(2).normal(size=(2, 16, 8)).astype(np.float32)
    state = train.init_state(jax.random.key(2), SAE, cfg)
    step = train.make_train_step(SAE, cfg)
    fired = []
    for x in xs:
        p = _copy(state.params)
        pre = np.einsum("sbd,sdm->sbm", x[None] - p["b_dec"][:, None], p["W_enc"]) + p["b_enc"][:, None]
        top = np.argsort(-pre, axis=-1)[..., :3]
        f = np.zeros((3, 32))
        for s in range(3):
            for b in range(16):
                for m in top[s, b]:
                    f[s, m] += pre[s, b, m] > 0
        fired.append(f)
        state, _ = step(state, x)
    np.testing.assert_array_equal(state.fire_count, fired[0] + fired[1])
    want_since = np.where(fired[1] > 0, 0, np.where(fired[0] > 0, 16, 32))
    np.testing.assert_array_equal(state.tokens_since_fired, want_since)
    np.testing.assert_array_equal(state.step, [2, 2, 2])


@pytest.mark.parametrize("decay", ["cosine", "linear", "constant"])
def test_lr_schedule_formula(decay):
    cfg = train.TrainConfig(lr=1.0, warmup_steps=4, num_steps=14, decay=decay, final_lr_frac=0.2)
    lr = train.lr_schedule(cfg)
    for t in range(15):
        if t < 4:
            want = t / 4
        else:
            frac = (t - 4) / 10
            want = {"cosine": 0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * frac)), "linear": 1 - 0.8 * frac,
                    "constant": 1.0}[decay]
        assert math.isclose(float(lr(t)), want, rel_tol=1e-5, abs_tol=1e-6), (t, float(lr(t)), want)


class _Killed(Exception):
    pass


class _DiesAfter:
    """A source whose batch stream raises after `n` batches, like a job killed mid-run."""

    def __init__(self, source, n):
        self.source, self.n = source, n
        self.d_in, self.num_tokens, self.normalizer = source.d_in, source.num_tokens, source.normalizer

    def batches(self, batch_size, seed, start=0):
        for i, b in enumerate(self.source.batches(batch_size, seed, start)):
            if i == self.n:
                raise _Killed
            yield b


def test_killed_and_resumed_fit_equals_uninterrupted(tmp_path):
    """data_order=same here; test_sharding resumes a per_seed run on another mesh."""
    source = data.synthetic_source(8, 200, n_features=20, k=2, seed=0)
    cfg = dataclasses.replace(TRAIN, n_seeds=2, num_steps=12, checkpoint_every=4, log_every=2, data_order="same")
    whole = train.fit(source, SAE, dataclasses.replace(cfg, out_dir=str(tmp_path / "whole")))
    resumed_dir = str(tmp_path / "resumed")
    with pytest.raises(_Killed):
        train.fit(_DiesAfter(source, 7), SAE, dataclasses.replace(cfg, out_dir=resumed_dir))
    assert sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()) == ["4"]
    resumed = train.fit(source, SAE, dataclasses.replace(cfg, out_dir=resumed_dir))
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(a, b)  # bit-identical
    logs = [(tmp_path / d / "metrics.jsonl").read_text().splitlines() for d in ("whole", "resumed")]
    assert logs[0] == logs[1] and [json.loads(ln)["step"] for ln in logs[0]] == [2, 4, 6, 8, 10, 12]
    params, sae_cfg, normalizer = io.load_saelens(tmp_path / "resumed" / "seed_1")
    assert sae_cfg == SAE
    np.testing.assert_array_equal(params["W_dec"], np.asarray(resumed.params["W_dec"][1]))
    np.testing.assert_allclose(normalizer.mean_D, source.normalizer.mean_D)
    with pytest.raises(ValueError, match="another configuration.*train.lr"):
        train.fit(source, SAE, dataclasses.replace(cfg, out_dir=resumed_dir, lr=1.0))


def test_per_seed_data_orders_differ_and_are_deterministic():
    cfg = train.TrainConfig(n_seeds=4, data_order="per_seed", seed=7)
    assert cfg.data_seeds == train.TrainConfig(n_seeds=4, data_order="per_seed", seed=7).data_seeds
    assert len(set(cfg.data_seeds)) == 4
    assert train.TrainConfig(n_seeds=4, seed=7).data_seeds == [7]
    src = data.ArraySource(np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32))
    b = next(data.stacked_batches(src, 8, cfg.data_seeds))
    assert all(not np.array_equal(b[i], b[j]) for i in range(4) for j in range(i))


def test_bad_configs_are_named():
    with pytest.raises(ValueError, match="data_order must be same or per_seed, got 'random'"):
        train.TrainConfig(data_order="random")
    with pytest.raises(ValueError, match="no steps to train.*num_tokens=100.*batch_size=4096"):
        train.TrainConfig(num_tokens=100)
    with pytest.raises(ValueError, match="source d_in=3 but sae d_in=8"):
        train.fit(data.ArraySource(np.ones((4, 3), np.float32)), SAE, TRAIN)


def test_main_prints_summary(tmp_path, capsys):
    out = tmp_path / "run"
    train.main(["d_in=6", "d_sae=24", "k=2", "aux_k=0", "n_seeds=2", "num_steps=30", "batch_size=64", "lr=1e-2",
                "warmup_steps=0", "synthetic_tokens=512", "synthetic_features=12", "synthetic_k=1",
                "eval_tokens=256", f"out_dir={out}"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(summary["ev"]) == 2 and summary["eval_on"] == "synthetic held-out sample"
    assert min(summary["ev"]) > 0.5, summary  # one direction per token: 2 latents should capture most of it
    assert summary["l0"] == [2.0, 2.0] and len(summary["dead_frac"]) == 2 and len(summary["dead_frac_train"]) == 2
    assert (out / "seed_1" / "cfg.json").exists() and (out / "summary.json").exists()


def test_diverged_run_stops_before_checkpointing(tmp_path):
    def nan_loss(params, x_BxD, dead_M):
        loss = jnp.sum(params["W_enc"]) * jnp.nan
        return loss, {"l0": jnp.zeros(())}

    cfg = dataclasses.replace(TRAIN, n_seeds=1, num_steps=4, checkpoint_every=2, data_order="same",
                              out_dir=str(tmp_path))
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 1, per seed: \[nan\]"):
        train.fit(data.synthetic_source(8, 64, n_features=10, k=2), SAE, cfg, loss_fn=nan_loss)
    assert not list((tmp_path / "checkpoints").iterdir())


def test_evaluate_matches_numpy_formulas():
    p = _copy(train.init_state(jax.random.key(3), SAE, dataclasses.replace(TRAIN, n_seeds=2)).params)
    p["b_dec"] = np.random.default_rng(4).normal(size=(2, 8)).astype(np.float32)
    x = np.random.default_rng(5).normal(size=(50, 8)).astype(np.float32) + 3.0
    got = train.evaluate(p, SAE, x, chunk=16)  # 16 does not divide 50: the streamed sums must still be exact
    for s in range(2):
        pre = (x - p["b_dec"][s]) @ p["W_enc"][s] + p["b_enc"][s]
        keep = np.argsort(-pre, axis=1)[:, :3]
        acts = np.zeros_like(pre)
        np.put_along_axis(acts, keep, np.maximum(np.take_along_axis(pre, keep, 1), 0), 1)
        x_hat = acts @ p["W_dec"][s] + p["b_dec"][s]
        ev = 1 - np.sum((x - x_hat) ** 2) / np.sum((x - x.mean(0)) ** 2)
        np.testing.assert_allclose(got["ev"][s], ev, rtol=1e-4)
        np.testing.assert_allclose(got["l0"][s], np.mean(np.sum(acts > 0, 1)), rtol=1e-6)
        np.testing.assert_allclose(got["dead_frac"][s], np.mean(~np.any(acts > 0, 0)), rtol=1e-6)


def test_extending_a_finished_run_continues_on_the_schedule_over_the_new_total(tmp_path, capsys):
    """40 steps, then num_steps=60 in the same folder: the 40-step state driven 20 steps on the 60-step schedule."""
    source = data.synthetic_source(8, 400, n_features=20, k=2, seed=0)
    cfg40 = dataclasses.replace(TRAIN, n_seeds=2, num_steps=40, warmup_steps=5, checkpoint_every=20, log_every=1,
                                data_order="same", out_dir=str(tmp_path / "run"))
    cfg60 = dataclasses.replace(cfg40, num_steps=60)
    state40 = _copy(train.fit(source, SAE, cfg40))
    capsys.readouterr()
    extended = train.fit(source, SAE, cfg60)
    said = [ln for ln in capsys.readouterr().err.splitlines() if "run length" in ln]
    assert len(said) == 1 and "run length 40 -> 60 steps; resuming at step 40" in said[0], said
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["num_steps"] == 60

    # The rule by hand: steps 40..59 on batches 40..59 with a step function built for a 60-step schedule.
    step60 = train.make_train_step(SAE, dataclasses.replace(cfg60, out_dir="elsewhere"))
    state = jax.tree.map(jnp.asarray, state40)
    batches = source.batches(cfg60.batch_size, cfg60.data_seeds[0], 40)
    for _ in range(20):
        state, _ = step60(state, source.normalizer(next(batches)))
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(extended)):
        np.testing.assert_array_equal(a, b)

    def lr(t, total):  # the documented schedule: linear warm-up over 5 steps, cosine to 0.1·lr at `total`
        if t < 5:
            return 3e-3 * t / 5
        return 3e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (t - 5) / (total - 5))))

    lines = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [ln["step"] for ln in lines] == list(range(1, 61))
    for ln in lines:  # the line of step n logs the rate step n used, lr(n - 1)
        want = lr(ln["step"] - 1, 40 if ln["step"] <= 40 else 60)
        np.testing.assert_allclose(ln["lr"], [want, want], atol=1e-6, err_msg=str(ln["step"]))
    assert lr(40, 60) - lr(40, 40) > 5e-4  # the rate jumps back up, far beyond the tolerance: rules told apart

    with pytest.raises(ValueError, match=r"num_tokens=800 give 50 steps, fewer than the 60 already taken"):
        train.fit(source, SAE, dataclasses.replace(cfg60, num_steps=0, num_tokens=50 * 16))
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["num_steps"] == 60
    with pytest.raises(ValueError, match="another configuration.*train.lr"):
        train.fit(source, SAE, dataclasses.replace(cfg60, num_steps=80, lr=1e-3))

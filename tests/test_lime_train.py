"""lime_jax.train: AdamW groups vs the formula, schedule, data order, kill-and-resume == uninterrupted, errors."""
import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsae import configlib
from lime_jax import config, model, train

SMALL = config.tiny(vocab=61, d_model=16, n_layers=2, n_heads=2, n_kv_heads=2, head_dim=8, d_ff=24, max_len=8)
TRAIN = train.TrainConfig(seq_len=8, batch_size=4, num_steps=8, warmup_steps=2, log_every=2, checkpoint_every=4,
                          eval_batches=2)


def _tokens(n=40, T=8, seed=0):
    return np.random.default_rng(seed).integers(0, SMALL.vocab, (n, T)).astype(np.int32)


def test_one_step_matches_the_adamw_formula_with_router_groups():
    """First Adam step: m_hat = g, v_hat = g^2; decay only on matrices; routers at router_lr_mult * lr."""
    cfg = dataclasses.replace(SMALL, routing="static")
    tc = dataclasses.replace(TRAIN, warmup_steps=0, grad_clip=0.0, lr=0.01, weight_decay=0.1, router_lr_mult=10.0)
    state = train.init_state(jax.random.key(0), cfg, tc)
    tokens = jnp.asarray(_tokens(4))
    grads = jax.grad(train.loss_fn)(state.params, tokens, cfg)
    p0 = jax.tree_util.tree_flatten_with_path(jax.device_get(state.params))[0]
    new, _ = train.make_train_step(cfg, tc)(state, tokens)  # donates state
    for (path, p), g, p1 in zip(p0, jax.tree.leaves(grads), jax.tree.leaves(new.params)):
        name = path[-1].key
        adam = np.asarray(g) / (np.abs(np.asarray(g)) + tc.eps)
        decay = 0.0 if name in ("router", "attn_norm", "mlp_norm", "final_norm") else tc.weight_decay
        lr = tc.lr * (tc.router_lr_mult if name == "router" else 1.0)
        np.testing.assert_allclose(p1, p - lr * (adam + decay * p), rtol=1e-5, atol=1e-7, err_msg=name)


def test_schedule_warms_up_linearly_then_cosine_to_min_lr():
    tc = dataclasses.replace(TRAIN, num_steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-5)
    lr = train.lr_schedule(tc)
    assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(5e-4)
    for s in (10, 40, 100):
        cos = 1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * (s - 10) / 90))
        assert float(lr(s)) == pytest.approx(cos, rel=1e-5)


def test_batch_rows_cover_each_epoch_once_and_are_deterministic():
    n, B = 23, 4  # 5 full batches per epoch, 3 rows dropped
    epoch0 = np.concatenate([train.batch_rows(s, B, n, seed=3) for s in range(5)])
    assert len(set(epoch0.tolist())) == 20 and epoch0.max() < n
    np.testing.assert_array_equal(train.batch_rows(7, B, n, 3), train.batch_rows(7, B, n, 3))
    assert not np.array_equal(train.batch_rows(0, B, n, 3), train.batch_rows(5, B, n, 3))  # new epoch, new order
    with pytest.raises(ValueError, match="fewer than one batch"):
        train.batch_rows(0, 8, 5, 0)


class _Killed(Exception):
    pass


class _DiesAfter:
    """Token rows that raise on the n-th batch read, like a job killed mid-run."""

    def __init__(self, tokens, n):
        self.tokens, self.n, self.reads = tokens, n, 0
        self.shape, self.ndim = tokens.shape, tokens.ndim

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, rows):
        if self.reads == self.n:
            raise _Killed
        self.reads += 1
        return self.tokens[rows]


def test_killed_and_resumed_fit_equals_uninterrupted(tmp_path):
    cfg = dataclasses.replace(SMALL, routing="v2")
    tokens, heldout = _tokens(), _tokens(8, seed=1)
    whole = train.fit(cfg, dataclasses.replace(TRAIN, out_dir=str(tmp_path / "whole"), peak_flops=1e9), tokens, heldout)
    resumed_cfg = dataclasses.replace(TRAIN, out_dir=str(tmp_path / "resumed"), peak_flops=1e9)
    with pytest.raises(_Killed):
        train.fit(cfg, resumed_cfg, _DiesAfter(tokens, 5), heldout)
    assert sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()) == ["4"]
    # As a folder written before `trainable` and `init` existed: it resumes on their defaults and records them.
    cfg_path = tmp_path / "resumed" / "config.json"
    legacy = json.loads(cfg_path.read_text())
    del legacy["train"]["trainable"], legacy["init"]
    cfg_path.write_text(json.dumps(legacy))
    resumed = train.fit(cfg, resumed_cfg, tokens, heldout)
    recorded = json.loads(cfg_path.read_text())
    assert recorded["train"]["trainable"] == "all" and recorded["init"] == {"from": "random"}
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(a, b)  # bit-identical
    logs = [[json.loads(ln) for ln in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
            for d in ("whole", "resumed")]
    timeless = lambda ln: {k: v for k, v in ln.items() if k not in ("tokens_per_s", "mfu")}  # noqa: E731
    assert [timeless(x) for x in logs[0]] == [timeless(x) for x in logs[1]]
    assert [x["step"] for x in logs[1]] == [2, 4, 6, 8]
    flops_per_token = dataclasses.replace(cfg, max_len=TRAIN.seq_len).flops_per_token
    for x in logs[1]:  # MFU = achieved FLOP/s over peak (one device)
        assert x["flops"] == x["step"] * TRAIN.batch_size * TRAIN.seq_len * flops_per_token
        assert x["mfu"] == pytest.approx(x["tokens_per_s"] * flops_per_token / 1e9, rel=1e-2, abs=1e-5)
    summary = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    logits = model.apply(resumed.params, jnp.asarray(heldout[:8]), cfg)
    expected = float(model.token_nll(logits, jnp.asarray(heldout[:8])).mean())
    assert summary["heldout_loss"] == pytest.approx(expected, rel=1e-5)
    params, loaded_cfg = train.load_params(tmp_path / "resumed")
    assert loaded_cfg == cfg
    np.testing.assert_array_equal(params["layers"]["router"], resumed.params["layers"]["router"])
    with pytest.raises(ValueError, match="another configuration.*train.lr"):
        train.fit(cfg, dataclasses.replace(resumed_cfg, lr=0.5), tokens, heldout)
    with pytest.raises(ValueError, match="another configuration.*train.trainable: 'all' -> 'router'"):
        train.fit(cfg, dataclasses.replace(resumed_cfg, trainable="router"), tokens, heldout)
    with pytest.raises(ValueError, match="another data stream"):
        train.fit(cfg, resumed_cfg, tokens[:36], heldout)


def test_bad_configs_and_inputs_raise(tmp_path):
    with pytest.raises(ValueError, match="preset='huge'"):
        train.TrainConfig(preset="huge")
    with pytest.raises(ValueError, match="min_lr"):
        train.TrainConfig(lr=1e-4, min_lr=1e-3)
    with pytest.raises(ValueError, match="seq_len=16 exceeds"):
        train.fit(SMALL, dataclasses.replace(TRAIN, seq_len=16, out_dir=str(tmp_path)), _tokens(T=16))
    with pytest.raises(ValueError, match=r"\[N, seq_len=8\]"):
        train.fit(SMALL, dataclasses.replace(TRAIN, out_dir=str(tmp_path)), _tokens(T=6))
    assert not (tmp_path / "config.json").exists()  # nothing written before the checks
    with pytest.raises(ValueError, match="unknown option 'colour'"):
        train.main(["colour=red"])
    split = configlib.split_argv(["routing=v2", "num_steps=3", "n_layers=4"], [train.TrainConfig, config.LlamaConfig])
    assert split == [["num_steps=3"], ["routing=v2", "n_layers=4"]]


@pytest.mark.slow  # two compiles of the tiny LM
def test_extending_a_finished_run_continues_on_the_schedule_over_the_new_total(tmp_path, capsys):
    """8 steps, then num_steps=12 on the same folder: the 8-step state driven 4 more steps by the 12-step schedule."""
    tokens, heldout = _tokens(), _tokens(8, seed=1)
    cfg8 = dataclasses.replace(TRAIN, log_every=1, out_dir=str(tmp_path / "run"))
    cfg12 = dataclasses.replace(cfg8, num_steps=12)
    state8 = jax.tree.map(np.array, train.fit(SMALL, cfg8, tokens, heldout))
    capsys.readouterr()
    extended = train.fit(SMALL, cfg12, tokens, heldout)
    said = [ln for ln in capsys.readouterr().err.splitlines() if "run length" in ln]
    assert len(said) == 1 and "run length 8 -> 12 steps; resuming at step 8" in said[0], said
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["num_steps"] == 12

    # The rule by hand: steps 8..11 on their batches with a step function built for a 12-step schedule.
    step12 = train.make_train_step(SMALL, cfg12)
    state = jax.tree.map(jnp.asarray, state8)
    for s in range(8, 12):
        state, _ = step12(state, jnp.asarray(tokens[train.batch_rows(s, cfg12.batch_size, len(tokens), cfg12.seed)]))
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(extended)):
        np.testing.assert_array_equal(a, b)

    def lr(t, total):  # the documented schedule: warm-up over 2 steps, cosine to min_lr at `total`
        if t < 2:
            return TRAIN.lr * t / 2
        cos = 0.5 * (1 + math.cos(math.pi * (t - 2) / (total - 2)))
        return TRAIN.min_lr + (TRAIN.lr - TRAIN.min_lr) * cos

    lines = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [ln["step"] for ln in lines] == list(range(1, 13))
    for ln in lines:  # the line of step n logs the rate step n used, lr(n - 1)
        assert ln["lr"] == pytest.approx(lr(ln["step"] - 1, 8 if ln["step"] <= 8 else 12), rel=1e-5, abs=1e-9)
    assert lr(8, 12) > 100 * lr(8, 8)  # the rate jumps back up from min_lr: the two rules are told apart

    with pytest.raises(ValueError, match="num_steps=10 is fewer than the 12 steps already taken"):
        train.fit(SMALL, dataclasses.replace(cfg12, num_steps=10), tokens, heldout)


def test_router_only_training_moves_the_routers_and_nothing_else():
    """trainable=router: the routers take the AdamW step of the full model's router gradient; every other weight
    stays bit-identical over several steps."""
    cfg = dataclasses.replace(SMALL, routing="v2")
    tc = dataclasses.replace(TRAIN, warmup_steps=0, grad_clip=0.0, lr=0.01, router_lr_mult=10.0, trainable="router")
    state = train.init_state(jax.random.key(0), cfg, tc)
    tokens = jnp.asarray(_tokens(4))
    g_router = np.asarray(jax.grad(train.loss_fn)(state.params, tokens, cfg)["layers"]["router"])
    p0 = jax.tree.map(np.array, jax.device_get(state.params))
    step = train.make_train_step(cfg, tc)
    state, m = step(state, tokens)
    # First Adam step: m_hat = g, v_hat = g^2; no weight decay on routers.
    expected = p0["layers"]["router"] - tc.lr * tc.router_lr_mult * g_router / (np.abs(g_router) + tc.eps)
    np.testing.assert_allclose(state.params["layers"]["router"], expected, rtol=1e-5, atol=1e-7)
    assert float(m["grad_norm"]) == pytest.approx(np.linalg.norm(g_router), rel=1e-5)
    for s in range(1, 4):
        state, _ = step(state, jnp.asarray(_tokens(4, seed=s)))
    flat0 = jax.tree_util.tree_flatten_with_path(p0)[0]
    for (path, a), b in zip(flat0, jax.tree.leaves(state.params)):
        if "router" in jax.tree_util.keystr(path):
            assert not np.array_equal(a, b)
        else:
            np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    with pytest.raises(ValueError, match="trainable='router' needs a LIMe model"):
        train.make_train_step(SMALL, tc)
    with pytest.raises(ValueError, match="trainable='routers'"):
        train.TrainConfig(trainable="routers")


def test_fit_starts_from_init_params(tmp_path):
    """The first logged loss is the given params' loss on the first batch; router-only training saves and
    restores, leaving the given non-router weights as they were; a wrong tree is named."""
    cfg = dataclasses.replace(SMALL, routing="v2")
    tokens, heldout = _tokens(), _tokens(8, seed=1)
    params = jax.tree.map(np.array, model.init(jax.random.key(7), cfg))  # not the key fit would draw (seed 0)
    first = jnp.asarray(tokens[train.batch_rows(0, TRAIN.batch_size, len(tokens), TRAIN.seed)])
    expected = float(train.loss_fn(params, first, cfg))
    tc = dataclasses.replace(TRAIN, num_steps=4, log_every=1, checkpoint_every=2, trainable="router",
                             out_dir=str(tmp_path / "run"))
    train.fit(cfg, tc, tokens, heldout, init_params=params)
    line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert line["loss"] == pytest.approx(expected, rel=1e-5)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["init"] == {"from": "init_params"}
    restored, _ = train.load_params(tmp_path / "run")
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(restored)):
        assert np.array_equal(a, b) != ("router" in jax.tree_util.keystr(path)), jax.tree_util.keystr(path)
    with pytest.raises(ValueError, match="another configuration"):  # a random-init run cannot resume it
        train.fit(cfg, tc, tokens, heldout)
    with pytest.raises(ValueError, match=r"init_params\['embed'\] has shape \(3, 16\)"):
        train.fit(cfg, dataclasses.replace(tc, out_dir=str(tmp_path / "bad")), tokens, heldout,
                  init_params={**params, "embed": jnp.zeros((3, 16))})


def test_router_current_trains_only_the_current_layer_blocks():
    """router_current from to_lime: the entries reading earlier layers stay exactly zero, the current-layer
    blocks (the v2 identity) move, every other weight stays as it was."""
    plain = jax.tree.map(np.array, model.init(jax.random.key(2), SMALL))  # host copies: the step donates its state
    params, cfg = model.to_lime(plain, SMALL, "v2")  # router [L-1, K, L, K] = [1, 2, 2, 2]: layer 1 reads 0 and 1
    tc = dataclasses.replace(TRAIN, warmup_steps=0, lr=0.01, trainable="router_current")
    state = train.state_from_params(params, tc)
    r0 = np.array(params["layers"]["router"])
    step = train.make_train_step(cfg, tc)
    for s in range(3):
        state, _ = step(state, jnp.asarray(_tokens(4, seed=s)))
    r = np.asarray(state.params["layers"]["router"])
    np.testing.assert_array_equal(r[0, :, 0, :], 0.0)  # layer 1's reads of layer 0
    assert np.abs(r[0, :, 1, :] - r0[0, :, 1, :]).min() > 0  # every current-layer entry moved
    np.testing.assert_array_equal(state.params["layers"]["wk"], plain["layers"]["wk"])
    with pytest.raises(ValueError, match="router_current' needs routing='v2'"):
        train.make_train_step(dataclasses.replace(SMALL, routing="static"), tc)

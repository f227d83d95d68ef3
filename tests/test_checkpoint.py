"""Damaged checkpoints: both trainers warn, resume from the newest intact one and end as an uninterrupted run."""
import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest

from jaxsae import checkpoint, data, sae, train
from lime_jax import config as lime_config, train as lime_train

SAE = sae.SAEConfig(d_in=8, d_sae=32, k=3, aux_k=4)
SAE_TRAIN = train.TrainConfig(lr=3e-3, warmup_steps=2, batch_size=16, num_steps=12, n_seeds=2, data_order="same",
                              dead_after_tokens=32, checkpoint_every=4, log_every=2, keep_checkpoints=3)
LM = lime_config.tiny(vocab=61, d_model=16, n_layers=2, n_heads=2, n_kv_heads=2, head_dim=8, d_ff=24, max_len=8)
LM_TRAIN = lime_train.TrainConfig(seq_len=8, batch_size=4, num_steps=12, warmup_steps=2, log_every=2,
                                  checkpoint_every=4, keep_checkpoints=3, eval_batches=2)


def _files(step_dir):
    return [os.path.join(d, f) for d, _, fs in os.walk(step_dir) for f in fs]


def _truncate(step_dir):
    """Every file cut to half its length, as a full disk leaves them."""
    for f in _files(step_dir):
        os.truncate(f, os.path.getsize(f) // 2)


def _delete_one(step_dir):
    """The array store's manifest removed, as an interrupted copy leaves it (some other files orbax never reads)."""
    os.remove(os.path.join(step_dir, "state", "manifest.ocdbt"))


DAMAGE = {"truncate": _truncate, "delete": _delete_one}


def _warnings(err):
    return [ln for ln in err.splitlines() if ln.startswith("warning:")]


def _leaves(tree):
    return [np.asarray(a) for a in jax.tree.leaves(tree)]


# ---------------------------------------------------------------- SAE trainer
@pytest.fixture(scope="module")
def sae_whole(tmp_path_factory):
    """An uninterrupted run with checkpoints 4, 8 and 12: (folder, final state as numpy, source)."""
    source = data.synthetic_source(8, 200, n_features=20, k=2, seed=0)
    out = tmp_path_factory.mktemp("sae") / "whole"
    state = train.fit(source, SAE, dataclasses.replace(SAE_TRAIN, out_dir=str(out)))
    assert sorted(os.listdir(out / "checkpoints")) == ["12", "4", "8"]
    return out, _leaves(state), source


def _sae_copy(sae_whole, tmp_path):
    whole, _, _ = sae_whole
    shutil.copytree(whole, tmp_path / "run")
    return tmp_path / "run"


@pytest.mark.parametrize("damage", ["truncate", "delete", "two_newest"])
def test_sae_fit_resumes_from_newest_intact_checkpoint(sae_whole, tmp_path, capsys, damage):
    whole, want, source = sae_whole
    run = _sae_copy(sae_whole, tmp_path)
    ckpts = run / "checkpoints"
    DAMAGE["delete" if damage == "delete" else "truncate"](ckpts / "12")
    if damage == "two_newest":
        _delete_one(ckpts / "8")
    capsys.readouterr()
    state = train.fit(source, SAE, dataclasses.replace(SAE_TRAIN, out_dir=str(run)))
    warned = _warnings(capsys.readouterr().err)
    bad = [12, 8] if damage == "two_newest" else [12]
    restored = 4 if damage == "two_newest" else 8
    assert len(warned) == len(bad), warned  # one line per damaged checkpoint
    for line, step in zip(warned, bad):
        assert f"checkpoint {ckpts / str(step)} is damaged (" in line
        assert f"moved it to {ckpts / f'damaged-{step}'}, resuming from step {restored}" in line
    assert sorted(os.listdir(ckpts)) == sorted(["4", "8", "12"] + [f"damaged-{s}" for s in bad])
    for a, b in zip(want, _leaves(state)):
        np.testing.assert_array_equal(a, b)  # bit-identical to the uninterrupted run
    assert (run / "metrics.jsonl").read_text() == (whole / "metrics.jsonl").read_text()  # trimmed, then rewritten
    # The checkpoints saved again under the moved-aside step numbers are whole: a rerun restores 12 silently.
    again = train.fit(source, SAE, dataclasses.replace(SAE_TRAIN, out_dir=str(run)))
    assert not _warnings(capsys.readouterr().err)
    for a, b in zip(want, _leaves(again)):
        np.testing.assert_array_equal(a, b)


def test_sae_fit_without_intact_checkpoint_is_one_line_error(sae_whole, tmp_path, capsys):
    _, _, source = sae_whole
    run = _sae_copy(sae_whole, tmp_path)
    for step in ("4", "8", "12"):
        _truncate(run / "checkpoints" / step)
    capsys.readouterr()
    with pytest.raises(ValueError, match="no intact checkpoint in .*checkpoints") as err:
        train.fit(source, SAE, dataclasses.replace(SAE_TRAIN, out_dir=str(run)))
    assert "\n" not in str(err.value) and str(run / "checkpoints") in str(err.value)
    assert len(_warnings(capsys.readouterr().err)) == 3
    assert sorted(os.listdir(run / "checkpoints")) == ["12", "4", "8"]  # nothing moved or deleted


def test_trim_log_drops_a_cut_off_line(tmp_path, capsys):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 2, "loss": 1.0}\n{"step": 4, "loss": 0.5}\n{"step": 6, "lo')
    checkpoint.trim_log(log, 4)
    assert [json.loads(ln)["step"] for ln in log.read_text().splitlines()] == [2, 4]
    assert "dropped 1 unreadable line" in capsys.readouterr().err


# ---------------------------------------------------------------- LIMe trainer
def _tokens(n=40, seed=0):
    return np.random.default_rng(seed).integers(0, LM.vocab, (n, 8)).astype(np.int32)


@pytest.fixture(scope="module")
def lime_whole(tmp_path_factory):
    out = tmp_path_factory.mktemp("lime") / "whole"
    state = lime_train.fit(LM, dataclasses.replace(LM_TRAIN, out_dir=str(out)), _tokens(), _tokens(8, seed=1))
    assert sorted(os.listdir(out / "checkpoints")) == ["12", "4", "8"]
    return out, _leaves(state)


def _timeless(path):
    return [{k: v for k, v in json.loads(ln).items() if k not in ("tokens_per_s", "mfu")}
            for ln in path.read_text().splitlines()]


@pytest.mark.slow  # the tiny LM's first compile takes ~15 s on 2 cores
@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_lime_fit_resumes_from_newest_intact_checkpoint(lime_whole, tmp_path, capsys, damage):
    whole, want = lime_whole
    run = tmp_path / "run"
    shutil.copytree(whole, run)
    ckpts = run / "checkpoints"
    DAMAGE[damage](ckpts / "12")
    # Reading params only: the damaged checkpoint is skipped with a warning but left in place.
    capsys.readouterr()
    params_8, _ = lime_train.load_params(run)
    warned = _warnings(capsys.readouterr().err)
    assert len(warned) == 1 and f"checkpoint {ckpts / '12'} is damaged" in warned[0] and "using step 8" in warned[0]
    assert sorted(os.listdir(ckpts)) == ["12", "4", "8"]
    state = lime_train.fit(LM, dataclasses.replace(LM_TRAIN, out_dir=str(run)), _tokens(), _tokens(8, seed=1))
    warned = _warnings(capsys.readouterr().err)
    assert len(warned) == 1, warned
    assert f"checkpoint {ckpts / '12'} is damaged (" in warned[0]
    assert f"moved it to {ckpts / 'damaged-12'}, resuming from step 8" in warned[0]
    for a, b in zip(want, _leaves(state)):
        np.testing.assert_array_equal(a, b)
    assert _timeless(run / "metrics.jsonl") == _timeless(whole / "metrics.jsonl")
    final, _ = lime_train.load_params(run)  # step 12 again, saved whole
    for a, b in zip(_leaves(final), _leaves(state.params)):
        np.testing.assert_array_equal(a, b)
    assert not all(np.array_equal(a, b) for a, b in zip(_leaves(params_8), _leaves(final)))  # it read step 8

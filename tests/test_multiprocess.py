"""Several processes (jax.distributed over gloo on this CPU) train exactly what one process trains.

Each run is a real command: `python -m jaxsae.launch -n 2 --cpu-devices 2 -- jaxsae train ...` against
`jaxsae train ... cpu_devices=4`, the same 4-device mesh split over 2 processes or held by 1.
"""
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxsae import distributed, io
from jaxsae.data import CacheWriter

ROOT = pathlib.Path(__file__).resolve().parents[1]
# a bare environment, plus the session's persistent compile cache and XLA flags (tests/conftest.py)
ENV = {"JAX_PLATFORMS": "cpu", "PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT),
       **{k: v for k, v in os.environ.items()
          if k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE", "XLA_FLAGS"))}}
slow = pytest.mark.slow  # every test that starts processes
# Tests that read one shared `trained` job: one xdist worker runs them all (`--dist loadgroup`), so it is run once.
shares_jobs = pytest.mark.xdist_group("multiprocess_trained")


def _train_args(cache, out, **kw):
    args = dict(source=cache, d_sae=16, k=2, n_seeds=2, batch_size=32, num_steps=30, log_every=10,
                checkpoint_every=10, keep_checkpoints=3, eval_tokens=64, warmup_steps=5, lr=3e-3, out_dir=out)
    args.update(kw)
    return [f"{k}={v}" for k, v in args.items()]


def _run(cmd, timeout=300):
    r = subprocess.run([sys.executable, "-m", *cmd], capture_output=True, text=True, env=ENV, cwd=ROOT,
                       timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _one(args):
    return _run(["jaxsae.cli", "train", *args, "cpu_devices=4"])


def _two(args):
    return _run(["jaxsae.launch", "-n", "2", "--cpu-devices", "2", "--", "jaxsae", "train", *args])


def _params(out):
    return [io.load_saelens(pathlib.Path(out) / f"seed_{s}")[0] for s in range(2)]


def _assert_same(a, b):
    for pa, pb in zip(_params(a), _params(b)):
        for name in pa:
            np.testing.assert_allclose(pa[name], pb[name], rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("mp") / "cache"
    x = np.random.default_rng(0).standard_normal((600, 8)) * 3 + 1
    with CacheWriter(path, {"model": "toy", "layer": 0}, d_in=8, shard_tokens=128) as w:
        w.add(x.astype(np.float16))
    return str(path)


MESHES = {"rows-split": dict(mesh_data=4), "seeds-split-per-seed-orders": dict(mesh_seed=2, mesh_data=2,
                                                                              data_order="per_seed")}


@pytest.fixture(scope="module")
def trained(cache, tmp_path_factory):
    """trained(mesh id) -> (folder, 2-process stdout): the 30-step job of that mesh, run once by 1 process (into
    folder/one) and once by 2 (folder/two), shared by the tests that read it (each launch is ~10 s of start-up)."""
    done = {}

    def get(mesh_id):
        if mesh_id not in done:
            root = tmp_path_factory.mktemp(mesh_id)
            _one(_train_args(cache, root / "one", **MESHES[mesh_id]))
            done[mesh_id] = root, _two(_train_args(cache, root / "two", **MESHES[mesh_id])).stdout
        return done[mesh_id]
    return get


@slow
@shares_jobs
@pytest.mark.parametrize("mesh_id", list(MESHES))
def test_two_processes_train_what_one_process_trains(trained, mesh_id):
    root, stdout = trained(mesh_id)
    _assert_same(root / "one", root / "two")
    assert "[0] " in stdout and "[1] " in stdout  # both processes' output, prefixed
    assert len((root / "two" / "metrics.jsonl").read_text().splitlines()) == 3  # written once, by process 0


def _as_if_killed_after_step_10(run, copy):
    """A copy of a finished 30-step run as a job killed right after its step-10 checkpoint would leave it."""
    shutil.copytree(run, copy)
    for step in (20, 30):
        shutil.rmtree(copy / "checkpoints" / str(step))
    for seed_dir in copy.glob("seed_*"):  # else an idle resume would pass on the finished run's files
        shutil.rmtree(seed_dir)
    (copy / "summary.json").unlink()


@slow
@shares_jobs
def test_a_killed_two_process_run_resumes_in_two_or_one_processes(cache, trained, tmp_path):
    """Resumed from a 2-process checkpoint by 2 processes, or by 1: the uninterrupted 2-process run's SAEs."""
    two = trained("rows-split")[0] / "two"  # the uninterrupted run, read only: each resume works on a copy
    for name, resume in (("again_two", _two), ("again_one", _one)):
        _as_if_killed_after_step_10(two, tmp_path / name)
        resume(_train_args(cache, tmp_path / name, **MESHES["rows-split"]))
        _assert_same(two, tmp_path / name)
        log = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in log] == [10, 20, 30], name


@slow
def test_a_lost_process_is_detected_and_named(cache, tmp_path):
    """Kill process 1 mid-run: process 0 stops with an error within a bounded time instead of hanging."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = _train_args(cache, tmp_path / "run", num_steps=100_000, checkpoint_every=0, log_every=10, mesh_data=4)
    common = [f"coordinator=127.0.0.1:{port}", "num_processes=2", "cpu_devices=2", "heartbeat_timeout_s=5"]
    procs = [subprocess.Popen([sys.executable, "-m", "jaxsae.cli", "train", *args, *common, f"process_id={i}"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV, cwd=ROOT)
             for i in range(2)]
    log = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 240
    while not (log.is_file() and log.read_text().count("\n") >= 2) and time.time() < deadline:
        time.sleep(0.5)
    assert log.is_file(), "the job never started training"
    procs[1].send_signal(signal.SIGKILL)
    t0 = time.time()
    out, _ = procs[0].communicate(timeout=90)
    assert procs[0].returncode != 0 and time.time() - t0 < 90
    assert any(s in out for s in ("peer", "heartbeat", "Task 1")), out[-2000:]


def _dist(**kw):
    return distributed.DistConfig(**{"coordinator": "127.0.0.1:1", **kw})


@pytest.mark.parametrize("cfg, mesh, batch, message", [
    (_dist(num_processes=3), dict(data=4), 32, "num_processes=3 does not divide the mesh (data=4 = 4 devices)"),
    (_dist(num_processes=2), dict(seed=3), 32, "num_processes=2 does not divide the mesh (seed=3 = 3 devices)"),
    (_dist(num_processes=2, cpu_devices=1), dict(data=4), 32, "num_processes=2 x cpu_devices=1 = 2"),
    (_dist(num_processes=2, cpu_devices=4), dict(data=4), 32, "num_processes=2 x cpu_devices=4 = 8"),
    (_dist(num_processes=2, cpu_devices=2), dict(data=2, fsdp=2), 30, "batch_size=30 does not split into the 4 "),
    (_dist(num_processes=2, process_id=2), dict(data=2), 32, "process_id=2 is out of range"),
    (_dist(num_processes=2, process_id=-1), dict(data=2), 32, "process_id=-1 is out of range"),
], ids=["mesh-3", "seeds-2", "too-few-devices", "unused-devices", "batch", "id-high", "id-negative"])
def test_a_job_that_cannot_be_split_is_one_line_before_it_starts(cfg, mesh, batch, message):
    """Checked from the settings alone: no process is started, no coordinator contacted."""
    with pytest.raises(ValueError) as err:
        distributed.check_split(cfg, mesh, batch)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("cfg, mesh, batch", [
    (_dist(num_processes=2, cpu_devices=2), dict(seed=2, data=2), 32),
    (_dist(num_processes=4, cpu_devices=2, process_id=3), dict(data=4, model=2), 4),
    (distributed.DistConfig(), dict(data=2), 2),
])
def test_a_job_that_splits_evenly_passes_the_check(cfg, mesh, batch):
    distributed.check_split(cfg, mesh, batch)


@pytest.mark.parametrize("command, argv, message", [
    ("lime_jax.train", ["mesh_data=3"], "num_processes=2 does not divide the mesh (data=3 = 3 devices)"),
    ("lime_jax.train", ["mesh_data=2", "mesh_fsdp=2", "batch_size=6"], "batch_size=6 does not split into the 4 "),
    ("jaxsae.stability", ["run=nowhere", "process_id=2"], "process_id=2 is out of range"),
], ids=["lime-mesh", "lime-batch", "stability-id"])
def test_other_commands_check_the_split_before_joining(tmp_path, command, argv, message):
    """lime_jax train and jaxsae stability check as jaxsae train does: one line, no coordinator contacted."""
    import importlib

    out = f"out_dir={tmp_path / 'run'}" if command == "lime_jax.train" else f"out={tmp_path / 'out.json'}"
    with pytest.raises(ValueError) as err:
        importlib.import_module(command).main(["num_processes=2", "coordinator=127.0.0.1:1", "init_timeout_s=2", out,
                                               *argv])
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not jax.distributed.is_initialized() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("extra, message", [
    (["num_processes=2", "process_id=2", "coordinator=127.0.0.1:1"], "process_id=2 is out of range"),
    (["num_processes=3", "coordinator=127.0.0.1:1", "mesh_data=2"], "num_processes=3 does not divide the mesh"),
    (["num_processes=2"], "needs coordinator=HOST:PORT"),
])
def test_settings_that_cannot_split_are_one_line_from_the_command(cache, tmp_path, capsys, extra, message):
    """The `jaxsae` command's own main (what `python -m jaxsae.cli` exits with), in this process: these fail from
    the settings alone, before JAX's distributed runtime starts, so no process of their own is needed."""
    from jaxsae import cli

    assert cli.main(["train", *_train_args(cache, tmp_path / "run"), *extra]) == 2
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("jaxsae train: error:")]
    assert len(errors) == 1 and message in errors[0]
    assert not jax.distributed.is_initialized() and not (tmp_path / "run").exists()


@slow
def test_a_coordinator_that_never_answers_is_one_line(cache, tmp_path):
    """The case that reaches JAX's distributed runtime (in a process of its own): a named timeout, not a hang."""
    extra = ["num_processes=2", "process_id=1", "coordinator=127.0.0.1:9", "init_timeout_s=3", "mesh_data=2"]
    r = subprocess.run([sys.executable, "-m", "jaxsae.cli", "train", *_train_args(cache, tmp_path / "run"), *extra],
                       capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("jaxsae train: error:")]
    assert r.returncode == 2 and len(errors) == 1 and "did not answer within 3 s" in errors[0], r.stderr[-2000:]
    assert not (tmp_path / "run").exists()


@slow
def test_streaming_from_the_model_two_processes_equal_one(tmp_path):
    """source=model: every process runs the LM only on the contexts holding its rows; same SAEs as 1 process."""
    tokens = np.random.default_rng(1).integers(1, 1000, (24, 16)).astype(np.int32)
    tokens[3, 9] = tokens[17, 12] = 0
    np.save(tmp_path / "tokens.npy", tokens)
    args = _train_args("model", tmp_path / "one", model="tiny", tokens=tmp_path / "tokens.npy", layer=2, ctx_batch=4,
                       mesh_data=4, d_sae=256, k=8)
    _one(args)
    _two([a.replace(str(tmp_path / "one"), str(tmp_path / "two")) for a in args])
    _assert_same(tmp_path / "one", tmp_path / "two")


@slow
def test_streaming_several_layers_two_processes_equal_one(tmp_path):
    """layers=1,2 over mesh seed=2 x data=2: each process holds one layer's two members (all rows of them). Both
    jobs also write the layered run's folders (this 1-process run is the `jaxsae train layers=...` command test)."""
    np.save(tmp_path / "tokens.npy", np.random.default_rng(2).integers(1, 1000, (24, 16)).astype(np.int32))
    args = _train_args("model", tmp_path / "one", model="tiny", tokens=tmp_path / "tokens.npy", layers="1,2",
                       ctx_batch=4, mesh_seed=2, mesh_data=2, d_sae=64, k=4, num_steps=12)
    _one(args)
    _two([a.replace(str(tmp_path / "one"), str(tmp_path / "two")) for a in args])
    for layer in (1, 2):
        _assert_same(tmp_path / "one" / f"L{layer}", tmp_path / "two" / f"L{layer}")
    for run in ("one", "two"):  # the command's layout: L{layer}/seed_{s} SAE folders and L{layer}/summary.json
        out = tmp_path / run
        assert json.loads((out / "config.json").read_text())["stream"] == {"layers": [1, 2]}, run
        for layer in (1, 2):
            assert len(json.loads((out / f"L{layer}" / "summary.json").read_text())["ev"]) == 2
            for s in range(2):
                cfg = json.loads((out / f"L{layer}" / f"seed_{s}" / io.CFG).read_text())
                assert cfg["metadata"]["hook_name"] == f"blocks.{layer}.hook_resid_post"
                assert (cfg["jaxsae"]["layer"], cfg["jaxsae"]["seed"]) == (layer, s)


@slow
def test_stability_search_over_two_processes_equals_one(cache, tmp_path):
    import json

    _one(_train_args(cache, tmp_path / "run", n_seeds=3, d_sae=48, num_steps=10))
    stab = ["run=" + str(tmp_path / "run"), "search_dtype=float32", "block=8"]
    _run(["jaxsae.cli", "stability", *stab, f"out={tmp_path / 'one.json'}", "cpu_devices=4"])
    _run(["jaxsae.launch", "-n", "2", "--cpu-devices", "2", "--", "jaxsae", "stability", *stab,
          f"out={tmp_path / 'two.json'}"])
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert one["by_tau"] == two["by_tau"] and len(one["by_tau"]["0.7"]["p"]) == 3


LIME_SCRIPT = """
import sys, numpy as np
from jaxsae import configlib, distributed
distributed.initialize(configlib.override(distributed.DistConfig(), sys.argv[2:]))
from lime_jax import config, train
tokens = np.random.default_rng(0).integers(0, 64, (40, 16)).astype(np.int32)
model_cfg = config.tiny(vocab=64, n_layers=3, d_model=32, n_heads=2, n_kv_heads=2, head_dim=16, d_ff=64, max_len=16,
                        routing="static")
cfg = train.TrainConfig(seq_len=16, batch_size=8, num_steps=6, log_every=2, checkpoint_every=6, eval_batches=1,
                        warmup_steps=2, mesh_data=2, mesh_fsdp=2, out_dir=sys.argv[1])
train.fit(model_cfg, cfg, tokens, tokens[:8])
"""


@slow
def test_lime_training_over_data_and_fsdp_two_processes_equal_one(tmp_path):
    """The LM trainer: each process reads its rows of every token batch; same params and loss as one process."""
    import json

    from lime_jax import train

    script = tmp_path / "lime_fit.py"
    script.write_text(LIME_SCRIPT)
    _run(["jaxsae.launch", "-n", "1", "--cpu-devices", "4", "--", sys.executable, str(script), str(tmp_path / "one")])
    _run(["jaxsae.launch", "-n", "2", "--cpu-devices", "2", "--", sys.executable, str(script), str(tmp_path / "two")])
    one, two = (train.load_params(tmp_path / d)[0] for d in ("one", "two"))
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(two)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    losses = [json.loads((tmp_path / d / "summary.json").read_text())["heldout_loss"] for d in ("one", "two")]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)


def test_a_harvest_too_small_for_its_processes_is_one_line():
    from jaxsae import harvest

    cfg = harvest.HarvestConfig(num_tokens=100, shard_tokens=64)
    harvest.check_processes(cfg, 2)  # 2 shards: one each
    with pytest.raises(ValueError, match="100 new rows make 2 shard.s. of shard_tokens=64, fewer than num_processes=3"):
        harvest.check_processes(cfg, 3)


@slow
def test_harvest_and_eval_two_processes_equal_one(tmp_path):
    """Harvest: each process forwards the contexts of its own shards, process 0 writes the manifest; the cache is
    the one-process cache byte for byte. Eval: each process reads its rows / contexts; the same metrics."""
    from jaxsae import sae

    tokens = np.random.default_rng(2).integers(1, 1000, (16, 32)).astype(np.int32)
    tokens[1, 9] = tokens[6, 20] = tokens[6, 21] = 0  # excluded rows: shards end at uneven context positions
    np.save(tmp_path / "tokens.npy", tokens)
    args = ["model=tiny", f"tokens={tmp_path / 'tokens.npy'}", "ctx_len=32", "corpus=toy", "split=heldout",
            "num_tokens=300", "layers=1,3", "batch_size=4", "shard_tokens=64"]
    _run(["jaxsae.cli", "harvest", *args, f"root={tmp_path / 'one'}"])
    r = _run(["jaxsae.launch", "-n", "2", "--", "jaxsae", "harvest", *args, f"root={tmp_path / 'two'}"])
    assert '[0] {"harvest": "toy_heldout", "layers": [1, 3], "contexts": 11, "rows": 305, "processes": 2' in r.stdout
    one, two = (sorted(p.relative_to(tmp_path / d) for p in (tmp_path / d).rglob("*") if p.is_file() and
                       p.name != ".lock") for d in ("one", "two"))
    assert one == two and len([p for p in one if p.name.startswith("shard_")]) == 2 * 5  # 305 rows, 64 per shard
    for rel in one:
        assert (tmp_path / "one" / rel).read_bytes() == (tmp_path / "two" / rel).read_bytes(), rel
    # Killed before the manifests: they are missing and shard 3 of layer 3 is half written; the rerun completes it.
    layer3 = tmp_path / "two" / "tiny" / "L3" / "toy_heldout"
    for cache in (layer3, layer3.parents[1] / "L1" / "toy_heldout"):
        (cache / "manifest.json").unlink()
    (layer3 / "shard_000003.npy").write_bytes((layer3 / "shard_000003.npy").read_bytes()[:200])
    _run(["jaxsae.launch", "-n", "2", "--", "jaxsae", "harvest", *args, f"root={tmp_path / 'two'}"])
    for rel in one:
        assert (tmp_path / "one" / rel).read_bytes() == (tmp_path / "two" / rel).read_bytes(), rel

    cfg = sae.SAEConfig(d_in=128, d_sae=64, k=4)
    params = jax.tree.map(np.asarray, sae.init(jax.random.key(3), cfg))
    io.save_saelens(tmp_path / "sae", params, cfg)
    ev = ["sae=" + str(tmp_path / "sae"), "layer=3", "model=tiny", "corpora=toy", f"root={tmp_path / 'one'}",
          "num_tokens=200", "batch_size=50", "ce_contexts=7", "ce_batch_size=2"]
    _run(["jaxsae.cli", "eval", *ev, f"out={tmp_path / 'one.json'}"])
    _run(["jaxsae.launch", "-n", "2", "--", "jaxsae", "eval", *ev, f"out={tmp_path / 'two.json'}"])
    (a,), (b,) = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert a.keys() == b.keys() and a["eval_tokens"] == b["eval_tokens"] == 200
    # Each process sums its own batches in float32 before the float64 merge, so the two jobs round differently:
    # EV = 1 - SSE/SST moves by a few float32 ulps of SSE/SST (~1e-7 each), which is large relative to a small EV.
    for key in ("ev", "l0", "dead_frac", "clean_loss", "spliced_loss", "zero_loss", "ce_delta", "loss_recovered"):
        np.testing.assert_allclose(b[key], a[key], rtol=1e-6, atol=1e-6, err_msg=key)


WATCHDOG_SCRIPT = """
import time
from jaxsae import distributed
dog = distributed.Watchdog(1, prog="demo")
with dog.step("a quick step"):
    time.sleep(0.2)
time.sleep(2.5)  # outside any step: never an error
with dog.step("step 7 (a collective nobody joins)"):
    time.sleep(120)
"""


@slow
def test_a_stuck_step_ends_the_process_with_a_line_naming_it():
    t0 = time.time()
    r = subprocess.run([sys.executable, "-c", WATCHDOG_SCRIPT], capture_output=True, text=True, env=ENV, cwd=ROOT,
                       timeout=100)
    assert r.returncode == distributed.Watchdog.EXIT_CODE and time.time() - t0 < 60, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == \
        "demo: error: process 0 of 1 stuck for more than 1 s in step 7 (a collective nobody joins)"

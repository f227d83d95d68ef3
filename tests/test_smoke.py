"""Smoke tests: every documented command runs end to end at a tiny size, so a refactor cannot break one silently.

Each test runs the real command (`python -m benchmarks.X`, `python -m experiments.Y`, the README's `jaxsae` and
`lime_jax` commands through their entry modules) in a subprocess whose working directory is the test's own
tmp_path: output folders the test does not set (results/, runs/, cache/) land there, never in the repository.
No test needs the network or the fetched corpora: a session fixture writes tiny fake corpora, packs them with a
word-level stand-in for the SmolLM2 tokenizer, and harvests activation caches from the random-weight `tiny`
model; the experiments read those with `model=tiny`. Tests that load SmolLM2's GGUF (weights or tokenizer) are
also marked slow. Each asserts exit code 0 and the output the tables and reports are built from.

Most of a command's CPU time is Python and JAX starting up and XLA compiling, so the commands of one pytest
process run one after another in one long-lived command process (`_CommandProcess`): each is run as
`python -m` runs it (`runpy` as `__main__`, its own argv and working directory, its stdout and stderr file
descriptors captured, exit code from SystemExit), in a process that, like a user's, has JAX's default devices,
not conftest's 8. Commands that start processes of their own (htopk_step, multiprocess) still do.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import runpy
import select
import shutil
import subprocess
import sys
import tempfile
import traceback
import types
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
LAYER = 1  # the tiny model's residual stream after block 1: cheap to harvest and to splice
CTX = 64  # tokens per packed context (the real caches use 256; the tiny model's 49k-way logits dominate CE)
CACHE_TOKENS = {("general", "train"): 2048, ("general", "heldout"): 512, ("code", "train"): 1024,
                ("code", "heldout"): 512}  # activation rows harvested per (corpus, split)

# One xdist worker runs them all (`--dist loadgroup`, scripts/test.sh): one command process and one `world`.
pytestmark = [pytest.mark.smoke, pytest.mark.xdist_group("smoke")]


# ---------------------------------------------------------------- helpers


def _serve() -> None:
    """The command process: reads one JSON request per line on stdin ({"args", "cwd", "out", "err"}), runs
    `python -m ARGS` in `cwd` with fds 1 and 2 sent to the files `out` and `err`, and answers its exit code."""
    reply = os.fdopen(os.dup(1), "w")  # the answers go to the original stdout, a pipe to the test,
    os.dup2(2, 1)  # which nothing else writes to, not even output between commands
    requests = os.fdopen(os.dup(0))
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # a command that reads stdin reads nothing, never the requests
    home, argv = os.getcwd(), list(sys.argv)
    for line in requests:
        req = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        saved = [os.dup(1), os.dup(2)]
        with open(req["out"], "w") as out, open(req["err"], "w") as err:
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            sys.argv = ["-m", *req["args"][1:]]
            try:
                os.chdir(req["cwd"])
                runpy.run_module(req["args"][0], run_name="__main__", alter_sys=True)
                code = 0
            except SystemExit as stop:  # sys.exit(code) as the interpreter would turn it into a status
                code = stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 1
                if not isinstance(stop.code, (int, type(None))):
                    print(stop.code, file=sys.stderr)
            except BaseException:  # noqa: BLE001 - an uncaught exception: its traceback and status 1
                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
                for fd in saved:
                    os.close(fd)
                os.chdir(home)
                sys.argv = list(argv)
        reply.write(json.dumps({"code": code}) + "\n")
        reply.flush()


class _CommandProcess:
    """One command process per pytest process, started on first use and again after one dies or hangs."""

    proc: subprocess.Popen | None = None

    @classmethod
    def run(cls, cwd: Path, args: tuple[str, ...], timeout: int) -> tuple[int | None, str, str]:
        """(exit code, or None when the process died or timed out; stdout; stderr) of `python -m ARGS` in cwd."""
        if cls.proc is None or cls.proc.poll() is not None:
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
            # conftest forces 8 fake CPU devices for the in-process tests; the commands run as a user runs them.
            env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                                      env.get("XLA_FLAGS", "")).strip()
            boot = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_smoke; "
                    "sys.path.pop(0); test_smoke._serve()")
            cls.proc = subprocess.Popen([sys.executable, "-c", boot], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        env=env, text=True, cwd=REPO)
        with tempfile.TemporaryDirectory() as logs:
            out, err = Path(logs) / "stdout", Path(logs) / "stderr"
            cls.proc.stdin.write(json.dumps({"args": args, "cwd": str(cwd), "out": str(out), "err": str(err)}) + "\n")
            cls.proc.stdin.flush()
            ready, _, _ = select.select([cls.proc.stdout], [], [], timeout)
            line = cls.proc.stdout.readline() if ready else ""
            if not line:  # died or hung: the next command gets a fresh process
                cls.proc.kill()
                cls.proc.wait()
            code = json.loads(line)["code"] if line else None
            return code, out.read_text() if out.exists() else "", err.read_text() if err.exists() else ""


    @classmethod
    def stop(cls) -> None:
        """End of input: the process finishes its loop and exits (killed if it does not within a minute)."""
        if cls.proc is not None:
            cls.proc.stdin.close()
            try:
                cls.proc.wait(60)
            except subprocess.TimeoutExpired:
                cls.proc.kill()
                cls.proc.wait()
            cls.proc = None


@pytest.fixture(scope="module", autouse=True)
def _command_process():
    yield
    _CommandProcess.stop()


def run(cwd: Path, *args: str, timeout: int = 600) -> str:
    """`python -m ARGS` from `cwd` with this checkout first on the path; its stdout. Fails on a non-zero exit."""
    code, stdout, stderr = _CommandProcess.run(cwd, args, timeout)
    said = "died or timed out" if code is None else f"exited {code}"
    assert code == 0, f"`python -m {' '.join(args)}` {said}\nstdout:\n{stdout[-2000:]}\nstderr:\n{stderr[-4000:]}"
    return stdout


def json_lines(stdout: str) -> list[dict]:
    """The JSON objects a command printed, one per line (other lines ignored)."""
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def has_fields(row: dict, *fields: str) -> bool:
    return all(f in row for f in fields)


def link(cwd: Path, world: Path, *names: str) -> Path:
    """Make `cwd/name` a symlink to `world/name` for each name (data/corpora, cache, ...); returns cwd."""
    for name in names:
        (cwd / name).parent.mkdir(parents=True, exist_ok=True)
        (cwd / name).symlink_to(world / name, target_is_directory=True)
    return cwd


def png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- a tiny offline world

ADJ = "red green small large old new quiet loud warm cold bright dark".split()
NOUN = "cat dog tree house river stone bird lamp road cloud book chair".split()


def _general_doc(rng: np.random.Generator) -> str:
    """English-like sentences in which " is", " are", " was" and " were" all occur often (the LIMe probe's words)."""
    out = []
    for _ in range(20):
        a, n = rng.choice(ADJ, 2), rng.choice(NOUN, 2)
        verb = rng.choice(["is", "was", "are", "were"])
        subject = f"the {a[0]} {n[0]}" + ("s" if verb in ("are", "were") else "")
        out.append(f"{subject.capitalize()} {verb} {a[1]} near the {n[1]}.")
    return " ".join(out)


def _code_doc(rng: np.random.Generator) -> str:
    lines = []
    for i in rng.integers(0, 50, 12):
        lines.append(f"def f_{i}(x, y):\n    return x * {i} + y  # {rng.choice(NOUN)}")
    return "\n".join(lines)


class _WordTokenizer:
    """Stands in for the SmolLM2 tokenizer: one id per distinct word or punctuation mark; 0 stays <|endoftext|>."""

    def __init__(self):
        self.ids: dict[str, int] = {}

    def encode_batch(self, texts, add_special_tokens=False):
        return [types.SimpleNamespace(ids=[self.ids.setdefault(w, len(self.ids) + 1)
                                           for w in re.findall(r"\w+|[^\w\s]", t)]) for t in texts]


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> Path:
    """data/corpora/{general,code}/{train,heldout}.jsonl, their packed CTX-token contexts under data/tokens/, and
    layer-1 activation caches of the tiny random-weight model under cache/acts/tiny/L1/, as the CLIs lay them out."""
    from jaxsae import harvest
    from lime_jax import corpora

    root = tmp_path_factory.mktemp("world")
    rng = np.random.default_rng(0)
    tok = _WordTokenizer()
    model = harvest.load_model("tiny")
    for corpus, make in (("general", _general_doc), ("code", _code_doc)):
        for split in ("train", "heldout"):
            path = root / "data" / "corpora" / corpus / f"{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            n_docs = 24 if split == "train" else 10
            path.write_text("".join(json.dumps({"id": f"{corpus}/{split}/{i}", "text": make(rng), "source": "smoke"})
                                    + "\n" for i in range(n_docs)))
            tokens_NxT = corpora.token_contexts(corpus, split, CTX, data_dir=root / "data" / "corpora",
                                                tokens_dir=root / "data" / "tokens", tokenizer=tok)
            hcfg = harvest.HarvestConfig(corpus=corpus, split=split, num_tokens=CACHE_TOKENS[corpus, split],
                                         layers=(LAYER,), ctx_len=CTX, model="tiny",
                                         root=str(root / "cache" / "acts"))
            harvest.harvest(model, tokens_NxT, hcfg)
    return root


# ---------------------------------------------------------------- benchmarks


def test_benchmark_htopk_step(tmp_path):
    """The README's command; it crashed before it measured anything (argv None passed on to its children)."""
    rows = json_lines(run(tmp_path, "benchmarks.htopk_step", "batch=64", "d_in=16", "d_sae=64", "ks=4",
                          "rounds=1", "reps=1"))
    assert sorted(r["impl"] for r in rows) == sorted(["topk", "htopk_reference", "htopk", "htopk_scan_autodiff"])
    for r in rows:
        assert has_fields(r, "K", "step_s", "step_s_median", "step_cpu_s", "peak_bytes", "xla_temp_bytes", "date")
        assert r["K"] == 4 and r["step_s"] > 0 and r["xla_temp_bytes"] > 0
    paired = {r["impl"]: r.get("step_vs_topk") for r in rows}
    assert paired["topk"] is None and all(paired[i] > 0 for i in paired if i != "topk")


def test_benchmark_sae_step_jax(tmp_path):
    rows = json_lines(run(tmp_path, "benchmarks.sae_step", "--shape", "64,16,64,4", "--rounds", "1",
                          "--impls", "jaxsae,jaxsae_vmap8"))
    assert [(r["impl"], r["seeds"]) for r in rows] == [("jaxsae", 1), ("jaxsae_vmap8", 8)]
    for r in rows:
        assert has_fields(r, "step_s", "tokens_per_s", "step_over_matmul", "matmul_s") and r["tokens_per_s"] > 0
        assert r["malloc"] == "keep"  # run through configlib.run, as the commands are


def test_benchmark_sae_step_torch(tmp_path):
    """The PyTorch side (SAELens, sparsify), where the optional `bench` extra is installed."""
    pytest.importorskip("torch")
    libs = [name for name in ("sae_lens", "sparsify") if importlib.util.find_spec(name)]
    if not libs:
        pytest.skip("neither sae_lens nor sparsify is installed")
    rows = json_lines(run(tmp_path, "benchmarks.sae_step", "--shape", "64,16,64,4", "--rounds", "1",
                          "--impls", ",".join(["jaxsae"] + libs)))
    assert [r["impl"] for r in rows] == ["jaxsae"] + libs
    for r in rows:
        assert "skipped" not in r and r["tokens_per_s"] > 0 and "torch_matmul_s" in r


def test_benchmark_train_step(tmp_path):
    rows = json_lines(run(tmp_path, "benchmarks.train_step", "batch=64", "d_in=16", "d_sae=64", "k=4", "seeds=1,2",
                          "reps=1", "cache_tokens=16384", "cache_batches=2"))
    assert [r["bench"] for r in rows] == ["hlo", "step", "step", "cache"]
    assert rows[0]["bxm_dots_step"] > 0 and rows[0]["bxm_dots_loss_grad"] > 0
    assert [r["seeds"] for r in rows[1:3]] == [1, 2]
    assert all(has_fields(r, "step_s", "median_step_s", "tokens_x_seeds_per_s", "vs_separate") for r in rows[1:3])
    assert rows[3]["cache_tokens"] == 16384 and rows[3]["tokens_per_s"] > 0


def test_benchmark_stability(tmp_path):
    rows = json_lines(run(tmp_path, "benchmarks.stability", "seeds=3", "d_sae=64", "d_in=16", "block=32"))
    assert len(rows) == 1 and rows[0]["pairs"] == 3 and rows[0]["seconds"] >= 0
    assert 0.0 <= rows[0]["mean_stability"] <= 1.0


def test_benchmark_lime_step(tmp_path):
    rows = json_lines(run(tmp_path, "benchmarks.lime_step", "--shape", "2,32,2,16", "--vocab", "64", "--rounds", "1",
                          "--depths", "2"))
    names = ["llama", "lime_static", "lime_dynamic", "lime_v2"]
    timed, scan = [r for r in rows if "depth_scan" not in r], [r for r in rows if "depth_scan" in r]
    assert [r["impl"] for r in timed] == names and [r["impl"] for r in scan] == names
    for r in timed:
        assert has_fields(r, "step_s", "tokens_per_s", "speed_vs_llama", "flops_vs_llama", "peak_bytes", "temp_bytes")
        assert r["flops_vs_llama"] >= 1.0 and r["peak_bytes"] > 0
    assert all(r["L"] == 2 and r["temp_bytes"] > 0 for r in scan)


def test_benchmark_protocol_run_and_summarize(tmp_path):
    """The protocol runs each round's benchmark in a fresh process, resumes without rerunning, and its summary
    is the median over the rounds of ratios read straight from the JSON lines."""
    tiny = "--shape 64,16,64,4 --rounds 1 --impls jaxsae,jaxsae_vmap8"
    run(tmp_path, "benchmarks.protocol", "run", "--out", "p", "--benches", "sae", "--rounds", "2", "--set",
        f"sae={tiny}")
    out = tmp_path / "p"
    assert sorted(f.name for f in out.iterdir()) == [f"sae.{r}.{e}" for r in (1, 2) for e in ("err", "jsonl", "rc")]
    mtimes = [f.stat().st_mtime_ns for f in sorted(out.iterdir())]
    run(tmp_path, "benchmarks.protocol", "run", "--out", "p", "--benches", "sae", "--rounds", "2", "--set",
        f"sae={tiny}")
    assert [f.stat().st_mtime_ns for f in sorted(out.iterdir())] == mtimes  # both runs done: nothing rerun
    raw = [{r["impl"]: r for r in json_lines((out / f"sae.{i}.jsonl").read_text())} for i in (1, 2)]
    lines = json_lines(run(tmp_path, "benchmarks.protocol", "summarize", "p"))
    got = {l["figure"]: l for l in lines if "figure" in l}
    vmap = [d["jaxsae_vmap8"]["tokens_per_s"] / d["jaxsae"]["tokens_per_s"] for d in raw]
    assert got["8 seeds vmapped, per-seed tokens/s / one seed"]["median"] == pytest.approx((vmap[0] + vmap[1]) / 2)
    assert got["SAE step / JAX encoder matmul"]["values"] == [d["jaxsae"]["step_over_matmul"] for d in raw]
    assert {"bench": "sae", "runs": 2, "quiet": 0, "void": 0, "unguarded": 2, "load_before": None} in lines


def test_benchmark_protocol_summarize_by_hand(tmp_path):
    """Three rounds of made-up htopk and harvest lines, figures worked out by hand (harvest's third round is
    void: the guard said not quiet); bad input exits 2."""
    for r, (topk, htopk, lj, tr, bound) in enumerate([(2.0, 2.2, 120, 100, 150), (1.0, 1.3, 90, 100, 100),
                                                       (4.0, 4.0, 110, 100, 200)], 1):
        (tmp_path / f"htopk.{r}.jsonl").write_text("\n".join(json.dumps(d) for d in (
            {"impl": "topk", "K": 8, "step_s": topk, "step_s_median": 2 * topk},
            {"impl": "htopk", "K": 8, "step_s": htopk, "step_s_median": 2 * topk})) + "\n")
        (tmp_path / f"harvest.{r}.jsonl").write_text("\n".join(json.dumps(d) for d in (
            {"check": "residual"}, {"impl": "lime_jax", "bench": "harvest_forward", "batch": 4, "tokens_per_s": lj},
            {"impl": "transformers", "bench": "harvest_forward", "batch": 4, "tokens_per_s": tr},
            {"impl": "xla_matmuls", "bench": "matmul_bound", "batch": 4, "matmul_bound_tokens_per_s": bound})))
        (tmp_path / f"harvest.{r}.err").write_text(
            f"rounds: 100%\nquiet: load before 0.4{r}; command 1 CPU s -> {'quiet' if r < 3 else 'NOT QUIET: void'}\n")
    lines = json_lines(run(tmp_path, "benchmarks.protocol", "summarize", "."))
    got = {l["figure"]: (l["median"], l["min"], l["max"]) for l in lines if "figure" in l}
    assert got["HTopK / TopK best step, K=8"] == pytest.approx((1.1, 1.0, 1.3))
    assert got["HTopK / TopK median step, K=8"] == pytest.approx((1.0, 1.0, 1.0))
    assert got["harvest batch 4, lime_jax / transformers"] == pytest.approx((1.05, 0.9, 1.2))
    assert got["harvest batch 4, lime_jax / matmul bound"] == pytest.approx((0.85, 0.8, 0.9))
    assert {"bench": "harvest", "runs": 3, "quiet": 2, "void": 1, "unguarded": 0, "load_before": [0.41, 0.43]} in lines
    for args, said in [(("summarize", "missing"), "no such folder"),
                       (("run", "--out", "p", "--benches", "sea"), "unknown ['sea']"),
                       (("run", "--out", "p", "--wrap", "./no-such-guard"), "is not an executable file")]:
        code, _, err = _CommandProcess.run(tmp_path, ("benchmarks.protocol", *args), 60)
        assert code == 2 and said in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
def test_benchmark_harvest(tmp_path):
    """Both sides of the harvest benchmark in one command (one SmolLM2 GGUF load): lime_jax's, and HF
    transformers' where installed, whose residual must match lime_jax's on the same tokens."""
    hf = all(importlib.util.find_spec(m) for m in ("torch", "transformers"))
    rows = json_lines(run(tmp_path, "benchmarks.harvest", "batch_sizes=1", "ctx_len=8", "layer=0", "repeats=1",
                          "impls=lime_jax" + (",transformers" if hf else "")))
    if hf:
        check = rows.pop(0)
        assert check["check"] == "transformers_vs_lime_jax_residual"
        assert check["max_abs_diff"] <= 1e-5 * max(1.0, check["max_abs_value"])
    assert [(r["impl"], r["bench"]) for r in rows] == [("lime_jax", "harvest_forward")] \
        + [("transformers", "harvest_forward")] * hf + [("lime_jax", "splice_forward"), ("xla_matmuls", "matmul_bound")]
    assert all(r["batch"] == 1 and r["seq"] == 8 and r["tokens_per_s"] > 0 for r in rows[:-1])
    assert rows[-1]["matmul_bound_tokens_per_s"] > 0 and rows[-1]["dots"] in ("jaxsae", "onednn", "xla")
    if hf:  # transformers' time over lime_jax's in the one round
        assert rows[0]["speed_vs_transformers"] == rows[0]["speed_vs_transformers_rounds"][0] > 0


# ---------------------------------------------------------------- experiments


def test_experiment_pipeline(tmp_path, world):
    cwd = link(tmp_path, world, "data", "cache")
    out = tmp_path / "res"
    run(cwd, "experiments.pipeline", "model=tiny", f"layer={LAYER}", "train_tokens=2048", "heldout_tokens=512",
        "domain_tokens=512", "d_sae=32", "k=4", "aux_k=8", "n_seeds=2", "steps=4", "batch_size=64",
        "dead_after_tokens=1024", "ce_contexts=2", "eval_batch_size=256", "freq_bins=3", "browse_top_k=3",
        "screenshot=false", f"run_dir={tmp_path / 'runs'}", f"out={out}")
    summary = json.loads((out / "summary.json").read_text())
    assert sorted((r["corpus"], r["seed"]) for r in summary["per_seed"]) == [("code", 0), ("code", 1),
                                                                              ("general", 0), ("general", 1)]
    for r in summary["per_seed"]:
        assert has_fields(r, "ev", "l0", "dead_frac", "ce_delta", "loss_recovered") and r["l0"] <= 4
    assert set(summary["mean_std"]) == {"general", "code"}
    stab = summary["stability"]
    assert stab["tau"] == 0.7 and stab["taus"] == [0.5, 0.7, 0.9] and 0.0 <= stab["mean"] <= 1.0
    assert 0.0 <= stab["frac_stable"] <= 1.0 and stab["mean"] == stab["by_tau"]["0.7"]["mean"]
    # Two seeds: p is 0 or 1, so the histogram has two bins and counts every alive latent once.
    assert all(len(b["hist"]) == 2 and sum(b["hist"]) == stab["alive"] for b in stab["by_tau"].values())
    assert [a + b for a, b in zip(stab["counts"]["stable"], stab["counts"]["unstable"])] == \
        [32 - n for n in stab["counts"]["silent"]]
    groups = ["stable", "unstable", "random_size_stable", "random_freq_stable", "random_size_unstable",
              "random_freq_unstable"]
    assert sorted(stab["ablation"]) == sorted(groups)
    for name in groups:
        a = stab["ablation"][name]
        assert len(a["d_ev"]) == 2 and np.isfinite(a["d_ce_seed0"]) and a["d_ev_mean"] == pytest.approx(np.mean(a["d_ev"]))
    for name in ("stable", "unstable"):  # a random group matches its group's size on every seed
        assert stab["ablation"][f"random_size_{name}"]["size_per_seed"] == stab["ablation"][name]["size_per_seed"]
    assert (out / "browser" / "index.html").is_file() and (out / "browser" / "data" / "overview.js").is_file()
    report = (out / "report.md").read_text()
    assert "| general | 0 |" in report and "## Per-feature stability" in report and png(out / "pipeline.png")


def test_experiment_hierarchical_topk(tmp_path, world):
    cwd = link(tmp_path, world, "data", "cache")
    out = tmp_path / "res"
    run(cwd, "experiments.hierarchical_topk", "model=tiny", f"layer={LAYER}", "train_cache_tokens=2048",
        "eval_tokens=512", "ce_contexts=2", "d_sae=32", "k_max=4", "ks=2,4", "batch_size=64", "num_steps=3",
        "warmup_steps=1", "dead_after_tokens=1024", "aux_k=8", f"out_dir={tmp_path / 'runs'}", f"results_dir={out}")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["missing"] == []
    for family in ("htopk", "topk", "topk_truncated"):
        assert set(summary["results"][family]) == {"2", "4"}
        assert all(has_fields(r, "ev", "l0", "ce_delta") for r in summary["results"][family].values())
    assert set(summary["train_cost"]) == {"htopk_k4", "topk_k4", "topk_k2"}
    assert "CE delta of HTopK" in (out / "report.md").read_text() and png(out / "ev_vs_l0.png")


BOOST_ARGS = ("model=tiny", f"layer={LAYER}", "domains=code", "sweep_domain=code", "budgets=128", "batch_size=64",
              "base_d_sae=32", "base_k=4", "base_steps=3", "res_d_sae=16", "res_k=2", "res_steps=2",
              "extend_latents=16", "warmup_steps=1", "aux_k=8", "dead_after_tokens=1024", "convert_tokens=256",
              "eval_tokens=256", "ce_contexts=2", "ce_batch_size=2")


@pytest.fixture(scope="module")
def boost_run(tmp_path_factory, world) -> Path:
    """A finished tiny `experiments.boost` run (working directory holding results/ and runs/)."""
    cwd = link(tmp_path_factory.mktemp("boost"), world, "data", "cache")
    run(cwd, "experiments.boost", *BOOST_ARGS, f"out_dir={cwd / 'runs'}", f"results_dir={cwd / 'results'}")
    return cwd


def test_experiment_boost(boost_run):
    res = boost_run / "results"
    summary = json.loads((res / "summary.json").read_text())
    rows = summary["domains"]["code"]
    assert set(rows) == {"base", "boosted", "finetuned", "extended"}
    for r in rows.values():
        assert has_fields(r, "domain_ev", "general_ev") and r["domain_ce_delta"] is not None
    assert summary["stitched_vs_boosted_max_abs_diff"] < 1e-4
    assert [r["unique_tokens"] for r in summary["budget_sweep"]["rows"]] == [128, summary["tokens"]["code"]["train"]]
    assert "## Domain `code`" in (res / "report.md").read_text() and png(res / "boost.png")
    assert (boost_run / "runs" / "residual_code" / "residual").is_dir()


def test_experiment_boost_diagnose(boost_run, tmp_path):
    res = tmp_path / "results"  # a copy: diagnose rewrites summary.json and report.md in place
    shutil.copytree(boost_run / "results", res)
    run(boost_run, "experiments.boost_diagnose", f"results_dir={res}", "tokens=256", "mix_general=0.1")
    summary = json.loads((res / "summary.json").read_text())
    assert set(summary["diagnosis"]["code"]) == {"general", "code"}
    assert set(summary["outliers"]) == {"general", "code"}
    assert has_fields(summary["mixed_ablation"]["code"], "boosted_mixed_domain_ev", "boosted_mixed_general_ev")
    report = (res / "report.md").read_text()
    assert "Where the residuals fire" in report and "general text mixed in" in report


@pytest.mark.slow
def test_experiment_lime(tmp_path, world):
    """Reads SmolLM2's tokenizer from the GGUF (the probe words' ids), so the fake corpora are tokenised for real."""
    cwd = link(tmp_path, world, "data/corpora")  # no data/tokens: packed here with the real tokenizer
    out = tmp_path / "res"
    run(cwd, "experiments.lime", "part=scratch", "n_layers=2", "d_model=32", "n_heads=1", "head_dim=32", "d_ff=64",
        "vocab_top=512", "seq_len=64", "batch_size=2", "num_steps=2", "warmup_steps=1", "log_every=1", "seeds=0,1",
        "routings=none,static", "heldout_contexts=4", "entropy_contexts=8", "probe_contexts=16",
        f"out_dir={tmp_path / 'runs'}", f"results_dir={out}")
    models = json.loads((out / "summary.json").read_text())["models"]
    assert list(models) == ["llama", "lime_static"]
    for name, r in models.items():
        assert len(r["value_entropy"]) == 2 and len(r["probe_accuracy"]) == 2 and np.isfinite(r["heldout_loss"])
        assert (r["router_weights"] is None) == (name == "llama")
        assert r["seed_ids"] == [0, 1] and len(r["seeds"]["1"]["curve"]["loss"]) == 2
        assert r["heldout_loss"] == pytest.approx(np.mean(r["heldout_loss_seeds"]))
    assert "lower held-out loss per FLOP" in (out / "report.md").read_text()
    assert png(out / "loss_entropy_probe.png") and png(out / "router_weights.png")


def test_experiment_lime_pretrained_tiny(tmp_path, world):
    """part=pretrained on the random-weight tiny stand-in for SmolLM2: three arms, before/after, router heatmap."""
    cwd = link(tmp_path, world, "data")
    out = tmp_path / "res"
    run(cwd, "experiments.lime", "part=pretrained", "pre_model=tiny", "pre_tiny_layers=2", "pre_steps=2",
        "pre_batch_size=2", f"pre_seq_len={CTX}", "pre_warmup_steps=1", "pre_log_every=1", "pre_eval_contexts=2",
        "pre_entropy_contexts=2", f"out_dir={tmp_path / 'runs'}", f"results_dir={out}")
    pre = json.loads((out / "summary.json").read_text())["pretrained"]
    assert list(pre["arms"]) == ["smollm2_all", "lime_v2_router", "lime_v2_all", "lime_v2_router_current"]
    assert has_fields(pre["before"], "general_loss", "code_loss", "value_entropy")
    for arm, r in pre["arms"].items():
        assert np.isfinite(r["general_loss"]) and np.isfinite(r["code_loss"]) and len(r["value_entropy"]) == 2
        assert ("router_weights" in r) == (arm != "smollm2_all")
    assert "Paired comparisons" in (out / "report.md").read_text()
    assert png(out / "pretrained.png") and png(out / "pretrained_routers.png")


def test_experiment_stability_synthetic(tmp_path):
    """The synthetic part only: the real part (SmolLM2 caches) is being rewritten and has its own tests."""
    out = tmp_path / "res"
    run(tmp_path, "experiments.stability", "part=synthetic", "n_seeds=3", "pool_seeds=2", "syn_d=8",
        "syn_n_atomic=12", "syn_n_groups=1", "syn_group_rank=2", "syn_d_sae=16", "syn_k=2", "syn_tokens=1024",
        "syn_steps=3", "syn_batch=64", f"out_dir={out}", f"run_dir={tmp_path / 'runs'}")
    syn = json.loads((out / "summary.json").read_text())["synthetic"]
    assert has_fields(syn, "ev", "l0", "mean_stability") and syn["sae"]["n_seeds"] == 3
    assert (out / "report.md").stat().st_size > 0


# ---------------------------------------------------------------- the README's commands


def test_readme_jaxsae_train_synthetic(tmp_path):
    out = tmp_path / "toy"
    run(tmp_path, "jaxsae.cli", "train", "source=synthetic", "d_in=8", "d_sae=32", "k=2", "n_seeds=2", "num_steps=4",
        "batch_size=64", "warmup_steps=1", "aux_k=4", "synthetic_tokens=1024", "synthetic_features=16",
        "synthetic_k=2", "eval_tokens=256", "log_every=2", "checkpoint_every=2", f"out_dir={out}")
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["ev"]) == 2 and summary["steps"] == 4
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert all((out / f"seed_{s}" / "cfg.json").is_file() for s in range(2))
    assert (out / "config.json").is_file() and (out / "checkpoints" / "4").is_dir()


def test_readme_jaxsae_harvest_train_eval(tmp_path, world):
    """harvest (two layers from one forward) -> train on the cache -> eval, as the README chains them."""
    cwd = link(tmp_path, world, "data")
    run(cwd, "jaxsae.cli", "harvest", "corpus=code", "split=heldout", "num_tokens=300", "layers=1,2", "model=tiny",
        f"ctx_len={CTX}", "root=acts")
    for layer in (1, 2):
        manifest = json.loads((cwd / "acts" / "tiny" / f"L{layer}" / "code_heldout" / "manifest.json").read_text())
        assert manifest["layer"] == layer and manifest["num_tokens"] >= 300 and manifest["model"] == "tiny"
    run(cwd, "jaxsae.cli", "train", "source=acts/tiny/L1/code_heldout", "d_sae=32", "k=4", "n_seeds=2",
        "num_steps=3", "batch_size=64", "warmup_steps=1", "aux_k=8", "eval_tokens=256", "out_dir=runs/l1")
    assert len(json.loads((cwd / "runs" / "l1" / "summary.json").read_text())["ev"]) == 2
    run(cwd, "jaxsae.cli", "eval", "sae=runs/l1", f"layer={LAYER}", "corpora=code", "num_tokens=256", "ce_contexts=2",
        "batch_size=128", "root=acts", "model=tiny", "out=eval.json")
    rows = json.loads((cwd / "eval.json").read_text())
    assert [Path(r["sae"]).name for r in rows] == ["seed_0", "seed_1"]
    assert all(has_fields(r, "ev", "l0", "dead_frac", "ce_delta") and r["eval_tokens"] == 256 for r in rows)


def test_readme_lime_jax_train(tmp_path, world):
    cwd = link(tmp_path, world, "data")
    run(cwd, "lime_jax.cli", "train", "routing=static", "n_layers=2", "d_model=32", "n_heads=1", "n_kv_heads=1",
        "head_dim=32", "d_ff=64", f"seq_len={CTX}", "batch_size=2", "num_steps=2", "warmup_steps=1", "log_every=1",
        "checkpoint_every=0", "eval_batches=1", "out_dir=runs/lime_static")
    run_dir = cwd / "runs" / "lime_static"
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
    summary = json.loads((run_dir / "summary.json").read_text())
    assert np.isfinite(summary["heldout_loss"]) and (run_dir / "config.json").is_file()


def test_readme_perplexity(tmp_path):
    """`python -m lime_jax.perplexity FILE` reaches its main: a missing file is one line and exit code 2. The same
    main on English prose with the real SmolLM2 (tokens read, nats per token) is tests/test_perplexity.py's slow
    test; running it here too would load and compile the model a second time for nothing it does not check."""
    code, stdout, stderr = _CommandProcess.run(tmp_path, ("lime_jax.perplexity", str(tmp_path / "prose.txt"),
                                                          "--max-tokens", "48"), 600)
    assert code == 2 and stderr.strip().splitlines() == [
        f"python -m lime_jax.perplexity: error: text file not found: '{tmp_path / 'prose.txt'}' (--debug shows the "
        "traceback)"], stderr[-2000:]


def test_benchmark_streaming(tmp_path, world):
    """Streaming vs harvest-then-cache on the tiny model's corpus contexts; sparsify's trainer too where installed."""
    cwd = link(tmp_path, world, "data")
    torch_side = all(importlib.util.find_spec(m) for m in ("torch", "transformers", "sparsify", "datasets"))
    impls = ["jaxsae_stream", "jaxsae_cache"] + (["sparsify"] if torch_side else [])
    rows = json_lines(run(cwd, "benchmarks.streaming", "model=tiny", f"layer={LAYER}", f"ctx_len={CTX}",
                          "ctx_batch=1", "d_sae=64", "k=4", "batch=64", "seeds=1,2", "warmup=1", "steps=2",
                          "rounds=1", "normalizer_tokens=256", f"impls={','.join(impls)}"))
    if torch_side:  # sparsify trains on the same model: torch's residual must match JAX's on the same tokens
        check = rows.pop(0)
        assert check["check"] == "torch_vs_jax_residual"
        assert check["max_abs_diff"] <= 1e-5 * max(1.0, check["max_abs_value"])
    timed = [r for r in rows if "impl" in r and "bench" not in r]
    assert [(r["impl"], r["seeds"]) for r in timed] == [(i, s) for i in impls for s in (1, 2)]
    for r in timed:
        assert has_fields(r, "step_s", "median_step_s", "tokens_per_s", "seed_tokens_per_s", "per_seed_cost_s",
                          "compile_and_first_s", "load_avg_1m_before", "load_avg_1m_after")
        assert r["tokens_per_s"] > 0 and r["seed_tokens_per_s"] == pytest.approx(r["seeds"] * r["tokens_per_s"], 1e-3)
    cache = [r for r in timed if r["impl"] == "jaxsae_cache"]
    assert all(r["harvest_rows"] >= 3 * 64 and r["step_s"] > r["train_step_s"] for r in cache)
    compare = [r for r in rows if r.get("bench") == "compare"]
    assert [r["seeds"] for r in compare] == [1, 2] and all(r["streaming_vs_cache"] > 0 for r in compare)
    assert all(("streaming_vs_sparsify" in r) == torch_side for r in compare)
    flat = [r for r in rows if r.get("bench") == "flattening"]
    assert [r["impl"] for r in flat] == impls and all(set(r["per_seed_cost_s"]) == {"1", "2"} for r in flat)


def test_benchmark_multiprocess(tmp_path):
    """1 process x 4 CPU devices vs 2 x 2 through jaxsae.launch; both jobs must train the same ensemble."""
    rows = json_lines(run(tmp_path, "benchmarks.multiprocess", "meshes=1x4", "n_seeds=2", "batch=64", "d_in=16",
                          "d_sae=64", "k=4", "warmup=1", "steps=2"))
    jobs, overhead = rows[:2], rows[2]
    assert [(r["impl"], r["processes"], r["devices_per_process"]) for r in jobs] == [("1proc_4dev", 1, 4),
                                                                                      ("2proc_2dev", 2, 2)]
    for r in jobs:
        assert has_fields(r, "step_s", "median_step_s", "tokens_per_s", "load_avg_1m_before", "load_avg_1m_after")
        assert r["step_s"] > 0 and len(r["final_loss"]) == 2
    assert overhead["bench"] == "overhead" and overhead["overhead"] > 0
    assert overhead["final_loss_max_rel_diff"] < 1e-5

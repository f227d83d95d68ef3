"""User errors on every CLI: one line naming the problem and the value, exit code 2, nothing written."""
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# a bare environment, plus the session's persistent compile cache and XLA flags (tests/conftest.py)
ENV = {"JAX_PLATFORMS": "cpu", "PATH": "", "PYTHONPATH": str(ROOT),
       **{k: v for k, v in os.environ.items()
          if k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE", "XLA_FLAGS"))}}

CASES = [
    (["jaxsae", "train", "k=64", "d_sae=16"], "k must be in [1, d_sae=16], got k=64"),
    (["jaxsae", "train", "bogus=1"], "unknown option 'bogus'"),
    (["jaxsae", "train", "k=abc"], "expected int, got 'abc'"),
    (["jaxsae", "train", "source=no/such/cache"], "no activation cache at no/such/cache"),
    (["jaxsae", "train", "mesh_data=64", "d_sae=64", "k=4"], "= 64 devices, but"),
    (["jaxsae", "eval", "sae=no/such/run"], "no SAE folder"),
    (["jaxsae", "harvest", "model=nope"], "unknown model 'nope'"),
    (["lime_jax", "train", "n_layers=x"], "expected int, got 'x'"),
]


def _run(cli, args, cwd):
    return subprocess.run([sys.executable, "-m", f"{cli}.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=ENV)


@pytest.mark.parametrize("argv, message", CASES, ids=[" ".join(c[0][1:]) for c in CASES])
def test_user_error_is_one_line_and_exit_2(tmp_path, argv, message):
    r = _run(argv[0], argv[1:] + [f"out_dir={tmp_path / 'run'}"] if argv[1] == "train" else argv[1:], tmp_path)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert message in lines[0] and lines[0].startswith(f"{argv[0]} {argv[1]}: error: ")
    assert not (tmp_path / "run").exists()  # nothing written before the error


def test_debug_flag_shows_the_traceback(tmp_path):
    r = _run("jaxsae", ["train", "k=64", "d_sae=16", "--debug"], tmp_path)
    assert r.returncode != 0 and "Traceback" in r.stderr and "k must be in" in r.stderr

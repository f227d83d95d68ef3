"""`jaxsae plan` / `lime_jax plan`: XLA's per-device accounting against counts written out by hand."""
import json
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
pytestmark = pytest.mark.smoke


def _plan(cli, *args):
    r = subprocess.run([sys.executable, "-m", f"{cli}.cli", "plan", *args], capture_output=True, text=True,
                       cwd=ROOT, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_sae_plan_state_and_per_device_bytes():
    S, D, M, B = 4, 32, 256, 64
    p = _plan("jaxsae", f"d_in={D}", f"d_sae={M}", "k=4", f"n_seeds={S}", f"batch_size={B}", "mesh_seed=2",
              "mesh_data=2", "mesh_model=2")
    params = S * (2 * D * M + M + D)  # W_enc, W_dec, b_enc, b_dec
    want_state = 4 * 3 * params + 4 * (S * 2 * M) + 4 * (2 * S)  # params + Adam mu, nu; firing stats; step, count
    assert p["devices"] == 8 and p["state_bytes_total"] == pytest.approx(want_state, rel=1e-3)
    # Each device holds its seeds' half of every [M]-sized array and its data-quarter of the batch.
    per_device = 4 * 3 * (S // 2) * (2 * D * M // 2 + M // 2 + D) + 4 * (S // 2) * 2 * (M // 2) + 4 * B * D // 2
    assert p["argument_bytes"] == pytest.approx(per_device, rel=0.02)
    # The encoder product alone is 2·B·D·M per seed, split over 8 devices; the step does at least that.
    assert p["flops"] >= 2 * B * D * M * S / 8
    assert p["step_s"] > 0 and p["bound"] in ("compute", "memory")


def test_lm_plan_counts_the_model():
    p = _plan("lime_jax", "n_layers=2", "d_model=32", "n_heads=2", "n_kv_heads=1", "head_dim=16", "d_ff=64",
              "vocab=128", "max_len=16", "seq_len=16", "batch_size=8", "mesh_data=2", "mesh_fsdp=2", "routing=v2")
    from lime_jax import config

    cfg = config.tiny(n_layers=2, d_model=32, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64, vocab=128, max_len=16,
                      routing="v2")
    assert p["params"] == cfg.num_params and p["devices"] == 4
    assert p["state_bytes_total"] >= 3 * 4 * cfg.num_params  # params + two AdamW moments in float32

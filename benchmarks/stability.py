"""Wall time of per-feature stability (all seed pairs, blocked) on random dictionaries; one JSON line per run.

python -m benchmarks.stability [seeds=8 d_sae=16384 d_in=576 block=1024 search_dtype=bfloat16 use_encoder=false]
"""
from __future__ import annotations

import dataclasses
import json
import platform
import sys
import time

import jax
import jax.numpy as jnp

from jaxsae import configlib, stability


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    seeds: int = 8  # dictionaries in the ensemble (S)
    d_sae: int = 16384  # latents per dictionary (M)
    d_in: int = 576  # direction width (D), SmolLM2-135M's d_model
    block: int = 512  # rows of one seed per similarity tile
    search_dtype: str = "bfloat16"  # dtype of the similarity search (partners are rescored in float32)
    use_encoder: bool = False  # also compare encoder directions (doubles the work)
    repeats: int = 1  # timed runs after one warm-up on a small ensemble


def main(argv: list[str] | None = None) -> int:
    cfg = configlib.parse(BenchConfig(), argv)
    if cfg is None:
        return 0
    kd, ke = jax.random.split(jax.random.key(0))
    dec = jax.random.normal(kd, (cfg.seeds, cfg.d_sae, cfg.d_in), jnp.float32)
    enc = jax.random.normal(ke, dec.shape, jnp.float32) if cfg.use_encoder else None
    kw = dict(block=cfg.block, search_dtype=cfg.search_dtype)
    stability.best_matches(dec[:2], None if enc is None else enc[:2], **kw)  # compile
    for _ in range(cfg.repeats):
        t0 = time.perf_counter()
        cos = stability.best_matches(dec, enc, **kw, progress=True)
        p = stability.stability(cos, 0.7)
        seconds = time.perf_counter() - t0
        print(json.dumps({"bench": "stability", **dataclasses.asdict(cfg), "seconds": round(seconds, 2),
                          "pairs": cfg.seeds * (cfg.seeds - 1) // 2, "mean_stability": float(p.mean()),
                          "machine": f"{platform.machine()} x{jax.local_device_count()} {jax.default_backend()}",
                          "jax": jax.__version__}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(configlib.run(main, prog="python -m benchmarks.stability"))

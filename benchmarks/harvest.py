"""Throughput of the harvest forward (SmolLM2 to layer 14) and of the CE splice (full forward), JSON lines.

`python -m benchmarks.harvest [batch_sizes=4,8,16] [repeats=3]`: random token ids, contexts of 256 tokens,
one untimed call per shape for compilation, then the mean of `repeats` timed calls.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time

import jax
import numpy as np

from jaxsae import configlib, evaluate
from lime_jax import model as lm


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    batch_sizes: tuple[int, ...] = (4, 8, 16)  # contexts per forward
    ctx_len: int = 256  # tokens per context
    layer: int = 14  # harvest stops after this block; the splice replaces its output
    repeats: int = 3  # timed calls per measurement


def _time(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile
    t0 = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(fn())
    return (time.perf_counter() - t0) / repeats


def main(argv=None) -> int:
    cfg = configlib.override(BenchConfig(), list(sys.argv[1:] if argv is None else argv))
    model_cfg, params = evaluate.load_model()
    for b in cfg.batch_sizes:
        tokens = np.random.default_rng(b).integers(0, model_cfg.vocab, (b, cfg.ctx_len)).astype(np.int32)
        runs = {"harvest_forward": lambda: lm.residuals(params, tokens, model_cfg, cfg.layer),
                "splice_forward": lambda: lm.splice(params, tokens, model_cfg, cfg.layer, lambda h: h)}
        for name, fn in runs.items():
            s = _time(fn, cfg.repeats)
            print(json.dumps({"bench": name, "layer": cfg.layer, "batch": b, "ctx_len": cfg.ctx_len,
                              "seconds_per_call": round(s, 3), "tokens_per_s": round(b * cfg.ctx_len / s, 1)}),
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

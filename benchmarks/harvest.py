"""Harvest throughput: SmolLM2-135M forward to the middle layer, lime_jax (jit) vs HF transformers (torch CPU).

`python -m benchmarks.harvest [batch_sizes=4,8,16] [ctx_len=128] [repeats=3] [impls=lime_jax,transformers]`
prints JSON lines {impl, bench, layer, batch, seq, seconds_per_call, tokens_per_s}: random token ids, one
untimed call per shape (compilation / warm-up), then the best of `repeats` timed calls (the machine is
shared, so the minimum is the least noisy figure). Implementations alternate per batch size so both see the
same load. lime_jax also times the CE splice (`bench: splice_forward`, the full forward with the residual at
`layer` passed through). With transformers, a first line {"check": ...} gives the largest difference between
the two implementations' residuals on the same tokens. transformers runs the same GGUF, truncated to
blocks 0..layer with the final norm removed, so both return the residual after block `layer`.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time

import jax
import numpy as np

from jaxsae import configlib
from lime_jax import gguf, model


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    batch_sizes: tuple[int, ...] = (4, 8, 16)  # contexts per forward
    ctx_len: int = 128  # tokens per context
    layer: int = 14  # harvest stops after this block (the middle of SmolLM2's 30)
    repeats: int = 3  # timed calls per measurement (the best is reported)
    impls: tuple[str, ...] = ("lime_jax", "transformers")  # implementations to time (transformers if installed)


def _best_time(fn, repeats: int) -> float:
    """Seconds of the fastest of `repeats` calls, after one untimed call."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return min(times)


def _transformers_forward(layer: int):
    """A torch function tokens -> residual after block `layer`, from the same GGUF; None if not installed."""
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError:
        return None
    path = gguf.find_smollm2_gguf()
    lm = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    lm.model.layers = lm.model.layers[: layer + 1]
    lm.model.norm = torch.nn.Identity()
    lm.eval()

    def forward(tokens_BxT: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return lm.model(input_ids=torch.from_numpy(tokens_BxT.astype(np.int64))).last_hidden_state.numpy()

    return forward


def main(argv=None) -> int:
    bc = configlib.parse(BenchConfig(), argv)
    if bc is None:
        return 0
    cfg, params = gguf.load_smollm2()
    runs = {}
    if "lime_jax" in bc.impls:
        runs["lime_jax", "harvest_forward"] = lambda t: model.residuals(params, t, cfg, bc.layer)[bc.layer]
        runs["lime_jax", "splice_forward"] = lambda t: model.splice(params, t, cfg, bc.layer, lambda h: h)
    hf_forward = _transformers_forward(bc.layer) if "transformers" in bc.impls else None
    if hf_forward is not None:
        runs["transformers", "harvest_forward"] = hf_forward
        tokens = np.random.default_rng(0).integers(0, cfg.vocab, (2, bc.ctx_len)).astype(np.int32)
        ref = np.asarray(model.residuals(params, tokens, cfg, bc.layer)[bc.layer])
        diff = np.abs(hf_forward(tokens) - ref)
        print(json.dumps({"check": "transformers_vs_lime_jax_residual", "layer": bc.layer,
                          "max_abs_diff": float(diff.max()), "max_abs_value": float(np.abs(ref).max()),
                          "median_abs_diff": float(np.median(diff))}), flush=True)
    for b in bc.batch_sizes:
        tokens = np.random.default_rng(b).integers(0, cfg.vocab, (b, bc.ctx_len)).astype(np.int32)
        for (impl, bench), fn in runs.items():
            s = _best_time(lambda: fn(tokens), bc.repeats)
            print(json.dumps({"impl": impl, "bench": bench, "layer": bc.layer, "batch": b, "seq": bc.ctx_len,
                              "seconds_per_call": round(s, 3), "tokens_per_s": round(b * bc.ctx_len / s, 1)}),
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

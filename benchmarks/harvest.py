"""Harvest throughput: SmolLM2-135M forward to the middle layer, lime_jax (jit) vs HF transformers (torch CPU).

`python -m benchmarks.harvest [batch_sizes=4,8,16] [ctx_len=128] [repeats=5] [impls=lime_jax,transformers]`
prints JSON lines {impl, bench, layer, batch, seq, seconds_per_call, tokens_per_s, malloc, load_avg_1m}: random
token ids, one untimed call per shape (compilation / warm-up), then the best of `repeats` timed calls, the
implementations (and the bare matmuls below) taking turns call by call, each round starting one further along,
so that all see the same load. lime_jax's harvest line also gives `speed_vs_transformers`, the median over rounds
of transformers' time over lime_jax's in the same round (`speed_vs_transformers_rounds`). Per batch
size, a line with `bench: matmul_bound` gives `matmul_bound_tokens_per_s`: the forward's FLOPs per token up to
`layer` (`forward_flops_per_token`) over the rate the forward's dot library reaches on the bare matmuls of one
block at this batch ([B*T, D] x [D, N*H], [D, K*H] twice, [N*H, D], [D, F] twice, [F, D]; jitted together, timed
in the same run), i.e. the speed if everything but those matmuls were free. `dots` names that library: jaxsae
(its CPU matmul kernel, where `model._inference_cfg` picks it), onednn or xla. lime_jax runs on
per-block weights (`model.unstack_layers`, as its adapter does) and also times the CE splice (`bench:
splice_forward`, the full forward with the residual at `layer` passed through). With transformers, a first line
{"check": ...} gives the largest difference between the two implementations' residuals on the same tokens.
transformers runs HF's LlamaModel with the same weights, truncated to blocks 0..layer with the final norm removed,
so both return the residual after block `layer`.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time

import jax
import numpy as np

from jaxsae import configlib, hostmem
from lime_jax import gguf, model


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    batch_sizes: tuple[int, ...] = (4, 8, 16)  # contexts per forward
    ctx_len: int = 128  # tokens per context
    layer: int = 14  # harvest stops after this block (the middle of SmolLM2's 30)
    repeats: int = 5  # timed calls per implementation, taking turns (the best is reported)
    impls: tuple[str, ...] = ("lime_jax", "transformers")  # implementations to time (transformers if installed)


def _timed_calls(fns: dict, repeats: int) -> dict:
    """{name: seconds of each of `repeats` calls of fn}, after one untimed call each. The fns take turns call by
    call, each round starting one fn further along, so a drift in the host's speed reaches all of them alike."""
    for fn in fns.values():
        jax.block_until_ready(fn())
    names, times = list(fns), {name: [] for name in fns}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            jax.block_until_ready(fns[name]())
            times[name].append(time.perf_counter() - t0)
    return times


def _load_avg_1m() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def forward_flops_per_token(cfg, layer: int, T: int) -> float:
    """Forward FLOPs per token through blocks 0..layer: projections and MLP, plus QK^T and AV over the full
    T x T (PaLM's convention; causal masking would halve the attention part, ~4% of the total at T=128)."""
    D, N, K, H, F = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
    return (layer + 1) * (2 * (D * N * H + 2 * D * K * H + N * H * D + 3 * D * F) + 4 * T * N * H)


def _dots(cfg) -> str:
    """The dot library of lime_jax's inference forward for cfg on this host: jaxsae, onednn or xla."""
    return "jaxsae" if model._inference_cfg(cfg).cpu_matmul else "onednn" if model._uses_onednn(cfg) else "xla"


def _block_matmuls(cfg, rows: int):
    """(jitted fn running one block's matmuls on [rows, .] inputs, their FLOPs)."""
    D, NH, KH, F = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.d_ff
    shapes = [(D, NH), (D, KH), (D, KH), (NH, D), (D, F), (D, F), (F, D)]
    key = iter(jax.random.split(jax.random.key(0), 2 * len(shapes)))
    xs = [jax.random.normal(next(key), (1, rows, k)) for k, _ in shapes]
    ws = [jax.random.normal(next(key), (k, n)) for k, n in shapes]
    # The same dot library as the forward: its projection function and cfg (oneDNN by compiler options).
    icfg = model._inference_cfg(cfg)
    fn = jax.jit(lambda xs, ws: [model._dense(x, w, icfg) for x, w in zip(xs, ws)],
                 compiler_options=model._ONEDNN_DOTS if model._uses_onednn(cfg) else None)
    return (lambda: fn(xs, ws)), sum(2 * rows * k * n for k, n in shapes)


def _transformers_forward(cfg, stacked: dict, layer: int):
    """A torch function tokens -> residual after block `layer`: HF's LlamaModel (blocks 0..layer, no final norm)
    holding SmolLM2's weights as lime_jax read them from the GGUF; None if torch/transformers are missing. Handing
    the weights over (the inverse of `lime_jax.hf.assemble`) saves transformers' own GGUF parse (~20 s here);
    tests/test_gguf.py checks that parse against ours."""
    try:
        import torch
        from transformers import LlamaConfig, LlamaModel
    except ImportError:
        return None
    D, NH, KH = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    hf_cfg = LlamaConfig(vocab_size=cfg.vocab, hidden_size=D, num_hidden_layers=layer + 1,
                         num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                         intermediate_size=cfg.d_ff, rms_norm_eps=cfg.norm_eps, max_position_embeddings=cfg.max_len,
                         rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
                         attn_implementation="sdpa", dtype=torch.float32)  # sdpa: from_pretrained's default
    lm = LlamaModel(hf_cfg)
    lm.norm = torch.nn.Identity()
    w = jax.tree.map(np.asarray, stacked["layers"])
    # lime_jax keeps (in, out) with heads split out; nn.Linear stores (out, in).
    per_layer = {"input_layernorm": lambda i: w["attn_norm"][i],
                 "self_attn.q_proj": lambda i: w["wq"][i].reshape(D, NH).T,
                 "self_attn.k_proj": lambda i: w["wk"][i].reshape(D, KH).T,
                 "self_attn.v_proj": lambda i: w["wv"][i].reshape(D, KH).T,
                 "self_attn.o_proj": lambda i: w["wo"][i].reshape(NH, D).T,
                 "post_attention_layernorm": lambda i: w["mlp_norm"][i],
                 "mlp.gate_proj": lambda i: w["w_gate"][i].T, "mlp.up_proj": lambda i: w["w_up"][i].T,
                 "mlp.down_proj": lambda i: w["w_down"][i].T}
    state = {"embed_tokens.weight": np.asarray(stacked["embed"])}
    state.update({f"layers.{i}.{name}.weight": fn(i) for i in range(layer + 1) for name, fn in per_layer.items()})
    missing, unexpected = lm.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()},
                                             strict=False)
    assert not unexpected and all(k.endswith("rotary_emb.inv_freq") for k in missing), (missing, unexpected)
    lm.eval()

    def forward(tokens_BxT: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return lm(input_ids=torch.from_numpy(tokens_BxT.astype(np.int64))).last_hidden_state.numpy()

    return forward


def main(argv=None) -> int:
    bc = configlib.parse(BenchConfig(), argv)
    if bc is None:
        return 0
    cfg, stacked = gguf.load_smollm2()
    params = model.unstack_layers(stacked, cfg)  # the layout lime_jax.adapter (harvest, streaming, CE) uses
    runs = {}
    if "lime_jax" in bc.impls:
        runs["lime_jax", "harvest_forward"] = lambda t: model.residuals(params, t, cfg, bc.layer)[bc.layer]
    hf_forward = _transformers_forward(cfg, stacked, bc.layer) if "transformers" in bc.impls else None
    if hf_forward is not None:  # next to lime_jax's harvest in the turns, so that most rounds time them back to back
        runs["transformers", "harvest_forward"] = hf_forward
        tokens = np.random.default_rng(0).integers(0, cfg.vocab, (2, bc.ctx_len)).astype(np.int32)
        ref = np.asarray(model.residuals(params, tokens, cfg, bc.layer)[bc.layer])
        diff = np.abs(hf_forward(tokens) - ref)
        print(json.dumps({"check": "transformers_vs_lime_jax_residual", "layer": bc.layer,
                          "max_abs_diff": float(diff.max()), "max_abs_value": float(np.abs(ref).max()),
                          "median_abs_diff": float(np.median(diff))}), flush=True)
    if "lime_jax" in bc.impls:
        runs["lime_jax", "splice_forward"] = lambda t: model.splice(params, t, cfg, bc.layer, lambda h: h)
    for b in bc.batch_sizes:
        tokens = np.random.default_rng(b).integers(0, cfg.vocab, (b, bc.ctx_len)).astype(np.int32)
        matmuls, flops = _block_matmuls(cfg, b * bc.ctx_len)
        load = _load_avg_1m()
        times = _timed_calls({**{key: (lambda fn=fn: fn(tokens)) for key, fn in runs.items()}, "matmuls": matmuls},
                             bc.repeats)
        best = {key: min(ts) for key, ts in times.items()}
        pair = ("lime_jax", "harvest_forward"), ("transformers", "harvest_forward")
        # transformers' time over lime_jax's in each round: the speed ratio without the drift between rounds.
        paired = [t / ours for ours, t in zip(*(times[key] for key in pair))] if all(k in times for k in pair) else []
        for (impl, bench), s in ((key, s) for key, s in best.items() if key != "matmuls"):
            extra = {"dots": _dots(cfg)} if impl == "lime_jax" else {}
            if (impl, bench) == pair[0] and paired:
                extra.update(speed_vs_transformers=round(float(np.median(paired)), 3),
                             speed_vs_transformers_rounds=[round(r, 3) for r in paired])
            print(json.dumps({"impl": impl, "bench": bench, "layer": bc.layer, "batch": b, "seq": bc.ctx_len,
                              "seconds_per_call": round(s, 3), "tokens_per_s": round(b * bc.ctx_len / s, 1),
                              **extra, "malloc": hostmem.setting(), "load_avg_1m": load}), flush=True)
        per_token = forward_flops_per_token(cfg, bc.layer, bc.ctx_len)
        s = best["matmuls"]
        print(json.dumps({"impl": "xla_matmuls", "bench": "matmul_bound", "layer": bc.layer, "batch": b,
                          "seq": bc.ctx_len, "matmul_gflop_per_s": round(flops / s / 1e9, 1),
                          "forward_flops_per_token": per_token,
                          "matmul_bound_tokens_per_s": round(flops / s / per_token, 1), "dots": _dots(cfg),
                          "malloc": hostmem.setting(), "load_avg_1m": load}),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(configlib.run(main, prog="python -m benchmarks.harvest"))

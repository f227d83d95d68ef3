"""Load a Llama-family Hugging Face checkpoint (config.json + *.safetensors, sharded or not) into lime_jax params."""
from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from lime_jax.config import LlamaConfig


def _config(hf: dict, folder: Path) -> LlamaConfig:
    """LlamaConfig from HF's config.json; rejects features the model does not implement."""
    if hf.get("model_type", "llama") != "llama":
        raise ValueError(f"{folder}: model_type={hf.get('model_type')!r}, only 'llama' is supported")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise ValueError(f"{folder}: {flag}=True is not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{folder}: hidden_act={hf['hidden_act']!r}, only 'silu' (SwiGLU) is supported")
    # transformers >= 5 nests RoPE settings in rope_parameters; older configs use rope_theta + rope_scaling.
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"{folder}: RoPE scaling {rope!r} is not supported")
    d_model, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    return LlamaConfig(
        vocab=hf["vocab_size"], d_model=d_model, n_layers=hf["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads, head_dim=hf.get("head_dim") or d_model // n_heads,
        d_ff=hf["intermediate_size"], rope_theta=float(hf.get("rope_theta") or rope.get("rope_theta", 10_000.0)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_len=hf.get("max_position_embeddings", 2048))


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors files")
    return files


def load_hf(folder: str | os.PathLike, dtype=jnp.float32) -> tuple[LlamaConfig, dict]:
    """(cfg, params) from a HF Llama checkpoint folder; weights cast to `dtype`."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: config.json not found")
    cfg = _config(json.loads((folder / "config.json").read_text()), folder)
    tensors = {}
    for f in _safetensors_files(folder):
        with safe_open(f, framework="numpy") as sf:
            tensors.update({k: sf.get_tensor(k) for k in sf.keys()})
    N, K, H, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model

    def w(name):
        if name not in tensors:
            raise ValueError(f"{folder}: tensor {name!r} missing from the checkpoint")
        return np.asarray(tensors[name], np.float32)

    def stack(fn):
        return np.stack([fn(f"model.layers.{i}.") for i in range(cfg.n_layers)])

    # HF stores nn.Linear weights as (out, in); lime_jax keeps (in, out) with heads split out.
    layers = {
        "attn_norm": stack(lambda p: w(p + "input_layernorm.weight")),
        "wq": stack(lambda p: w(p + "self_attn.q_proj.weight").T.reshape(D, N, H)),
        "wk": stack(lambda p: w(p + "self_attn.k_proj.weight").T.reshape(D, K, H)),
        "wv": stack(lambda p: w(p + "self_attn.v_proj.weight").T.reshape(D, K, H)),
        "wo": stack(lambda p: w(p + "self_attn.o_proj.weight").T.reshape(N, H, D)),
        "mlp_norm": stack(lambda p: w(p + "post_attention_layernorm.weight")),
        "w_gate": stack(lambda p: w(p + "mlp.gate_proj.weight").T),
        "w_up": stack(lambda p: w(p + "mlp.up_proj.weight").T),
        "w_down": stack(lambda p: w(p + "mlp.down_proj.weight").T),
    }
    params = {"embed": w("model.embed_tokens.weight"), "final_norm": w("model.norm.weight"), "layers": layers}
    if not cfg.tie_embeddings:
        params["unembed"] = w("lm_head.weight").T
    if params["embed"].shape != (cfg.vocab, D):
        raise ValueError(f"{folder}: embed_tokens has shape {params['embed'].shape}, expected {(cfg.vocab, D)}")
    return cfg, jax.tree.map(lambda a: jnp.asarray(a, dtype), params)

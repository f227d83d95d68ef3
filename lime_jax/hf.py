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

    def w(name):
        if name not in tensors:
            raise ValueError(f"{folder}: tensor {name!r} missing from the checkpoint")
        return np.asarray(tensors[name], np.float32)

    return cfg, assemble(cfg, w, HF_NAMES, str(folder), dtype)


# Tensor names of each weight in a HF Llama checkpoint; "{i}" is the layer index.
HF_NAMES = {
    "embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight", "unembed": "lm_head.weight",
    "attn_norm": "model.layers.{i}.input_layernorm.weight", "wq": "model.layers.{i}.self_attn.q_proj.weight",
    "wk": "model.layers.{i}.self_attn.k_proj.weight", "wv": "model.layers.{i}.self_attn.v_proj.weight",
    "wo": "model.layers.{i}.self_attn.o_proj.weight", "mlp_norm": "model.layers.{i}.post_attention_layernorm.weight",
    "w_gate": "model.layers.{i}.mlp.gate_proj.weight", "w_up": "model.layers.{i}.mlp.up_proj.weight",
    "w_down": "model.layers.{i}.mlp.down_proj.weight",
}


def assemble(cfg: LlamaConfig, w, names: dict[str, str], where: str, dtype) -> dict:
    """lime_jax params from `w(name)` -> float32 weights in HF (out, in) layout, named by `names`."""
    N, K, H, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model

    def stack(role, fn=lambda a: a):
        return np.stack([fn(w(names[role].format(i=i))) for i in range(cfg.n_layers)])

    # HF stores nn.Linear weights as (out, in); lime_jax keeps (in, out) with heads split out.
    layers = {
        "attn_norm": stack("attn_norm"),
        "wq": stack("wq", lambda a: a.T.reshape(D, N, H)),
        "wk": stack("wk", lambda a: a.T.reshape(D, K, H)),
        "wv": stack("wv", lambda a: a.T.reshape(D, K, H)),
        "wo": stack("wo", lambda a: a.T.reshape(N, H, D)),
        "mlp_norm": stack("mlp_norm"),
        "w_gate": stack("w_gate", np.transpose),
        "w_up": stack("w_up", np.transpose),
        "w_down": stack("w_down", np.transpose),
    }
    params = {"embed": w(names["embed"]), "final_norm": w(names["final_norm"]), "layers": layers}
    if not cfg.tie_embeddings:
        params["unembed"] = w(names["unembed"]).T
    if params["embed"].shape != (cfg.vocab, D):
        raise ValueError(f"{where}: {names['embed']} has shape {params['embed'].shape}, expected {(cfg.vocab, D)}")
    return jax.tree.map(lambda a: jnp.asarray(a, dtype), params)

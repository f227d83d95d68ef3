"""lime_jax.hf on tiny Llama checkpoints written here, against a numpy forward in HF's (out, in) layout."""
import json
import math

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from lime_jax import hf, model

V, D, L, N, K, H, F = 50, 24, 2, 6, 2, 4, 40


def _weights(rng, tied):
    w = {"model.embed_tokens.weight": rng.normal(size=(V, D)), "model.norm.weight": 1 + 0.1 * rng.normal(size=D)}
    if not tied:
        w["lm_head.weight"] = rng.normal(size=(V, D)) / math.sqrt(D)
    shapes = {"self_attn.q_proj": (N * H, D), "self_attn.k_proj": (K * H, D), "self_attn.v_proj": (K * H, D),
              "self_attn.o_proj": (D, N * H), "mlp.gate_proj": (F, D), "mlp.up_proj": (F, D),
              "mlp.down_proj": (D, F), "input_layernorm": (D,), "post_attention_layernorm": (D,)}
    for i in range(L):
        for name, shape in shapes.items():
            w[f"model.layers.{i}.{name}.weight"] = rng.normal(size=shape) / math.sqrt(shape[-1]) + (len(shape) == 1)
    return {k: v.astype(np.float32) for k, v in w.items()}


def _config(tied, **extra):
    return {"model_type": "llama", "vocab_size": V, "hidden_size": D, "num_hidden_layers": L,
            "num_attention_heads": N, "num_key_value_heads": K, "intermediate_size": F, "rope_theta": 1000.0,
            "rms_norm_eps": 1e-6, "tie_word_embeddings": tied, "max_position_embeddings": 64,
            "hidden_act": "silu", **extra}


def _hf_forward(w, tokens, tied):
    """HF LlamaForCausalLM math in numpy: y = x @ W.T, rotate-half RoPE, repeat_kv for GQA."""
    def norm(x, g):
        return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-6) * g

    T = len(tokens)
    inv = 1.0 / 1000.0 ** (np.arange(0, H, 2) / H)
    emb = np.concatenate([np.outer(np.arange(T), inv)] * 2, -1)
    cos, sin = np.cos(emb), np.sin(emb)

    def rope(x):  # [heads, T, H]
        return x * cos + np.concatenate([-x[..., H // 2:], x[..., :H // 2]], -1) * sin

    h = w["model.embed_tokens.weight"][tokens].astype(np.float64)
    for i in range(L):
        p = lambda n: w[f"model.layers.{i}.{n}.weight"]  # noqa: E731
        x = norm(h, p("input_layernorm"))
        q = rope((x @ p("self_attn.q_proj").T).reshape(T, N, H).transpose(1, 0, 2))
        k = np.repeat(rope((x @ p("self_attn.k_proj").T).reshape(T, K, H).transpose(1, 0, 2)), N // K, axis=0)
        v = np.repeat((x @ p("self_attn.v_proj").T).reshape(T, K, H).transpose(1, 0, 2), N // K, axis=0)
        s = q @ k.transpose(0, 2, 1) / math.sqrt(H) + np.triu(np.full((T, T), -np.inf), 1)
        a = np.exp(s - s.max(-1, keepdims=True))
        o = ((a / a.sum(-1, keepdims=True)) @ v).transpose(1, 0, 2).reshape(T, N * H)
        h = h + o @ p("self_attn.o_proj").T
        x = norm(h, p("post_attention_layernorm"))
        g = x @ p("mlp.gate_proj").T
        h = h + (g / (1 + np.exp(-g)) * (x @ p("mlp.up_proj").T)) @ p("mlp.down_proj").T
    head = w["model.embed_tokens.weight"] if tied else w["lm_head.weight"]
    return norm(h, w["model.norm.weight"]) @ head.T


def test_sharded_untied_checkpoint_matches_numpy(tmp_path):
    w = _weights(np.random.default_rng(0), tied=False)
    names = sorted(w)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for fname, keys in shards.items():
        safetensors.numpy.save_file({k: w[k] for k in keys}, tmp_path / fname)
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    # transformers >= 5 writes RoPE settings nested in rope_parameters.
    hf_config = {k: v for k, v in _config(tied=False).items() if k != "rope_theta"}
    hf_config["rope_parameters"] = {"rope_type": "default", "rope_theta": 1000.0}
    (tmp_path / "config.json").write_text(json.dumps(hf_config))
    cfg, params = hf.load_hf(tmp_path)
    assert not cfg.tie_embeddings and cfg.head_dim == H and cfg.n_kv_heads == K
    tokens = np.random.default_rng(1).integers(0, V, (1, 13)).astype(np.int32)
    np.testing.assert_allclose(model.apply(params, tokens, cfg)[0], _hf_forward(w, tokens[0], False), rtol=1e-4, atol=1e-4)


def test_single_file_tied_bfloat16_checkpoint_matches_numpy(tmp_path):
    w = _weights(np.random.default_rng(2), tied=True)
    bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in w.items()}
    safetensors.numpy.save_file(bf16, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(_config(tied=True)))
    cfg, params = hf.load_hf(tmp_path)
    assert cfg.tie_embeddings and "unembed" not in params
    tokens = np.arange(9, dtype=np.int32)[None] * 5
    ref = _hf_forward({k: v.astype(np.float32) for k, v in bf16.items()}, tokens[0], True)
    np.testing.assert_allclose(model.apply(params, tokens, cfg)[0], ref, rtol=1e-4, atol=1e-4)


def test_bad_checkpoints_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf.load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(_config(True, rope_scaling={"rope_type": "llama3", "factor": 8})))
    with pytest.raises(ValueError, match="RoPE scaling"):
        hf.load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(_config(True)))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        hf.load_hf(tmp_path)
    w = _weights(np.random.default_rng(3), tied=True)
    del w["model.layers.1.mlp.up_proj.weight"]
    safetensors.numpy.save_file(w, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        hf.load_hf(tmp_path)

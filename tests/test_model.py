"""lime_jax.model and lime_jax.config on small random models: references, LIMe routing, causality, bad input."""
import dataclasses
import math
import os
import pathlib
import platform

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest

from lime_jax import config, model

SMALL = config.tiny(vocab=97, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=48, max_len=16)


def _tokens(cfg, B=2, T=11, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab, (B, T)), jnp.int32)


def _np_forward(params, tokens, cfg):
    """Independent numpy Llama: per-head loops, explicit causal softmax, rotate-half RoPE."""
    p = jax.tree.map(np.asarray, params)
    G = cfg.n_heads // cfg.n_kv_heads
    H = cfg.head_dim

    def rmsnorm(x, g):
        return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + cfg.norm_eps) * g

    def rope(x):  # x [T, H]
        T = x.shape[0]
        freqs = 1.0 / cfg.rope_theta ** (np.arange(H // 2) * 2.0 / H)
        ang = np.arange(T)[:, None] * freqs[None]
        rotated = np.concatenate([-x[:, H // 2:], x[:, : H // 2]], -1)
        return x * np.tile(np.cos(ang), 2) + rotated * np.tile(np.sin(ang), 2)

    out = []
    for seq in np.asarray(tokens):
        h = p["embed"][seq].astype(np.float64)
        T = len(seq)
        for i in range(cfg.n_layers):
            lp = {k: v[i].astype(np.float64) for k, v in p["layers"].items()}
            x = rmsnorm(h, lp["attn_norm"])
            attn = np.zeros((T, cfg.n_heads * H))
            for n in range(cfg.n_heads):
                q = rope(x @ lp["wq"][:, n])
                k = rope(x @ lp["wk"][:, n // G])
                v = x @ lp["wv"][:, n // G]
                s = q @ k.T / math.sqrt(H)
                s[np.triu_indices(T, 1)] = -np.inf
                a = np.exp(s - s.max(-1, keepdims=True))
                attn[:, n * H:(n + 1) * H] = (a / a.sum(-1, keepdims=True)) @ v
            h = h + attn @ lp["wo"].reshape(-1, cfg.d_model)
            x = rmsnorm(h, lp["mlp_norm"])
            g = x @ lp["w_gate"]
            h = h + (g / (1 + np.exp(-g)) * (x @ lp["w_up"])) @ lp["w_down"]
        x = rmsnorm(h, p["final_norm"])
        out.append(x @ (p["embed"].T if cfg.tie_embeddings else p["unembed"]))
    return np.stack(out)


@pytest.mark.parametrize("tie", [True, False])
def test_apply_matches_numpy_reference(tie):
    cfg = dataclasses.replace(SMALL, tie_embeddings=tie)
    params = model.init(jax.random.key(0), cfg)
    tokens = _tokens(cfg)
    np.testing.assert_allclose(model.apply(params, tokens, cfg), _np_forward(params, tokens, cfg), rtol=1e-4, atol=1e-4)


def test_plain_forward_takes_onednn_dots_on_x86_cpu_and_both_paths_match_numpy(monkeypatch):
    """Plain Llama's inference forward compiles with oneDNN dots on x86 CPUs with AVX-512 by default, on any x86
    CPU with LIME_JAX_CPU_DOTS=onednn, never with =xla; routed models never do. Either way the logits are the numpy
    forward's."""
    x86 = platform.machine().lower() in ("x86_64", "amd64") and jax.default_backend() == "cpu"
    avx512 = x86 and os.path.exists("/proc/cpuinfo") and "avx512f" in pathlib.Path("/proc/cpuinfo").read_text().split()
    params, tokens = model.init(jax.random.key(3), SMALL), _tokens(SMALL)
    expected = _np_forward(params, tokens, SMALL)
    for setting in ("auto", "onednn", "xla"):
        if setting == "auto":
            monkeypatch.delenv("LIME_JAX_CPU_DOTS", raising=False)
        else:
            monkeypatch.setenv("LIME_JAX_CPU_DOTS", setting)
        assert model._uses_onednn(SMALL) == ((x86 and setting == "onednn") or (avx512 and setting == "auto"))
        assert not model._uses_onednn(model.to_lime(params, SMALL, "static")[1])
        np.testing.assert_allclose(model.apply(params, tokens, SMALL), expected, rtol=1e-4, atol=1e-4)
        # Inside a user's jit with concrete (closed-over) params and tokens: JAX refuses nested compiler options,
        # so the call must fall back to the plain jit rather than fail.
        doubled = jax.jit(lambda s: model.apply(params, tokens, SMALL) * s)(2.0)
        np.testing.assert_allclose(doubled, 2 * expected, rtol=1e-4, atol=2e-4)


@pytest.mark.parametrize("routing", ["none", "static", "v2"])
def test_cpu_matmul_forward_matches_numpy_and_trains(routing, monkeypatch):
    """cpu_matmul=True (the projections by jaxsae's kernel, here from the first row on, and plain Llama's attention):
    the logits of plain Llama and of identity-routed LIMe are the numpy Llama's, and its gradient equals the
    XLA-dot model's."""
    calls, attention_calls = [], []
    monkeypatch.setattr(model, "_KERNEL_MIN_ROWS", 1)
    kernel, attention = model.cpu_kernels.matmul, model.cpu_kernels.attention
    monkeypatch.setattr(model.cpu_kernels, "matmul", lambda x, w: calls.append(1) or kernel(x, w))
    monkeypatch.setattr(model.cpu_kernels, "attention", lambda *a: attention_calls.append(1) or attention(*a))
    params = model.init(jax.random.key(5), SMALL)
    cfg, tokens = SMALL, _tokens(SMALL, B=3, T=13)
    routed, cfg = (params, cfg) if routing == "none" else model.to_lime(params, SMALL, routing)
    kernel_cfg = dataclasses.replace(cfg, cpu_matmul=True)
    expected = _np_forward(params, tokens, SMALL)
    for p in (routed, model.unstack_layers(routed, cfg)):
        np.testing.assert_allclose(model.apply(p, tokens, kernel_cfg), expected, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(model.splice(p, tokens, kernel_cfg, 1, lambda h: h), expected, rtol=1e-4,
                                   atol=1e-4)
    grads = [jax.grad(lambda p, c=c: model.token_nll(model.apply(p, tokens, c), tokens).mean())(routed)
             for c in (cfg, kernel_cfg)]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), *grads)
    assert calls or jax.default_backend() != "cpu"  # the kernel was traced in
    assert bool(attention_calls) == (routing == "none" and jax.default_backend() == "cpu")


def test_inference_entry_points_pick_the_cpu_matmul_kernel(monkeypatch):
    """`_inference_cfg`: the kernel by default on x86 without AVX-512 and one local device (so not under this
    suite's 8), anywhere on CPU with LIME_JAX_CPU_DOTS=jaxsae, never with =xla or =onednn; a bad value is one line."""
    x86 = platform.machine().lower() in ("x86_64", "amd64") and jax.default_backend() == "cpu"
    avx512 = x86 and "avx512f" in pathlib.Path("/proc/cpuinfo").read_text().split()
    expected = {"auto": x86 and not avx512 and jax.local_device_count() == 1, "jaxsae": jax.default_backend() == "cpu",
                "xla": False, "onednn": False}
    for setting, want in expected.items():
        monkeypatch.setenv("LIME_JAX_CPU_DOTS", setting)
        assert model._inference_cfg(SMALL).cpu_matmul == want, setting
    monkeypatch.setenv("LIME_JAX_CPU_DOTS", "fast")
    with pytest.raises(ValueError, match="LIME_JAX_CPU_DOTS must be .*got 'fast'"):
        model.residuals(model.init(jax.random.key(0), SMALL), _tokens(SMALL), SMALL, 0)


@pytest.mark.parametrize("routing", ["none", "dynamic"])
def test_unstacked_layers_match_numpy_reference(routing):
    """The inference layout (per-block weight dicts): logits vs the numpy Llama (identity routing for LIMe),
    residuals and a splice vs the numpy forward's own blocks."""
    params = model.init(jax.random.key(17), SMALL)
    cfg = SMALL
    if routing != "none":
        params, cfg = model.to_lime(params, SMALL, routing)
    unstacked, tokens = model.unstack_layers(params, cfg), _tokens(cfg)
    assert isinstance(unstacked["layers"], tuple) and len(unstacked["layers"]) == cfg.n_layers
    expected = _np_forward(params if routing == "none" else model.init(jax.random.key(17), SMALL), tokens, SMALL)
    np.testing.assert_allclose(model.apply(unstacked, tokens, cfg), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(model.splice(unstacked, tokens, cfg, 1, lambda h: h), expected, rtol=1e-4, atol=1e-4)
    one_block = dataclasses.replace(SMALL, n_layers=1)
    first = {**params, "layers": {k: v[:1] for k, v in params["layers"].items() if k != "router"}}
    h0 = model.residuals(unstacked, tokens, cfg, 0)[0]
    # The residual after block 0 is the 1-block model's pre-norm state: its logits through the numpy head.
    x = np.asarray(h0) / np.sqrt((np.asarray(h0) ** 2).mean(-1, keepdims=True) + cfg.norm_eps)
    np.testing.assert_allclose(x * np.asarray(params["final_norm"]) @ np.asarray(params["embed"]).T,
                               _np_forward(first, tokens, one_block), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="already unstacked"):
        model.unstack_layers(unstacked, cfg)


def test_token_nll_matches_log_softmax_formula():
    rng = np.random.default_rng(1)
    logits, tokens = rng.normal(size=(2, 5, 7)), rng.integers(0, 7, (2, 5))
    ref = np.array([[np.log(np.exp(logits[b, t]).sum()) - logits[b, t, tokens[b, t + 1]] for t in range(4)]
                    for b in range(2)])
    np.testing.assert_allclose(model.token_nll(jnp.asarray(logits), jnp.asarray(tokens)), ref, rtol=1e-5)


def test_residuals_and_splice_are_consistent_with_apply():
    cfg = SMALL
    params, tokens = model.init(jax.random.key(1), cfg), _tokens(cfg)
    logits = model.apply(params, tokens, cfg)
    hs = model.residuals(params, tokens, cfg, [2, 0])
    assert sorted(hs) == [0, 2] and hs[0].shape == (2, 11, cfg.d_model)
    # The last residual through the final norm and tied unembedding gives the logits.
    np.testing.assert_allclose(model._logits(params, hs[2], cfg), logits, rtol=1e-5, atol=1e-5)
    for layer in range(cfg.n_layers):
        np.testing.assert_allclose(model.splice(params, tokens, cfg, layer, lambda h: h), logits, rtol=1e-5, atol=1e-5)
    # Zeroing the residual after the last block gives logits of the final norm's zero vector: all zero.
    assert np.abs(model.splice(params, tokens, cfg, cfg.n_layers - 1, jnp.zeros_like)).max() == 0.0
    # Splicing changes only what comes after: a perturbed layer-0 residual differs from the clean logits.
    moved = model.splice(params, tokens, cfg, 0, lambda h: h * 2.0)
    assert not np.allclose(moved, logits, atol=1e-3)


def _identity_router(cfg):
    """Routers of layers 1..L-1 (layer 0 has none) that read only the current layer."""
    L, K = cfg.n_layers, cfg.n_kv_heads
    current_RxJ = np.eye(L)[1:]  # row l - 1: layer l
    if cfg.routing == "static":  # logits: 0 on the current layer, -inf elsewhere -> one-hot softmax
        return jnp.where(current_RxJ[:, None, :] > 0, 0.0, -jnp.inf) * jnp.ones((L - 1, K, L))
    return jnp.einsum("lj,kr->lkjr", current_RxJ, jnp.eye(K))  # v2: identity on the current layer's heads


@pytest.mark.parametrize("routing", ["static", "v2"])
def test_identity_routing_equals_plain_llama(routing):
    cfg = dataclasses.replace(SMALL, routing=routing)
    plain = dataclasses.replace(SMALL, routing="none")
    params = model.init(jax.random.key(2), cfg)
    params["layers"]["router"] = _identity_router(cfg)
    tokens = _tokens(cfg)
    routed = model.apply(params, tokens, cfg)
    base_params = {**params, "layers": {k: v for k, v in params["layers"].items() if k != "router"}}
    # Same math, only the K/V einsums are batched differently: equal to float32 rounding.
    np.testing.assert_allclose(routed, model.apply(base_params, tokens, plain), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("routing", ["none", "static"])
def test_values_are_each_layers_v_projection(routing):
    """Layer 0 reads only the embeddings under any routing: V = rmsnorm(embed) @ wv, computed here in numpy."""
    cfg = dataclasses.replace(SMALL, routing=routing)
    params, tokens = model.init(jax.random.key(12), cfg), _tokens(cfg)
    v = model.values(params, tokens, cfg)
    assert v.shape == (cfg.n_layers, 2, 11, cfg.n_kv_heads, cfg.head_dim)
    e = np.asarray(params["embed"])[np.asarray(tokens)]
    x = e / np.sqrt((e ** 2).mean(-1, keepdims=True) + cfg.norm_eps) * np.asarray(params["layers"]["attn_norm"][0])
    np.testing.assert_allclose(v[0], np.einsum("btd,dkh->btkh", x, params["layers"]["wv"][0]), rtol=1e-4, atol=1e-5)


def test_dynamic_with_zero_router_equals_uniform_static():
    """Both give uniform weights over the layers <= l: checks the dynamic path's masking independently."""
    dyn, stat = dataclasses.replace(SMALL, routing="dynamic"), dataclasses.replace(SMALL, routing="static")
    params = model.init(jax.random.key(3), dyn)
    tokens = _tokens(dyn)
    zero = jax.tree.map(jnp.zeros_like, params["layers"]["router"])
    p_dyn = {**params, "layers": {**params["layers"], "router": zero}}
    p_stat = {**params, "layers": {**params["layers"], "router": jnp.zeros((2, 2, 3))}}  # [L-1, K, L]
    np.testing.assert_allclose(model.apply(p_dyn, tokens, dyn), model.apply(p_stat, tokens, stat), rtol=1e-5, atol=1e-5)


def test_static_routing_matches_numpy_reference():
    """Layer-1 K/V read softmax(router) over rms-normalised states entering layers 0 and 1 (numpy, by hand)."""
    cfg = dataclasses.replace(SMALL, routing="static")
    params = model.init(jax.random.key(4), cfg)
    tokens = _tokens(cfg, B=1, T=6)
    p = jax.tree.map(np.asarray, params)
    got = model.residuals(params, tokens, cfg, [0, 1])
    h0 = np.asarray(got[0])[0]  # after block 0, which has a single source (plain Llama, tested above)
    e = p["embed"][np.asarray(tokens)[0]]  # entering block 0
    rms = lambda x: x / np.sqrt((x ** 2).mean(-1, keepdims=True) + cfg.norm_eps)  # noqa: E731
    logits = p["layers"]["router"][0][:, :2]  # layer 1 (router row 0) reads sources 0 and 1
    w = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)  # [K, 2]
    lp = {k: v[1] for k, v in p["layers"].items() if k != "router"}
    x = rms(h0) * lp["attn_norm"]
    G, H, T = 2, cfg.head_dim, 6
    attn = np.zeros((T, cfg.n_heads * H))
    for n in range(cfg.n_heads):
        kv_in = (w[n // G, 0] * rms(e) + w[n // G, 1] * rms(h0)) * lp["attn_norm"]
        freqs = 1.0 / cfg.rope_theta ** (np.arange(H // 2) * 2.0 / H)
        ang = np.arange(T)[:, None] * freqs
        rope = lambda y: y * np.tile(np.cos(ang), 2) + np.concatenate([-y[:, H // 2:], y[:, :H // 2]], -1) * np.tile(np.sin(ang), 2)  # noqa: E731,E501
        s = rope(x @ lp["wq"][:, n]) @ rope(kv_in @ lp["wk"][:, n // G]).T / math.sqrt(H)
        s[np.triu_indices(T, 1)] = -np.inf
        a = np.exp(s - s.max(-1, keepdims=True))
        attn[:, n * H:(n + 1) * H] = (a / a.sum(-1, keepdims=True)) @ (kv_in @ lp["wv"][:, n // G])
    h = h0 + attn @ lp["wo"].reshape(-1, cfg.d_model)
    g = (rms(h) * lp["mlp_norm"]) @ lp["w_gate"]
    h = h + (g / (1 + np.exp(-g)) * ((rms(h) * lp["mlp_norm"]) @ lp["w_up"])) @ lp["w_down"]
    np.testing.assert_allclose(got[1][0], h, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("routing", ["none", "static", "dynamic", "v2"])
def test_causality_by_gradient(routing):
    """d logits[t] / d (embedding of the token at s > t) is exactly zero; nonzero for s <= t."""
    cfg = dataclasses.replace(SMALL, routing=routing, tie_embeddings=False)
    params = model.init(jax.random.key(5), cfg)
    T, t = 9, 4
    tokens = jnp.arange(T, dtype=jnp.int32)[None] + 10  # distinct tokens: embedding row = position
    grad = jax.grad(lambda e: model.apply({**params, "embed": e}, tokens, cfg)[0, t].sum())(params["embed"])
    per_position = np.abs(np.asarray(grad)[10:10 + T]).sum(-1)
    assert np.all(per_position[t + 1:] == 0.0), per_position
    assert np.all(per_position[: t + 1] > 0.0), per_position


@pytest.mark.parametrize("routing", ["none", "static", "dynamic", "v2"])
def test_num_params_counts_every_entry_the_loss_depends_on(routing):
    """Two independent counts: init's leaf sizes less the masked router entries, and the entries whose gradient
    is non-zero (every id appears before the last position, so even untied embedding rows get one)."""
    cfg = dataclasses.replace(SMALL, routing=routing, tie_embeddings=routing != "v2", max_len=14)
    params = model.init(jax.random.key(6), cfg)
    L, D, K = cfg.n_layers, cfg.d_model, cfg.n_kv_heads
    masked_sources = sum(L - 1 - layer for layer in range(1, L))  # layer l >= 1 never reads sources j > l
    per_source = {"none": 0, "static": K, "dynamic": D * K + K, "v2": K * K}[routing]
    assert cfg.num_params == sum(x.size for x in jax.tree.leaves(params)) - masked_sources * per_source
    ids = np.arange(8 * 13).reshape(8, 13) % cfg.vocab
    tokens = jnp.asarray(np.concatenate([ids, np.zeros((8, 1), int)], 1), jnp.int32)
    grads = jax.grad(lambda p: model.token_nll(model.apply(p, tokens, cfg), tokens).mean())(params)
    assert cfg.num_params == sum(int(np.count_nonzero(g)) for g in jax.tree.leaves(grads))


def test_layer_zero_has_no_router():
    """As in the official code: routers for layers 1..L-1 only, so LIMe adds (L(L+1)/2 - 1) source blocks."""
    for routing, shape in [("static", (2, 2, 3)), ("v2", (2, 2, 3, 2))]:
        cfg = dataclasses.replace(SMALL, routing=routing)
        assert model.init(jax.random.key(0), cfg)["layers"]["router"].shape == shape
        assert cfg.num_params - SMALL.num_params == 5 * {"static": 2, "v2": 4}[routing]  # (2 + 3) sources
    dyn = model.init(jax.random.key(0), dataclasses.replace(SMALL, routing="dynamic"))["layers"]["router"]
    assert dyn["w"].shape == (2, 32, 2, 3) and dyn["b"].shape == (2, 2, 3) and not np.any(dyn["b"])


def test_flops_per_token_by_hand():
    cfg = config.LlamaConfig(vocab=11, d_model=6, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=2, d_ff=5, max_len=7)
    # Multiply-adds per token in each layer: q 6*4*2 = 48, k 6*2*2 = 24, v 24, o 48, gate/up/down 3*6*5 = 90,
    # 234 in all; 3 layers and the unembedding 6*11 = 66 make 768 MACs = 1536 FLOPs.
    # Attention over all T = 7 positions, QK^T and AV: 2 * 4 heads * 7 * 2 = 112 MACs a layer -> 672 FLOPs.
    # Routing: layer 0 none; layers 1 and 2 mix 2 and 3 sources, 5 in all.
    #   static: K*D = 12 MACs a source -> 60 MACs = 120 FLOPs; dynamic: the logits D*K = 12 more -> 240 FLOPs;
    #   v2: K*K*2H = 16 MACs a source -> 80 MACs = 160 FLOPs.
    forward = {"none": 1536 + 672, "static": 2208 + 120, "dynamic": 2208 + 240, "v2": 2208 + 160}
    for routing, flops in forward.items():
        assert dataclasses.replace(cfg, routing=routing).flops_per_token == 3 * flops  # backward = 2 x forward


def test_paper_1b_matches_the_papers_parameter_count():
    assert round(config.paper_1b().num_params / 1e9, 4) == 1.1767  # LIMe v1 Table 6, LLaMA row


def test_smollm2_param_count_is_the_published_one():
    assert config.smollm2_135m().num_params == 134_515_008  # HF model card's safetensors total


def test_flops_per_token_matches_xla_cost_analysis():
    """One block (XLA counts a scan body once): formula forward FLOPs vs XLA's count, within elementwise ops."""
    cfg = dataclasses.replace(SMALL, n_layers=1, d_model=128, d_ff=512, head_dim=32, max_len=64, vocab=512)
    params = model.init(jax.random.key(7), cfg)
    tokens = jnp.zeros((1, cfg.max_len), jnp.int32)
    cost = jax.jit(lambda p, x: model._apply(p, x, cfg)).lower(params, tokens).compile().cost_analysis()
    xla_flops = (cost[0] if isinstance(cost, list) else cost)["flops"]
    assert cfg.flops_per_token * cfg.max_len / 3 == pytest.approx(xla_flops, rel=0.05)


def test_router_init_follows_the_papers():
    cfg = dataclasses.replace(SMALL, routing="v2")
    r = np.asarray(model.init(jax.random.key(8), cfg)["layers"]["router"])  # [L-1, K, L, K], row l-1: layer l
    for layer in range(1, cfg.n_layers):
        np.testing.assert_array_equal(r[layer - 1, :, layer], np.eye(cfg.n_kv_heads))  # current layer: identity
        assert np.all(r[layer - 1, :, layer + 1:] == 0)  # future layers: masked
        bound = math.sqrt(3 / ((layer + 1) * cfg.n_kv_heads))
        assert np.all(np.abs(r[layer - 1, :, :layer]) <= bound) and np.all(r[layer - 1, :, :layer] != 0)


def test_remat_and_bfloat16_run_and_agree():
    params, tokens = model.init(jax.random.key(9), SMALL), _tokens(SMALL)
    ref = model.apply(params, tokens, SMALL)
    g = jax.grad(lambda p, c: model.token_nll(model.apply(p, tokens, c), tokens).mean())
    remat = dataclasses.replace(SMALL, remat=True, routing="none")
    np.testing.assert_allclose(g(params, remat)["layers"]["wq"], g(params, SMALL)["layers"]["wq"], rtol=1e-5, atol=1e-7)
    bf16 = model.apply(params, tokens, dataclasses.replace(SMALL, dtype="bfloat16"))
    assert bf16.dtype == jnp.float32 and np.abs(bf16 - ref).max() < 0.1 * np.abs(ref).max()


@pytest.mark.parametrize("routing", ["none", "v2"])
def test_runs_under_jit_with_named_sharding(routing):
    cfg = dataclasses.replace(SMALL, routing=routing)
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    params = model.init(jax.random.key(10), cfg)
    tokens = _tokens(cfg, B=jax.device_count())
    sharded = jax.device_put(tokens, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    np.testing.assert_allclose(jax.jit(model.apply, static_argnums=2)(params, sharded, cfg),
                               model.apply(params, tokens, cfg), rtol=1e-5, atol=1e-5)


def test_bad_input_raises_clear_errors():
    params = model.init(jax.random.key(11), SMALL)
    with pytest.raises(TypeError, match="integer"):
        model.apply(params, jnp.zeros((1, 4), jnp.float32), SMALL)
    with pytest.raises(ValueError, match="shape"):
        model.apply(params, jnp.zeros((4,), jnp.int32), SMALL)
    with pytest.raises(ValueError, match="positions"):
        model.apply(params, jnp.zeros((1, 0), jnp.int32), SMALL)
    with pytest.raises(ValueError, match="max_len"):
        model.apply(params, jnp.zeros((1, SMALL.max_len + 1), jnp.int32), SMALL)
    with pytest.raises(ValueError, match="97"):
        model.apply(params, jnp.full((1, 3), 97, jnp.int32), SMALL)
    with pytest.raises(ValueError, match=r"layer must be an int in \[0, 3\), got 3"):
        model.residuals(params, _tokens(SMALL), SMALL, [1, 3])
    with pytest.raises(ValueError, match="got -1"):
        model.splice(params, _tokens(SMALL), SMALL, -1, lambda h: h)
    with pytest.raises(ValueError, match="keep the shape"):
        model.splice(params, _tokens(SMALL), SMALL, 0, lambda h: h[:, :1])
    with pytest.raises(ValueError, match=r"do not match tokens \(2, 5\)"):
        model.token_nll(jnp.zeros((2, 4, 7)), jnp.zeros((2, 5), jnp.int32))
    with pytest.raises(ValueError, match="n_kv_heads"):
        config.LlamaConfig(n_heads=9, n_kv_heads=2)
    with pytest.raises(ValueError, match="routing"):
        config.LlamaConfig(routing="dense")


def _official_v2_layout(params, cfg):
    """Our v2 weights in corl-team/lime's layout: torch Linear [out, in], kv_proj rows "(kv h)", per-layer routers."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    D, N, K, H = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    layers = []
    for layer in range(cfg.n_layers):
        lp = {k: v[layer] for k, v in p["layers"].items() if k != "router"}
        kv_DxKx2H = np.concatenate([lp["wk"], lp["wv"]], -1)  # head h reads features (keys, then values)
        # StaticRouter.static_weights [K, (l+1) K]: column j*K + r is source layer j's head r; layer 0 has none.
        static = None if layer == 0 else p["layers"]["router"][layer - 1][:, : layer + 1].reshape(K, -1)
        layers.append({"input_layernorm": lp["attn_norm"], "q_proj": lp["wq"].reshape(D, N * H).T,
                       "kv_proj_weight": kv_DxKx2H.transpose(2, 1, 0).reshape(2 * H * K, D),  # row kv * K + h
                       "static_weights": static, "o_proj": lp["wo"].reshape(N * H, D).T,
                       "post_attention_layernorm": lp["mlp_norm"], "gate_proj": lp["w_gate"].T,
                       "up_proj": lp["w_up"].T, "down_proj": lp["w_down"].T})
    return layers, p["embed"], p["final_norm"]


def _np_official_v2(layers, embed, final_norm, tokens, cfg):
    """corl-team/lime src/lm/lime.py (LIMeForCausalLM, tied embeddings) re-written in numpy float64, batch 1."""
    N, K, H = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim

    def rmsnorm(x, g):
        return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + cfg.norm_eps) * g

    def rotate_half(x):
        return np.concatenate([-x[..., H // 2:], x[..., : H // 2]], -1)

    out = []
    for seq in np.asarray(tokens):
        T = len(seq)
        freqs = np.arange(T)[:, None] * (1.0 / cfg.rope_theta ** (np.arange(0, H, 2) / H))[None]
        cos, sin = np.cos(np.concatenate([freqs, freqs], -1)), np.sin(np.concatenate([freqs, freqs], -1))
        h = embed[seq]
        kv_buffer = np.zeros((0, T * 2 * H))  # rows (layer, kv head), columns (t, kv): "h (bt kv)"
        for layer, w in enumerate(layers):
            x = rmsnorm(h, w["input_layernorm"])
            q = (x @ w["q_proj"].T).reshape(T, N, H).transpose(1, 0, 2)  # [N, T, H]
            cur = x @ w["kv_proj_weight"].T  # [T, 2H*K], features "(kv h)"
            kv_buffer = np.concatenate([kv_buffer, cur.reshape(T, 2 * H, K).transpose(2, 0, 1).reshape(K, -1)])
            routed = kv_buffer[:K] if layer == 0 else w["static_weights"] @ kv_buffer  # FirstLayerRouter / Static
            kv = routed.reshape(K, T, 2 * H)
            k, v = kv[..., :H], kv[..., H:]
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
            k, v = np.repeat(k, N // K, axis=0), np.repeat(v, N // K, axis=0)  # repeat_kv
            s = q @ k.transpose(0, 2, 1) / math.sqrt(H) + np.triu(np.full((T, T), -np.inf), 1)
            a = np.exp(s - s.max(-1, keepdims=True))
            attn = ((a / a.sum(-1, keepdims=True)) @ v).transpose(1, 0, 2).reshape(T, N * H)
            h = h + attn @ w["o_proj"].T
            x = rmsnorm(h, w["post_attention_layernorm"])
            g = x @ w["gate_proj"].T
            h = h + (g / (1 + np.exp(-g)) * (x @ w["up_proj"].T)) @ w["down_proj"].T
        out.append(rmsnorm(h, final_norm) @ embed.T)
    return np.stack(out)


def test_v2_matches_the_official_forward():
    """Random (non-identity) routers, every block of them perturbed: our v2 == the official code's forward."""
    cfg = dataclasses.replace(SMALL, routing="v2", n_layers=4)
    params = model.init(jax.random.key(13), cfg)
    r = params["layers"]["router"]
    params["layers"]["router"] = r + 0.3 * jax.random.normal(jax.random.key(14), r.shape)
    tokens = _tokens(cfg)
    expected = _np_official_v2(*_official_v2_layout(params, cfg), tokens, cfg)
    np.testing.assert_allclose(model.apply(params, tokens, cfg), expected, rtol=1e-4, atol=1e-4)


def _loss(params, tokens, cfg):
    return model.token_nll(model.apply(params, tokens, cfg), tokens).mean()


@pytest.mark.parametrize("routing", ["static", "dynamic", "v2"])
def test_to_lime_keeps_the_llama_and_its_routers_learn(routing):
    params = model.init(jax.random.key(15), SMALL)
    lime, cfg = model.to_lime(params, SMALL, routing)
    assert cfg == dataclasses.replace(SMALL, routing=routing)
    # The same pytree as a LIMe init, so the trainer's optimiser state and checkpoints fit it.
    shapes = lambda t: jax.tree.map(lambda a: (a.shape, a.dtype), t)  # noqa: E731
    assert shapes(lime) == shapes(model.init(jax.random.key(0), cfg))
    tokens = _tokens(SMALL)
    logits = model.apply(lime, tokens, cfg)
    np.testing.assert_allclose(logits, _np_forward(params, tokens, SMALL), rtol=1e-4, atol=1e-4)  # numpy Llama
    np.testing.assert_allclose(logits, model.apply(params, tokens, SMALL), rtol=1e-6, atol=1e-6)  # float32 rounding
    # Every routed layer's router gets a non-zero gradient.
    grads = jax.grad(_loss)(lime, tokens, cfg)["layers"]["router"]
    for g in jax.tree.leaves(grads):
        assert np.all(np.abs(np.asarray(g)).reshape(cfg.n_layers - 1, -1).max(-1) > 0)


def test_to_lime_v2_router_gradient_matches_finite_differences():
    """At the identity, d loss / d router entry vs a central difference (v2 is linear in its router)."""
    lime, cfg = model.to_lime(model.init(jax.random.key(16), SMALL), SMALL, "v2")
    tokens = _tokens(SMALL)
    grad = np.asarray(jax.grad(_loss)(lime, tokens, cfg)["layers"]["router"])
    router, eps = lime["layers"]["router"], 1e-2
    for idx in [(0, 0, 0, 1), (1, 1, 0, 0), (1, 0, 2, 1), (1, 1, 1, 0)]:  # earlier layers' heads and the current

        def loss_at(delta):
            return float(_loss({**lime, "layers": {**lime["layers"], "router": router.at[idx].add(delta)}}, tokens, cfg))

        fd = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
        assert grad[idx] != 0 and fd == pytest.approx(float(grad[idx]), rel=0.05, abs=1e-5), idx


def test_to_lime_rejects_bad_input():
    params = model.init(jax.random.key(17), SMALL)
    with pytest.raises(ValueError, match="routing='dense'"):
        model.to_lime(params, SMALL, "dense")
    with pytest.raises(ValueError, match="routing='none'"):
        model.to_lime(params, SMALL, "none")
    with pytest.raises(ValueError, match="logit_gap must be positive, got 0"):
        model.to_lime(params, SMALL, "static", logit_gap=0)
    lime, cfg = model.to_lime(params, SMALL, "v2")
    with pytest.raises(ValueError, match="got routing='v2'"):
        model.to_lime(lime, cfg, "static")


@pytest.mark.parametrize("spec, w_shape, src_shape", [("K,BTD->KBTD", (3, 4), (2, 5, 6)),
                                                      ("BTK,BTD->KBTD", (2, 5, 3, 4), (2, 5, 6)),
                                                      ("KR,RBTE->KBTE", (3, 3, 4), (3, 2, 5, 6))])
def test_mix_gradients_match_finite_differences(spec, w_shape, src_shape):
    """The mix's hand-written backward (weights and every source) against central differences."""
    rng = np.random.default_rng(18)
    w = jnp.asarray(rng.standard_normal(w_shape), jnp.float32)
    sources = tuple(jnp.asarray(rng.standard_normal(src_shape), jnp.float32) for _ in range(w_shape[-1]))
    jax.test_util.check_grads(lambda w, s: model._mix(spec, w, s), (w, sources), order=1, modes=["rev"],
                              eps=1e-2, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("routing", ["static", "dynamic", "v2"])
def test_lime_loss_gradient_matches_finite_differences(routing):
    """d loss / d params of a routed model (stacked weights, unrolled blocks) along random directions."""
    cfg = dataclasses.replace(SMALL, routing=routing)
    params, tokens = model.init(jax.random.key(19), cfg), _tokens(cfg)
    jax.test_util.check_grads(lambda p: _loss(p, tokens, cfg), (params,), order=1, modes=["rev"],
                              eps=3e-4, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("spec, w_shape", [("K,BTD->KBTD", (3, 4)), ("BTK,BTD->KBTD", (2, 5, 3, 4))])
def test_mix_project_gradients_match_plain_autodiff(spec, w_shape):
    """v1's mix-then-project with the mix recomputed in the backward vs JAX's autodiff of the plain formula."""
    rng = np.random.default_rng(20)
    w = jnp.asarray(rng.standard_normal(w_shape), jnp.float32)
    sources = tuple(jnp.asarray(rng.standard_normal((2, 5, 6)), jnp.float32) for _ in range(w_shape[-1]))
    wkv = jnp.asarray(rng.standard_normal((3, 6, 4)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((3, 2, 5, 4)), jnp.float32)

    def plain(w, sources, wkv):
        mixed = sum(jnp.einsum(spec, w[..., j], src) for j, src in enumerate(sources))
        return jnp.vdot(jnp.einsum("KBTD,KDE->KBTE", mixed, wkv), g)

    got = jax.grad(lambda *a: jnp.vdot(model._mix_project(spec, *a), g), argnums=(0, 1, 2))(w, sources, wkv)
    want = jax.grad(plain, argnums=(0, 1, 2))(w, sources, wkv)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("routing", ["static", "dynamic"])
def test_v1_training_step_does_not_store_the_head_mixes(routing):
    """The gradient's temporaries exceed Llama's by less than a quarter of the [K, B, T, D] mixes of layers 1..L-1
    (stored for the backward pass they add about all of them; recomputed from the sources, none)."""
    L, D, K, B, T = 8, 64, 8, 4, 64
    base = config.tiny(vocab=64, d_model=D, n_layers=L, n_heads=K, n_kv_heads=K, head_dim=8, d_ff=96, max_len=T)
    tokens = jax.ShapeDtypeStruct((B, T), jnp.int32)

    def temp_bytes(cfg):
        params = jax.eval_shape(lambda: model.init(jax.random.key(0), cfg))
        step = jax.jit(jax.grad(_loss), static_argnums=2)
        return step.lower(params, tokens, cfg).compile().memory_analysis().temp_size_in_bytes

    mixes = (L - 1) * K * B * T * D * 4
    excess = temp_bytes(dataclasses.replace(base, routing=routing)) - temp_bytes(base)
    assert excess < mixes / 4, (excess, mixes)

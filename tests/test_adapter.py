"""Any JAX LM plugs into jaxsae through a ModelAdapter: a small Flax transformer written here is harvested,
an SAE ensemble is trained on its activations, and the SAE is spliced back (CE delta) — each step checked
against a direct computation with the Flax model and numpy."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsae import adapter, evaluate, harvest, sae, train
from jaxsae.data import CacheSource

V, D, L, T = 50, 16, 3, 12


class Block(nn.Module):
    """Pre-norm causal self-attention and a GELU MLP."""

    @nn.compact
    def __call__(self, h_BxTxD):
        mask = nn.make_causal_mask(jnp.ones(h_BxTxD.shape[:2]))
        h_BxTxD = h_BxTxD + nn.SelfAttention(num_heads=2, deterministic=True)(nn.LayerNorm()(h_BxTxD), mask=mask)
        return h_BxTxD + nn.Dense(D)(nn.gelu(nn.Dense(4 * D)(nn.LayerNorm()(h_BxTxD))))


class TinyLM(nn.Module):
    """Embedding, L blocks, tied unembedding; `stop` returns the residuals, `replace=(layer, fn)` splices."""

    def setup(self):
        self.embed = nn.Embed(V, D)
        self.blocks = [Block() for _ in range(L)]
        self.norm = nn.LayerNorm()

    def __call__(self, tokens_BxT, stop=None, replace=None):
        h_BxTxD, hs = self.embed(tokens_BxT), {}
        for layer, block in enumerate(self.blocks):
            h_BxTxD = block(h_BxTxD)
            if replace is not None and replace[0] == layer:
                h_BxTxD = replace[1](h_BxTxD)
            hs[layer] = h_BxTxD
            if layer == stop:
                return hs
        return self.embed.attend(self.norm(h_BxTxD))


LM = TinyLM()
PARAMS = LM.init(jax.random.key(0), jnp.zeros((1, T), jnp.int32))
TOKENS = np.random.default_rng(0).integers(1, V, (40, T)).astype(np.int32)
TOKENS[3, 5] = TOKENS[10, 2] = TOKENS[10, 9] = TOKENS[25, 11] = 0  # a document boundary token, left out
MODEL = adapter.ModelAdapter(
    name="flax-tiny", d_model=D, n_layers=L, params=PARAMS,
    residuals=lambda p, tokens_BxT, layers: {l: h for l, h in LM.apply(p, tokens_BxT, stop=max(layers)).items()
                                             if l in layers},
    splice=lambda p, tokens_BxT, layer, fn: LM.apply(p, tokens_BxT, replace=(layer, fn)),
    skip_first=2, exclude_tokens=(0,))
LAYER = 1


def _np_topk_sae(p, x_NxD, k):
    """TopK SAE forward in float64 numpy: encoder sees x − b_dec, keep the k largest, ReLU, decode."""
    p = {n: np.asarray(v, np.float64) for n, v in p.items()}
    pre = (x_NxD - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    acts = np.zeros_like(pre)
    top = np.argsort(-pre, axis=1)[:, :k]
    np.put_along_axis(acts, top, np.maximum(np.take_along_axis(pre, top, 1), 0), 1)
    return acts @ p["W_dec"] + p["b_dec"]


def _np_nll(logits_NxTxV, tokens_NxT, keep_NxT):
    """Mean next-token NLL predicted at kept positions, by a float64 log-softmax."""
    z = np.asarray(logits_NxTxV, np.float64)[:, :-1]
    logp = z - z.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, tokens_NxT[:, 1:, None], -1)[..., 0]
    return nll[keep_NxT[:, :-1]].mean()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flax")
    cfg = harvest.HarvestConfig(corpus="toy", split="train", num_tokens=300, layers=(LAYER,), ctx_len=T,
                                batch_size=8, model="flax-tiny")
    harvest.harvest(MODEL, TOKENS, cfg, {LAYER: tmp / "cache"})
    sae_cfg = sae.SAEConfig(d_in=D, d_sae=32, k=4)
    tcfg = train.TrainConfig(num_steps=30, batch_size=32, n_seeds=2, lr=3e-3, warmup_steps=5, log_every=10,
                             out_dir=str(tmp / "run"))
    state = train.fit(CacheSource(tmp / "cache"), sae_cfg, tcfg)
    return tmp, sae_cfg, jax.device_get(state.params)


def test_cache_holds_the_flax_models_residuals_at_kept_positions(trained):
    tmp, _, _ = trained
    acts = CacheSource(tmp / "cache")
    ctx = harvest.cache_contexts(tmp / "cache")
    h = np.asarray(LM.apply(PARAMS, jnp.asarray(ctx), stop=LAYER)[LAYER])
    want = np.stack([h[c, t] for c in range(len(ctx)) for t in range(2, T) if ctx[c, t] != 0])
    got = np.concatenate([np.load(tmp / "cache" / s["file"]) for s in acts.manifest["shards"]])
    assert acts.manifest["model"] == "flax-tiny" and acts.manifest["skip_first"] == 2
    chex.assert_trees_all_close(got.astype(np.float32), want, rtol=2e-3, atol=2e-3)


def test_spliced_ce_equals_a_direct_computation(trained):
    tmp, sae_cfg, params_S = trained
    acts = CacheSource(tmp / "cache")
    ctx = harvest.cache_contexts(tmp / "cache")
    p0 = jax.tree.map(lambda a: a[0], params_S)
    r = evaluate.evaluate_sae(p0, sae_cfg, acts.normalizer, acts, ctx, model=MODEL, batch_size=64, ce_batch_size=8)

    keep = adapter.kept_positions(ctx, 2, (0,))
    norm = acts.normalizer

    def np_recon(h_BxTxD):  # the spliced residual: SAE in the normalised space, at kept positions only
        h = np.asarray(h_BxTxD, np.float64)
        x_hat = _np_topk_sae(p0, (h.reshape(-1, D) - norm.mean_D) / norm.scale, sae_cfg.k) * norm.scale + norm.mean_D
        return jnp.asarray(np.where(keep[..., None], x_hat.reshape(h.shape), h), jnp.float32)

    h = LM.apply(PARAMS, jnp.asarray(ctx), stop=LAYER)[LAYER]
    clean = _np_nll(LM.apply(PARAMS, jnp.asarray(ctx)), ctx, keep)
    spliced = _np_nll(LM.apply(PARAMS, jnp.asarray(ctx), replace=(LAYER, lambda _: np_recon(h))), ctx, keep)
    assert abs(r["ce_delta"]) > 1e-3  # the SAE is imperfect: splicing it must move the loss (either way: random LM)
    np.testing.assert_allclose(r["clean_loss"], clean, rtol=1e-5)
    np.testing.assert_allclose(r["ce_delta"], spliced - clean, rtol=2e-3, atol=1e-4)


def test_a_cache_of_another_model_is_refused(trained):
    tmp, sae_cfg, params_S = trained
    acts = CacheSource(tmp / "cache")
    other = MODEL._replace(name="someone-else")
    p0 = jax.tree.map(lambda a: a[0], params_S)
    with pytest.raises(ValueError, match="flax-tiny"):
        evaluate.evaluate_sae(p0, sae_cfg, acts.normalizer, acts, harvest.cache_contexts(tmp / "cache"), model=other)


def test_models_are_found_by_name_or_spec():
    assert {"smollm2-135m", "tiny"} <= set(adapter.registered())
    tiny = adapter.load("tiny")
    assert tiny.name == "tiny" and adapter.load("lime_jax.adapter:tiny") is tiny
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        adapter.load("nope")
    with pytest.raises(ValueError, match="cannot load"):
        adapter.load("no_such_module:make")


def test_token_nll_matches_numpy():
    rng = np.random.default_rng(3)
    logits, tokens = rng.standard_normal((2, 5, 7)).astype(np.float32), rng.integers(0, 7, (2, 5))
    want = -np.take_along_axis(jax.nn.log_softmax(logits[:, :-1].astype(np.float64)), tokens[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(adapter.token_nll(jnp.asarray(logits), jnp.asarray(tokens)), want, rtol=1e-5)

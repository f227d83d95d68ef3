"""The model adapter: the little jaxsae needs of a language model to harvest, splice and stream from it.

jaxsae never imports a model package. A model reaches it as a `ModelAdapter`, a tuple of its parameters and
two pure functions of them:
  residuals(params, tokens_BxT, layers) -> {layer: h_BxTxD}     the residual stream after each block
  splice(params, tokens_BxT, layer, fn) -> logits_BxTxV          the same forward with h replaced by fn(h)
plus which positions an SAE should see (`skip_first`, `exclude_tokens`: attention sinks with huge norms) and,
optionally, how the model tokenises the named corpora it ships with and how a token reads as text. Both functions must be traceable
(harvest and streaming call them under `jax.jit`), so parameters are an argument, never a closure.

Adapters are found by name: `load("smollm2-135m")` looks the name up in the `jaxsae.models` entry-point
group (lime_jax registers its models there in pyproject.toml), and `load("my_pkg.my_module:make")` calls any
factory directly. `tests/test_adapter.py` plugs in a small Flax model written in the test.
"""
from __future__ import annotations

import importlib
import importlib.metadata
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

ENTRY_POINT_GROUP = "jaxsae.models"


class ModelAdapter(NamedTuple):
    """A language model as jaxsae sees it; every field but the functions is plain data."""

    name: str  # recorded in cache manifests; caches of other models are refused
    d_model: int  # width D of the residual stream
    n_layers: int  # blocks; layer l is the residual stream after block l (0-based)
    params: object  # the pytree the two functions take first
    residuals: Callable  # (params, tokens_BxT, layers: tuple[int, ...]) -> {layer: h_BxTxD}
    splice: Callable  # (params, tokens_BxT, layer, fn: h_BxTxD -> h_BxTxD) -> logits_BxTxV
    skip_first: int = 0  # leading positions of every context an SAE never sees
    exclude_tokens: tuple[int, ...] = ()  # token ids whose positions an SAE never sees
    token_contexts: Callable | None = None  # (corpus, split, ctx_len) -> int32 [N, ctx_len], if the model has corpora
    token_strings: Callable | None = None  # (ids) -> list[str], each token's text on its own, for displays


def kept_positions(tokens_NxT: np.ndarray, skip_first: int, exclude_tokens: Sequence[int]) -> np.ndarray:
    """bool [N, T]: the positions whose residuals a cache holds (and a CE splice replaces)."""
    keep_NxT = ~np.isin(tokens_NxT, np.asarray(exclude_tokens, dtype=np.int64))
    keep_NxT[:, :skip_first] = False
    return keep_NxT


def token_nll(logits_BxTxV: jax.Array, tokens_BxT: jax.Array) -> jax.Array:
    """nll [B, T-1] of each next token: position t predicts token t + 1."""
    if logits_BxTxV.ndim != 3 or logits_BxTxV.shape[:2] != jnp.shape(tokens_BxT):
        raise ValueError(f"logits {logits_BxTxV.shape} do not match tokens {jnp.shape(tokens_BxT)}: "
                         "expected [B, T, V] and [B, T]")
    logits_BxT1xV = logits_BxTxV[:, :-1].astype(jnp.float32)
    target_BxT1 = jnp.take_along_axis(logits_BxT1xV, tokens_BxT[:, 1:, None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits_BxT1xV, axis=-1) - target_BxT1


def registered() -> dict[str, str]:
    """{name: "module:factory"} of every model registered in the `jaxsae.models` entry-point group."""
    return {ep.name: ep.value for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def load(spec: str) -> ModelAdapter:
    """The adapter of a registered model name, or of a "module:factory" spec (factory() -> ModelAdapter)."""
    target = registered().get(spec, spec)
    if ":" not in target:
        raise ValueError(f"unknown model {spec!r}: not registered under {ENTRY_POINT_GROUP!r} "
                         f"(known: {sorted(registered())}) and not a 'module:factory' spec")
    module, _, factory = target.partition(":")
    try:
        make = getattr(importlib.import_module(module), factory)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"model {spec!r}: cannot load {target!r} ({e})") from None
    adapter = make()
    if not isinstance(adapter, ModelAdapter):
        raise TypeError(f"model factory {target!r} returned {type(adapter).__name__}, not a ModelAdapter")
    return adapter

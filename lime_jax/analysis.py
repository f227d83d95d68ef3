"""The LIMe paper's representation analyses: values' matrix entropy, token separability probe, router weights.

- `matrix_entropy`: matrix-based Rényi entropy of each sequence's (T x F) feature matrix X, with features
  standardised by dataset mean and std, K = X X^T, S_a = log(sum_i (l_i / tr K)^a) / (1 - a), float64,
  averaged over sequences (alpha = 0.5 as the official analysis calls it).
- `value_entropy`: that entropy for every layer of a model, over the values V of given sequences.
- `probe_accuracy`: k-fold cross-validated accuracy of a linear softmax probe (Adam, lr 1e-2), e.g. telling
  apart the value vectors of "is/are/was/were".
- `router_weights`: each layer's weight on every source layer, averaged over heads (and tokens, for the
  dynamic router): the paper's router heatmaps.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lime_jax import model
from lime_jax.config import LlamaConfig


def matrix_entropy(x_BxTxF, alpha: float = 0.5, mean_F=None, std_F=None) -> float:
    """Mean over the B sequences of the Rényi-alpha entropy (nats) of the trace-normalised Gram matrix X X^T.

    Features are standardised with `mean_F`/`std_F` (default: over all B*T rows of x). Ranges over [0, log T].
    """
    x = np.asarray(x_BxTxF, np.float64)
    if x.ndim != 3 or not np.all(np.isfinite(x)):
        raise ValueError(f"need finite features [B, T, F], got shape {x.shape} (finite: {np.all(np.isfinite(x))})")
    if not (alpha > 0 and alpha != 1):
        raise ValueError(f"alpha must be positive and not 1, got {alpha}")
    rows = x.reshape(-1, x.shape[-1])
    mean_F = rows.mean(0) if mean_F is None else np.asarray(mean_F, np.float64)
    std_F = rows.std(0) if std_F is None else np.asarray(std_F, np.float64)
    x = (x - mean_F) / np.maximum(std_F, 1e-12)
    gram_BxTxT = np.einsum("btf,bsf->bts", x, x)
    lam_BxT = np.clip(np.linalg.eigvalsh(gram_BxTxT), 0.0, None)
    p_BxT = lam_BxT / lam_BxT.sum(-1, keepdims=True)
    return float(np.mean(np.log(np.sum(p_BxT ** alpha, -1)) / (1 - alpha)))


def value_entropy(params: dict, cfg: LlamaConfig, tokens_NxT, batch_size: int = 16, alpha: float = 0.5) -> list[float]:
    """Per layer, `matrix_entropy` of the sequences' attention values (V after routing, heads concatenated)."""
    tokens_NxT = np.asarray(tokens_NxT)
    if tokens_NxT.ndim != 2 or len(tokens_NxT) == 0:
        raise ValueError(f"need token ids [N >= 1, T], got shape {tokens_NxT.shape}")
    chunks = []
    for i in range(0, len(tokens_NxT), batch_size):
        v_LxBxTxKxH = np.asarray(model.values(params, jnp.asarray(tokens_NxT[i:i + batch_size]), cfg))
        chunks.append(v_LxBxTxKxH.reshape(*v_LxBxTxKxH.shape[:3], -1))
    v_LxNxTxF = np.concatenate(chunks, axis=1)
    return [matrix_entropy(v_NxTxF, alpha=alpha) for v_NxTxF in v_LxNxTxF]


@functools.partial(jax.jit, static_argnames=("num_classes", "steps"))
def _fit_probe(x_NxF, y_N, num_classes: int, steps: int, lr: float):
    """Full-batch Adam on the softmax cross-entropy of a linear probe (zero init): (W_FxC, b_C)."""
    params = (jnp.zeros((x_NxF.shape[1], num_classes)), jnp.zeros((num_classes,)))
    tx = optax.adam(lr)

    def loss(p):
        logits = x_NxF @ p[0] + p[1]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y_N).mean()

    def step(carry, _):
        p, opt = carry
        updates, opt = tx.update(jax.grad(loss)(p), opt, p)
        return (optax.apply_updates(p, updates), opt), None

    return jax.lax.scan(step, (params, tx.init(params)), None, length=steps)[0][0]


def probe_accuracy(x_NxF, y_N, folds: int = 5, steps: int = 300, lr: float = 1e-2, seed: int = 0) -> float:
    """k-fold cross-validated accuracy of a linear probe on standardised features (stats from each train fold)."""
    x, y = np.asarray(x_NxF, np.float32), np.asarray(y_N)
    if x.ndim != 2 or len(x) != len(y) or not np.all(np.isfinite(x)):
        raise ValueError(f"need finite x [N, F] and labels y [N], got shapes {x.shape} and {y.shape}")
    if len(x) < folds:
        raise ValueError(f"{len(x)} examples are fewer than folds={folds}")
    num_classes = int(y.max()) + 1
    fold_N = np.random.default_rng(seed).permutation(len(x)) % folds
    correct = 0
    for k in range(folds):
        train, test = fold_N != k, fold_N == k
        mean, std = x[train].mean(0), x[train].std(0) + 1e-6
        W, b = _fit_probe(jnp.asarray((x[train] - mean) / std), jnp.asarray(y[train]), num_classes, steps, lr)
        pred = np.argmax(((x[test] - mean) / std) @ np.asarray(W) + np.asarray(b), -1)
        correct += int(np.sum(pred == y[test]))
    return correct / len(x)


def router_weights(params: dict, cfg: LlamaConfig, tokens_BxT=None) -> np.ndarray:
    """[L, L]: row l is layer l's weight on source layer j <= l, averaged over heads (and tokens if dynamic).

    Layer 0 has no router: row 0 is its fixed identity (weight 1 on itself; 1/K for v2, as below).

    static/dynamic: the softmax weights over depth. v2: the mean absolute entry of the (target head x source
    head) block of source layer j (v2 weights are unconstrained and may be negative). The dynamic router needs
    tokens to route.
    """
    L = cfg.n_layers
    if cfg.routing not in ("static", "dynamic", "v2"):
        raise ValueError(f"routing={cfg.routing!r} has no router")
    # Layer 0 has no router (row 0 is its fixed identity); router row l - 1 belongs to layer l.
    mask_LxJ = np.tril(np.ones((L, L), bool))
    out = np.zeros((L, L))
    out[0, 0] = 1.0 / cfg.n_kv_heads if cfg.routing == "v2" else 1.0
    if cfg.routing == "v2":  # router [L-1, K, L, K]
        router = np.asarray(params["layers"]["router"], np.float64)
        out[1:] = np.abs(router).mean((1, 3)) * mask_LxJ[1:]
        return out
    if cfg.routing == "static":  # router [L-1, K, L] logits
        router = np.asarray(params["layers"]["router"], np.float64)
        logits_RxKxJ = np.where(mask_LxJ[1:, None, :], router, -np.inf)
        out[1:] = np.asarray(jax.nn.softmax(logits_RxKxJ, axis=-1)).mean(1)
        return out
    if tokens_BxT is None:
        raise ValueError("the dynamic router's weights depend on the tokens: pass tokens_BxT")
    w = np.asarray(params["layers"]["router"]["w"], np.float64)  # [L-1, D, K, L]
    b = np.asarray(params["layers"]["router"]["b"], np.float64)  # [L-1, K, L]
    # Layer l routes on the normalised state entering it: the residual after block l-1.
    hs = model.residuals(params, tokens_BxT, cfg, tuple(range(L - 1))) if L > 1 else {}
    for layer in range(1, L):
        h = np.asarray(hs[layer - 1], np.float64)
        gain_D = np.asarray(params["layers"]["attn_norm"][layer])
        x = h / np.sqrt((h * h).mean(-1, keepdims=True) + cfg.norm_eps) * gain_D
        logits = np.einsum("btd,dkj->btkj", x, w[layer - 1][..., : layer + 1]) + b[layer - 1][:, : layer + 1]
        out[layer, : layer + 1] = np.asarray(jax.nn.softmax(logits, axis=-1)).mean((0, 1, 2))
    return out

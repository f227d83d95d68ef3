"""Activations streamed from a language model while the SAEs train: no cache on disk.

`ModelSource(model, tokens_NxT, layer)` is an activation source like `data.CacheSource`: `batches(B, seed,
start, rows)` yields raw [B, D] float32 rows, a pure function of (seed, batch index), so a killed run resumes
exactly and every process can ask for only its rows of each global batch. The stream: each epoch visits the
token contexts in a seeded random order; a context contributes its kept positions (the adapter's
`skip_first`/`exclude_tokens`) in order. The model runs on fixed-size chunks of `ctx_batch` contexts (one
compiled shape), and only on the chunks that hold rows somebody asked for, so N processes share the forward
passes. With `data_order=same` one forward feeds every seed of the ensemble. `LayersSource` streams several
layers from the same forwards (the adapter's `residuals` returns them all from one pass); `train.fit` on it trains
one ensemble per layer in one step (`member_batches`, `members`).
"""
from __future__ import annotations

import functools
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxsae.adapter import ModelAdapter, kept_positions
from jaxsae.data import Normalizer, _check_rows


class _ResidualStream:
    """The stream of kept rows of several layers at once: chunks are [rows, L, D], one forward per chunk."""

    def __init__(self, model: ModelAdapter, tokens_NxT: np.ndarray, layers: Sequence[int], ctx_batch: int):
        tokens_NxT = np.asarray(tokens_NxT)
        if tokens_NxT.ndim != 2 or len(tokens_NxT) == 0 or not np.issubdtype(tokens_NxT.dtype, np.integer):
            raise ValueError(f"tokens must be integer ids [N >= 1, T], got {tokens_NxT.dtype}{list(tokens_NxT.shape)}")
        layers = tuple(int(l) for l in layers)
        if not layers or len(set(layers)) != len(layers):
            raise ValueError(f"layers must be distinct and at least one, got {list(layers)}")
        for layer in layers:
            if not 0 <= layer < model.n_layers:
                raise ValueError(f"layer={layer} is not a block of {model.name} (0..{model.n_layers - 1})")
        if ctx_batch < 1:
            raise ValueError(f"ctx_batch must be >= 1, got {ctx_batch}")
        self.model, self.tokens_NxT, self.layers, self.ctx_batch = model, tokens_NxT, layers, ctx_batch
        self.keep_NxT = kept_positions(tokens_NxT, model.skip_first, model.exclude_tokens)
        self.kept_N = self.keep_NxT.sum(1)
        if self.kept_N.sum() == 0:
            raise ValueError(f"no position of tokens {tokens_NxT.shape} is kept by {model.name}'s mask")

        def forward(params, t_BxT):  # every layer from one pass: [B, T, L, D]
            h = model.residuals(params, t_BxT, layers)
            return jnp.stack([h[l] for l in layers], axis=2)

        self._forward = jax.jit(forward)

    @property
    def d_in(self) -> int:
        return self.model.d_model

    @property
    def num_tokens(self) -> int:
        """Kept rows in one pass over the contexts."""
        return int(self.kept_N.sum())

    def _fit(self, normalizer_tokens: int) -> list[Normalizer]:
        """Each layer's Normalizer, fitted on the first kept rows in corpus order."""
        if normalizer_tokens < 1:
            raise ValueError(f"normalizer_tokens must be >= 1, got {normalizer_tokens}")
        x_NxLxD = self._rows(np.arange(len(self.tokens_NxT)), 0, normalizer_tokens)
        return [Normalizer.fit(x_NxLxD[:, i]) for i in range(len(self.layers))]

    def _chunk(self, order_N: np.ndarray, j: int) -> np.ndarray:
        """float32 [rows, L, D]: the kept rows of contexts order_N[j*C : (j+1)*C], in order."""
        ids = order_N[j * self.ctx_batch : (j + 1) * self.ctx_batch]
        t_CxT = self.tokens_NxT[ids]
        if len(ids) < self.ctx_batch:  # pad the last chunk with copies: one compiled shape
            t_CxT = np.concatenate([t_CxT, np.repeat(t_CxT[:1], self.ctx_batch - len(ids), 0)])
        h_CxTxLxD = np.asarray(self._forward(self.model.params, t_CxT), np.float32)
        return h_CxTxLxD[: len(ids)][self.keep_NxT[ids]]

    def _rows(self, order_N: np.ndarray, r0: int, r1: int, chunk=None) -> np.ndarray:
        """Rows [r0, r1) of the kept-row stream of contexts in `order_N` (r1 clipped to its end): [rows, L, D]."""
        C = self.ctx_batch
        cum = np.concatenate([[0], np.cumsum(self.kept_N[order_N])])
        starts = cum[::C]  # first row of each chunk
        r1 = min(r1, int(cum[-1]))
        chunk = chunk or (lambda j: self._chunk(order_N, j))
        out = []
        j = int(np.searchsorted(starts, r0, side="right")) - 1
        while r0 < r1:
            x = chunk(j)
            take = min(r1, int(starts[j]) + len(x)) - r0
            out.append(x[r0 - int(starts[j]) : r0 - int(starts[j]) + take])
            r0, j = r0 + take, j + 1
        return np.concatenate(out) if out else np.zeros((0, len(self.layers), self.d_in), np.float32)

    def _stream(self, batch_size: int, seed: int, start: int, rows: tuple[int, int] | None) -> Iterator[np.ndarray]:
        """Endless [rows, L, D] float32 batches from batch `start` on; `rows=(lo, hi)`: only those rows of each."""
        lo, hi = _check_rows(rows, batch_size)
        n = self.num_tokens
        order = functools.lru_cache(maxsize=2)(
            lambda epoch: np.random.default_rng([seed, epoch]).permutation(len(self.tokens_NxT)))
        chunks = functools.lru_cache(maxsize=4)(lambda epoch, j: self._chunk(order(epoch), j))
        pos = start * batch_size
        while True:
            a, b, parts = pos + lo, pos + hi, []
            while a < b:  # the rows may run into the next epoch(s)
                epoch, offset = divmod(a, n)
                take = min(n - offset, b - a)
                parts.append(self._rows(order(epoch), offset, offset + take, functools.partial(chunks, epoch)))
                a += take
            yield np.concatenate(parts)
            pos += batch_size


class ModelSource(_ResidualStream):
    """Raw residuals after block `layer` of `model` on `tokens_NxT`, streamed in a seeded context order."""

    def __init__(self, model: ModelAdapter, tokens_NxT: np.ndarray, layer: int, ctx_batch: int = 16,
                 normalizer: Normalizer | None = None, normalizer_tokens: int = 65_536):
        super().__init__(model, tokens_NxT, (layer,), ctx_batch)
        self.layer = layer
        self.normalizer = normalizer or self._fit(normalizer_tokens)[0]

    def batches(self, batch_size: int, seed: int, start: int = 0, rows: tuple[int, int] | None = None
                ) -> Iterator[np.ndarray]:
        """Endless [B, D] float32 batches from batch `start` on; `rows=(lo, hi)`: only those rows of each."""
        for x_BxLxD in self._stream(batch_size, seed, start, rows):
            yield x_BxLxD[:, 0]


class LayersSource(_ResidualStream):
    """Several layers of one stream: each forward feeds every layer, and batch b of layer l is batch b of
    `ModelSource(model, tokens_NxT, l, ctx_batch)` (same seed, same rows). For one ensemble per layer trained in
    lockstep; `normalizers[l]` is each layer's own."""

    def __init__(self, model: ModelAdapter, tokens_NxT: np.ndarray, layers: Sequence[int], ctx_batch: int = 16,
                 normalizer_tokens: int = 65_536):
        super().__init__(model, tokens_NxT, layers, ctx_batch)
        self.normalizers = dict(zip(self.layers, self._fit(normalizer_tokens)))

    def batches(self, batch_size: int, seed: int, start: int = 0, rows: tuple[int, int] | None = None
                ) -> Iterator[dict[int, np.ndarray]]:
        """Endless {layer: [B, D] float32} batches from batch `start` on; `rows=(lo, hi)`: only those rows."""
        for x_BxLxD in self._stream(batch_size, seed, start, rows):
            yield {l: np.ascontiguousarray(x_BxLxD[:, i]) for i, l in enumerate(self.layers)}

    def member_batches(self, batch_size: int, n_seeds: int, data_seeds: Sequence[int], members: slice = slice(None),
                       start: int = 0, rows: tuple[int, int] | None = None) -> Iterator[np.ndarray]:
        """Normalised float32 [m, rows, D] batches of `members` (a slice of the L*S) of one S-seed ensemble per
        layer: member l*S + s reads layer l on data seed `data_seeds[s]` (or `data_seeds[0]`, data_order=same).

        One stream per data seed in use, so with data_order=same one forward per chunk feeds every member.
        """
        ids = range(len(self.layers) * n_seeds)[members]
        where = [(data_seeds[i % n_seeds] if len(data_seeds) > 1 else data_seeds[0], self.layers[i // n_seeds])
                 for i in ids]
        streams = {d: self.batches(batch_size, d, start, rows) for d in dict.fromkeys(d for d, _ in where)}
        while True:
            got = {d: next(it) for d, it in streams.items()}
            normed = {key: self.normalizers[key[1]](got[key[0]][key[1]]) for key in dict.fromkeys(where)}
            yield np.stack([np.asarray(normed[key], np.float32) for key in where])

    def members(self, n_seeds: int) -> list[tuple[str, Normalizer, dict, dict]]:
        """(folder, normaliser, extra, manifest) of each member l*S + s: L{layer}/seed_{s} with its layer's
        Normalizer; the manifest describes the stream as a harvested cache's would (SAELens metadata)."""
        stream = {"model": self.model.name, "ctx_len": int(self.tokens_NxT.shape[1]),
                  "skip_first": int(self.model.skip_first), "exclude_tokens": [int(t) for t in self.model.exclude_tokens]}
        return [(f"L{layer}/seed_{s}", self.normalizers[layer], {"seed": s, "layer": layer}, {**stream, "layer": layer})
                for layer in self.layers for s in range(n_seeds)]

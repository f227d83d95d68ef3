"""The SmolLM2 tokenizer rebuilt from GGUF metadata: round trips, specials, digits, and HF transformers."""
import os
import re

import gguf
import pytest

from lime_jax.gguf import find_smollm2_gguf
from lime_jax.tokenizer import load_tokenizer

TEXTS = {
    "english": "The quick brown fox jumps over the lazy dog.\n\nIt was 1913, and Webster's dictionary said so.",
    "python": "def f(x: int) -> int:\n    \"\"\"Square.\"\"\"\n    return x ** 2  # 0x1F\n\tpass\r\n",
    "german": "Grüße aus München! Die Straße ist größer als erwartet; Äpfel, Öl, Übermut.",
    "russian": "Съешь же ещё этих мягких французских булок, да выпей чаю. Ёлка — 2024 год.",
}

pytestmark = pytest.mark.slow  # every test reads the GGUF file's metadata


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_round_trip(tok, name):
    text = TEXTS[name]
    ids = tok.encode(text).ids
    assert len(ids) < len(text.encode())  # BPE merged something: not a byte fallback
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_special_ids_and_no_bos(tok):
    assert [tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
    assert tok.encode("<|im_start|>user<|im_end|><|endoftext|>").ids[0] == 1
    assert tok.encode("<|im_start|>user<|im_end|><|endoftext|>").ids[-2:] == [2, 0]
    assert tok.encode("hello").ids[0] != 0 and tok.encode("hello").ids[0] != 1
    assert tok.get_vocab_size() == 49152


def test_digits_split_one_per_token(tok):
    number = "31415926535897"
    ids = tok.encode(f"pi={number}!").ids
    pieces = [tok.decode([i]) for i in ids]
    assert "".join(pieces) == f"pi={number}!"
    digit_pieces = [p for p in pieces if any(c.isdigit() for c in p)]
    assert digit_pieces == list(number)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        load_tokenizer(str(tmp_path / "nope.gguf"))


def test_other_pre_tokenizer_is_refused(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "llama3.gguf"), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(["a", "b", "ab"])
    w.add_token_merges(["a b"])
    w.add_token_types([1, 1, 1])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="got model 'gpt2', pre 'llama-bpe'"):
        load_tokenizer(str(tmp_path / "llama3.gguf"))


# Two or more whitespace characters before a digit: the only place the pre-tokenizers below disagree.
WHITESPACE_DIGITS = "x  =  10\n\n2. item\t\t64 blocks\n    3\n  0x1F   42"


def _reference_encode(text, tokens, merges):
    """From scratch: llama.cpp's "smollm" pre-tokenizer (each digit alone, then the GPT-2 regex) and BPE."""
    regex = pytest.importorskip("regex")
    gpt2 = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    others = [b for b in range(256) if b not in printable]
    byte_char = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}
    rank = {tuple(m.split(" ", 1)): i for i, m in enumerate(merges)}
    vocab = {t: i for i, t in enumerate(tokens)}
    ids = []
    for piece in regex.split(r"(\p{N})", text):
        for word in gpt2.findall(piece):
            parts = [byte_char[b] for b in word.encode()]
            while len(parts) > 1:
                pair = min(zip(parts, parts[1:]), key=lambda p: rank.get(p, float("inf")))
                if pair not in rank:
                    break
                merged, i = [], 0
                while i < len(parts):
                    if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                        merged.append(parts[i] + parts[i + 1])
                        i += 2
                    else:
                        merged.append(parts[i])
                        i += 1
                parts = merged
            ids.extend(vocab[p] for p in parts)
    return ids


def test_matches_from_scratch_reference(tok):
    fields = gguf.GGUFReader(find_smollm2_gguf()).fields
    tokens, merges = fields["tokenizer.ggml.tokens"].contents(), fields["tokenizer.ggml.merges"].contents()
    for text in [*TEXTS.values(), WHITESPACE_DIGITS]:
        assert tok.encode(text).ids == _reference_encode(text, tokens, merges)


def test_matches_hf_transformers(tok):
    """transformers' GGUF converter drops the digit pre-split, so compare where that cannot matter."""
    transformers = pytest.importorskip("transformers")
    path = find_smollm2_gguf()
    hf = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    for text in TEXTS.values():
        assert re.search(r"\s\s\d", text) is None
        assert tok.encode(text).ids == hf(text, add_special_tokens=False)["input_ids"]

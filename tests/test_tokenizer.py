"""The SmolLM2 tokenizer rebuilt from GGUF metadata: round trips, specials, digits, and HF transformers."""
import os

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


def test_matches_hf_transformers(tok):
    transformers = pytest.importorskip("transformers")
    path = find_smollm2_gguf()
    hf = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    for text in TEXTS.values():
        assert tok.encode(text).ids == hf(text, add_special_tokens=False)["input_ids"]

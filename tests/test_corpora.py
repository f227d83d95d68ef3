"""Corpora on small local files: splits, extractors, loading, packing against a plain loop, token cache."""
import gzip
import json
import pathlib
import shutil

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from lime_jax import corpora

WORDS = "the quick brown fox jumps over a lazy dog and then sleeps all day long".split()


@pytest.fixture(scope="module")
def word_tok():
    """A whitespace word-level tokenizer: small, fast, and independent of SmolLM2."""
    vocab = {"<eos>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def _texts(n, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(0, 40))) for _ in range(n)]


def _reference_pack(texts, ctx_len, eos_id):
    """Plain Python: word ids of each document, an eos between documents, full contexts only."""
    vocab = {w: i + 2 for i, w in enumerate(WORDS)}
    flat = []
    for i, text in enumerate(texts):
        if i > 0:
            flat.append(eos_id)
        flat.extend(vocab[w] for w in text.split())
    return [flat[s:s + ctx_len] for s in range(0, len(flat) - ctx_len + 1, ctx_len)]


@pytest.mark.parametrize("ctx_len,batch_size", [(7, 3), (16, 1024), (1, 5)])
def test_pack_matches_reference_loop(word_tok, ctx_len, batch_size):
    texts = _texts(50)
    got = corpora.pack(texts, word_tok, ctx_len=ctx_len, eos_id=0, batch_size=batch_size)
    assert got.dtype == np.int32 and got.shape[1] == ctx_len
    assert got.tolist() == _reference_pack(texts, ctx_len, 0)


def test_pack_bad_input(word_tok):
    with pytest.raises(ValueError, match="ctx_len must be positive, got 0"):
        corpora.pack(["a"], word_tok, ctx_len=0)
    with pytest.raises(TypeError, match="pack expects strings, got int"):
        corpora.pack(["the dog", 3], word_tok, ctx_len=4)
    assert corpora.pack(["the dog"], word_tok, ctx_len=4).shape == (0, 4)


def _docs(n, seed=0):
    return [{"id": f"src/{i}", "text": t or "dog", "source": "src"} for i, t in enumerate(_texts(n, seed))]


def test_split_is_deterministic_disjoint_and_complete():
    docs = _docs(1000)
    a = corpora.split_documents(docs, 0.05, 10, 0)
    b = corpora.split_documents(docs[::-1], 0.05, 10, 0)  # input order must not matter
    assert a == b
    ids = [d["id"] for d in a["train"] + a["heldout"]]
    assert sorted(ids) == sorted(d["id"] for d in docs)
    assert len(a["heldout"]) == 50


def test_split_minimums_raise_the_heldout_set():
    docs = _docs(1000)
    assert len(corpora.split_documents(docs, 0.01, 123, 0)["heldout"]) == 123
    held = corpora.split_documents(docs, 0.01, 0, 5000)["heldout"]
    chars = [len(d["text"]) for d in held]
    assert sum(chars) >= 5000 > sum(chars[:-1])
    assert len(corpora.split_documents(docs, 0.01, 10**6, 0)["heldout"]) == 500  # at most half
    # A document's split depends only on its id's rank: growing the held-out set only adds documents.
    small = {d["id"] for d in corpora.split_documents(docs, 0.02, 0, 0)["heldout"]}
    large = {d["id"] for d in corpora.split_documents(docs, 0.10, 0, 0)["heldout"]}
    assert small < large


def test_chunk_cuts_at_line_breaks():
    lines = [("x" * (i % 37)) for i in range(500)]
    text = "\n".join(lines)
    pieces = corpora.chunk(text, 200)
    assert all(len(p) <= 200 for p in pieces)
    assert [line for p in pieces for line in p.split("\n") if line] == [line for line in lines if line]
    assert corpora.chunk("short", 200) == ["short"]


def _write_corpus(root, name, split, docs):
    (root / name).mkdir(parents=True, exist_ok=True)
    with open(root / name / f"{split}.jsonl", "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")


def test_load_corpus(tmp_path):
    docs = _docs(20) + [{"id": "ru/1", "text": "Съешь ещё этих булок", "source": "ru"}]
    _write_corpus(tmp_path, "mini", "train", docs)
    ds = corpora.load_corpus("mini", "train", data_dir=tmp_path)
    assert ds["text"] == [d["text"] for d in docs] and ds["id"] == [d["id"] for d in docs]


def test_missing_or_empty_corpus_says_how_to_fetch(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist; run `python -m lime_jax.corpora fetch`"):
        corpora.load_corpus("nothing", "train", data_dir=tmp_path)
    _write_corpus(tmp_path, "empty", "heldout", [])
    with pytest.raises(FileNotFoundError, match="is empty"):
        corpora.token_contexts("empty", "heldout", data_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown split 'test'"):
        corpora.load_corpus("empty", "test", data_dir=tmp_path)


def test_load_hub_corpus_from_local_folder(tmp_path):
    (tmp_path / "hub").mkdir()
    rows = [{"content": t, "n": i} for i, t in enumerate(_texts(7))]
    (tmp_path / "hub" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = corpora.load_hub_corpus(str(tmp_path / "hub"), "train", text_field="content")
    assert ds["text"] == [r["content"] for r in rows]
    with pytest.raises(ValueError, match="no column 'body'"):
        corpora.load_hub_corpus(str(tmp_path / "hub"), "train", text_field="body")


def test_token_contexts_caches_and_keys_on_content(tmp_path, word_tok):
    docs = _docs(200)
    _write_corpus(tmp_path / "c", "mini", "train", docs)
    kw = dict(data_dir=tmp_path / "c", tokens_dir=tmp_path / "tok")
    got = corpora.token_contexts("mini", "train", ctx_len=8, tokenizer=word_tok, **kw)
    assert np.asarray(got).tolist() == _reference_pack([d["text"] for d in docs], 8, 0)
    # A second call reads the cache: a tokenizer that cannot encode anything is never used.
    again = corpora.token_contexts("mini", "train", ctx_len=8, tokenizer=object(), max_tokens=8 * 5 + 3, **kw)
    assert np.array_equal(again, got[:5])
    # Changing the corpus changes the cache key.
    _write_corpus(tmp_path / "c", "mini", "train", docs[:100])
    fresh = corpora.token_contexts("mini", "train", ctx_len=8, tokenizer=word_tok, **kw)
    assert np.asarray(fresh).tolist() == _reference_pack([d["text"] for d in docs[:100]], 8, 0)
    assert len(list((tmp_path / "tok").glob("*.npy"))) == 1  # the stale cache was removed
    with pytest.raises(ValueError, match="max_tokens=3 is less than one context"):
        corpora.token_contexts("mini", "train", ctx_len=8, max_tokens=3, **kw)


def test_fortunes_extractor(tmp_path):
    root = tmp_path / "fortunes"
    games = root / "usr/share/games/fortunes"
    games.mkdir(parents=True)
    entries = ["First saying.\n\t-- Someone", "Second\nsaying, two lines.", "Третья."]
    (games / "misc").write_text("%\n".join(e + "\n" for e in entries), encoding="utf-8")
    (games / "misc.dat").write_bytes(b"\x00\x01binary index")
    (games / "misc.u8").symlink_to(games / "misc")
    got = list(corpora.fortunes({"fortunes": root}))
    assert [t for _, t in got] == entries
    assert len({i for i, _ in got}) == len(entries)


def test_gcide_extractor(tmp_path):
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

    def b64(n):  # dictd's numbers: big-endian base 64 digits
        digits = ""
        while True:
            digits = alphabet[n % 64] + digits
            n //= 64
            if n == 0:
                return digits

    header = "00-database-short\n   GCIDE test\n\n"
    e1 = "Hatch \\Hatch\\, n. 1. The act of\n   hatching. See {Brood}.\n   [1913 Webster]\n\n   2. A brood.\n   [PJC]\n"
    e2 = "Dog \\Dog\\, n. A quadruped.\n   [WordNet 1.5]\n"
    body = header + e1 + "\n" + e2
    spans = [("00-database-short", 0, len(header)), ("hatch", len(header), len(e1)),
             ("Hatching", len(header), len(e1)), ("dog", len(header) + len(e1) + 1, len(e2))]
    assert body.isascii()  # offsets below are byte offsets
    d = tmp_path / "dict-gcide/usr/share/dictd"
    d.mkdir(parents=True)
    (d / "gcide.dict.dz").write_bytes(gzip.compress(body.encode()))
    (d / "gcide.index").write_text("".join(f"{w}\t{b64(o)}\t{b64(n)}\n" for w, o, n in spans))
    got = [t for _, t in corpora.gcide_entries({"dict-gcide": tmp_path / "dict-gcide"})]
    assert got == ["Hatch \\Hatch\\, n. 1. The act of hatching. See Brood.\n2. A brood.",
                   "Dog \\Dog\\, n. A quadruped."]


def test_fetch_rejects_bad_config():
    with pytest.raises(ValueError, match="unknown corpora \\['klingon'\\]"):
        corpora.fetch(corpora.FetchConfig(corpora=("general", "klingon")))
    with pytest.raises(ValueError, match="heldout_frac must be in"):
        corpora.fetch(corpora.FetchConfig(heldout_frac=0.7))


MAN_PAGE = r""".TH DEMO 1 "2024" "demo 1.0" "User Commands"
.SH NAME
demo \- show a \fBdemo\fP page
.SH DESCRIPTION
This paragraph is long enough that a terminal of eighty columns would wrap it, but the corpus wants one
line per paragraph, so it must come out whole.
.PP
Gr\(:u\(sse.
.TS
box;
l l.
key	value
.TE
"""


@pytest.mark.skipif(shutil.which("groff") is None or not pathlib.Path("/usr/share/groff").is_dir(),
                    reason="needs the host's groff to stand in for the groff-base package")
def test_render_man_with_host_groff(tmp_path):
    bin_dir = tmp_path / "usr/bin"
    bin_dir.mkdir(parents=True)
    for tool in ("preconv", "tbl", "groff", "troff", "grotty"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    (tmp_path / "usr/share").mkdir()
    (tmp_path / "usr/share/groff").symlink_to("/usr/share/groff")
    text = corpora.render_man(MAN_PAGE.encode(), tmp_path)
    lines = [line for line in text.split("\n") if line]
    assert lines[:4] == [
        "NAME", "demo - show a demo page", "DESCRIPTION",
        "This paragraph is long enough that a terminal of eighty columns would wrap it, but the corpus wants "
        "one line per paragraph, so it must come out whole."]
    assert lines[4] == "Grüße."
    assert lines[5].split() == ["│key", "value", "│"]
    assert len(lines) == 6  # no header/footer, no box rules


def test_build_corpus_end_to_end_and_idempotent(tmp_path, monkeypatch):
    long_text = "\n".join(f"line {i} " + "y" * 50 for i in range(40))  # ~2,500 characters
    extracted = [("a/short", "one short document"), ("a/long", long_text), ("a/blank", "\n\n")]
    extracted += [(f"b/{i}", f"document number {i}") for i in range(300)]
    monkeypatch.setitem(corpora.SOURCES, "toy", corpora.Source((), lambda roots, cfg: iter(extracted)))
    monkeypatch.setitem(corpora.CORPUS_SOURCES, "toy", ("toy",))
    cfg = corpora.FetchConfig(data_dir=str(tmp_path), corpora=("toy",), max_doc_chars=1000,
                              min_heldout_docs=20, min_heldout_chars=0, tokenize=False)
    meta = corpora.fetch(cfg)["toy"]
    train = list(corpora._read_jsonl(tmp_path / "toy/train.jsonl"))
    held = list(corpora._read_jsonl(tmp_path / "toy/heldout.jsonl"))
    assert len(held) == 20 and meta["splits"]["heldout"]["documents"] == 20
    docs = {d["id"]: d["text"] for d in train + held}
    long_ids = sorted(i for i in docs if i.startswith("a/long"))
    assert long_ids == ["a/long", "a/long#1", "a/long#2"]  # 2,500 characters in pieces of <= 1,000
    assert "\n".join(docs[i] for i in long_ids) == long_text
    assert "a/blank" not in docs and docs["a/short"] == "one short document"
    assert meta["sources"]["toy"]["documents"] == len(docs) == 1 + 3 + 300
    # A second fetch finds meta.json and rebuilds nothing, even with a broken extractor.
    monkeypatch.setitem(corpora.SOURCES, "toy", corpora.Source((), lambda roots, cfg: 1 / 0))
    before = (tmp_path / "toy/train.jsonl").stat().st_mtime_ns
    assert corpora.fetch(cfg)["toy"] == meta
    assert (tmp_path / "toy/train.jsonl").stat().st_mtime_ns == before

"""Offline text corpora from Debian packages, their train/held-out splits, and packed SmolLM2 token contexts.

`python -m lime_jax.corpora fetch [key=value ...]` downloads the packages with `apt-get download`, unpacks
them with `dpkg-deb -x` (nothing is installed), extracts documents, and writes per corpus
`{data_dir}/{name}/train.jsonl`, `heldout.jsonl` (one `{"id", "text", "source"}` object per line) and
`meta.json`. Man pages are rendered with the groff of the downloaded `groff-base` package, so the host
needs neither man-db nor groff.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import gzip
import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from jaxsae import configlib

CORPORA = ("general", "code", "russian", "german")
SPLITS = ("train", "heldout")
FETCH_HINT = "run `python -m lime_jax.corpora fetch`"
GROFF_PKG = "groff-base"


@dataclasses.dataclass(frozen=True)
class FetchConfig:
    data_dir: str = "data/corpora"  # corpora go to {data_dir}/{name}/, packages to {data_dir}/_debs/
    corpora: tuple[str, ...] = CORPORA  # which corpora to build, from general, code, russian, german
    heldout_frac: float = 0.02  # fraction of documents held out, chosen by a hash of the document id
    min_heldout_docs: int = 200  # hold out more documents if needed to reach this many
    min_heldout_chars: int = 400_000  # hold out more documents if needed to reach this many characters
    max_doc_chars: int = 8000  # longer documents are cut at line breaks into pieces of about this size
    tokenize: bool = True  # also build the ctx_len=256 token contexts under data/tokens/ and count tokens
    workers: int = 2  # man pages rendered in parallel


# ----------------------------------------------------------------------------------------------------------
# Small utilities: hashing, atomic writes, JSON lines.


def _hash_unit(doc_id: str) -> float:
    """A deterministic number in [0, 1) from a document id: decides the split and the order."""
    return int.from_bytes(hashlib.sha1(doc_id.encode()).digest()[:8], "big") / 2.0**64


def _file_sha1(path: pathlib.Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _atomic_path(path: pathlib.Path) -> pathlib.Path:
    """A temporary sibling of `path` to write to, then `os.replace` onto it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the data from other users of the tree
    return pathlib.Path(tmp)


def _write_jsonl(path: pathlib.Path, docs: Iterable[dict]) -> None:
    tmp = _atomic_path(path)
    with open(tmp, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _write_json(path: pathlib.Path, obj: dict) -> None:
    tmp = _atomic_path(path)
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _read_jsonl(path: pathlib.Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


# ----------------------------------------------------------------------------------------------------------
# Debian packages.

# Meta-packages whose real, versioned package changes between releases (linux-doc -> linux-doc-6.1).
META_PACKAGES = {"linux-doc": "linux-doc-", "python3-doc": "python3."}


def _run(args: Sequence[str], cwd: pathlib.Path | None = None) -> str:
    if shutil.which(args[0]) is None:
        raise RuntimeError(f"{args[0]!r} not found: fetching the corpora needs a Debian-like system with apt")
    out = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"`{' '.join(args)}` failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
    return out.stdout


def _resolve(pkg: str) -> str:
    """The concrete package behind a meta-package, e.g. linux-doc -> linux-doc-6.1."""
    if pkg not in META_PACKAGES:
        return pkg
    deps = re.findall(r"Depends: (\S+)", _run(["apt-cache", "depends", pkg]))
    real = [d for d in deps if d.startswith(META_PACKAGES[pkg])]
    if not real:
        raise RuntimeError(f"meta-package {pkg!r} depends on no {META_PACKAGES[pkg]}* package: {deps}")
    return real[0]


def fetch_package(pkg: str, debs_dir: pathlib.Path) -> dict:
    """Download and unpack one package under debs_dir/{pkg}/ (skipped when done); its name, version, size."""
    pkg = _resolve(pkg)
    root = debs_dir / pkg
    debs = sorted(debs_dir.glob(f"{pkg}_*.deb"))
    if not debs:
        try:
            _run(["apt-get", "download", pkg], cwd=debs_dir)
        except RuntimeError:  # a fresh machine may have empty package lists
            _run(["apt-get", "update"])
            _run(["apt-get", "download", pkg], cwd=debs_dir)
        debs = sorted(debs_dir.glob(f"{pkg}_*.deb"))
    deb = debs[-1]
    if not (root / ".done").exists():
        shutil.rmtree(root, ignore_errors=True)
        _run(["dpkg-deb", "-x", str(deb), str(root)])
        (root / ".done").touch()
    version = _run(["dpkg-deb", "-f", str(deb), "Version"]).strip()
    licence = sorted(str(p.relative_to(root)) for p in root.glob("usr/share/doc/*/copyright"))
    return {"package": pkg, "version": version, "deb_bytes": deb.stat().st_size, "copyright": licence}


# ----------------------------------------------------------------------------------------------------------
# Document extractors: each takes the package roots and yields (document id, text).


def _groff_env(groff_root: pathlib.Path) -> dict:
    share = groff_root / "usr/share/groff"
    version_dir = next(p for p in share.iterdir() if p.name[0].isdigit())
    return dict(os.environ, GROFF_BIN_PATH=str(groff_root / "usr/bin"),
                GROFF_FONT_PATH=str(version_dir / "font"),
                GROFF_TMAC_PATH=f"{version_dir / 'tmac'}:{share / 'site-tmac'}", LC_ALL="C.UTF-8")


def render_man(source: bytes, groff_root: pathlib.Path) -> str:
    """A troff man page as plain UTF-8 text: one line per paragraph, no indentation, header/footer dropped."""
    bin_dir = groff_root / "usr/bin"
    # Lines 5000 ens long so paragraphs are not wrapped; no hyphenation; -P-cbou: no overstrike/bold/underline.
    cmd = (f'"{bin_dir}/preconv" -e utf-8 | "{bin_dir}/tbl" | '
           f'"{bin_dir}/groff" -mandoc -Tutf8 -rLL=5000n -rHY=0 -P-cbou')
    out = subprocess.run(["sh", "-c", cmd], input=source, capture_output=True, env=_groff_env(groff_root))
    if out.returncode != 0:
        raise RuntimeError(f"groff failed ({out.returncode}): {out.stderr.decode(errors='replace')[-500:]}")
    lines = [re.sub(r"\s+", " ", line).strip() for line in out.stdout.decode("utf-8", "replace").splitlines()]
    # Table rules (box-drawing lines) span the whole 5000-en line: drop them.
    lines = [line for line in lines if "\b" not in line and not re.fullmatch(r"[\u2500-\u257f ]+", line)]
    nonempty = [i for i, line in enumerate(lines) if line]
    if len(nonempty) < 3:
        return ""
    body = "\n".join(lines[nonempty[0] + 1:nonempty[-1]])  # drops the "LS(1) ... LS(1)" header and footer
    return re.sub(r"\n{3,}", "\n\n", body).strip()


def man_pages(roots: dict, pattern: str, workers: int) -> Iterator[tuple[str, str]]:
    """Every non-link, non-`.so` man page below usr/share/man of each package, rendered with groff."""
    groff_root = roots[GROFF_PKG]
    pages = [(pkg, p) for pkg, r in roots.items() if pkg != GROFF_PKG
             for p in sorted((r / "usr/share/man").glob(pattern)) if p.is_file() and not p.is_symlink()]

    def one(item):
        pkg, p = item
        src = gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()
        if src.lstrip().startswith(b".so "):  # a pointer to another page: a duplicate
            return "", ""
        return f"{pkg}/{p.relative_to(roots[pkg])}", render_man(src, groff_root)

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for doc_id, text in tqdm(pool.map(one, pages), total=len(pages), desc="man pages", unit="page"):
            if text:
                yield doc_id, text


def fortunes(roots: dict, skip: Sequence[str] = ()) -> Iterator[tuple[str, str]]:
    """Each fortune (entries separated by lines holding `%`) of the plain-text fortune files."""
    for pkg, r in roots.items():
        for p in sorted((r / "usr/share/games/fortunes").rglob("*")):
            if not p.is_file() or p.is_symlink() or p.suffix == ".dat" or p.name in skip:
                continue
            text = p.read_bytes().decode("utf-8", "replace")
            for i, entry in enumerate(re.split(r"^%$", text, flags=re.M)):
                if entry.strip():
                    yield f"{pkg}/{p.relative_to(r)}#{i}", entry.strip("\n")


def _dictd_number(s: str) -> int:
    """dictd's base-64 numbers (offsets and lengths in the .index file)."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    n = 0
    for c in s:
        n = n * 64 + alphabet.index(c)
    return n


def gcide_entries(roots: dict) -> Iterator[tuple[str, str]]:
    """Dictionary entries of GCIDE, without `[1913 Webster]`-style source lines, paragraphs unwrapped."""
    dictd = roots["dict-gcide"] / "usr/share/dictd"
    data = gzip.decompress((dictd / "gcide.dict.dz").read_bytes())  # dictzip is gzip-readable
    spans = set()
    for line in (dictd / "gcide.index").read_text(encoding="utf-8").splitlines():
        word, off, length = line.split("\t")
        if not word.startswith("00-database"):
            spans.add((_dictd_number(off), _dictd_number(length)))
    for off, length in sorted(spans):
        raw = data[off:off + length].decode("utf-8", "replace")
        lines = [line.strip() for line in raw.splitlines()]
        lines = [line for line in lines if not re.fullmatch(r"\[[^\]]*\]", line)]  # source tags
        paragraphs = re.split(r"\n{2,}", "\n".join(lines).strip())
        text = "\n".join(" ".join(p.split()) for p in paragraphs)
        text = re.sub(r"[{}]", "", text)  # cross-reference braces: {Afeard} -> Afeard
        if text:
            yield f"gcide@{off}", text


def rst_sources(roots: dict, skip: Callable[[str], bool]) -> Iterator[tuple[str, str]]:
    """Sphinx's copies of the reStructuredText sources (html/_sources/**/*.rst.txt)."""
    for pkg, r in roots.items():
        seen = set()  # python3.11-doc reaches the same html/ through a symlinked directory too
        for p in sorted(r.glob("usr/share/doc/*/html/_sources/**/*.rst.txt")):
            rel = str(p.relative_to(r))
            if not skip(rel) and p.resolve() not in seen:
                seen.add(p.resolve())
                yield f"{pkg}/{rel}", p.read_text(encoding="utf-8", errors="replace")


def stdlib_sources(roots: dict) -> Iterator[tuple[str, str]]:
    """The running interpreter's standard library .py files, sorted; test directories and site-packages excluded."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    for p in sorted(root.rglob("*.py")):
        parts = p.relative_to(root).parts
        if {"site-packages", "dist-packages", "test", "tests", "idle_test"} & set(parts[:-1]):
            continue
        yield f"python{sys.version_info.major}.{sys.version_info.minor}/{'/'.join(parts)}", p.read_text(
            encoding="utf-8", errors="replace")


@dataclasses.dataclass(frozen=True)
class Source:
    packages: tuple[str, ...]  # Debian packages to download (groff-base is added for man pages)
    extract: Callable[[dict, FetchConfig], Iterable[tuple[str, str]]]  # (package roots, config) -> documents


SOURCES = {
    "gcide": Source(("dict-gcide",), lambda roots, cfg: gcide_entries(roots)),
    "linux-doc": Source(("linux-doc",), lambda roots, cfg: rst_sources(roots, lambda p: "/translations/" in p)),
    "python-doc": Source(("python3-doc",), lambda roots, cfg: rst_sources(
        roots, lambda p: p.endswith("whatsnew/changelog.rst.txt"))),
    # perl-doc ships its POD already converted to man pages (man1: the perl* manuals; man3: core modules).
    "perl-doc": Source(("perl-doc", GROFF_PKG), lambda roots, cfg: man_pages(roots, "man*/*", cfg.workers)),
    "manpages": Source(("manpages", GROFF_PKG), lambda roots, cfg: man_pages(roots, "man*/*", cfg.workers)),
    "fortunes": Source(("fortunes", "fortunes-min"), lambda roots, cfg: fortunes(roots, skip=("ascii-art",))),
    "python-stdlib": Source((), lambda roots, cfg: stdlib_sources(roots)),
    "fortunes-ru": Source(("fortunes-ru",), lambda roots, cfg: fortunes(roots)),
    "manpages-ru": Source(("manpages-ru", GROFF_PKG), lambda roots, cfg: man_pages(roots, "ru/man*/*", cfg.workers)),
    "manpages-de": Source(("manpages-de", GROFF_PKG), lambda roots, cfg: man_pages(roots, "de/man*/*", cfg.workers)),
}

CORPUS_SOURCES = {
    "general": ("gcide", "linux-doc", "python-doc", "perl-doc", "manpages", "fortunes"),
    "code": ("python-stdlib",),
    "russian": ("fortunes-ru", "manpages-ru"),
    "german": ("manpages-de",),
}


# ----------------------------------------------------------------------------------------------------------
# Building a corpus.


def chunk(text: str, max_chars: int) -> list[str]:
    """Cut text at line breaks into pieces of at most max_chars (a single longer line stays whole)."""
    pieces, current = [], ""
    for line in text.splitlines(keepends=True):
        if current and len(current) + len(line) > max_chars:
            pieces.append(current)
            current = ""
        current += line
    pieces.append(current)
    return [p.strip("\n") for p in pieces if p.strip()]


def split_documents(docs: Sequence[dict], heldout_frac: float, min_heldout_docs: int,
                    min_heldout_chars: int) -> dict[str, list[dict]]:
    """Held out: the documents of lowest id hash, enough to meet all three minimums (at most half).

    Both splits are ordered by that hash, so any prefix of either is a fair sample of the mix."""
    if not docs:
        raise ValueError("no documents to split")
    ordered = [d for _, d in sorted(((_hash_unit(d["id"]), d) for d in docs), key=lambda kd: kd[0])]
    k, chars = 0, 0
    while k < len(ordered) // 2 and (k < heldout_frac * len(ordered) or k < min_heldout_docs
                                     or chars < min_heldout_chars):
        chars += len(ordered[k]["text"])
        k += 1
    return {"train": ordered[k:], "heldout": ordered[:k]}


def _source_docs(name: str, cfg: FetchConfig, debs_dir: pathlib.Path) -> tuple[pathlib.Path, list[dict]]:
    """Whole documents of one source, cached under {data_dir}/_sources/{name}.jsonl; and its packages."""
    src = SOURCES[name]
    packages = [fetch_package(p, debs_dir) for p in src.packages]
    path = pathlib.Path(cfg.data_dir) / "_sources" / f"{name}.jsonl"
    if not path.exists():
        roots = {info["package"]: debs_dir / info["package"] for info in packages}
        docs = ({"id": doc_id, "text": text, "source": name} for doc_id, text in src.extract(roots, cfg))
        _write_jsonl(path, tqdm(docs, desc=f"extract {name}", unit="doc", mininterval=5))
    return path, packages


def build_corpus(name: str, cfg: FetchConfig) -> dict:
    """Write {data_dir}/{name}/{train,heldout}.jsonl and meta.json unless they exist; returns the meta."""
    if name not in CORPUS_SOURCES:
        raise ValueError(f"unknown corpus {name!r}; known: {sorted(CORPUS_SOURCES)}")
    out = pathlib.Path(cfg.data_dir) / name
    if (out / "meta.json").exists():
        print(f"[corpora] {name}: already built in {out}", flush=True)
        return json.loads((out / "meta.json").read_text())
    debs_dir = pathlib.Path(cfg.data_dir) / "_debs"
    debs_dir.mkdir(parents=True, exist_ok=True)
    docs, sources = [], {}
    for source in CORPUS_SOURCES[name]:
        path, packages = _source_docs(source, cfg, debs_dir)
        n0 = len(docs)
        docs.extend({"id": f"{d['id']}#{k}" if k else d["id"], "text": piece, "source": source}
                    for d in _read_jsonl(path) for k, piece in enumerate(chunk(d["text"], cfg.max_doc_chars)))
        sources[source] = {"packages": [p for p in packages if p["package"] != GROFF_PKG],
                           "documents": len(docs) - n0, "chars": sum(len(d["text"]) for d in docs[n0:])}
    meta = {"name": name, "sources": sources, "heldout_frac": cfg.heldout_frac,
            "min_heldout_docs": cfg.min_heldout_docs,
            "min_heldout_chars": cfg.min_heldout_chars, "max_doc_chars": cfg.max_doc_chars, "splits": {}}
    if any(GROFF_PKG in SOURCES[s].packages for s in CORPUS_SOURCES[name]):
        meta["renderer"] = fetch_package(GROFF_PKG, debs_dir)
    for split, split_docs in split_documents(
            docs, cfg.heldout_frac, cfg.min_heldout_docs, cfg.min_heldout_chars).items():
        _write_jsonl(out / f"{split}.jsonl", split_docs)
        meta["splits"][split] = {"documents": len(split_docs), "chars": sum(len(d["text"]) for d in split_docs)}
    _write_json(out / "meta.json", meta)  # written last: its presence marks the corpus as complete
    print(f"[corpora] {name}: {json.dumps(meta['splits'])}", flush=True)
    return meta


# ----------------------------------------------------------------------------------------------------------
# Loading and tokenising.


def corpus_file(name: str, split: str, data_dir: str | os.PathLike = "data/corpora") -> pathlib.Path:
    """The JSON-lines file of a built corpus split; a clear error when it is missing or empty."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    path = pathlib.Path(data_dir) / name / f"{split}.jsonl"
    if not path.is_file() or path.stat().st_size == 0:
        state = "is empty" if path.is_file() else "does not exist"
        raise FileNotFoundError(f"corpus {name!r} split {split!r}: {path} {state}; {FETCH_HINT}")
    return path


def load_corpus(name: str, split: str, data_dir: str | os.PathLike = "data/corpora"):
    """A built corpus split as a `datasets.Dataset` with columns id, text, source."""
    import datasets

    path = corpus_file(name, split, data_dir)
    return datasets.load_dataset("json", data_files={split: str(path)}, split=split)


def load_hub_corpus(hub_name: str, split: str, text_field: str = "text", **kwargs):
    """A corpus from the Hugging Face hub (or a local folder/file path), with its text column named `text`."""
    import datasets

    ds = datasets.load_dataset(hub_name, split=split, **kwargs)
    if text_field not in ds.column_names:
        raise ValueError(f"{hub_name!r} split {split!r} has no column {text_field!r}; columns: {ds.column_names}")
    return ds if text_field == "text" else ds.rename_column(text_field, "text")


def pack(texts: Iterable[str], tokenizer, ctx_len: int = 256, eos_id: int = 0, batch_size: int = 1024) -> np.ndarray:
    """Tokenise documents, join them with eos_id, cut into full contexts: int32 [N, ctx_len] (remainder dropped)."""
    if ctx_len < 1:
        raise ValueError(f"ctx_len must be positive, got {ctx_len}")
    ids = []
    batch: list[str] = []

    def flush():
        for enc in tokenizer.encode_batch(batch, add_special_tokens=False):
            if ids:
                ids.append(np.array([eos_id], np.int32))
            ids.append(np.asarray(enc.ids, np.int32))
        batch.clear()

    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"pack expects strings, got {type(text).__name__}: {text!r:.80}")
        batch.append(text)
        if len(batch) == batch_size:
            flush()
    flush()
    flat = np.concatenate(ids) if ids else np.zeros(0, np.int32)
    n = len(flat) // ctx_len
    return flat[: n * ctx_len].reshape(n, ctx_len)


def token_contexts(name: str, split: str, ctx_len: int = 256, max_tokens: int | None = None,
                   data_dir: str | os.PathLike = "data/corpora", tokens_dir: str | os.PathLike = "data/tokens",
                   tokenizer=None) -> np.ndarray:
    """Packed contexts of a corpus split, int32 [N, ctx_len], cached (memory-mapped) under tokens_dir."""
    path = corpus_file(name, split, data_dir)
    if max_tokens is not None and max_tokens < ctx_len:
        raise ValueError(f"max_tokens={max_tokens} is less than one context of ctx_len={ctx_len}")
    cache = pathlib.Path(tokens_dir) / f"{name}_{split}_T{ctx_len}_{_file_sha1(path)[:12]}.npy"
    if not cache.exists():
        if tokenizer is None:
            from lime_jax.tokenizer import load_tokenizer

            tokenizer = load_tokenizer()
        docs = tqdm(_read_jsonl(path), desc=f"tokenise {name}/{split}", unit="doc", mininterval=5)
        tokens = pack((d["text"] for d in docs), tokenizer, ctx_len)
        if len(tokens) == 0:
            raise ValueError(f"{path} holds fewer than ctx_len={ctx_len} tokens")
        tmp = _atomic_path(cache)
        with open(tmp, "wb") as f:
            np.save(f, tokens)
        os.replace(tmp, cache)
        for stale in cache.parent.glob(f"{name}_{split}_T{ctx_len}_*.npy"):  # caches of an older corpus file
            if stale != cache:
                stale.unlink()
    tokens = np.load(cache, mmap_mode="r")
    return tokens if max_tokens is None else tokens[: max_tokens // ctx_len]


def fetch(cfg: FetchConfig) -> dict[str, dict]:
    """Build every corpus of cfg (skipping finished ones) and, if asked, their token contexts."""
    unknown = set(cfg.corpora) - set(CORPUS_SOURCES)
    if unknown:
        raise ValueError(f"unknown corpora {sorted(unknown)}; known: {sorted(CORPUS_SOURCES)}")
    if not 0.0 <= cfg.heldout_frac < 0.5:
        raise ValueError(f"heldout_frac must be in [0, 0.5), got {cfg.heldout_frac}")
    metas = {}
    for name in cfg.corpora:
        meta = build_corpus(name, cfg)
        if cfg.tokenize and any("tokens" not in s for s in meta["splits"].values()):
            for split in SPLITS:  # tokens in full 256-token contexts: at most 255 short of the exact count
                meta["splits"][split]["tokens"] = int(token_contexts(name, split, 256, data_dir=cfg.data_dir).size)
            _write_json(pathlib.Path(cfg.data_dir) / name / "meta.json", meta)
        metas[name] = meta
    return metas


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "fetch" or any(a in ("-h", "--help") for a in argv):
        print("usage: python -m lime_jax.corpora fetch [key=value ...]\n" + configlib.help_text(FetchConfig()))
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    cfg = configlib.override(FetchConfig(), argv[1:])
    for name, meta in fetch(cfg).items():
        print(json.dumps({"corpus": name, **meta["splits"]}))
    return 0


if __name__ == "__main__":
    sys.exit(configlib.run(main, prog="python -m lime_jax.corpora"))

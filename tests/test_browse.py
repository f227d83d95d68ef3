"""jaxsae browse: its library tables against numpy loops, the site's numbers against a float64 numpy SAE and the
model itself, bad input, and the page rendered by a real headless Chromium (Debian's chromium + chromedriver)."""
import json
import os
import shutil
import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxsae import analysis, browse, cli, harvest, io, sae, stability, train
from jaxsae.data import CacheSource, CacheWriter

LAYER, T, M, S = 2, 32, 64, 3


def _np_acts(params, x_NxD, cfg):
    """Dense [N, M] activations of a TopK SAE in float64 numpy: the k largest pre-activations, then ReLU."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    pre = (np.asarray(x_NxD, np.float64) - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    acts = np.zeros_like(pre)
    for n in range(len(pre)):
        top = np.argsort(-pre[n])[:cfg.k]
        acts[n, top] = np.maximum(pre[n, top], 0)
    return acts


def _brute_partner(a, b, ea=None, eb=None):
    """Loop over every pair: (argmax, max) over the rows of b of min(|cos_dec|, |cos_enc|) for each row of a."""
    cos = lambda u, v: abs(u @ v) / np.linalg.norm(u) / np.linalg.norm(v)  # noqa: E731
    idx, best = [], []
    for i in range(len(a)):
        sc = [cos(a[i], b[j]) if ea is None else min(cos(a[i], b[j]), cos(ea[i], eb[j])) for j in range(len(b))]
        idx.append(int(np.argmax(sc)))
        best.append(max(sc))
    return idx, best


def _distinct_top(a_R, ctx_R, pos_R, k, window):
    """Loop over rows by activation: the k strongest positive ones, skipping any within `window` positions of a
    stronger kept one in the same context. [(act, context, position)]"""
    kept = []
    for r in sorted(range(len(a_R)), key=lambda r: (-a_R[r], r)):
        if a_R[r] <= 0 or len(kept) == k:
            break
        if all(c != ctx_R[r] or abs(p - pos_R[r]) > window for _, c, p in kept):
            kept.append((a_R[r], int(ctx_R[r]), int(pos_R[r])))
    return kept


def _read_js(path):
    """The JSON arguments of the one `BROWSE.f(...)` call a site data file makes."""
    text = Path(path).read_text(encoding="utf-8").strip()
    return json.loads("[" + text[text.index("(") + 1:text.rindex(")")] + "]")


# ---------------------------------------------------------------- library functions (fast)


@pytest.mark.parametrize("use_enc", [False, True])
def test_best_partners_equal_brute_force(use_enc):
    rng = np.random.default_rng(0)
    dec = rng.normal(size=(3, 37, 8)).astype(np.float32)  # 37: not a multiple of the block
    enc = rng.normal(size=(3, 37, 8)).astype(np.float32) if use_enc else None
    idx, cos = analysis.best_partners(dec, 1, enc, block=16)
    assert idx[1].tolist() == list(range(37)) and np.all(cos[1] == 1)
    for s in (0, 2):
        ref_idx, ref_cos = _brute_partner(dec[1], dec[s], *((enc[1], enc[s]) if use_enc else ()))
        assert idx[s].tolist() == ref_idx
        np.testing.assert_allclose(cos[s], ref_cos, atol=1e-6)
    # The same scores stability.best_matches finds, so p and the shown |cos| agree.
    np.testing.assert_allclose(stability.best_matches(dec, enc, search_dtype="float32")[1], cos, atol=1e-6)
    with pytest.raises(ValueError, match="seed must index"):
        analysis.best_partners(dec, 3)


def test_activation_summary_matches_numpy_histogram():
    rng = np.random.default_rng(1)
    acts = np.maximum(rng.normal(size=(500, 6)), 0) * rng.uniform(0.5, 3, 6)
    acts[:, 2] = 0  # never fires
    acts[:, 4] = 0
    acts[7, 4] = 1.5  # fires once: its one activation is the max, in the last bin
    got = analysis.activation_summary(acts, 7)
    for e in range(6):
        a = acts[:, e]
        pos = a[a > 0]
        np.testing.assert_allclose(got.freq_E[e], len(pos) / 500)
        np.testing.assert_allclose(got.mean_E[e], pos.mean() if len(pos) else 0.0)
        np.testing.assert_allclose(got.max_E[e], pos.max() if len(pos) else 0.0)
        ref = np.histogram(pos, bins=7, range=(0, pos.max()))[0] if len(pos) else np.zeros(7)
        np.testing.assert_array_equal(got.hist_ExB[e], ref)
    with pytest.raises(ValueError, match="n_bins"):
        analysis.activation_summary(acts, 0)


def test_stability_by_frequency_by_loop():
    rng = np.random.default_rng(2)
    freq = 10 ** rng.uniform(-4, -1, (3, 50))
    freq[0, :5] = 0  # dead latents are in no bin
    p = rng.integers(0, 3, (3, 50)) / 2
    edges, mean_p, count = analysis.stability_by_frequency(p, freq, 4)
    lf = np.log10(freq[freq > 0])
    ref_edges = np.quantile(lf, np.linspace(0, 1, 5))
    np.testing.assert_allclose(edges, ref_edges)
    for b in range(4):
        inside = [(s, i) for s in range(3) for i in range(50) if freq[s, i] > 0 and (
            ref_edges[b] <= np.log10(freq[s, i]) < ref_edges[b + 1] or (b == 3 and np.log10(freq[s, i]) == ref_edges[4]))]
        assert count[b] == len(inside)
        np.testing.assert_allclose(mean_p[b], np.mean([p[s, i] for s, i in inside]))


def test_summary_metrics_reads_train_and_pipeline_layouts():
    cols, rows = browse.summary_metrics({"ev": [0.5, 0.6], "l0": [32, 32], "eval_on": "x"}, 2)
    assert cols == ["summary EV", "summary L0"] and rows == [[0.5, 32.0], [0.6, 32.0]]
    per_seed = [{"corpus": c, "seed": s, "ev": 0.1 * s, "ce_delta": 1.0 + s} for c in ("general", "code") for s in (0, 1)]
    cols, rows = browse.summary_metrics({"per_seed": per_seed}, 2)
    assert cols == ["general EV", "general CE Δ", "code EV", "code CE Δ"]
    assert rows == [[0.0, 1.0, 0.0, 1.0], [0.1, 2.0, 0.1, 2.0]]
    assert browse.summary_metrics({"ev": [0.5]}, 2) == ([], [[], []])  # a list of the wrong length is ignored


def test_sae_source_and_cache_checks():
    assert browse.sae_source({"d_in": 4}) == {}
    assert browse.sae_source({"model_name": "gpt2", "hook_name": "blocks.6.hook_resid_post"}) == {"model": "gpt2", "layer": 6}
    assert browse.sae_source({"metadata": {"model_name": "HuggingFaceTB/SmolLM2-135M", "hook_name": "blocks.14.hook_resid_post"}}) \
        == {"model": "HuggingFaceTB/SmolLM2-135M", "layer": 14}
    assert browse.sae_source({"jaxsae": {"model": "tiny", "layer": 2}}) == {"model": "tiny", "layer": 2}
    assert browse.sae_source({"model_name": "a", "metadata": {"model_name": "b"}, "jaxsae": {"layer": 3}}) == \
        {"model": "b", "layer": 3}
    cfg = sae.SAEConfig(d_in=576, d_sae=64, k=4)
    manifest = {"d_in": 576, "model": "smollm2-135m", "layer": 14}
    browse.check_cache(manifest, "c", cfg, {0: {"model": "HuggingFaceTB/SmolLM2-135M", "layer": 14}, 1: {}})
    with pytest.raises(ValueError, match="from layer 14, the SAE of seed 1 reads layer 13"):
        browse.check_cache(manifest, "c", cfg, {0: {}, 1: {"layer": 13}})
    with pytest.raises(ValueError, match="model 'smollm2-135m'.*'gpt2'"):
        browse.check_cache(manifest, "c", cfg, {0: {"model": "gpt2"}})
    with pytest.raises(ValueError, match="d_in=576 activations, the SAEs read d_in=32"):
        browse.check_cache(manifest, "c", sae.SAEConfig(d_in=32, d_sae=64, k=4), {})


# ---------------------------------------------------------------- a tiny run (slow: model, harvest, training)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The `tiny` model's layer-2 caches (train; held-out also at layer 3), 3 TopK seeds fit on them, and the site."""
    from lime_jax.adapter import tiny

    root = tmp_path_factory.mktemp("browse")
    model = tiny()
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 3000, (64, T)).astype(np.int32)
    tokens[rng.random(tokens.shape) < 0.03] = 0  # <|endoftext|>: no cache row, so rows shift against positions
    harvest.harvest(model, tokens[:48], harvest.HarvestConfig(
        corpus="toy", split="train", num_tokens=1200, layers=(LAYER,), ctx_len=T, batch_size=16, model="tiny"),
        {LAYER: root / "train"})
    harvest.harvest(model, tokens[48:], harvest.HarvestConfig(
        corpus="toy", split="heldout", num_tokens=400, layers=(LAYER, 3), ctx_len=T, batch_size=16, model="tiny"),
        {LAYER: root / "heldout", 3: root / "heldout_L3"})
    sae_cfg = sae.SAEConfig(d_in=model.d_model, d_sae=M, k=4, aux_k=0)
    train.fit(CacheSource(root / "train"), sae_cfg, train.TrainConfig(
        lr=3e-3, warmup_steps=10, batch_size=64, num_steps=150, n_seeds=S, checkpoint_every=0, log_every=50,
        out_dir=str(root / "run")))
    (root / "run" / "summary.json").write_text(json.dumps({"ev": [0.1, 0.2, 0.3], "l0": [4, 4, 4]}))
    cfg = browse.BrowseConfig(run_dir=str(root / "run"), cache=str(root / "heldout"), out=str(root / "site"), block=16,
                              top_k=5, match_k=3, window=4)
    browse.build(cfg)
    return {"root": root, "model": model, "cfg": cfg, "site": root / "site", "sae_cfg": sae_cfg}


def _site(site):
    ov = _read_js(site / "data" / "overview.js")[0]
    blocks = {}
    for f in (site / "data").glob("s*_b*.js"):
        s, _, part = _read_js(f)
        blocks.setdefault(s, {}).update({int(i): r for i, r in part.items()})
    return ov, blocks


def _seeds(run_dir):
    return [io.load_saelens(Path(run_dir) / f"seed_{s}") for s in range(S)]


@pytest.mark.slow
def test_site_numbers_equal_numpy_brute_force(run):
    ov, blocks = _site(run["site"])
    seeds = _seeds(run["cfg"].run_dir)
    cache = run["cfg"].cache
    _, ctx_R, pos_R = analysis.cache_row_positions(cache)
    x_raw = np.concatenate([np.load(Path(cache) / s["file"]) for s in CacheSource(cache).manifest["shards"]])
    N = len(ctx_R)  # the held-out cache holds every row of its contexts, all scanned (num_tokens is larger)
    assert ov["rows"] == N == len(x_raw) and ov["seeds"] == [0, 1, 2] and ov["table_seed"] == 0
    acts_S = [_np_acts(p, norm(x_raw.astype(np.float32)), c) for p, c, norm in seeds]
    for s in range(S):  # firing frequency and mean activation of every latent
        np.testing.assert_allclose(ov["per_seed"][s]["freq"], (acts_S[s] > 0).mean(0), rtol=2e-3, atol=1.5 / N)
    # Best partner of every latent of seed 0 in each seed, and p at each τ, against loops over all pairs.
    dec = [np.asarray(p["W_dec"], np.float64) for p, _, _ in seeds]
    best = np.ones((S, S, M))
    for s in range(S):
        for s2 in range(S):
            if s != s2:
                ref_idx, best[s, s2] = _brute_partner(dec[s], dec[s2])
                if s == 0:
                    assert ov["table"]["partners"]["idx"][s2] == ref_idx
                    np.testing.assert_allclose(ov["table"]["partners"]["cos"][s2], best[s, s2], rtol=2e-3)
    for tau in (0.5, 0.7, 0.9):
        for s in range(S):
            ref_p = [sum(best[s, s2, i] >= tau for s2 in range(S) if s2 != s) / (S - 1) for i in range(M)]
            np.testing.assert_allclose(ov["per_seed"][s]["p"][str(tau)], ref_p, atol=1e-3)
    # Top contexts of every latent of seed 0: the k largest activations over all scanned rows, descending.
    assert sorted(blocks[0]) == list(range(M))
    for i in range(M):
        rec = blocks[0][i]
        ref = _distinct_top(acts_S[0][:, i], ctx_R, pos_R, 5, window=4)
        assert [(ex["c"], ex["p"]) for ex in rec["e"]] == [(c, p) for _, c, p in ref]
        np.testing.assert_allclose([ex["a"] for ex in rec["e"]], [a for a, _, _ in ref], rtol=6e-3)
        np.testing.assert_allclose(rec["x"], acts_S[0][:, i].max(), rtol=6e-3)
        assert sum(rec["h"]) == int((acts_S[0][:, i] > 0).sum())
    # The other seeds hold exactly the partners of seed 0's latents, each with match_k contexts at most.
    for s in (1, 2):
        assert sorted(blocks[s]) == sorted(set(ov["table"]["partners"]["idx"][s]))
        assert all(len(r["e"]) <= 3 for r in blocks[s].values())


@pytest.mark.slow
def test_top_context_activation_recomputed_from_the_model(run):
    """Row -> (context, position) alignment: run the model on the shown context, take the residual at the shown
    position, normalise, encode with a numpy SAE: the shown activation (and each window token's) comes back."""
    ov, blocks = _site(run["site"])
    model, tokens_CxT = run["model"], harvest.cache_contexts(run["cfg"].cache)
    assert (tokens_CxT == 0).any(), "the fixture must drop <|endoftext|> rows, else rows and positions never shift"
    seeds = _seeds(run["cfg"].run_dir)
    checked = 0
    for s, i in [(0, 0), (0, 7), (0, 33), (1, ov["table"]["partners"]["idx"][1][5]), (2, ov["table"]["partners"]["idx"][2][9])]:
        params, cfg, norm = seeds[s]
        for ex in blocks[s][i]["e"][:2]:
            c, p, m = ex["c"], ex["p"], ex["m"]
            h_T = np.asarray(model.residuals(model.params, tokens_CxT[c:c + 1], (LAYER,))[LAYER][0], np.float32)
            acts_TxM = _np_acts(params, norm(h_T), cfg)
            np.testing.assert_allclose(ex["a"], acts_TxM[p, i], rtol=1e-2, atol=1e-3)
            start = p - m
            assert ex["t"] == tokens_CxT[c, start:start + len(ex["t"])].tolist()
            for u, v in enumerate(ex["v"]):
                pos = start + u
                if pos < 4 or tokens_CxT[c, pos] == 0:
                    assert v is None
                else:
                    np.testing.assert_allclose(v, acts_TxM[pos, i], rtol=1e-2, atol=2e-2)
            checked += 1
    assert checked >= 5


def _copy_seed(run_dir, s, dest, meta=None):
    """seed_{s} of run_dir copied to dest/seed_{s}, with extra SAELens cfg.json keys."""
    shutil.copytree(Path(run_dir) / f"seed_{s}", dest / f"seed_{s}")
    if meta:
        cfg = json.loads((dest / f"seed_{s}" / io.CFG).read_text())
        (dest / f"seed_{s}" / io.CFG).write_text(json.dumps({**cfg, **meta}))


@pytest.mark.slow
def test_bad_input_one_line_and_nothing_written(run, tmp_path, capsys):
    cfg, root = run["cfg"], run["root"]
    out = tmp_path / "site"

    def build(**kw):
        return browse.build(browse.BrowseConfig(**{**vars(cfg), "out": str(out), **kw}))

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no SAE folders"):
        build(run_dir=str(tmp_path / "empty"))
    # Another layer: the SAEs say (SAELens metadata) they read blocks.2, the cache is layer 3.
    run2 = tmp_path / "run2"
    for s in range(2):
        _copy_seed(cfg.run_dir, s, run2, {"metadata": {"model_name": "tiny", "hook_name": "blocks.2.hook_resid_post"}})
    with pytest.raises(ValueError, match=r"from layer 3, the SAE of seed 0 reads layer 2"):
        build(run_dir=str(run2), cache=str(root / "heldout_L3"))
    build(run_dir=str(run2), out=str(tmp_path / "ok"))  # the same SAEs on their own layer's cache are fine
    run3 = tmp_path / "run3"
    _copy_seed(cfg.run_dir, 0, run3, {"metadata": {"model_name": "gpt2"}})
    with pytest.raises(ValueError, match="model 'tiny'.*'gpt2'"):
        build(run_dir=str(run3))
    # Another width: a cache of 16-wide rows.
    with CacheWriter(tmp_path / "narrow", {"skip_first": 4, "exclude_tokens": [0]}, 16, "float32") as w:
        w.add(np.random.default_rng(3).normal(size=(30, 16)).astype(np.float32))
    np.save(tmp_path / "narrow" / harvest.CONTEXTS, np.ones((2, 20), np.int32))
    with pytest.raises(ValueError, match="d_in=16 activations, the SAEs read d_in=128"):
        build(cache=str(tmp_path / "narrow"))
    assert not out.exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="is not a site jaxsae browse wrote"):
        build(out=str(tmp_path / "mine"))
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
    # The CLI: one line on stderr, exit code 2, nothing written.
    capsys.readouterr()
    assert cli.main(["browse", str(tmp_path / "empty"), f"cache={cfg.cache}", f"out={out}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no SAE folders" in err and str(tmp_path / "empty") in err
    assert not out.exists()
    # One seed: said in one line, and the site is still built, without stability.
    one = tmp_path / "one"
    _copy_seed(cfg.run_dir, 0, one)
    assert cli.main(["browse", str(one), f"cache={cfg.cache}", f"out={out}", "block=32"]) == 0
    said = [line for line in capsys.readouterr().out.splitlines() if "stability is undefined" in line]
    assert len(said) == 1 and "one seed" in said[0]
    ov, blocks = _site(out)
    assert ov["stability"] is None and ov["table"]["partners"] is None and ov["notes"] and sorted(blocks[0]) == list(range(M))
    # A second build replaces its own site.
    assert cli.main(["browse", str(one), f"cache={cfg.cache}", f"out={out}", "block=64"]) == 0
    assert sorted(p.name for p in (out / "data").iterdir()) == ["overview.js", "s0_b0.js", "vocab.js"]


# ---------------------------------------------------------------- the page in a real browser


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1400,1000"]


def _chromium():
    """A Selenium driver of Debian's chromium (never one a tool downloads); fails, never skips, without it."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.fail("headless Chromium is missing: apt-get install -y chromium chromium-driver (scripts/test.sh "
                    "does this as root)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is missing: pip install -e '.[test]'")
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not look for (or download) a browser
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-')}"]:
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=opts)


@pytest.mark.slow
def test_page_renders_in_headless_chromium(run):
    ov, blocks = _site(run["site"])
    tau = str(ov["stability"]["tau"])
    seed0 = ov["per_seed"][0]
    d = _chromium()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        wait = WebDriverWait(d, 20)
        rows = lambda: d.find_elements(By.CSS_SELECTOR, "#latent-table tbody tr")  # noqa: E731
        latents = lambda: [int(r.get_attribute("data-latent")) for r in rows()]  # noqa: E731
        d.get((run["site"] / "index.html").as_uri())
        wait.until(lambda _: len(rows()) > 0)
        assert latents() == list(range(M))  # one row per latent, by index
        assert len(d.find_elements(By.CSS_SELECTOR, "#overview .chart")) == 3
        # Sort by frequency (descending on the first click, ascending on the second).
        d.find_element(By.CSS_SELECTOR, "th[data-key=freq]").click()
        by_freq = sorted(range(M), key=lambda i: (-seed0["freq"][i], i))
        assert latents() == by_freq
        d.find_element(By.CSS_SELECTOR, "th[data-key=freq]").click()
        assert latents() == sorted(range(M), key=lambda i: (seed0["freq"][i], i))
        d.find_element(By.CSS_SELECTOR, "th[data-key=p]").click()
        assert latents() == sorted(range(M), key=lambda i: (-seed0["p"][tau][i], i))
        # Filter: log10 frequency from the median up; then p >= 0.5 as well.
        lf = np.log10(np.maximum(seed0["freq"], 1e-12))
        thr = round(float(np.median(lf)), 2)
        d.find_element(By.ID, "f-lfmin").send_keys(str(thr))
        want = sorted((i for i in range(M) if seed0["freq"][i] > 0 and lf[i] >= thr),
                      key=lambda i: (-seed0["p"][tau][i], i))
        assert 0 < len(want) < M and latents() == want
        d.find_element(By.ID, "f-pmin").send_keys("0.5")
        assert latents() == [i for i in want if seed0["p"][tau][i] >= 0.5 - 1e-9]
        assert d.find_element(By.ID, "count").text.startswith(f"{len(latents())} shown of {len(latents())} matching")
        d.find_element(By.ID, "f-pmin").clear()
        d.find_element(By.ID, "f-lfmin").clear()
        wait.until(lambda _: len(rows()) == M)
        # One latent's page: its top contexts and its best match in every other seed.
        i = max(range(M), key=lambda j: (len(blocks[0][j]["e"]), -j))
        d.find_element(By.CSS_SELECTOR, f"#latent-table tr[data-latent='{i}'] a").click()
        wait.until(lambda _: d.find_elements(By.CSS_SELECTOR, "#latent-body .match"))
        top = d.find_elements(By.CSS_SELECTOR, "#latent-body .card.wide .context")
        assert [float(c.get_attribute("data-act")) for c in top] == [ex["a"] for ex in blocks[0][i]["e"]]
        assert len(top) == 5
        first = blocks[0][i]["e"][0]
        assert len(top[0].find_elements(By.CSS_SELECTOR, ".tok")) == len(first["t"])
        vocab = _read_js(run["site"] / "data" / "vocab.js")[0]
        assert vocab and top[0].find_elements(By.CSS_SELECTOR, ".tok.max")[0].get_attribute("title").startswith(
            json.dumps(vocab[str(first["t"][first["m"]])], ensure_ascii=False))
        matches = d.find_elements(By.CSS_SELECTOR, "#latent-body .match")
        assert [(int(m.get_attribute("data-seed")), int(m.get_attribute("data-latent"))) for m in matches] == \
            [(0, i)] + [(s, ov["table"]["partners"]["idx"][s][i]) for s in (1, 2)]
        for m, s in zip(matches, (0, 1, 2)):
            j = int(m.get_attribute("data-latent"))
            shown = [float(c.get_attribute("data-act")) for c in m.find_elements(By.CSS_SELECTOR, ".context")]
            assert shown == [ex["a"] for ex in blocks[s][j]["e"][:3]]
        assert f"|cos| {ov['table']['partners']['cos'][1][i]:.3g}" in matches[1].text
        # Back to the table, then straight to a latent by its address.
        d.find_element(By.LINK_TEXT, "← all latents").click()
        wait.until(lambda _: len(rows()) == M)
        d.get((run["site"] / "index.html").as_uri() + "#latent=3")
        wait.until(lambda _: d.find_elements(By.CSS_SELECTOR, "#latent-page[data-latent='3'] .match"))
        logs = d.get_log("browser")
        assert not [e for e in logs if e["level"] in ("SEVERE", "WARNING")], logs
    finally:
        d.quit()

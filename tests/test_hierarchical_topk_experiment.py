"""The HierarchicalTopK experiment end to end on tiny synthetic data (no model), and its verdict rule."""
import json

import numpy as np
import pytest

from experiments import hierarchical_topk as exp


@pytest.mark.slow
def test_synthetic_run_writes_summary_report_and_plot(tmp_path):
    argv = ["synthetic=true", f"results_dir={tmp_path / 'res'}", f"out_dir={tmp_path / 'runs'}", "d_sae=16",
            "k_max=4", "ks=2,4", "n_seeds=2", "matryoshka=true", "batch_size=64", "num_steps=3", "warmup_steps=1",
            "eval_tokens=256", "synthetic_d_in=8", "synthetic_tokens=512", "dead_after_tokens=128", "convert_tokens=128"]
    assert exp.main(argv) == 0
    summary = json.loads((tmp_path / "res" / "summary.json").read_text())
    assert set(summary["results"]) == {"htopk", "topk", "topk_truncated"}
    for model, rs in summary["results"].items():
        assert set(rs) == {"2", "4"}, model
        for j, r in rs.items():
            assert r["l0"] <= int(j) and -1.0 < r["ev"] <= 1.0 and 0.0 <= r["dead_frac"] <= 1.0
            evs = [s["ev"] for s in r["per_seed"]]
            assert len(evs) == 2 and r["ev"] == pytest.approx(np.mean(evs)) and r["ev_sd"] == pytest.approx(np.std(evs, ddof=1))
    # the k_max TopK SAE is its own truncation at j = k_max
    assert summary["results"]["topk_truncated"]["4"] == summary["results"]["topk"]["4"]
    mat = summary["matryoshka"]
    assert mat["widths"] == [2, 4, 8, 16] and set(mat["prefixes"]) == {"2", "4", "8", "16"}
    l0s = [mat["prefixes"][w]["l0"] for w in ("2", "4", "8", "16")]
    assert l0s == sorted(l0s)  # a longer prefix holds every latent of a shorter one
    for w, h in mat["htopk_at_equal_l0"].items():
        assert h["j"] == min(4, max(1, round(mat["prefixes"][w]["l0"])))
    assert set(summary["train_cost"]) == {"htopk_k4", "topk_k4", "topk_k2", "matryoshka_k4"}
    report = (tmp_path / "res" / "report.md").read_text()
    assert "Verdict (EV)" in report and "equal L0" in report
    assert (tmp_path / "res" / "ev_vs_l0.png").stat().st_size > 1000


def test_match_rule_uses_the_larger_seed_range():
    a = {"ev": 0.70, "ev_min": 0.69, "ev_max": 0.71}  # range 0.02
    b = {"ev": 0.73, "ev_min": 0.70, "ev_max": 0.76}  # range 0.06: a is 0.03 worse, within it
    assert exp._matches(a, b) == (True, pytest.approx(-0.03), pytest.approx(0.06))
    b_tight = {"ev": 0.73, "ev_min": 0.725, "ev_max": 0.735}
    assert not exp._matches(a, b_tight)[0]
    assert exp._matches(b_tight, a)[0]  # better always matches
    lo = {"ce_delta": 0.5, "ce_delta_min": 0.49, "ce_delta_max": 0.51}
    hi = {"ce_delta": 0.6, "ce_delta_min": 0.59, "ce_delta_max": 0.61}
    assert exp._matches(lo, hi, "ce_delta", higher_better=False)[0] and not exp._matches(hi, lo, "ce_delta", False)[0]


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="overwrite the real results"):
        exp.main(["synthetic=true"])
    with pytest.raises(ValueError, match="contain k_max"):
        exp.HTopKExperimentConfig(ks=(8, 16), k_max=64)
    with pytest.raises(ValueError, match="strictly increasing"):
        exp.HTopKExperimentConfig(d_sae=64, matryoshka=True, mat_widths=(32, 16, 64))
    with pytest.raises(ValueError, match="n_seeds"):
        exp.HTopKExperimentConfig(n_seeds=0)

"""The HierarchicalTopK experiment end to end on tiny synthetic data (no model)."""
import json

import pytest

from experiments import hierarchical_topk as exp


@pytest.mark.slow
def test_synthetic_run_writes_summary_report_and_plot(tmp_path):
    argv = ["synthetic=true", f"results_dir={tmp_path / 'res'}", f"out_dir={tmp_path / 'runs'}", "d_sae=16",
            "k_max=4", "ks=2,4", "batch_size=64", "num_steps=3", "warmup_steps=1", "eval_tokens=256",
            "synthetic_d_in=8", "synthetic_tokens=512", "dead_after_tokens=128"]
    assert exp.main(argv) == 0
    summary = json.loads((tmp_path / "res" / "summary.json").read_text())
    assert set(summary["results"]) == {"htopk", "topk", "topk_truncated"}
    for model, rs in summary["results"].items():
        assert set(rs) == {"2", "4"}, model
        for j, r in rs.items():
            assert r["l0"] <= int(j) and -1.0 < r["ev"] <= 1.0 and 0.0 <= r["dead_frac"] <= 1.0
    # the k_max TopK SAE is its own truncation at j = k_max
    assert summary["results"]["topk_truncated"]["4"] == summary["results"]["topk"]["4"]
    assert set(summary["train_cost"]) == {"htopk_k4", "topk_k4", "topk_k2"}
    assert "holds" in (tmp_path / "res" / "report.md").read_text()
    assert (tmp_path / "res" / "ev_vs_l0.png").stat().st_size > 1000


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="overwrite the real results"):
        exp.main(["synthetic=true"])
    with pytest.raises(ValueError, match="contain k_max"):
        exp.HTopKExperimentConfig(ks=(8, 16), k_max=64)

"""Power-law fits recover known exponents; the scaling report fits each variant of a size sweep."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sffn_lab.analysis.scaling import fit_power_law


@pytest.mark.parametrize("a, b, c", [(20.0, 0.3, 1.5), (300.0, 0.5, 2.0), (5.0, 0.1, 0.8)])
def test_fit_recovers_a_known_power_law(a, b, c):
    x = np.geomspace(1e5, 1e8, 6)
    law = fit_power_law(list(x), list(c + a * x**-b))
    assert law.b == pytest.approx(b, rel=1e-4) and law.c == pytest.approx(c, rel=1e-4)
    assert law.a == pytest.approx(a, rel=1e-3)


def test_fit_with_noise_brackets_the_exponent():
    rng = np.random.default_rng(0)
    x = np.geomspace(1e5, 1e8, 8)
    y = 1.5 + 20 * x**-0.3 + rng.normal(0, 0.005, size=x.size)
    law = fit_power_law(list(x), list(y))
    assert abs(law.b - 0.3) < 4 * law.b_err and law.b_err < 0.1


def test_too_few_sizes_is_a_clear_error():
    with pytest.raises(Exception, match="at least 4"):
        fit_power_law([1e5, 1e6, 1e7], [3.0, 2.5, 2.2])


def test_scaling_report_fits_each_variant(tmp_path):
    from sffn_lab.analysis.scaling import write_scaling_report

    for kind, b in (("dense", 0.3), ("sigma_moe", 0.35)):
        for i, n in enumerate((1e5, 3e5, 1e6, 3e6)):
            run = tmp_path / f"{kind}_{i}-s0"
            run.mkdir()
            loss = 1.0 + 30 * n**-b
            (run / "metrics.csv").write_text(f"step,val/bits\n10,{loss}\n")
            (run / "config.yaml").write_text(f"model:\n  backbone: transformer\n  ffn:\n    kind: {kind}\n")
            (run / "summary.json").write_text(json.dumps({
                "unit": "byte", "val_bits": loss, "total_params": 2 * n, "active_params": n,
                "flops_per_token": 2 * n, "tokens_seen": 1000, "wall_time_s": 1.0}))
    fits = write_scaling_report(tmp_path, out=tmp_path / "report")
    assert fits["active_params"]["dense"].b == pytest.approx(0.3, rel=1e-3)
    assert fits["active_params"]["sigma_moe"].b == pytest.approx(0.35, rel=1e-3)
    assert fits["train_flops"]["dense"].b == pytest.approx(0.3, rel=1e-3)  # FLOPs ∝ n here
    assert "sigma_moe | active parameters | 4 | 0.350" in (tmp_path / "report" / "scaling.md").read_text()

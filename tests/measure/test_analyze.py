"""The attention zoo's cost analysis: FLOP counting, exponent fits, the crossover, the swap ablation."""
import json

import pytest

from edgevits.layers.attention import REGISTRY
from edgevits.measure.analyze import _crossing, analyze_attention, analyze_swaps, count_flops, fit_exponent
from edgevits.measure.plots import plot_attention

DIM = 32


def test_flop_count_includes_the_attention_products():
    mhsa = REGISTRY["mhsa"](DIM).to("meta")
    small, big = count_flops(mhsa, 64, DIM), count_flops(mhsa, 256, DIM)
    linears = 2 * 4 * DIM * DIM  # q, k, v and output projections, per token
    assert small == linears * 64 + 4 * 64 * 64 * DIM
    assert big == linears * 256 + 4 * 256 * 256 * DIM


def test_fit_exponent_and_crossing():
    assert fit_exponent([(n, 3.0 * n ** 2) for n in (10, 100, 1000)]) == pytest.approx(2.0)
    assert fit_exponent([(10, 1.0)]) is None
    assert _crossing([(10, 2.0), (100, 0.5)]) == {"tokens": 32, "status": "crossed", "between": [10, 100]}
    assert _crossing([(10, 0.5), (100, 0.4)])["status"] == "below_range"
    assert _crossing([(10, 0.5), (100, 1.5)])["status"] == "not_reached"


def test_analysis_on_a_tiny_grid_writes_json_and_png(tmp_path):
    steps = []
    result = analyze_attention(16, [16, 64, 256], ["additive", "mhsa", "separable"], target_s=0.002,
                               min_repeats=2, max_repeats=3, on_step=lambda d, t, label: steps.append((d, t)))
    assert steps[-1] == (9, 9)
    assert {r["attention"] for r in result.records} == {"additive", "mhsa", "separable"}
    assert all(r["flops"] > 0 and r["latency_ms"] > 0 and r["peak_mib"] > 0 for r in result.records)
    assert result.exponents["mhsa"]["flops"] > result.exponents["additive"]["flops"]
    assert result.crossover["flops"]["status"] in ("crossed", "below_range")
    data = json.loads(open(result.save_json(str(tmp_path / "a.json"))).read())
    assert data["dim"] == 16 and len(data["records"]) == 9 and "latency" in data["crossover"]
    png = plot_attention(result, str(tmp_path / "a.png"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_swap_analysis_reports_params_gmacs_and_latency():
    result = analyze_swaps("swiftformer_xs", ["additive", "separable"], img_size=64, target_s=0.01, min_repeats=2,
                           max_repeats=2)
    rows = {r["attention"]: r for r in result["records"]}
    assert rows["additive"]["params_m"] == pytest.approx(3.475, abs=5e-4)
    assert rows["separable"]["params_m"] < rows["additive"]["params_m"]  # no w_g, a 1 + 2C projection
    assert all(r["gmacs"] > 0 and r["latency_ms"] > 0 and r["repeats"] == 2 for r in rows.values())

"""The attention zoo's cost analysis: FLOP counting, exponent fits, the crossover, the swap ablation."""
import json

import pytest
import torch

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


class _Broken(REGISTRY["separable"]):
    """An attention whose timed calls raise (FLOP and MAC counting, outside inference mode, still work)."""

    def forward(self, x, hw=None):
        if torch.is_inference_mode_enabled():
            raise RuntimeError("simulated attention failure\nsecond line")
        return super().forward(x, hw)


@pytest.fixture
def broken(monkeypatch):
    monkeypatch.setitem(REGISTRY, "broken", _Broken)
    return "broken"


def test_an_attention_that_raises_is_reported_by_name_with_its_error_and_the_others_measured(broken):
    rng = torch.get_rng_state()
    result = analyze_attention(16, [16, 64], ["additive", broken], target_s=0.002, min_repeats=2, max_repeats=2)
    assert torch.equal(torch.get_rng_state(), rng)  # seeded weights without reseeding the caller's RNG
    rows = {(r["attention"], r["tokens"]): r for r in result.records}
    assert all(rows[("additive", n)]["latency_ms"] > 0 and rows[("additive", n)]["peak_mib"] > 0 for n in (16, 64))
    assert all(rows[(broken, n)]["latency_ms"] is None and rows[(broken, n)]["flops"] > 0 for n in (16, 64))
    assert "RuntimeError: simulated attention failure" in rows[(broken, 64)]["skipped"]
    assert [n for n in result.notes if n.startswith(broken)] == [
        "broken: latency and memory not measured since it failed at N=16: RuntimeError: simulated attention failure"]


def test_a_swapped_model_that_raises_is_reported_by_name_with_its_error(broken, tmp_path, capsys):
    from edgevits.cli import main
    rng = torch.get_rng_state()
    only = analyze_swaps("swiftformer_xs", [broken], img_size=64, target_s=0.01, min_repeats=1, max_repeats=1)
    assert torch.equal(torch.get_rng_state(), rng)
    assert only["records"] == [{"attention": broken, "params_m": only["records"][0]["params_m"],
                                "gmacs": only["records"][0]["gmacs"], "latency_ms": None, "latency_iqr_ms": None,
                                "repeats": 0, "error": "RuntimeError: simulated attention failure"}]
    path = tmp_path / "swap.json"
    assert main(["analyze", "swap", "--img-size", "64", "--attentions", f"additive,{broken}",
                 "--json", str(path)]) == 0
    assert "failed: swiftformer_xs with broken: RuntimeError: simulated attention failure" in capsys.readouterr().out
    rows = {r["attention"]: r for r in json.loads(path.read_text())["records"]}
    assert rows["additive"]["latency_ms"] > 0 and rows["additive"]["error"] is None
    assert rows[broken]["latency_ms"] is None and "simulated attention failure" in rows[broken]["error"]

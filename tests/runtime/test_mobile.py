"""Phones: ExecuTorch and LiteRT exports run by their own runtimes and compared with a float64 reference, Core ML
packages checked for their ops and features (they cannot run here), the graph form, deploy() with a mobile runtime.

Conversions cost about a second per hundred graph nodes whatever the input size (ExecuTorch's lowering of
EfficientViT-M0 takes 70 s here), so the round trips run each family's smallest variant cut to one block per stage
(SHALLOW: every block kind is still there, attention included), converted once per worker and format, at 96 px.
benchmarks/export_formats.py exports the full variants, all 17."""
import copy
import functools
import tempfile
from pathlib import Path

import pytest
import torch

import edgevits
from edgevits.errors import ExportError, InputError
from edgevits.runtime.export import export, graph_form
from edgevits.testing import assert_parity, calibrated, float64_reference

pytest.importorskip("executorch")
pytest.importorskip("litert_torch")
pytest.importorskip("coremltools")

SIZE = 96
FAMILIES = ["efficientformer_l1", "efficientformerv2_s0", "efficientvit_m0", "swiftformer_xs"]


def per_family(fn):
    return pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xdist_group(f"export-{n}"))
                                            for n in FAMILIES])(fn)


@functools.cache
def _workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="edgevits-test-mobile-"))


# one block per stage (V2: one conv and one attention block in stages 3 and 4), randomised calibrated weights
SHALLOW = {"efficientformer_l1": dict(depths=(1, 1, 1, 1), num_vit=1),
           "efficientformerv2_s0": dict(depths=(1, 1, 2, 2), mlp_ratios=((4,), (4,), (4, 4), (4, 4)), vit_num=1),
           "efficientvit_m0": dict(depths=(1, 1, 1)),
           "swiftformer_xs": dict(depths=(1, 1, 1, 1))}


@functools.cache
def _shallow(name: str):
    return calibrated(edgevits.create_model(name, img_size=SIZE, **SHALLOW[name]), batches=1, batch_size=4, size=SIZE)


@functools.cache
def _exported(name: str, fmt: str):
    """The export's own result (it checked itself against PyTorch at batch 1)."""
    suffix = {"executorch": ".pte", "litert": ".tflite", "coreml": ".mlpackage"}[fmt]
    return export(_shallow(name), _workdir() / f"{name}{suffix}", format=fmt)


def _x(b=1, seed=0):
    return torch.randn(b, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


# ExecuTorch on every family; LiteRT (slower to convert: a spawned converter, 30-40 s for V2 and EfficientViT) on
# V1 and SwiftFormer here and through deploy() below; benchmarks/export_formats.py runs both on all 17 variants
@pytest.mark.parametrize("fmt,name", [
    pytest.param(fmt, n, marks=pytest.mark.xdist_group(f"export-{n}"))
    for fmt, names in (("executorch", FAMILIES), ("litert", ["efficientformer_l1", "swiftformer_xs"])) for n in names])
def test_mobile_runtime_runs_the_export_with_the_models_outputs(name, fmt):
    from edgevits.runtime.mobile import executorch_runner, litert_runner
    model = _shallow(name)
    assert any(type(m).__name__.endswith(("Attention", "Attention4D", "MHSA")) for m in model.modules())
    run = (executorch_runner if fmt == "executorch" else litert_runner)(_exported(name, fmt))
    x = _x()
    with torch.no_grad():
        ref = model(x)
    out = torch.as_tensor(run(x))
    assert out.shape == ref.shape == (1, model.num_classes)
    assert_parity(out, ref, float64_reference(model, x), check_dependence=False)
    assert not torch.equal(torch.as_tensor(run(_x(seed=1))), out), "the output must depend on the input"


@per_family
def test_coreml_package_has_only_listed_ops_and_documented_features(name):
    from edgevits.runtime.mobile import COREML_OPS, check_coreml
    path, report = _exported(name, "coreml")
    assert path.suffix == ".mlpackage" and (path / "Manifest.json").is_file()
    assert report["input"] == "x" and report["input_shape"] == [1, 3, SIZE, SIZE]
    assert report["precision"] == "float16" and report["target"] == "iOS16" and report["form"] == "graph"
    assert "not verified" in report["numerical_parity"]
    assert set(report["ops"]) <= set(COREML_OPS) and report["ops"].get("conv", 0) > 0
    # the graph form leaves no index arithmetic for the bias tables in the program
    assert "gather" not in report["ops"] and "gather_nd" not in report["ops"]
    with pytest.raises(ExportError, match="features"):
        check_coreml(path, "iOS16", (1, 3, SIZE, SIZE), image_input=True)


@pytest.mark.xdist_group("export-swiftformer_xs")
def test_coreml_refuses_an_op_outside_the_list_and_takes_images(monkeypatch, tmp_path):
    from edgevits.runtime import mobile
    path, report = _exported("swiftformer_xs", "coreml")
    monkeypatch.setattr(mobile, "COREML_OPS", {k: v for k, v in mobile.COREML_OPS.items() if k != "conv"})
    with pytest.raises(ExportError, match="outside edgevits' list for iOS16: conv"):
        mobile.check_coreml(path, "iOS16", (1, 3, SIZE, SIZE), image_input=False)
    monkeypatch.undo()
    path, report = mobile.export_coreml(_shallow("swiftformer_xs"), tmp_path / "img", image_input=True,
                                        precision="float32", target="iOS17")
    assert path == tmp_path / "img.mlpackage"
    assert report["input"] == "image" and report["precision"] == "float32" and report["target"] == "iOS17"
    assert not list(tmp_path.glob(".*")), "no staging folder is left behind"


@pytest.mark.parametrize("name", FAMILIES)
def test_graph_form_holds_constants_and_plain_ops_and_equals_the_eval_form(name):
    from edgevits.layers.bias import RelPosBias, RelPosBiasFrozen
    model = edgevits.create_model(name, img_size=64).eval()
    with torch.no_grad():
        for p in model.parameters():  # non-zero bias tables, so that a wrong gather would show
            p.add_(0.02 * torch.randn_like(p))
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    model = model.double()
    graph = graph_form(model, "graph", x, target="executorch")
    has_tables = name != "swiftformer_xs"
    assert not any(isinstance(m, RelPosBias) for m in graph.modules())
    assert any(isinstance(m, RelPosBiasFrozen) for m in graph.modules()) == has_tables
    assert any(isinstance(m, RelPosBias) for m in model.modules()) == has_tables, "the source is left as it was"
    with torch.no_grad():
        torch.testing.assert_close(graph(x), model(x), rtol=1e-12, atol=1e-12)
        other = torch.randn(1, 3, 32, 32, dtype=torch.float64)
        if not has_tables or name.startswith("efficientvit"):  # EfficientViT pads to its fixed windows
            torch.testing.assert_close(graph(other), model(other), rtol=1e-12, atol=1e-12)
        else:
            with pytest.raises(InputError, match="input size"):
                graph(other)
    program = torch.export.export(graph.float(), (x[:1].float(),))
    calls = [n for n in program.graph.nodes if n.op == "call_function"]
    targets = {str(n.target) for n in calls}
    # what ExecuTorch's XNNPACK delegate leaves out (each one cut the graph into one more partition): index
    # arithmetic for the bias tables, LayerNorm, F.normalize's norm, split/select, and batched matmuls (which
    # decompose with an expand; torch.bmm does not)
    assert not any("arange" in t or "index.Tensor" in t for t in targets), "bias gathered inside the graph"
    left_out = ("layer_norm", "vector_norm", "aten.norm", "pow", "sum", "split", "select")
    assert not [t for t in targets if any(op in t for op in left_out)]
    assert not [n for n in calls if "matmul" in str(n.target) and min(a.meta["val"].dim() for a in n.args[:2]) > 2]


@pytest.mark.xdist_group("export-swiftformer_xs")
def test_deploy_can_choose_litert_and_falls_back_at_another_batch():
    model = copy.deepcopy(_shallow("swiftformer_xs"))
    runner = edgevits.deploy(model, backend="litert", img_size=SIZE, repeats=3)
    assert runner.backend == "litert"
    with torch.no_grad():
        for b in (1, 2):  # batch 2: the fixed-batch graph is bypassed for the deploy form
            x = _x(b)
            assert_parity(runner(x), model(x), float64_reference(model, x), check_dependence=b > 1)


def test_missing_converter_is_one_line_naming_the_extra(monkeypatch, tmp_path):
    import importlib.util

    from edgevits.errors import BackendUnavailable
    from edgevits.runtime import mobile
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "litert_torch" else real(name, *a))
    with pytest.raises(BackendUnavailable, match=r"edgevits\[mobile\]") as e:
        mobile.export_litert(edgevits.create_model("efficientvit_m0", img_size=64), tmp_path / "m.tflite")
    assert "\n" not in str(e.value) and not list(tmp_path.iterdir())


@pytest.mark.parametrize("fmt", ["executorch", "coreml"])
def test_the_deploy_form_is_refused_before_any_conversion_where_it_cannot_lower(fmt, tmp_path):
    model = edgevits.create_model("efficientvit_m0", img_size=64)
    with pytest.raises(ExportError, match="deploy form") as e:
        export(model, tmp_path / "m", format=fmt, form="deploy")
    assert "\n" not in str(e.value) and not list(tmp_path.iterdir())

"""Gated (SwiGLU) GEMMs: ``silu(x·W₁ᵀ) · (x·W₂ᵀ)`` in one kernel, and the layers that use it."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing

from engine import fusion
from engine.int8 import kernels, ops
from engine.int8.apply import quantize_model
from engine.int8 import linear
from engine.int8.linear import Int8Linear
from engine.int8.quantize import quantize_weight
from engine.models import REGISTRY
from tests.int8_reference import (
    BACKENDS,
    DEVICES,
    NEEDS_INTERPRETER,
    ULP,
    exact_scaled_mm,
)
from tests.test_kernels import configs_for


def make_weight(n, k, scheme, with_bias, dtype, device) -> ops.Int8Weight:
    w_int8, w_scale = quantize_weight(torch.randn(n, k) * torch.rand(n, 1), scheme)
    bias = torch.randn(n, dtype=dtype, device=device) if with_bias else None
    return ops.Int8Weight(w_int8.to(device), w_scale.to(device), bias)


def assert_swiglu_of(out, a, g, config=None) -> None:
    """``out`` is ``silu(a) · g`` of the exact products a and g (float64), each rounded to out's dtype
    first: within one ulp of each rounding (the interpreter truncates its casts), spread by silu. An ulp
    is relative down to the smallest normal number and then the subnormals' fixed spacing ``tiny``
    (float16: 2⁻²⁴; a value of 2e-6 then rounds by up to 3%)."""
    u, finfo = ULP[out.dtype], torch.finfo(out.dtype)
    tiny = finfo.tiny * finfo.eps
    want = torch.nn.functional.silu(a) * g
    relative = u * (1.1 * (a * g).abs() + 2 * want.abs())
    bound = (relative + tiny * (1.1 * g.abs() + torch.nn.functional.silu(a).abs() + 1)) * (1 + 1e-3) + 1e-30
    assert out.shape == want.shape and torch.isfinite(out).all()
    err = (out.double().cpu() - want.cpu()).abs()
    assert (err <= bound.cpu()).all(), f"error {(err / bound.cpu()).max():.2f}× the rounding bound, {config}"


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # numpy, in the interpreter
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 17])
@pytest.mark.parametrize("n, k", [(70, 256), (40, 272)])
@pytest.mark.parametrize("scheme, with_bias", [("tensorwise", True), ("rowwise", False)])
@pytest.mark.parametrize("layout", ["apart", "stacked", "gate first", "misaligned"])  # of the two weights
def test_gated_scaled_mm_against_float64(device, dtype, m, n, k, scheme, with_bias, layout):
    x = torch.randn(m, k, dtype=dtype, device=device)
    first, second = (make_weight(n, k, scheme, with_bias, dtype, device) for _ in range(2))
    first, second = laid_out(first, second, layout)
    q, x_scale = kernels.quantize_rows(x)
    a, g = (exact_scaled_mm(q, x_scale, w.w_int8, w.w_scale, w.bias) for w in (first, second))
    gate = kernels.Gate(second.w_int8, second.w_scale.reshape(-1), second.bias)
    for config in configs_for(device):
        out = kernels.scaled_mm(
            q, x_scale, first.w_int8, first.w_scale.reshape(-1), first.bias, dtype,
            config=kernels.gated_config(config), gate=gate,
        )
        assert out.dtype == dtype, config
        assert_swiglu_of(out, a.to(dtype).double(), g.to(dtype).double(), config)


@NEEDS_INTERPRETER
def test_only_tma_loads_of_weights_16_bytes_apart_are_stacked(monkeypatch):
    q, x_scale = kernels.quantize_rows(torch.randn(5, 64, dtype=torch.bfloat16))
    weights = [make_weight(40, 64, "rowwise", False, torch.bfloat16, "cpu") for _ in range(2)]
    seen = []
    launch = kernels.launch

    def recorded(kernel, grid, *args, **named):
        seen.append((named["STACKED"], named["GATE_AFTER"]))
        launch(kernel, grid, *args, **named)

    monkeypatch.setattr(kernels, "launch", recorded)
    for layout in ("stacked", "gate first", "misaligned"):
        first, second = laid_out(*weights, layout)
        for config in (kernels.TileConfig(16, 16, 64, 4, 2, tma=True), kernels.TileConfig(16, 16, 64, 4, 2)):
            gate = kernels.Gate(second.w_int8, second.w_scale.reshape(-1))
            kernels.scaled_mm(q, x_scale, first.w_int8, first.w_scale.reshape(-1), None, torch.bfloat16, config, gate=gate)
    assert seen == [(True, True), (False, True), (True, False), (False, True), (False, True), (False, True)]


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["apart", "stacked", "gate first", "misaligned"])
def test_gated_scaled_mm_with_several_tiles_per_program(layout):
    x = torch.randn(2000, 512, dtype=torch.bfloat16, device="cuda")
    first, second = (make_weight(1100, 512, "rowwise", False, torch.bfloat16, "cuda") for _ in range(2))
    first, second = laid_out(first, second, layout)
    q, x_scale = kernels.quantize_rows(x)
    a, g = (exact_scaled_mm(q, x_scale, w.w_int8, w.w_scale).to(torch.bfloat16).double() for w in (first, second))
    gate = kernels.Gate(second.w_int8, second.w_scale.reshape(-1))
    for config in configs_for("cuda"):
        out = kernels.scaled_mm(q, x_scale, first.w_int8, first.w_scale.reshape(-1), None, torch.bfloat16,
                                config=kernels.gated_config(config), gate=gate)
        assert_swiglu_of(out, a, g, config)


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("first_scheme, second_scheme, biases", [
    ("rowwise", "rowwise", (True, True)),
    ("tensorwise", "rowwise", (False, True)),  # mixed kinds: a scale widened, a missing bias as zeros
    ("rowwise", "tensorwise", (True, False)),
])
def test_gated_int8_linear_is_silu_of_one_layer_times_the_other(backend, device, first_scheme, second_scheme, biases):
    n, k, dtype = 48, 136, torch.bfloat16
    first = make_weight(n, k, first_scheme, biases[0], dtype, device)
    second = make_weight(n, k, second_scheme, biases[1], dtype, device)
    x = torch.randn(3, 11, k, dtype=dtype, device=device)
    with ops.use_backend(backend):
        out = ops.int8_linear(x, *first, gate=second)
        a, g = (ops.int8_linear(x, *w) for w in (first, second))
    assert out.shape == (3, 11, n) and out.dtype == dtype
    # the same int8 products as two separate layers, whose outputs are rounded the same way
    want = (torch.nn.functional.silu(a.float()) * g.float()).to(dtype)
    torch.testing.assert_close(out, want, rtol=ULP[dtype], atol=1e-6)


@pytest.mark.parametrize("backend", ["int_mm", pytest.param("triton", marks=NEEDS_INTERPRETER)])
def test_backends_agree_on_the_gated_product(backend):
    first, second = (make_weight(40, 256, "rowwise", True, torch.float32, "cpu") for _ in range(2))
    x = torch.randn(9, 256)
    with ops.use_backend("torch"):
        expected = ops.int8_linear(x, *first, gate=second)
    with ops.use_backend(backend):
        torch.testing.assert_close(ops.int8_linear(x, *first, gate=second), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=NEEDS_INTERPRETER)])
def test_a_quantized_input_serves_several_layers(backend):
    first, second = (make_weight(24, 64, "rowwise", False, torch.bfloat16, "cpu") for _ in range(2))
    normed = fusion.NormedInput(torch.randn(2, 5, 64, dtype=torch.bfloat16), "rms", 1e-6, scale=torch.rand(2, 1, 64) - 0.5)
    with ops.use_backend(backend):
        rows = ops.quantize_input(normed)
        assert rows.q.shape == (10, 64) and rows.lead == (2, 5) and rows.dtype == torch.bfloat16
        assert torch.equal(ops.int8_linear(rows, *first), ops.int8_linear(normed, *first))
        assert torch.equal(ops.int8_linear(rows, *first, gate=second), ops.int8_linear(normed, *first, gate=second))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"gate": ops.Int8Weight(torch.ones(8, 8, dtype=torch.int8), torch.ones(()))},
         r"the gate's weight must have the weight's shape \(8, 16\), got \(8, 8\)"),
        ({"gate": ops.Int8Weight(torch.ones(8, 16, dtype=torch.int8), torch.ones(3))},
         r"w_scale must be a float tensor of shape \[\], \[1\], \[8\] or \[8, 1\], got \(3,\)"),
        ({"gate": ops.Int8Weight(torch.ones(8, 16, dtype=torch.int8), torch.ones(()), torch.ones(9))},
         r"bias must have shape \[8\], got \(9,\)"),
        ({"gate": ops.Int8Weight(torch.ones(8, 16, dtype=torch.int8), torch.ones(())),
          "lora": ops.LoraFactors(torch.ones(2, 16), torch.ones(8, 2), torch.ones(2))},
         "a gated int8_linear takes no LoRA term"),
        ({"x": ops.QuantizedInput(torch.ones(2, 16, dtype=torch.int8), torch.ones(2), (2,), torch.float32), "rotation": 16},
         "a quantized input takes no LoRA term, and the rotation it was quantized with"),
    ],
)
def test_bad_gated_inputs_are_refused(change, message):
    args = {"x": torch.randn(2, 16), "w_int8": torch.ones(8, 16, dtype=torch.int8), "w_scale": torch.ones(8, 1)}
    with pytest.raises(ValueError, match=message):
        ops.int8_linear(**(args | change))


def test_the_kernel_launch_refuses_what_a_gated_gemm_cannot_take():
    q, x_scale = torch.zeros(4, 64, dtype=torch.int8), torch.ones(4)
    w, out = torch.zeros(32, 64, dtype=torch.int8), torch.empty(4, 32)
    config = kernels.TileConfig(16, 32, 64, 4, 2)
    specialized = kernels.TileConfig(16, 32, 64, 4, 2, tma=True, persistent=True, warp_specialize=True)
    cases = [
        (config, kernels.Gate(w, torch.ones(32)), None, "the same kinds of scale and bias"),  # 32 scales against 1
        (config, kernels.Gate(w, torch.ones(1), torch.zeros(32)), None, "the same kinds of scale and bias"),
        (config, kernels.Gate(w, torch.ones(1)), kernels.LowRank(torch.ones(4, 2), torch.ones(32, 2), torch.ones(2)),
         "takes no low-rank term"),
        (specialized, kernels.Gate(w, torch.ones(1)), None, "not warp-specialized"),
    ]
    for tile, gate, lora, message in cases:
        with pytest.raises(ValueError, match=message):
            kernels.launch_scaled_mm(tile, q, x_scale, w, torch.ones(1), None, out, lora=lora, gate=gate)


def test_opcheck_of_the_gated_op():
    first, second = (make_weight(24, 40, "rowwise", True, torch.float32, "cpu") for _ in range(2))
    q, x_scale = ops.quantize_rows_torch(torch.randn(5, 40))
    args = (q, x_scale, first.w_int8, first.w_scale, first.bias, torch.bfloat16, None, None, None, *second)
    torch.library.opcheck(ops.scaled_mm, args)


def test_reference_rows_of_a_gated_gemm():
    m, n, k = 30, 50, 200
    q = torch.randint(-127, 128, (m, k), dtype=torch.int8)
    x_scale = torch.rand(m) / 100
    first, second = (make_weight(n, k, "rowwise", True, torch.bfloat16, "cpu") for _ in range(2))
    rows = torch.tensor([0, 11, 29])
    gate = kernels.Gate(second.w_int8, second.w_scale.reshape(-1), second.bias)
    got = kernels.reference_rows(rows, q, x_scale, first.w_int8, first.w_scale.reshape(-1), first.bias, gate=gate,
                                 dtype=torch.bfloat16)
    a, g = (exact_scaled_mm(q, x_scale, w.w_int8, w.w_scale, w.bias)[rows].to(torch.bfloat16).double() for w in (first, second))
    torch.testing.assert_close(got.double(), torch.nn.functional.silu(a) * g, rtol=1e-6, atol=1e-6)


def test_gated_configs_halve_the_tile_width_and_have_their_own_tuning_key():
    config = kernels.TileConfig(128, 256, 128, 8, 4, tma=True, persistent=True)
    assert kernels.gated_config(config) == kernels.TileConfig(128, 128, 128, 8, 4, tma=True, persistent=True)
    assert kernels.gated_config(kernels.TileConfig(16, 16, 64, 4, 2)).block_n == 16
    specialized = kernels.TileConfig(128, 128, 128, 4, 4, tma=True, persistent=True, warp_specialize=True)
    assert not kernels.gated_config(specialized).warp_specialize  # computed wrong values (gated_config)
    keys = {kernels.GemmTuner._key(4608, 12288, 4096, 2, 0, gated) for gated in ("", "glu", "glu-stacked")}
    assert keys == {"8192,12288,4096", "8192,12288,4096,glu", "8192,12288,4096,glu-stacked"}


def test_halves_are_stacked_where_one_descriptor_describes_both(monkeypatch):
    w = torch.zeros(2 * 24 + 1, 32, dtype=torch.int8)
    one, other = w[:24], w[24:48]
    assert kernels.stacked_halves(one, other) and kernels.epilogue_kind(one, kernels.Gate(other, torch.ones(1))) == "glu-stacked"
    assert kernels.stacked_halves(other, one)  # the gate's rows before the weight's
    assert kernels.stacked_halves(one, w[25:49])  # a row (32 bytes) apart
    assert not kernels.stacked_halves(one, w[1:25])  # overlapping
    assert kernels.stacked_halves(w[:24, :16], w[24:48, :16])  # column slices: rows keep their stride
    assert not kernels.stacked_halves(one, w[24:47])  # another shape
    assert not kernels.stacked_halves(one, w.view(-1)[8 + 24 * 32 :][: 24 * 32].view(24, 32))  # 8 bytes off
    assert kernels.stacked_halves(one, torch.zeros(24, 32, dtype=torch.int8))  # two tensors (64-byte aligned)
    assert kernels.epilogue_kind(one, kernels.Gate(torch.zeros(24, 32, dtype=torch.int16), torch.ones(1))) == "glu"
    assert kernels.epilogue_kind(one, None) == ""
    monkeypatch.setattr(kernels, "TMA_MAX_STRIDE", 24 * 32 + 16)  # w[25:49] as if it lay a terabyte away
    assert kernels.stacked_halves(one, other) and not kernels.stacked_halves(one, w[25:49])


def laid_out(first: ops.Int8Weight, second: ops.Int8Weight, layout: str) -> tuple[ops.Int8Weight, ops.Int8Weight]:
    """The two weights as separate tensors (``"apart"``), as the halves of one fused in-projection's
    weight (rows of one tensor, ``"stacked"``), those halves the other way round (``"gate first"``), or
    in one tensor 8 bytes off a 16-byte distance (``"misaligned"``: never one descriptor)."""
    n, k = first.w_int8.shape
    if layout == "apart":
        return first, second
    if layout == "misaligned":
        w = torch.empty(2 * n * k + 8, dtype=torch.int8, device=first.w_int8.device)
        w[: n * k], w[n * k + 8 :] = first.w_int8.flatten(), second.w_int8.flatten()
        return first._replace(w_int8=w[: n * k].view(n, k)), second._replace(w_int8=w[n * k + 8 :].view(n, k))
    w = torch.cat([first.w_int8, second.w_int8] if layout == "stacked" else [second.w_int8, first.w_int8])
    halves = (w[:n], w[n:]) if layout == "stacked" else (w[n:], w[:n])
    return first._replace(w_int8=halves[0]), second._replace(w_int8=halves[1])


@NEEDS_INTERPRETER
def test_the_interpreter_runs_a_gated_gemm_in_the_gated_tile(monkeypatch):
    """Without a config, the interpreter takes the default tile made gated (half as wide), as the
    tuner's candidates are on a GPU."""
    launched = []
    launch = kernels.launch_scaled_mm

    def recorded(config, *args, **kwargs):
        launched.append(config)
        launch(config, *args, **kwargs)

    monkeypatch.setattr(kernels, "launch_scaled_mm", recorded)
    q, x_scale = kernels.quantize_rows(torch.randn(5, 64, dtype=torch.bfloat16))
    first, second = (make_weight(40, 64, "rowwise", False, torch.bfloat16, "cpu") for _ in range(2))
    gate = kernels.Gate(second.w_int8, second.w_scale.reshape(-1))
    out = kernels.scaled_mm(q, x_scale, first.w_int8, first.w_scale.reshape(-1), None, torch.bfloat16, gate=gate)
    assert launched == [kernels.gated_config(kernels.candidate_configs("sm80", 5)[0])]
    a, g = (exact_scaled_mm(q, x_scale, w.w_int8, w.w_scale) for w in (first, second))
    assert_swiglu_of(out, a.to(torch.bfloat16).double(), g.to(torch.bfloat16).double())


@pytest.mark.gpu
def test_compiled_gated_layer_matches_eager():
    first, second = (make_weight(256, 128, "rowwise", False, torch.bfloat16, "cuda") for _ in range(2))

    def gated(x):
        return ops.int8_linear(x, *first, gate=second)

    compiled = torch.compile(gated, fullgraph=True, dynamic=True)
    for tokens in (40, 77):
        x = torch.randn(2, tokens, 128, dtype=torch.bfloat16, device="cuda")
        out, want = compiled(x).double(), gated(x).double()
        # inductor's quantization may round a row's scale 1 ulp differently (ops module docstring), and
        # then an activation by one int8 step
        assert out.shape == want.shape and (out - want).norm() / want.norm() < 1e-2


def test_compiled_gated_layer_has_no_graph_breaks():
    first, second = (make_weight(48, 64, "rowwise", False, torch.bfloat16, "cpu") for _ in range(2))
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(lambda x: ops.int8_linear(x, *first, gate=second))(
        torch.randn(2, 8, 64, dtype=torch.bfloat16)
    )
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    assert "int8_studio.scaled_mm" in explanation.graphs[0].code


def test_int8_weight_slices_are_views_of_a_plain_int8_layer():
    layer = Int8Linear.from_float(torch.nn.Linear(32, 12))
    rows = layer.int8_weight(4, 10)
    assert torch.equal(rows.w_int8, layer.weight[4:10]) and rows.w_int8.data_ptr() == layer.weight[4:].data_ptr()
    assert torch.equal(rows.w_scale, layer.weight_scale[4:10]) and torch.equal(rows.bias, layer.bias[4:10])
    tensorwise = Int8Linear.from_float(torch.nn.Linear(32, 12, bias=False), "tensorwise")
    assert tensorwise.int8_weight().w_scale.ndim == 0 and tensorwise.int8_weight().bias is None
    layer.use_float = True
    assert layer.int8_weight() is None
    assert Int8Linear.from_float(torch.nn.Linear(32, 12), rotation=16).int8_weight() is None


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=NEEDS_INTERPRETER)])
@pytest.mark.parametrize("arch_name, gated_layers", [("flux2", 2 * 2 + 3), ("zimage", 3)])  # Z-Image: refiners stay bf16
def test_models_run_their_swiglu_mlps_as_gated_gemms(arch_name, gated_layers, backend, monkeypatch):
    """Flux.2's MLP in-projections and linear1, Z-Image's w1/w3: one gated GEMM each, with the output of
    the separate layers (float32: the two paths differ only where an int8 rounding flips)."""
    arch = REGISTRY[arch_name]
    torch.manual_seed(0)
    model = arch.build_module(arch.tiny["tiny"])
    quantize_model(model, arch, "rowwise", "none")
    inputs = model.random_inputs(1, 64)
    gated = []

    def counting(x, *args, gate=None, **kwargs):
        gated.append(gate is not None)
        return ops.int8_linear(x, *args, gate=gate, **kwargs)

    with torch.no_grad(), ops.use_backend(backend):
        monkeypatch.setattr(linear, "int8_linear", counting)
        fused = model(**inputs).double()
        monkeypatch.setattr(Int8Linear, "fused_in_projection", lambda *args: None)
        monkeypatch.setattr(Int8Linear, "fused_swiglu", lambda *args: None)
        separate = model(**inputs).double()
    assert sum(gated) == gated_layers
    assert (fused - separate).norm() / separate.norm() < 1e-3

"""Gated (SwiGLU) GEMMs: ``silu(x·W_gateᵀ) · (x·W_upᵀ)`` in one kernel, and the layers that use it."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing

from engine import fusion
from engine.int8 import kernels, linear, ops
from engine.int8.apply import quantize_model
from engine.int8.kernels import entry, launcher, tiles
from engine.int8.linear import Int8Linear
from engine.int8.operands import Epilogue, Int8Weight, LowRank
from engine.int8.quantize import quantize_weight
from engine.lora.dynamic import DynamicLoras, Factors
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


def kernel_up(up: ops.Int8Weight) -> Int8Weight:
    """The up weight as the kernel takes it: its scale flattened."""
    return Int8Weight(up.w_int8, up.w_scale.reshape(-1), up.bias)


def assert_swiglu_of(out, gate, up, config=None) -> None:
    """``out`` is ``silu(gate) · up`` of the exact products gate and up (float64), each rounded to out's
    dtype first: within one ulp of each rounding (the interpreter truncates its casts), spread by silu.
    An ulp is relative down to the smallest normal number and then the subnormals' fixed spacing ``tiny``
    (float16: 2⁻²⁴; a value of 2e-6 then rounds by up to 3%)."""
    u, finfo = ULP[out.dtype], torch.finfo(out.dtype)
    tiny = finfo.tiny * finfo.eps
    want = torch.nn.functional.silu(gate) * up
    relative = u * (1.1 * (gate * up).abs() + 2 * want.abs())
    bound = (relative + tiny * (1.1 * up.abs() + torch.nn.functional.silu(gate).abs() + 1)) * (1 + 1e-3) + 1e-30
    assert out.shape == want.shape and torch.isfinite(out).all()
    err = (out.double().cpu() - want.cpu()).abs()
    assert (err <= bound.cpu()).all(), f"error {(err / bound.cpu()).max():.2f}× the rounding bound, {config}"


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # numpy, in the interpreter
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 17])
@pytest.mark.parametrize("n, k", [(70, 256), (40, 272)])
@pytest.mark.parametrize("scheme, with_bias", [("tensorwise", True), ("rowwise", False)])
@pytest.mark.parametrize("layout", ["apart", "stacked", "up first", "misaligned"])  # of the two weights
def test_gated_scaled_mm_against_float64(device, dtype, m, n, k, scheme, with_bias, layout):
    x = torch.randn(m, k, dtype=dtype, device=device)
    gate, up = (make_weight(n, k, scheme, with_bias, dtype, device) for _ in range(2))
    gate, up = laid_out(gate, up, layout)
    q, x_scale = kernels.quantize_tokens(x)
    a, u = (exact_scaled_mm(q, x_scale, w.w_int8, w.w_scale, w.bias) for w in (gate, up))
    epilogue = Epilogue(gate.bias, up=kernel_up(up))
    for config in configs_for(device):
        out = kernels.scaled_mm(
            q, x_scale, gate.w_int8, gate.w_scale.reshape(-1), dtype, epilogue, config=kernels.gated_config(config)
        )
        assert out.dtype == dtype, config
        assert_swiglu_of(out, a.to(dtype).double(), u.to(dtype).double(), config)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("terms", ["gate", "up", "both", "shared"])  # shared: one x·downᵀ, one layer's halves
def test_gated_scaled_mm_with_low_rank_terms_against_float64(device, dtype, terms):
    m, n, k, rank = 17, 70, 256, 5
    x = torch.randn(m, k, dtype=dtype, device=device)
    gate, up = (make_weight(n, k, "rowwise", True, dtype, device) for _ in range(2))
    q, x_scale = kernels.quantize_tokens(x)

    def term():  # factors whose products are exact in float32, so that only the outputs round
        return LowRank(torch.randn(m, rank, device=device).to(dtype), torch.randn(n, rank, device=device).to(dtype),
                       2.0 ** torch.randint(-3, 0, (rank,), device=device).float())  # fmt: skip

    lora = term() if terms != "up" else None
    up_lora = {"gate": None, "shared": lora and LowRank(lora.x, term().up, lora.scale)}.get(terms, term())
    a, u = (exact_scaled_mm(q, x_scale, w.w_int8, w.w_scale, w.bias) for w in (gate, up))
    for product, t in ((a, lora), (u, up_lora)):
        if t is not None:
            product += (t.x.double() * t.scale.double()) @ t.up.double().T
    epilogue = Epilogue(gate.bias, lora, kernel_up(up), up_lora=up_lora)
    for config in configs_for(device):
        out = kernels.scaled_mm(
            q, x_scale, gate.w_int8, gate.w_scale.reshape(-1), dtype, epilogue, config=kernels.gated_config(config)
        )
        assert_swiglu_of(out, a.to(dtype).double(), u.to(dtype).double(), config)
    assert kernels.epilogue_key(gate.w_int8, epilogue).startswith(f",lora{x.element_size()},glu")


@NEEDS_INTERPRETER
def test_only_tma_loads_of_weights_16_bytes_apart_are_stacked(monkeypatch):
    q, x_scale = kernels.quantize_tokens(torch.randn(5, 64, dtype=torch.bfloat16))
    weights = [make_weight(40, 64, "rowwise", False, torch.bfloat16, "cpu") for _ in range(2)]
    seen = []
    launch = launcher.launch

    def recorded(kernel, grid, *args, **named):
        seen.append((named["STACKED"], named["UP_AFTER"]))
        launch(kernel, grid, *args, **named)

    monkeypatch.setattr(launcher, "launch", recorded)
    for layout in ("stacked", "up first", "misaligned"):
        gate, up = laid_out(*weights, layout)
        for config in (kernels.TileConfig(16, 16, 64, 4, 2, tma=True), kernels.TileConfig(16, 16, 64, 4, 2)):
            epilogue = Epilogue(up=kernel_up(up))
            kernels.scaled_mm(q, x_scale, gate.w_int8, gate.w_scale.reshape(-1), torch.bfloat16, epilogue, config)
    assert seen == [(True, True), (False, True), (True, False), (False, True), (False, True), (False, True)]


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["apart", "stacked", "up first", "misaligned"])
def test_gated_scaled_mm_with_several_tiles_per_program(layout):
    x = torch.randn(2000, 512, dtype=torch.bfloat16, device="cuda")
    gate, up = (make_weight(1100, 512, "rowwise", False, torch.bfloat16, "cuda") for _ in range(2))
    gate, up = laid_out(gate, up, layout)
    q, x_scale = kernels.quantize_tokens(x)
    a, u = (exact_scaled_mm(q, x_scale, w.w_int8, w.w_scale).to(torch.bfloat16).double() for w in (gate, up))
    for config in configs_for("cuda"):
        out = kernels.scaled_mm(q, x_scale, gate.w_int8, gate.w_scale.reshape(-1), torch.bfloat16,
                                Epilogue(up=kernel_up(up)), config=kernels.gated_config(config))
        assert_swiglu_of(out, a, u, config)


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("gate_scheme, up_scheme, biases", [
    ("rowwise", "rowwise", (True, True)),
    ("tensorwise", "rowwise", (False, True)),  # mixed kinds: a scale widened, a missing bias as zeros
    ("rowwise", "tensorwise", (True, False)),
])
def test_int8_swiglu_is_silu_of_the_gate_layer_times_the_up_layer(backend, device, gate_scheme, up_scheme, biases):
    n, k, dtype = 48, 136, torch.bfloat16
    gate = make_weight(n, k, gate_scheme, biases[0], dtype, device)
    up = make_weight(n, k, up_scheme, biases[1], dtype, device)
    x = torch.randn(3, 11, k, dtype=dtype, device=device)
    with ops.use_backend(backend):
        out = ops.int8_swiglu(x, gate, up)
        a, u = (ops.int8_linear(x, *w) for w in (gate, up))
    assert out.shape == (3, 11, n) and out.dtype == dtype
    # the same int8 products as two separate layers, whose outputs are rounded the same way
    want = (torch.nn.functional.silu(a.float()) * u.float()).to(dtype)
    torch.testing.assert_close(out, want, rtol=ULP[dtype], atol=1e-6)


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("shared", [False, True])  # True: the two halves of one layer, one down factor
def test_gated_op_with_loras_is_silu_of_the_two_layers_with_theirs(backend, device, shared):
    n, k, dtype = 48, 136, torch.bfloat16
    gate, up = (make_weight(n, k, "rowwise", True, dtype, device) for _ in range(2))
    factors = [ops.LoraFactors(torch.randn(4, k, dtype=dtype, device=device) / k**0.5,
                               torch.randn(n, 4, dtype=dtype, device=device), torch.rand(4, device=device))
               for _ in range(2)]  # fmt: skip
    if shared:
        factors[1] = factors[1]._replace(down=factors[0].down, scale=factors[0].scale)
    x = torch.randn(11, k, dtype=dtype, device=device)
    with ops.use_backend(backend):
        q, x_scale = ops.quantize_input(x)[:2]
        out = ops.scaled_mm(q, x_scale, gate.w_int8, gate.w_scale.reshape(-1), gate.bias, dtype, *factors[0],
                            up.w_int8, up.w_scale.reshape(-1), up.bias, *factors[1])  # fmt: skip
        a, u = (ops.int8_linear(x, *w, lora=f) for w, f in zip((gate, up), factors, strict=True))
    want = (torch.nn.functional.silu(a.float()) * u.float()).to(dtype)
    torch.testing.assert_close(out, want, rtol=ULP[dtype], atol=1e-6)


@pytest.mark.parametrize("backend", ["int_mm", pytest.param("triton", marks=NEEDS_INTERPRETER)])
def test_backends_agree_on_the_gated_product(backend):
    gate, up = (make_weight(40, 256, "rowwise", True, torch.float32, "cpu") for _ in range(2))
    x = torch.randn(9, 256)
    with ops.use_backend("torch"):
        expected = ops.int8_swiglu(x, gate, up)
    with ops.use_backend(backend):
        torch.testing.assert_close(ops.int8_swiglu(x, gate, up), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=NEEDS_INTERPRETER)])
def test_a_quantized_input_serves_several_layers(backend):
    gate, up = (make_weight(24, 64, "rowwise", False, torch.bfloat16, "cpu") for _ in range(2))
    normed = fusion.NormedInput(torch.randn(2, 5, 64, dtype=torch.bfloat16), "rms", 1e-6, scale=torch.rand(2, 1, 64) - 0.5)
    with ops.use_backend(backend):
        tokens = ops.quantize_input(normed)
        assert tokens.q.shape == (10, 64) and tokens.lead == (2, 5) and tokens.dtype == torch.bfloat16
        assert torch.equal(ops.int8_linear(tokens, *gate), ops.int8_linear(normed, *gate))
        assert torch.equal(ops.int8_swiglu(tokens, gate, up), ops.int8_swiglu(normed, gate, up))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"up": ops.Int8Weight(torch.ones(8, 8, dtype=torch.int8), torch.ones(()))},
         r"the up weight must have the gate's shape \(8, 16\), got \(8, 8\)"),
        ({"up": ops.Int8Weight(torch.ones(8, 16, dtype=torch.int8), torch.ones(3))},
         r"w_scale must be a float tensor of shape \[\], \[1\], \[8\] or \[8, 1\], got \(3,\)"),
        ({"up": ops.Int8Weight(torch.ones(8, 16, dtype=torch.int8), torch.ones(()), torch.ones(9))},
         r"bias must have shape \[8\], got \(9,\)"),
        ({"gate": ops.Int8Weight(torch.ones(8, 16), torch.ones(()))}, "w_int8 must be a 2-D int8 tensor"),
        ({"x": ops.QuantizedInput(torch.ones(2, 16, dtype=torch.int8), torch.ones(2), (2,), torch.float32), "rotation": 16},
         "a quantized input takes the rotation it was quantized with"),
    ],
)
def test_bad_gated_inputs_are_refused(change, message):
    weight = ops.Int8Weight(torch.ones(8, 16, dtype=torch.int8), torch.ones(8, 1))
    args = {"x": torch.randn(2, 16), "gate": weight, "up": weight}
    with pytest.raises(ValueError, match=message):
        ops.int8_swiglu(**(args | change))


def test_the_kernel_launch_refuses_what_a_gated_gemm_cannot_take():
    q, x_scale = torch.zeros(4, 64, dtype=torch.int8), torch.ones(4)
    w, out = torch.zeros(32, 64, dtype=torch.int8), torch.empty(4, 32)
    config = kernels.TileConfig(16, 32, 64, 4, 2)
    specialized = kernels.TileConfig(16, 32, 64, 4, 2, tma=True, persistent=True, warp_specialize=True)
    cases = [
        (config, Int8Weight(w, torch.ones(32)), None, "the same kinds of scale and bias"),  # 32 scales against 1
        (config, Int8Weight(w, torch.ones(1), torch.zeros(32)), None, "the same kinds of scale and bias"),
        (config, None, LowRank(torch.ones(4, 2), torch.ones(32, 2), torch.ones(2)), "needs the gated product"),
        (specialized, Int8Weight(w, torch.ones(1)), None, "not warp-specialized"),
    ]
    for tile, up, up_lora, message in cases:
        with pytest.raises(ValueError, match=message):
            kernels.launch_scaled_mm(tile, q, x_scale, w, torch.ones(1), out, Epilogue(up=up, up_lora=up_lora))


def test_opcheck_of_the_gated_op():
    gate, up = (make_weight(24, 40, "rowwise", True, torch.float32, "cpu") for _ in range(2))
    q, x_scale = ops.quantize_tokens_torch(torch.randn(5, 40))
    args = (q, x_scale, gate.w_int8, gate.w_scale, gate.bias, torch.bfloat16, None, None, None, *up)
    torch.library.opcheck(ops.scaled_mm, args)


def test_reference_output_of_a_gated_gemm():
    m, n, k = 30, 50, 200
    q = torch.randint(-127, 128, (m, k), dtype=torch.int8)
    x_scale = torch.rand(m) / 100
    gate, up = (make_weight(n, k, "rowwise", True, torch.bfloat16, "cpu") for _ in range(2))
    tokens = torch.tensor([0, 11, 29])
    epilogue = Epilogue(gate.bias, up=kernel_up(up))
    got = kernels.reference_output(tokens, q, x_scale, gate.w_int8, gate.w_scale.reshape(-1), epilogue, torch.bfloat16)
    a, u = (exact_scaled_mm(q, x_scale, w.w_int8, w.w_scale, w.bias)[tokens].to(torch.bfloat16).double() for w in (gate, up))
    torch.testing.assert_close(got.double(), torch.nn.functional.silu(a) * u, rtol=1e-6, atol=1e-6)


def test_gated_configs_halve_the_tile_width_and_have_their_own_tuning_key():
    config = kernels.TileConfig(128, 256, 128, 8, 4, tma=True, persistent=True)
    assert kernels.gated_config(config) == kernels.TileConfig(128, 128, 128, 8, 4, tma=True, persistent=True)
    assert kernels.gated_config(kernels.TileConfig(16, 16, 64, 4, 2)).block_n == 16
    specialized = kernels.TileConfig(128, 128, 128, 4, 4, tma=True, persistent=True, warp_specialize=True)
    assert not kernels.gated_config(specialized).warp_specialize  # computed wrong values (gated_config)
    w = torch.zeros(2, 24, 32, dtype=torch.int8)
    apart, stacked = Int8Weight(torch.zeros(24, 32, dtype=torch.int16), torch.ones(1)), Int8Weight(w[1], torch.ones(1))
    lora = LowRank(torch.ones(4, 2), torch.ones(24, 2, dtype=torch.bfloat16), torch.ones(2))
    epilogues = [Epilogue(), Epilogue(torch.ones(24)), Epilogue(up=apart), Epilogue(up=stacked), Epilogue(lora=lora)]
    keys = [kernels.GemmTuner._key(4608, 12288, 4096, 2, kernels.epilogue_key(w[0], e)) for e in epilogues]
    # the keys in users' cache files (gemm-configs.json)
    assert keys == ["8192,12288,4096", "8192,12288,4096", "8192,12288,4096,glu", "8192,12288,4096,glu-stacked",
                    "8192,12288,4096,lora2"]
    assert kernels.GemmTuner._key(300, 640, 512, 4, "") == "512,640,512,out4"


def test_halves_are_stacked_where_one_descriptor_describes_both(monkeypatch):
    w = torch.zeros(2 * 24 + 1, 32, dtype=torch.int8)
    one, other = w[:24], w[24:48]
    assert kernels.stacked_halves(one, other)
    assert kernels.epilogue_kind(one, Epilogue(up=Int8Weight(other, torch.ones(1)))) == "glu-stacked"
    assert kernels.stacked_halves(other, one)  # the up weight's channels before the gate's
    assert kernels.stacked_halves(one, w[25:49])  # a row (32 bytes) apart
    assert not kernels.stacked_halves(one, w[1:25])  # overlapping
    assert kernels.stacked_halves(w[:24, :16], w[24:48, :16])  # column slices: rows keep their stride
    assert not kernels.stacked_halves(one, w[24:47])  # another shape
    assert not kernels.stacked_halves(one, w.view(-1)[8 + 24 * 32 :][: 24 * 32].view(24, 32))  # 8 bytes off
    assert kernels.stacked_halves(one, torch.zeros(24, 32, dtype=torch.int8))  # two tensors (64-byte aligned)
    assert kernels.epilogue_kind(one, Epilogue(up=Int8Weight(torch.zeros(24, 32, dtype=torch.int16), torch.ones(1)))) == "glu"
    assert kernels.epilogue_kind(one, Epilogue()) == ""
    monkeypatch.setattr(tiles, "TMA_MAX_STRIDE", 24 * 32 + 16)  # w[25:49] as if it lay a terabyte away
    assert kernels.stacked_halves(one, other) and not kernels.stacked_halves(one, w[25:49])


def laid_out(gate: ops.Int8Weight, up: ops.Int8Weight, layout: str) -> tuple[ops.Int8Weight, ops.Int8Weight]:
    """The two weights as separate tensors (``"apart"``), as the halves of one fused in-projection's
    weight (channels of one tensor, the gate's first: ``"stacked"``), those halves the other way round
    (``"up first"``), or in one tensor 8 bytes off a 16-byte distance (``"misaligned"``: never one
    descriptor)."""
    n, k = gate.w_int8.shape
    if layout == "apart":
        return gate, up
    if layout == "misaligned":
        w = torch.empty(2 * n * k + 8, dtype=torch.int8, device=gate.w_int8.device)
        w[: n * k], w[n * k + 8 :] = gate.w_int8.flatten(), up.w_int8.flatten()
        return gate._replace(w_int8=w[: n * k].view(n, k)), up._replace(w_int8=w[n * k + 8 :].view(n, k))
    w = torch.cat([gate.w_int8, up.w_int8] if layout == "stacked" else [up.w_int8, gate.w_int8])
    halves = (w[:n], w[n:]) if layout == "stacked" else (w[n:], w[:n])
    return gate._replace(w_int8=halves[0]), up._replace(w_int8=halves[1])


@NEEDS_INTERPRETER
def test_the_interpreter_runs_a_gated_gemm_in_the_gated_tile(monkeypatch):
    """Without a config, the interpreter takes the default tile made gated (half as wide), as the
    tuner's candidates are on a GPU."""
    launched = []
    launch = kernels.launch_scaled_mm

    def recorded(config, *args, **kwargs):
        launched.append(config)
        launch(config, *args, **kwargs)

    monkeypatch.setattr(entry, "launch_scaled_mm", recorded)
    q, x_scale = kernels.quantize_tokens(torch.randn(5, 64, dtype=torch.bfloat16))
    gate, up = (make_weight(40, 64, "rowwise", False, torch.bfloat16, "cpu") for _ in range(2))
    out = kernels.scaled_mm(q, x_scale, gate.w_int8, gate.w_scale.reshape(-1), torch.bfloat16, Epilogue(up=kernel_up(up)))
    assert launched == [kernels.gated_config(kernels.candidate_configs("sm80", 5)[0])]
    a, u = (exact_scaled_mm(q, x_scale, w.w_int8, w.w_scale) for w in (gate, up))
    assert_swiglu_of(out, a.to(torch.bfloat16).double(), u.to(torch.bfloat16).double())


@pytest.mark.gpu
def test_compiled_gated_layer_matches_eager():
    gate, up = (make_weight(256, 128, "rowwise", False, torch.bfloat16, "cuda") for _ in range(2))

    def gated(x):
        return ops.int8_swiglu(x, gate, up)

    compiled = torch.compile(gated, fullgraph=True, dynamic=True)
    for tokens in (40, 77):
        x = torch.randn(2, tokens, 128, dtype=torch.bfloat16, device="cuda")
        out, want = compiled(x).double(), gated(x).double()
        # inductor's quantization may round a row's scale 1 ulp differently (ops module docstring), and
        # then an activation by one int8 step
        assert out.shape == want.shape and (out - want).norm() / want.norm() < 1e-2


def test_compiled_gated_layer_has_no_graph_breaks():
    gate, up = (make_weight(48, 64, "rowwise", False, torch.bfloat16, "cpu") for _ in range(2))
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(lambda x: ops.int8_swiglu(x, gate, up))(
        torch.randn(2, 8, 64, dtype=torch.bfloat16)
    )
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    assert "int8_studio.scaled_mm" in explanation.graphs[0].code


def test_int8_weight_slices_are_views_of_a_plain_int8_layer():
    layer = Int8Linear.from_float(torch.nn.Linear(32, 12))
    channels = layer.int8_weight(4, 10)
    assert torch.equal(channels.w_int8, layer.weight[4:10]) and channels.w_int8.data_ptr() == layer.weight[4:].data_ptr()
    assert torch.equal(channels.w_scale, layer.weight_scale[4:10]) and torch.equal(channels.bias, layer.bias[4:10])
    tensorwise = Int8Linear.from_float(torch.nn.Linear(32, 12, bias=False), "tensorwise")
    assert tensorwise.int8_weight().w_scale.ndim == 0 and tensorwise.int8_weight().bias is None
    layer.use_float = True
    assert layer.int8_weight() is None
    assert Int8Linear.from_float(torch.nn.Linear(32, 12), rotation=16).int8_weight() is None


def with_loras(model: torch.nn.Module, rank: int) -> None:
    """A dynamic LoRA of ``rank`` on every int8 layer of ``model`` (float32), its term about a tenth of
    the layer's output."""
    factors = {}
    for name, module in model.named_modules():
        if isinstance(module, Int8Linear):
            n, k = module.weight.shape
            factors[name] = Factors(torch.randn(rank, k) / k**0.5, torch.randn(n, rank) / 10, torch.full((rank,), 0.5))
    DynamicLoras(model, torch.float32).add_factors("random", factors)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=NEEDS_INTERPRETER)])
@pytest.mark.parametrize("arch_name, gated_layers", [("flux2", 2 * 2 + 3), ("zimage", 3)])  # Z-Image: refiners stay bf16
@pytest.mark.parametrize("rank", [0, 4])  # 4: every int8 layer with a dynamic LoRA, added in the gated GEMM
def test_models_run_their_swiglu_mlps_as_gated_gemms(arch_name, gated_layers, backend, rank, monkeypatch):
    """Flux.2's MLP in-projections and linear1, Z-Image's w1/w3: one gated GEMM each, with the output of
    the separate layers (float32: the two paths differ only where an int8 rounding flips)."""
    arch = REGISTRY[arch_name]
    torch.manual_seed(0)
    model = arch.build_module(arch.tiny["tiny"])
    quantize_model(model, arch, "rowwise", "none")
    if rank:
        with_loras(model, rank)
    inputs = model.random_inputs(1, 64)
    gated = []

    def counting(*args, **kwargs):
        gated.append(args)
        return ops.int8_swiglu(*args, **kwargs)

    with torch.no_grad(), ops.use_backend(backend):
        monkeypatch.setattr(linear, "int8_swiglu", counting)
        fused = model(**inputs).double()
        monkeypatch.setattr(Int8Linear, "fused_in_projection", lambda *args: None)
        monkeypatch.setattr(Int8Linear, "fused_swiglu", lambda *args: None)
        separate = model(**inputs).double()
    assert len(gated) == gated_layers
    assert (fused - separate).norm() / separate.norm() < 1e-3

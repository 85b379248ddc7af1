"""Down-projection inputs given before their activation (``fusion.ActivatedInput``): the quantization
kernels apply SwiGLU / GELU (after an optional concatenated prefix) on the way in."""

from __future__ import annotations

import math

import pytest
import torch

from engine import fusion
from engine.int8 import kernels, ops
from engine.int8.apply import quantize_model
from engine.int8.kernels import tokens as token_kernels
from engine.int8.linear import Int8Linear
from engine.int8.rotation import hadamard, rotate
from engine.models import REGISTRY
from engine.models.layers import MLP, GELUTanh, SwiGLU
from tests.int8_reference import (
    BACKENDS,
    DEVICES,
    NEEDS_INTERPRETER,
    ULP,
    assert_within_int8_rounding,
)

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # numpy, in the interpreter
def make_input(activation, tokens, width, prefix, dtype, device) -> fusion.ActivatedInput:
    """Strided views, as a model produces them: a and b are the halves of one wider tensor."""
    spread = torch.rand(tokens, 1) * 8 + 0.1  # tokens of very different magnitudes
    h = (torch.randn(tokens, 2 * width + 3) * spread).to(dtype).to(device)
    b = h[:, width : 2 * width] if activation == "swiglu" else None
    p = (torch.randn(tokens, prefix) * spread).to(dtype).to(device) if prefix else None
    return fusion.ActivatedInput(activation, h[:, :width], b, p)


def float64_tokens(x: fusion.ActivatedInput) -> torch.Tensor:
    a = x.a.double()
    if x.activation == "swiglu":
        y = a * torch.sigmoid(a) * x.b.double()
    elif x.activation == "gelu_tanh":
        y = 0.5 * a * (1 + torch.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a**3)))
    else:
        y = a
    return y if x.prefix is None else torch.cat([x.prefix.double(), y], dim=-1)


def assert_quantized_within_half_a_step(q, scale, x: fusion.ActivatedInput) -> None:
    ref = float64_tokens(x).cpu()
    q, scale = q.cpu().double(), scale.cpu().double()[:, None]
    assert q.shape == ref.shape and q.abs().max() <= 127
    assert torch.allclose(scale, ref.abs().amax(dim=1, keepdim=True) / 127, rtol=2 * ULP[x.a.dtype], atol=0)
    # half an int8 step, plus the activation's rounding to the input dtype (a full ulp: the interpreter
    # truncates its casts) and the GPU's approximate exp
    bound = scale * (0.5 + 1e-5) + ref.abs() * (ULP[x.a.dtype] + 2**-20)
    assert ((q * scale - ref).abs() <= bound).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ops.ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("prefix, width", [(0, 300), (40, 300), (256, 1000)])
@pytest.mark.parametrize("single_pass_max_k", [16384, 64])  # 64: the two-loop path; 64 straddles the prefix end
def test_quantize_kernel_applies_the_activation(device, activation, dtype, prefix, width, single_pass_max_k, monkeypatch):
    monkeypatch.setattr(token_kernels, "SINGLE_PASS_MAX_K", single_pass_max_k)
    x = make_input(activation, 7, width, prefix, dtype, device)
    q, scale = kernels.quantize_tokens(x.flattened())
    assert_quantized_within_half_a_step(q, scale, x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ops.ACTIVATIONS)
def test_float32_activation_in_the_kernel_is_torch_s_to_float32_rounding(device, activation):
    x = make_input(activation, 5, 2600, 12, torch.float32, device)
    q, scale = kernels.quantize_tokens(x.flattened())
    q_ref, scale_ref = ops.quantize_tokens_torch(x.materialize())
    assert torch.allclose(scale, scale_ref, rtol=2**-20, atol=0)
    # a value a few ulps from a rounding boundary may land on the neighbouring step
    assert (q.int() - q_ref.int()).abs().max() <= 1 and (q != q_ref).float().mean() < 1e-3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ops.ACTIVATIONS)
@pytest.mark.parametrize("prefix", [0, 256, 100])  # 100: a group of 256 straddles the prefix's end
def test_rotated_kernel_applies_the_activation_then_rotates(device, activation, prefix):
    x = make_input(activation, 9, 512 - prefix % 256, prefix, torch.bfloat16, device)
    q, scale = kernels.quantize_rotated_tokens(x.flattened(), hadamard(16, device, torch.bfloat16))
    rotated = rotate(float64_tokens(x), 256).double().cpu()
    ref_scale = rotated.abs().amax(dim=1) / 127
    assert torch.allclose(scale.cpu().double(), ref_scale.cpu(), rtol=0.02, atol=0)
    err = (q.cpu().double() * scale.cpu().double()[:, None] - rotated.cpu()).abs()
    # half a step, plus the activation's bf16 rounding spread by the (orthogonal) rotation
    assert (err <= ref_scale.cpu()[:, None] * 0.5 + 4 * ULP[torch.bfloat16] * rotated.abs().amax(dim=1, keepdim=True).cpu()).all()


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("activation", ops.ACTIVATIONS)
@pytest.mark.parametrize("prefix, rotation", [(0, 0), (48, 0), (256, 256), (0, 16)])
def test_int8_linear_of_an_activated_input_is_within_int8_rounding(backend, device, activation, prefix, rotation):
    width, n = 256 if prefix == 256 else 320, 40
    x = make_input(activation, 19, width, prefix, torch.bfloat16, device)
    k = x.width
    w_int8 = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device)
    w_scale = (torch.rand(n, 1, device=device) + 0.5) / 127 / k**0.5
    bias = torch.randn(n, device=device)
    with ops.use_backend(backend):
        out = ops.int8_linear(x, w_int8, w_scale, bias, out_dtype=torch.float32, rotation=rotation)
    assert out.shape == (19, n)
    # the layer's float input: the activation rounded to bf16, as the kernel and materialize() both round it
    tokens = float64_tokens(x).to(torch.bfloat16)
    if rotation:  # the stored weight is rotated: the layer computes rotate(x) · w_storedᵀ
        assert_within_int8_rounding(out, rotate(tokens.double(), rotation).float(), w_int8, w_scale, bias)
    else:
        assert_within_int8_rounding(out, tokens.float(), w_int8, w_scale, bias)


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_lora_on_an_activated_input_acts_on_the_activation(backend, device):
    x = make_input("swiglu", 11, 64, 16, torch.float32, device)
    w_int8 = torch.randint(-127, 128, (24, 80), dtype=torch.int8, device=device)
    w_scale = torch.full((24, 1), 1e-3, device=device)
    lora = ops.LoraFactors(torch.randn(4, 80, device=device), torch.randn(24, 4, device=device), torch.rand(4, device=device))
    with ops.use_backend(backend):
        fused = ops.int8_linear(x, w_int8, w_scale, lora=lora)
        plain = ops.int8_linear(x.materialize(), w_int8, w_scale, lora=lora)
    torch.testing.assert_close(fused, plain, rtol=0, atol=0)


@pytest.mark.parametrize(
    "lazy_input",
    [
        lambda: make_input("gelu_tanh", 5, 40, 8, torch.bfloat16, "cpu"),
        lambda: fusion.NormedInput(torch.randn(5, 48, dtype=torch.bfloat16), "rms", 1e-6, scale=torch.rand(48, dtype=torch.bfloat16)),
    ],
    ids=["activated", "normed"],
)
def test_the_float_switch_takes_lazy_inputs_too(lazy_input):
    layer = Int8Linear.from_float(torch.nn.Linear(48, 16)).to(torch.bfloat16)
    x = lazy_input()
    quantized = layer(x)
    layer.use_float = True
    assert torch.equal(layer(x), layer(x.materialize()))
    assert (layer(x) - quantized).abs().max() < 0.05 * layer(x).abs().max()


@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.parametrize("backend, device", BACKENDS)
def test_non_finite_activations_poison_only_their_output_row(backend, device):
    x = make_input("swiglu", 6, 128, 0, torch.bfloat16, device)
    x.a[1, 5] = float("nan")
    x.a[2, 9] = float("-inf")  # silu(-inf) = -inf · 0: NaN
    x.b[3, 0] = float("inf")
    x.a[4] = 0  # silu(0) = 0: an all-zero input row
    w_int8 = torch.ones(8, 128, dtype=torch.int8, device=device)
    bias = torch.arange(8.0, device=device)
    with ops.use_backend(backend):
        out = ops.int8_linear(x, w_int8, torch.ones(8, 1, device=device), bias, out_dtype=torch.float32)
    assert torch.isnan(out[1:4]).all() and torch.equal(out[4], bias) and torch.isfinite(out[[0, 5]]).all()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"activation": "relu"}, r"unknown activation 'relu'; expected one of swiglu, gelu_tanh"),
        ({"b": None}, r"swiglu takes a and b of one shape and dtype"),
        ({"b": torch.randn(3, 8)}, r"swiglu takes a and b of one shape and dtype"),
        ({"b": torch.randn(3, 7, dtype=torch.bfloat16)}, r"swiglu takes a and b of one shape and dtype"),
        ({"activation": "gelu_tanh"}, r"gelu_tanh takes a alone"),
        ({"prefix": torch.randn(4, 8, dtype=torch.bfloat16)}, r"prefix torch.bfloat16 \(4, 8\) does not fit a torch.bfloat16 \(3, 8\)"),
        ({"prefix": torch.randn(3, 8)}, r"prefix torch.float32 \(3, 8\) does not fit"),
    ],
)
def test_bad_activated_inputs_are_refused(change, message):
    x = fusion.ActivatedInput("swiglu", torch.randn(3, 8, dtype=torch.bfloat16), torch.randn(3, 8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=message):
        ops.int8_linear(x._replace(**change), torch.ones(4, 8, dtype=torch.int8), torch.ones(4, 1))


def test_width_must_match_the_weight():
    x = fusion.ActivatedInput("gelu_tanh", torch.randn(3, 8), prefix=torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"x must be float16/bfloat16/float32 \[\.\.\., 8\], got torch.float32 \(3, 12\)"):
        ops.int8_linear(x, torch.ones(4, 8, dtype=torch.int8), torch.ones(4, 1))


def test_opcheck_of_the_activated_quantization():
    x = make_input("swiglu", 5, 40, 8, torch.bfloat16, "cpu")
    torch.library.opcheck(ops.quantize_activated_tokens, (*x, 0))
    torch.library.opcheck(ops.quantize_activated_tokens, ("gelu_tanh", x.a.contiguous(), None, None, 0))


@pytest.mark.parametrize("act", [SwiGLU(), GELUTanh()])
def test_compiled_mlp_quantizes_through_the_activated_op(act):
    torch._dynamo.reset()
    hidden = 96
    up = torch.nn.Linear(64, 2 * hidden if isinstance(act, SwiGLU) else hidden)
    mlp = MLP(Int8Linear.from_float(up), act, Int8Linear.from_float(torch.nn.Linear(hidden, 64))).to(torch.bfloat16)
    explanation = torch._dynamo.explain(mlp)(torch.randn(2, 8, 64, dtype=torch.bfloat16))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    assert "int8_studio.quantize_activated_tokens" in explanation.graphs[0].code

    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(mlp, backend=counter, fullgraph=True)
    for tokens in (8, 13, 40):
        x = torch.randn(2, tokens, 64, dtype=torch.bfloat16)
        torch._dynamo.mark_dynamic(x, 1)
        torch.testing.assert_close(compiled(x), mlp(x), rtol=0, atol=0)
    assert counter.frame_count == 1


@NEEDS_INTERPRETER
@pytest.mark.parametrize("arch_name", ["flux2", "chroma", "zimage", "flux1"])
def test_quantized_models_agree_between_the_fused_kernel_and_the_torch_path(arch_name):
    """The Triton backend takes the activated inputs; the torch backend materializes them first."""
    arch = REGISTRY[arch_name]
    torch.manual_seed(0)
    model = arch.build_module(arch.tiny["tiny"]).to(torch.bfloat16)
    quantize_model(model, arch, "rowwise", "none")
    inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in model.random_inputs(1, 64).items()}
    with torch.no_grad():
        with ops.use_backend("triton"):
            fused = model(**inputs).double()
        with ops.use_backend("torch"):
            plain = model(**inputs).double()
    assert (fused - plain).norm() / plain.norm() < 0.02

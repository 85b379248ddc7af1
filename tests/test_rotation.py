"""Hadamard-rotated ("ConvRot") int8 layers: the matrix, rotated weights, the fused rotate+quantize
kernel (interpreter) and the PyTorch path, and what the rotation buys on heavy-tailed inputs."""

from __future__ import annotations

import math
from fnmatch import fnmatchcase

import pytest
import torch

from engine.int8 import kernels, ops
from engine.int8.apply import rotation_group
from engine.int8.linear import Int8Linear, QuantizedLayerError
from engine.int8.quantize import dequantize_weight, quantize_weight
from engine.int8.rotation import RotationError, hadamard, marker_group, rotate
from engine.models.spec import REGISTRY
from tests.int8_reference import NEEDS_INTERPRETER, assert_within_int8_rounding

BACKENDS = [
    "torch",
    "int_mm",
    pytest.param("triton", marks=NEEDS_INTERPRETER),
]


@pytest.mark.parametrize("size", [4, 16, 64, 256])
def test_hadamard_is_the_regular_symmetric_orthogonal_matrix(size):
    h = hadamard(size, dtype=torch.float64)
    assert torch.equal(h, h.T)
    torch.testing.assert_close(h @ h, torch.eye(size, dtype=torch.float64), rtol=0, atol=1e-6)
    assert torch.equal(h.abs() * math.sqrt(size), torch.ones(size, size, dtype=torch.float64))
    row_sums = h.sum(dim=1) * math.sqrt(size)
    assert torch.equal(row_sums, torch.full_like(row_sums, math.sqrt(size)))  # regular: equal row sums


def test_hadamard_of_256_is_the_kronecker_square_of_16():
    """What the fused kernel relies on: H₂₅₆ = H₁₆ ⊗ H₁₆."""
    h16 = hadamard(16, dtype=torch.float64)
    assert torch.equal(hadamard(256, dtype=torch.float64), torch.kron(h16, h16))


@pytest.mark.parametrize("group", [4, 16, 64, 256, 1024])
def test_rotate_is_the_product_with_the_dense_matrix(group):
    """rotate() multiplies by the Kronecker factors of H; the result is the dense product's."""
    x = torch.randn(5, 3 * group)
    dense = (x.double().reshape(5, -1, group) @ hadamard(group, dtype=torch.float64)).reshape(x.shape)
    torch.testing.assert_close(rotate(x, group).double(), dense, rtol=0, atol=1e-5)


def test_rotating_twice_gives_the_input_back():
    x = torch.randn(7, 3, 512)
    y = rotate(x, 256)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(rotate(y, 256), x, rtol=0, atol=1e-5)
    assert not torch.allclose(y, x)


@pytest.mark.parametrize(
    "group, width, message",
    [(128, 512, "not a power of 4"), (8, 64, "not a power of 4"), (256, 384, "does not divide the layer's 384")],
)
def test_bad_groups_are_refused(group, width, message):
    with pytest.raises(RotationError, match=message):
        rotate(torch.randn(2, width), group)
    with pytest.raises(QuantizedLayerError, match=message):
        Int8Linear(torch.zeros(4, width, dtype=torch.int8), torch.ones(()), rotation=group)


@pytest.mark.parametrize("scheme", ["tensorwise", "rowwise"])
def test_rotated_weight_dequantizes_to_the_rotated_float_weight(scheme):
    w = torch.randn(40, 512) * torch.rand(40, 1)
    q, scale = quantize_weight(w, scheme, rotation=256)
    rotated = rotate(w, 256)
    step = scale.reshape(-1, 1) if scale.ndim else scale
    assert ((dequantize_weight(q, scale) - rotated).abs() <= step / 2 * (1 + 1e-5)).all()
    # un-rotating sums 256 errors of at most step/2, each times ±1/16
    layer = Int8Linear(q, scale, rotation=256)
    assert ((layer.dequantized_weight() - w).abs() <= 16 * step / 2 * (1 + 1e-5)).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m, n, k, group", [(1, 33, 256, 256), (17, 70, 768, 256), (19, 24, 80, 16), (16, 40, 192, 64)])
def test_rotated_layer_is_within_int8_rounding_of_the_rotated_product(backend, dtype, m, n, k, group):
    w_int8, w_scale = quantize_weight(torch.randn(n, k), "rowwise", rotation=group)
    bias = torch.randn(n, dtype=dtype)
    x = torch.randn(m, k, dtype=dtype) * 3
    with ops.use_backend(backend):
        out = ops.int8_linear(x, w_int8, w_scale, bias, rotation=group)
    assert out.shape == (m, n) and out.dtype == dtype
    # the layer quantizes x·H against the stored (rotated) weight: the bound of that product
    x_rotated = (x.double().reshape(m, -1, group) @ hadamard(group, dtype=torch.float64)).reshape(m, k)
    assert_within_int8_rounding(out, x_rotated, w_int8, w_scale, bias)


@NEEDS_INTERPRETER
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_kernel_rounds_like_the_pytorch_path(dtype):
    x = torch.randn(37, 512, dtype=dtype)
    q, scale = kernels.quantize_rotated_tokens(x, hadamard(16, x.device, dtype))
    expected_q, expected_scale = ops.quantize_tokens_torch(rotate(x, 256))
    torch.testing.assert_close(scale, expected_scale, rtol=1e-6, atol=0)
    differ = (q.int() - expected_q.int()).abs()
    assert differ.max() <= 1 and differ.float().mean() < 1e-3  # float32 sums in another order


@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply")  # numpy in the interpreter
@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_and_non_finite_tokens_stay_in_their_output_row(backend):
    w_int8, w_scale = quantize_weight(torch.randn(24, 256), "rowwise", rotation=256)
    bias = torch.randn(24)
    x = torch.randn(5, 256)
    x[1] = 0
    x[3, 7] = float("inf")
    with ops.use_backend(backend):
        out = ops.int8_linear(x, w_int8, w_scale, bias, rotation=256)
    assert torch.equal(out[1], bias)
    assert out[3].isnan().all()
    assert torch.isfinite(out[[0, 2, 4]]).all()


def test_rotation_halves_the_error_on_heavy_tailed_inputs():
    """A SiLU-gated input with a few large channels, as down-projections see: rotated int8 is far
    closer to the float product; on Gaussian inputs it is no worse."""
    k = 1024
    gated = torch.nn.functional.silu(torch.randn(64, k)) * torch.randn(64, k)
    gated[:, torch.randperm(k)[:4]] *= 20
    linear = torch.nn.Linear(k, 96, bias=False)
    torch.nn.init.normal_(linear.weight, std=k**-0.5)  # rotating light-tailed (uniform) weights would cost
    for x, factor in ((gated, 0.5), (torch.randn(64, k), 1.1)):
        reference = linear(x)
        errors = [
            ((Int8Linear.from_float(linear, "rowwise", rotation)(x) - reference).norm() / reference.norm()).item()
            for rotation in (0, 256)
        ]
        assert errors[1] < factor * errors[0], errors


def test_a_layer_loaded_with_a_convrot_marker_is_rotated():
    linear = torch.nn.Linear(512, 32)
    rotated = Int8Linear.from_float(linear, "rowwise", 256)
    state = rotated.state_dict()
    marker = b'{"format": "int8_tensorwise", "convrot": true, "convrot_groupsize": 256}'
    state["comfy_quant"] = torch.tensor(list(marker), dtype=torch.uint8)
    loaded = Int8Linear(torch.zeros(32, 512, dtype=torch.int8), torch.ones(32, 1), torch.zeros(32))
    loaded.load_state_dict(state)
    assert loaded.rotation == 256
    x = torch.randn(3, 512)
    torch.testing.assert_close(loaded(x), rotated(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    "marker, message",
    [
        (b'{"format": "int8_tensorwise", "convrot": true, "convrot_groupsize": 100}', "not a power of 4"),
        (b'{"format": "int8_tensorwise", "convrot": true, "convrot_groupsize": 1024}', "does not divide"),
        (b"not json", "is not a JSON object"),
    ],
)
def test_bad_markers_are_refused(marker, message):
    layer = Int8Linear(torch.zeros(8, 512, dtype=torch.int8), torch.ones(8, 1))
    state = {**layer.state_dict(), "comfy_quant": torch.tensor(list(marker), dtype=torch.uint8)}
    with pytest.raises(QuantizedLayerError, match=message):
        layer.load_state_dict(state)


def test_marker_group_reads_the_comfyui_fields():
    assert marker_group({"format": "int8_tensorwise"}) == 0
    assert marker_group({"format": "int8_tensorwise", "convrot": True}) == 256
    assert marker_group({"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 64}) == 64
    assert marker_group(["not", "a", "dict"]) == 0
    with pytest.raises(RotationError, match="not an integer"):
        marker_group({"convrot": True, "convrot_groupsize": "256"})


def test_compiled_rotated_layer_has_no_graph_breaks_or_recompiles():
    torch._dynamo.reset()
    layer = Int8Linear.from_float(torch.nn.Linear(256, 48), "rowwise", 256).to(torch.bfloat16)
    explanation = torch._dynamo.explain(layer)(torch.randn(8, 256, dtype=torch.bfloat16))
    assert explanation.graph_break_count == 0
    assert "int8_studio.quantize_tokens" in explanation.graphs[0].code  # the rotation runs inside the op
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layer, backend=counter, fullgraph=True)
    for tokens in (8, 13, 40):
        x = torch.randn(tokens, 256, dtype=torch.bfloat16)
        torch._dynamo.mark_dynamic(x, 0)
        torch.testing.assert_close(compiled(x), layer(x), rtol=0, atol=0)
    assert counter.frame_count == 1


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m", [1, 16, 300])
def test_cuda_rotated_layer_within_int8_rounding(dtype, m):
    n, k = 72, 1024
    w_int8, w_scale = quantize_weight(torch.randn(n, k), "rowwise", rotation=256)
    x = torch.randn(m, k, dtype=dtype) * 3
    out = ops.int8_linear(x.cuda(), w_int8.cuda(), w_scale.cuda(), rotation=256).cpu()
    x_rotated = (x.double().reshape(m, -1, 256) @ hadamard(256, dtype=torch.float64)).reshape(m, k)
    assert_within_int8_rounding(out, x_rotated, w_int8, w_scale)
    q, _ = kernels.quantize_rotated_tokens(x.cuda(), hadamard(16, "cuda", dtype))
    expected_q, _ = ops.quantize_tokens_torch(rotate(x, 256))
    differ = (q.cpu().int() - expected_q.int()).abs()
    assert differ.max() <= 1 and differ.float().mean() < 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_term_of_a_rotated_layer_acts_on_the_unrotated_input(backend):
    w_int8, w_scale = quantize_weight(torch.randn(40, 512), "rowwise", rotation=256)
    x = torch.randn(9, 512)
    lora = ops.LoraFactors(torch.randn(4, 512), torch.randn(40, 4), torch.rand(4))
    with ops.use_backend(backend):
        plain = ops.int8_linear(x, w_int8, w_scale, rotation=256)
        out = ops.int8_linear(x, w_int8, w_scale, lora=lora, rotation=256)
    q, x_scale = ops.quantize_tokens_torch(rotate(x, 256))  # the rotated tokens the weight sees
    tokens = rotate(q.double() * x_scale.double()[:, None], 256).double()  # rotated back
    term = (tokens @ lora.down.double().T * lora.scale.double()) @ lora.up.double().T
    torch.testing.assert_close(out.double(), plain.double() + term, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("arch", sorted(REGISTRY))
def test_down_projection_patterns_name_quantized_layers_of_every_architecture(arch):
    """The layers a ``down`` conversion rotates exist, and they are all int8 (rotating a bf16 layer
    would mean nothing)."""
    a = REGISTRY[arch]
    shapes = a.tensor_shapes(next(iter(a.tiny.values())))
    down = [n for n in shapes if any(fnmatchcase(n, p) for p in a.down_projections)]
    assert down, f"{arch}: no layer matches {a.down_projections}"
    assert all(len(shapes[n]) == 2 and not a.keeps_high_precision(n, shapes[n]) for n in down)
    for name, shape in shapes.items():
        if len(shape) != 2 or a.keeps_high_precision(name, shape):
            continue
        fits = 256 if shape[1] % 256 == 0 else 0
        assert rotation_group(a, name, shape, "none") == 0
        assert rotation_group(a, name, shape, "all") == fits
        assert rotation_group(a, name, shape, "down") == (fits if name in down else 0)

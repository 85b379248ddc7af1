"""int8_linear: every backend against float64, edge cases, bad inputs, torch.compile."""

from __future__ import annotations

import threading

import pytest
import torch
import torch._dynamo.testing

from engine.int8 import backends, ops
from engine.int8.linear import Int8Linear
from engine.int8.quantize import quantize_weight
from tests.int8_reference import NEEDS_INTERPRETER, ULP, assert_within_int8_rounding

CPU_BACKENDS = [
    "torch",
    "int_mm",
    pytest.param("triton", marks=NEEDS_INTERPRETER),
]


def make_layer(n, k, scale_shape, with_bias, dtype=torch.bfloat16, device="cpu"):
    w_int8, w_scale = quantize_weight(torch.randn(n, k) * torch.rand(n, 1), "tensorwise" if scale_shape in ((), (1,)) else "rowwise")
    bias = torch.randn(n, dtype=dtype) if with_bias else None
    return w_int8.to(device), w_scale.reshape(scale_shape).to(device), bias.to(device) if with_bias else None


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("lead, n, k", [((1,), 24, 40), ((16,), 33, 136), ((17,), 40, 64), ((2, 9), 70, 300)])
@pytest.mark.parametrize("scale_shape, with_bias", [((), True), ((1,), False), ("n", False), ("n1", True)])
def test_int8_linear_within_int8_rounding(backend, dtype, lead, n, k, scale_shape, with_bias):
    scale_shape = {"n": (n,), "n1": (n, 1)}.get(scale_shape, scale_shape)
    w_int8, w_scale, bias = make_layer(n, k, scale_shape, with_bias, dtype)
    x = torch.randn(*lead, k, dtype=dtype) * 3
    with ops.use_backend(backend):
        out = ops.int8_linear(x, w_int8, w_scale, bias)
    assert out.shape == (*lead, n) and out.dtype == dtype
    assert_within_int8_rounding(out.reshape(-1, n), x.reshape(-1, k), w_int8, w_scale, bias)


@pytest.mark.parametrize("backend", ["int_mm", pytest.param("triton", marks=CPU_BACKENDS[2].marks)])
def test_backends_agree_with_the_torch_path(backend):
    w_int8, w_scale, bias = make_layer(48, 256, (48, 1), True)
    x = torch.randn(5, 7, 256, dtype=torch.bfloat16)
    with ops.use_backend("torch"):
        expected = ops.int8_linear(x, w_int8, w_scale, bias, out_dtype=torch.float32)
    with ops.use_backend(backend):
        out = ops.int8_linear(x, w_int8, w_scale, bias, out_dtype=torch.float32)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply")  # numpy in the interpreter
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_zero_tokens_give_the_bias_and_non_finite_tokens_give_nan(backend):
    w_int8, w_scale, bias = make_layer(24, 64, (24, 1), True)
    x = torch.randn(6, 64, dtype=torch.bfloat16)
    x[1] = 0
    x[3, 5] = float("nan")
    x[4, 60] = float("-inf")
    with ops.use_backend(backend):
        out = ops.int8_linear(x, w_int8, w_scale, bias)
        clean = ops.int8_linear(x[[0, 2, 5]], w_int8, w_scale, bias)
    assert torch.equal(out[1], bias)
    assert torch.isnan(out[3]).all() and torch.isnan(out[4]).all()
    assert torch.equal(out[[0, 2, 5]], clean)


def test_out_dtype_and_default_backends():
    w_int8, w_scale, bias = make_layer(16, 32, (), True)
    x = torch.randn(3, 32, dtype=torch.float16)
    out = ops.int8_linear(x, w_int8, w_scale, bias, out_dtype=torch.float32)
    assert out.dtype == torch.float32
    assert ops.backend_for(x) == "torch"
    with ops.use_backend("int_mm"):
        assert ops.backend_for(x) == "int_mm"
    assert ops.backend_for(x) == "torch"
    with pytest.raises(ValueError, match="unknown backend 'cublas'; expected one of triton, int_mm, torch"), ops.use_backend("cublas"):
        pass


def test_a_forced_backend_belongs_to_its_thread():
    """The app runs jobs on worker threads: a backend forced in one thread is not another's."""
    x = torch.randn(3, 32)
    seen = {}

    def worker():
        seen["worker"] = ops.backend_for(x)

    with ops.use_backend("int_mm"):
        thread = threading.Thread(target=worker)
        thread.start()
        thread.join()
        seen["caller"] = ops.backend_for(x)
    assert seen == {"worker": "torch", "caller": "int_mm"}


@pytest.mark.parametrize("first", ["torch", pytest.param("triton", marks=NEEDS_INTERPRETER)])
def test_a_compiled_layer_is_traced_again_for_another_backend(first):
    """Dynamo guards on the forced backend: a graph traced for one backend is not reused for another (the
    Triton backend quantizes through its op, the others in tensor ops)."""
    layer = Int8Linear.from_float(torch.nn.Linear(64, 32)).to(torch.bfloat16)
    x = torch.randn(2, 8, 64, dtype=torch.bfloat16)
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("eager")
    compiled = torch.compile(layer, backend=counter, fullgraph=True)
    second = "torch" if first == "triton" else "int_mm"
    for backend in (first, second, first):
        with ops.use_backend(backend):
            torch.testing.assert_close(compiled(x), layer(x), rtol=0, atol=0)
    assert counter.frame_count == 2


def test_describe_backend_says_why_a_gpu_falls_back(monkeypatch):
    cuda = torch.device("cuda")
    assert ops.describe_backend(torch.device("cpu")) == "PyTorch float32 matmuls (no int8 speed-up)"
    monkeypatch.setattr(backends, "kernels", None)
    monkeypatch.setattr(backends, "KERNELS_MISSING", "the int8 kernels need Triton 3.4 or newer, found 3.2.0")
    assert ops.describe_backend(cuda) == (
        "torch._int_mm + separate dequantization, slower than the Triton kernels "
        "(the int8 kernels need Triton 3.4 or newer, found 3.2.0)"
    )
    monkeypatch.undo()
    assert ops.describe_backend(cuda) == "Triton kernels"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"w_int8": torch.zeros(8, 16)}, r"w_int8 must be a 2-D int8 tensor, got torch.float32 \(8, 16\)"),
        ({"x": torch.zeros(2, 15)}, r"x must be float16/bfloat16/float32 \[..., 16\], got torch.float32 \(2, 15\)"),
        ({"x": torch.zeros(2, 16, dtype=torch.int32)}, r"x must be float16/bfloat16/float32 \[..., 16\], got torch.int32"),
        ({"w_scale": torch.ones(3)}, r"w_scale must be a float tensor of shape \[\], \[1\], \[8\] or \[8, 1\], got \(3,\)"),
        ({"bias": torch.zeros(9)}, r"bias must have shape \[8\], got \(9,\)"),
        ({"out_dtype": torch.int8}, r"out_dtype must be float16, bfloat16 or float32, got torch.int8"),
    ],
)
def test_bad_inputs_are_refused(change, message):
    args = {"x": torch.randn(2, 16), "w_int8": torch.ones(8, 16, dtype=torch.int8), "w_scale": torch.ones(8, 1)}
    args |= change
    with pytest.raises(ValueError, match=message):
        ops.int8_linear(**args)


def test_opcheck_real_and_fake_implementations_agree():
    w_int8, w_scale, bias = make_layer(24, 40, (24, 1), True)
    q, x_scale = ops.quantize_tokens_torch(torch.randn(5, 40))
    lora = (torch.randn(3, 40), torch.randn(24, 3), torch.rand(3))
    torch.library.opcheck(ops.scaled_mm, (q, x_scale, w_int8, w_scale, bias, torch.float32, None, None, None))
    torch.library.opcheck(ops.scaled_mm, (q, x_scale, w_int8, w_scale[0], None, torch.bfloat16, *lora))
    torch.library.opcheck(ops.quantize_tokens, (torch.randn(7, 33, dtype=torch.bfloat16),))


@pytest.mark.parametrize(
    "backend, device",
    [("torch", "cpu"), ("int_mm", "cpu"), pytest.param("triton", "cpu", marks=CPU_BACKENDS[2].marks),
     pytest.param("triton", "cuda", marks=pytest.mark.gpu)],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m, rank", [(19, 1), (19, 8), (300, 45)])  # 45: two blocks of the kernel's rank loop, the second partial
def test_lora_term_is_added_in_the_epilogue(backend, device, dtype, m, rank):
    n, k = 40, 72
    w_int8, w_scale, bias = make_layer(n, k, (n, 1), True, dtype, device)
    x = torch.randn(m, k, dtype=dtype, device=device)
    lora = ops.LoraFactors(
        torch.randn(rank, k, dtype=dtype, device=device) / k**0.5,
        torch.randn(n, rank, dtype=dtype, device=device),
        torch.rand(rank, device=device) * 4 - 2,
    )
    with ops.use_backend(backend):
        base = ops.int8_linear(x, w_int8, w_scale, bias, out_dtype=torch.float32)
        out = ops.int8_linear(x, w_int8, w_scale, bias, out_dtype=torch.float32, lora=lora)
    q, x_scale = ops.quantize_tokens_torch(x)  # the tokens the weight sees, which the LoRA sees too
    tokens = q.double() * x_scale.double()[:, None]
    down, up, scale = lora.down.double(), lora.up.double(), lora.scale.double()
    term = (tokens @ down.T * scale) @ up.T
    # x·downᵀ is rounded to x's dtype (and, in the kernel, again after the scale): ~1 ulp per rank column
    bound = 4 * ULP[dtype] * ((tokens.abs() @ down.abs().T * scale.abs()) @ up.abs().T) + 2**-20 * out.double().abs()
    assert ((out.double() - base.double() - term).abs() <= bound + 1e-6).all()
    # against the input itself, the term is off by the tokens' int8 rounding only: what the merged weight sees
    exact = (x.double() @ down.T * scale) @ up.T
    rounding = ((x.double() - tokens).abs() @ down.abs().T * scale.abs()) @ up.abs().T
    assert ((out.double() - base.double() - exact).abs() <= rounding + bound + 1e-6).all()


def test_lora_factors_of_the_wrong_shape_are_refused():
    w_int8, w_scale, _ = make_layer(8, 16, (8, 1), False)
    lora = ops.LoraFactors(torch.randn(4, 16), torch.randn(8, 3), torch.rand(4))
    with pytest.raises(ValueError, match=r"LoRA factors must be down \[r, 16\], up \[8, r\], scale \[r\], got \(4, 16\), \(8, 3\), \(4,\)"):
        ops.int8_linear(torch.randn(2, 16), w_int8, w_scale, lora=lora)


class Block(torch.nn.Module):
    def __init__(self, dim, hidden, scheme):
        super().__init__()
        self.up = Int8Linear.from_float(torch.nn.Linear(dim, hidden), scheme)
        self.down = Int8Linear.from_float(torch.nn.Linear(hidden, dim, bias=False), scheme)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=NEEDS_INTERPRETER)])
def test_compiled_block_has_no_graph_breaks_and_no_recompiles(backend):
    """The Triton backend quantizes through its op (the eager kernel); the others in tensor ops that
    inductor fuses into the producer."""
    torch._dynamo.reset()
    block = Block(64, 96, "rowwise").to(torch.bfloat16)
    with ops.use_backend(backend):
        explanation = torch._dynamo.explain(block)(torch.randn(2, 8, 64, dtype=torch.bfloat16))
        assert explanation.graph_break_count == 0 and explanation.graph_count == 1
        assert explanation.graphs[0].code.count("int8_studio.quantize_tokens") == (2 if backend == "triton" else 0)

        torch._dynamo.reset()
        counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(block, backend=counter, fullgraph=True)
        for tokens in (8, 13, 40, 77):
            x = torch.randn(2, tokens, 64, dtype=torch.bfloat16)
            torch._dynamo.mark_dynamic(x, 1)
            torch.testing.assert_close(compiled(x), block(x), rtol=0, atol=0)
        assert counter.frame_count == 1


@pytest.mark.gpu
@pytest.mark.parametrize("scale_shape, with_bias", [((), True), ((40, 1), False)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 16, 17, 300])
def test_cuda_backends_within_int8_rounding_and_agree(scale_shape, with_bias, dtype, m):
    w_int8, w_scale, bias = make_layer(40, 272, scale_shape, with_bias, dtype, "cuda")
    x = torch.randn(m, 272, dtype=dtype, device="cuda")
    outs = {}
    for backend in ops.BACKENDS:
        with ops.use_backend(backend):
            outs[backend] = ops.int8_linear(x, w_int8, w_scale, bias)
        assert_within_int8_rounding(outs[backend], x, w_int8, w_scale, bias)
    for backend in ("triton", "int_mm"):
        diff = (outs[backend].double() - outs["torch"].double()).abs()
        assert (diff <= outs["torch"].double().abs() * ULP[dtype] + 1e-5).all(), backend


def test_inductor_quantizes_non_finite_tokens_as_eager_code_does():
    """Inductor folds ``x * 0`` to 0, so a finiteness test built on it let ±Inf tokens through as Inf
    scales and -128 values; compiled, such tokens must still get a NaN scale and zeros."""
    x = torch.randn(6, 72)
    x[1, 3], x[2, 5], x[3, 7], x[4] = float("inf"), float("nan"), -float("inf"), 0
    torch._dynamo.reset()
    q, scale = torch.compile(ops.quantize_tokens_torch, fullgraph=True)(x)
    want_q, want_scale = ops.quantize_tokens_torch(x)
    assert torch.isnan(scale[1:4]).all() and not q[1:4].any()
    assert torch.equal(q, want_q)
    torch.testing.assert_close(scale, want_scale, rtol=0, atol=0, equal_nan=True)


@pytest.mark.gpu
def test_cuda_edge_tokens_and_compile_with_inductor():
    w_int8, w_scale, bias = make_layer(64, 128, (64, 1), True, device="cuda")
    x = torch.randn(40, 128, dtype=torch.bfloat16, device="cuda")
    x[3] = 0
    x[7, 2] = float("nan")
    out = ops.int8_linear(x, w_int8, w_scale, bias)
    assert torch.equal(out[3], bias) and torch.isnan(out[7]).all() and torch.isfinite(out[8:]).all()

    torch._dynamo.reset()
    block = Block(128, 256, "tensorwise").to("cuda", torch.bfloat16)
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(block, backend=counter, fullgraph=True)
    for tokens in (64, 200, 1000):
        x = torch.randn(1, tokens, 128, dtype=torch.bfloat16, device="cuda")
        torch._dynamo.mark_dynamic(x, 1)
        torch.testing.assert_close(compiled(x), block(x), rtol=2**-7, atol=1e-2)
    x[0, 5, 9], x[0, 6, 3] = float("inf"), float("nan")  # compiled too, a non-finite row poisons only itself
    out = compiled(x)[0]
    assert torch.isnan(out[5:7]).all() and torch.isfinite(out[:5]).all() and torch.isfinite(out[7:]).all()
    assert counter.frame_count == 1

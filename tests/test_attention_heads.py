"""A fused q|k|v projection's GEMM handing on attention's inputs: heads split, queries and keys
RMS-normalized and rotated in the epilogue (``Epilogue.heads``, ``ops.int8_attention_inputs``)."""

from __future__ import annotations

import pytest
import torch

from engine.int8 import kernels, linear, ops
from engine.int8.apply import quantize_model
from engine.int8.operands import Epilogue, LowRank, QKNormTables
from engine.heads import QKNormRope, attention_inputs, rope_of, rotation_tables
from engine.models import REGISTRY, layers
from tests.int8_reference import BACKENDS, DEVICES, ULP
from tests.test_gated_gemm import make_weight, with_loras
from tests.test_kernels import configs_for


def qk_norm(tokens: int, head: int, device, dtype=torch.float32, eps: float = 1e-6) -> QKNormRope:
    """Random norm weights in ``dtype`` (a model's) and the rotations of random 2-axis positions, as the
    models make them."""
    ids = torch.randint(0, 4000, (tokens, 2))
    pe = layers.rope(ids, (head // 2, head // 2), 2000.0).to(device)
    weights = (torch.rand(2, head) + 0.5).to(device, dtype)
    return QKNormRope(weights[0], weights[1], eps, pe)


def kernel_heads(norm: QKNormRope) -> QKNormTables:
    """``norm`` as the heads epilogue reads it."""
    return QKNormTables(torch.stack([norm.query_weight, norm.key_weight]), norm.eps, rotation_tables(norm.rope))


def assert_heads_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Each head vector within two roundings of its largest element (the norm's, then the rotation's):
    rsqrt and fused multiply-adds may round differently from PyTorch's, and a rotation mixes a pair."""
    bound = 2 * ULP[want.dtype] * want.double().abs().amax(dim=-1, keepdim=True) + 1e-6
    err = (got.double() - want.double()).abs()
    assert got.shape == want.shape and (err <= bound).all(), f"error {(err / bound).max():.2f}× the bound"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch, tokens", [(1, 1), (2, 13), (1, 40)])
@pytest.mark.parametrize(
    "scheme, with_bias, rank", [("rowwise", True, 0), ("tensorwise", False, 0), ("rowwise", False, 5)]  # 5: a LoRA
)
def test_heads_epilogue_against_the_unfused_chain(device, dtype, batch, tokens, scheme, with_bias, rank):
    head, heads, k = 16, 3, 72
    weight = make_weight(3 * heads * head, k, scheme, with_bias, dtype, device)
    norm = qk_norm(tokens, head, device, dtype)
    x = torch.randn(batch * tokens, k, dtype=dtype, device=device)
    q, x_scale = kernels.quantize_tokens(x)
    lora = None
    if rank:  # a dynamic LoRA's term, added to the projection before the norms
        x_down = torch.randn(batch * tokens, rank, dtype=dtype, device=device) / 4
        up = torch.randn(3 * heads * head, rank, dtype=dtype, device=device)
        lora = LowRank(x_down, up, torch.rand(rank, device=device))
    epilogue = Epilogue(weight.bias, lora, heads=kernel_heads(norm))
    w_scale = weight.w_scale.reshape(-1)
    for config in configs_for(device):
        out = kernels.scaled_mm(q, x_scale, weight.w_int8, w_scale, dtype, epilogue, config)
        assert out.shape == (3, batch, tokens, heads, head) and out.dtype == dtype
        out = out.transpose(2, 3)  # q, k, v [batch, heads, tokens, head]
        # the same tile storing the projection itself, then the chain the models run unfused
        plain = kernels.scaled_mm(q, x_scale, weight.w_int8, w_scale, dtype, Epilogue(weight.bias, lora),
                                  kernels.heads_config(config, head))  # fmt: skip
        want_q, want_k, want_v = attention_inputs(plain.reshape(batch, tokens, -1), norm)
        assert torch.equal(out[2], want_v), config  # values are the projection, moved into head layout
        assert_heads_close(out[0], want_q)
        assert_heads_close(out[1], want_k)


@pytest.mark.gpu
def test_heads_epilogue_with_real_head_size_and_several_tiles_per_program():
    head, heads, k, batch, tokens = 128, 4, 256, 2, 300
    weight = make_weight(3 * heads * head, k, "rowwise", True, torch.bfloat16, "cuda")
    norm = qk_norm(tokens, head, "cuda", torch.bfloat16)
    q, x_scale = kernels.quantize_tokens(torch.randn(batch * tokens, k, dtype=torch.bfloat16, device="cuda"))
    epilogue = Epilogue(weight.bias, heads=kernel_heads(norm))
    for config in [*configs_for("cuda"), None]:  # None: the tuner's choice
        out = kernels.scaled_mm(q, x_scale, weight.w_int8, weight.w_scale.reshape(-1), torch.bfloat16, epilogue, config)
        plain = ops.int8_linear(ops.QuantizedInput(q, x_scale, (batch, tokens), torch.bfloat16), *weight)
        for got, want in zip(out.transpose(2, 3), attention_inputs(plain, norm)):
            assert_heads_close(got, want)


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("head", [16, 24])  # 24: no tile is one head wide, so Triton runs it unfused
def test_every_backend_gives_attention_inputs_of_the_int8_projection(backend, device, head):
    heads, batch, tokens = 2, 2, 5
    weight = make_weight(3 * heads * head, 32, "rowwise", True, torch.bfloat16, device)
    norm = qk_norm(tokens, head, device, torch.bfloat16)
    x = torch.randn(batch, tokens, 32, dtype=torch.bfloat16, device=device)
    with ops.use_backend(backend):
        got = ops.int8_attention_inputs(x, weight, norm)
        want = attention_inputs(ops.int8_linear(x, *weight), norm)
    for g, w in zip(got, want):
        assert g.shape == (batch, heads, tokens, head) and g.transpose(1, 2).is_contiguous()  # token-major
        if backend == "triton":
            assert_heads_close(g, w)
        else:  # the same computation
            assert torch.equal(g, w)


@pytest.mark.parametrize(
    "x_shape, n, rope_tokens, message",
    [
        ((10, 32), 48, 10, r"x \[batch, 10, K\]"),  # no batch axis
        ((2, 6, 32), 48, 5, r"x \[batch, 5, K\].*got x \(2, 6, 32\)"),  # a rotation per token
        ((2, 5, 32), 40, 5, r"3·heads·8 wide.*40 outputs"),
    ],
)
def test_bad_attention_inputs_are_refused(x_shape, n, rope_tokens, message):
    weight = make_weight(n, 32, "rowwise", False, torch.float32, "cpu")
    with pytest.raises(ValueError, match=message):
        ops.int8_attention_inputs(torch.randn(x_shape), weight, qk_norm(rope_tokens, 8, "cpu"))


def test_opcheck_of_the_heads_op():
    weight = make_weight(48, 40, "rowwise", True, torch.float32, "cpu")
    norm = qk_norm(5, 8, "cpu", torch.bfloat16)
    q, x_scale = ops.quantize_tokens_torch(torch.randn(10, 40))
    weights = torch.stack([norm.query_weight, norm.key_weight])
    tables = rotation_tables(norm.rope)
    args = (q, x_scale, weight.w_int8, weight.w_scale.reshape(-1), weight.bias, torch.bfloat16, weights, 1e-6, tables)
    torch.library.opcheck(ops.scaled_mm_heads, args)


def test_attention_inputs_compile_without_graph_breaks():
    weight = make_weight(48, 64, "rowwise", False, torch.bfloat16, "cpu")
    norm = qk_norm(8, 8, "cpu")
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(lambda x: ops.int8_attention_inputs(x, weight, norm))(
        torch.randn(2, 8, 64, dtype=torch.bfloat16)
    )
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    assert "int8_studio.scaled_mm_heads" in explanation.graphs[0].code


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=DEVICES[0].marks)])
@pytest.mark.parametrize(
    "arch_name, fused_projections, rank",  # rank 4: every int8 layer with a dynamic LoRA, added in the epilogue
    [
        ("flux2", lambda m: 2 * len(m.double_blocks) + len(m.single_blocks), 0),
        ("chroma", lambda m: 2 * len(m.double_blocks), 0),  # GELU single blocks project q|k|v with their MLP
        ("zimage", lambda m: len(m.layers), 0),  # the refiners stay bf16
        ("flux1", lambda m: 2 * len(m.double_blocks), 0),  # as Chroma's
        ("flux2", lambda m: 2 * len(m.double_blocks) + len(m.single_blocks), 4),
        ("zimage", lambda m: len(m.layers), 4),
    ],
)
def test_models_take_attention_inputs_from_the_gemm(arch_name, fused_projections, rank, backend, monkeypatch):
    """Each int8 q|k|v projection hands on attention's inputs; the model's output is that of the
    unfused chain (float32: the paths differ only in the norm's and rotation's float rounding)."""
    arch = REGISTRY[arch_name]
    torch.manual_seed(0)
    model = arch.build_module(arch.tiny["tiny"])
    quantize_model(model, arch, "rowwise", "none")
    if rank:
        with_loras(model, rank)
    inputs = model.random_inputs(2, 64, text=8)  # two samples: tiles cross a sample boundary
    calls = []

    def counting(*args):
        calls.append(args)
        return ops.int8_attention_inputs(*args)

    with torch.no_grad(), ops.use_backend(backend):
        monkeypatch.setattr(linear, "int8_attention_inputs", counting)
        fused = model(**inputs).double()
        assert len(calls) == fused_projections(model)
        monkeypatch.setattr(linear, "int8_attention_inputs", lambda x, weight, norm, lora=None: attention_inputs(
            ops.int8_linear(x, *weight, lora=lora), norm))  # fmt: skip
        unfused = model(**inputs).double()
    assert (fused - unfused).norm() / unfused.norm() < 1e-5


def test_rotation_tables_hold_the_rotations_bit_for_bit():
    pe = qk_norm(7, 16, "cpu").rope
    tables = rotation_tables(pe)
    assert tables.shape == (2, 7, 8) and tables.is_contiguous() and torch.equal(rope_of(tables), pe)


def test_heads_configs_are_one_head_wide_and_have_their_own_tuning_key():
    specialized = kernels.TileConfig(128, 256, 128, 4, 4, tma=True, persistent=True, tma_store=True, warp_specialize=True)
    assert kernels.heads_config(specialized, 128) == kernels.TileConfig(128, 128, 128, 4, 4, tma=True, persistent=True)
    candidates = kernels.candidate_configs("sm90", 4608, head=64)
    assert candidates and all(c.block_n == 64 and not (c.tma_store or c.warp_specialize) for c in candidates)
    assert len(set(candidates)) == len(candidates)
    norm = torch.ones(2, 128)
    w = torch.zeros(3 * 128, 16, dtype=torch.int8)
    epilogue = Epilogue(heads=QKNormTables(norm, 1e-6, torch.zeros(2, 5, 64)))
    assert kernels.epilogue_kind(w, epilogue) == "heads128"
    # the key in users' cache files (gemm-configs.json)
    assert kernels.GemmTuner._key(4608, 12288, 4096, 2, kernels.epilogue_key(w, epilogue)) == "8192,12288,4096,heads128"

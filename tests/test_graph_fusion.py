"""The fusions around the int8 ops in compiled graphs of model code that is not ours
(:mod:`engine.int8.graph_fusion`): what they rewrite, what they leave, and that the output stays the same."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing
import torch._inductor.config
import torch.nn.functional as F

from engine.int8 import graph_fusion
from engine.int8.backends import use_backend
from engine.int8.graph_fusion import Int8GraphFusion
from engine.int8.ops import LoraFactors, int8_linear
from engine.int8.quantize import quantize_weight
from tests.int8_reference import DEVICES, NEEDS_INTERPRETER

WIDTH, HIDDEN = 64, 48  # the block's width and its MLP's
SAME = {torch.float32: 1e-3, torch.bfloat16: 1e-2}
"""Relative distance of a fused output to the eager one: the same int8 products, but a fused kernel computes
a norm or an activation in another order (and a gate rounds once where eager rounds twice), which can move
a value that sits on a rounding boundary by one int8 step. A product on the wrong weight rows or an input
read at the wrong width is off by the order of the output."""


class Int8Layer(torch.nn.Module):
    """An int8 weight and its scale as parameters, as the node pack's layers hold them (dynamo keeps the
    shapes of parameters static; torch 2.11's dynamo cannot unpack a ``ParameterList``), and with
    ``rank`` a dynamic LoRA's factors (float32, as the node pack keeps them)."""

    def __init__(self, n: int, k: int, device: str, scheme: str = "rowwise", rank: int = 0) -> None:
        super().__init__()
        w_int8, w_scale = quantize_weight(torch.randn(n, k) / k**0.5, scheme)
        self.weight = torch.nn.Parameter(w_int8.to(device), requires_grad=False)
        self.weight_scale = torch.nn.Parameter(w_scale.to(device), requires_grad=False)
        self.lora = None
        if rank:  # a term of about a fifth of the output
            down, up = torch.randn(rank, k, device=device) / k**0.5, torch.randn(n, rank, device=device) / 4
            self.lora = LoraFactors(down, up, torch.rand(rank, device=device) / rank**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.weight, self.weight_scale, lora=self.lora)


class ForeignBlock(torch.nn.Module):
    """Model code as ComfyUI writes it: one int8 layer per Linear, finished tensors between them. A Flux.2
    double block's MLP (a fused gate|up layer, chunked), Z-Image's (``w1``, ``w3`` on one input), a Flux.2
    single block's (``linear1`` = q|k|v and the MLP's gate|up; ``linear2`` on the attention's output
    concatenated with the gated MLP), Chroma's GELU MLPs (a double block's, a single block's), a layer on
    a layer norm modulated per sample (ComfyUI's ``addcmul``, and the same as torch ≤ 2.11 decomposes it)
    and one on an RMS norm scaled per sample (Z-Image's). With ``rank``, every layer has a dynamic LoRA."""

    def __init__(self, device: str, tensorwise_w3: bool = False, rank: int = 0) -> None:
        super().__init__()
        w3 = "tensorwise" if tensorwise_w3 else "rowwise"
        self.layers = torch.nn.ModuleDict({
            "gate_up": Int8Layer(2 * HIDDEN, WIDTH, device, rank=rank),
            "down": Int8Layer(WIDTH, HIDDEN, device, rank=rank),
            "w1": Int8Layer(HIDDEN, WIDTH, device, rank=rank),
            "w3": Int8Layer(HIDDEN, WIDTH, device, w3, rank=rank),
            "linear1": Int8Layer(3 * WIDTH + 2 * HIDDEN, WIDTH, device, rank=rank),
            "linear2": Int8Layer(WIDTH, WIDTH + HIDDEN, device, rank=rank),
            "fc1": Int8Layer(HIDDEN, WIDTH, device, rank=rank),
            "fc2": Int8Layer(WIDTH, HIDDEN, device, rank=rank),
            "gelu_linear1": Int8Layer(3 * WIDTH + HIDDEN, WIDTH, device, rank=rank),
            "gelu_linear2": Int8Layer(WIDTH, WIDTH + HIDDEN, device, rank=rank),
            "modulated": Int8Layer(WIDTH, WIDTH, device, rank=rank),
            "decomposed_modulated": Int8Layer(WIDTH, WIDTH, device, rank=rank),
            "rms_modulated": Int8Layer(WIDTH, WIDTH, device, rank=rank),
        })  # fmt: skip
        self.rms_weight = torch.nn.Parameter(1 + torch.randn(WIDTH, device=device) / 4, requires_grad=False)

    def linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return self.layers[name](x)

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        a, b = self.linear("gate_up", x).chunk(2, dim=-1)
        double = self.linear("down", F.silu(a) * b)
        zimage = F.silu(self.linear("w1", x)) * self.linear("w3", x)
        qkv, mlp = torch.split(self.linear("linear1", x), [3 * WIDTH, 2 * HIDDEN], dim=-1)
        attention = qkv[..., :WIDTH] * qkv[..., 2 * WIDTH :].sigmoid()  # reads q and v, not k
        mlp = F.silu(mlp[..., HIDDEN:]) * mlp[..., :HIDDEN]  # the gate second, as Flux.2's "yak" MLP has it
        single = self.linear("linear2", torch.cat([attention, mlp], dim=-1))
        gelu_double = self.linear("fc2", F.gelu(self.linear("fc1", x), approximate="tanh"))
        qkv, mlp = torch.split(self.linear("gelu_linear1", x), [3 * WIDTH, HIDDEN], dim=-1)
        mlp = F.gelu(mlp, approximate="tanh")
        gelu_single = self.linear("gelu_linear2", torch.cat([qkv.unflatten(-1, (3, WIDTH)).sum(-2), mlp], -1))
        shift, scale = vec[:, None].chunk(2, dim=-1)
        modulated = self.linear("modulated", torch.addcmul(shift, F.layer_norm(x, (WIDTH,), eps=1e-6), 1 + scale))
        decomposed = shift.float() + F.layer_norm(x.float(), (WIDTH,), eps=1e-6) * 1 * (1 + scale).float()
        decomposed_modulated = self.linear("decomposed_modulated", decomposed.to(x.dtype))
        rms = F.rms_norm(x, (WIDTH,), self.rms_weight.to(x.dtype), eps=1e-5) * (1 + scale)
        rms_modulated = self.linear("rms_modulated", rms)
        outputs = [double, zimage, single, gelu_double, gelu_single, modulated, decomposed_modulated, rms_modulated]
        return torch.cat(outputs, dim=-1)


def compiled_with_fusion(fn, **compile_options):
    """``fn`` compiled by inductor with the pass, its graphs never taken from a cache (so the pass runs)."""
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(fn, backend=counter, fullgraph=True, **compile_options)
    return compiled, counter


@pytest.fixture()
def fusion_pass():
    Int8GraphFusion.totals.clear()
    with torch._inductor.config.patch(post_grad_custom_post_pass=Int8GraphFusion(), force_disable_caches=True):
        yield


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("dtype, rank", [(torch.float32, 0), (torch.bfloat16, 0), (torch.float32, 3)])  # 3: a LoRA
@pytest.mark.parametrize("device", DEVICES)  # on every layer, which keeps every fusion
def test_foreign_block_runs_fused_with_the_same_output(fusion_pass, device, dtype, rank):
    block = ForeignBlock(device, rank=rank)
    x = torch.randn(2, 37, WIDTH, device=device, dtype=dtype)
    vec = torch.randn(2, 2 * WIDTH, device=device, dtype=dtype) / 4
    with use_backend("triton"), torch.inference_mode():
        eager = block(x, vec)
        compiled, _ = compiled_with_fusion(block)
        fused = compiled(x, vec)
        if rank:  # the terms count: a fusion that dropped one would be off by far more than SAME
            loras = {name: layer.lora for name, layer in block.layers.items()}
            for layer in block.layers.values():
                layer.lora = None
            assert relative(eager, block(x, vec)) > 0.05
            for name, layer in block.layers.items():
                layer.lora = loras[name]
    assert dict(Int8GraphFusion.totals) == {
        "shared quantizations": 5,  # x quantized once for gate_up, w1, w3, linear1, fc1 and gelu_linear1
        "gated GEMMs": 3,
        "narrowed GEMMs": 1,  # linear1: q|k|v alone, its MLP half gated
        # linear2 and gelu_linear2 (never concatenated), fc2 (GELU on the way in), the three normalized
        "fused quantizations": 6,
        "inlined RoPE": 0,  # test_comfy_kitchens_rope_is_inlined_with_its_result
    }
    assert relative(fused, eager) < SAME[dtype]


@pytest.mark.parametrize("device", DEVICES)
def test_fusions_hold_for_any_token_count(fusion_pass, device):
    block = ForeignBlock(device)
    with use_backend("triton"), torch.inference_mode():
        compiled, counter = compiled_with_fusion(block, dynamic=True)
        for tokens in (37, 53):
            x, vec = torch.randn(2, tokens, WIDTH, device=device), torch.randn(2, 2 * WIDTH, device=device) / 4
            assert relative(compiled(x, vec), block(x, vec)) < SAME[torch.float32]
    assert counter.frame_count == 1
    assert Int8GraphFusion.totals["gated GEMMs"] == 3


@pytest.mark.parametrize("device", DEVICES)
def test_what_is_not_one_gated_product_stays(fusion_pass, device):
    """No gate for: products of different inputs, a tensor-wise layer beside a row-wise one (their scales
    differ in kind). No activation in the quantization of a layer whose input regroups the activated
    channels into other tokens. Quantized the ordinary way, all of them."""
    block = ForeignBlock(device, tensorwise_w3=True)

    def forward(x, y):
        other_inputs = F.silu(block.linear("w1", x)) * block.linear("w1", y)
        kinds = F.silu(block.linear("w1", x)) * block.linear("w3", x)
        regrouped = F.gelu(block.linear("gate_up", x), approximate="tanh").reshape(-1, HIDDEN)  # 2 tokens a row
        return torch.cat([other_inputs, kinds], dim=-1), block.linear("fc2", regrouped)

    x, y = (torch.randn(37, WIDTH, device=device) for _ in range(2))
    with use_backend("triton"), torch.inference_mode():
        compiled, _ = compiled_with_fusion(forward)
        for fused, eager in zip(compiled(x, y), forward(x, y), strict=True):
            assert relative(fused, eager) < SAME[torch.float32]
    assert Int8GraphFusion.totals["gated GEMMs"] == Int8GraphFusion.totals["fused quantizations"] == 0


@NEEDS_INTERPRETER
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_comfy_kitchens_rope_is_inlined_with_its_result(fusion_pass, dtype):
    """comfy-kitchen's RoPE op, as ComfyUI's Flux family calls it on projected q and k, becomes aten ops that
    inductor fuses, computing what the op computes, for any token count."""
    pytest.importorskip("comfy_kitchen")  # registers torch.ops.comfy_kitchen
    heads, head = 4, WIDTH // 4
    wq, wk = (Int8Layer(WIDTH, WIDTH, "cpu") for _ in range(2))
    omega = 1 / 10_000 ** (torch.arange(head // 2) / (head // 2))

    def forward(x):
        tokens = x.shape[0]
        q, k = (w(x).view(1, tokens, heads, head).transpose(1, 2) for w in (wq, wk))
        angles = torch.arange(tokens, dtype=torch.float32)[:, None] * omega  # ComfyUI's [[cos, -sin], [sin, cos]]
        freqs = torch.stack([angles.cos(), -angles.sin(), angles.sin(), angles.cos()], -1)
        return torch.ops.comfy_kitchen.apply_rope(q, k, freqs.view(1, 1, tokens, head // 2, 2, 2))

    with use_backend("triton"), torch.inference_mode():
        compiled, counter = compiled_with_fusion(forward)
        for tokens in (37, 53):  # the token count dynamic, as ComfyUI's resolutions make it
            x = torch.randn(tokens, WIDTH, dtype=dtype)
            torch._dynamo.mark_dynamic(x, 0)
            for fused, eager in zip(compiled(x), forward(x), strict=True):
                assert relative(fused, eager) < SAME[dtype]
    assert counter.frame_count == 1 and Int8GraphFusion.totals["inlined RoPE"] == 1


@pytest.mark.parametrize("device", DEVICES)
def test_a_failing_rewrite_leaves_a_working_graph(fusion_pass, device, monkeypatch, caplog):
    """A rewrite that fails after changing the graph (here: once it gated the products) costs its count,
    never the compile: the graph runs, as right as before, the later rewrites still run, and a warning
    names the one that failed."""

    def gate_then_fail(graph, build):
        original_gate(graph, build)
        raise RuntimeError("a graph this rewrite was not written for")

    original_gate = graph_fusion.gate_products
    rewrites = [(n, gate_then_fail if f is original_gate else f) for n, f in graph_fusion.REWRITES]
    monkeypatch.setattr(graph_fusion, "REWRITES", tuple(rewrites))
    block = ForeignBlock(device)
    x, vec = torch.randn(2, 37, WIDTH, device=device), torch.randn(2, 2 * WIDTH, device=device) / 4
    with use_backend("triton"), torch.inference_mode():
        compiled, _ = compiled_with_fusion(block)
        assert relative(compiled(x, vec), block(x, vec)) < SAME[torch.float32]
    assert "graph fusion (gated GEMMs) failed; that part of the graph runs unfused" in caplog.text
    assert Int8GraphFusion.totals["narrowed GEMMs"] == 1 and "gated GEMMs" not in Int8GraphFusion.totals


def test_install_puts_the_pass_in_inductors_config_once(monkeypatch):
    with torch._inductor.config.patch(post_grad_custom_post_pass=None):
        monkeypatch.setenv("INT8_STUDIO_GRAPH_FUSION", "0")  # the user's way to turn it off
        assert not graph_fusion.install() and torch._inductor.config.post_grad_custom_post_pass is None
        monkeypatch.delenv("INT8_STUDIO_GRAPH_FUSION")
        assert graph_fusion.install()
        installed = torch._inductor.config.post_grad_custom_post_pass
        assert isinstance(installed, Int8GraphFusion)
        assert graph_fusion.install() and torch._inductor.config.post_grad_custom_post_pass is installed
    other = Int8GraphFusion.__mro__[1]  # another pass (any CustomGraphPass) is left where it is

    class Other(other):
        def __call__(self, graph):
            pass

        def uuid(self):
            return b"other"

    with torch._inductor.config.patch(post_grad_custom_post_pass=Other()):
        assert not graph_fusion.install()
        assert isinstance(torch._inductor.config.post_grad_custom_post_pass, Other)

"""Int8Linear: building, the file format's state dict, device and dtype moves, the float switch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.int8.backends import quantize_tokens_torch
from engine.int8.linear import Int8Linear, QuantizedLayerError
from engine.int8.quantize import dequantize_weight, quantize_weight
from engine.lora.dynamic import Factors, LoraAdapter
from tests.int8_reference import assert_within_int8_rounding


@pytest.mark.parametrize("scheme", ["tensorwise", "rowwise"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_from_float_quantizes_and_runs_within_int8_rounding(scheme, with_bias):
    linear = torch.nn.Linear(96, 40, bias=with_bias)
    layer = Int8Linear.from_float(linear, scheme)
    q, scale = quantize_weight(linear.weight.detach(), scheme)
    assert torch.equal(layer.weight, q) and torch.equal(layer.weight_scale, scale)
    x = torch.randn(3, 5, 96)
    out = layer(x)
    assert out.shape == (3, 5, 40)
    bias = linear.bias.detach() if with_bias else None
    assert_within_int8_rounding(out.reshape(-1, 40), x.reshape(-1, 96), q, scale, bias)


@pytest.mark.parametrize("scheme", ["tensorwise", "rowwise"])
def test_state_dict_uses_the_file_format(scheme):
    layer = Int8Linear.from_float(torch.nn.Linear(32, 24), scheme)
    state = layer.state_dict()
    assert list(state) == ["weight", "weight_scale", "bias"]
    assert state["weight"].dtype == torch.int8 and state["weight"].shape == (24, 32)
    assert state["weight_scale"].dtype == torch.float32
    assert state["weight_scale"].shape == (() if scheme == "tensorwise" else (24, 1))
    assert "bias" not in Int8Linear.from_float(torch.nn.Linear(32, 24, bias=False)).state_dict()


@pytest.mark.parametrize("file_scale_shape", [(), (1,), (24,), (24, 1)])
def test_load_state_dict_takes_any_scale_kind_and_the_comfy_quant_marker(file_scale_shape):
    source = torch.nn.Linear(32, 24)
    tensorwise = file_scale_shape in ((), (1,))
    q, scale = quantize_weight(source.weight.detach(), "tensorwise" if tensorwise else "rowwise")
    state = {
        "weight": q,
        "weight_scale": scale.reshape(file_scale_shape),
        "bias": source.bias.detach(),
        "comfy_quant": torch.tensor(list(b'{"format": "int8_tensorwise"}'), dtype=torch.uint8),
    }
    layer = Int8Linear.from_float(torch.nn.Linear(32, 24), "rowwise" if tensorwise else "tensorwise")
    layer.load_state_dict(state)
    assert torch.equal(layer.weight, q)
    assert torch.equal(layer.weight_scale, scale.reshape(() if scale.numel() == 1 else (24, 1)))
    x = torch.randn(4, 32)
    torch.testing.assert_close(layer(x), Int8Linear(q, scale, source.bias.detach())(x), rtol=0, atol=0)


def test_dtype_moves_keep_weight_int8_and_scale_float32():
    layer = Int8Linear.from_float(torch.nn.Linear(32, 24), "rowwise")
    scale = layer.weight_scale.clone()
    layer = layer.to(torch.bfloat16)
    assert layer.weight.dtype == torch.int8 and layer.bias.dtype == torch.bfloat16
    assert torch.equal(layer.weight_scale, scale)
    layer = layer.to("meta")
    assert {t.device.type for t in layer.state_dict().values()} == {"meta"}
    assert layer.weight_scale.dtype == torch.float32


@pytest.mark.gpu
def test_cuda_round_trip():
    layer = Int8Linear.from_float(torch.nn.Linear(64, 48), "rowwise").cuda()
    assert all(t.is_cuda for t in layer.state_dict().values())
    x = torch.randn(20, 64, device="cuda")
    torch.testing.assert_close(layer(x).cpu(), layer.cpu()(x.cpu()), rtol=1e-5, atol=1e-5)


def test_use_float_runs_the_dequantized_float_layer():
    layer = Int8Linear.from_float(torch.nn.Linear(64, 32), "rowwise").to(torch.bfloat16)
    x = torch.randn(7, 64, dtype=torch.bfloat16)
    quantized = layer(x)
    layer.use_float = True
    expected = F.linear(x, dequantize_weight(layer.weight, layer.weight_scale, torch.bfloat16), layer.bias)
    assert torch.equal(layer(x), expected)
    assert not torch.equal(quantized, expected)


@pytest.mark.parametrize("use_float", [False, True])
def test_lora_term_is_added(use_float):
    layer = Int8Linear.from_float(torch.nn.Linear(16, 8))
    layer.use_float = use_float
    x = torch.randn(3, 16)
    base = layer(x)
    layer.lora = LoraAdapter(16, 8, torch.device("cpu"), torch.float32)
    layer.lora.append("a", Factors(torch.randn(4, 16), torch.randn(8, 4), torch.full((4,), 0.25)), strength=2.0)
    # an int8 layer's LoRA sees the int8 tokens its weight sees; a float layer's, the input itself
    q, x_scale = quantize_tokens_torch(x)
    tokens = x if use_float else q.float() * x_scale[:, None]
    torch.testing.assert_close(layer(x), base + layer.lora(tokens))
    layer.lora.set_strength("a", 0.0)
    assert torch.equal(layer(x), base)


@pytest.mark.parametrize(
    "weight, scale, bias, message",
    [
        (torch.zeros(4, 8), torch.ones(()), None, r"Int8Linear weight must be a 2-D int8 tensor, got torch.float32 \[4, 8\]"),
        (torch.zeros(4, 8, dtype=torch.int8), torch.ones(3), None,
         r"weight_scale has shape \[3\] but the weight has 4 output channels: expected \[\], \[1\], \[4\] or \[4, 1\]; re-convert the checkpoint"),
        (torch.zeros(4, 8, dtype=torch.int8), torch.ones(4, 2), None, r"weight_scale has shape \[4, 2\]"),
        (torch.zeros(4, 8, dtype=torch.int8), torch.tensor([1.0, 0.0, 1.0, 1.0]), None,
         "weight_scale holds zero, negative or non-finite values: the checkpoint is damaged; re-convert it"),
        (torch.zeros(4, 8, dtype=torch.int8), torch.tensor(float("nan")), None, "weight_scale holds zero, negative or non-finite"),
        (torch.zeros(4, 8, dtype=torch.int8), torch.ones(()), torch.zeros(5), r"Int8Linear bias has shape \[5\]; expected \[4\]"),
    ],
)
def test_bad_tensors_are_refused(weight, scale, bias, message):
    with pytest.raises(QuantizedLayerError, match=message):
        Int8Linear(weight, scale, bias)

import pytest
import torch

from engine.int8.quantize import dequantize_weight, quantize_weight


@pytest.mark.parametrize("scheme", ["tensorwise", "rowwise"])
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (65, 3), (300, 257)])
def test_dequantized_weight_within_half_a_step(scheme, shape):
    w = torch.randn(shape, dtype=torch.bfloat16) * torch.rand(shape[0], 1).to(torch.bfloat16)
    q, scale = quantize_weight(w, scheme)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert scale.shape == (() if scheme == "tensorwise" else (shape[0], 1))
    assert q.abs().max() <= 127
    err = (dequantize_weight(q, scale).double() - w.double()).abs()
    # half a grid step, plus float32 rounding of w / scale and of q · scale (|q| ≤ 127: 127 · 2⁻²⁴ of a
    # step each)
    assert (err <= scale.double() * (0.5 + 2 * 127 * 2**-24)).all()


def test_rowwise_scale_is_each_channels_absmax():
    w = torch.randn(9, 31)
    q, scale = quantize_weight(w, "rowwise")
    torch.testing.assert_close(scale.squeeze(1), w.abs().amax(1) / 127)
    assert (q.abs().amax(1) == 127).all()


@pytest.mark.parametrize("scheme", ["tensorwise", "rowwise"])
def test_zero_channels_keep_zero_and_scale_one(scheme):
    w = torch.randn(4, 8)
    w[2] = 0
    if scheme == "tensorwise":
        w.zero_()
    q, scale = quantize_weight(w, scheme)
    assert (q[2] == 0).all()
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert scale.flatten()[2 if scheme == "rowwise" else 0] == 1.0


def test_chunked_quantization_matches_single_pass(monkeypatch):
    import engine.int8.quantize as quantize

    w = torch.randn(37, 19)
    whole = quantize_weight(w, "rowwise")
    monkeypatch.setattr(quantize, "CHUNK_ELEMENTS", 19 * 4)
    chunked = quantize_weight(w, "rowwise")
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])


def test_non_finite_weight_is_refused():
    w = torch.randn(3, 3)
    w[1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_weight(w)


@pytest.mark.parametrize("scale_shape", [(), (1,), (5,), (5, 1)])
def test_dequantize_accepts_every_comfyui_scale_shape(scale_shape):
    q = torch.randint(-127, 128, (5, 4), dtype=torch.int8)
    scale = torch.rand(scale_shape) + 0.1
    expected = q.float() * (scale.reshape(5, 1) if scale.numel() == 5 else scale.reshape(()))
    torch.testing.assert_close(dequantize_weight(q, scale), expected)

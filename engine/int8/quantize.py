"""Symmetric int8 weight quantization: tensor-wise or row-wise (per output channel) scales.

``W ≈ q * scale`` with ``q = clamp(round(W / scale), -127, 127)`` and ``scale = absmax / 127``.
-128 is never used, so the grid is symmetric and negation is exact. A tensor or output channel that is
all zeros gets scale 1 (not 0) so that dequantization never divides by zero and the zeros stay zeros.

Work happens in float32 on the GPU when one is available, in chunks of output channels so the float32
temporaries stay small whatever the size of the weight.
"""

from __future__ import annotations

import torch

from engine.int8.choices import SCHEMES, Scheme
from engine.int8.rotation import check_group, rotate

QMAX = 127
MIN_ABSMAX = 2.0**-100
"""Tokens (activations) are quantized with ``absmax`` clamped to at least this: an all-zero token gets
zeros and a finite scale instead of a division by zero."""
CHUNK_ELEMENTS = 1 << 24  # float32 temporaries of at most 64 MB


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _channel_chunks(channels: int, width: int) -> range:
    """Starts of the chunks of output channels, ``width`` values each, that hold ``CHUNK_ELEMENTS``."""
    step = max(1, CHUNK_ELEMENTS // max(1, width))
    return range(0, channels, step)


def absmax_scale(absmax: torch.Tensor) -> torch.Tensor:
    """float32 scale for the given absolute maxima; zero (or non-finite) maxima give scale 1."""
    absmax = absmax.float()
    scale = absmax / QMAX
    return torch.where((absmax > 0) & torch.isfinite(absmax), scale, torch.ones_like(scale))


def quantize_with_scale(
    w: torch.Tensor, scale: torch.Tensor, scratch: torch.Tensor | None = None
) -> torch.Tensor:
    """Round ``w / scale`` to the int8 grid; ``scale`` broadcasts against ``w`` (shape [] or [out, 1]).

    One float32 copy of ``w`` (into ``scratch``, a float32 buffer of at least ``w.numel()`` elements
    reused across calls, when given), then in place: a third of the memory traffic of out-of-place
    ops, and no fresh pages to fault in for every chunk.
    """
    if scratch is None:
        scratch = torch.empty(w.numel(), dtype=torch.float32, device=w.device)
    x = scratch[: w.numel()].view(w.shape).copy_(w)
    return x.div_(scale).round_().clamp_(-QMAX, QMAX).to(torch.int8)


def quantize_weight(
    w: torch.Tensor, scheme: Scheme = "tensorwise", device: torch.device | None = None, rotation: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D weight [out, in]. Returns ``(q, scale)`` on the CPU.

    ``q`` is int8 [out, in]; ``scale`` is float32, shape ``[]`` (tensorwise) or ``[out, 1]`` (rowwise).
    With ``rotation`` (a Hadamard group size, :mod:`engine.int8.rotation`) each channel is rotated first:
    ``q · scale ≈ W·Hᵀ``. Non-finite weights are refused: a NaN in a checkpoint is corruption, not
    something to round.
    """
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; expected one of {', '.join(SCHEMES)}")
    device = device or default_device()
    channels, width = w.shape
    chunks = _channel_chunks(channels, width)
    if rotation:
        check_group(rotation, width)

    def part_of(start: int) -> torch.Tensor:
        part = w[start : start + chunks.step].to(device)
        return rotate(part, rotation) if rotation else part

    def channel_absmax(part: torch.Tensor) -> torch.Tensor:
        # in the part's own dtype (no float32 copy); amax + amin beat aminmax along a channel
        absmax = torch.maximum(-part.amin(dim=1).float(), part.amax(dim=1).float())
        if not torch.isfinite(absmax).all():  # NaN propagates through amax and amin
            raise ValueError("weight contains NaN or Inf values")
        return absmax

    tensor_scale = None
    if scheme == "tensorwise":  # the whole weight's absmax first: a pass of its own
        absmax = max((float(channel_absmax(part_of(start)).max()) for start in chunks), default=0.0)
        tensor_scale = absmax_scale(torch.tensor(absmax))
    q = torch.empty(channels, width, dtype=torch.int8)
    channel_scale = torch.empty(channels, 1)
    scratch = torch.empty(min(channels, chunks.step) * width, dtype=torch.float32, device=device)
    for start in chunks:  # rowwise: one pass, each channel scaled by its own absmax
        part = part_of(start)
        part_scale = absmax_scale(channel_absmax(part)).unsqueeze(1) if tensor_scale is None else tensor_scale
        q[start : start + chunks.step] = quantize_with_scale(part, part_scale.to(device), scratch).cpu()
        if tensor_scale is None:
            channel_scale[start : start + chunks.step] = part_scale.cpu()
    return q, channel_scale if tensor_scale is None else tensor_scale


def dequantize_weight(
    q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``q * scale`` in ``dtype``. Accepts every scale shape ComfyUI accepts: [], [1], [out], [out, 1]."""
    scale = scale.float()
    if scale.ndim == 1 and scale.numel() == q.shape[0] and q.shape[0] != 1:
        scale = scale.unsqueeze(1)
    elif scale.numel() == 1:
        scale = scale.reshape(())
    return (q.float() * scale).to(dtype)

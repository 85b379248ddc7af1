"""Hadamard rotation of int8 layers ("ConvRot", the convention ComfyUI's INT8 layers read).

Each output channel of a weight is cut into groups of ``group`` input channels and every group is
multiplied by ``H``, the normalized *regular* Hadamard matrix of that order (Kronecker powers of the 4×4
regular Hadamard matrix, divided by √group): ``W_rot = W·Hᵀ``. At run time the activations get the same
treatment, ``x_rot = x·H``, so ``x_rot·W_rotᵀ = x·H·Hᵀ·Wᵀ = x·Wᵀ``. The rotation spreads a few large
channels over the whole group: heavy-tailed inputs (the GELU/SiLU-gated inputs of down-projections)
lose most of their outliers before per-token int8 quantization, and their int8 error drops by half or
more; Gaussian-like inputs gain nothing and lose nothing.

``H`` is symmetric and orthogonal, so it is its own inverse: :func:`rotate` also un-rotates. A file
marks a rotated layer with ``"convrot": true, "convrot_groupsize": G`` in its ``comfy_quant`` entry;
this module reads and writes those markers (:func:`parse_marker`, :func:`comfy_quant_entry`).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping

import torch

from engine.jobs import JobError

GROUP_SIZE = 256
"""The group size we write (and ComfyUI's default): 4⁴, so ``H`` = H₁₆ ⊗ H₁₆ with entries ±1/16."""

_H4 = ((1, 1, 1, -1), (1, 1, -1, 1), (1, -1, 1, 1), (-1, 1, 1, 1))


class RotationError(JobError):
    """A rotation that cannot be applied: a group size that is not a power of 4, or that does not
    divide the layer's input width."""


def check_group(group: int, in_features: int) -> None:
    if group < 4 or 4 ** round(math.log(group, 4)) != group:
        raise RotationError(f"Hadamard group size {group} is not a power of 4 (16, 64, 256, …)")
    if in_features % group:
        raise RotationError(f"Hadamard group size {group} does not divide the layer's {in_features} inputs")


def can_rotate(in_features: int, group: int = GROUP_SIZE) -> bool:
    return in_features % group == 0


def hadamard(size: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The normalized regular Hadamard matrix of order ``size`` (a power of 4): symmetric, orthogonal.
    Cached per device and dtype (no host-to-device copy per call; CUDA-graph capture allows none)."""
    check_group(size, size)
    return _hadamard(size, torch.device(device), dtype)


@functools.cache
def _hadamard(size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    h4 = torch.tensor(_H4, dtype=torch.float64)
    h = h4
    while h.shape[0] < size:
        h = torch.kron(h, h4)
    return (h / math.sqrt(size)).to(device, dtype)


def rotate(t: torch.Tensor, group: int) -> torch.Tensor:
    """``t`` [..., K] with each group of ``group`` channels multiplied by ``H``, in float32.

    ``H`` of order a·b is ``H_a ⊗ H_b``, so a group seen as an a×b matrix X becomes ``H_a·X·H_b``:
    a + b multiply-adds per value instead of a·b (32 instead of 256 for groups of 256). Rotating twice
    gives ``t`` back (up to float32 rounding)."""
    check_group(group, t.shape[-1])
    a = 4 ** (round(math.log(group, 4)) // 2)
    b = group // a
    x = t.float().reshape(-1, a, b) @ hadamard(b, t.device)
    if a > 1:
        x = hadamard(a, t.device) @ x
    return x.reshape(t.shape)


def parse_marker(marker: torch.Tensor | bytes, name: str) -> dict[str, object]:
    """The JSON object a ``comfy_quant`` uint8 tensor (or its bytes) holds."""
    data = marker if isinstance(marker, bytes) else bytes(marker.cpu().tolist())
    try:
        entry = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        entry = None
    if not isinstance(entry, dict):
        raise RotationError(f"'{name}' is not a JSON object: the file is damaged")
    return entry


def marker_group(entry: object) -> int:
    """The rotation group size a ``comfy_quant`` entry declares (0: not rotated)."""
    if not isinstance(entry, Mapping) or not entry.get("convrot"):
        return 0
    group = entry.get("convrot_groupsize", GROUP_SIZE)
    if not isinstance(group, int) or isinstance(group, bool):
        raise RotationError(f"convrot_groupsize {group!r} is not an integer")
    return group


def marker_fields(group: int) -> dict[str, object]:
    """What a rotated layer adds to its ``comfy_quant`` entry."""
    return {"convrot": True, "convrot_groupsize": group} if group else {}


INT8_FORMAT = "int8_tensorwise"
"""The comfy_quant format of both schemes: ComfyUI reads the granularity off the scale's shape."""


def comfy_quant_entry(rotation: int = 0) -> dict[str, object]:
    """An int8 layer's ``comfy_quant`` marker; a rotated layer's also names its Hadamard group size."""
    return {"format": INT8_FORMAT, **marker_fields(rotation)}


def json_bytes(entry: dict) -> torch.Tensor:
    """The uint8 tensor of a ``comfy_quant`` marker: the bytes of ``json.dumps(entry)``."""
    return torch.tensor(list(json.dumps(entry).encode("utf-8")), dtype=torch.uint8)

"""Putting int8 layers into a model: quantizing its float linears, or loading the ones a file stores.

Model code never knows it is quantized (:mod:`engine.fusion`): this module swaps the ``nn.Linear``
layers the architecture allows (``Architecture.keeps_high_precision``) for :class:`Int8Linear`, which
takes the inputs the model declares and fuses what it can.
"""

from __future__ import annotations

from collections.abc import Callable
from fnmatch import fnmatchcase

import torch
from torch import nn

from engine.checkpoint import CheckpointReader
from engine.info import listed_layers
from engine.int8.attention import use_attention
from engine.int8.choices import DEFAULT_ATTENTION, DEFAULT_SCHEME, AttentionChoice, RotationPolicy, Scheme
from engine.int8.linear import Int8Linear
from engine.int8.rotation import GROUP_SIZE, can_rotate, marker_group, parse_marker
from engine.models.build import Make, replace_linears
from engine.models.detect import DetectedModel
from engine.models.spec import Architecture, Shape


def rotation_group(arch: Architecture, name: str, shape: Shape, policy: RotationPolicy) -> int:
    """The Hadamard group size weight ``name`` is rotated with under ``policy`` (0: none): ``down``
    rotates the architecture's down-projections, ``all`` every layer; a layer whose input width is
    not a multiple of the group stays unrotated."""
    if policy == "none" or not can_rotate(shape[1]):
        return 0
    if policy == "down" and not any(fnmatchcase(name, p) for p in arch.down_projections):
        return 0
    return GROUP_SIZE


def quantizer(arch: Architecture, scheme: Scheme = DEFAULT_SCHEME, rotate: RotationPolicy = "none") -> Make:
    """``make`` turning a float linear into an ``Int8Linear`` (``scheme`` weight scales, per-token int8
    activations, Hadamard-rotated as ``rotate`` says)."""

    def make(name: str, linear: nn.Linear) -> Int8Linear:
        return Int8Linear.from_float(linear, scheme, rotation_group(arch, name, tuple(linear.weight.shape), rotate))

    return make


def quantize_model(
    model: nn.Module,
    arch: Architecture,
    scheme: Scheme = DEFAULT_SCHEME,
    rotate: RotationPolicy = "none",
    attention: AttentionChoice = DEFAULT_ATTENTION,
) -> int:
    """Replace the eligible float linears by ``Int8Linear`` (:func:`quantizer`) and run attention as
    ``attention`` says (:func:`~engine.int8.attention.use_attention`). Returns the number of layers
    quantized."""
    use_attention(model, attention)
    return replace_linears(model, arch, quantizer(arch, scheme, rotate))


class Int8Layers:
    """The int8 layers of a checkpoint, for ``engine.models.build``'s loaders (``stored``): each as an
    ``Int8Linear`` with the file's tensors and rotation, or, with ``dequantize``, as an ``nn.Linear``
    holding the dequantized weight in ``dtype``."""

    def __init__(self, reader: CheckpointReader, detected: DetectedModel, dtype: torch.dtype, dequantize: bool = False):
        self.layers = set(detected.int8_layers)
        self.rotations = layer_rotations(reader, detected)
        self.dtype, self.dequantize = dtype, dequantize

    def build(self, layer: str, read: Callable[[str], torch.Tensor | None]) -> nn.Module:
        """Layer ``layer`` from its tensors: ``read("weight")`` etc. (None for a tensor the file lacks)."""
        read("comfy_quant")  # the rotation it holds is in self.rotations
        bias = read("bias")
        bias = bias.to(self.dtype) if bias is not None else None
        quantized = Int8Linear(read("weight"), read("weight_scale"), bias, self.rotations.get(layer, 0))
        if not self.dequantize:
            return quantized
        linear = nn.Linear(quantized.in_features, quantized.out_features, bias=bias is not None, device="meta")
        linear.weight = nn.Parameter(quantized.dequantized_weight(self.dtype), requires_grad=False)
        if bias is not None:
            linear.bias = nn.Parameter(bias, requires_grad=False)
        return linear


def layer_rotations(reader: CheckpointReader, detected: DetectedModel) -> dict[str, int]:
    """The Hadamard group size of each rotated int8 layer (:mod:`engine.int8.rotation`), from its
    ``comfy_quant`` marker or, for a layer without one, its entry in the header's
    ``_quantization_metadata``. Layers missing here are not rotated."""
    markers = {t.name: t for t in detected.tensors if t.name.endswith(".comfy_quant")}
    listed = listed_layers(reader.metadata) or {}
    groups = {}
    for layer in detected.int8_layers:
        marker = markers.get(f"{layer}.comfy_quant")
        if marker is not None:
            entry = parse_marker(marker.build([reader.get(s) for s in marker.sources]), marker.sources[0])
        else:
            entry = listed.get(detected.prefix + layer)
        if group := marker_group(entry):
            groups[layer] = group
    return groups

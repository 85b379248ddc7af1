"""``Int8Linear``: an ``nn.Linear`` replacement holding an int8 weight and its float32 scale.

Its state dict uses the file format's names (``weight`` int8 [out, in], ``weight_scale`` float32 ``[]``
or ``[out, 1]``, ``bias``), so a layer loads straight from a converted checkpoint. A Hadamard-rotated
layer (:mod:`engine.int8.rotation`) knows its group size as ``rotation``; the loaders read it from the
file's ``comfy_quant`` marker. Moving the module to another dtype converts the bias only:
the weight stays int8 and the scale float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.fusion import FusedLinear, Heads, Input
from engine.heads import QKNormRope
from engine.int8.ops import (
    Int8Weight,
    LoraFactors,
    QuantizedInput,
    int8_attention_inputs,
    int8_linear,
    int8_swiglu,
    quantize_input,
)
from engine.int8.quantize import Scheme, dequantize_weight, quantize_weight
from engine.int8.rotation import (
    RotationError,
    check_group,
    marker_group,
    parse_marker,
    rotate,
)
from engine.jobs import JobError


class QuantizedLayerError(JobError):
    """The tensors of an int8 layer do not fit together (wrong dtype, shape or scale values)."""


def normalize_scale(scale: torch.Tensor, out_features: int) -> torch.Tensor:
    """float32 scale of shape ``[]`` (tensor-wise) or ``[out, 1]`` (row-wise) from any accepted shape."""
    if scale.numel() == 1 and scale.ndim <= 2:
        return scale.reshape(()).float()
    if scale.numel() == out_features and scale.ndim in (1, 2) and scale.shape[0] == out_features:
        return scale.reshape(out_features, 1).float()
    raise QuantizedLayerError(
        f"weight_scale has shape {list(scale.shape)} but the weight has {out_features} output channels: "
        f"expected [], [1], [{out_features}] or [{out_features}, 1]; re-convert the checkpoint"
    )


def _checked_rotation(group: int, in_features: int) -> int:
    try:
        if group:
            check_group(group, in_features)
    except RotationError as e:
        raise QuantizedLayerError(f"the layer cannot be rotated as marked: {e}") from None
    return group


def check_int8_tensors(
    weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None, rotation: int = 0
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """An int8 layer's tensors checked and normalised: ``(weight, scale, rotation)`` with the scale
    float32 ``[]`` or ``[out, 1]`` on the weight's device (:func:`normalize_scale`), or a
    :class:`QuantizedLayerError` saying what does not fit (dtype, shape, scale values, rotation)."""
    if weight.dtype != torch.int8 or weight.ndim != 2:
        raise QuantizedLayerError(
            f"Int8Linear weight must be a 2-D int8 tensor, got {weight.dtype} {list(weight.shape)}"
        )
    out_features, in_features = weight.shape
    scale = normalize_scale(weight_scale, out_features)
    if not (torch.isfinite(scale).all() and (scale > 0).all()):
        raise QuantizedLayerError(
            "weight_scale holds zero, negative or non-finite values: the checkpoint is damaged; re-convert it"
        )
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise QuantizedLayerError(f"Int8Linear bias has shape {list(bias.shape)}; expected [{out_features}]")
    return weight, scale.to(weight.device), _checked_rotation(rotation, in_features)


def float_weight(weight: torch.Tensor, weight_scale: torch.Tensor, rotation: int = 0) -> torch.Tensor:
    """The float32 weight an int8 layer stands for: its int8 values times their scale, rotated back when
    the layer stores them rotated by groups of ``rotation`` input channels."""
    w = dequantize_weight(weight, weight_scale)
    return rotate(w, rotation) if rotation else w


def int8_kind(weight_scale: torch.Tensor, rotation: int) -> str:
    """An int8 layer's kind in words, for reprs: its scheme ("rowwise", "tensorwise") and rotation."""
    kind = "tensorwise" if weight_scale.ndim == 0 else "rowwise"
    return f"{kind}, rotated by {rotation}" if rotation else kind


def _take_file_format(module: Int8Linear, state_dict, prefix, *args) -> None:
    """``load_state_dict``'s pre-hook: take the file's ``comfy_quant`` marker (whether the weight is
    rotated) out of ``state_dict``, and its ``weight_scale`` in whichever accepted kind or shape it has
    (:func:`normalize_scale`), resizing the module's scale to match."""
    marker = state_dict.pop(prefix + "comfy_quant", None)
    if marker is not None:
        try:
            entry = parse_marker(marker, prefix + "comfy_quant")
        except RotationError as e:
            raise QuantizedLayerError(str(e)) from None
        module.rotation = _checked_rotation(marker_group(entry), module.in_features)
    key = prefix + "weight_scale"
    if key in state_dict:
        # a file may hold the other scale kind (or shape) than this module was built with
        state_dict[key] = normalize_scale(state_dict[key], module.out_features)
        module.weight_scale = torch.empty_like(state_dict[key], device=module.weight_scale.device)


class Int8Linear(FusedLinear):
    """``y = x · (weight · weight_scale)ᵀ + bias`` through :func:`engine.int8.ops.int8_linear`.

    ``use_float = True`` runs the same layer as a float ``F.linear`` on the dequantized weight (no
    activation quantization), to measure what W8A8 costs in accuracy. As a
    :class:`~engine.fusion.FusedLinear` it takes inputs before their norm or activation, hands on
    attention's inputs and runs a SwiGLU as one gated GEMM (:func:`engine.int8.ops.int8_swiglu`). ``lora``,
    when set, is a module with ``down``, ``up`` and ``scale`` tensors
    (:class:`engine.lora.dynamic.LoraAdapter`) whose term ``(x · downᵀ · scale) · upᵀ`` is added in
    the GEMM's epilogue (dynamic LoRA). ``rotation`` is the Hadamard group size the weight is stored
    rotated with (0: not rotated).
    """

    def __init__(
        self,
        weight: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None = None,
        rotation: int = 0,
    ):
        super().__init__()
        weight, scale, self.rotation = check_int8_tensors(weight, weight_scale, bias, rotation)
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", bias)
        self.use_float = False
        self.lora: nn.Module | None = None
        self.register_load_state_dict_pre_hook(_take_file_format)

    @classmethod
    def from_float(cls, linear: nn.Linear, scheme: Scheme = "rowwise", rotation: int = 0) -> Int8Linear:
        """Quantize a float ``nn.Linear`` (``tensorwise`` or ``rowwise`` weight scales, rotated by
        groups of ``rotation`` input channels first when it is not 0)."""
        q, scale = quantize_weight(linear.weight.detach(), scheme, rotation=rotation)
        device = linear.weight.device
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        return cls(q.to(device), scale.to(device), bias, rotation)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight the layer stands for (rotated back when it is stored rotated)."""
        return float_weight(self.weight, self.weight_scale, self.rotation).to(dtype)

    def forward(self, x: Input) -> torch.Tensor:
        lora = self.lora
        if self.use_float:
            x = x if isinstance(x, torch.Tensor) else x.materialize()
            bias = self.bias.to(x.dtype) if self.bias is not None else None
            y = F.linear(x, self.dequantized_weight(x.dtype), bias)
            return y + lora(x) if lora is not None else y
        return int8_linear(x, self.weight, self.weight_scale, self.bias, lora=self.lora_rows(), rotation=self.rotation)

    def int8_weight(self, start: int = 0, stop: int | None = None) -> Int8Weight | None:
        """Output channels ``[start, stop)`` of the weight, scale and bias, for a GEMM that computes them
        together with others (a gated product, attention's inputs; with :meth:`lora_rows`); None where
        the layer runs anything but the int8 product on unrotated tokens: the float switch, a rotated
        weight."""
        if self.use_float or self.rotation:
            return None
        channels = slice(start, stop)
        scale = self.weight_scale[channels] if self.weight_scale.ndim else self.weight_scale
        return Int8Weight(self.weight[channels], scale, None if self.bias is None else self.bias[channels])

    def lora_rows(self, start: int = 0, stop: int | None = None) -> LoraFactors | None:
        """The dynamic LoRA's factors for output channels ``[start, stop)`` (its up factor's rows), or None
        without one (or with rank 0)."""
        lora = self.lora
        if lora is None or not lora.down.shape[0]:
            return None
        return LoraFactors(lora.down, lora.up[start:stop], lora.scale)

    def prepared_input(self, x: Input, *others: nn.Module) -> QuantizedInput | None:
        """``x`` quantized once for this layer and ``others`` where all are int8 layers on the int8 path
        with one rotation: several projections of one input (Qwen-Image's q, k and v) then run one
        quantization, not one each."""
        layers = (self, *others)
        if not all(isinstance(layer, Int8Linear) and not layer.use_float for layer in layers):
            return None
        if any(layer.rotation != self.rotation for layer in layers):
            return None
        return quantize_input(x, self.rotation)

    def fused_heads(self, x: Input, norm: QKNormRope) -> Heads | None:
        weight = self.int8_weight()
        return None if weight is None else int8_attention_inputs(x, weight, norm, self.lora_rows())

    def fused_in_projection(
        self, x: Input, head: int, norm: QKNormRope | None
    ) -> tuple[torch.Tensor | Heads | None, torch.Tensor] | None:
        """The head's GEMM (handing on attention's inputs with ``norm``) and one gated GEMM for the
        SwiGLU of the rest (its first half the gate, its second the up projection), on ``x`` quantized
        once: the SwiGLU's two halves never reach memory."""
        if self.int8_weight() is None:
            return None
        half = (self.out_features - head) // 2
        tokens = quantize_input(x)
        if norm is not None:
            out = int8_attention_inputs(tokens, self.int8_weight(0, head), norm, self.lora_rows(0, head))
        else:
            out = int8_linear(tokens, *self.int8_weight(0, head), lora=self.lora_rows(0, head)) if head else None
        gate, up = self.int8_weight(head, head + half), self.int8_weight(head + half)
        loras = self.lora_rows(head, head + half), self.lora_rows(head + half)
        return out, int8_swiglu(tokens, gate, up, loras=loras)

    def fused_swiglu(self, up: nn.Module, x: Input) -> torch.Tensor | None:
        gate, up_weight = self.int8_weight(), up.int8_weight() if isinstance(up, Int8Linear) else None
        if gate is None or up_weight is None:
            return None
        return int8_swiglu(x, gate, up_weight, loras=(self.lora_rows(), up.lora_rows()))

    # PyTorch has no public way to exempt a buffer from a module's dtype casts (.to(dtype), .half(), …)
    def _apply(self, fn, recurse=True):
        scale = self.weight_scale
        super()._apply(fn, recurse)
        # follow device moves only: a bf16 scale would cost the layer 3 significant digits
        self.weight_scale = scale.to(self.weight_scale.device)
        return self

    def extra_repr(self) -> str:
        kind = int8_kind(self.weight_scale, self.rotation)
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, {kind}"

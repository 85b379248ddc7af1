"""INT8 Studio's int8 layers inside ComfyUI's own models: the operations class ComfyUI builds them with.

ComfyUI's model classes (its Flux.2, Chroma, Z-Image …) make every layer through an ``operations``
namespace (``operations.Linear(in, out, bias=…, dtype=…, device=…)``); ``comfy.sd`` takes one as
``model_options["custom_operations"]``. :func:`int8_operations` returns ComfyUI's own mixed-precision
operations (what it picks for a file with quantized layers) with one change: a ``Linear`` whose
checkpoint tensors are an int8 weight with its ``weight_scale`` (our format, docs/FORMAT.md, and
ComfyUI's native ``int8_tensorwise`` layout, row-wise, tensor-wise or Hadamard-rotated "convrot")
holds them as plain tensors and runs :func:`engine.int8.ops.int8_linear`. Every other layer (float,
fp8, nvfp4 …) and everything around the layers (samplers, model management, offloading) stays
ComfyUI's.

How an int8 layer cooperates with ComfyUI's model management:

* ``weight`` is an int8 ``Parameter`` and ``weight_scale`` a float32 one (``[]`` or ``[out, 1]``), so
  ComfyUI's loaders count, move, pin and offload them like any weight. Moves to another dtype leave
  them as they are (only the bias follows), and the dtypes ComfyUI records for its dynamic-VRAM
  loader (``weight_comfy_model_dtype``) say int8 and float32, so it never widens them.
* A layer ComfyUI left on the offload device (low-VRAM partial loading, dynamic VRAM) gets its weight
  and bias through ComfyUI's own ``cast_bias_weight`` (streams, pinned buffers) with the weight kept
  int8; the scale is moved beside them.
* LoRA patches from ComfyUI's own loaders: merged into the weight at load time through
  ``convert_weight`` (the float weight the layer stands for, un-rotated) and ``set_weight`` (back onto
  the layer's own int8 grid, stochastically rounded with ComfyUI's per-key seed). The scale never
  changes, so ComfyUI's restore of the backed-up int8 weight alone is exact. Patches applied at run
  time (low-VRAM ``weight_function``s, dynamic VRAM's ``weight_lowvram_function``) run on the
  dequantized weight as a float product: correct, not fast (ComfyUI's own int8 layers requantize the
  patched weight in dynamic VRAM instead).
* INT8 LoRA (merged) (:mod:`comfyui_nodes.lora`) uses the same patches, and sets per model clone (an
  object patch) the layer's ``merge_mode``: ``set_weight`` then rounds by the engine's modes
  (``engine.lora.merge.round_change``); a requantized weight's new scale goes through
  ``set_weight_scale``, the node having patched the scale key so that ComfyUI backs it up too.
* INT8 LoRA (dynamic) sets the layer's ``int8_lora`` (an object patch): its low-rank term is added in
  the int8 GEMM's epilogue (``int8_linear(..., lora=...)``), or beside a float layer's product.

Nothing here imports ComfyUI at module level: the package imports outside ComfyUI (tests, tools), and
ComfyUI's modules are bound when :func:`int8_operations` is called, inside ComfyUI.
"""

from __future__ import annotations

import logging
import types

import torch
import torch.nn.functional as F
from torch import nn

from engine.int8.linear import QuantizedLayerError, check_int8_tensors, float_weight, int8_kind
from engine.int8.ops import int8_linear
from engine.int8.rotation import (
    RotationError,
    comfy_quant_entry,
    json_bytes,
    marker_group,
    parse_marker,
    rotate,
)
from engine.lora.merge import round_change

log = logging.getLogger("int8_studio")

INT8_FORMATS = ("int8_tensorwise", "int8_rowwise")
"""The ``comfy_quant`` formats whose layers run on our op (ComfyUI registers only the first; the
second is what some other tools write: the scale's shape says the granularity either way)."""


_QUANTIZED_MODEL = types.SimpleNamespace(quant_config={"mixed_ops": True})
"""What ``comfy.ops.pick_operations`` reads of a model config to choose its mixed-precision
operations: that the model has per-layer quantization."""


def int8_operations(load_device: torch.device | None = None) -> type:
    """ComfyUI's mixed-precision operations for ``load_device`` with :class:`Linear` layers that run
    int8 weights on INT8 Studio's op. A fresh class per model: pass it as
    ``model_options["custom_operations"]`` to ``comfy.sd.load_diffusion_model_state_dict``.

    The dtype ComfyUI keeps float layers in (its "compute dtype") is the dtype ComfyUI builds the
    model in, read from the first layer it makes: ComfyUI passes it to every layer it builds.
    """
    import comfy.model_management
    import comfy.ops

    if load_device is None:
        load_device = comfy.model_management.get_torch_device()
    base = comfy.ops.pick_operations(None, None, load_device, model_config=_QUANTIZED_MODEL)

    class Int8StudioOperations(base):
        @staticmethod
        def float_dtype() -> torch.dtype | None:
            """The dtype the float linear layers are kept in (None until the model is built)."""
            return base._compute_dtype

        class Linear(base.Linear):
            int8 = False  # True once an int8 weight is loaded
            rotation = 0  # the Hadamard group size the int8 weight is stored rotated with (0: none)
            # how set_weight rounds a patched weight ("auto", "requant", "stochastic"): set per model
            # clone by the INT8 LoRA (merged) node as an object patch; None (ComfyUI's own LoRA
            # loaders): stochastic, on the layer's grid
            merge_mode = None
            int8_lora = None  # the unmerged LoRAs' factors (a DynamicLora, from INT8 LoRA (dynamic))
            _pending_scale = None  # a requantized weight's new scale, until set_weight_scale stores it

            def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
                if base._compute_dtype is None and dtype is not None:
                    base._compute_dtype = dtype
                super().__init__(in_features, out_features, bias, device, dtype)

            def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
                if not _holds_int8(state_dict, prefix):
                    return super()._load_from_state_dict(
                        state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
                    )
                _load_int8(self, state_dict, prefix, missing_keys)

            def state_dict(self, *args, destination=None, prefix="", **kwargs):
                if not self.int8:
                    return super().state_dict(*args, destination=destination, prefix=prefix, **kwargs)
                sd = destination if destination is not None else {}
                sd[f"{prefix}weight"] = self.weight
                sd[f"{prefix}weight_scale"] = self.weight_scale
                if self.bias is not None:
                    sd[f"{prefix}bias"] = self.bias
                sd[f"{prefix}comfy_quant"] = json_bytes(comfy_quant_entry(self.rotation))
                return sd

            def forward(self, input, *args, **kwargs):
                lora = self.int8_lora
                if not self.int8:
                    out = super().forward(input, *args, **kwargs)
                    return out if lora is None else out + lora.term(input)
                comfy.ops.run_every_op()
                if _patched(self):
                    return self._forward_patched(input)
                factors = None if lora is None else lora.factors()
                weight, bias = self.weight, self.bias
                offloaded = (
                    self.comfy_cast_weights
                    or getattr(self, "comfy_force_cast_weights", False)
                    or weight.device != input.device
                    or (bias is not None and bias.device != input.device)
                )
                if not offloaded:
                    if bias is not None and bias.dtype != input.dtype:
                        bias = bias.to(input.dtype)
                    return int8_linear(input, weight, self.weight_scale, bias, lora=factors, rotation=self.rotation)
                weight, bias, stream = comfy.ops.cast_bias_weight(
                    self, None, dtype=torch.int8, device=input.device, bias_dtype=input.dtype, offloadable=True
                )
                scale = self.weight_scale.to(input.device, non_blocking=True)
                out = int8_linear(input, weight, scale, bias, lora=factors, rotation=self.rotation)
                comfy.ops.uncast_bias_weight(self, weight, bias, stream)
                return out

            def _forward_patched(self, input):
                """A float product on the dequantized weight with ComfyUI's run-time patches (low-VRAM
                LoRA patches, weight wrappers) applied to it: what ComfyUI does for its own quantized
                layers with such patches. Its casting helper would apply them to the int8 values."""
                device = input.device
                weight = self.convert_weight(comfy.model_management.cast_to_device(self.weight, device, None))
                bias = self.bias
                if bias is not None:
                    bias = comfy.model_management.cast_to_device(bias, device, input.dtype, copy=True)
                weight = _with_patches(self, "weight", weight)
                bias = None if bias is None else _with_patches(self, "bias", bias)
                out = F.linear(input, weight.to(input.dtype), None if bias is None else bias.to(input.dtype))
                return out if self.int8_lora is None else out + self.int8_lora.term(input)

            def convert_weight(self, weight, inplace=False, **kwargs):
                """The float32 weight this layer stands for, from ``weight`` (its int8 values, in any
                dtype and on any device): ComfyUI's LoRA merge patches this."""
                if not self.int8:
                    return super().convert_weight(weight, inplace=inplace, **kwargs)
                return float_weight(weight, self.weight_scale.to(weight.device), self.rotation)

            def set_weight(self, weight, inplace_update=False, seed=None, return_weight=False, **kwargs):
                """Store a patched float weight (from :meth:`convert_weight` plus ComfyUI's patches) on
                an int8 grid, by the layer's ``merge_mode`` (``engine.lora.merge.round_change``):
                stochastic rounding of the change on the layer's own grid by default (unbiased; a value
                that did not change keeps its int8 value exactly, and ComfyUI's restore of the
                original int8 weight alone undoes it), or requantized with a fresh scale, which
                :meth:`set_weight_scale` stores next (the INT8 LoRA (merged) node patches the scale
                key too, so ComfyUI backs it up and restores it). ``return_weight`` asks for a weight
                beside the current scale: stochastic then."""
                if not self.int8:
                    return super().set_weight(weight, inplace_update=inplace_update, seed=seed, return_weight=return_weight, **kwargs)
                q = self.weight.to(weight.device)
                scale = self.weight_scale.to(weight.device)
                change = weight.float() - self.convert_weight(q)
                if self.rotation:
                    change = rotate(change, self.rotation)
                generator = torch.Generator(weight.device).manual_seed(int(seed or 0) & (2**63 - 1))
                mode = "stochastic" if return_weight or self.merge_mode is None else self.merge_mode
                rounded = round_change(q, scale, change, mode, generator)
                if rounded.clipped:
                    log.info("INT8 Studio: %d values of a patched int8 weight were clamped to ±127", rounded.clipped)
                new_q = rounded.q.to(self.weight.device)
                if return_weight:
                    return new_q
                self._pending_scale = None if rounded.scale is scale else rounded.scale
                if inplace_update:
                    self.weight.data.copy_(new_q)
                else:
                    self.weight = nn.Parameter(new_q, requires_grad=False)

            def set_weight_scale(self, weight, inplace_update=False, seed=None, return_weight=False, **kwargs):
                """ComfyUI storing the scale key of a patched layer: the scale :meth:`set_weight` chose
                for the weight it just stored, else the layer's own scale unchanged (never ``weight``,
                which ComfyUI cast to its LoRA dtype on the way)."""
                scale = self._pending_scale if self._pending_scale is not None else self.weight_scale
                self._pending_scale = None
                scale = scale.to(device=weight.device, dtype=torch.float32)
                if return_weight:
                    return scale
                if inplace_update:
                    self.weight_scale.data.copy_(scale)
                else:
                    self.weight_scale = nn.Parameter(scale, requires_grad=False)

            def _apply(self, fn, recurse=True):
                if not self.int8:
                    return super()._apply(fn, recurse)
                # device moves only for the int8 weight and its float32 scale; the bias follows fn
                for key, param in list(self._parameters.items()):
                    if param is None:
                        continue
                    moved = fn(param)
                    if key in ("weight", "weight_scale") and moved.dtype != param.dtype:
                        moved = param.to(moved.device)
                    if (not torch.is_inference_mode_enabled()) and moved.is_inference():
                        moved = moved.clone()
                    self._parameters[key] = nn.Parameter(moved, requires_grad=False)
                for key, buf in self._buffers.items():
                    if buf is not None:
                        self._buffers[key] = fn(buf)
                return self

            def extra_repr(self):
                if not self.int8:
                    return super().extra_repr()
                kind = int8_kind(self.weight_scale, self.rotation)
                return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8 {kind} (INT8 Studio)"

    return Int8StudioOperations


def _patched(layer: nn.Module) -> bool:
    """Whether ComfyUI attached run-time patches to the layer's weight or bias (low-VRAM LoRA patches
    of its static or dynamic loader, weight wrappers)."""
    return bool(
        layer.weight_function
        or layer.bias_function
        or getattr(layer, "weight_lowvram_function", None) is not None
        or getattr(layer, "bias_lowvram_function", None) is not None
    )


def _with_patches(layer: nn.Module, kind: str, value: torch.Tensor) -> torch.Tensor:
    """``value`` (the layer's float weight or bias) with ComfyUI's run-time patches of it applied."""
    patch = getattr(layer, f"{kind}_lowvram_function", None)
    if patch is not None:
        value = patch(value)
    for f in getattr(layer, f"{kind}_function"):
        value = f(value)
    return value


def _marker(state_dict: dict, prefix: str) -> dict | None:
    marker = state_dict.get(f"{prefix}comfy_quant")
    if marker is None:
        return None
    try:
        return parse_marker(marker, f"{prefix}comfy_quant")
    except RotationError as e:
        raise QuantizedLayerError(str(e)) from None


def _holds_int8(state_dict: dict, prefix: str) -> bool:
    """Whether the layer's tensors are an int8 weight with its scale that our op runs: a ``comfy_quant``
    marker of an int8 format, or none at all beside an int8 weight and a ``weight_scale`` (files of
    tools that write only the header's ``_quantization_metadata``, which ComfyUI turns into markers,
    or nothing)."""
    weight = state_dict.get(f"{prefix}weight")
    if weight is None or weight.dtype != torch.int8:
        return False
    entry = _marker(state_dict, prefix)
    if entry is None:
        return f"{prefix}weight_scale" in state_dict
    return entry.get("format") in INT8_FORMATS


def _load_int8(layer: nn.Module, state_dict: dict, prefix: str, missing_keys: list) -> None:
    """Take an int8 layer's tensors out of ``state_dict`` into ``layer`` (checked by
    ``engine.int8.linear.check_int8_tensors``)."""
    entry = _marker(state_dict, prefix)
    state_dict.pop(f"{prefix}comfy_quant", None)
    weight = state_dict.pop(f"{prefix}weight")
    scale = state_dict.pop(f"{prefix}weight_scale", None)
    name = prefix.rstrip(".")
    if scale is None:
        raise QuantizedLayerError(f"{name} has an int8 weight but no weight_scale: the file is damaged; re-convert it")
    if tuple(weight.shape) != (layer.out_features, layer.in_features):
        raise QuantizedLayerError(
            f"{name}.weight has shape {list(weight.shape)}; this model's layer needs "
            f"[{layer.out_features}, {layer.in_features}]"
        )
    bias = state_dict.pop(f"{prefix}bias", None)
    # a static activation scale some int8 tools write (the seed node's files among them): activations
    # are quantized per token here, as in the tools that read those files
    state_dict.pop(f"{prefix}input_scale", None)
    try:
        weight, scale, rotation = check_int8_tensors(weight, scale, None, marker_group(entry))
    except (QuantizedLayerError, RotationError) as e:
        raise QuantizedLayerError(f"{name}: {e}") from None
    device = layer.factory_kwargs.get("device")
    dtype = layer.factory_kwargs.get("dtype")
    layer.weight = nn.Parameter(weight.to(device=device), requires_grad=False)
    layer.weight_scale = nn.Parameter(scale.to(device=device), requires_grad=False)
    layer.rotation = rotation
    layer.int8 = True
    if bias is not None:
        layer.bias = nn.Parameter(bias.to(device=device, dtype=dtype or bias.dtype), requires_grad=False)
    elif layer.bias is not None:
        missing_keys.append(f"{prefix}bias")
    # what ComfyUI's dynamic-VRAM loader casts a weight to when it stages it
    layer.weight_comfy_model_dtype = torch.int8
    layer.weight_scale_comfy_model_dtype = torch.float32

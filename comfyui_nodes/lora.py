"""LoRAs on a model of "Load Diffusion Model (INT8 Studio)": merged into the int8 weights, or dynamic.

Both nodes map a LoRA file onto the model with the engine's mapping (:func:`engine.lora.match_model`:
kohya, ComfyUI, diffusers/PEFT, ai-toolkit, OneTrainer, LyCORIS names; split q/k/v onto rows of fused
layers; the architecture detected from the model's own tensors), the same mapping as
``int8-studio lora merge``, so a LoRA does the same in ComfyUI as in a merged file, and a LoRA for
another model stops with a message saying which model it looks like. Keys that match nothing are
listed in the log.

* **INT8 LoRA (merged)** clones the model and adds one ComfyUI weight patch per target tensor
  (:class:`LoraPatch`, the engine's float delta: LoRA, LoHa, LoKr, full diff, DoRA, bias diffs), with
  the LoRA's strength as ComfyUI's patch strength. ComfyUI applies its patches when it loads the
  model: an int8 layer's ``convert_weight`` gives the float weight (un-rotated), the patches of every
  LoRA node of the chain and of ComfyUI's own loaders are summed on it in float32, and ``set_weight``
  rounds the result once by the node's merge mode (an object patch of the layer's ``merge_mode``). For
  requantizing modes the layer's ``weight_scale`` key gets a patch too (:class:`KeepScale`, which
  changes nothing itself), so that ComfyUI backs up and restores the scale as it does the weight:
  taking the LoRA out, or changing it, restores the original int8 weights from ComfyUI's backup,
  not from disk. Where ComfyUI keeps layers offloaded (low VRAM, dynamic VRAM), it applies the same
  patches at run time to the dequantized weight (:mod:`comfyui_nodes.ops`).
* **INT8 LoRA (dynamic)** keeps the LoRA beside the weights: every adapted layer gets the low-rank
  factors (:class:`DynamicLora`, an object patch of the layer's ``int8_lora``) that our int8 GEMM adds
  in its epilogue (``int8_linear(..., lora=LoraFactors(...))``). The strength lives in the factors'
  ``scale`` tensor (strength × alpha / rank per rank column): a new strength is a new tensor of the
  same shape, which compiled code reads instead of baking it in, so it recompiles nothing. ComfyUI
  moves the factors with the model (:class:`DynamicLoras` is registered as a model patch, whose
  ``to`` ComfyUI calls when it loads and unloads the model).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from engine.checkpoint import CheckpointReader
from engine.int8.ops import LoraFactors
from engine.lora import LoraError, LoraFile, LoraMatch, Patch, match_model
from engine.lora.dynamic import layer_factors
from engine.lora.merge import MODES, patch_
from engine.models import detect
from engine.models.spec import natural_key

from .loader import int8_layers, load_diffusion_model

log = logging.getLogger("int8_studio")

"""The node's merge modes (the words a user reads) → the engine's (``engine.lora.merge``)."""
DYNAMIC_PATCH = "int8_studio_lora"
"""The name :class:`DynamicLoras` is registered under in ComfyUI's ``transformer_options["patches"]``."""
PREFIX = (
    "diffusion_model."  # ComfyUI's name of the diffusion model inside its model object
)


class Int8LoraError(RuntimeError):
    """A LoRA that cannot be applied to this model (the message says why and what to do)."""


# --- matching ------------------------------------------------------------------------------------


def match_lora(
    model, path: str | os.PathLike
) -> tuple[LoraMatch, dict[str, torch.Tensor]]:
    """``path`` mapped onto the diffusion model of the ComfyUI model ``model`` (the engine's mapping),
    and every tensor the matched layers read, in memory (the file is closed again)."""
    _diffusion_model(model)
    source = _model_file(model)
    name = os.path.basename(path)
    try:
        with CheckpointReader(
            source
        ) as reader:  # the names and shapes of the model's file, headers only
            detected = detect(reader)
        with LoraFile(path) as lora:
            match = match_model(lora, detected)
            keys = {k for p in match.patches for k in p.layer.keys.values()}
            tensors = {k: lora.get(k) for k in sorted(keys)}
    except LoraError as e:
        raise Int8LoraError(str(e)) from None
    except (
        Exception
    ) as e:  # detection of a model the engine does not know, an unreadable file
        raise Int8LoraError(f"{name}: {e}") from e
    _report(match, detected.label)
    return match, tensors


def _diffusion_model(model) -> torch.nn.Module:
    diffusion = getattr(getattr(model, "model", None), "diffusion_model", None)
    if diffusion is None or not any(_ours(m) for m in diffusion.modules()):
        raise Int8LoraError(
            "INT8 LoRA nodes take the model of 'Load Diffusion Model (INT8 Studio)'; this model was "
            "loaded by another node: load it with 'Load Diffusion Model (INT8 Studio)', or use "
            "ComfyUI's own LoRA loader on it"
        )
    return diffusion


def _model_file(model) -> str:
    """The file the model was loaded from (the loader records it for ComfyUI's reloads)."""
    init = getattr(model, "cached_patcher_init", None)
    if not init or init[0] is not load_diffusion_model:
        raise Int8LoraError(
            "this model does not say which file it was loaded from: load it with 'Load Diffusion Model (INT8 Studio)'"
        )
    return os.fspath(init[1][0])


def _ours(module: torch.nn.Module) -> bool:
    return type(module).__qualname__.endswith("Int8StudioOperations.Linear")


def _report(match: LoraMatch, label: str) -> None:
    lora = match.lora
    log.info(
        "INT8 Studio: %s (%s) adapts %d layers of this %s model",
        lora.name, match.format, match.layers, label,
    )  # fmt: skip
    if match.unmatched:
        shown = sorted(match.unmatched, key=natural_key)
        log.warning(
            "INT8 Studio: %d keys of %s match no layer of the model and are left out: %s%s",
            len(shown), lora.name, ", ".join(shown[:8]), " …" if len(shown) > 8 else "",
        )  # fmt: skip
    if match.text_encoder:
        log.info(
            "INT8 Studio: %d text-encoder keys of %s are left out (this node patches the diffusion "
            "model only)", len(match.text_encoder), lora.name,
        )  # fmt: skip


@dataclass(frozen=True)
class _Tensors:
    """The part of a ``LoraFile`` the engine's delta reads: ``name`` and ``get(key)``."""

    name: str
    tensors: Mapping[str, torch.Tensor]

    def get(self, key: str) -> torch.Tensor:
        return self.tensors[key]


# --- merged --------------------------------------------------------------------------------------


def _adapter_base() -> type:
    import comfy.weight_adapter

    return comfy.weight_adapter.WeightAdapterBase


@dataclass(frozen=True)
class LoraPatches:
    """What one LoRA does to one model tensor: its patches (several for split q/k/v on a fused
    weight) and the file's name; the tensors they read go beside it, in ``keys`` order."""

    name: str
    patches: tuple[Patch, ...]
    keys: tuple[str, ...]


def lora_patch_class() -> type:
    """:class:`LoraPatch`, a ComfyUI weight adapter (defined once ComfyUI is importable)."""
    global LoraPatch, KeepScale
    if LoraPatch is None:

        class _LoraPatch(_adapter_base()):
            """One LoRA's change to one tensor as a ComfyUI weight patch, computed by the engine
            (``engine.lora.merge.patch_``) in float32. ComfyUI moves ``weights`` (the LoRA's tensors)
            where it computes, and rebuilds the patch as ``type(p)(loaded_keys, weights)``."""

            name = "int8_studio"

            def __init__(
                self, loaded_keys: LoraPatches, weights: tuple[torch.Tensor, ...]
            ):
                self.loaded_keys = loaded_keys
                self.weights = weights

            def calculate_shape(self, key):
                return None

            def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                                 intermediate_dtype=torch.float32, original_weight=None):  # fmt: skip
                spec = self.loaded_keys
                lora = _Tensors(spec.name, dict(zip(spec.keys, self.weights)))
                target = weight if weight.dtype == torch.float32 else weight.float()
                patch_(target, [(lora, p, strength) for p in spec.patches])
                if target is not weight:
                    weight.copy_(target)
                return weight

        class _KeepScale(_adapter_base()):
            """A patch of an int8 layer's ``weight_scale`` key that changes nothing: it makes ComfyUI
            back the scale up, pass it to the layer's ``set_weight_scale`` and restore it with the
            weight (a requantized weight comes with a new scale)."""

            name = "int8_studio_scale"

            def __init__(self, loaded_keys=(), weights=()):
                self.loaded_keys = loaded_keys
                self.weights = weights

            def calculate_shape(self, key):
                return None

            def calculate_weight(self, weight, *args, **kwargs):
                return weight

        LoraPatch, KeepScale = _LoraPatch, _KeepScale
    return LoraPatch


LoraPatch = None  # the class, once lora_patch_class() made it
KeepScale = None


def merged_patches(
    match: LoraMatch, tensors: Mapping[str, torch.Tensor]
) -> dict[str, object]:
    """ComfyUI key → :class:`LoraPatch` for every tensor the LoRA changes."""
    cls = lora_patch_class()
    by_target: dict[str, list[Patch]] = {}
    for patch in match.patches:
        by_target.setdefault(patch.target, []).append(patch)
    out = {}
    for target, patches in by_target.items():
        keys = tuple(sorted({k for p in patches for k in p.layer.keys.values()}))
        out[PREFIX + target] = cls(
            LoraPatches(match.lora.name, tuple(patches), keys),
            tuple(tensors[k] for k in keys),
        )
    return out


def apply_merged(model, path: str | os.PathLike, strength: float, mode: str):
    """A clone of ``model`` with the LoRA in ``path`` merged at ``strength`` (``mode``: one of the
    engine's merge modes, ``engine.lora.merge.MODES``, as ``int8-studio lora merge --mode`` names them)
    when ComfyUI loads it (module docstring)."""
    if mode not in MODES:
        raise Int8LoraError(f"unknown merge mode {mode!r}; choose {', '.join(MODES)}")
    match, tensors = match_lora(model, path)
    clone = model.clone()
    patches = merged_patches(match, tensors)
    added = set(clone.add_patches(patches, strength))
    missing = sorted(set(patches) - added, key=natural_key)
    if missing:
        log.warning(
            "INT8 Studio: %d tensors of %s are not in this model: %s",
            len(missing),
            match.lora.name,
            ", ".join(missing[:8]),
        )
    int8 = int8_layers(clone.model)
    layers = sorted({k.rsplit(".", 1)[0] for k in added} & set(int8), key=natural_key)
    for layer in layers:
        clone.add_object_patch(f"{layer}.merge_mode", mode)
    if mode != "stochastic":
        clone.add_patches(
            {f"{layer}.weight_scale": KeepScale() for layer in layers}, 1.0
        )
    rotated = sum(1 for layer in layers if int8[layer].rotation)
    log.info(
        "INT8 Studio: %s merged at strength %g into %d int8 layers (%s%s) and %d float tensors when the "
        "model loads", match.lora.name, strength, len(layers), mode,
        f", {rotated} Hadamard-rotated" if rotated else "", len(added) - len(layers),
    )  # fmt: skip
    return clone


# --- dynamic -------------------------------------------------------------------------------------


class DynamicLora:
    """The unmerged LoRAs of one layer: ``(x · downᵀ · scale) · upᵀ``, each LoRA a block of rank
    columns; ``scale`` is float32 (strength × alpha / rank per column)."""

    def __init__(
        self, down: torch.Tensor, up: torch.Tensor, scale: torch.Tensor
    ) -> None:
        self.down, self.up, self.scale = down, up, scale

    def factors(self) -> LoraFactors:
        return LoraFactors(self.down, self.up, self.scale)

    def term(self, x: torch.Tensor) -> torch.Tensor:
        """The LoRA term on its own (float layers, and int8 layers on ComfyUI's run-time patch path)."""
        return (x @ self.down.to(x.dtype).T * self.scale.to(x.dtype)) @ self.up.to(
            x.dtype
        ).T

    def to(self, device: torch.device) -> DynamicLora:
        self.down, self.up, self.scale = (
            t.to(device) for t in (self.down, self.up, self.scale)
        )
        return self

    def extended(self, other: DynamicLora) -> DynamicLora:
        """This layer's LoRAs and then ``other``'s, side by side (new tensors)."""
        device = self.down.device
        return DynamicLora(
            torch.cat([self.down, other.down.to(device, self.down.dtype)]),
            torch.cat([self.up, other.up.to(device, self.up.dtype)], dim=1),
            torch.cat([self.scale, other.scale.to(device)]),
        )


class DynamicLoras:
    """Every layer's :class:`DynamicLora` of one model clone, as a ComfyUI model patch: ComfyUI calls
    ``to(device)`` when it loads the model to the GPU or offloads it (``to(dtype)`` changes nothing:
    the factors stay in the dtype they were made in, and the GEMM casts them)."""

    def __init__(self, layers: dict[str, DynamicLora]) -> None:
        self.layers = layers

    def to(self, target) -> DynamicLoras:
        if isinstance(target, (torch.device, str)):
            for lora in self.layers.values():
                lora.to(torch.device(target))
        return self


def dynamic_factors(match: LoraMatch, tensors: Mapping[str, torch.Tensor], strength: float,
                    shapes: Mapping[str, tuple[int, ...]], dtype: torch.dtype) -> dict[str, DynamicLora]:  # fmt: skip
    """Layer name (ComfyUI's) → the LoRA's factors at ``strength`` (``engine.lora.dynamic.layer_factors``:
    split q/k/v through zero rows in ``up``; only plain low-rank layers can run unmerged)."""
    try:
        factors = layer_factors(
            match, _Tensors(match.lora.name, tensors), lambda layer: shapes[f"{layer}.weight"][0],
            merged_instead="use 'INT8 LoRA (merged)' for it",
        )  # fmt: skip
    except LoraError as e:
        raise Int8LoraError(str(e)) from None
    return {
        PREFIX + layer: DynamicLora(f.down.to(dtype), f.up.to(dtype), f.unit * strength)
        for layer, f in factors.items()
    }


def apply_dynamic(model, path: str | os.PathLike, strength: float):
    """A clone of ``model`` running the LoRA in ``path`` unmerged at ``strength`` (module docstring)."""
    match, tensors = match_lora(model, path)
    diffusion = model.model.diffusion_model
    shapes = {n: tuple(p.shape) for n, p in diffusion.named_parameters()}
    dtype = model.model.manual_cast_dtype or model.model.get_dtype()
    if not dtype.is_floating_point or dtype.itemsize == 1:
        dtype = torch.bfloat16
    new = dynamic_factors(match, tensors, strength, shapes, dtype)
    for layer in new:
        if not _ours(model.model.get_submodule(layer)):
            raise Int8LoraError(
                f"{match.lora.name} adapts '{layer}', which is not a linear layer: use 'INT8 LoRA (merged)'"
            )
    clone = model.clone()
    patches = clone.model_options["transformer_options"].setdefault("patches", {})
    previous = patches.get(DYNAMIC_PATCH, [DynamicLoras({})])[0]
    layers = dict(previous.layers)
    for layer, lora in new.items():
        layers[layer] = layers[layer].extended(lora) if layer in layers else lora
    patches[DYNAMIC_PATCH] = [DynamicLoras(layers)]
    for layer, lora in layers.items():
        clone.add_object_patch(f"{layer}.int8_lora", lora)
    rank = sum(lora.down.shape[0] for lora in new.values())
    log.info(
        "INT8 Studio: %s runs unmerged at strength %g on %d layers (rank %d in all), in the int8 GEMM's "
        "epilogue", match.lora.name, strength, len(new), rank,
    )  # fmt: skip
    return clone


# --- the nodes -----------------------------------------------------------------------------------


def _lora_inputs(strength_tooltip: str) -> dict:
    import folder_paths

    return {
        "model": ("MODEL", {"tooltip": "The model of 'Load Diffusion Model (INT8 Studio)' (or of another INT8 LoRA node)."}),
        "lora_name": (
            folder_paths.get_filename_list("loras"),
            {"tooltip": "A LoRA from your loras folder for this model (kohya, ComfyUI, diffusers/PEFT, "
                        "ai-toolkit, OneTrainer or LyCORIS names)."},
        ),
        "strength": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01, "tooltip": strength_tooltip}),
    }  # fmt: skip


def _lora_path(lora_name: str) -> str:
    import folder_paths

    return folder_paths.get_full_path_or_raise("loras", lora_name)


class _LoraNode:
    """What the two LoRA nodes share: a MODEL in, the model with one more LoRA out (chainable)."""

    CATEGORY = "loaders"
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with the LoRA, for a sampler or another LoRA node.",)
    FUNCTION = "apply"


class Int8LoraMerged(_LoraNode):
    """One LoRA merged into the int8 weights when ComfyUI loads the model; chain nodes for several."""

    DESCRIPTION = (
        "Merges one LoRA into the INT8 model's weights (chain several of these nodes for several LoRAs: "
        "they are summed and rounded to int8 once). The model runs at full int8 speed. Removing or "
        "changing the LoRA restores the weights from memory, without reloading the model file."
    )
    @classmethod
    def INPUT_TYPES(cls):
        inputs = _lora_inputs(
            "How strongly the LoRA changes the model (1.0: as trained; negative values invert it)."
        )
        inputs["merge_mode"] = (
            list(MODES),
            {
                "default": "auto",
                "tooltip": "How the merged weights go back to int8. requant: new scales, rounded to "
                "nearest (most accurate for strong LoRAs, but changes under half an int8 step are lost); "
                "stochastic: the existing scales, rounded at random without bias (small changes survive "
                "on average, with some noise); auto: requant where it keeps 90% of a layer's change, "
                "stochastic elsewhere.",
            },
        )
        return {"required": inputs}

    def apply(self, model, lora_name, strength, merge_mode="auto"):
        if strength == 0:
            return (model,)
        return (apply_merged(model, _lora_path(lora_name), strength, merge_mode),)


class Int8LoraDynamic(_LoraNode):
    """One LoRA run beside the int8 weights (unmerged); chain nodes for several."""

    DESCRIPTION = (
        "Runs one LoRA beside the INT8 model's weights, unmerged: its low-rank term is added inside the "
        "int8 matrix product. Changing the strength needs no re-merge and, with TorchCompileModel, no "
        "recompile; a little slower per step than a merged LoRA. Plain LoRAs only (use INT8 LoRA (merged) "
        "for LoHa, LoKr, DoRA or full diffs)."
    )
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": _lora_inputs("How strongly the LoRA changes the model (1.0: as trained); "
                                         "changing it recompiles nothing.")}  # fmt: skip

    def apply(self, model, lora_name, strength):
        return (apply_dynamic(model, _lora_path(lora_name), strength),)


NODE_CLASS_MAPPINGS = {
    "Int8StudioLoraMerged": Int8LoraMerged,
    "Int8StudioLoraDynamic": Int8LoraDynamic,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "Int8StudioLoraMerged": "INT8 LoRA (merged)",
    "Int8StudioLoraDynamic": "INT8 LoRA (dynamic)",
}

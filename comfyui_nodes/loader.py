"""Loading a diffusion model file with ComfyUI's own loader, model classes and model management, its
int8 layers on INT8 Studio's op (:mod:`comfyui_nodes.ops`)."""

from __future__ import annotations

import logging
import os

import torch

from engine.int8.ops import describe_backend

from .ops import int8_operations

log = logging.getLogger("int8_studio")


class Int8LoadError(RuntimeError):
    """A file ComfyUI cannot make a diffusion model of (the message says what to do)."""


def load_diffusion_model(path: str | os.PathLike, model_options: dict | None = None):
    """A ComfyUI ``ModelPatcher`` of the diffusion model in ``path`` (a ``.safetensors`` file: INT8
    Studio's int8 format or ComfyUI's native ``int8_tensorwise`` one, any prefix), as
    ``comfy.sd.load_diffusion_model`` makes it, with the int8 layers running on INT8 Studio's op.

    ``model_options`` are ComfyUI's (``dtype``, ``load_device``, …); ``custom_operations`` is ours.
    A file without int8 layers loads as ComfyUI loads it (a warning says so).
    """
    import comfy.model_management
    import comfy.sd
    import comfy.utils

    path = os.fspath(path)
    options = dict(model_options or {})
    load_device = options.get("load_device", comfy.model_management.get_torch_device())
    options["custom_operations"] = int8_operations(load_device)
    sd, metadata = comfy.utils.load_torch_file(path, return_metadata=True)
    # Header-only markers (_quantization_metadata) become comfy_quant tensors, as ComfyUI's loader
    # does itself when no custom operations are given.
    sd, metadata = comfy.utils.convert_old_quants(sd, "", metadata=metadata)
    model = comfy.sd.load_diffusion_model_state_dict(sd, model_options=options, metadata=metadata)
    if model is None:
        raise Int8LoadError(
            f"ComfyUI does not recognise the diffusion model in {os.path.basename(path)}: "
            "is it a diffusion model (not a LoRA, text encoder or VAE) of a family this ComfyUI supports?"
        )
    model.cached_patcher_init = (load_diffusion_model, (path, model_options))
    compute = model.model.manual_cast_dtype
    if compute is not None and compute != options["custom_operations"].float_dtype():
        # ComfyUI would have kept float layers in its compute dtype; they run in it either way
        log.warning(
            "INT8 Studio: float layers kept in %s, ComfyUI computes in %s",
            options["custom_operations"].float_dtype(), compute,
        )
    layers = int8_layers(model.model)
    name = os.path.basename(path)
    if not layers:
        log.warning("INT8 Studio: %s has no int8 layers; it runs as ComfyUI runs it", name)
    else:
        rotated = sum(1 for m in layers.values() if m.rotation)
        log.info(
            "INT8 Studio: %s: %d int8 layers%s on %s",
            name, len(layers), f" ({rotated} Hadamard-rotated)" if rotated else "",
            describe_backend(torch.device(load_device)),
        )
    return model


def int8_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The layers of ``model`` that run on INT8 Studio's op, by name."""
    return {name: m for name, m in model.named_modules() if getattr(m, "int8", False) is True}

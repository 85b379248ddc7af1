"""Loading a diffusion model file with ComfyUI's own loader, model classes and model management, its
int8 layers on INT8 Studio's op (:mod:`comfyui_nodes.ops`)."""

from __future__ import annotations

import logging
import os

import torch

from engine.int8.attention import int8_attention
from engine.int8.choices import ATTENTIONS, DEFAULT_ATTENTION, AttentionChoice
from engine.int8.operands import ATTENTION_HEAD_DIMS
from engine.int8.ops import describe_backend

from .ops import int8_operations

log = logging.getLogger("int8_studio")


class Int8LoadError(RuntimeError):
    """A file ComfyUI cannot make a diffusion model of (the message says what to do)."""


def load_diffusion_model(
    path: str | os.PathLike, model_options: dict | None = None, attention: AttentionChoice = DEFAULT_ATTENTION
):
    """A ComfyUI ``ModelPatcher`` of the diffusion model in ``path`` (a ``.safetensors`` file: INT8
    Studio's int8 format or ComfyUI's native ``int8_tensorwise`` one, any prefix), as
    ``comfy.sd.load_diffusion_model`` makes it, with the int8 layers running on INT8 Studio's op.

    ``model_options`` are ComfyUI's (``dtype``, ``load_device``, …); ``custom_operations`` is ours.
    ``attention``: ``"int8"`` runs the model's attention on :func:`int8_attention` (:func:`override_attention`).
    A file without int8 layers loads as ComfyUI loads it (a warning says so). Compiled later (ComfyUI's
    TorchCompileModel), its graphs get :mod:`engine.int8.graph_fusion`'s fusions around the int8 ops.
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
    model.cached_patcher_init = (load_diffusion_model, (path, model_options, attention))
    override_attention(model, attention)
    compute = model.model.manual_cast_dtype
    if compute is not None and compute != options["custom_operations"].float_dtype():
        # ComfyUI would have kept float layers in its compute dtype; they run in it either way
        log.warning(
            "INT8 Studio: float layers kept in %s, ComfyUI computes in %s",
            options["custom_operations"].float_dtype(), compute,
        )
    layers = int8_layers(model.model)
    if layers:
        # imported here, not when ComfyUI loads the pack: it imports inductor (~1 s)
        from engine.int8 import graph_fusion

        graph_fusion.install()
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


OVERRIDE = "optimized_attention_override"
"""The key of ComfyUI's per-model attention override in ``model_options["transformer_options"]``."""


def override_attention(model, attention: AttentionChoice) -> None:
    """Run the ``ModelPatcher``'s attention in ComfyUI's own (``"bf16"``) or on :func:`int8_attention`
    (``"int8"``), through ComfyUI's per-model override: its sampler hands it to every attention call."""
    if attention not in ATTENTIONS:
        raise ValueError(f"unknown attention {attention!r}; choose {' or '.join(ATTENTIONS)}")
    options = model.model_options.setdefault("transformer_options", {})
    if attention == "int8":
        options[OVERRIDE] = comfy_int8_attention
    else:
        options.pop(OVERRIDE, None)


def comfy_int8_attention(func, q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                         skip_output_reshape=False, **kwargs):  # fmt: skip
    """ComfyUI's attention (``func``, its arguments) on :func:`int8_attention` where the kernel takes it:
    no mask, q, k and v of one shape with a head dim of 64 or 128 (float32 runs in bf16: 8-bit Q·Kᵀ is
    coarser anyway); else ``func`` itself."""
    if skip_reshape:
        b, _, _, dim = q.shape
    else:
        b, _, dim = q.shape
        dim //= heads
    if (
        mask is not None
        or q.dtype not in (torch.float16, torch.bfloat16, torch.float32)
        or dim not in ATTENTION_HEAD_DIMS
        or not q.shape == k.shape == v.shape
        or not q.dtype == k.dtype == v.dtype
    ):
        return func(q, k, v, heads, mask=mask, attn_precision=attn_precision, skip_reshape=skip_reshape,
                    skip_output_reshape=skip_output_reshape, **kwargs)  # fmt: skip
    if not skip_reshape:
        q, k, v = (t.reshape(b, -1, heads, dim).transpose(1, 2) for t in (q, k, v))
    dtype = q.dtype
    if dtype == torch.float32:
        q, k, v = (t.bfloat16() for t in (q, k, v))
    out = int8_attention(q, k, v, kwargs.get("scale")).to(dtype)
    return out if skip_output_reshape else out.transpose(1, 2).reshape(b, -1, heads * dim)

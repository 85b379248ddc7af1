"""Chroma1 (HD, Base; 8.9B): Flux.1-schnell blocks without per-block modulation linears; Chroma
Radiance, the same transformer on pixels.

All modulation vectors come from one small MLP, the ``distilled_guidance_layer`` ("approximator").
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

from engine.models.flux_blocks import FLUX_BLOCK_RULES, FLUX_DOWN_PROJECTIONS, flux_block_config, flux_block_shapes
from engine.models.spec import Architecture, Config, Rule, Shape, block_count, linear, register

if TYPE_CHECKING:  # the runnable module: engine.models.chroma_module
    from torch import nn

APPROXIMATOR = "distilled_guidance_layer"


class Chroma(Architecture):
    name = "chroma"
    label = "Chroma"
    diffusers_class = "ChromaTransformer2DModel"
    signature = (f"{APPROXIMATOR}.in_proj.weight", "img_in.weight")
    variants = {
        "Chroma1-HD": {
            "hidden": 3072, "head_dim": 128, "in_channels": 64, "out_channels": 64, "text_dim": 4096,
            "mlp_hidden": 12288, "double_blocks": 19, "single_blocks": 38, "approximator_in": 64,
            "approximator_hidden": 5120, "approximator_layers": 5,
        },
    }  # fmt: skip
    depth_keys = ("double_blocks", "single_blocks")
    tiny = {  # head_dim 32: RoPE gives the three axes 1/8, 7/16, 7/16 of it, in channel pairs
        "tiny": {
            "hidden": 64, "head_dim": 32, "in_channels": 16, "out_channels": 16, "text_dim": 48,
            "mlp_hidden": 256, "double_blocks": 2, "single_blocks": 3, "approximator_in": 16,
            "approximator_hidden": 48, "approximator_layers": 2,
        },
    }  # fmt: skip
    high_precision = (f"{APPROXIMATOR}.*", "img_in.*", "txt_in.*", "final_layer.*")
    down_projections = FLUX_DOWN_PROJECTIONS
    first_blocks = ("double_blocks.0.*", "single_blocks.0.*")
    model_names = {"chroma1-hd": "Chroma1-HD"}
    rules = (
        *FLUX_BLOCK_RULES,
        Rule(f"{APPROXIMATOR}.in_proj.{{p}}", f"{APPROXIMATOR}.in_proj.{{p}}"),
        Rule(f"{APPROXIMATOR}.out_proj.{{p}}", f"{APPROXIMATOR}.out_proj.{{p}}"),
        Rule(f"{APPROXIMATOR}.layers.{{i}}.in_layer.{{p}}", f"{APPROXIMATOR}.layers.{{i}}.linear_1.{{p}}"),
        Rule(f"{APPROXIMATOR}.layers.{{i}}.out_layer.{{p}}", f"{APPROXIMATOR}.layers.{{i}}.linear_2.{{p}}"),
        Rule(f"{APPROXIMATOR}.norms.{{i}}.scale", f"{APPROXIMATOR}.norms.{{i}}.weight"),
    )

    def build_module(self, config: Config) -> nn.Module:
        from engine.models.chroma_module import (
            ChromaModel,  # torch: only when a model is built
        )

        return ChromaModel(config)

    def config_from_shapes(self, shapes: Mapping[str, Shape]) -> dict[str, int | bool]:
        in_proj = shapes[f"{APPROXIMATOR}.in_proj.weight"]
        return {
            **flux_block_config(shapes),
            "approximator_in": in_proj[1],
            "approximator_hidden": in_proj[0],
            "approximator_layers": block_count(shapes, f"{APPROXIMATOR}.layers"),
        }

    def tensor_shapes(self, c: Config) -> dict[str, Shape]:
        h, ah = int(c["hidden"]), int(c["approximator_hidden"])
        shapes = linear(f"{APPROXIMATOR}.in_proj", ah, int(c["approximator_in"]))
        for i in range(int(c["approximator_layers"])):
            layer = f"{APPROXIMATOR}.layers.{i}"
            shapes |= linear(f"{layer}.in_layer", ah, ah) | linear(f"{layer}.out_layer", ah, ah)
            shapes[f"{APPROXIMATOR}.norms.{i}.scale"] = (ah,)
        shapes |= linear(f"{APPROXIMATOR}.out_proj", h, ah)
        shapes |= linear("img_in", h, int(c["in_channels"])) | linear("txt_in", h, int(c["text_dim"]))
        shapes |= flux_block_shapes(c, modulation=False)
        shapes |= linear("final_layer.linear", int(c["out_channels"]), h)
        return shapes


RADIANCE_TINY: Config = {
    **{k: v for k, v in Chroma.tiny["tiny"].items() if k != "out_channels"},
    "in_channels": 3, "patch": 4, "nerf_hidden": 16, "nerf_mlp_ratio": 2, "nerf_depth": 2, "nerf_freqs": 4,
    "nerf_conv": True,
}  # fmt: skip


class ChromaRadiance(Chroma):
    """Chroma Radiance: Chroma's approximator and blocks on RGB pixels, without a VAE (detection and
    conversion; it runs in ComfyUI through the node pack, not in our engine).

    A Conv2d (``img_in_patch``) embeds each ``patch``×``patch`` pixel patch as one token in place of
    ``img_in``; in place of ``final_layer``, a small per-pixel MLP (the "NeRF" head) decodes each
    token's pixels: ``nerf_image_embedder`` embeds every pixel with its DCT position, each of the
    ``nerf_blocks`` makes the weights of a gated MLP out of the token (``param_generator``) and runs
    it on the patch's pixels, and a linear or (later releases) 3×3 conv head gives RGB. The whole
    pixel path stays high precision: it is what every pixel goes through, and ``param_generator``'s
    output is not an activation but the MLP's weights (normalized, then multiplied with every
    pixel). Later releases add empty markers (``__x0__``: x0 prediction; ``__sequential__``:
    sequential text positions), passed through as the file has them. No diffusers layout exists.
    """

    name = "chroma_radiance"
    label = "Chroma Radiance"
    diffusers_class = ""
    signature = (f"{APPROXIMATOR}.in_proj.weight", "img_in_patch.weight")
    variants = {
        "Radiance": {
            **{k: v for k, v in Chroma.variants["Chroma1-HD"].items() if k != "out_channels"},
            "in_channels": 3, "patch": 16, "nerf_hidden": 64, "nerf_mlp_ratio": 4, "nerf_depth": 4,
            "nerf_freqs": 8, "nerf_conv": True,
        },
    }  # fmt: skip
    tiny = {"tiny": RADIANCE_TINY, "tiny-linear-head": {**RADIANCE_TINY, "nerf_conv": False}}
    high_precision = (f"{APPROXIMATOR}.*", "img_in_patch.*", "txt_in.*", "nerf_*")
    model_names = {}
    build_module = Architecture.build_module  # no module in our engine

    def config_from_shapes(self, shapes: Mapping[str, Shape]) -> dict[str, int | bool]:
        hidden, channels, patch, _ = shapes["img_in_patch.weight"]
        nerf_hidden, nerf_in = shapes["nerf_image_embedder.embedder.0.weight"]
        # Chroma's reading, told the widths its img_in and final_layer would have
        latent = {"img_in.weight": (hidden, channels), "final_layer.linear.weight": (channels, hidden)}
        config = {k: v for k, v in super().config_from_shapes({**shapes, **latent}).items() if k != "out_channels"}
        return config | {
            "patch": patch,
            "nerf_hidden": nerf_hidden,
            "nerf_mlp_ratio": shapes["nerf_blocks.0.param_generator.weight"][0] // (3 * nerf_hidden**2),
            "nerf_depth": block_count(shapes, "nerf_blocks"),
            "nerf_freqs": math.isqrt(nerf_in - channels),
            "nerf_conv": "nerf_final_layer_conv.conv.weight" in shapes,
        }

    def tensor_shapes(self, c: Config) -> dict[str, Shape]:
        h, channels, patch, nh = int(c["hidden"]), int(c["in_channels"]), int(c["patch"]), int(c["nerf_hidden"])
        latent = super().tensor_shapes({**c, "out_channels": channels})
        shapes = {"img_in_patch.weight": (h, channels, patch, patch), "img_in_patch.bias": (h,)}
        shapes |= {n: s for n, s in latent.items() if not n.startswith(("img_in.", "final_layer."))}
        shapes |= linear("nerf_image_embedder.embedder.0", nh, channels + int(c["nerf_freqs"]) ** 2)
        for i in range(int(c["nerf_depth"])):
            shapes |= linear(f"nerf_blocks.{i}.param_generator", 3 * nh * nh * int(c["nerf_mlp_ratio"]), h)
            shapes[f"nerf_blocks.{i}.norm.scale"] = (nh,)
        head = "nerf_final_layer_conv" if c["nerf_conv"] else "nerf_final_layer"
        shapes[f"{head}.norm.scale"] = (nh,)
        if c["nerf_conv"]:
            shapes |= {f"{head}.conv.weight": (channels, nh, 3, 3), f"{head}.conv.bias": (channels,)}
        else:
            shapes |= linear(f"{head}.linear", channels, nh)
        return shapes


CHROMA = register(Chroma())
CHROMA_RADIANCE = register(ChromaRadiance())

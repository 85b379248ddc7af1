"""Chroma1 (HD, Base; 8.9B): Flux.1-schnell blocks without per-block modulation linears.

All modulation vectors come from one small MLP, the ``distilled_guidance_layer`` ("approximator").
"""

from __future__ import annotations

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
    high_precision = (f"{APPROXIMATOR}.*", "img_in.*", "txt_in.*", "final_layer.*", "nerf_*")
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


CHROMA = register(Chroma())

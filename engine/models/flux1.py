"""Flux.1 (dev, schnell, Fill, Depth/Canny; 12B): Flux blocks with per-block modulation linears."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from engine.models.flux_blocks import FLUX_BLOCK_RULES, FLUX_DOWN_PROJECTIONS, flux_block_config, flux_block_shapes
from engine.models.spec import Architecture, Config, Rule, Shape, linear, register

if TYPE_CHECKING:  # the runnable module: engine.models.flux1_module
    from torch import nn

FLUX1_DEV: Config = {
    "hidden": 3072, "head_dim": 128, "in_channels": 64, "out_channels": 64, "text_dim": 4096,
    "vec_dim": 768, "mlp_hidden": 12288, "double_blocks": 19, "single_blocks": 38, "guidance": True,
}  # fmt: skip

# head_dim 32: RoPE gives the three axes 1/8, 7/16, 7/16 of it, in channel pairs
TINY_DEV: Config = {
    "hidden": 64, "head_dim": 32, "in_channels": 16, "out_channels": 16, "text_dim": 48, "vec_dim": 24,
    "mlp_hidden": 256, "double_blocks": 2, "single_blocks": 3, "guidance": True,
}  # fmt: skip


class Flux1(Architecture):
    name = "flux1"
    label = "Flux.1"
    diffusers_class = "FluxTransformer2DModel"
    signature = ("double_blocks.0.img_mod.lin.weight", "vector_in.in_layer.weight")
    variants = {
        "dev": FLUX1_DEV,
        "schnell": {**FLUX1_DEV, "guidance": False},
        "Fill dev": {**FLUX1_DEV, "in_channels": 384},
        "Depth/Canny dev": {**FLUX1_DEV, "in_channels": 128},
    }
    depth_keys = ("double_blocks", "single_blocks")
    tiny = {"tiny": TINY_DEV, "tiny-schnell": {**TINY_DEV, "guidance": False}}
    # the per-block modulation linears too: their error is the highest per layer and the same for every
    # token (output error −29%, for 27% of the weights; docs/MODELS.md)
    high_precision = ("img_in.*", "txt_in.*", "time_in.*", "vector_in.*", "guidance_in.*", "final_layer.*",
                      "double_blocks.*_mod.lin.*", "single_blocks.*.modulation.lin.*")  # fmt: skip
    down_projections = FLUX_DOWN_PROJECTIONS
    first_blocks = ("double_blocks.0.*", "single_blocks.0.*")
    model_names = {"flux1-dev": "dev", "flux1-schnell": "schnell"}
    rules = (
        *FLUX_BLOCK_RULES,
        *(
            Rule(f"{src}.{layer}.{{p}}", f"time_text_embed.{dst}.linear_{n}.{{p}}")
            for src, dst in (
                ("time_in", "timestep_embedder"),
                ("vector_in", "text_embedder"),
                ("guidance_in", "guidance_embedder"),
            )
            for n, layer in ((1, "in_layer"), (2, "out_layer"))
        ),  # fmt: skip
        Rule("double_blocks.{i}.img_mod.lin.{p}", "transformer_blocks.{i}.norm1.linear.{p}"),
        Rule("double_blocks.{i}.txt_mod.lin.{p}", "transformer_blocks.{i}.norm1_context.linear.{p}"),
        Rule("single_blocks.{i}.modulation.lin.{p}", "single_transformer_blocks.{i}.norm.linear.{p}"),
        Rule("final_layer.adaLN_modulation.1.{p}", "norm_out.linear.{p}", swap=True),
    )

    def build_module(self, config: Config) -> nn.Module:
        from engine.models.flux1_module import Flux1Model  # torch: only when a model is built

        return Flux1Model(config)

    def config_from_shapes(self, shapes: Mapping[str, Shape]) -> dict[str, int | bool]:
        return {
            **flux_block_config(shapes),
            "vec_dim": shapes["vector_in.in_layer.weight"][1],
            "guidance": "guidance_in.in_layer.weight" in shapes,
        }

    def tensor_shapes(self, c: Config) -> dict[str, Shape]:
        h = int(c["hidden"])
        shapes = linear("img_in", h, int(c["in_channels"]))
        shapes |= linear("time_in.in_layer", h, 256) | linear("time_in.out_layer", h, h)
        shapes |= linear("vector_in.in_layer", h, int(c["vec_dim"])) | linear("vector_in.out_layer", h, h)
        if c["guidance"]:
            shapes |= linear("guidance_in.in_layer", h, 256) | linear("guidance_in.out_layer", h, h)
        shapes |= linear("txt_in", h, int(c["text_dim"]))
        shapes |= flux_block_shapes(c, modulation=True)
        shapes |= linear("final_layer.linear", int(c["out_channels"]), h)
        shapes |= linear("final_layer.adaLN_modulation.1", 2 * h, h)
        return shapes


FLUX1 = register(Flux1())

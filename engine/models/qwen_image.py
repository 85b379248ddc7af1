"""Qwen-Image (20B MMDiT; Image, Edit and later releases share the layout).

Single files use the diffusers names, so both layouts are the same. Two releases add a tensor,
which detection passes through to the converted file (ComfyUI tells those releases apart by it) and
our module has no place for: Edit 2511's empty ``__index_timestep_zero__`` marker (its reference
images get time 0), Layered's ``time_text_embed.addition_t_embedding``.

High precision beyond the embedders and the final layer: each block's modulation (``img_mod``,
``txt_mod``, a third of the weights). Both run on one token per sample, so int8 would save memory
but no time, and their error reaches every token of the block: measured on one full-width block with
random weights, the two add about as much output error as six of the twelve other linears together.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from engine.models.spec import (
    Architecture,
    Config,
    Rule,
    Shape,
    block_count,
    linear,
    register,
)

if TYPE_CHECKING:  # the runnable module: engine.models.qwen_image_module
    from torch import nn


TIMESTEP_ZERO = "__index_timestep_zero__"
"""Edit 2511's marker: ComfyUI gives its reference images time 0 where a file holds it (diffusers:
``zero_cond_t`` in config.json, for which a diffusers model converts with the marker)."""


class QwenImage(Architecture):
    name = "qwen_image"
    label = "Qwen-Image"
    diffusers_class = "QwenImageTransformer2DModel"
    signature = ("transformer_blocks.0.img_mod.1.weight", "txt_norm.weight")
    variants = {
        "20B": {
            "hidden": 3072, "head_dim": 128, "in_channels": 64, "out_channels": 64, "text_dim": 3584,
            "mlp_hidden": 12288, "layers": 60,
        },
    }  # fmt: skip
    depth_keys = ("layers",)
    tiny = {
        "tiny": {
            "hidden": 64, "head_dim": 32, "in_channels": 16, "out_channels": 16, "text_dim": 48,
            "mlp_hidden": 256, "layers": 3,
        },
    }  # fmt: skip
    high_precision = ("time_text_embed.*", "img_in.*", "txt_in.*", "*_mod.*", "norm_out.*", "proj_out.*")
    down_projections = ("transformer_blocks.*_mlp.net.2.weight",)
    first_blocks = ("transformer_blocks.0.*",)
    model_names = {"qwen-image": "20B"}
    rules = (Rule("{name}", "{name}"),)

    def diffusers_markers(self, diffusers_config: Mapping[str, object]) -> tuple[str, ...]:
        return (TIMESTEP_ZERO,) if diffusers_config.get("zero_cond_t") else ()

    def build_module(self, config: Config) -> nn.Module:
        from engine.models.qwen_image_module import (
            QwenImageModel,  # torch: only when a model is built
        )

        return QwenImageModel(config)

    def config_from_shapes(self, shapes: Mapping[str, Shape]) -> dict[str, int | bool]:
        return {
            "hidden": shapes["img_in.weight"][0],
            "head_dim": shapes["transformer_blocks.0.attn.norm_q.weight"][0],
            "in_channels": shapes["img_in.weight"][1],
            "out_channels": shapes["proj_out.weight"][0],
            "text_dim": shapes["txt_in.weight"][1],
            "mlp_hidden": shapes["transformer_blocks.0.img_mlp.net.0.proj.weight"][0],
            "layers": block_count(shapes, "transformer_blocks"),
        }

    def tensor_shapes(self, c: Config) -> dict[str, Shape]:
        h, hd, m, text = int(c["hidden"]), int(c["head_dim"]), int(c["mlp_hidden"]), int(c["text_dim"])
        shapes = linear("img_in", h, int(c["in_channels"]))
        shapes |= {"txt_norm.weight": (text,)} | linear("txt_in", h, text)
        embedder = "time_text_embed.timestep_embedder"
        shapes |= linear(f"{embedder}.linear_1", h, 256) | linear(f"{embedder}.linear_2", h, h)
        for i in range(int(c["layers"])):
            b = f"transformer_blocks.{i}"
            for stream in ("img", "txt"):
                shapes |= linear(f"{b}.{stream}_mod.1", 6 * h, h)
            for proj in (
                "to_q",
                "to_k",
                "to_v",
                "add_q_proj",
                "add_k_proj",
                "add_v_proj",
                "to_out.0",
                "to_add_out",
            ):
                shapes |= linear(f"{b}.attn.{proj}", h, h)
            for norm in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
                shapes[f"{b}.attn.{norm}.weight"] = (hd,)
            for stream in ("img", "txt"):
                shapes |= linear(f"{b}.{stream}_mlp.net.0.proj", m, h) | linear(
                    f"{b}.{stream}_mlp.net.2", h, m
                )
        shapes |= linear("norm_out.linear", 2 * h, h) | linear("proj_out", int(c["out_channels"]), h)
        return shapes


QWEN_IMAGE = register(QwenImage())

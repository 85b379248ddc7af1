"""Flux.2 (Klein 4B and 9B, base and distilled; dev 32B).

Unlike Flux.1: no biases, SwiGLU MLPs, three modulation linears shared by all blocks, and a single
block ``linear1`` that diffusers keeps fused too (``attn.to_qkv_mlp_proj``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from engine.models.flux_blocks import FLUX_DOWN_PROJECTIONS, flux_block_config, qk_norm_rules, qk_norms, qkv_rows
from engine.models.spec import Architecture, Config, Rule, Shape, linear, register

if TYPE_CHECKING:  # the runnable module: engine.models.flux2_module
    from torch import nn

KLEIN_4B: Config = {
    "hidden": 3072, "head_dim": 128, "in_channels": 128, "out_channels": 128, "text_dim": 7680,
    "mlp_hidden": 9216, "double_blocks": 5, "single_blocks": 20, "guidance": False,
}  # fmt: skip
TINY_KLEIN: Config = {
    "hidden": 64, "head_dim": 16, "in_channels": 16, "out_channels": 16, "text_dim": 48,
    "mlp_hidden": 192, "double_blocks": 2, "single_blocks": 3, "guidance": False,
}  # fmt: skip
# The modulation linears shared by all blocks: name → output rows in multiples of hidden.
MODULATIONS = {
    "double_stream_modulation_img": 6,
    "double_stream_modulation_txt": 6,
    "single_stream_modulation": 3,
}


def _stream_rules(stream: str, attn: tuple[str, str, str], out: str, norm: str, ff: str) -> tuple[Rule, ...]:
    """One stream (img or txt) of a double block; diffusers names the txt stream's layers "added"."""
    block, target = f"double_blocks.{{i}}.{stream}", "transformer_blocks.{i}"
    return (
        Rule(f"{block}_attn.qkv.{{p}}", tuple(f"{target}.attn.{a}.{{p}}" for a in attn), rows=qkv_rows),
        Rule(f"{block}_attn.proj.{{p}}", f"{target}.attn.{out}.{{p}}"),
        *qk_norm_rules(f"{block}_attn", target, added=norm),
        Rule(f"{block}_mlp.0.{{p}}", f"{target}.{ff}.linear_in.{{p}}"),
        Rule(f"{block}_mlp.2.{{p}}", f"{target}.{ff}.linear_out.{{p}}"),
    )


class Flux2(Architecture):
    name = "flux2"
    label = "Flux.2"
    diffusers_class = "Flux2Transformer2DModel"
    signature = ("double_stream_modulation_img.lin.weight", "single_stream_modulation.lin.weight")
    variants = {
        "Klein 4B": KLEIN_4B,
        "Klein 9B": {**KLEIN_4B, "hidden": 4096, "text_dim": 12288, "mlp_hidden": 12288, "double_blocks": 8,
                     "single_blocks": 24},
        "dev": {**KLEIN_4B, "hidden": 6144, "text_dim": 15360, "mlp_hidden": 18432, "double_blocks": 8,
                "single_blocks": 48, "guidance": True},
    }  # fmt: skip
    depth_keys = ("double_blocks", "single_blocks")
    tiny = {"tiny": TINY_KLEIN, "tiny-guidance": {**TINY_KLEIN, "guidance": True}}
    high_precision = ("img_in.*", "txt_in.*", "time_in.*", "guidance_in.*", "final_layer.*")
    high_precision += tuple(f"{m}.*" for m in MODULATIONS)
    down_projections = FLUX_DOWN_PROJECTIONS
    first_blocks = ("double_blocks.0.*", "single_blocks.0.*")
    model_names = {"flux2-klein-4b": "Klein 4B", "flux2-klein-9b": "Klein 9B", "flux2-dev": "dev"}
    rules = (
        Rule("img_in.{p}", "x_embedder.{p}"),
        Rule("txt_in.{p}", "context_embedder.{p}"),
        *(
            Rule(f"{src}.{layer}.{{p}}", f"time_guidance_embed.{dst}.linear_{n}.{{p}}")
            for src, dst in (("time_in", "timestep_embedder"), ("guidance_in", "guidance_embedder"))
            for n, layer in ((1, "in_layer"), (2, "out_layer"))
        ),
        *(Rule(f"{m}.lin.{{p}}", f"{m}.linear.{{p}}") for m in MODULATIONS),
        *_stream_rules("img", ("to_q", "to_k", "to_v"), "to_out.0", "", "ff"),
        *_stream_rules(
            "txt", ("add_q_proj", "add_k_proj", "add_v_proj"), "to_add_out", "added_", "ff_context"
        ),
        Rule("single_blocks.{i}.linear1.{p}", "single_transformer_blocks.{i}.attn.to_qkv_mlp_proj.{p}"),
        Rule("single_blocks.{i}.linear2.{p}", "single_transformer_blocks.{i}.attn.to_out.{p}"),
        *qk_norm_rules("single_blocks.{i}", "single_transformer_blocks.{i}"),
        Rule("final_layer.linear.{p}", "proj_out.{p}"),
        Rule("final_layer.adaLN_modulation.1.{p}", "norm_out.linear.{p}", swap=True),
    )

    def build_module(self, config: Config) -> nn.Module:
        from engine.models.flux2_module import (
            Flux2Model,  # torch: only when a model is built
        )

        return Flux2Model(config)

    def config_from_shapes(self, shapes: Mapping[str, Shape]) -> dict[str, int | bool]:
        return {**flux_block_config(shapes), "guidance": "guidance_in.in_layer.weight" in shapes}

    def tensor_shapes(self, c: Config) -> dict[str, Shape]:
        h, hd, m = int(c["hidden"]), int(c["head_dim"]), int(c["mlp_hidden"])
        shapes = linear("img_in", h, int(c["in_channels"]), bias=False)
        shapes |= linear("txt_in", h, int(c["text_dim"]), bias=False)
        embedders = ("time_in", "guidance_in") if c["guidance"] else ("time_in",)
        for e in embedders:
            shapes |= linear(f"{e}.in_layer", h, 256, bias=False) | linear(f"{e}.out_layer", h, h, bias=False)
        for module, n in MODULATIONS.items():
            shapes |= linear(f"{module}.lin", n * h, h, bias=False)
        for i in range(int(c["double_blocks"])):
            for stream in ("img", "txt"):
                b = f"double_blocks.{i}.{stream}"
                shapes |= linear(f"{b}_attn.qkv", 3 * h, h, bias=False) | qk_norms(f"{b}_attn", hd)
                shapes |= linear(f"{b}_attn.proj", h, h, bias=False)
                shapes |= linear(f"{b}_mlp.0", 2 * m, h, bias=False) | linear(f"{b}_mlp.2", h, m, bias=False)
        for i in range(int(c["single_blocks"])):
            b = f"single_blocks.{i}"
            shapes |= linear(f"{b}.linear1", 3 * h + 2 * m, h, bias=False)
            shapes |= linear(f"{b}.linear2", h, h + m, bias=False) | qk_norms(b, hd)
        shapes |= linear("final_layer.adaLN_modulation.1", 2 * h, h, bias=False)
        shapes |= linear("final_layer.linear", int(c["out_channels"]), h, bias=False)
        return shapes


FLUX2 = register(Flux2())

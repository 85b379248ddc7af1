"""The double/single block layout that Flux.1 and Chroma share, and helpers Flux.2 reuses.

Single-file names are BFL's (``double_blocks.N.img_attn.qkv``); diffusers splits the fused q, k, v
and, in single blocks, the fused q, k, v + MLP in-projection (``linear1``).
"""

from __future__ import annotations

from collections.abc import Mapping

from engine.models.spec import Config, Rule, Shape, block_count, linear


def qkv_rows(c: Config) -> tuple[int, ...]:
    return (int(c["hidden"]),) * 3


def _linear1_rows(c: Config) -> tuple[int, ...]:
    return (int(c["hidden"]),) * 3 + (int(c["mlp_hidden"]),)


def qk_norm_rules(single: str, diffusers: str, added: str = "") -> tuple[Rule, ...]:
    """``single.norm.{query,key}_norm.scale`` ↔ ``diffusers.attn.norm_[added_]{q,k}.weight``."""
    return (
        Rule(f"{single}.norm.query_norm.scale", f"{diffusers}.attn.norm_{added}q.weight"),
        Rule(f"{single}.norm.key_norm.scale", f"{diffusers}.attn.norm_{added}k.weight"),
    )


# Double and single blocks with biases and GELU MLPs (Flux.1, Chroma).
FLUX_DOWN_PROJECTIONS = ("double_blocks.*_mlp.2.weight", "single_blocks.*.linear2.weight")
"""Linears fed by the GELU/SiLU MLP activation (linear2's input is the attention output concatenated
with it): the layers a ``down`` rotation policy rotates."""

FLUX_BLOCK_RULES: tuple[Rule, ...] = (
    Rule("img_in.{p}", "x_embedder.{p}"),
    Rule("txt_in.{p}", "context_embedder.{p}"),
    Rule(
        "double_blocks.{i}.img_attn.qkv.{p}",
        tuple(f"transformer_blocks.{{i}}.attn.to_{x}.{{p}}" for x in "qkv"),
        rows=qkv_rows,
    ),
    Rule(
        "double_blocks.{i}.txt_attn.qkv.{p}",
        tuple(f"transformer_blocks.{{i}}.attn.add_{x}_proj.{{p}}" for x in "qkv"),
        rows=qkv_rows,
    ),
    *qk_norm_rules("double_blocks.{i}.img_attn", "transformer_blocks.{i}"),
    *qk_norm_rules("double_blocks.{i}.txt_attn", "transformer_blocks.{i}", added="added_"),
    Rule("double_blocks.{i}.img_attn.proj.{p}", "transformer_blocks.{i}.attn.to_out.0.{p}"),
    Rule("double_blocks.{i}.txt_attn.proj.{p}", "transformer_blocks.{i}.attn.to_add_out.{p}"),
    Rule("double_blocks.{i}.img_mlp.0.{p}", "transformer_blocks.{i}.ff.net.0.proj.{p}"),
    Rule("double_blocks.{i}.img_mlp.2.{p}", "transformer_blocks.{i}.ff.net.2.{p}"),
    Rule("double_blocks.{i}.txt_mlp.0.{p}", "transformer_blocks.{i}.ff_context.net.0.proj.{p}"),
    Rule("double_blocks.{i}.txt_mlp.2.{p}", "transformer_blocks.{i}.ff_context.net.2.{p}"),
    Rule(
        "single_blocks.{i}.linear1.{p}",
        (
            *(f"single_transformer_blocks.{{i}}.attn.to_{x}.{{p}}" for x in "qkv"),
            "single_transformer_blocks.{i}.proj_mlp.{p}",
        ),
        rows=_linear1_rows,
    ),
    Rule("single_blocks.{i}.linear2.{p}", "single_transformer_blocks.{i}.proj_out.{p}"),
    *qk_norm_rules("single_blocks.{i}", "single_transformer_blocks.{i}"),
    Rule("final_layer.linear.{p}", "proj_out.{p}"),
)


def qk_norms(block: str, head_dim: int) -> dict[str, Shape]:
    """The RMSNorm scales on queries and keys of one attention (``block.norm.{query,key}_norm``)."""
    return {f"{block}.norm.query_norm.scale": (head_dim,), f"{block}.norm.key_norm.scale": (head_dim,)}


def flux_block_shapes(c: Config, modulation: bool) -> dict[str, Shape]:
    """Double and single blocks of Flux.1 / Chroma (``modulation``: per-block adaLN linears)."""
    h, hd, m = int(c["hidden"]), int(c["head_dim"]), int(c["mlp_hidden"])
    shapes: dict[str, Shape] = {}
    for i in range(int(c["double_blocks"])):
        for stream in ("img", "txt"):
            b = f"double_blocks.{i}.{stream}"
            if modulation:
                shapes |= linear(f"{b}_mod.lin", 6 * h, h)
            shapes |= linear(f"{b}_attn.qkv", 3 * h, h)
            shapes |= qk_norms(f"{b}_attn", hd)
            shapes |= linear(f"{b}_attn.proj", h, h)
            shapes |= linear(f"{b}_mlp.0", m, h) | linear(f"{b}_mlp.2", h, m)
    for i in range(int(c["single_blocks"])):
        b = f"single_blocks.{i}"
        shapes |= linear(f"{b}.linear1", 3 * h + m, h) | linear(f"{b}.linear2", h, h + m)
        shapes |= qk_norms(b, hd)
        if modulation:
            shapes |= linear(f"{b}.modulation.lin", 3 * h, h)
    return shapes


def flux_block_config(shapes: Mapping[str, Shape]) -> dict[str, int]:
    """The config keys Flux.1, Chroma and Flux.2 share, from single-file shapes."""
    return {
        "hidden": shapes["img_in.weight"][0],
        "head_dim": shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0],
        "in_channels": shapes["img_in.weight"][1],
        "out_channels": shapes["final_layer.linear.weight"][0],
        "text_dim": shapes["txt_in.weight"][1],
        "mlp_hidden": shapes["double_blocks.0.img_mlp.2.weight"][1],
        "double_blocks": block_count(shapes, "double_blocks"),
        "single_blocks": block_count(shapes, "single_blocks"),
    }

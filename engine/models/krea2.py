"""Krea 2 (K2, 12.9B single-stream DiT; Raw and Turbo share one layout): detection and conversion only.

One stack of ``blocks`` runs text and image tokens together: grouped-query attention (``wq``; ``wk``
and ``wv`` with fewer heads) with a sigmoid output gate (``attn.gate``) and per-head QK-norm, then a
SwiGLU MLP (``mlp.gate``/``up``/``down``). Modulation is "AdaLN-single": ``tproj`` computes six
vectors once per step from the time embedding, and each block only adds its own learned offsets
(``mod.lin``, a parameter). The text arrives as twelve Qwen3-VL hidden-state layers; ``txtfusion``
(two blocks per layer, a 12 → 1 ``projector``, two refiner blocks) fuses them and ``txtmlp`` projects
them to the width. Not in our engine: Krea 2 runs in ComfyUI through its own model code.

Kept in high precision: the patch embedding ``first``, the time MLP ``tmlp`` and projection ``tproj``
(one token, every block's modulation), the text fusion and projection (text tokens only, once per
step: the text encoder's side, as Z-Image's context refiner), and the output layer ``last``.
Quantized: each block's attention q/k/v/gate/out and MLP linears.

Diffusers' ``Krea2Transformer2DModel`` renames every tensor (``rules``, which map LoRAs trained on it)
but stores each block's modulation as a [6, width] table, a reshape a ``Rule`` does not express: a
diffusers Krea 2 folder is not read (``diffusers_signature`` is empty).
"""

from __future__ import annotations

from collections.abc import Mapping

from engine.models.spec import Architecture, Config, Rule, Shape, block_count, linear, register

FREQ_DIM = 256  # the sinusoidal time embedding's width
PATCH = 2
FUSION_BLOCKS = 2  # layerwise and refiner text blocks, each

K2: Config = {
    "features": 6144, "heads": 48, "kv_heads": 12, "layers": 28, "channels": 16, "text_dim": 2560,
    "text_layers": 12, "text_heads": 20,
}  # fmt: skip
# ComfyUI reads the sizes off the tensors but 128-wide heads, 20 text heads and the MLP ratio, which
# these respect, so its detection reads this file unpatched.
TINY: Config = {
    "features": 256, "heads": 2, "kv_heads": 1, "layers": 2, "channels": 16, "text_dim": 80, "text_layers": 3,
    "text_heads": 20,
}  # fmt: skip


def swiglu_width(features: int) -> int:
    """The SwiGLU hidden width: 2/3 of 4× the width, rounded up to a multiple of 128 (16384 at 6144)."""
    return -(-(int(2 * features / 3) * 4) // 128) * 128


def _block(prefix: str, dim: int, heads: int, kv_heads: int) -> dict[str, Shape]:
    """One transformer block (image stack or text fusion): norms, gated GQA attention, SwiGLU."""
    head = dim // heads
    shapes: dict[str, Shape] = {f"{prefix}.prenorm.scale": (dim,), f"{prefix}.postnorm.scale": (dim,)}
    for proj, out in (("wq", dim), ("wk", head * kv_heads), ("wv", head * kv_heads), ("gate", dim)):
        shapes |= linear(f"{prefix}.attn.{proj}", out, dim, bias=False)
    shapes |= {f"{prefix}.attn.qknorm.qnorm.scale": (head,), f"{prefix}.attn.qknorm.knorm.scale": (head,)}
    shapes |= linear(f"{prefix}.attn.wo", dim, dim, bias=False)
    hidden = swiglu_width(dim)
    for proj, out, inp in (("gate", hidden, dim), ("up", hidden, dim), ("down", dim, hidden)):
        shapes |= linear(f"{prefix}.mlp.{proj}", out, inp, bias=False)
    return shapes


BLOCK_NAMES = (  # single-file → diffusers, inside a block
    ("attn.wq.weight", "attn.to_q.weight"), ("attn.wk.weight", "attn.to_k.weight"),
    ("attn.wv.weight", "attn.to_v.weight"), ("attn.gate.weight", "attn.to_gate.weight"),
    ("attn.wo.weight", "attn.to_out.0.weight"), ("attn.qknorm.qnorm.scale", "attn.norm_q.weight"),
    ("attn.qknorm.knorm.scale", "attn.norm_k.weight"), ("prenorm.scale", "norm1.weight"),
    ("postnorm.scale", "norm2.weight"), ("mlp.{name}", "ff.{name}"),
)  # fmt: skip


class Krea2(Architecture):
    name = "krea2"
    label = "Krea 2"
    diffusers_class = ""
    diffusers_signature = ()  # see the module docstring: block modulation is reshaped in diffusers
    signature = ("txtfusion.projector.weight", "blocks.0.attn.wq.weight")
    variants = {"Raw / Turbo": K2}
    depth_keys = ("layers",)
    tiny = {"tiny": TINY}
    high_precision = ("first.*", "tmlp.*", "tproj.*", "txtfusion.*", "txtmlp.*", "last.*")
    down_projections = ("blocks.*.mlp.down.weight",)
    first_blocks = ("blocks.0.*",)
    rules = (
        Rule("first.{p}", "img_in.{p}"),
        Rule("tmlp.0.{p}", "time_embed.linear_1.{p}"),
        Rule("tmlp.2.{p}", "time_embed.linear_2.{p}"),
        Rule("tproj.1.{p}", "time_mod_proj.{p}"),
        Rule("txtfusion.projector.weight", "text_fusion.projector.weight"),
        *(
            Rule(f"{single}.{{i}}.{a}", f"{diffusers}.{{i}}.{b}")
            for single, diffusers in (("blocks", "transformer_blocks"),
                                      ("txtfusion.layerwise_blocks", "text_fusion.layerwise_blocks"),
                                      ("txtfusion.refiner_blocks", "text_fusion.refiner_blocks"))
            for a, b in BLOCK_NAMES
        ),  # fmt: skip
        Rule("txtmlp.0.scale", "txt_in.norm.weight"),
        Rule("txtmlp.1.{p}", "txt_in.linear_1.{p}"),
        Rule("txtmlp.3.{p}", "txt_in.linear_2.{p}"),
        Rule("last.norm.scale", "final_layer.norm.weight"),
        Rule("last.linear.{p}", "final_layer.linear.{p}"),
        Rule("last.modulation.lin", "final_layer.scale_shift_table"),
    )

    def config_from_shapes(self, shapes: Mapping[str, Shape]) -> dict[str, int | bool]:
        features, patch_in = shapes["first.weight"]
        head = shapes["blocks.0.attn.qknorm.qnorm.scale"][0]
        text = "txtfusion.layerwise_blocks.0"
        text_dim = shapes[f"{text}.prenorm.scale"][0]
        return {
            "features": features,
            "heads": shapes["blocks.0.attn.wq.weight"][0] // head,
            "kv_heads": shapes["blocks.0.attn.wk.weight"][0] // head,
            "layers": block_count(shapes, "blocks"),
            "channels": patch_in // PATCH**2,
            "text_dim": text_dim,
            "text_layers": shapes["txtfusion.projector.weight"][1],
            "text_heads": text_dim // shapes[f"{text}.attn.qknorm.qnorm.scale"][0],
        }

    def tensor_shapes(self, c: Config) -> dict[str, Shape]:
        d, t = int(c["features"]), int(c["text_dim"])
        shapes = linear("first", d, int(c["channels"]) * PATCH**2)
        for i in range(int(c["layers"])):
            shapes[f"blocks.{i}.mod.lin"] = (6 * d,)
            shapes |= _block(f"blocks.{i}", d, int(c["heads"]), int(c["kv_heads"]))
        shapes |= linear("tmlp.0", d, FREQ_DIM) | linear("tmlp.2", d, d)
        text_heads = int(c["text_heads"])
        for i in range(FUSION_BLOCKS):
            shapes |= _block(f"txtfusion.layerwise_blocks.{i}", t, text_heads, text_heads)
        shapes |= linear("txtfusion.projector", 1, int(c["text_layers"]), bias=False)
        for i in range(FUSION_BLOCKS):
            shapes |= _block(f"txtfusion.refiner_blocks.{i}", t, text_heads, text_heads)
        shapes["txtmlp.0.scale"] = (t,)
        shapes |= linear("txtmlp.1", d, t) | linear("txtmlp.3", d, d)
        shapes["last.norm.scale"] = (d,)
        shapes |= linear("last.linear", PATCH**2 * int(c["channels"]), d)
        shapes["last.modulation.lin"] = (2, d)
        shapes |= linear("tproj.1", 6 * d, d)
        return shapes


KREA2 = register(Krea2())

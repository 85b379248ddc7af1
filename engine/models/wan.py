"""Wan 2.1 and 2.2 (video DiTs: 1.3B, 14B, 5B TI2V): detection and conversion only.

Every release has the same block layout (the original/ComfyUI names: ``blocks.N.self_attn.q``,
``cross_attn.*``, ``ffn.0``/``ffn.2``, a per-block ``modulation`` parameter); what tells them apart
is the width, the latent channels in and out (Wan 2.2's 5B VAE has 48; image-to-video concatenates a
mask and the image latent, 36) and Wan 2.1's CLIP image embedder (``img_emb``, ``cross_attn.k_img``;
FLF2V adds positions for its two frames). Wan 2.2's A14B experts (high and low noise) are each a
Wan 2.1 14B-shaped file. Not in our engine: Wan runs in ComfyUI through its own model code, which
the node pack gives our int8 layers.

Kept in high precision: the patch embedding (a Conv3d, by rank anyway), the text, time and image
embedders, the time projection (one token, it computes every block's modulation) and the head; the
per-block modulation is a parameter, never a Linear. Everything quantized is a block's attention
q/k/v/o (image k/v too) and FFN linear.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from engine.models.spec import Architecture, Config, Rule, Shape, block_count, linear, register

FREQ_DIM = 256  # the sinusoidal time embedding's width, the same in every release
PATCH = (1, 2, 2)  # frames, rows, columns of a latent patch, the same in every release

WAN_14B: Config = {
    "dim": 5120, "ffn_dim": 13824, "in_channels": 16, "out_channels": 16, "text_dim": 4096, "layers": 40,
    "image_dim": 0, "image_tokens": 0,
}  # fmt: skip
TINY: Config = {
    "dim": 64, "ffn_dim": 128, "in_channels": 16, "out_channels": 16, "text_dim": 48, "layers": 2,
    "image_dim": 0, "image_tokens": 0,
}  # fmt: skip


class Wan(Architecture):
    name = "wan"
    label = "Wan"
    diffusers_class = "WanTransformer3DModel"
    signature = ("head.modulation", "blocks.0.self_attn.q.weight")
    variants = {
        "2.1 T2V 1.3B": {**WAN_14B, "dim": 1536, "ffn_dim": 8960, "layers": 30},
        "2.1 T2V 14B / 2.2 T2V A14B": WAN_14B,
        "2.1 I2V 14B": {**WAN_14B, "in_channels": 36, "image_dim": 1280},
        "2.1 FLF2V 14B": {**WAN_14B, "in_channels": 36, "image_dim": 1280, "image_tokens": 514},
        "2.2 I2V A14B": {**WAN_14B, "in_channels": 36},
        "2.2 TI2V 5B": {**WAN_14B, "dim": 3072, "ffn_dim": 14336, "in_channels": 48, "out_channels": 48,
                        "layers": 30},
    }  # fmt: skip
    depth_keys = ("layers",)
    tiny = {"tiny": TINY, "tiny-i2v": {**TINY, "in_channels": 36, "image_dim": 32, "image_tokens": 4}}
    high_precision = ("patch_embedding.*", "text_embedding.*", "time_embedding.*", "time_projection.*",
                      "head.*", "img_emb.*")  # fmt: skip
    down_projections = ("blocks.*.ffn.2.weight",)
    first_blocks = ("blocks.0.*",)
    rules = (
        Rule("patch_embedding.{p}", "patch_embedding.{p}"),
        *(
            Rule(f"{src}.{n}.{{p}}", f"condition_embedder.{dst}.linear_{k}.{{p}}")
            for src, dst in (("text_embedding", "text_embedder"), ("time_embedding", "time_embedder"))
            for n, k in ((0, 1), (2, 2))
        ),
        Rule("time_projection.1.{p}", "condition_embedder.time_proj.{p}"),
        *(
            Rule(f"img_emb.proj.{n}.{{p}}", f"condition_embedder.image_embedder.{dst}.{{p}}")
            for n, dst in ((0, "norm1"), (1, "ff.net.0.proj"), (3, "ff.net.2"), (4, "norm2"))
        ),
        Rule("img_emb.emb_pos", "condition_embedder.image_embedder.pos_embed"),
        *(
            Rule(f"blocks.{{i}}.{src}.{a}.{{p}}", f"blocks.{{i}}.{dst}.{b}.{{p}}")
            for src, dst in (("self_attn", "attn1"), ("cross_attn", "attn2"))
            for a, b in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"), ("norm_q", "norm_q"),
                         ("norm_k", "norm_k"), ("k_img", "add_k_proj"), ("v_img", "add_v_proj"),
                         ("norm_k_img", "norm_added_k"))
        ),  # fmt: skip
        Rule("blocks.{i}.norm3.{p}", "blocks.{i}.norm2.{p}"),  # diffusers swapped norm2 and norm3
        Rule("blocks.{i}.ffn.0.{p}", "blocks.{i}.ffn.net.0.proj.{p}"),
        Rule("blocks.{i}.ffn.2.{p}", "blocks.{i}.ffn.net.2.{p}"),
        Rule("blocks.{i}.modulation", "blocks.{i}.scale_shift_table"),
        Rule("head.head.{p}", "proj_out.{p}"),
        Rule("head.modulation", "scale_shift_table"),
    )

    def config_from_shapes(self, shapes: Mapping[str, Shape]) -> dict[str, int | bool]:
        image = "img_emb.proj.1.weight" in shapes
        return {
            "dim": shapes["patch_embedding.weight"][0],
            "ffn_dim": shapes["blocks.0.ffn.0.weight"][0],
            "in_channels": shapes["patch_embedding.weight"][1],
            "out_channels": shapes["head.head.weight"][0] // math.prod(PATCH),
            "text_dim": shapes["text_embedding.0.weight"][1],
            "layers": block_count(shapes, "blocks"),
            "image_dim": shapes["img_emb.proj.1.weight"][1] if image else 0,
            "image_tokens": shapes["img_emb.emb_pos"][1] if "img_emb.emb_pos" in shapes else 0,
        }

    def tensor_shapes(self, c: Config) -> dict[str, Shape]:
        d, f, clip = int(c["dim"]), int(c["ffn_dim"]), int(c["image_dim"])
        shapes: dict[str, Shape] = {
            "patch_embedding.weight": (d, int(c["in_channels"]), *PATCH),
            "patch_embedding.bias": (d,),
        }
        shapes |= linear("text_embedding.0", d, int(c["text_dim"])) | linear("text_embedding.2", d, d)
        shapes |= linear("time_embedding.0", d, FREQ_DIM) | linear("time_embedding.2", d, d)
        shapes |= linear("time_projection.1", 6 * d, d)
        for i in range(int(c["layers"])):
            b = f"blocks.{i}"
            for attn in ("self_attn", "cross_attn"):
                for proj in ("q", "k", "v", "o"):
                    shapes |= linear(f"{b}.{attn}.{proj}", d, d)
                shapes |= {f"{b}.{attn}.norm_q.weight": (d,), f"{b}.{attn}.norm_k.weight": (d,)}
                if attn == "self_attn":
                    shapes |= {f"{b}.norm3.weight": (d,), f"{b}.norm3.bias": (d,)}
            if clip:
                shapes |= linear(f"{b}.cross_attn.k_img", d, d) | linear(f"{b}.cross_attn.v_img", d, d)
                shapes[f"{b}.cross_attn.norm_k_img.weight"] = (d,)
            shapes |= linear(f"{b}.ffn.0", f, d) | linear(f"{b}.ffn.2", d, f)
            shapes[f"{b}.modulation"] = (1, 6, d)
        shapes |= linear("head.head", int(c["out_channels"]) * math.prod(PATCH), d)
        shapes["head.modulation"] = (1, 2, d)
        if clip:
            shapes |= {"img_emb.proj.0.weight": (clip,), "img_emb.proj.0.bias": (clip,)}
            shapes |= linear("img_emb.proj.1", clip, clip) | linear("img_emb.proj.3", d, clip)
            shapes |= {"img_emb.proj.4.weight": (d,), "img_emb.proj.4.bias": (d,)}
            if c["image_tokens"]:
                shapes["img_emb.emb_pos"] = (1, int(c["image_tokens"]), clip)
        return shapes


WAN = register(Wan())

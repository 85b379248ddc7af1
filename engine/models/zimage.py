"""Z-Image (Turbo and Base share one layout; 6B single-stream DiT, ComfyUI's "lumina2" family).

Blocks: ``noise_refiner`` (image tokens, modulated), ``context_refiner`` (caption tokens, not
modulated), then ``layers``. diffusers splits the fused ``qkv`` and keys the patch embedder and
final layer by patch size (``all_x_embedder.2-1``). The single-file ``norm_final`` is unused by
both implementations and has no diffusers counterpart.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from engine.models.spec import Architecture, Config, Rule, Shape, block_count, linear, register

if TYPE_CHECKING:  # the runnable module: engine.models.zimage_module
    from torch import nn

BLOCKS = {"noise_refiner": True, "context_refiner": False, "layers": True}  # name → modulated
PATCH = "2-1"  # diffusers' key for patch size 2, frame patch size 1

TINY: Config = {
    "dim": 64, "head_dim": 16, "patch_in": 16, "cap_dim": 32, "ffn_hidden": 160, "t_mid": 32,
    "adaln_dim": 32, "layers": 3, "refiner_layers": 2,
}  # fmt: skip


def _block_rules(block: str) -> tuple[Rule, ...]:
    b = f"{block}.{{i}}"
    same = [f"{b}.feed_forward.w{n}.{{p}}" for n in (1, 2, 3)]
    same += [
        f"{b}.{norm}.weight" for norm in ("attention_norm1", "attention_norm2", "ffn_norm1", "ffn_norm2")
    ]
    if BLOCKS[block]:
        same.append(f"{b}.adaLN_modulation.0.{{p}}")
    return (
        Rule(
            f"{b}.attention.qkv.{{p}}",
            tuple(f"{b}.attention.to_{x}.{{p}}" for x in "qkv"),
            rows=lambda c: (int(c["dim"]),) * 3,
        ),
        Rule(f"{b}.attention.out.{{p}}", f"{b}.attention.to_out.0.{{p}}"),
        Rule(f"{b}.attention.q_norm.weight", f"{b}.attention.norm_q.weight"),
        Rule(f"{b}.attention.k_norm.weight", f"{b}.attention.norm_k.weight"),
        *(Rule(name, name) for name in same),
    )


class ZImage(Architecture):
    name = "zimage"
    label = "Z-Image"
    diffusers_class = "ZImageTransformer2DModel"
    signature = (
        "cap_embedder.1.weight",
        "x_pad_token",
        "layers.0.adaLN_modulation.0.weight",
        "x_embedder.weight",
    )
    variants = {
        "Turbo/Base": {
            "dim": 3840, "head_dim": 128, "patch_in": 64, "cap_dim": 2560, "ffn_hidden": 10240,
            "t_mid": 1024, "adaln_dim": 256, "layers": 30, "refiner_layers": 2,
        },
    }  # fmt: skip
    depth_keys = ("layers", "refiner_layers")
    tiny = {"tiny": TINY}
    high_precision = (
        "x_embedder.*", "t_embedder.*", "cap_embedder.*", "final_layer.*", "x_pad_token", "cap_pad_token",
        "*.adaLN_modulation.*", "noise_refiner.*", "context_refiner.*",
        "siglip_*",  # Z-Image Omni/Edit's image-prompt embedder and refiner, kept like the other refiners
    )  # fmt: skip
    down_projections = ("layers.*.feed_forward.w2.weight",)
    first_blocks = ("layers.0.*",)  # the refiners stay in high precision anyway
    model_names = {"zimage-turbo": "Turbo/Base", "zimage-base": "Turbo/Base"}
    rules = (
        Rule("x_embedder.{p}", f"all_x_embedder.{PATCH}.{{p}}"),
        Rule("final_layer.{name}", f"all_final_layer.{PATCH}.{{name}}"),
        *(Rule(name, name) for name in ("x_pad_token", "cap_pad_token", "cap_embedder.0.weight")),
        *(
            Rule(f"{m}.{{p}}", f"{m}.{{p}}")
            for m in ("t_embedder.mlp.0", "t_embedder.mlp.2", "cap_embedder.1")
        ),
        *(rule for block in BLOCKS for rule in _block_rules(block)),
    )

    def build_module(self, config: Config) -> nn.Module:
        from engine.models.zimage_module import (
            ZImageModel,  # torch: only when a model is built
        )

        return ZImageModel(config)

    def config_from_shapes(self, shapes: Mapping[str, Shape]) -> dict[str, int | bool]:
        return {
            "dim": shapes["x_embedder.weight"][0],
            "head_dim": shapes["layers.0.attention.q_norm.weight"][0],
            "patch_in": shapes["x_embedder.weight"][1],
            "cap_dim": shapes["cap_embedder.1.weight"][1],
            "ffn_hidden": shapes["layers.0.feed_forward.w1.weight"][0],
            "t_mid": shapes["t_embedder.mlp.0.weight"][0],
            "adaln_dim": shapes["t_embedder.mlp.2.weight"][0],
            "layers": block_count(shapes, "layers"),
            "refiner_layers": block_count(shapes, "noise_refiner"),
        }

    def tensor_shapes(self, c: Config) -> dict[str, Shape]:
        d, hd, f, ad = int(c["dim"]), int(c["head_dim"]), int(c["ffn_hidden"]), int(c["adaln_dim"])
        shapes = linear("x_embedder", d, int(c["patch_in"]))
        shapes |= {"x_pad_token": (1, d), "cap_pad_token": (1, d)}
        shapes |= linear("t_embedder.mlp.0", int(c["t_mid"]), 256) | linear(
            "t_embedder.mlp.2", ad, int(c["t_mid"])
        )
        shapes |= {"cap_embedder.0.weight": (int(c["cap_dim"]),)} | linear(
            "cap_embedder.1", d, int(c["cap_dim"])
        )
        for block, modulated in BLOCKS.items():
            depth = int(c["layers"] if block == "layers" else c["refiner_layers"])
            for i in range(depth):
                b = f"{block}.{i}"
                shapes |= linear(f"{b}.attention.qkv", 3 * d, d, bias=False)
                shapes |= linear(f"{b}.attention.out", d, d, bias=False)
                shapes |= {f"{b}.attention.q_norm.weight": (hd,), f"{b}.attention.k_norm.weight": (hd,)}
                for n, (out, inp) in {1: (f, d), 2: (d, f), 3: (f, d)}.items():
                    shapes |= linear(f"{b}.feed_forward.w{n}", out, inp, bias=False)
                for norm in ("attention_norm1", "ffn_norm1", "attention_norm2", "ffn_norm2"):
                    shapes[f"{b}.{norm}.weight"] = (d,)
                if modulated:
                    shapes |= linear(f"{b}.adaLN_modulation.0", 4 * d, ad)
        shapes["norm_final.weight"] = (d,)
        shapes |= linear("final_layer.linear", int(c["patch_in"]), d)
        shapes |= linear("final_layer.adaLN_modulation.1", d, ad)
        return shapes


ZIMAGE = register(ZImage())

"""HiDream-O1-Image (HiDream.ai's pixel-space unified transformer, 8B; Image and Image-Dev share one
layout): detection and conversion only.

There is no VAE and no separate text encoder: a Qwen3-VL-8B decoder (``language_model``: 36 layers of
grouped-query attention with per-head QK-norm and a SwiGLU MLP) runs the prompt's tokens and the image's
32×32 RGB patches as one sequence. ``x_embedder`` (3072 → 1024 → 4096) brings raw patches into it,
``t_embedder1`` turns the timestep into the embedding of one special token, ``final_layer2`` maps the
hidden states back to pixels; the Qwen3-VL vision tower (``visual``) encodes reference images for
editing and personalization. The names are ComfyUI's (its file, bare or under ``model.diffusion_model.``;
the release's transformers shards, under ``model.``, are not read). Qwen3-VL's unused deepstack mergers
(``visual.deepstack_merger_list``), where a file has them, pass through unchanged: ComfyUI drops them.
Not in our engine: HiDream-O1 runs in ComfyUI through its own model code.

Kept in high precision: the patch embedding, the time embedder (one token), the token embedding (a
lookup, not a matmul), the output layer and the whole vision tower (it runs once per generation on the
reference images, its output cached across steps: no speed to gain). Quantized: each decoder layer's
attention q/k/v/o and MLP gate/up/down projections.
"""

from __future__ import annotations

from collections.abc import Mapping

from engine.models.spec import Architecture, Config, Shape, block_count, linear, register

PATCH_PIXELS = 32 * 32 * 3  # one 32×32 RGB patch, flattened
FREQ_DIM = 256  # the sinusoidal timestep embedding's width
VISION_PATCH = (3, 2, 16, 16)  # the vision tower's Conv3d: RGB, 2 frames, 16×16 pixels
VISION_MERGE = 4  # 2×2 vision tokens merged into one before the projection to the decoder's width

HIDREAM_O1_8B: Config = {
    "hidden": 4096, "heads": 32, "kv_heads": 8, "head_dim": 128, "ffn": 12288, "layers": 36, "vocab": 151936,
    "vision_dim": 1152, "vision_ffn": 4304, "vision_depth": 27, "vision_positions": 2304,
}  # fmt: skip
# 128-wide heads: the multimodal RoPE sections ComfyUI hard-codes (24, 20, 20) cover 64 frequency pairs.
TINY: Config = {
    "hidden": 128, "heads": 2, "kv_heads": 1, "head_dim": 128, "ffn": 256, "layers": 2, "vocab": 512,
    "vision_dim": 64, "vision_ffn": 128, "vision_depth": 1, "vision_positions": 64,
}  # fmt: skip


def vision_tower(c: Config) -> dict[str, Shape]:
    """Qwen3-VL's ViT (as ComfyUI's ``Qwen35VisionModel`` names it), projecting to the decoder's width."""
    v, f, merged = int(c["vision_dim"]), int(c["vision_ffn"]), VISION_MERGE * int(c["vision_dim"])
    shapes: dict[str, Shape] = {"visual.patch_embed.proj.weight": (v, *VISION_PATCH)}
    shapes["visual.patch_embed.proj.bias"] = (v,)
    shapes["visual.pos_embed.weight"] = (int(c["vision_positions"]), v)
    for i in range(int(c["vision_depth"])):
        b = f"visual.blocks.{i}"
        shapes |= {f"{b}.{norm}.{p}": (v,) for norm in ("norm1", "norm2") for p in ("weight", "bias")}
        shapes |= linear(f"{b}.attn.qkv", 3 * v, v) | linear(f"{b}.attn.proj", v, v)
        shapes |= linear(f"{b}.mlp.linear_fc1", f, v) | linear(f"{b}.mlp.linear_fc2", v, f)
    shapes |= {"visual.merger.norm.weight": (v,), "visual.merger.norm.bias": (v,)}
    shapes |= linear("visual.merger.linear_fc1", merged, merged)
    return shapes | linear("visual.merger.linear_fc2", int(c["hidden"]), merged)


class HiDreamO1(Architecture):
    name = "hidream_o1"
    label = "HiDream-O1"
    diffusers_class = ""  # diffusers has no HiDream-O1 class
    signature = ("t_embedder1.mlp.0.weight", "x_embedder.proj1.weight")  # as ComfyUI's detection
    variants = {"8B (Image, Image-Dev)": HIDREAM_O1_8B}
    depth_keys = ("layers",)
    tiny = {"tiny": TINY}
    high_precision = ("visual.*", "language_model.embed_tokens.*", "t_embedder1.*", "x_embedder.*", "final_layer2.*")
    down_projections = ("language_model.layers.*.mlp.down_proj.weight",)
    first_blocks = ("language_model.layers.0.*",)
    rules = ()

    def config_from_shapes(self, shapes: Mapping[str, Shape]) -> dict[str, int | bool]:
        vocab, hidden = shapes["language_model.embed_tokens.weight"]
        layer = "language_model.layers.0"
        head_dim = shapes[f"{layer}.self_attn.q_norm.weight"][0]
        return {
            "hidden": hidden,
            "heads": shapes[f"{layer}.self_attn.q_proj.weight"][0] // head_dim,
            "kv_heads": shapes[f"{layer}.self_attn.k_proj.weight"][0] // head_dim,
            "head_dim": head_dim,
            "ffn": shapes[f"{layer}.mlp.gate_proj.weight"][0],
            "layers": block_count(shapes, "language_model.layers"),
            "vocab": vocab,
            "vision_dim": shapes["visual.patch_embed.proj.weight"][0],
            "vision_ffn": shapes["visual.blocks.0.mlp.linear_fc1.weight"][0],
            "vision_depth": block_count(shapes, "visual.blocks"),
            "vision_positions": shapes["visual.pos_embed.weight"][0],
        }

    def tensor_shapes(self, c: Config) -> dict[str, Shape]:
        d, f = int(c["hidden"]), int(c["ffn"])
        inner, kv = int(c["heads"]) * int(c["head_dim"]), int(c["kv_heads"]) * int(c["head_dim"])
        shapes = vision_tower(c)
        shapes["language_model.embed_tokens.weight"] = (int(c["vocab"]), d)
        for i in range(int(c["layers"])):
            b = f"language_model.layers.{i}"
            shapes |= linear(f"{b}.self_attn.q_proj", inner, d, bias=False)
            shapes |= linear(f"{b}.self_attn.k_proj", kv, d, bias=False)
            shapes |= linear(f"{b}.self_attn.v_proj", kv, d, bias=False)
            shapes |= linear(f"{b}.self_attn.o_proj", d, inner, bias=False)
            head = (int(c["head_dim"]),)
            shapes |= {f"{b}.self_attn.q_norm.weight": head, f"{b}.self_attn.k_norm.weight": head}
            shapes |= linear(f"{b}.mlp.gate_proj", f, d, bias=False) | linear(f"{b}.mlp.up_proj", f, d, bias=False)
            shapes |= linear(f"{b}.mlp.down_proj", d, f, bias=False)
            shapes |= {f"{b}.input_layernorm.weight": (d,), f"{b}.post_attention_layernorm.weight": (d,)}
        shapes["language_model.norm.weight"] = (d,)
        shapes |= linear("t_embedder1.mlp.0", d, FREQ_DIM) | linear("t_embedder1.mlp.2", d, d)
        shapes |= linear("x_embedder.proj1", d // 4, PATCH_PIXELS, bias=False) | linear("x_embedder.proj2", d, d // 4)
        return shapes | linear("final_layer2.linear", PATCH_PIXELS, d)


HIDREAM_O1 = register(HiDreamO1())

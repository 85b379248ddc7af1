"""ERNIE-Image (Baidu, 8B single-stream DiT; ERNIE-Image and its distilled Turbo share one layout):
detection and conversion only.

Image patches (a ``patch_size`` Conv2d, 1×1 on the Flux.2 VAE's 128 channels) and the projected text
(``text_proj``, from Ministral 3B's 3072 channels) run together through ``layers``: RMSNorm, self
attention with per-head QK-norm, a GELU-gated MLP (``gate_proj``, ``up_proj``, ``linear_fc2``). One
shared ``adaLN_modulation`` computes every layer's six modulation vectors from the time embedding.
Its single-file names (ComfyUI's) are diffusers' ``ErnieImageTransformer2DModel`` names. Not in our
engine: ERNIE-Image runs in ComfyUI through its own model code.

Kept in high precision: the patch embedding (a Conv2d, by rank anyway), ``text_proj``, the time
embedding, ``adaLN_modulation`` (one token: every layer's modulation), ``final_norm``'s modulation
linear and ``final_linear``. Quantized: each layer's attention q/k/v/out and MLP linears.
"""

from __future__ import annotations

from collections.abc import Mapping

from engine.models.spec import Architecture, Config, Rule, Shape, block_count, linear, register

ERNIE_8B: Config = {
    "hidden": 4096, "heads": 32, "layers": 36, "ffn": 12288, "in_channels": 128, "out_channels": 128, "patch": 1,
    "text_dim": 3072,
}  # fmt: skip
# 128-wide heads: the RoPE axes ComfyUI hard-codes (32, 48, 48) sum to 128.
TINY: Config = {
    "hidden": 256, "heads": 2, "layers": 2, "ffn": 512, "in_channels": 128, "out_channels": 128, "patch": 1,
    "text_dim": 48,
}  # fmt: skip


class Ernie(Architecture):
    name = "ernie"
    label = "ERNIE-Image"
    diffusers_class = "ErnieImageTransformer2DModel"
    signature = ("layers.0.mlp.linear_fc2.weight", "layers.0.self_attention.to_q.weight")
    variants = {"8B / Turbo": ERNIE_8B}
    depth_keys = ("layers",)
    tiny = {"tiny": TINY}
    high_precision = ("x_embedder.*", "text_proj.*", "time_embedding.*", "adaLN_modulation.*", "final_norm.*",
                      "final_linear.*")  # fmt: skip
    down_projections = ("layers.*.mlp.linear_fc2.weight",)
    first_blocks = ("layers.0.*",)
    rules = (Rule("{name}", "{name}"),)

    def config_from_shapes(self, shapes: Mapping[str, Shape]) -> dict[str, int | bool]:
        hidden, in_channels, patch, _ = shapes["x_embedder.proj.weight"]
        return {
            "hidden": hidden,
            "heads": hidden // shapes["layers.0.self_attention.norm_q.weight"][0],
            "layers": block_count(shapes, "layers"),
            "ffn": shapes["layers.0.mlp.gate_proj.weight"][0],
            "in_channels": in_channels,
            "out_channels": shapes["final_linear.weight"][0] // patch**2,
            "patch": patch,
            "text_dim": shapes["text_proj.weight"][1] if "text_proj.weight" in shapes else hidden,
        }

    def tensor_shapes(self, c: Config) -> dict[str, Shape]:
        d, f, p = int(c["hidden"]), int(c["ffn"]), int(c["patch"])
        shapes: dict[str, Shape] = {
            "x_embedder.proj.weight": (d, int(c["in_channels"]), p, p),
            "x_embedder.proj.bias": (d,),
        }
        if c["text_dim"] != d:  # the text is projected only where its width differs
            shapes |= linear("text_proj", d, int(c["text_dim"]), bias=False)
        shapes |= linear("time_embedding.linear_1", d, d) | linear("time_embedding.linear_2", d, d)
        shapes |= linear("adaLN_modulation.1", 6 * d, d)
        head = d // int(c["heads"])
        for i in range(int(c["layers"])):
            b = f"layers.{i}"
            shapes[f"{b}.adaLN_sa_ln.weight"] = (d,)
            for proj in ("to_q", "to_k", "to_v"):
                shapes |= linear(f"{b}.self_attention.{proj}", d, d, bias=False)
            shapes |= {f"{b}.self_attention.norm_q.weight": (head,), f"{b}.self_attention.norm_k.weight": (head,)}
            shapes |= linear(f"{b}.self_attention.to_out.0", d, d, bias=False)
            shapes[f"{b}.adaLN_mlp_ln.weight"] = (d,)
            shapes |= linear(f"{b}.mlp.gate_proj", f, d, bias=False) | linear(f"{b}.mlp.up_proj", f, d, bias=False)
            shapes |= linear(f"{b}.mlp.linear_fc2", d, f, bias=False)
        shapes |= linear("final_norm.linear", 2 * d, d)
        shapes |= linear("final_linear", p * p * int(c["out_channels"]), d)
        return shapes


ERNIE = register(Ernie())

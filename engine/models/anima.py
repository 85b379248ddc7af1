"""Anima (CircleStone Labs' 2B anime model: NVIDIA's Cosmos-Predict2-2B DiT with an LLM adapter):
detection and conversion only.

The DiT is Cosmos-Predict2's ``MiniTrainDIT``: patch embedding ``x_embedder`` (the latent and a padding
mask, 2×2 patches), then ``blocks`` of self attention, cross attention to the text and a GELU MLP
(``mlp.layer1``/``layer2``), each branch modulated by its own "AdaLN-LoRA" pair of linears from the one
time embedding (``adaln_modulation_*``). ``llm_adapter`` turns Qwen3 0.6B's hidden states into the
1024-wide, T5-tokenized context the blocks attend to: a T5 token embedding and six small transformer
blocks, run once per prompt. The names are the original's (its file is under ``net.``, ComfyUI's under
``model.diffusion_model.``); ComfyUI reads it as Cosmos-Predict2 plus the adapter. Not in our engine:
Anima runs in ComfyUI through its own model code.

Kept in high precision: the patch embedding, the time embedder and its norm, every AdaLN-LoRA
modulation pair (one token: their error reaches every token), the final layer, and the whole adapter
(text only, once per prompt: no speed to gain). Quantized: each block's attention q/k/v/out and MLP.

Diffusers splits Anima in two models (``CosmosTransformer3DModel`` and ``AnimaTextConditioner``, two
folders): ``rules`` give their names, which LoRAs trained with diffusers use (``transformer.`` and
``text_conditioner.``); a diffusers folder is not read (``diffusers_signature`` is empty).
"""

from __future__ import annotations

from collections.abc import Mapping

from engine.models.spec import Architecture, Config, Rule, Shape, block_count, linear, register

PATCH = 2  # spatial; one frame per patch
ADALN_LORA = 256  # the AdaLN-LoRA bottleneck, fixed in Cosmos-Predict2
MLP_RATIO = 4
T5_VOCAB = 32128  # the adapter embeds T5 token ids (ComfyUI hard-codes the count)

ANIMA_2B: Config = {
    "dim": 2048, "heads": 16, "layers": 28, "in_channels": 16, "out_channels": 16, "text_dim": 1024,
    "llm_dim": 1024, "adapter_layers": 6, "adapter_heads": 16,
}  # fmt: skip
# 128-wide heads, as the released width gives: Cosmos' 3-D RoPE splits a head in thirds of even sizes.
TINY: Config = {
    "dim": 256, "heads": 2, "layers": 2, "in_channels": 16, "out_channels": 16, "text_dim": 32, "llm_dim": 48,
    "adapter_layers": 1, "adapter_heads": 2,
}  # fmt: skip

BLOCK_NAMES = (  # original → CosmosTransformer3DModel, inside a block
    *((f"adaln_modulation_{branch}.{n}", f"norm{k}.linear_{n}")
      for k, branch in enumerate(("self_attn", "cross_attn", "mlp"), 1) for n in (1, 2)),
    *((f"{attn}.{a}", f"{dst}.{b}")
      for attn, dst in (("self_attn", "attn1"), ("cross_attn", "attn2"))
      for a, b in (("q_proj", "to_q"), ("k_proj", "to_k"), ("v_proj", "to_v"), ("output_proj", "to_out.0"),
                   ("q_norm", "norm_q"), ("k_norm", "norm_k"))),
    ("mlp.layer1", "ff.net.0.proj"), ("mlp.layer2", "ff.net.2"),
)  # fmt: skip


def attention(name: str, dim: int, context: int, head: int, out: str) -> dict[str, Shape]:
    """Bias-free q/k/v/out with per-head RMS norms on q and k (the DiT's and the adapter's)."""
    shapes = linear(f"{name}.q_proj", dim, dim, bias=False) | {f"{name}.q_norm.weight": (head,)}
    shapes |= linear(f"{name}.k_proj", dim, context, bias=False) | {f"{name}.k_norm.weight": (head,)}
    return shapes | linear(f"{name}.v_proj", dim, context, bias=False) | linear(f"{name}.{out}", dim, dim, bias=False)


def adapter(c: Config) -> dict[str, Shape]:
    """``llm_adapter``: T5 token embeddings attending to Qwen3's hidden states (ComfyUI's ``LLMAdapter``)."""
    t, llm, head = int(c["text_dim"]), int(c["llm_dim"]), int(c["text_dim"]) // int(c["adapter_heads"])
    shapes: dict[str, Shape] = {"llm_adapter.embed.weight": (T5_VOCAB, t)}
    for i in range(int(c["adapter_layers"])):
        b = f"llm_adapter.blocks.{i}"
        shapes[f"{b}.norm_self_attn.weight"] = (t,)
        shapes |= attention(f"{b}.self_attn", t, t, head, "o_proj")
        shapes[f"{b}.norm_cross_attn.weight"] = (t,)
        shapes |= attention(f"{b}.cross_attn", t, llm, head, "o_proj")
        shapes[f"{b}.norm_mlp.weight"] = (t,)
        shapes |= linear(f"{b}.mlp.0", MLP_RATIO * t, t) | linear(f"{b}.mlp.2", t, MLP_RATIO * t)
    return shapes | linear("llm_adapter.out_proj", t, t) | {"llm_adapter.norm.weight": (t,)}


class Anima(Architecture):
    name = "anima"
    label = "Anima"
    diffusers_class = ""
    diffusers_signature = ()  # see the module docstring: two diffusers models
    signature = ("blocks.0.mlp.layer1.weight", "llm_adapter.blocks.0.cross_attn.q_proj.weight")  # as ComfyUI's
    variants = {"2B (preview)": ANIMA_2B}
    depth_keys = ("layers",)
    tiny = {"tiny": TINY}
    high_precision = ("x_embedder.*", "t_embedder.*", "t_embedding_norm.*", "blocks.*.adaln_modulation_*",
                      "final_layer.*", "llm_adapter.*")  # fmt: skip
    down_projections = ("blocks.*.mlp.layer2.weight",)
    first_blocks = ("blocks.0.*",)
    rules = (
        Rule("x_embedder.proj.1.weight", "patch_embed.proj.weight"),
        Rule("t_embedder.1.{name}", "time_embed.t_embedder.{name}"),
        Rule("t_embedding_norm.weight", "time_embed.norm.weight"),
        *(Rule(f"blocks.{{i}}.{a}.weight", f"transformer_blocks.{{i}}.{b}.weight") for a, b in BLOCK_NAMES),
        Rule("final_layer.adaln_modulation.{i}.weight", "norm_out.linear_{i}.weight"),
        Rule("final_layer.linear.weight", "proj_out.weight"),
        Rule("llm_adapter.{name}", "text_conditioner.{name}"),
    )

    def config_from_shapes(self, shapes: Mapping[str, Shape]) -> dict[str, int | bool]:
        dim, patch_in = shapes["x_embedder.proj.1.weight"]
        text_dim = shapes["llm_adapter.out_proj.weight"][0]
        return {
            "dim": dim,
            "heads": dim // shapes["blocks.0.self_attn.q_norm.weight"][0],
            "layers": block_count(shapes, "blocks"),
            "in_channels": patch_in // PATCH**2 - 1,  # the padding mask is one more channel
            "out_channels": shapes["final_layer.linear.weight"][0] // PATCH**2,
            "text_dim": text_dim,
            "llm_dim": shapes["llm_adapter.blocks.0.cross_attn.k_proj.weight"][1],
            "adapter_layers": block_count(shapes, "llm_adapter.blocks"),
            "adapter_heads": text_dim // shapes["llm_adapter.blocks.0.self_attn.q_norm.weight"][0],
        }

    def tensor_shapes(self, c: Config) -> dict[str, Shape]:
        d, head = int(c["dim"]), int(c["dim"]) // int(c["heads"])
        shapes = linear("t_embedder.1.linear_1", d, d, bias=False)
        shapes |= linear("t_embedder.1.linear_2", 3 * d, d, bias=False)  # shift, scale, gate every block adds
        shapes |= linear("x_embedder.proj.1", d, (int(c["in_channels"]) + 1) * PATCH**2, bias=False)
        for i in range(int(c["layers"])):
            b = f"blocks.{i}"
            shapes |= attention(f"{b}.self_attn", d, d, head, "output_proj")
            shapes |= attention(f"{b}.cross_attn", d, int(c["text_dim"]), head, "output_proj")
            shapes |= linear(f"{b}.mlp.layer1", MLP_RATIO * d, d, bias=False)
            shapes |= linear(f"{b}.mlp.layer2", d, MLP_RATIO * d, bias=False)
            for branch in ("self_attn", "cross_attn", "mlp"):
                shapes |= linear(f"{b}.adaln_modulation_{branch}.1", ADALN_LORA, d, bias=False)
                shapes |= linear(f"{b}.adaln_modulation_{branch}.2", 3 * d, ADALN_LORA, bias=False)
        shapes |= linear("final_layer.linear", PATCH**2 * int(c["out_channels"]), d, bias=False)
        shapes |= linear("final_layer.adaln_modulation.1", ADALN_LORA, d, bias=False)
        shapes |= linear("final_layer.adaln_modulation.2", 2 * d, ADALN_LORA, bias=False)
        shapes["t_embedding_norm.weight"] = (d,)
        return shapes | adapter(c)


ANIMA = register(Anima())

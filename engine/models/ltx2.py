"""LTX-2 and LTX-2.3 (Lightricks' audio-video DiTs, 19B and 22B; ComfyUI's LTXAV): detection and
conversion only.

One checkpoint holds two transformers that run side by side in every block: video (4096 wide, 128
latent channels) and audio (2048 wide, 128 channels), each with self-attention, text cross-attention
and a GELU FFN, joined by audio→video and video→audio cross-attention. The names are ComfyUI's
(the released single file uses them under ``model.diffusion_model.``). Not in our engine: LTX-2 runs
in ComfyUI through its own model code, which the node pack gives our int8 layers.

LTX-2.3 adds a per-head sigmoid gate to every attention (``to_gate_logits``, the connectors' too), a
timestep modulation of the text cross-attention (9-row adaLN tables, ``prompt_adaln_single``, per-block
``prompt_scale_shift_table``) and projects the text in its text encoder, per modality, so it has no
caption projections and its connectors run at the video and audio widths. ComfyUI tells the two apart
by the release file's ``config`` metadata, which a conversion keeps; we tell them by these tensors.

Kept in high precision: the patchifiers (``patchify_proj``, ``audio_patchify_proj``), every adaLN-single
(the timestep embedders and the one-token linears computing each block's modulation), the caption
projections and the text connectors (two small transformers run once per prompt, not per step: no
speed to gain), the attention gates (one output per head) and the output heads. The per-block
modulation tables are parameters, never a Linear. Everything quantized is a block's attention
q/k/v/out and FFN linear, video and audio alike.

Diffusers' ``LTX2VideoTransformer3DModel`` renames a few tensors (``rules``, which map LoRAs trained
on it) but keeps the text connectors in another model (``LTX2TextConnectors``): a diffusers folder is
not read (``diffusers_signature`` is empty).
"""

from __future__ import annotations

from collections.abc import Mapping

from engine.models.spec import Architecture, Config, Rule, Shape, block_count, linear, register

FREQ_DIM = 256  # the sinusoidal timestep embedding's width
FFN_MULT = 4  # ComfyUI's FeedForward: a fixed 4× GELU MLP
HEADS = 32  # attention heads, video and audio alike (ComfyUI's detection assumes 32 too)
ADALN_PARAMS = {False: 6, True: 9}  # shift, scale, gate for attention and FFN (+ text cross-attention: 2.3)
PROMPT_ADALN_PARAMS = 2  # LTX-2.3's shift and scale of the text the cross-attention reads
CONNECTORS = ("video_embeddings_connector", "audio_embeddings_connector")
# each adaLN-single of the model: name, width ("dim" or "audio_dim"), rows per width (None: the blocks')
ADALN_SINGLES = (
    ("adaln_single", "dim", None),
    ("audio_adaln_single", "audio_dim", None),
    ("av_ca_video_scale_shift_adaln_single", "dim", 4),
    ("av_ca_a2v_gate_adaln_single", "dim", 1),
    ("av_ca_audio_scale_shift_adaln_single", "audio_dim", 4),
    ("av_ca_v2a_gate_adaln_single", "audio_dim", 1),
)
LTX_2_19B: Config = {
    "dim": 4096, "audio_dim": 2048, "in_channels": 128, "audio_in_channels": 128, "caption_channels": 3840,
    "connector_dim": 3840, "audio_connector_dim": 3840, "connector_layers": 2, "registers": 128, "layers": 48,
    "v2_3": False,
}  # fmt: skip
TINY: Config = {
    "dim": 256, "audio_dim": 128, "in_channels": 128, "audio_in_channels": 128, "caption_channels": 64,
    "connector_dim": 64, "audio_connector_dim": 64, "connector_layers": 1, "registers": 128, "layers": 2,
    "v2_3": False,
}  # fmt: skip  (128 registers: ComfyUI hard-codes them)
# LTX-2.3's layout: no caption projection in the model (caption_channels 0), gates, prompt modulation
LTX_2_3_LAYOUT: Config = {"caption_channels": 0, "v2_3": True}


def attention(name: str, query: int, inner: int, context: int, gated: bool) -> dict[str, Shape]:
    """ComfyUI's LTX ``CrossAttention``: biased q/k/v/out, RMS norms over all heads' q and k; LTX-2.3's
    per-head output gate."""
    shapes = linear(f"{name}.to_q", inner, query) | linear(f"{name}.to_k", inner, context)
    shapes |= linear(f"{name}.to_v", inner, context) | linear(f"{name}.to_out.0", query, inner)
    shapes |= {f"{name}.q_norm.weight": (inner,), f"{name}.k_norm.weight": (inner,)}
    return shapes | (linear(f"{name}.to_gate_logits", HEADS, query) if gated else {})


def feed_forward(name: str, dim: int) -> dict[str, Shape]:
    return linear(f"{name}.net.0.proj", FFN_MULT * dim, dim) | linear(f"{name}.net.2", dim, FFN_MULT * dim)


def adaln_single(name: str, dim: int, rows: int) -> dict[str, Shape]:
    shapes = linear(f"{name}.emb.timestep_embedder.linear_1", dim, FREQ_DIM)
    return shapes | linear(f"{name}.emb.timestep_embedder.linear_2", dim, dim) | linear(f"{name}.linear", rows * dim, dim)


class LTX2(Architecture):
    name = "ltx2"
    label = "LTX-2"
    diffusers_class = ""
    diffusers_signature = ()  # see the module docstring: the connectors are another diffusers model
    signature = ("audio_adaln_single.linear.weight", "transformer_blocks.0.audio_to_video_attn.to_q.weight")
    variants = {
        "19B (dev, distilled)": LTX_2_19B,
        "2.3 22B (dev, distilled)": {
            **LTX_2_19B, **LTX_2_3_LAYOUT, "connector_dim": 4096, "audio_connector_dim": 2048, "connector_layers": 8,
        },
    }
    depth_keys = ("layers",)
    tiny = {
        "tiny": TINY,
        "tiny-2.3": {**TINY, **LTX_2_3_LAYOUT, "connector_dim": TINY["dim"], "audio_connector_dim": TINY["audio_dim"]},
    }
    high_precision = (
        "patchify_proj.*", "audio_patchify_proj.*", *(f"{name}.*" for name, _, _ in ADALN_SINGLES),
        "prompt_adaln_single.*", "audio_prompt_adaln_single.*", "caption_projection.*", "audio_caption_projection.*",
        *(f"{c}.*" for c in CONNECTORS), "*.to_gate_logits.*", "proj_out.*", "audio_proj_out.*",
    )  # fmt: skip
    down_projections = ("transformer_blocks.*.ff.net.2.weight", "transformer_blocks.*.audio_ff.net.2.weight")
    first_blocks = ("transformer_blocks.0.*",)
    rules = (  # diffusers' names (diffusers.loaders.single_file_utils.convert_ltx2_transformer_to_diffusers)
        Rule("patchify_proj.{p}", "proj_in.{p}"),
        Rule("audio_patchify_proj.{p}", "audio_proj_in.{p}"),
        *(Rule(f"{single}.{{name}}", f"{diffusers}.{{name}}") for single, diffusers in (
            ("adaln_single", "time_embed"), ("audio_adaln_single", "audio_time_embed"),
            ("prompt_adaln_single", "prompt_adaln"), ("audio_prompt_adaln_single", "audio_prompt_adaln"),
            ("av_ca_video_scale_shift_adaln_single", "av_cross_attn_video_scale_shift"),
            ("av_ca_a2v_gate_adaln_single", "av_cross_attn_video_a2v_gate"),
            ("av_ca_audio_scale_shift_adaln_single", "av_cross_attn_audio_scale_shift"),
            ("av_ca_v2a_gate_adaln_single", "av_cross_attn_audio_v2a_gate"),
            ("caption_projection", "caption_projection"), ("audio_caption_projection", "audio_caption_projection"),
        )),  # fmt: skip
        Rule("transformer_blocks.{i}.scale_shift_table_a2v_ca_video",
             "transformer_blocks.{i}.video_a2v_cross_attn_scale_shift_table"),
        Rule("transformer_blocks.{i}.scale_shift_table_a2v_ca_audio",
             "transformer_blocks.{i}.audio_a2v_cross_attn_scale_shift_table"),
        Rule("transformer_blocks.{i}.{name}.q_norm.weight", "transformer_blocks.{i}.{name}.norm_q.weight"),
        Rule("transformer_blocks.{i}.{name}.k_norm.weight", "transformer_blocks.{i}.{name}.norm_k.weight"),
        Rule("transformer_blocks.{i}.{name}", "transformer_blocks.{i}.{name}"),
        *(Rule(name, name) for name in ("scale_shift_table", "audio_scale_shift_table")),
        Rule("proj_out.{p}", "proj_out.{p}"),
        Rule("audio_proj_out.{p}", "audio_proj_out.{p}"),
    )  # fmt: skip

    def config_from_shapes(self, shapes: Mapping[str, Shape]) -> dict[str, int | bool]:
        caption = shapes.get("caption_projection.linear_1.weight", (0, 0))[1]  # LTX-2.3 has none
        return {
            "dim": shapes["patchify_proj.weight"][0],
            "audio_dim": shapes["audio_patchify_proj.weight"][0],
            "in_channels": shapes["patchify_proj.weight"][1],
            "audio_in_channels": shapes["audio_patchify_proj.weight"][1],
            "caption_channels": caption,
            "connector_dim": shapes[f"{CONNECTORS[0]}.learnable_registers"][1],
            "audio_connector_dim": shapes[f"{CONNECTORS[1]}.learnable_registers"][1],
            "connector_layers": block_count(shapes, f"{CONNECTORS[0]}.transformer_1d_blocks"),
            "registers": shapes[f"{CONNECTORS[0]}.learnable_registers"][0],
            "layers": block_count(shapes, "transformer_blocks"),
            "v2_3": "prompt_adaln_single.linear.weight" in shapes,
        }

    def tensor_shapes(self, c: Config) -> dict[str, Shape]:
        d, a, caption, v2_3 = int(c["dim"]), int(c["audio_dim"]), int(c["caption_channels"]), bool(c["v2_3"])
        width, rows = {"dim": d, "audio_dim": a}, ADALN_PARAMS[v2_3]
        shapes = linear("patchify_proj", d, int(c["in_channels"])) | adaln_single("adaln_single", d, rows)
        if v2_3:
            shapes |= adaln_single("prompt_adaln_single", d, PROMPT_ADALN_PARAMS)
        if caption:
            shapes |= linear("caption_projection.linear_1", d, caption) | linear("caption_projection.linear_2", d, d)
        shapes |= linear("audio_patchify_proj", a, int(c["audio_in_channels"]))
        for name, key, n in ADALN_SINGLES[1:]:
            shapes |= adaln_single(name, width[key], n or rows)
        if v2_3:
            shapes |= adaln_single("audio_prompt_adaln_single", a, PROMPT_ADALN_PARAMS)
        if caption:
            shapes |= linear("audio_caption_projection.linear_1", a, caption)
            shapes |= linear("audio_caption_projection.linear_2", a, a)
        for connector, key in zip(CONNECTORS, ("connector_dim", "audio_connector_dim"), strict=True):
            w = int(c[key])  # LTX-2: Gemma 3's 3840 for both; LTX-2.3: the video and audio widths
            for i in range(int(c["connector_layers"])):
                b = f"{connector}.transformer_1d_blocks.{i}"
                shapes |= attention(f"{b}.attn1", w, w, w, v2_3) | feed_forward(f"{b}.ff", w)
            shapes[f"{connector}.learnable_registers"] = (int(c["registers"]), w)
        for i in range(int(c["layers"])):
            b = f"transformer_blocks.{i}"
            shapes |= attention(f"{b}.attn1", d, d, d, v2_3) | attention(f"{b}.audio_attn1", a, a, a, v2_3)
            shapes |= attention(f"{b}.attn2", d, d, d, v2_3) | attention(f"{b}.audio_attn2", a, a, a, v2_3)
            # the cross-modal attentions run at the audio width, with the audio heads
            shapes |= attention(f"{b}.audio_to_video_attn", d, a, a, v2_3)
            shapes |= attention(f"{b}.video_to_audio_attn", a, a, d, v2_3)
            shapes |= feed_forward(f"{b}.ff", d) | feed_forward(f"{b}.audio_ff", a)
            shapes |= {f"{b}.scale_shift_table": (rows, d), f"{b}.audio_scale_shift_table": (rows, a)}
            if v2_3:
                shapes[f"{b}.prompt_scale_shift_table"] = (PROMPT_ADALN_PARAMS, d)
                shapes[f"{b}.audio_prompt_scale_shift_table"] = (PROMPT_ADALN_PARAMS, a)
            shapes |= {f"{b}.scale_shift_table_a2v_ca_audio": (5, a), f"{b}.scale_shift_table_a2v_ca_video": (5, d)}
        shapes |= {"scale_shift_table": (2, d)} | linear("proj_out", int(c["in_channels"]), d)
        shapes |= {"audio_scale_shift_table": (2, a)} | linear("audio_proj_out", int(c["audio_in_channels"]), a)
        return shapes


LTX_2 = register(LTX2())

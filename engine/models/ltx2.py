"""LTX-2 (Lightricks' audio-video DiT, 19B; ComfyUI's LTXAV): detection and conversion only.

One checkpoint holds two transformers that run side by side in every block: video (4096 wide, 128
latent channels) and audio (2048 wide, 128 channels), each with self-attention, text cross-attention
and a GELU FFN, joined by audio→video and video→audio cross-attention. The names are ComfyUI's
(the released single file uses them under ``model.diffusion_model.``). Not in our engine: LTX-2 runs
in ComfyUI through its own model code, which the node pack gives our int8 layers.

Kept in high precision: the patchifiers (``patchify_proj``, ``audio_patchify_proj``), every adaLN-single
(the timestep embedders and the one-token linears computing each block's modulation), the caption
projections and the text connectors (two small transformers run once per prompt, not per step: no
speed to gain), and the output heads. The per-block modulation tables are parameters, never a Linear.
Everything quantized is a block's attention q/k/v/out and FFN linear, video and audio alike.
"""

from __future__ import annotations

from collections.abc import Mapping

from engine.models.spec import Architecture, Config, Shape, block_count, linear, register

FREQ_DIM = 256  # the sinusoidal timestep embedding's width
FFN_MULT = 4  # ComfyUI's FeedForward: a fixed 4× GELU MLP
ADALN_PARAMS = 6  # shift, scale, gate for attention and FFN (LTX-2.3's cross-attention adaLN has 9)
CONNECTORS = ("video_embeddings_connector", "audio_embeddings_connector")
# each adaLN-single of the model: name, width ("dim" or "audio_dim"), rows per width
ADALN_SINGLES = (
    ("adaln_single", "dim", ADALN_PARAMS),
    ("audio_adaln_single", "audio_dim", ADALN_PARAMS),
    ("av_ca_video_scale_shift_adaln_single", "dim", 4),
    ("av_ca_a2v_gate_adaln_single", "dim", 1),
    ("av_ca_audio_scale_shift_adaln_single", "audio_dim", 4),
    ("av_ca_v2a_gate_adaln_single", "audio_dim", 1),
)
TINY: Config = {
    "dim": 256, "audio_dim": 128, "in_channels": 128, "audio_in_channels": 128, "caption_channels": 64,
    "connector_layers": 1, "registers": 128, "layers": 2,  # 128 registers: ComfyUI hard-codes them
}  # fmt: skip


def attention(name: str, query: int, inner: int, context: int) -> dict[str, Shape]:
    """ComfyUI's LTX ``CrossAttention``: biased q/k/v/out, RMS norms over all heads' q and k."""
    shapes = linear(f"{name}.to_q", inner, query) | linear(f"{name}.to_k", inner, context)
    shapes |= linear(f"{name}.to_v", inner, context) | linear(f"{name}.to_out.0", query, inner)
    return shapes | {f"{name}.q_norm.weight": (inner,), f"{name}.k_norm.weight": (inner,)}


def feed_forward(name: str, dim: int) -> dict[str, Shape]:
    return linear(f"{name}.net.0.proj", FFN_MULT * dim, dim) | linear(f"{name}.net.2", dim, FFN_MULT * dim)


def adaln_single(name: str, dim: int, rows: int) -> dict[str, Shape]:
    shapes = linear(f"{name}.emb.timestep_embedder.linear_1", dim, FREQ_DIM)
    return shapes | linear(f"{name}.emb.timestep_embedder.linear_2", dim, dim) | linear(f"{name}.linear", rows * dim, dim)


class LTX2(Architecture):
    name = "ltx2"
    label = "LTX-2"
    diffusers_class = ""  # diffusers' LTX2 layout is not read (yet)
    signature = ("audio_adaln_single.linear.weight", "transformer_blocks.0.audio_to_video_attn.to_q.weight")
    variants = {
        "19B (dev, distilled)": {
            "dim": 4096, "audio_dim": 2048, "in_channels": 128, "audio_in_channels": 128, "caption_channels": 3840,
            "connector_layers": 2, "registers": 128, "layers": 48,
        },
    }  # fmt: skip
    depth_keys = ("layers",)
    tiny = {"tiny": TINY}
    high_precision = (
        "patchify_proj.*", "audio_patchify_proj.*", *(f"{name}.*" for name, _, _ in ADALN_SINGLES),
        "caption_projection.*", "audio_caption_projection.*", *(f"{c}.*" for c in CONNECTORS),
        "proj_out.*", "audio_proj_out.*",
    )  # fmt: skip
    down_projections = ("transformer_blocks.*.ff.net.2.weight", "transformer_blocks.*.audio_ff.net.2.weight")
    first_blocks = ("transformer_blocks.0.*",)
    rules = ()

    def config_from_shapes(self, shapes: Mapping[str, Shape]) -> dict[str, int | bool]:
        return {
            "dim": shapes["patchify_proj.weight"][0],
            "audio_dim": shapes["audio_patchify_proj.weight"][0],
            "in_channels": shapes["patchify_proj.weight"][1],
            "audio_in_channels": shapes["audio_patchify_proj.weight"][1],
            "caption_channels": shapes["caption_projection.linear_1.weight"][1],
            "connector_layers": block_count(shapes, f"{CONNECTORS[0]}.transformer_1d_blocks"),
            "registers": shapes[f"{CONNECTORS[0]}.learnable_registers"][0],
            "layers": block_count(shapes, "transformer_blocks"),
        }

    def tensor_shapes(self, c: Config) -> dict[str, Shape]:
        d, a, caption = int(c["dim"]), int(c["audio_dim"]), int(c["caption_channels"])
        width = {"dim": d, "audio_dim": a}
        shapes = linear("patchify_proj", d, int(c["in_channels"])) | adaln_single("adaln_single", d, ADALN_PARAMS)
        shapes |= linear("caption_projection.linear_1", d, caption) | linear("caption_projection.linear_2", d, d)
        shapes |= linear("audio_patchify_proj", a, int(c["audio_in_channels"]))
        for name, key, rows in ADALN_SINGLES[1:]:
            shapes |= adaln_single(name, width[key], rows)
        shapes |= linear("audio_caption_projection.linear_1", a, caption)
        shapes |= linear("audio_caption_projection.linear_2", a, a)
        for connector in CONNECTORS:  # they work at the caption width (Gemma 3's 3840)
            for i in range(int(c["connector_layers"])):
                b = f"{connector}.transformer_1d_blocks.{i}"
                shapes |= attention(f"{b}.attn1", caption, caption, caption) | feed_forward(f"{b}.ff", caption)
            shapes[f"{connector}.learnable_registers"] = (int(c["registers"]), caption)
        for i in range(int(c["layers"])):
            b = f"transformer_blocks.{i}"
            shapes |= attention(f"{b}.attn1", d, d, d) | attention(f"{b}.audio_attn1", a, a, a)
            shapes |= attention(f"{b}.attn2", d, d, d) | attention(f"{b}.audio_attn2", a, a, a)
            # the cross-modal attentions run at the audio width, with the audio heads
            shapes |= attention(f"{b}.audio_to_video_attn", d, a, a) | attention(f"{b}.video_to_audio_attn", a, a, d)
            shapes |= feed_forward(f"{b}.ff", d) | feed_forward(f"{b}.audio_ff", a)
            shapes |= {f"{b}.scale_shift_table": (ADALN_PARAMS, d), f"{b}.audio_scale_shift_table": (ADALN_PARAMS, a)}
            shapes |= {f"{b}.scale_shift_table_a2v_ca_audio": (5, a), f"{b}.scale_shift_table_a2v_ca_video": (5, d)}
        shapes |= {"scale_shift_table": (2, d)} | linear("proj_out", int(c["in_channels"]), d)
        shapes |= {"audio_scale_shift_table": (2, a)} | linear("audio_proj_out", int(c["audio_in_channels"]), a)
        return shapes


LTX_2 = register(LTX2())

"""The runnable Qwen-Image transformer (:class:`QwenImageModel`): plain PyTorch, imported only when a
model is built (:meth:`engine.models.qwen_image.QwenImage.build_module`), so that detection needs no
torch.

Attribute names are diffusers' (which Qwen-Image's single files use too). Queries, keys and values are
three layers per stream, not one fused q|k|v projection, so attention's inputs are computed here
(RMS QK-norm, then RoPE as :mod:`engine.heads` rotates) rather than declared through
:func:`engine.fusion.attention_heads`; each projection's input is still declared (its LayerNorm and
modulation, :class:`engine.fusion.NormedInput`), as is each MLP's GELU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.fusion import NormedInput, in_projection, project, shared_input
from engine.heads import Rope, apply_rope
from engine.models.layers import (
    Inputs,
    attend,
    modulate,
    modulated,
    position_ids,
    rope,
    timestep_embedding,
)
from engine.models.spec import Config

EPS = 1e-6


class Attention(nn.Module):
    """Joint attention of the image tokens (``to_*``) and the text tokens (``add_*``), each stream with
    its own projections and QK-norms."""

    def __init__(self, hidden: int, head_dim: int) -> None:
        super().__init__()
        for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
            self.add_module(name, nn.Linear(hidden, hidden))
        for name in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            self.add_module(name, nn.RMSNorm(head_dim, eps=EPS))
        self.to_out = nn.ModuleList([nn.Linear(hidden, hidden)])
        self.to_add_out = nn.Linear(hidden, hidden)

    def forward(
        self, img: NormedInput, txt: NormedInput, img_pe: Rope, txt_pe: Rope
    ) -> tuple[torch.Tensor, torch.Tensor]:
        img_heads = _heads(img, (self.to_q, self.to_k, self.to_v), (self.norm_q, self.norm_k), img_pe)
        txt_heads = _heads(
            txt, (self.add_q_proj, self.add_k_proj, self.add_v_proj), (self.norm_added_q, self.norm_added_k), txt_pe
        )
        out = attend(self, *(torch.cat(pair, dim=2) for pair in zip(txt_heads, img_heads)))  # text first
        txt_out, img_out = out.split([txt_pe.shape[0], img_pe.shape[0]], dim=1)
        return self.to_out[0](img_out), self.to_add_out(txt_out)


def _heads(
    x: NormedInput, linears: tuple[nn.Module, ...], norms: tuple[nn.RMSNorm, nn.RMSNorm], pe: Rope
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v [batch, heads, tokens, head] of one stream: queries and keys RMS-normalized and rotated."""
    x = shared_input(x, *linears)
    head = norms[0].weight.shape[0]
    q, k, v = (project(linear, x).unflatten(-1, (-1, head)).transpose(1, 2) for linear in linears)
    q, k = (apply_rope(norm(t), pe) for norm, t in zip(norms, (q, k)))
    return q, k, v


class GELUProjection(nn.Module):
    """The MLP's in-projection (``net.0.proj``), followed by GELU (tanh approximation)."""

    def __init__(self, hidden: int, mlp_hidden: int) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden, mlp_hidden)


class FeedForward(nn.Module):
    """``net.2(gelu(net.0.proj(x)))``; ``net.1`` is diffusers' dropout, without weights."""

    def __init__(self, hidden: int, mlp_hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(GELUProjection(hidden, mlp_hidden), nn.Identity(), nn.Linear(mlp_hidden, hidden))

    def forward(self, x: NormedInput) -> torch.Tensor:
        return project(self.net[2], in_projection(self.net[0].proj, "gelu_tanh", x)[1])


class Block(nn.Module):
    """Double-stream (MMDiT) block: image and text tokens keep their own weights and attend jointly.

    Each stream's modulation (``*_mod``: SiLU, then a linear of the time embedding) gives (shift,
    scale, gate) for attention and again for the MLP; the norms are LayerNorms without weights."""

    def __init__(self, hidden: int, head_dim: int, mlp_hidden: int) -> None:
        super().__init__()
        self.img_mod = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))
        self.attn = Attention(hidden, head_dim)
        self.img_mlp = FeedForward(hidden, mlp_hidden)
        self.txt_mod = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))
        self.txt_mlp = FeedForward(hidden, mlp_hidden)

    def forward(
        self, img: torch.Tensor, txt: torch.Tensor, temb: torch.Tensor, img_pe: Rope, txt_pe: Rope
    ) -> tuple[torch.Tensor, torch.Tensor]:
        img_mod = self.img_mod(temb)[:, None].chunk(6, dim=-1)
        txt_mod = self.txt_mod(temb)[:, None].chunk(6, dim=-1)
        img_out, txt_out = self.attn(modulated(img, *img_mod[:2]), modulated(txt, *txt_mod[:2]), img_pe, txt_pe)
        img = torch.addcmul(img, img_mod[2], img_out)
        txt = torch.addcmul(txt, txt_mod[2], txt_out)
        img = torch.addcmul(img, img_mod[5], self.img_mlp(modulated(img, *img_mod[3:5])))
        txt = torch.addcmul(txt, txt_mod[5], self.txt_mlp(modulated(txt, *txt_mod[3:5])))
        return img, txt


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(256, hidden)
        self.linear_2 = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class FinalNorm(nn.Module):
    """``norm_out``: LayerNorm modulated by ``linear(silu(temb))``, whose rows are (scale, shift)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden, 2 * hidden)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(F.silu(temb))[:, None].chunk(2, dim=-1)
        return modulate(x, shift, scale)


class QwenImageModel(nn.Module):
    """The Qwen-Image transformer on VAE latents: ``x`` [batch, channels, height, width] → same shape
    (height and width even: 2×2 patches, packed channel-major as the diffusers pipeline packs them).

    Text tokens come first in the joint sequence. RoPE has three axes (frame, row, column) of
    head_dim / 8, 7/16 and 7/16 channels; an image patch sits at (0, row, column) with rows and
    columns centred on 0 (``-(n - n // 2) … n // 2 - 1``, as diffusers; ComfyUI centres odd sizes one
    position higher), text token i at (s + i, s + i, s + i) with s = max(rows, columns) // 2.
    ``t`` is the flow time in [0, 1] (1 = noise), scaled by 1000 inside.
    """

    text_tokens = 256  # Qwen-Image runs prompts at their own length; 256 is a long one
    theta = 10000.0
    patch = 2

    def __init__(self, config: Config) -> None:
        super().__init__()
        c = self.config = dict(config)
        h, hd, text = int(c["hidden"]), int(c["head_dim"]), int(c["text_dim"])
        self.axes_dims = (hd // 8, hd * 7 // 16, hd * 7 // 16)
        self.img_in = nn.Linear(int(c["in_channels"]), h)
        self.txt_norm = nn.RMSNorm(text, eps=EPS)
        self.txt_in = nn.Linear(text, h)
        self.time_text_embed = nn.Module()
        self.time_text_embed.timestep_embedder = TimestepEmbedder(h)
        self.transformer_blocks = nn.ModuleList(
            Block(h, hd, int(c["mlp_hidden"])) for _ in range(int(c["layers"]))
        )
        self.norm_out = FinalNorm(h)
        self.proj_out = nn.Linear(h, int(c["out_channels"]))

    def forward(self, x: torch.Tensor, t: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        p, rows, cols = self.patch, height // self.patch, width // self.patch
        patches = x.view(batch, channels, rows, p, cols, p).permute(0, 2, 4, 1, 3, 5).reshape(batch, rows * cols, -1)
        img_pe, txt_pe = self.rotations(rows, cols, txt.shape[1], x.device)
        temb = self.time_text_embed.timestep_embedder(timestep_embedding(1000 * t).to(x.dtype))
        img, txt = self.img_in(patches), self.txt_in(self.txt_norm(txt))
        for block in self.transformer_blocks:
            img, txt = block(img, txt, temb, img_pe, txt_pe)
        out = self.proj_out(self.norm_out(img, temb))
        return out.view(batch, rows, cols, channels, p, p).permute(0, 3, 1, 4, 2, 5).reshape(x.shape)

    def rotations(self, rows: int, cols: int, text: int, device: torch.device) -> tuple[Rope, Rope]:
        """RoPE of the image's rows × cols patches and of ``text`` text tokens."""
        img_ids = position_ids(1, _centred(rows), _centred(cols), device=device)
        start = max(rows, cols) // 2
        txt_ids = torch.arange(start, start + text, device=device)[:, None].expand(-1, 3)
        return rope(img_ids, self.axes_dims, self.theta), rope(txt_ids, self.axes_dims, self.theta)

    def random_inputs(self, batch: int, resolution: int, text: int | None = None, seed: int = 0) -> Inputs:
        """One step's inputs at ``resolution``² pixels (VAE 8× down; 2×2 patches inside) and ``text``
        prompt tokens (default: typical), float32 on the CPU."""
        tokens, generator = text or self.text_tokens, torch.Generator().manual_seed(seed)
        side, c = resolution // 8, self.config
        return {
            "x": torch.randn(batch, int(c["in_channels"]) // self.patch**2, side, side, generator=generator),
            "t": torch.full((batch,), 0.6),
            "txt": torch.randn(batch, tokens, int(c["text_dim"]), generator=generator),
        }


def _centred(n: int) -> range:
    """Positions of ``n`` rows (or columns) of patches centred on 0, as diffusers places them."""
    return range(-(n - n // 2), n // 2)

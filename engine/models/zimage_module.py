"""The runnable Z-Image transformer (:class:`ZImageModel`): plain PyTorch, imported only when a model
is built (:meth:`engine.models.zimage.ZImage.build_module`), so that detection needs no torch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.fusion import NormedInput, attention_heads, project, swiglu
from engine.heads import QKNormRope, Rope
from engine.models.layers import Inputs, attend, layer_norm, position_ids, rope, timestep_embedding
from engine.models.spec import Config

SEQ_MULTIPLE = 32  # image and caption sequences are padded to a multiple of this with pad tokens
NORM_EPS = 1e-5


class Attention(nn.Module):
    def __init__(self, dim: int, head_dim: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.q_norm = nn.RMSNorm(head_dim, eps=NORM_EPS)
        self.k_norm = nn.RMSNorm(head_dim, eps=NORM_EPS)

    def forward(self, x: torch.Tensor | NormedInput, pe: Rope) -> torch.Tensor:
        norm = QKNormRope(self.q_norm.weight, self.k_norm.weight, NORM_EPS, pe)
        return self.out(attend(self, *attention_heads(self.qkv, x, norm)))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor | NormedInput) -> torch.Tensor:
        return project(self.w2, swiglu(self.w1, self.w3, x))


def _scaled(norm: nn.RMSNorm, x: torch.Tensor, scale: torch.Tensor) -> NormedInput:
    """``norm(x) · (1 + scale)``, not computed yet (:class:`engine.fusion.NormedInput`)."""
    return NormedInput(x, "rms", norm.eps, norm.weight, scale)


class Block(nn.Module):
    """Pre- and post-normed attention and SwiGLU; modulated blocks scale the pre-norm outputs and
    tanh-gate the residual branches with vectors from ``adaLN_modulation``."""

    def __init__(self, c: Config, modulated: bool) -> None:
        super().__init__()
        dim = int(c["dim"])
        self.attention = Attention(dim, int(c["head_dim"]))
        self.feed_forward = FeedForward(dim, int(c["ffn_hidden"]))
        for norm in ("attention_norm1", "ffn_norm1", "attention_norm2", "ffn_norm2"):
            self.add_module(norm, nn.RMSNorm(dim, eps=NORM_EPS))
        self.adaLN_modulation = nn.Sequential(nn.Linear(int(c["adaln_dim"]), 4 * dim)) if modulated else None

    def forward(self, x: torch.Tensor, pe: Rope, adaln: torch.Tensor | None = None) -> torch.Tensor:
        if self.adaLN_modulation is None:
            x = x + self.attention_norm2(self.attention(self.attention_norm1(x), pe))
            return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
        scale_attn, gate_attn, scale_ffn, gate_ffn = self.adaLN_modulation(adaln)[:, None].chunk(4, dim=-1)
        attn = self.attention(_scaled(self.attention_norm1, x, scale_attn), pe)
        x = torch.addcmul(x, gate_attn.tanh(), self.attention_norm2(attn))
        ffn = self.feed_forward(_scaled(self.ffn_norm1, x, scale_ffn))
        return torch.addcmul(x, gate_ffn.tanh(), self.ffn_norm2(ffn))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out: int, adaln_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(adaln_dim, dim))

    def forward(self, x: torch.Tensor, adaln: torch.Tensor) -> torch.Tensor:
        return self.linear(layer_norm(x) * (1 + self.adaLN_modulation(adaln)[:, None]))


class ZImageModel(nn.Module):
    """The Z-Image transformer on VAE latents: ``x`` [batch, channels, height, width] → same shape.

    Image patches (2×2) and caption tokens are each padded to a multiple of 32 with learned pad
    tokens and refined separately (image tokens with modulation, caption tokens without), then run
    through the main layers as one sequence, image first. Positions are (1 + i, 0, 0) for caption
    token i, (caption length + 1, h, w) for image patches and (0, 0, 0) for image padding.
    ``t`` is Z-Image's time in [0, 1] (1 = clean image), scaled by 1000 inside.
    """

    text_tokens = 256  # Z-Image runs prompts at their own length (no padding); 256 is a long one
    theta = 256.0
    patch = 2

    def __init__(self, config: Config) -> None:
        super().__init__()
        c = self.config = dict(config)
        dim, hd, adaln = int(c["dim"]), int(c["head_dim"]), int(c["adaln_dim"])
        self.axes_dims = (hd // 4, hd * 3 // 8, hd * 3 // 8)
        self.x_embedder = nn.Linear(int(c["patch_in"]), dim)
        self.x_pad_token = nn.Parameter(torch.zeros(1, dim))
        self.cap_pad_token = nn.Parameter(torch.zeros(1, dim))
        self.t_embedder = nn.Module()
        self.t_embedder.mlp = nn.Sequential(
            nn.Linear(256, int(c["t_mid"])), nn.SiLU(), nn.Linear(int(c["t_mid"]), adaln)
        )
        self.cap_embedder = nn.Sequential(
            nn.RMSNorm(int(c["cap_dim"]), eps=NORM_EPS), nn.Linear(int(c["cap_dim"]), dim)
        )
        refiners = range(int(c["refiner_layers"]))
        self.noise_refiner = nn.ModuleList(Block(c, modulated=True) for _ in refiners)
        self.context_refiner = nn.ModuleList(Block(c, modulated=False) for _ in refiners)
        self.layers = nn.ModuleList(Block(c, modulated=True) for _ in range(int(c["layers"])))
        self.norm_final = nn.RMSNorm(dim, eps=NORM_EPS)  # in the checkpoints, unused by the model
        self.final_layer = FinalLayer(dim, int(c["patch_in"]), adaln)
        self._rotations: dict[tuple, tuple[Rope, Rope, Rope]] = {}

    def forward(self, x: torch.Tensor, t: torch.Tensor, cap: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        p, rows, cols = self.patch, height // self.patch, width // self.patch
        adaln = self.t_embedder.mlp(timestep_embedding(1000 * t).to(x.dtype))

        cap_len = cap.shape[1] + _padding(cap.shape[1])
        cap_pe, img_pe, pe = self.rotations(cap_len, rows, cols, x.device)
        cap = _pad(self.cap_embedder(cap), self.cap_pad_token, cap_len)
        for block in self.context_refiner:
            cap = block(cap, cap_pe)

        patches = x.view(batch, channels, rows, p, cols, p).permute(0, 2, 4, 3, 5, 1).flatten(3).flatten(1, 2)
        tokens = rows * cols
        img = _pad(self.x_embedder(patches), self.x_pad_token, img_pe.shape[0])
        for block in self.noise_refiner:
            img = block(img, img_pe, adaln)

        h = torch.cat([img, cap], dim=1)
        for block in self.layers:
            h = block(h, pe, adaln)
        out = self.final_layer(h[:, :tokens], adaln)
        return out.view(batch, rows, cols, p, p, channels).permute(0, 5, 1, 3, 2, 4).reshape(x.shape)

    def rotations(self, cap_len: int, rows: int, cols: int, device: torch.device) -> tuple[Rope, Rope, Rope]:
        """RoPE of the caption tokens (``cap_len``, padded), of the image's rows × cols patches (padded)
        and of both, image first. They depend on the shapes alone, so they are built once per shape and
        kept (the latest few): built per step, their ~50 small operations kept the GPU waiting for the
        host before the first block."""
        key = (cap_len, rows, cols, torch.device(device))
        if key not in self._rotations:
            with torch.inference_mode(False), torch.no_grad():  # usable outside inference mode too
                cap_pe = rope(position_ids(range(1, cap_len + 1), 1, 1, device=device), self.axes_dims, self.theta)
                img_ids = position_ids(range(cap_len + 1, cap_len + 2), rows, cols, device=device)
                img_ids = F.pad(img_ids, (0, 0, 0, _padding(rows * cols)))  # padding sits at (0, 0, 0)
                img_pe = rope(img_ids, self.axes_dims, self.theta)
                self._rotations[key] = cap_pe, img_pe, torch.cat([img_pe, cap_pe])
            while len(self._rotations) > ROTATIONS_KEPT:
                del self._rotations[next(iter(self._rotations))]
        return self._rotations[key]

    def random_inputs(self, batch: int, resolution: int, text: int | None = None, seed: int = 0) -> Inputs:
        """One step's inputs at ``resolution``² pixels (VAE 8× down; 2×2 patches inside) and ``text``
        prompt tokens (default: typical), float32 on the CPU."""
        tokens, generator = text or self.text_tokens, torch.Generator().manual_seed(seed)
        side, c = resolution // 8, self.config
        channels = int(c["patch_in"]) // self.patch**2
        return {
            "x": torch.randn(batch, channels, side, side, generator=generator),
            "t": torch.full((batch,), 0.4),
            "cap": torch.randn(batch, tokens, int(c["cap_dim"]), generator=generator),
        }


ROTATIONS_KEPT = 4
"""Shapes whose RoPE tables a model keeps (:meth:`ZImageModel.rotations`)."""


def _padding(tokens: int) -> int:
    return -tokens % SEQ_MULTIPLE


def _pad(x: torch.Tensor, pad_token: torch.Tensor, length: int) -> torch.Tensor:
    """``x`` [batch, tokens, dim] followed by copies of ``pad_token`` up to ``length`` tokens."""
    pad = pad_token.to(x.dtype).expand(x.shape[0], length - x.shape[1], -1)
    return torch.cat([x, pad], dim=1)

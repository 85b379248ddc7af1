"""The runnable Flux.1 transformer (:class:`Flux1Model`): plain PyTorch, imported only when a model
is built (:meth:`engine.models.flux1.Flux1.build_module`), so that detection needs no torch.

Chroma's blocks (biases, GELU-tanh MLPs) with Flux.2's kind of modulation (``lin(silu(vec))``), but
one modulation linear per block and stream: the blocks below are the shared ones plus those linears.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.heads import Rope
from engine.models.layers import (
    DoubleBlock,
    GELUTanh,
    Inputs,
    LastLayer,
    MLPEmbedder,
    ModulationVectors,
    SingleBlock,
    position_ids,
    rope,
    timestep_embedding,
)
from engine.models.spec import Config


class ModulatedDoubleBlock(DoubleBlock):
    """A double block with its own modulation linears (``img_mod.lin``, ``txt_mod.lin``)."""

    def __init__(self, hidden: int, head_dim: int, mlp_hidden: int) -> None:
        super().__init__(hidden, head_dim, mlp_hidden, mlp_hidden, GELUTanh(), bias=True)
        self.img_mod = ModulationVectors(hidden, 6, bias=True)
        self.txt_mod = ModulationVectors(hidden, 6, bias=True)

    def forward(
        self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor, pe: Rope
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return super().forward(img, txt, self.img_mod(vec), self.txt_mod(vec), pe)


class ModulatedSingleBlock(SingleBlock):
    """A single block with its own modulation linear (``modulation.lin``)."""

    def __init__(self, hidden: int, head_dim: int, mlp_hidden: int) -> None:
        super().__init__(hidden, head_dim, mlp_hidden, mlp_hidden, GELUTanh(), bias=True)
        self.modulation = ModulationVectors(hidden, 3, bias=True)

    def forward(self, x: torch.Tensor, vec: torch.Tensor, pe: Rope) -> torch.Tensor:
        return super().forward(x, self.modulation(vec), pe)


class Flux1Model(nn.Module):
    """The Flux.1 transformer on packed latents: ``img`` [batch, tokens, in_channels] → [batch, tokens,
    out_channels].

    ``vec`` = time embedding + guidance embedding (dev) + ``vector_in(y)``, ``y`` being CLIP's pooled
    prompt [batch, vec_dim]. Positions are (0, h, w) for image tokens, zeros for text tokens; RoPE gives
    the axes 1/8, 7/16, 7/16 of head_dim. ``timestep`` and ``guidance`` are scaled by 1000 inside, as BFL
    does.
    """

    text_tokens = 512  # the dev pipeline pads T5 prompts to 512 tokens
    theta = 10000.0

    def __init__(self, config: Config) -> None:
        super().__init__()
        h, hd, m = int(config["hidden"]), int(config["head_dim"]), int(config["mlp_hidden"])
        self.config = dict(config)
        self.axes_dims = (hd // 8, hd * 7 // 16, hd * 7 // 16)
        self.img_in = nn.Linear(int(config["in_channels"]), h)
        self.time_in = MLPEmbedder(256, h, bias=True)
        self.vector_in = MLPEmbedder(int(config["vec_dim"]), h, bias=True)
        self.guidance_in = MLPEmbedder(256, h, bias=True) if config["guidance"] else None
        self.txt_in = nn.Linear(int(config["text_dim"]), h)
        double, single = int(config["double_blocks"]), int(config["single_blocks"])
        self.double_blocks = nn.ModuleList(ModulatedDoubleBlock(h, hd, m) for _ in range(double))
        self.single_blocks = nn.ModuleList(ModulatedSingleBlock(h, hd, m) for _ in range(single))
        self.final_layer = LastLayer(h, int(config["out_channels"]), bias=True)

    def forward(
        self,
        img: torch.Tensor,
        txt: torch.Tensor,
        timestep: torch.Tensor,
        img_ids: torch.Tensor,
        txt_ids: torch.Tensor,
        y: torch.Tensor,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        vec = self.time_in(timestep_embedding(1000 * timestep).to(img.dtype))
        if self.guidance_in is not None:
            vec = vec + self.guidance_in(timestep_embedding(1000 * guidance).to(img.dtype))
        vec = vec + self.vector_in(y)
        img, txt = self.img_in(img), self.txt_in(txt)
        pe = rope(torch.cat([txt_ids, img_ids]), self.axes_dims, self.theta)
        for block in self.double_blocks:
            img, txt = block(img, txt, vec, pe)
        x = torch.cat([txt, img], dim=1)
        for block in self.single_blocks:
            x = block(x, vec, pe)
        return self.final_layer(x[:, txt.shape[1] :], vec)

    def random_inputs(self, batch: int, resolution: int, text: int | None = None, seed: int = 0) -> Inputs:
        """One step's inputs at ``resolution``² pixels (16× down: VAE 8×, then 2×2 packing) and ``text``
        prompt tokens (default: typical), float32 on the CPU; guidance 3.5 for dev."""
        tokens, generator = text or self.text_tokens, torch.Generator().manual_seed(seed)
        side = resolution // 16
        c = self.config
        inputs = {
            "img": torch.randn(batch, side * side, int(c["in_channels"]), generator=generator),
            "txt": torch.randn(batch, tokens, int(c["text_dim"]), generator=generator),
            "y": torch.randn(batch, int(c["vec_dim"]), generator=generator),
            "timestep": torch.full((batch,), 0.6),
            "img_ids": position_ids(1, side, side),
            "txt_ids": torch.zeros(tokens, 3, dtype=torch.long),
        }
        if c["guidance"]:
            inputs["guidance"] = torch.full((batch,), 3.5)
        return inputs

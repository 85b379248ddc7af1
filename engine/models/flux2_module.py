"""The runnable Flux.2 transformer (:class:`Flux2Model`): plain PyTorch, imported only when a model
is built (:meth:`engine.models.flux2.Flux2.build_module`), so that detection needs no torch."""

from __future__ import annotations

import torch
from torch import nn

from engine.models.flux2 import MODULATIONS
from engine.models.layers import (
    DoubleBlock,
    Inputs,
    LastLayer,
    MLPEmbedder,
    ModulationVectors,
    SingleBlock,
    SwiGLU,
    position_ids,
    rope,
    timestep_embedding,
)
from engine.models.spec import Config


class Flux2Model(nn.Module):
    """The Flux.2 transformer on packed latents: ``img`` [batch, tokens, in_channels] → same shape.

    Image and text tokens carry 4-axis positions (t, h, w, l); RoPE gives each axis head_dim / 4
    channels. ``timestep`` is the flow time in [0, 1] (scaled by 1000 inside, as BFL does).
    """

    text_tokens = 512  # the Klein pipelines pad prompts to 512 tokens
    theta = 2000.0

    def __init__(self, config: Config) -> None:
        super().__init__()
        h, hd, m = int(config["hidden"]), int(config["head_dim"]), int(config["mlp_hidden"])
        self.config = dict(config)
        self.axes_dims = (hd // 4,) * 4
        self.img_in = nn.Linear(int(config["in_channels"]), h, bias=False)
        self.txt_in = nn.Linear(int(config["text_dim"]), h, bias=False)
        self.time_in = MLPEmbedder(256, h, bias=False)
        self.guidance_in = MLPEmbedder(256, h, bias=False) if config["guidance"] else None
        for name, n in MODULATIONS.items():
            self.add_module(name, ModulationVectors(h, n, bias=False))
        self.double_blocks = nn.ModuleList(
            DoubleBlock(h, hd, 2 * m, m, SwiGLU(), bias=False) for _ in range(int(config["double_blocks"]))
        )
        self.single_blocks = nn.ModuleList(
            SingleBlock(h, hd, 2 * m, m, SwiGLU(), bias=False) for _ in range(int(config["single_blocks"]))
        )
        self.final_layer = LastLayer(h, int(config["out_channels"]), bias=False)

    def forward(
        self,
        img: torch.Tensor,
        txt: torch.Tensor,
        timestep: torch.Tensor,
        img_ids: torch.Tensor,
        txt_ids: torch.Tensor,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        vec = self.time_in(timestep_embedding(1000 * timestep).to(img.dtype))
        if self.guidance_in is not None:
            vec = vec + self.guidance_in(timestep_embedding(1000 * guidance).to(img.dtype))
        img_mod = self.double_stream_modulation_img(vec)
        txt_mod = self.double_stream_modulation_txt(vec)
        single_mod = self.single_stream_modulation(vec)
        img, txt = self.img_in(img), self.txt_in(txt)
        pe = rope(torch.cat([txt_ids, img_ids]), self.axes_dims, self.theta)
        for block in self.double_blocks:
            img, txt = block(img, txt, img_mod, txt_mod, pe)
        x = torch.cat([txt, img], dim=1)
        for block in self.single_blocks:
            x = block(x, single_mod, pe)
        return self.final_layer(x[:, txt.shape[1] :], vec)

    def random_inputs(self, batch: int, resolution: int, text: int | None = None, seed: int = 0) -> Inputs:
        """One step's inputs at ``resolution``² pixels (16× down: VAE 8×, then 2×2 packing) and ``text``
        prompt tokens (default: typical), float32 on the CPU."""
        tokens, generator = text or self.text_tokens, torch.Generator().manual_seed(seed)
        side = resolution // 16
        c = self.config
        inputs = {
            "img": torch.randn(batch, side * side, int(c["in_channels"]), generator=generator),
            "txt": torch.randn(batch, tokens, int(c["text_dim"]), generator=generator),
            "timestep": torch.full((batch,), 0.6),
            "img_ids": position_ids(1, side, side, 1),
            "txt_ids": position_ids(1, 1, 1, tokens),
        }
        if c["guidance"]:
            inputs["guidance"] = torch.full((batch,), 4.0)
        return inputs

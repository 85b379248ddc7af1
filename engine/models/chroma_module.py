"""The runnable Chroma transformer (:class:`ChromaModel`): plain PyTorch, imported only when a model
is built (:meth:`engine.models.chroma.Chroma.build_module`), so that detection needs no torch."""

from __future__ import annotations

import torch
from torch import nn

from engine.models.layers import (
    DoubleBlock,
    GELUTanh,
    Inputs,
    MLPEmbedder,
    RMSNorm,
    SingleBlock,
    modulate,
    position_ids,
    rope,
    timestep_embedding,
)
from engine.models.spec import Config


class Approximator(nn.Module):
    """Chroma's ``distilled_guidance_layer``: one MLP maps (timestep, guidance, vector index)
    embeddings to every modulation vector of the model at once."""

    def __init__(self, dim_in: int, hidden: int, out: int, layers: int) -> None:
        super().__init__()
        self.in_proj = nn.Linear(dim_in, hidden)
        self.layers = nn.ModuleList(MLPEmbedder(hidden, hidden, bias=True) for _ in range(layers))
        # eps 1e-6 as BFL and ComfyUI; diffusers uses the dtype's eps (a difference of ~1e-6 relative)
        self.norms = nn.ModuleList(RMSNorm(hidden) for _ in range(layers))
        self.out_proj = nn.Linear(hidden, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.in_proj(x)
        for layer, norm in zip(self.layers, self.norms, strict=True):
            x = x + layer(norm(x))
        return self.out_proj(x)


class LastLayer(nn.Module):
    def __init__(self, hidden: int, out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden, out)

    def forward(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.linear(modulate(x, shift, scale))


class ChromaModel(nn.Module):
    """The Chroma transformer on packed latents: ``img`` [batch, tokens, in_channels] → same shape.

    Modulation vectors, in the approximator's output order: (shift, scale, gate) per single block,
    six per double block for the image stream, six per double block for the text stream, then the
    final layer's (shift, scale). Positions are (0, h, w) for image tokens, zeros for text tokens.
    """

    text_tokens = 512  # T5 prompts padded to 512 tokens
    theta = 10000.0

    def __init__(self, config: Config) -> None:
        super().__init__()
        h, hd, m = int(config["hidden"]), int(config["head_dim"]), int(config["mlp_hidden"])
        self.config = dict(config)
        self.axes_dims = (hd // 8, hd * 7 // 16, hd * 7 // 16)
        double, single = int(config["double_blocks"]), int(config["single_blocks"])
        self.vectors = 3 * single + 12 * double + 2
        self.distilled_guidance_layer = Approximator(
            int(config["approximator_in"]),
            int(config["approximator_hidden"]),
            h,
            int(config["approximator_layers"]),
        )
        self.img_in = nn.Linear(int(config["in_channels"]), h)
        self.txt_in = nn.Linear(int(config["text_dim"]), h)
        self.double_blocks = nn.ModuleList(
            DoubleBlock(h, hd, m, m, GELUTanh(), bias=True) for _ in range(double)
        )
        self.single_blocks = nn.ModuleList(
            SingleBlock(h, hd, m, m, GELUTanh(), bias=True) for _ in range(single)
        )
        self.final_layer = LastLayer(h, int(config["out_channels"]))

    def approximator_input(self, timestep: torch.Tensor) -> torch.Tensor:
        """[batch, vectors, approximator_in]: embeddings of the timestep, of guidance 0 (Chroma is not
        guidance-distilled) and of each vector's index."""
        quarter = int(self.config["approximator_in"]) // 4
        time = timestep_embedding(1000 * timestep, quarter)
        guidance = timestep_embedding(torch.zeros_like(timestep), quarter)
        index = timestep_embedding(1000 * torch.arange(self.vectors, device=timestep.device), 2 * quarter)
        batch = timestep.shape[0]
        conditioning = torch.cat([time, guidance], dim=-1)[:, None].expand(-1, self.vectors, -1)
        return torch.cat([conditioning, index.expand(batch, -1, -1)], dim=-1)

    def forward(
        self,
        img: torch.Tensor,
        txt: torch.Tensor,
        timestep: torch.Tensor,
        img_ids: torch.Tensor,
        txt_ids: torch.Tensor,
    ) -> torch.Tensor:
        vectors = self.distilled_guidance_layer(self.approximator_input(timestep).to(img.dtype)).split(
            1, dim=1
        )
        single_mod, double_mod = (
            vectors[: 3 * len(self.single_blocks)],
            vectors[3 * len(self.single_blocks) :],
        )
        txt_offset = 6 * len(self.double_blocks)
        img, txt = self.img_in(img), self.txt_in(txt)
        pe = rope(torch.cat([txt_ids, img_ids]), self.axes_dims, self.theta)
        for i, block in enumerate(self.double_blocks):
            img_mod, txt_mod = (
                double_mod[6 * i : 6 * i + 6],
                double_mod[txt_offset + 6 * i : txt_offset + 6 * i + 6],
            )
            img, txt = block(img, txt, img_mod, txt_mod, pe)
        x = torch.cat([txt, img], dim=1)
        for i, block in enumerate(self.single_blocks):
            x = block(x, single_mod[3 * i : 3 * i + 3], pe)
        shift, scale = vectors[-2:]
        return self.final_layer(x[:, txt.shape[1] :], shift, scale)

    def random_inputs(self, batch: int, resolution: int, text: int | None = None, seed: int = 0) -> Inputs:
        """One step's inputs at ``resolution``² pixels (16× down: VAE 8×, then 2×2 packing) and ``text``
        prompt tokens (default: typical), float32 on the CPU."""
        tokens, generator = text or self.text_tokens, torch.Generator().manual_seed(seed)
        side = resolution // 16
        c = self.config
        return {
            "img": torch.randn(batch, side * side, int(c["in_channels"]), generator=generator),
            "txt": torch.randn(batch, tokens, int(c["text_dim"]), generator=generator),
            "timestep": torch.full((batch,), 0.6),
            "img_ids": position_ids(1, side, side),
            "txt_ids": torch.zeros(tokens, 3, dtype=torch.long),
        }

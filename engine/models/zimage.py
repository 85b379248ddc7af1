"""Z-Image (Turbo and Base share one layout; 6B single-stream DiT, ComfyUI's "lumina2" family).

Blocks: ``noise_refiner`` (image tokens, modulated), ``context_refiner`` (caption tokens, not
modulated), then ``layers``. diffusers splits the fused ``qkv`` and keys the patch embedder and
final layer by patch size (``all_x_embedder.2-1``). The single-file ``norm_final`` is unused by
both implementations and has no diffusers counterpart.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from engine.fusion import NormedInput, attention_heads, project, swiglu
from engine.heads import QKNormRope, Rope
from engine.models.layers import Inputs, attend, layer_norm, position_ids, rope, timestep_embedding
from engine.models.spec import (
    Architecture,
    Config,
    Rule,
    Shape,
    block_count,
    linear,
    register,
)

BLOCKS = {"noise_refiner": True, "context_refiner": False, "layers": True}  # name → modulated
PATCH = "2-1"  # diffusers' key for patch size 2, frame patch size 1

TINY: Config = {
    "dim": 64, "head_dim": 16, "patch_in": 16, "cap_dim": 32, "ffn_hidden": 160, "t_mid": 32,
    "adaln_dim": 32, "layers": 3, "refiner_layers": 2,
}  # fmt: skip


def _block_rules(block: str) -> tuple[Rule, ...]:
    b = f"{block}.{{i}}"
    same = [f"{b}.feed_forward.w{n}.{{p}}" for n in (1, 2, 3)]
    same += [
        f"{b}.{norm}.weight" for norm in ("attention_norm1", "attention_norm2", "ffn_norm1", "ffn_norm2")
    ]
    if BLOCKS[block]:
        same.append(f"{b}.adaLN_modulation.0.{{p}}")
    return (
        Rule(
            f"{b}.attention.qkv.{{p}}",
            tuple(f"{b}.attention.to_{x}.{{p}}" for x in "qkv"),
            rows=lambda c: (int(c["dim"]),) * 3,
        ),
        Rule(f"{b}.attention.out.{{p}}", f"{b}.attention.to_out.0.{{p}}"),
        Rule(f"{b}.attention.q_norm.weight", f"{b}.attention.norm_q.weight"),
        Rule(f"{b}.attention.k_norm.weight", f"{b}.attention.norm_k.weight"),
        *(Rule(name, name) for name in same),
    )


class ZImage(Architecture):
    name = "zimage"
    label = "Z-Image"
    diffusers_class = "ZImageTransformer2DModel"
    signature = (
        "cap_embedder.1.weight",
        "x_pad_token",
        "layers.0.adaLN_modulation.0.weight",
        "x_embedder.weight",
    )
    variants = {
        "Turbo/Base": {
            "dim": 3840, "head_dim": 128, "patch_in": 64, "cap_dim": 2560, "ffn_hidden": 10240,
            "t_mid": 1024, "adaln_dim": 256, "layers": 30, "refiner_layers": 2,
        },
    }  # fmt: skip
    depth_keys = ("layers", "refiner_layers")
    tiny = {"tiny": TINY}
    high_precision = (
        "x_embedder.*", "t_embedder.*", "cap_embedder.*", "final_layer.*", "x_pad_token", "cap_pad_token",
        "*.adaLN_modulation.*", "noise_refiner.*", "context_refiner.*",
    )  # fmt: skip
    down_projections = ("layers.*.feed_forward.w2.weight",)
    first_blocks = ("layers.0.*",)  # the refiners stay in high precision anyway
    model_names = {"zimage-turbo": "Turbo/Base", "zimage-base": "Turbo/Base"}
    rules = (
        Rule("x_embedder.{p}", f"all_x_embedder.{PATCH}.{{p}}"),
        Rule("final_layer.{name}", f"all_final_layer.{PATCH}.{{name}}"),
        *(Rule(name, name) for name in ("x_pad_token", "cap_pad_token", "cap_embedder.0.weight")),
        *(
            Rule(f"{m}.{{p}}", f"{m}.{{p}}")
            for m in ("t_embedder.mlp.0", "t_embedder.mlp.2", "cap_embedder.1")
        ),
        *(rule for block in BLOCKS for rule in _block_rules(block)),
    )

    def build_module(self, config: Config) -> nn.Module:
        return ZImageModel(config)

    def config_from_shapes(self, shapes: Mapping[str, Shape]) -> dict[str, int | bool]:
        return {
            "dim": shapes["x_embedder.weight"][0],
            "head_dim": shapes["layers.0.attention.q_norm.weight"][0],
            "patch_in": shapes["x_embedder.weight"][1],
            "cap_dim": shapes["cap_embedder.1.weight"][1],
            "ffn_hidden": shapes["layers.0.feed_forward.w1.weight"][0],
            "t_mid": shapes["t_embedder.mlp.0.weight"][0],
            "adaln_dim": shapes["t_embedder.mlp.2.weight"][0],
            "layers": block_count(shapes, "layers"),
            "refiner_layers": block_count(shapes, "noise_refiner"),
        }

    def tensor_shapes(self, c: Config) -> dict[str, Shape]:
        d, hd, f, ad = int(c["dim"]), int(c["head_dim"]), int(c["ffn_hidden"]), int(c["adaln_dim"])
        shapes = linear("x_embedder", d, int(c["patch_in"]))
        shapes |= {"x_pad_token": (1, d), "cap_pad_token": (1, d)}
        shapes |= linear("t_embedder.mlp.0", int(c["t_mid"]), 256) | linear(
            "t_embedder.mlp.2", ad, int(c["t_mid"])
        )
        shapes |= {"cap_embedder.0.weight": (int(c["cap_dim"]),)} | linear(
            "cap_embedder.1", d, int(c["cap_dim"])
        )
        for block, modulated in BLOCKS.items():
            depth = int(c["layers"] if block == "layers" else c["refiner_layers"])
            for i in range(depth):
                b = f"{block}.{i}"
                shapes |= linear(f"{b}.attention.qkv", 3 * d, d, bias=False)
                shapes |= linear(f"{b}.attention.out", d, d, bias=False)
                shapes |= {f"{b}.attention.q_norm.weight": (hd,), f"{b}.attention.k_norm.weight": (hd,)}
                for n, (out, inp) in {1: (f, d), 2: (d, f), 3: (f, d)}.items():
                    shapes |= linear(f"{b}.feed_forward.w{n}", out, inp, bias=False)
                for norm in ("attention_norm1", "ffn_norm1", "attention_norm2", "ffn_norm2"):
                    shapes[f"{b}.{norm}.weight"] = (d,)
                if modulated:
                    shapes |= linear(f"{b}.adaLN_modulation.0", 4 * d, ad)
        shapes["norm_final.weight"] = (d,)
        shapes |= linear("final_layer.linear", int(c["patch_in"]), d)
        shapes |= linear("final_layer.adaLN_modulation.1", d, ad)
        return shapes


ZIMAGE = register(ZImage())


# --- the runnable module -----------------------------------------------------------------------

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
        return self.out(attend(*attention_heads(self.qkv, x, norm)))


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

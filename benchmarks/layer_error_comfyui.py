"""layer_error.py for the families that run only in ComfyUI: the int8 error of each Linear of ComfyUI's
own model at the real widths, and what the family's high-precision rule buys.

    PYTHONPATH=. python3 benchmarks/layer_error_comfyui.py wan2.2-14b --comfyui /tmp/cu/ComfyUI --blocks 2

Wan, LTX-2, Krea 2, ERNIE-Image, Chroma Radiance, HiDream-O1 and Anima have no module in our engine, so
layer_error.py cannot build them. Here the single file's tensors at the real widths with ``--blocks`` blocks
per stack (``--depth`` sets any other config key, e.g. LTX-2's ``connector_layers``) are drawn as
``benchmarks/comfyui.py`` draws them (``random_tensor``: std 1/√in), in float32, and loaded by ComfyUI's own
loader as that benchmark does (``tiny_detection``: ComfyUI reads off the tensors the sizes it hard-codes);
one ``apply_model`` on ``--tokens`` image or video tokens (video: ``--frames`` latent frames; LTX-2 also a
quarter as many audio tokens) and ``--text`` prompt tokens records each Linear's input, and the rest is
layer_error.py's measurement (``print_errors``): each Linear as an ``Int8Linear`` on its own input, then the
model's output with the family's rule, with its first blocks kept too, and with every Linear int8. LTX-2's
text connectors run in the measured call (ComfyUI runs them once per prompt, in ``extra_conds``).
``random_tensor`` draws a 1-D tensor as a norm scale (near 1) and a table with std 1; ``--offsets GLOB`` draws
the additive modulation offsets it matches small instead (std 0.02), to see how much of an output error
comes from that draw (Krea 2's ``blocks.*.mod.lin``, near 1 in every channel, shifts every token alike).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

import torch

from benchmarks.comfyui import SEED, float_tensors, import_comfyui  # puts tests/ on the path
from benchmarks.layer_error import arguments, print_errors
from benchmarks.model import depth_overrides
from comfyui_env import tiny_detection
from engine.models import REGISTRY

Inputs = Callable[[torch.Generator, int, int, int], tuple[torch.Tensor, dict]]
"""``(generator, patch rows and columns per frame, frames, text tokens)`` → a latent and its conditioning."""


def video(channels: int) -> Inputs:
    """Wan: ``channels`` latent channels, 1×2×2 patches, umT5's 4096-wide text."""
    return lambda g, side, frames, text: (
        torch.randn(1, channels, frames, 2 * side, 2 * side, generator=g),
        {"c_crossattn": torch.randn(1, text, 4096, generator=g)},
    )


def anima(g: torch.Generator, side: int, frames: int, text: int) -> tuple[torch.Tensor, dict]:
    """Anima: a one-frame Wan 2.1 latent (2×2 patches); Qwen3 0.6B's hidden states and the prompt's T5 ids,
    which its adapter turns into the context inside the call."""
    return torch.randn(1, 16, 1, 2 * side, 2 * side, generator=g), {
        "c_crossattn": torch.randn(1, text, 1024, generator=g),
        "t5xxl_ids": torch.randint(0, 32128, (1, text), generator=g),
    }


def hidream(g: torch.Generator, side: int, frames: int, text: int) -> tuple[torch.Tensor, dict]:
    """HiDream-O1: RGB pixels (32×32 patches) and the prompt's token ids, laid out by ComfyUI's own
    conditioning."""
    from comfy.ldm.hidream_o1.conditioning import build_extra_conds

    x = torch.randn(1, 3, 32 * side, 32 * side, generator=g)
    conds = build_extra_conds(torch.randint(0, 151936, (1, text), generator=g), x)
    return x, {k: conds[k] for k in ("input_ids", "position_ids", "vinput_mask", "ar_len")}


def image(channels: int, patch: int, text_dim: int, **extra) -> Inputs:
    """An image model: ``channels`` latent channels in ``patch``×``patch`` patches, ``text_dim``-wide text."""
    return lambda g, side, frames, text: (
        torch.randn(1, channels, patch * side, patch * side, generator=g),
        {"c_crossattn": torch.randn(1, text, text_dim, generator=g), **extra},
    )


def audio_video(g: torch.Generator, side: int, frames: int, text: int) -> tuple[torch.Tensor, dict]:
    """LTX-2: 128-channel video latents (1×1 patches) and 8×16 audio latents packed into one tensor as
    ComfyUI's sampler packs them; Gemma 3's 3840-wide text, before the connectors."""
    from comfy.utils import pack_latents

    latents = [torch.randn(1, 128, frames, side, side, generator=g),
               torch.randn(1, 8, frames * side * side // 4, 16, generator=g)]  # fmt: skip
    x, shapes = pack_latents(latents)
    return x, {"latent_shapes": shapes, "c_crossattn": torch.randn(1, text, 3840, generator=g)}


@dataclass(frozen=True)
class Measured:
    arch: str
    variant: str
    inputs: Inputs
    video: bool = False
    text_once: bool = False
    """The model makes its context from the text once per prompt, in ComfyUI's ``extra_conds`` (LTX-2's
    connectors): the measured call does it too."""
    metadata: Callable[[dict], dict] | None = None
    """The release file's metadata ComfyUI's detection reads, for a config (LTX-2's ``config``: its
    connectors' depth; the other sizes are ComfyUI's defaults, the release's)."""


MODELS = {
    "wan2.2-5b": Measured("wan", "2.2 TI2V 5B", video(48), video=True),
    "wan2.2-14b": Measured("wan", "2.1 T2V 14B / 2.2 T2V A14B", video(16), video=True),
    "ltx2-19b": Measured(
        "ltx2", "19B (dev, distilled)", audio_video, video=True, text_once=True,
        metadata=lambda c: {"config": json.dumps({"transformer": {"connector_num_layers": c["connector_layers"]}})},
    ),  # fmt: skip
    "krea2": Measured("krea2", "Raw / Turbo", image(16, 2, 12 * 2560)),
    "ernie-image": Measured("ernie", "8B / Turbo", image(128, 1, 3072)),
    "chroma-radiance": Measured("chroma_radiance", "Radiance", image(3, 16, 4096, guidance=torch.zeros(1))),
    "hidream-o1": Measured("hidream_o1", "8B (Image, Image-Dev)", hidream),
    "anima": Measured("anima", "2B (preview)", anima),
}


def load(comfy, m: Measured, config: dict, offsets: tuple[str, ...]) -> object:
    """ComfyUI's model of ``config`` with random float32 weights, the tensors ``offsets`` match drawn small."""
    arch = REGISTRY[m.arch]
    tensors = float_tensors(arch, config, torch.device("cpu"), torch.float32)
    g = torch.Generator().manual_seed(SEED)
    for name in sorted(n for n in tensors if any(fnmatchcase(n, glob) for glob in offsets)):
        tensors[name] = torch.randn(tensors[name].shape, generator=g) * 0.02
    metadata = m.metadata(config) if m.metadata else None
    with tiny_detection(comfy):
        return comfy.sd.load_diffusion_model_state_dict(tensors, {"dtype": torch.float32}, metadata=metadata)


def measure(args, home: Path) -> None:
    m = MODELS[args.model]
    arch = REGISTRY[m.arch]
    config = arch.variants[m.variant]
    config = {**config, **{k: min(args.blocks, int(config[k])) for k in arch.depth_keys}, **args.depth}
    frames = args.frames if m.video else 1
    side = math.isqrt(args.tokens // frames)
    comfy = import_comfyui(Path(args.comfyui), home, cpu=True, stand_ins=tuple(args.stand_ins.split(",")))
    patcher = load(comfy, m, config, tuple(args.offsets))
    model = patcher.model.diffusion_model
    x, kwargs = m.inputs(torch.Generator().manual_seed(SEED), side, frames, args.text)
    sigma = torch.full((1,), 0.6)

    def run() -> torch.Tensor:
        if m.text_once:
            context = model.preprocess_text_embeds(kwargs["c_crossattn"])
            return patcher.model.apply_model(x, sigma, **{**kwargs, "c_crossattn": context})
        return patcher.model.apply_model(x, sigma, **kwargs)

    params = sum(p.numel() for p in model.parameters()) / 1e9
    depth = ", ".join(f"{k} {config[k]}" for k in (*arch.depth_keys, *args.depth))
    grid = f"{frames}×{side}×{side}" if m.video else f"{side}×{side}"
    print(f"{arch.label} {m.variant} in ComfyUI's {type(patcher.model).__name__}, {depth} ({params:.2f}B parameters), "
          f"{grid} tokens, {args.text} text tokens, {args.scheme} int8, float32 on the CPU, "
          f"torch {torch.__version__}\n")  # fmt: skip
    print_errors(model, run, arch, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", choices=MODELS)
    parser.add_argument("--comfyui", required=True, help="ComfyUI's unpacked tree")
    parser.add_argument("--tokens", type=int, default=256, help="image or video tokens (default 256)")
    parser.add_argument("--frames", type=int, default=4, help="latent frames of a video model (default 4)")
    parser.add_argument("--depth", type=depth_overrides, default={}, metavar="KEY=N[,KEY=N]")
    parser.add_argument("--offsets", action="append", default=[], metavar="GLOB",
                        help="draw these tensors as additive offsets, std 0.02 (repeatable): random_tensor draws a 1-D "
                             "tensor as a norm scale near 1 and a table with std 1, e.g. Krea 2's 'blocks.*.mod.lin'")
    parser.add_argument("--stand-ins", default="torchvision,torchaudio",
                        help="packages ComfyUI imports that are missing (default torchvision,torchaudio)")
    args = arguments(parser).parse_args()
    with tempfile.TemporaryDirectory() as home:  # ComfyUI's user folders
        measure(args, Path(home))


if __name__ == "__main__":
    main()

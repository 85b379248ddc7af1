"""The built-in demo model: a small Flux.2 with the real Klein layout and random weights, and a
demo LoRA for it.

It lets every feature (convert, inspect, benchmark, the app) run on any machine without a download.
The weights are deterministic (fixed seed), so every user gets the same file; it is built once into
the user's cache folder and rebuilt only when the recipe changes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch

from engine.checkpoint import CheckpointError, CheckpointReader
from engine.checkpoint_writer import CheckpointWriter
from engine.jobs import CancelToken, ProgressFn, Reporter
from engine.models import REGISTRY, Architecture
from engine.paths import cache_dir

DEMO_ARCH = "flux2"
DEMO_LABEL = REGISTRY[DEMO_ARCH].label
"""The family whose layout the demo model has ("Flux.2"), as both faces name it."""
DEMO_CONFIG = {
    "hidden": 512, "head_dim": 128, "in_channels": 128, "out_channels": 128, "text_dim": 1536,
    "mlp_hidden": 1536, "double_blocks": 2, "single_blocks": 4, "guidance": False,
}  # fmt: skip
"""Flux.2 Klein's layout and head size with a narrow width and few blocks: 32M parameters, 64 MB."""
DEMO_SEED = 0
DEMO_FILE = "flux2-klein-demo.safetensors"
DEMO_LORA_FILE = "flux2-klein-demo-lora.safetensors"
DEMO_LORA_RANK = 8
DEMO_LORA_ALPHA = 4.0  # scale alpha / rank = 0.5, as many published LoRAs have
DEMO_LORA_STD = 0.06  # of each factor; the change up @ down × 0.5 spreads 0.06² × √8 × 0.5 ≈ 0.005
DEMO_LORA_SEED = 1
RECIPE_KEY = "int8_studio.demo_recipe"
# what a cached file must have been made from to be reused (a change rebuilds it)
_MODEL_RECIPE = json.dumps({"arch": DEMO_ARCH, "config": DEMO_CONFIG, "seed": DEMO_SEED}, sort_keys=True)
_LORA_RECIPE = json.dumps(
    {
        "model": _MODEL_RECIPE, "rank": DEMO_LORA_RANK, "alpha": DEMO_LORA_ALPHA, "std": DEMO_LORA_STD,
        "seed": DEMO_LORA_SEED,
    },
    sort_keys=True,
)  # fmt: skip


def random_weights(
    arch: str | Architecture,
    config: Mapping[str, int | bool],
    dtype: torch.dtype = torch.bfloat16,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Random single-file tensors of ``config``, one at a time in module order.

    Norm scales sit around 1, everything else around 0 with a spread like trained weights, so the
    model computes finite values and quantization sees realistic ranges.
    """
    arch = REGISTRY[arch] if isinstance(arch, str) else arch
    for name, shape in arch.tensor_shapes(config).items():
        t = torch.randn(shape, generator=generator) * (0.1 if len(shape) == 1 else 0.05)
        is_norm = len(shape) == 1 and not name.endswith(".bias")
        yield name, (t + 1 if is_norm else t).to(dtype)


def build_demo_model(
    folder: Path | None = None, progress: ProgressFn | None = None, cancel: CancelToken | None = None
) -> Path:
    """The demo model's path, writing it first unless an up-to-date copy is already there."""
    arch = REGISTRY[DEMO_ARCH]
    layout = {name: (torch.bfloat16, shape) for name, shape in arch.tensor_shapes(DEMO_CONFIG).items()}
    tensors = random_weights(arch, DEMO_CONFIG, generator=torch.Generator().manual_seed(DEMO_SEED))
    path = (folder or cache_dir() / "demo") / DEMO_FILE
    return _write_once(path, _MODEL_RECIPE, layout, tensors, "building demo model", progress, cancel)


def build_demo_lora(
    folder: Path | None = None, progress: ProgressFn | None = None, cancel: CancelToken | None = None
) -> Path:
    """The demo LoRA's path (beside the demo model), writing it first unless it is up to date.

    A ComfyUI-layout LoRA of rank :data:`DEMO_LORA_RANK` on every linear layer of the demo model,
    with seeded random factors whose change is about a tenth of the weights' spread.
    """
    layout = _demo_lora_layout()
    generator = torch.Generator().manual_seed(DEMO_LORA_SEED)
    tensors = (
        (name, torch.tensor(DEMO_LORA_ALPHA) if name.endswith(".alpha") else _factor(shape, generator))
        for name, (_, shape) in layout.items()
    )
    path = (folder or cache_dir() / "demo") / DEMO_LORA_FILE
    return _write_once(path, _LORA_RECIPE, layout, tensors, "building demo LoRA", progress, cancel)


def made_from_demo(metadata: Mapping[str, str]) -> bool:
    """True for the demo model and for the files INT8 Studio made from it (they name their source)."""
    return RECIPE_KEY in metadata or metadata.get("int8_studio.source_name") == DEMO_FILE


def _demo_lora_layout() -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    layout: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    for name, shape in REGISTRY[DEMO_ARCH].tensor_shapes(DEMO_CONFIG).items():
        if len(shape) == 2 and name.endswith(".weight"):
            stem = "diffusion_model." + name.removesuffix(".weight")
            layout[f"{stem}.lora_down.weight"] = (torch.bfloat16, (DEMO_LORA_RANK, shape[1]))
            layout[f"{stem}.lora_up.weight"] = (torch.bfloat16, (shape[0], DEMO_LORA_RANK))
            layout[f"{stem}.alpha"] = (torch.float32, ())
    return layout


def _factor(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return (torch.randn(shape, generator=generator) * DEMO_LORA_STD).to(torch.bfloat16)


def _write_once(
    path: Path,
    recipe: str,
    layout: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
    tensors: Iterable[tuple[str, torch.Tensor]],
    stage: str,
    progress: ProgressFn | None,
    cancel: CancelToken | None,
) -> Path:
    """Write ``tensors`` to ``path`` (atomically, with ``recipe`` in the metadata) unless it holds them."""
    if _holds(path, recipe):
        return path
    if path.parent.exists() and not path.parent.is_dir():
        raise CheckpointError(f"{path.parent} is a file, not a folder; give a folder for the demo files")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"cannot create {path.parent}: {e.strerror or e}") from None
    report = Reporter(progress, stage, len(layout))
    with CheckpointWriter(path, dict(layout), {"format": "pt", RECIPE_KEY: recipe}, overwrite=True) as writer:
        for done, (name, tensor) in enumerate(tensors, 1):
            if cancel:
                cancel.check()
            writer.write(name, tensor)
            report(done, name)
        writer.commit()
    return path


def _holds(path: Path, recipe: str) -> bool:
    """True if ``path`` is a valid file made from ``recipe``."""
    if not path.is_file():
        return False
    try:
        with CheckpointReader(path) as reader:
            return reader.metadata.get(RECIPE_KEY) == recipe
    except CheckpointError:
        return False

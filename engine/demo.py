"""The built-in demo model: a small Flux.2 with the real Klein layout and random weights.

It lets every feature (convert, inspect, benchmark, the app) run on any machine without a download.
The weights are deterministic (fixed seed), so every user gets the same file; it is built once into
the user's cache folder and rebuilt only when the recipe changes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from engine.checkpoint import CheckpointError, CheckpointReader, CheckpointWriter
from engine.jobs import CancelToken, ProgressFn, Reporter
from engine.models import REGISTRY, Architecture
from engine.paths import cache_dir

DEMO_ARCH = "flux2"
DEMO_CONFIG = {
    "hidden": 512, "head_dim": 128, "in_channels": 128, "out_channels": 128, "text_dim": 1536,
    "mlp_hidden": 1536, "double_blocks": 2, "single_blocks": 4, "guidance": False,
}  # fmt: skip
"""Flux.2 Klein's layout and head size with a narrow width and few blocks: 32M parameters, 64 MB."""
DEMO_SEED = 0
DEMO_FILE = "flux2-klein-demo.safetensors"
RECIPE_KEY = "int8_studio.demo_recipe"


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
    path = (folder or cache_dir() / "demo") / DEMO_FILE
    recipe = json.dumps({"arch": DEMO_ARCH, "config": DEMO_CONFIG, "seed": DEMO_SEED}, sort_keys=True)
    if _holds(path, recipe):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    arch = REGISTRY[DEMO_ARCH]
    shapes = arch.tensor_shapes(DEMO_CONFIG)
    report = Reporter(progress, "building demo model", len(shapes))
    layout = {name: (torch.bfloat16, shape) for name, shape in shapes.items()}
    generator = torch.Generator().manual_seed(DEMO_SEED)
    metadata = {"format": "pt", RECIPE_KEY: recipe}
    with CheckpointWriter(path, layout, metadata, overwrite=True) as writer:
        for done, (name, tensor) in enumerate(random_weights(arch, DEMO_CONFIG, generator=generator), 1):
            if cancel:
                cancel.check()
            writer.write(name, tensor)
            report(done, name)
        writer.commit()
    return path


def _holds(path: Path, recipe: str) -> bool:
    """True if ``path`` is a valid demo model made from ``recipe``."""
    if not path.is_file():
        return False
    try:
        with CheckpointReader(path) as reader:
            return reader.metadata.get(RECIPE_KEY) == recipe
    except CheckpointError:
        return False

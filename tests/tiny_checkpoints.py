"""Tiny checkpoints with the real key layouts of every supported architecture, for tests and demos.

Shapes come from the engine (``Architecture.tensor_shapes`` of a config from ``Architecture.tiny``);
this module only makes random weights and writes them in each layout and weight format:

    ckpt = write_single_file(tmp_path / "m.safetensors", "flux2", prefix="model.diffusion_model.")
    ckpt = write_diffusers(tmp_path / "model", "zimage")         # model/transformer/… (sharded)
    ckpt = write_single_file(path, "chroma", fmt="fp8_scaled")  # or fp8_comfy_quant, int8_rowwise, …

``ckpt.tensors`` is what the file holds (reader keys); ``ckpt.reference`` is what a conversion plan
should produce: single-file names without prefix, fp8 weights dequantized the way ComfyUI does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from engine.demo import random_weights
from engine.int8.quantize import quantize_weight
from engine.models import REGISTRY, Architecture
from engine.models.spec import Config

FORMATS = ("float", "fp8_scaled", "fp8_comfy_quant", "int8_tensorwise", "int8_rowwise")
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max


@dataclass
class TinyCheckpoint:
    path: Path  # the .safetensors file, or the model folder holding transformer/
    arch: Architecture
    config: Config
    tensors: dict[str, torch.Tensor]  # as written, by reader key
    reference: dict[str, torch.Tensor]  # the single-file tensors a conversion plan must produce


def architecture(arch: str | Architecture) -> Architecture:
    return arch if isinstance(arch, Architecture) else REGISTRY[arch]


def random_tensors(
    arch: str | Architecture, variant: str = "tiny", dtype: torch.dtype = torch.bfloat16
) -> dict[str, torch.Tensor]:
    """Fresh random single-file tensors (no prefix) of a tiny config, as the demo model makes them."""
    arch = architecture(arch)
    return dict(random_weights(arch, arch.tiny[variant], dtype))


def to_diffusers(
    arch: str | Architecture, tensors: dict[str, torch.Tensor], config: Config
) -> dict[str, torch.Tensor]:
    """Split/rename single-file tensors into the diffusers layout (tensors without a counterpart go)."""
    arch = architecture(arch)
    shapes = arch.diffusers_shapes(config)
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        start = 0
        for piece in arch.diffusers_pieces(name, config):
            target = out.setdefault(piece.name, torch.empty(shapes[piece.name], dtype=t.dtype))
            rows = range(target.shape[0])[piece.rows]
            target[piece.rows] = t[start : start + len(rows)]
            start += len(rows)
    return out


def quantize(arch: Architecture, tensors: dict[str, torch.Tensor], fmt: str) -> tuple[dict, dict]:
    """``(tensors to write, reference)`` with every quantizable weight stored in ``fmt``."""
    if fmt == "float":
        return dict(tensors), dict(tensors)
    written: dict[str, torch.Tensor] = {}
    reference = dict(tensors)
    if fmt == "fp8_scaled":
        written["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    for name, w in tensors.items():
        if arch.keeps_high_precision(name, tuple(w.shape)):
            written[name] = w
            continue
        layer = name.removesuffix(".weight")
        if fmt.startswith("fp8"):
            scale = (w.float().abs().amax() / FP8_MAX).reshape(())
            q = (w.float() / scale).to(torch.float8_e4m3fn)
            written[name] = q
            reference[name] = (q.float() * scale).to(torch.bfloat16)
            if fmt == "fp8_scaled":
                written[f"{layer}.scale_weight"] = scale
            else:
                written[f"{layer}.weight_scale"] = scale
                written[f"{layer}.input_scale"] = torch.ones(())
                written[f"{layer}.comfy_quant"] = _json_bytes({"format": "float8_e4m3fn"})
        else:
            q, scale = quantize_weight(w, fmt.removeprefix("int8_"))
            written |= {name: q, f"{layer}.weight_scale": scale}
            written[f"{layer}.comfy_quant"] = _json_bytes({"format": "int8_tensorwise"})
            reference |= {
                name: q,
                f"{layer}.weight_scale": scale,
                f"{layer}.comfy_quant": written[f"{layer}.comfy_quant"],
            }
    return written, reference


def _json_bytes(obj: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(obj).encode()), dtype=torch.uint8)


def write_single_file(
    path: str | Path,
    arch: str | Architecture,
    variant: str = "tiny",
    prefix: str = "",
    dtype: torch.dtype = torch.bfloat16,
    fmt: str = "float",
    extra: dict[str, torch.Tensor] | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
    metadata: dict[str, str] | None = None,
) -> TinyCheckpoint:
    """A single-file checkpoint of ``tensors`` (default: fresh :func:`random_tensors`).

    ``extra`` tensors (e.g. a VAE's) are written as they are, beside the prefixed model; ``metadata``
    goes into the header (e.g. the ``config`` a release file carries).
    """
    arch = architecture(arch)
    written, reference = quantize(arch, tensors or random_tensors(arch, variant, dtype), fmt)
    written = {prefix + n: t for n, t in written.items()} | (extra or {})
    path = Path(path)
    save_file({n: t.contiguous() for n, t in written.items()}, str(path), metadata={"format": "pt", **(metadata or {})})
    return TinyCheckpoint(path, arch, arch.tiny[variant], written, reference)


def write_diffusers(
    folder: str | Path,
    arch: str | Architecture,
    variant: str = "tiny",
    dtype: torch.dtype = torch.bfloat16,
    shards: int = 2,
    tensors: dict[str, torch.Tensor] | None = None,
    config: Config | None = None,
) -> TinyCheckpoint:
    """``folder/transformer/`` with config.json and ``shards`` safetensors shards plus their index.

    ``tensors`` are single-file tensors (default: fresh :func:`random_tensors`), split and renamed;
    ``config`` is theirs when they are not of a tiny variant.
    """
    arch = architecture(arch)
    config = config or arch.tiny[variant]
    single = tensors or random_tensors(arch, variant, dtype)
    tensors = to_diffusers(arch, single, config)
    # what the diffusers layout does not hold (Z-Image's unused norm_final) the plan fills with ones
    reference = {n: t if arch.diffusers_pieces(n, config) else torch.ones_like(t) for n, t in single.items()}
    transformer = Path(folder) / "transformer"
    transformer.mkdir(parents=True, exist_ok=True)
    (transformer / "config.json").write_text(
        json.dumps({"_class_name": arch.diffusers_class, "_diffusers_version": "0.36.0"})
    )
    names = list(tensors)
    weight_map = {}
    for k in range(shards):
        file = f"diffusion_pytorch_model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n].contiguous() for n in names[k::shards]}
        save_file(part, str(transformer / file), metadata={"format": "pt"})
        weight_map |= {n: file for n in part}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (transformer / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return TinyCheckpoint(Path(folder), arch, config, tensors, reference)


def every_tiny_variant(diffusers: bool = False) -> list[tuple[str, str]]:
    """(architecture name, tiny variant) for every tiny config, for parametrized tests (``diffusers``:
    only the families that have a diffusers layout)."""
    return [(a.name, v) for a in REGISTRY.values() if a.diffusers_class or not diffusers for v in a.tiny]

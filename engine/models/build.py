"""Runnable models: built on the meta device, then materialized straight on the target device.

Weights come from random numbers drawn on the device (benchmarks without a download), or from a
checkpoint through the detector's plan (any prefix, single-file or diffusers layout, fp8 dequantized,
layers the file stores quantized built by a :class:`StoredLayers`). :func:`replace_linears` swaps the
``nn.Linear`` layers the architecture allows to quantize (``engine.int8.apply`` makes them int8).
"""

from __future__ import annotations

import contextlib
import math
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Protocol

import torch
from torch import nn

from engine.checkpoint import CheckpointReader
from engine.jobs import CancelToken, JobError
from engine.models.detect import DetectedModel, ModelLayoutError, detect
from engine.models.spec import REGISTRY, Architecture, Config

class UnknownModelNameError(JobError):
    """Neither a checkpoint file nor one of the known model names."""


def model_names() -> dict[str, tuple[Architecture, str]]:
    """Every name :func:`named_config` accepts: the released models (``Architecture.model_names``), then
    each family's tiny configs (``flux2-tiny``, …: real layouts at toy sizes, for CPU runs and tests)."""
    names = {name: (arch, variant) for arch in REGISTRY.values() for name, variant in arch.model_names.items()}
    for arch in REGISTRY.values():
        if arch.runnable:
            names |= {f"{arch.name}-{variant}": (arch, variant) for variant in arch.tiny}
    return names


def named_config(name: str) -> tuple[Architecture, Config, str]:
    """``(architecture, config, label)`` of a known model name such as ``flux2-klein-9b``."""
    names = model_names()
    if name not in names:
        raise UnknownModelNameError(
            f"{name!r} is neither a checkpoint file nor a known model; known models: {', '.join(names)}"
        )
    arch, variant = names[name]
    config = arch.variants.get(variant) or arch.tiny[variant]
    return arch, config, f"{arch.label} {variant}"


def build_model(arch: Architecture, config: Config) -> nn.Module:
    """The module of ``config`` on the meta device: no memory until its weights are assigned."""
    with torch.device("meta"):
        model = arch.build_module(config)
    return model.eval().requires_grad_(False)


Make = Callable[[str, nn.Linear], nn.Module]
"""What replaces a float linear the architecture allows to quantize: ``make(weight name, linear)``."""

Fill = Callable[[nn.Module, Callable[[str], bool]], None]
"""Puts the tensors whose names pass a test into a model built on the meta device (:func:`build_model`)."""


class StoredLayers(Protocol):
    """The layers a checkpoint stores in a form a float module cannot hold (int8: ``engine.int8.apply``):
    their names, and how to build one from its tensors, ``read("weight")`` etc. (None where absent)."""

    layers: set[str]

    def build(self, layer: str, read: Callable[[str], torch.Tensor | None]) -> nn.Module: ...


def random_model(
    arch: Architecture,
    config: Config,
    device: torch.device,
    dtype: torch.dtype,
    seed: int = 0,
    make: Make | None = None,
) -> nn.Module:
    """A model with random weights drawn on ``device``; the same seed gives the same weights. With
    ``make``, each eligible linear is replaced as soon as it is drawn (see :func:`random_filler`)."""
    model = build_model(arch, config)
    random_filler(arch, device, dtype, seed, make)(model, _everything)
    return model


def random_filler(
    arch: Architecture, device: torch.device, dtype: torch.dtype, seed: int = 0, make: Make | None = None
) -> Fill:
    """Draws random tensors on ``device``. Each tensor has its own generator, seeded from ``seed`` and
    its name, so a part of the model drawn alone gets the values the whole model gets. With ``make``,
    each linear the architecture allows to quantize is replaced right after its weight and bias are
    drawn: a converted model never holds more than one float copy of such a layer."""

    def fill(model: nn.Module, wanted: Callable[[str], bool]) -> None:
        for name, param in list(model.named_parameters()):
            if wanted(name) and param.is_meta:
                _assign(model, name, random_tensor(name, param.shape, device, dtype, seed))
                _replace_when_complete(model, arch, name, make)

    return fill


def random_tensor(
    name: str, shape: Sequence[int], device: torch.device, dtype: torch.dtype, seed: int = 0
) -> torch.Tensor:
    """The tensor ``name`` of a random model, drawn with a generator of its own (seeded from ``seed``
    and the name): weights that keep activations at unit scale (std 1/√in; a convolution's input is
    its channels times its kernel), norm scales near 1, small biases."""
    generator = torch.Generator(device).manual_seed(_tensor_seed(seed, name))
    t = torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
    if len(shape) >= 2 and name.endswith(".weight"):
        return t.mul_(1 / math.sqrt(math.prod(shape[1:])))
    if name.endswith(".bias"):
        return t.mul_(0.02)
    if len(shape) == 1:  # norm scales
        return t.mul_(0.02).add_(1)
    return t  # pad tokens


def _tensor_seed(seed: int, name: str) -> int:
    return zlib.crc32(f"{seed}:{name}".encode())  # CPU generators keep 32 bits of a seed


def _everything(name: str) -> bool:
    return True


def load_model(
    reader: CheckpointReader,
    device: torch.device,
    dtype: torch.dtype = torch.bfloat16,
    cancel: CancelToken | None = None,
    make: Make | None = None,
    stored: Callable[[CheckpointReader, DetectedModel, torch.dtype], StoredLayers] | None = None,
) -> tuple[nn.Module, DetectedModel]:
    """The checkpoint's model on ``device``: float tensors in ``dtype``, the layers it stores quantized
    built by ``stored(reader, detected, dtype)``. With ``make``, each eligible float linear is replaced as soon
    as it is read (:func:`checkpoint_filler`)."""
    detected = detect(reader)
    model = build_model(detected.arch, detected.config)
    layers = stored(reader, detected, dtype) if stored is not None else None
    checkpoint_filler(reader, detected, device, dtype, cancel, make, layers)(model, _everything)
    return model, detected


def checkpoint_filler(
    reader: CheckpointReader,
    detected: DetectedModel,
    device: torch.device,
    dtype: torch.dtype = torch.bfloat16,
    cancel: CancelToken | None = None,
    make: Make | None = None,
    stored: StoredLayers | None = None,
) -> Fill:
    """Reads the checkpoint's tensors (as :func:`load_model` describes) into a model of ``detected``.
    A tensor the module has no place for, a wrong shape or a missing tensor is an error, for the
    tensors asked for (a quantized layer without ``stored`` has no place). With ``make``, each float
    linear the architecture allows to quantize is replaced right after its weight and bias are read."""
    quantized = stored.layers if stored is not None else set()

    def fill(model: nn.Module, wanted: Callable[[str], bool]) -> None:
        plan = {t.name: t for t in detected.tensors if wanted(t.name)}
        expected = {
            name: t
            for name, t in [*model.named_parameters(), *model.named_buffers()]
            if wanted(name) and t.is_meta
        }

        def read(name: str) -> torch.Tensor:
            t = plan.pop(name)
            return t.build([reader.get(s) for s in t.sources]).to(device)

        for layer in sorted(layer for layer in quantized if f"{layer}.weight" in plan):
            if cancel:
                cancel.check()
            module = stored.build(layer, lambda part, layer=layer: read(n) if (n := f"{layer}.{part}") in plan else None)
            _check_shape(detected, expected, f"{layer}.weight", module.weight)
            _set_module(model, layer, module)
            for name in (f"{layer}.weight", f"{layer}.bias"):
                expected.pop(name, None)
            _replace_when_complete(model, detected.arch, f"{layer}.weight", make)
        for name in list(plan):
            if cancel:
                cancel.check()
            if name not in expected:
                raise ModelLayoutError(
                    f"{detected.label}: tensor {detected.prefix}{name} has no place in the {detected.arch.label} "
                    "module: this variant cannot be run"
                )
            tensor = read(name)
            _check_shape(detected, expected, name, tensor)
            _assign(model, name, tensor.to(dtype) if tensor.is_floating_point() else tensor)
            expected.pop(name)
            _replace_when_complete(model, detected.arch, name, make)
        _fill_missing(model, detected, expected, device, dtype)

    return fill


def _check_shape(detected: DetectedModel, expected: dict, name: str, tensor: torch.Tensor) -> None:
    want = tuple(expected[name].shape)
    if tuple(tensor.shape) != want:
        raise ModelLayoutError(
            f"{detected.label}: tensor {detected.prefix}{name} has shape {list(tensor.shape)}, "
            f"the model expects {list(want)}: the file is inconsistent"
        )


def _fill_missing(
    model: nn.Module,
    detected: DetectedModel,
    missing: Iterable[str],
    device: torch.device,
    dtype: torch.dtype,
) -> None:
    """Tensors the diffusers layout does not hold (Z-Image's unused ``norm_final``) get their
    module's initial values; anything else missing is an incomplete file."""
    for name in missing:
        if detected.layout == "diffusers" and not detected.arch.diffusers_pieces(name, detected.config):
            module_name, _, _ = name.rpartition(".")
            module = model.get_submodule(module_name)
            module.to_empty(device=device).to(dtype).reset_parameters()
            continue
        raise ModelLayoutError(
            f"{detected.label} without tensor {detected.prefix}{name}: the file is incomplete"
        )


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    model.get_submodule(module_name).register_parameter(attr, nn.Parameter(tensor, requires_grad=False))


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, module)


def replace_linears(model: nn.Module, arch: Architecture, make: Make) -> int:
    """Replace each ``nn.Linear`` whose weight the architecture allows to quantize by
    ``make(weight name, linear)``, one at a time (the float weight is freed as its replacement is
    made). Returns how many."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return sum(_replace_if_eligible(model, arch, name, linear, make) for name, linear in linears)


def _replace_if_eligible(model: nn.Module, arch: Architecture, name: str, linear: nn.Linear, make: Make) -> bool:
    """Replace layer ``name`` by ``make``'s module if the architecture allows its weight in 8 bits."""
    if arch.keeps_high_precision(f"{name}.weight", tuple(linear.weight.shape)):
        return False
    _set_module(model, name, make(f"{name}.weight", linear))
    return True


def _replace_when_complete(model: nn.Module, arch: Architecture, name: str, make: Make | None) -> None:
    """After tensor ``name`` was put in place: replace its layer by ``make``'s module if the layer is a
    float linear the architecture allows to quantize and none of its tensors is still missing."""
    layer_name = name.rpartition(".")[0]
    layer = model.get_submodule(layer_name)
    if make is not None and isinstance(layer, nn.Linear) and not any(p.is_meta for p in layer.parameters()):
        _replace_if_eligible(model, arch, layer_name, layer, make)


@contextlib.contextmanager
def streamed_blocks(model: nn.Module, fill: Fill) -> Iterator[nn.Module]:
    """``model`` (built on the meta device) runnable on a device too small to hold it: what lies outside
    its repeated blocks (the elements of each ``nn.ModuleList``) is filled now, and each block only
    while it runs, back on the meta device after. One block's weights at a time: slow (every call reads
    every weight again), for a reference output rather than for timing."""
    blocks: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and not _in_blocks(name, blocks):
            blocks |= {f"{name}.{i}.": block for i, block in enumerate(module)}
    fill(model, lambda name: not _in_blocks(name, blocks))
    hooks = []
    for prefix, block in blocks.items():
        hooks.append(block.register_forward_pre_hook(lambda *_, p=prefix: fill(model, lambda n: n.startswith(p))))
        hooks.append(block.register_forward_hook(lambda block, *_: _to_meta(block)))
    try:
        yield model
    finally:
        for hook in hooks:
            hook.remove()


def _in_blocks(name: str, blocks: dict[str, nn.Module]) -> bool:
    return any(name.startswith(prefix) for prefix in blocks)


def _to_meta(module: nn.Module) -> None:
    """Drop ``module``'s tensors, keeping their shapes and dtypes on the meta device."""
    for name, param in list(module.named_parameters()):
        _assign(module, name, torch.empty_like(param, device="meta"))
    for name, buffer in list(module.named_buffers()):
        if buffer is not None:
            owner, _, attr = name.rpartition(".")
            module.get_submodule(owner).register_buffer(attr, torch.empty_like(buffer, device="meta"))

"""Detection: which architecture, variant, layout and weight format a checkpoint holds, and the plan
that turns it into the single-file ComfyUI layout.

Detection reads headers only (names, dtypes, shapes), never tensor data. The plan is a list of
:class:`OutputTensor`: each knows its output name, dtype and shape up front (so a writer can put the
header first) and how to build itself from a few source tensors (rename, concatenation of split
q/k/v, half swap, fp8 dequantization). Conversion needs nothing else.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

from engine.checkpoint import DTYPES, FLOAT_DTYPES, torch_dtypes
from engine.jobs import JobError
from engine.models.spec import REGISTRY, Architecture, Rule, Shape, natural_key, supported_text

if TYPE_CHECKING:  # the plan is made without torch; its build functions run with it
    import torch

PREFIXES = ("model.diffusion_model.", "diffusion_model.", "net.")  # net.: Cosmos-based releases (Anima)
FLOAT_FORMATS = {"BF16": "bf16", "F16": "fp16", "F32": "fp32", "F64": "fp64"}
FP8_DTYPES = ("F8_E4M3", "F8_E5M2")
# Per-layer tensors of ComfyUI's fp8 conventions, dropped once the weight is dequantized.
FP8_SCALES = ("weight_scale", "scale_weight")  # new (comfy_quant) and old (scaled_fp8) conventions
FP8_AUXILIARY = (*FP8_SCALES, "input_scale", "scale_input", "comfy_quant")
SCALED_FP8_MARKER = "scaled_fp8"
DEQUANTIZED_DTYPE = "BF16"  # what ComfyUI computes with when it runs an fp8 file


class UnknownModelError(JobError):
    """The checkpoint is not one of the supported diffusion models."""


class ModelLayoutError(JobError):
    """The checkpoint looks like a supported model but its tensors are incomplete or inconsistent."""


class TensorHeader(Protocol):
    dtype: str  # safetensors dtype name, "BF16"
    shape: tuple[int, ...]


@dataclass(frozen=True)
class OutputTensor:
    """One tensor of the single-file output: ``build(tensors of sources) -> tensor``.

    ``sources`` are reader keys. ``quantize`` is True for the 2-D float linear weights that the
    architecture allows to become int8.
    """

    name: str
    dtype_name: str  # safetensors name, "BF16"
    shape: Shape
    sources: tuple[str, ...]
    build: Callable[[list[torch.Tensor]], torch.Tensor] = field(repr=False)
    quantize: bool = False

    @property
    def dtype(self) -> torch.dtype:
        """The torch dtype (imports torch: the plan is made without it)."""
        return torch_dtypes()[self.dtype_name]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype_name][1]


@dataclass(frozen=True)
class DetectedModel:
    arch: Architecture
    variant: str  # "Klein 9B", "custom" (sizes no release has), "Klein 9B with 8 double blocks, …"
    layout: str  # "single-file" | "diffusers"
    prefix: str  # one of PREFIXES or "" (stripped from output names)
    source_format: str  # bf16 fp16 fp32 fp8 fp8_scaled int8_tensorwise int8_rowwise mixed
    config: dict[str, int | bool]
    tensors: list[OutputTensor]
    layer_formats: dict[str, str]  # quantized layers of the source (fp8*, int8*), layer name → format
    other_tensors: tuple[str, ...] = ()  # reader keys outside the prefix (a full checkpoint's VAE, …)

    @property
    def int8_layers(self) -> list[str]:
        """The layers the source stores in int8 (row-wise or tensor-wise), in its order."""
        return [layer for layer, fmt in self.layer_formats.items() if fmt.startswith("int8")]

    @property
    def label(self) -> str:
        return f"{self.arch.label} {self.variant}"


class Headers(Protocol):
    """What detection reads of a checkpoint: :class:`engine.checkpoint.CheckpointReader` has it."""

    tensors: Mapping[str, TensorHeader]
    config: Mapping[str, Any] | None


def detect(reader: Headers) -> DetectedModel:
    """Detect the model in a :class:`engine.checkpoint.CheckpointReader` (headers only)."""
    return detect_tensors(reader.tensors, reader.config)


def detect_tensors(
    tensors: Mapping[str, TensorHeader], config: Mapping[str, Any] | None = None
) -> DetectedModel:
    """Detect from reader keys → headers and the diffusers ``config.json`` (if any)."""
    prefix = next((p for p in PREFIXES if any(n.startswith(p) for n in tensors)), "")
    own = {n[len(prefix) :]: h for n, h in tensors.items() if n.startswith(prefix)}
    arch, layout = _architecture(own, config, list(tensors))
    layers = _quantized_layers(own)
    plan = _source_tensors(own, prefix, layers)
    if layout == "diffusers":
        if any(fmt.startswith("int8") for fmt, _ in layers.values()):
            raise ModelLayoutError(
                "int8 weights in the diffusers layout are not supported; use a single-file int8 model"
            )
        plan = _from_diffusers(arch, plan) + [_marker(name) for name in arch.diffusers_markers(config or {})]
    plan = [replace(t, quantize=_quantizable(arch, t)) for t in plan]
    _check_ranks(arch, plan, prefix)
    shapes = {t.name: t.shape for t in plan}
    try:
        model_config = arch.config_from_shapes(shapes)
    except KeyError as missing:
        name = missing.args[0]
        if layout == "diffusers":
            name = " + ".join(arch.diffusers_names(name)) or name
        raise ModelLayoutError(
            f"{arch.label} model without tensor {prefix}{name}: the file is incomplete"
        ) from None
    plan = _check_shapes(arch, model_config, plan, prefix, layout)
    return DetectedModel(
        arch=arch,
        variant=arch.variant_of(model_config),
        layout=layout,
        prefix=prefix,
        source_format=_source_format(own, layers),
        config=model_config,
        tensors=plan,
        layer_formats={layer: fmt for layer, (fmt, _) in layers.items()},
        other_tensors=tuple(n for n in tensors if not n.startswith(prefix)),
    )


# --- shapes against the architecture ------------------------------------------------------------

MISMATCHES_SHOWN = 4
"""Tensors a shape error names before it counts the rest."""


def _generic(name: str) -> str:
    """``layers.7.attention.qkv.weight`` → ``layers.N.attention.qkv.weight``: a name of any block."""
    return re.sub(r"\.\d+\.", ".N.", name, count=1)


def _ranks(arch: Architecture) -> dict[str, int]:
    """Every tensor of ``arch``'s tiny configs, and every family (block index as N) whose members
    agree, → its number of dimensions (the same whatever the config)."""
    exact: dict[str, int] = {}
    for config in arch.tiny.values():
        exact |= {n: len(s) for n, s in arch.tensor_shapes(config).items()}
    generic: dict[str, set[int]] = {}
    for name, rank in exact.items():
        generic.setdefault(_generic(name), set()).add(rank)
    return {**{n: r.pop() for n, r in generic.items() if len(r) == 1}, **exact}


def _shape_text(shape: Shape) -> str:
    return f"{len(shape)}-D {list(shape)}" if len(shape) != 2 else str(list(shape))


def _fail(arch: Architecture, problems: list[str], what: str) -> ModelLayoutError:
    more = f" and {len(problems) - MISMATCHES_SHOWN} more" if len(problems) > MISMATCHES_SHOWN else ""
    return ModelLayoutError(
        f"{arch.label} model whose tensors do not fit its architecture ({what}): "
        f"{'; '.join(problems[:MISMATCHES_SHOWN])}{more}: the file is damaged or not a {arch.label} model"
    )


def _check_ranks(arch: Architecture, plan: list[OutputTensor], prefix: str) -> None:
    """Each tensor has the number of dimensions its family has, and none is empty (before the config
    is read off the shapes: a 1-D tensor where a matrix belongs must be a message, not an IndexError)."""
    ranks, problems = _ranks(arch), []
    for t in plan:
        rank = ranks.get(t.name, ranks.get(_generic(t.name)))
        if rank is not None and len(t.shape) != rank:
            kind = {0: "a number", 1: "a vector", 2: "a matrix"}.get(rank, f"{rank}-D")
            problems.append(f"{prefix}{t.name} is {_shape_text(t.shape)}, not {kind}")
        elif rank and 0 in t.shape:
            problems.append(f"{prefix}{t.name} is empty ({list(t.shape)})")
    if problems:
        raise _fail(arch, problems, "wrong number of dimensions" if "not" in problems[0] else "empty tensors")


def _check_shapes(
    arch: Architecture, config: Mapping[str, int | bool], plan: list[OutputTensor], prefix: str, layout: str
) -> list[OutputTensor]:
    """Every tensor the architecture has for ``config`` (read off the file's own shapes) is there with
    its shape; each one that is not is named. Returns the plan with the tensors the diffusers layout
    does not hold (Z-Image's unused ``norm_final``) added, at their module's initial value, so that
    the single file written is complete."""
    expected = arch.tensor_shapes(config)
    found = {t.name: t for t in plan}
    problems = [
        f"{prefix}{name} is {_shape_text(found[name].shape)}, expected {_shape_text(shape)}"
        for name, shape in expected.items()
        if name in found and tuple(found[name].shape) != tuple(shape)
    ]
    if problems:
        raise _fail(arch, problems, "wrong shapes")
    absent = [n for n in expected if n not in found]
    filled = [n for n in absent if layout == "diffusers" and not arch.diffusers_pieces(n, config)]
    missing = [n for n in absent if n not in filled]
    if missing:
        more = f" and {len(missing) - MISMATCHES_SHOWN} more" if len(missing) > MISMATCHES_SHOWN else ""
        names = ", ".join(prefix + n for n in missing[:MISMATCHES_SHOWN])
        noun = "tensor" if len(missing) == 1 else "tensors"
        raise ModelLayoutError(f"{arch.label} model without {noun} {names}{more}: the file is incomplete")
    if not filled:
        return plan
    dtype = next((t.dtype_name for t in plan if t.dtype_name in FLOAT_DTYPES and len(t.shape) == 1), DEQUANTIZED_DTYPE)
    added = [_initial(name, expected[name], dtype) for name in filled]
    return sorted([*plan, *added], key=lambda t: natural_key(t.name))


def _marker(name: str) -> OutputTensor:
    """An empty float32 tensor (:meth:`Architecture.diffusers_markers`)."""

    def build(_: list[torch.Tensor]) -> torch.Tensor:
        import torch

        return torch.empty(0)

    return OutputTensor(name, "F32", (0,), (), build)


def _initial(name: str, shape: Shape, dtype: str) -> OutputTensor:
    """A tensor the source does not hold, at its module's initial value: a norm's scale, ones."""
    if len(shape) != 1 or not name.endswith(".weight"):
        raise ModelLayoutError(f"the model lacks {name}, which INT8 Studio cannot fill in")

    def build(_: list[torch.Tensor]) -> torch.Tensor:
        import torch

        return torch.ones(shape, dtype=torch_dtypes()[dtype])

    return OutputTensor(name, dtype, tuple(shape), (), build)


# --- architecture and layout -------------------------------------------------------------------


def _architecture(
    names: Mapping[str, object], config: Mapping[str, Any] | None, all_names: list[str]
) -> tuple[Architecture, str]:
    class_name = (config or {}).get("_class_name")
    if class_name:
        for arch in REGISTRY.values():
            if arch.diffusers_class == class_name:
                return arch, "diffusers"
        raise UnknownModelError(
            f"not a supported diffusion model: diffusers class {class_name!r}; supported: {supported_text()}"
        )
    for arch in REGISTRY.values():
        if all(n in names for n in arch.signature):
            return arch, "single-file"
        if arch.diffusers_signature and all(n in names for n in arch.diffusers_signature):
            return arch, "diffusers"
    raise UnknownModelError(describe_unknown(all_names))


def describe_unknown(names: list[str]) -> str:
    """The error message for tensors that match no architecture: what was found, what is supported."""
    if not names:
        return f"not a supported diffusion model: the file holds no tensors; supported: {supported_text()}"
    kind = _looks_like(names)
    found = f"{len(names)} tensors, e.g. {', '.join(repr(n) for n in _examples(names))}"
    what = f"it looks like {kind} ({found})" if kind else f"found {found}"
    return f"not a supported diffusion model: {what}; supported: {supported_text()}"


def _looks_like(names: list[str]) -> str | None:
    if any(marker in n for n in names for marker in ("lora_", "lokr_", "hada_")):
        return "a LoRA"
    if any(n.endswith(("shared.weight", "embed_tokens.weight", "token_embedding.weight")) for n in names):
        return "a text encoder"
    if any(
        n.startswith(("encoder.", "decoder.", "first_stage_model.", "vae.")) and "conv" in n for n in names
    ):
        return "a VAE"
    return None


def _examples(names: list[str], count: int = 3) -> list[str]:
    """The first name of each of the first ``count`` top-level modules (not three names of block 0)."""
    firsts: dict[str, str] = {}
    for name in sorted(names, key=natural_key):
        firsts.setdefault(name.split(".")[0], name)
    return list(firsts.values())[:count]


# --- weight formats ----------------------------------------------------------------------------


def _quantized_layers(own: Mapping[str, TensorHeader]) -> dict[str, tuple[str, str | None]]:
    """Layer → (format, name of its scale tensor) for fp8 and int8 weights."""
    layers: dict[str, tuple[str, str | None]] = {}
    for name, header in own.items():
        if not name.endswith(".weight") or header.dtype not in (*FP8_DTYPES, "I8"):
            continue
        layer = name.removesuffix(".weight")
        scale = next((f"{layer}.{s}" for s in FP8_SCALES if f"{layer}.{s}" in own), None)
        kind = "fp8" if header.dtype in FP8_DTYPES else "int8"
        if scale is None:
            if kind == "int8":
                raise ModelLayoutError(
                    f"int8 weight {name!r} has no {layer}.weight_scale: the file is incomplete"
                )
            layers[layer] = ("fp8", None)
            continue
        scale_shape, rows = own[scale].shape, header.shape[0]
        if math.prod(scale_shape) == 1:
            granularity = "tensorwise"
        elif scale_shape in ((rows,), (rows, 1)):
            granularity = "rowwise"
        else:
            raise ModelLayoutError(
                f"{scale!r} has shape {list(scale_shape)} for a weight of shape {list(header.shape)}: "
                "only tensor-wise and row-wise scales are supported"
            )
        layers[layer] = ("fp8_scaled" if kind == "fp8" else f"int8_{granularity}", scale)
    return layers


def _source_format(own: Mapping[str, TensorHeader], layers: Mapping[str, tuple[str, str | None]]) -> str:
    quantized = {fmt for fmt, _ in layers.values()}
    floats = {
        FLOAT_FORMATS[h.dtype]
        for n, h in own.items()
        if n.endswith(".weight") and len(h.shape) == 2 and h.dtype in FLOAT_FORMATS
    }
    formats = quantized or floats
    return formats.pop() if len(formats) == 1 else "mixed"


def _only(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0]


def _dequantize_fp8(tensors: list[torch.Tensor]) -> torch.Tensor:
    weight = tensors[0].float()
    if len(tensors) > 1:
        scale = tensors[1].float()
        weight = weight * (scale.reshape(()) if scale.numel() == 1 else scale.reshape(-1, 1))
    return weight.to(torch_dtypes()[DEQUANTIZED_DTYPE])


def _source_tensors(
    own: Mapping[str, TensorHeader], prefix: str, layers: Mapping[str, tuple[str, str | None]]
) -> list[OutputTensor]:
    """The source's tensors in its own names, fp8 weights dequantized and their scales dropped."""
    fp8 = {layer: scale for layer, (fmt, scale) in layers.items() if fmt.startswith("fp8")}
    dropped = {SCALED_FP8_MARKER} | {f"{layer}.{aux}" for layer in fp8 for aux in FP8_AUXILIARY}
    plan = []
    for name, header in own.items():
        if name in dropped:
            continue
        layer = name.removesuffix(".weight")
        if layer in fp8 and name.endswith(".weight"):
            scale = fp8[layer]
            sources = (prefix + name,) + ((prefix + scale,) if scale else ())
            plan.append(OutputTensor(name, DEQUANTIZED_DTYPE, tuple(header.shape), sources, _dequantize_fp8))
        else:
            plan.append(
                OutputTensor(name, header.dtype, tuple(header.shape), (prefix + name,), _only)
            )
    return plan


def _quantizable(arch: Architecture, t: OutputTensor) -> bool:
    return t.dtype_name in FLOAT_DTYPES and not arch.keeps_high_precision(t.name, t.shape)


# --- diffusers → single-file -------------------------------------------------------------------


def _from_diffusers(arch: Architecture, source: list[OutputTensor]) -> list[OutputTensor]:
    groups: dict[str, tuple[Rule, dict[int, OutputTensor]]] = {}
    for t in source:
        found = arch.match_diffusers(t.name)
        if found is None:
            raise ModelLayoutError(
                f"diffusers tensor {t.name!r} has no counterpart in the {arch.label} single-file layout: "
                "this variant is not supported"
            )
        rule, single, index = found
        groups.setdefault(single, (rule, {}))[1][index] = t
    return [_combine(single, *groups[single]) for single in sorted(groups, key=natural_key)]


def _combine(name: str, rule: Rule, parts: dict[int, OutputTensor]) -> OutputTensor:
    fields = rule.match_single(name) or {}
    missing = [t.format(**fields) for k, t in enumerate(rule.diffusers) if k not in parts]
    if missing:
        raise ModelLayoutError(
            f"diffusers tensor {missing[0]!r} is missing (it is part of {name!r}): the model is incomplete"
        )
    ordered = [parts[k] for k in range(len(rule.diffusers))]
    if len({(p.dtype_name, p.shape[1:]) for p in ordered}) > 1:
        found = ", ".join(f"{p.name} {DTYPES[p.dtype_name][0]} {list(p.shape)}" for p in ordered)
        raise ModelLayoutError(f"the parts of {name!r} do not fit together: {found}")
    if len(ordered) == 1 and not rule.swap:
        return replace(ordered[0], name=name)
    bounds = [0]
    for part in ordered:
        bounds.append(bounds[-1] + len(part.sources))

    def build(tensors: list[torch.Tensor]) -> torch.Tensor:
        return rule.assemble([p.build(tensors[a:b]) for p, a, b in zip(ordered, bounds, bounds[1:])])

    return OutputTensor(
        name=name,
        dtype_name=ordered[0].dtype_name,
        shape=rule.assembled_shape([p.shape for p in ordered]),
        sources=tuple(s for p in ordered for s in p.sources),
        build=build,
    )

"""Which model tensor (and which of its rows) each LoRA layer adapts.

A stem is stripped of its family's prefix, giving a single-file name (``double_blocks.0.img_attn.qkv``)
or a diffusers name (``transformer_blocks.0.attn.to_q``); kohya's underscored names
(``double_blocks_0_img_attn_qkv``) are looked up among the model's real names in both layouts, which
resolves the ambiguous underscores. Diffusers names go through the architecture's :class:`Rule`
table, so a LoRA on ``to_q`` lands on rows ``[0:h]`` of the fused ``qkv`` and one on Flux.2's
``to_qkv_mlp_proj`` on all of ``linear1``: there is no second mapping to keep in sync.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

from engine.lora.files import LoraError, LoraFile, LoraLayer, Shape
from engine.models import REGISTRY, Architecture, DetectedModel
from engine.models.spec import Config, natural_key

# Prefix → naming family. Dotted prefixes keep the model's names; underscored ones replace dots.
DOTTED = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.", "unet.")
UNDERSCORED = {"lora_unet_": "kohya", "lora_transformer_": "kohya (OneTrainer)", "lycoris_": "LyCORIS"}
TEXT_ENCODER = (
    "lora_te",
    "text_encoder",
    "text_encoders.",
    "te1.",
    "te2.",
    "conditioner.",
    "cond_stage_model.",
)


@dataclass(frozen=True)
class Segment:
    """Rows ``[src, src + length)`` of a LoRA delta go to rows ``[dst, dst + length)`` of the target."""

    src: int
    dst: int
    length: int


@dataclass(frozen=True)
class Patch:
    """One LoRA layer applied to one model tensor (``part`` "weight" or "bias") at ``segments``."""

    layer: LoraLayer
    target: str  # single-file tensor name without prefix
    part: str
    segments: tuple[Segment, ...]

    @property
    def whole(self) -> bool:
        return len(self.segments) == 1 and self.segments[0].src == self.segments[0].dst == 0


@dataclass(frozen=True)
class LoraMatch:
    """How one LoRA file maps onto one model: the patches and what found no layer."""

    lora: LoraFile
    naming: str  # "kohya", "ComfyUI", "diffusers/PEFT", "ai-toolkit", …
    patches: tuple[Patch, ...]
    unmatched: tuple[str, ...]  # keys of layers the model does not have, and stray keys
    text_encoder: tuple[str, ...]  # keys of text-encoder layers (not part of a diffusion model)

    @property
    def matched_keys(self) -> int:
        layers = {p.layer.stem: p.layer for p in self.patches}
        return sum(len(layer.keys) for layer in layers.values())

    @property
    def format(self) -> str:
        return f"{self.naming} {self.lora.kinds}"

    @property
    def layers(self) -> int:
        return len({p.target for p in self.patches})


class ModelNames:
    """Every name a LoRA may use for the tensors of one model (``shapes``: single-file, no prefix)."""

    def __init__(self, arch: Architecture, config: Config, shapes: Mapping[str, Shape], label: str) -> None:
        self.arch, self.config, self.shapes, self.label = arch, config, shapes, label
        diffusers = arch.diffusers_shapes(config)
        layers = [n.removesuffix(".weight") for n in (*shapes, *diffusers) if n.endswith(".weight")]
        self.underscored = {layer.replace(".", "_"): layer for layer in layers}

    @classmethod
    def of(cls, model: DetectedModel) -> ModelNames:
        return cls(model.arch, model.config, {t.name: t.shape for t in model.tensors}, model.label)

    def resolve(self, stem: str) -> tuple[str, str] | None:
        """``(naming family, dotted name)`` of a stem, or None when no prefix rule gives a known name."""
        for prefix, naming in UNDERSCORED.items():
            if stem.startswith(prefix):
                name = self.underscored.get(stem[len(prefix) :])
                return (naming, name) if name else None
        prefix = next((p for p in DOTTED if stem.startswith(p)), "")
        name = stem[len(prefix) :]
        single = f"{name}.weight" in self.shapes or f"{name}.bias" in self.shapes
        if prefix in ("diffusion_model.", "model.diffusion_model."):
            return ("ComfyUI" if single else "ai-toolkit"), name
        return ("ComfyUI" if single and not prefix else "diffusers/PEFT"), name

    def target(self, name: str, part: str) -> tuple[str, tuple[Segment, ...]] | None:
        """The single-file tensor and rows that layer ``name`` (either layout) ``.part`` is."""
        single = f"{name}.{part}"
        if single in self.shapes:
            return single, (Segment(0, 0, self.shapes[single][0]),)
        found = self.arch.match_diffusers(single)
        if found is None or found[1] not in self.shapes:
            return None
        fused = found[1]
        rows, offset, segments = self.shapes[fused][0], 0, []
        for piece in self.arch.diffusers_pieces(fused, self.config):
            span = range(rows)[piece.rows]
            if piece.name == single:
                segments.append(Segment(span.start, offset, len(span)))
            offset += len(span)
        return fused, tuple(sorted(segments, key=lambda s: s.src))


def fits(patch: Patch, shapes: Mapping[str, Shape]) -> bool:
    """Whether the LoRA layer's delta has the shape of the rows it patches."""
    return patch_shape(patch) == target_shape(patch, shapes)


def patch_shape(patch: Patch) -> Shape:
    """The shape of the delta the LoRA layer makes for ``patch.part``."""
    return patch.layer.bias_shape if patch.part == "bias" else patch.layer.shape


def target_shape(patch: Patch, shapes: Mapping[str, Shape]) -> Shape:
    """The shape of the rows of the model tensor that ``patch`` changes."""
    return (sum(s.length for s in patch.segments), *shapes[patch.target][1:])


def match(lora: LoraFile, names: ModelNames) -> LoraMatch:
    """The patches of every layer whose name resolves (shapes unchecked), and what found no layer."""
    patches, naming, unmatched, text_encoder = [], Counter(), list(lora.stray), []
    for stem, layer in lora.layers.items():
        if stem.startswith(TEXT_ENCODER):
            text_encoder += layer.keys.values()
            continue
        resolved = names.resolve(stem)
        parts = [
            p for p in ("weight", "bias") if (p == "weight" and layer.kind) or (p == "bias" and layer.bias)
        ]
        targets = [names.target(resolved[1], p) if resolved else None for p in parts]
        if not all(targets):
            unmatched += layer.keys.values()
            continue
        naming[resolved[0]] += 1
        patches += [Patch(layer, t[0], p, t[1]) for p, t in zip(parts, targets)]
    family = naming.most_common(1)[0][0] if naming else ""
    return LoraMatch(lora, family, tuple(patches), tuple(unmatched), tuple(text_encoder))


def match_model(lora: LoraFile, model: DetectedModel) -> LoraMatch:
    """Map ``lora`` onto ``model``.

    Raises :class:`LoraError` when the LoRA is for another architecture (nothing matches, or what
    matches does not fit and another architecture fits better, or most layers find nothing) or when
    a matched layer has another shape (another variant or size).
    """
    names = ModelNames.of(model)
    result = match(lora, names)
    patches = result.patches
    wrong = [p for p in patches if not fits(p, names.shapes)]
    doubtful = not patches or wrong or len(result.unmatched) > result.matched_keys
    guess = guess_target(lora) if doubtful else None
    if not patches or (guess and guess.arch is not model.arch):
        raise LoraError(_not_for_this_model(lora, names, guess))
    if wrong:
        p = wrong[0]
        raise LoraError(
            f"{lora.name} does not fit this {model.label} model: its layer '{p.layer.stem}' changes a "
            f"{list(patch_shape(p))} {p.part} but '{p.target}' needs {list(target_shape(p, names.shapes))}"
            + (f"; it looks like a {guess} LoRA" if guess else "")
        )
    return result


def _not_for_this_model(lora: LoraFile, names: ModelNames, guess: Guess | None) -> str:
    stems = [s for s in lora.layers if not s.startswith(TEXT_ENCODER)]
    if not stems:
        layers = len(lora.layers)
        return f"{lora.name} only adapts a text encoder ({layers} layers), not a {names.arch.label} model"
    looks = (
        f"it looks like a {guess} LoRA" if guess else "its names match none of the supported architectures"
    )
    return f"{lora.name} is not for this {names.label} model: {looks} (e.g. '{min(stems, key=natural_key)}')"


@dataclass(frozen=True)
class Guess:
    """The architecture a LoRA was trained for, and the variant when its shapes say which."""

    arch: Architecture
    variant: str | None

    def __str__(self) -> str:
        return f"{self.arch.label} {self.variant}" if self.variant else self.arch.label


@functools.cache
def _variant_names(arch_name: str, variant: str) -> ModelNames:
    arch = REGISTRY[arch_name]
    config = {**arch.tiny, **arch.variants}[variant]
    return ModelNames(arch, config, arch.tensor_shapes(config), f"{arch.label} {variant}")


def variant_names(guess: Guess) -> ModelNames:
    """The names of the guessed variant (the first released one when the shapes fit none)."""
    return _variant_names(guess.arch.name, guess.variant or next(iter(guess.arch.variants)))


def guess_target(lora: LoraFile) -> Guess | None:
    """Which architecture (and variant) the LoRA was trained for; None when no name resolves anywhere.

    Tries every registered architecture's released and tiny configs: the one where most layers
    resolve and fit wins; when no shapes fit anywhere, the one where most names resolve.
    """
    best, score = None, (0, 0)
    for arch in REGISTRY.values():
        for variant in (*arch.variants, *arch.tiny):
            names = _variant_names(arch.name, variant)
            patches = match(lora, names).patches
            fitting = sum(fits(p, names.shapes) for p in patches)
            if (fitting, len(patches)) > score:
                best, score = Guess(arch, variant if fitting else None), (fitting, len(patches))
    return best

"""What every architecture declares: its key layouts, how to read its config from shapes, and which
layers stay in high precision.

Names are always the single-file (ComfyUI/BFL) names without a prefix. The diffusers layout is
described by :class:`Rule` s, one per single-file tensor family, so the same table serves conversion
(diffusers → single-file), LoRA key mapping and loading diffusers weights into our own modules.

Plain Python: detection needs no torch. Each family's runnable ``nn.Module`` lives in its own
``<family>_module.py``, imported by :meth:`Architecture.build_module` when a model is built.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING

from engine.jobs import JobError

if TYPE_CHECKING:
    import torch
    from torch import nn

Shape = tuple[int, ...]
Config = Mapping[str, int | bool]

# A weight with a dimension below this stays in high precision (a [out, 1] or [1, in] projection
# gains nothing from int8). No absolute element count is used, so tiny demo models still quantize.
MIN_QUANT_DIM = 16

_PLACEHOLDERS = {"i": r"(?P<i>\d+)", "p": r"(?P<p>weight|bias)", "name": r"(?P<name>.+)"}


def natural_key(name: str) -> list[int | str]:
    """Sort key that puts ``blocks.2`` before ``blocks.10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _compile(template: str) -> re.Pattern[str]:
    parts = re.split(r"\{(i|p|name)\}", template)
    pattern = "".join(_PLACEHOLDERS[part] if n % 2 else re.escape(part) for n, part in enumerate(parts))
    return re.compile(pattern)


@dataclass(frozen=True)
class Piece:
    """``rows`` of the diffusers tensor ``name``; a single-file tensor is its pieces concatenated."""

    name: str
    rows: slice


class NoModuleError(JobError):
    """The model is recognised but the engine cannot run it (no nn.Module for its family yet)."""


class Rule:
    """How one family of single-file tensors maps onto diffusers tensors.

    Templates may hold ``{i}`` (a block index), ``{p}`` (``weight`` or ``bias``) and ``{name}`` (any
    name: identical layouts). Three kinds, by construction:

    - rename: ``Rule("img_in.{p}", "x_embedder.{p}")``;
    - concatenation: ``Rule("…qkv.{p}", ("…to_q.{p}", "…to_k.{p}", "…to_v.{p}"), rows=…)`` where
      ``rows(config)`` gives each part's row count (needed only to split, never to fuse);
    - half swap: ``Rule("final_layer.adaLN_modulation.1.{p}", "norm_out.linear.{p}", swap=True)``:
      single-file rows are (shift, scale), diffusers rows (scale, shift); each half has
      ``config["hidden"]`` rows.
    """

    def __init__(
        self,
        single: str,
        diffusers: str | tuple[str, ...],
        *,
        rows: Callable[[Config], tuple[int, ...]] | None = None,
        swap: bool = False,
    ) -> None:
        self.single = single
        self.diffusers = (diffusers,) if isinstance(diffusers, str) else diffusers
        if len(self.diffusers) > 1 and rows is None:
            raise ValueError(f"rule for {single!r} concatenates: it needs rows(config)")
        self.rows = rows
        self.swap = swap
        self._single_re = _compile(single)
        self._diffusers_re = tuple(_compile(t) for t in self.diffusers)

    def match_single(self, name: str) -> dict[str, str] | None:
        m = self._single_re.fullmatch(name)
        return m.groupdict() if m else None

    def match_diffusers(self, name: str) -> tuple[int, dict[str, str]] | None:
        """``(part index, placeholders)`` if ``name`` is one of this rule's diffusers tensors."""
        for index, pattern in enumerate(self._diffusers_re):
            m = pattern.fullmatch(name)
            if m:
                return index, m.groupdict()
        return None

    def pieces(self, fields: dict[str, str], config: Config) -> tuple[Piece, ...]:
        """The pieces of the single-file tensor whose placeholders are ``fields``."""
        names = [t.format(**fields) for t in self.diffusers]
        if self.swap:
            half = int(config["hidden"])
            return (Piece(names[0], slice(half, 2 * half)), Piece(names[0], slice(0, half)))
        if self.rows is None:
            return (Piece(names[0], slice(None)),)
        return tuple(Piece(n, slice(0, r)) for n, r in zip(names, self.rows(config), strict=True))

    def assemble(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """The single-file tensor from this rule's diffusers tensors, in template order."""
        import torch

        if self.swap:
            scale, shift = parts[0].chunk(2, dim=0)
            return torch.cat([shift, scale])
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def assembled_shape(self, shapes: list[Shape]) -> Shape:
        if len(shapes) == 1:
            return shapes[0]
        return (sum(s[0] for s in shapes), *shapes[0][1:])


def linear(name: str, out: int, inp: int, bias: bool = True) -> dict[str, Shape]:
    """Shapes of a linear layer's tensors: ``name.weight`` [out, in] and ``name.bias`` [out]."""
    return {f"{name}.weight": (out, inp), **({f"{name}.bias": (out,)} if bias else {})}


def block_count(names: Iterable[str], prefix: str) -> int:
    """Number of blocks ``prefix.N.…`` (highest index + 1; 0 when there are none)."""
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    found = [int(m.group(1)) for n in names if (m := pattern.match(n))]
    return max(found) + 1 if found else 0


class Architecture:
    """One model family. Subclasses fill in the class attributes and the two shape methods.

    - ``signature``: single-file names that only this family has (detection; diffusers names are
      derived through ``rules``).
    - ``variants``: known released configs by name; ``depth_keys`` are the config keys that count
      blocks (a file with the right widths but other block counts is reported as such).
    - ``tiny``: small configs with the real layout, for the demo model and tests.
    - ``high_precision``: glob patterns (``fnmatch``) of names never quantized.
    - ``down_projections``: glob patterns of the linear weights whose input is a GELU/SiLU(-gated)
      activation: the most heavy-tailed inputs, where a Hadamard rotation cuts the int8 error most.
    - ``first_blocks``: glob patterns of the first block of each stack of repeated blocks, which a
      cautious conversion keeps in high precision too (the app's "first block of each stack" preset).
    - ``model_names``: names a user can give instead of a file (``flux2-klein-9b``) → their variant,
      built with random weights (benchmarks without a download).
    """

    name: str
    label: str
    diffusers_class: str
    signature: tuple[str, ...]
    variants: dict[str, Config]
    depth_keys: tuple[str, ...]
    tiny: dict[str, Config]
    high_precision: tuple[str, ...]
    down_projections: tuple[str, ...] = ()
    first_blocks: tuple[str, ...] = ()
    model_names: dict[str, str] = {}
    rules: tuple[Rule, ...]

    def config_from_shapes(self, shapes: Mapping[str, Shape]) -> dict[str, int | bool]:
        """The config read off single-file shapes (every key of ``variants`` configs)."""
        raise NotImplementedError

    def tensor_shapes(self, config: Config) -> dict[str, Shape]:
        """Every single-file tensor of a model with ``config``, name → shape, in module order."""
        raise NotImplementedError

    def diffusers_markers(self, diffusers_config: Mapping[str, object]) -> tuple[str, ...]:
        """Empty single-file tensors standing for what a diffusers model says in its config.json rather
        than in its weights (ComfyUI reads such a marker where diffusers reads the config)."""
        return ()

    def build_module(self, config: Config) -> nn.Module:
        """The runnable transformer of ``config`` (parameter names = :meth:`tensor_shapes` names),
        built on the current default device: under ``torch.device("meta")`` it allocates nothing."""
        runnable = ", ".join(a.label for a in REGISTRY.values() if a.runnable)
        raise NoModuleError(
            f"{self.label} models cannot be run by INT8 Studio's engine (models that can: {runnable}); "
            "they run in ComfyUI with INT8 Studio's node pack"
        )

    @property
    def runnable(self) -> bool:
        return type(self).build_module is not Architecture.build_module

    # --- detection -------------------------------------------------------------------------------

    @property
    def diffusers_signature(self) -> tuple[str, ...]:
        """The signature's diffusers names; empty for a family without a diffusers layout."""
        names = [self.diffusers_names(n) for n in self.signature]
        return tuple(n[0] for n in names) if all(names) else ()

    def variant_of(self, config: Config) -> str:
        """The released variant with this config; "custom" for sizes no release has."""
        for name, known in self.variants.items():
            if all(config.get(k) == v for k, v in known.items() if k not in self.depth_keys):
                if all(config.get(k) == known[k] for k in self.depth_keys):
                    return name
                blocks = ", ".join(f"{config[k]} {k.replace('_', ' ')}" for k in self.depth_keys)
                return f"{name} with {blocks}"
        return "custom"

    def keeps_high_precision(self, name: str, shape: Shape) -> bool:
        """True for tensors that are never quantized: all but large 2-D linear weights in blocks."""
        if not name.endswith(".weight") or len(shape) != 2 or min(shape) < MIN_QUANT_DIM:
            return True
        return any(fnmatchcase(name, pattern) for pattern in self.high_precision)

    # --- key layouts -----------------------------------------------------------------------------

    def _rule_for(self, name: str) -> tuple[Rule, dict[str, str]] | None:
        for rule in self.rules:
            fields = rule.match_single(name)
            if fields is not None:
                return rule, fields
        return None

    def diffusers_names(self, name: str) -> tuple[str, ...]:
        """The diffusers tensors that single-file tensor ``name`` is made of (empty: none)."""
        found = self._rule_for(name)
        return tuple(t.format(**found[1]) for t in found[0].diffusers) if found else ()

    def diffusers_pieces(self, name: str, config: Config) -> tuple[Piece, ...]:
        """The diffusers tensors (and their rows) whose concatenation is single-file tensor ``name``.

        Empty when the diffusers layout has no counterpart (e.g. Z-Image's unused ``norm_final``).
        ``config`` is needed only for concatenations and half swaps (row counts).
        """
        found = self._rule_for(name)
        return found[0].pieces(found[1], config) if found else ()

    def match_diffusers(self, name: str) -> tuple[Rule, str, int] | None:
        """``(rule, single-file name, part index)`` for diffusers tensor ``name``; None if unmapped."""
        for rule in self.rules:
            found = rule.match_diffusers(name)
            if found is not None:
                index, fields = found
                return rule, rule.single.format(**fields), index
        return None

    def single_file_name(self, diffusers_name: str) -> str | None:
        found = self.match_diffusers(diffusers_name)
        return found[1] if found else None

    def diffusers_shapes(self, config: Config) -> dict[str, Shape]:
        """Every diffusers tensor of a model with ``config``, name → shape."""
        shapes: dict[str, Shape] = {}
        for name, shape in self.tensor_shapes(config).items():
            for piece in self.diffusers_pieces(name, config):
                rows = shape[0] if piece.rows.stop is None else piece.rows.stop
                shapes[piece.name] = (max(rows, shapes.get(piece.name, (0,))[0]), *shape[1:])
        return shapes

    def __repr__(self) -> str:
        return f"<Architecture {self.name}>"


REGISTRY: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    if arch.name in REGISTRY:
        raise ValueError(f"architecture {arch.name!r} is registered twice")
    REGISTRY[arch.name] = arch
    return arch


def supported_text() -> str:
    """ "Flux.2 (Klein 4B, Klein 9B, dev), Chroma (Chroma1-HD), …" for error messages."""
    return ", ".join(f"{a.label} ({', '.join(a.variants)})" for a in REGISTRY.values())

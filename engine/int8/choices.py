"""The words a user chooses int8 weights by (scale schemes, rotation policies) and attention by, and their
defaults.

Plain Python, no torch: ``convert --help`` and ``bench --help`` list them without loading the
quantizer (benchmarks/startup.py). :mod:`engine.int8.quantize` and :mod:`engine.int8.rotation` do what
each word names.
"""

from __future__ import annotations

from typing import Literal

Scheme = Literal["tensorwise", "rowwise"]
SCHEMES: tuple[Scheme, ...] = ("tensorwise", "rowwise")
"""One scale per weight, or one per output row."""
DEFAULT_SCHEME: Scheme = "rowwise"
"""Every face's default: row scales give a lower int8 error than one scale per weight on every model
measured (docs/PERFORMANCE.md, "Errors"), for a few KB of scales per layer."""

RotationPolicy = Literal["none", "down", "all"]
ROTATION_POLICIES: tuple[RotationPolicy, ...] = ("none", "down", "all")
"""Which int8 layers a conversion rotates: none, the down-projections (inputs after GELU/SiLU, see
``Architecture.down_projections``) or all (each only where the group divides its input width)."""

AttentionChoice = Literal["bf16", "int8"]
ATTENTIONS: tuple[AttentionChoice, ...] = ("bf16", "int8")
"""How a model's attention runs: SDPA in the model's dtype, or 8-bit (``engine.int8.attention``)."""
DEFAULT_ATTENTION: AttentionChoice = "bf16"
"""Off by default until int8 attention's quality on each model's output is measured and documented: the
kernel alone has 1.2–1.4 % attention error (docs/PERFORMANCE.md)."""
ATTENTION_HELP = (
    "attention in bf16 (SDPA) or int8 (8-bit Q·Kᵀ, faster on a GPU); default bf16: int8 attention's "
    "quality per model is not yet measured (the kernel alone: 1.2–1.4 percent attention error)"
)

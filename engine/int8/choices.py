"""The words a user chooses int8 weights by: scale schemes and rotation policies, and their defaults.

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

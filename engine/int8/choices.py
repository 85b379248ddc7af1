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
"""For every model: int8 attention's quality qualifies on all five runnable families (alone it costs at most
about a third of the int8 linears' output error, random weights), but on an H100 it is slower than SDPA on
cuDNN (docs/PERFORMANCE.md "8-bit attention against SDPA"): an error for no speed-up."""
ATTENTION_HELP = (
    "attention in bf16 (SDPA) or int8 (8-bit Q·Kᵀ); default bf16: int8's output error is small next to the "
    "int8 linears' (random weights), but on an H100 it runs slower than bf16 SDPA"
)

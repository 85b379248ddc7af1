"""Supported diffusion-transformer architectures: detection, key layouts, high-precision layers.

Each architecture lives in its own module and registers itself on import; the import order below is
the detection order. See docs/DESIGN.md ("Models") for the contract.
"""

from engine.models.spec import REGISTRY, Architecture, Piece, Rule, supported_text  # noqa: I001
from engine.models import flux2, chroma, zimage, flux1, qwen_image, wan, ltx2  # noqa: F401  (registration)
from engine.models import krea2, ernie, hidream_o1, anima  # noqa: F401  (registration)
from engine.models.detect import (
    DetectedModel,
    ModelLayoutError,
    OutputTensor,
    UnknownModelError,
    describe_unknown,
    detect,
    detect_tensors,
)

__all__ = [
    "REGISTRY",
    "Architecture",
    "DetectedModel",
    "ModelLayoutError",
    "OutputTensor",
    "Piece",
    "Rule",
    "UnknownModelError",
    "describe_unknown",
    "detect",
    "detect_tensors",
    "supported_text",
]

"""LoRAs: reading every published layout, mapping onto a model, merging into int8 or float weights.

- :mod:`engine.lora.files`: a LoRA file's layers (kohya, ComfyUI, diffusers/PEFT, ai-toolkit,
  LyCORIS LoHa/LoKr, full diff, DoRA), checked from headers.
- :mod:`engine.lora.mapping`: which model tensor and rows each layer patches, through the
  architecture's key-layout rules; the match report; which architecture a LoRA is for.
- :mod:`engine.lora.delta`: the float32 change a layer makes.
- :mod:`engine.lora.merge`: stacking, requant and stochastic int8 merging.
- :mod:`engine.lora.job`: ``run_lora_merge``, streaming the merged model to disk.
- :mod:`engine.lora.dynamic`: LoRAs applied at run time, strengths changeable without recompiling.
- :mod:`engine.lora.info`: ``inspect_lora``, what a file is and what it covers.
"""

from engine.lora.files import (
    STRENGTH_LIMIT,
    LoraError,
    LoraFile,
    LoraLayer,
    check_strength,
)
from engine.lora.info import LoraInfo, inspect_lora
from engine.lora.job import LoraMergeRequest, LoraMergeResult, LoraSpec, run_lora_merge
from engine.lora.mapping import (
    Guess,
    LoraMatch,
    Patch,
    Segment,
    guess_target,
    match_model,
)
from engine.lora.merge import MODES, LayerStats, MergeStats, Mode

__all__ = [
    "MODES",
    "STRENGTH_LIMIT",
    "Guess",
    "LayerStats",
    "LoraError",
    "LoraFile",
    "LoraInfo",
    "LoraLayer",
    "LoraMatch",
    "LoraMergeRequest",
    "LoraMergeResult",
    "LoraSpec",
    "MergeStats",
    "Mode",
    "Patch",
    "Segment",
    "check_strength",
    "guess_target",
    "inspect_lora",
    "match_model",
    "run_lora_merge",
]

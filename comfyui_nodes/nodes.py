"""The nodes, as ComfyUI sees them (``INPUT_TYPES``, ``RETURN_TYPES``, ``FUNCTION`` …). Thin: they
call :mod:`comfyui_nodes.loader`, which calls ComfyUI and the engine."""

from __future__ import annotations

from engine.int8.choices import ATTENTIONS, DEFAULT_ATTENTION, ROTATION_POLICIES, SCHEMES

from . import convert_cache
from .loader import load_diffusion_model
from .lora import NODE_CLASS_MAPPINGS as LORA_NODES
from .lora import NODE_DISPLAY_NAME_MAPPINGS as LORA_NAMES


class LoadDiffusionModelInt8:
    """ComfyUI's "Load Diffusion Model" for INT8 files, their int8 layers on INT8 Studio's kernels."""

    DESCRIPTION = (
        "Loads an INT8 diffusion model (a file converted by INT8 Studio, or a ComfyUI int8 file) with "
        "ComfyUI's own model code and runs its int8 layers on INT8 Studio's kernels: int8 activations "
        "per token, one GEMM with the dequantization fused into it. Row-wise, tensor-wise and "
        "Hadamard-rotated (convrot) layers are read from the file; the other layers stay ComfyUI's. "
        "A bf16, fp16 or fp8 file is converted to INT8 the first time (as `int8-studio convert` does) "
        "and the conversion is kept in INT8 Studio's cache for the next loads."
    )
    CATEGORY = "model/loaders"
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The diffusion model, for a sampler or a model patch node.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths

        return {
            "required": {
                "unet_name": (
                    folder_paths.get_filename_list("diffusion_models"),
                    {
                        "tooltip": "An INT8 diffusion model from your diffusion_models folder: a file "
                        "`int8-studio convert` or INT8 Studio's Convert page made (Flux.2 Klein, Chroma, "
                        "Z-Image), or a ComfyUI int8 (int8_tensorwise) file.",
                    },
                ),
                "scheme": (
                    list(SCHEMES),
                    {
                        "default": convert_cache.DEFAULT_SCHEME,
                        "tooltip": "For a bf16/fp16/fp8 file, converted on load: one int8 scale per weight "
                        "(tensorwise) or one per output row (rowwise, a little more accurate). INT8 files "
                        "keep the scheme they were made with.",
                    },
                ),
                "rotation": (
                    list(ROTATION_POLICIES),
                    {
                        "default": convert_cache.DEFAULT_ROTATE,
                        "tooltip": "For a bf16/fp16/fp8 file, converted on load: which int8 layers are "
                        "Hadamard-rotated (none; down: the down-projections, whose inputs have outliers; "
                        "all). Rotation lowers the int8 error at a small cost in speed.",
                    },
                ),
                "attention": (
                    list(ATTENTIONS),
                    {
                        "default": DEFAULT_ATTENTION,
                        "tooltip": "bf16: ComfyUI's own attention. int8: 8-bit Q·Kᵀ (INT8 Studio's kernel) "
                        "where a layer's head size is 64 or 128, no mask. Off by default: its output error "
                        "is small next to the int8 linears' (random weights), its speed on a GPU is not "
                        "measured yet.",
                    },
                ),
                "cache_limit_gb": (
                    "FLOAT",
                    {
                        "default": convert_cache.DEFAULT_LIMIT_GB,
                        "min": 0.0,
                        "max": 10000.0,
                        "step": 1.0,
                        "tooltip": "The most disk space INT8 Studio's cache of converted models may use "
                        "(least recently used conversions are deleted first; the one in use stays).",
                    },
                ),
            }
        }

    def load(self, unet_name, scheme=convert_cache.DEFAULT_SCHEME, rotation=convert_cache.DEFAULT_ROTATE,
             cache_limit_gb=convert_cache.DEFAULT_LIMIT_GB, attention=DEFAULT_ATTENTION):  # fmt: skip
        import comfy.utils
        import folder_paths

        path = folder_paths.get_full_path_or_raise("diffusion_models", unet_name)
        bar = None

        def progress(done, total):
            nonlocal bar
            bar = bar or comfy.utils.ProgressBar(1000)
            bar.update_absolute(int(1000 * done / total) if total else 0, 1000)

        resolved = convert_cache.int8_file(
            path, scheme, rotation, cache_limit_gb, progress
        )
        return (load_diffusion_model(resolved.path, attention=attention),)


NODE_CLASS_MAPPINGS = {
    "Int8StudioLoadDiffusionModel": LoadDiffusionModelInt8,
    **LORA_NODES,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "Int8StudioLoadDiffusionModel": "Load Diffusion Model (INT8 Studio)",
    **LORA_NAMES,
}

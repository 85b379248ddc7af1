"""The nodes, as ComfyUI sees them (``INPUT_TYPES``, ``RETURN_TYPES``, ``FUNCTION`` …). Thin: they
call :mod:`comfyui_nodes.loader`, which calls ComfyUI and the engine."""

from __future__ import annotations

from .loader import load_diffusion_model


class LoadDiffusionModelInt8:
    """ComfyUI's "Load Diffusion Model" for INT8 files, their int8 layers on INT8 Studio's kernels."""

    DESCRIPTION = (
        "Loads an INT8 diffusion model (a file converted by INT8 Studio, or a ComfyUI int8 file) with "
        "ComfyUI's own model code and runs its int8 layers on INT8 Studio's kernels: int8 activations "
        "per token, one GEMM with the dequantization fused into it. Row-wise, tensor-wise and "
        "Hadamard-rotated (convrot) layers are read from the file; the other layers stay ComfyUI's."
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
            }
        }

    def load(self, unet_name):
        import folder_paths

        path = folder_paths.get_full_path_or_raise("diffusion_models", unet_name)
        return (load_diffusion_model(path),)


NODE_CLASS_MAPPINGS = {"Int8StudioLoadDiffusionModel": LoadDiffusionModelInt8}
NODE_DISPLAY_NAME_MAPPINGS = {"Int8StudioLoadDiffusionModel": "Load Diffusion Model (INT8 Studio)"}

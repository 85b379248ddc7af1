"""The node pack (comfyui_nodes/) inside ComfyUI's real code, on the CPU.

ComfyUI's own model classes, loader, sampler and model management run tiny Flux.2, Chroma and Z-Image
files of the real layouts; the node is called as ComfyUI calls it (``INPUT_TYPES``, then its
``FUNCTION``). Each int8 file runs three ways: our node, ComfyUI's own int8 path (its "Load Diffusion
Model" node on the same file) and ComfyUI on the float original. Ours must be as close to the float
output as ComfyUI's own int8 path is.

The session fixtures and helpers here (``comfy``, ``files``, ``load_ours`` …) are shared by the other
test_comfyui_*.py files, among them test_comfyui_detection.py (ComfyUI's detection of our Flux.1 and
Qwen-Image files) and test_comfyui_node_layers.py (our layers in ComfyUI's offloading, LoRA loader,
compile and attention override).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

for _package, _why in (
    ("einops", "ComfyUI's model code"),
    ("torchsde", "ComfyUI's samplers"),
    ("scipy", "ComfyUI's samplers"),
    ("sentencepiece", "ComfyUI's text encoders (imported by comfy.sd)"),
    ("transformers", "ComfyUI's text encoders (imported by comfy.sd)"),
    ("av", "ComfyUI's node API (imported by nodes.py)"),
    ("comfy_kitchen", "ComfyUI's native int8 layers (the comparison)"),
    ("comfy_aimdo", "ComfyUI's model management"),
):
    pytest.importorskip(_package, reason=f"{_package} is not installed: it is needed by {_why}")

from comfyui_env import LATENT_CHANNELS, SHARED, TINY, import_comfyui, tiny_detection, unpack
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_checkpoints import write_diffusers, write_single_file
from tiny_loras import write_lora

import comfyui_nodes
from comfyui_nodes.loader import Int8LoadError, int8_layers, load_diffusion_model
from engine.convert import ConvertRequest, run_convert
from engine.demo import random_weights
from engine.models import REGISTRY

if not (SHARED / "unpack").exists():
    pytest.skip(f"the ComfyUI test tree is missing ({SHARED})", allow_module_level=True)

NODE = "Int8StudioLoadDiffusionModel"
ARCHS = tuple(TINY)
TEXT_TOKENS = 7
ALLOWED = 1.25  # ours may be this much further from the float output than ComfyUI's own int8 path


@pytest.fixture(scope="session")
def comfy(tmp_path_factory, request):
    """ComfyUI imported from the shared tree (unpacked once into pytest's temporary folder, kept for
    later sessions), recognising the tiny models."""
    base = tmp_path_factory.getbasetemp()
    cache = base if request.config.option.basetemp else base.parent
    tree = unpack(cache / "comfyui-4f874c5e")
    comfy = import_comfyui(tree, home=tmp_path_factory.mktemp("home"))
    with tiny_detection(comfy):
        yield comfy
    comfy.mm.unload_all_models()


@pytest.fixture(scope="session")
def files(comfy, tmp_path_factory):
    """The models folder: per architecture the float original and our row-wise int8 conversion;
    for Flux.2 also tensor-wise, Hadamard-rotated, and markers only in the header."""
    folder = tmp_path_factory.mktemp("diffusion_models")
    names = {}
    for arch in ARCHS:
        generator = torch.Generator().manual_seed(len(names))
        tensors = dict(random_weights(REGISTRY[arch], TINY[arch], torch.bfloat16, generator))
        source = write_single_file(folder / f"{arch}.safetensors", arch, tensors=tensors).path
        names[arch, "float"] = source.name
        variants = [("rowwise", "none")]
        if arch == "flux2":
            variants += [("tensorwise", "none"), ("rowwise", "all")]
        for scheme, rotate in variants:
            result = run_convert(ConvertRequest(source, scheme=scheme, rotate=rotate, device="cpu"))
            names[arch, scheme if rotate == "none" else "rotated"] = result.output.name
    names["flux2", "header-markers"] = _rewritten(folder / names["flux2", "rowwise"], "header-markers")
    names["flux2", "1-d-scales"] = _rewritten(folder / names["flux2", "rowwise"], "1-d-scales")
    names["flux2", "no-markers"] = _rewritten(folder / names["flux2", "rowwise"], "no-markers")
    comfy.folder_paths.add_model_folder_path("diffusion_models", str(folder))
    return names


def _rewritten(path: Path, variant: str) -> str:
    """A copy of our row-wise int8 file as other tools write it: its layers marked only in the header's
    _quantization_metadata ("header-markers"), not marked at all ("no-markers": an int8 weight beside
    its weight_scale), or with row scales of shape [out] ("1-d-scales")."""
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
        metadata = f.metadata()
    assert json.loads(metadata["_quantization_metadata"])["layers"]
    if variant in ("header-markers", "no-markers"):
        tensors = {k: t for k, t in tensors.items() if not k.endswith(".comfy_quant")}
    if variant == "no-markers":
        metadata = {k: v for k, v in metadata.items() if k != "_quantization_metadata"}
    else:
        tensors = {k: t.flatten() if k.endswith(".weight_scale") else t for k, t in tensors.items()}
    target = path.with_name(f"{path.stem}-{variant}.safetensors")
    save_file(tensors, str(target), metadata=metadata)
    return target.name


def load_ours(comfy, name: str):
    """Our node, called as ComfyUI calls it."""
    node = comfyui_nodes.NODE_CLASS_MAPPINGS[NODE]
    choices = node.INPUT_TYPES()["required"]["unet_name"][0]
    assert name in choices
    return getattr(node(), node.FUNCTION)(unet_name=name)[0]


def load_comfy(comfy, name: str):
    """ComfyUI's own "Load Diffusion Model" node: its native int8 path for an int8 file."""
    node = comfy.nodes.UNETLoader
    return getattr(node(), node.FUNCTION)(unet_name=name, weight_dtype="default")[0]


def model_inputs(arch: str, batch: int = 2, rows: int = 9, cols: int = 13, seed: int = 0) -> tuple:
    """(latent, sigma, keyword arguments) for ``apply_model``: a CFG-sized batch at an odd size."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, LATENT_CHANNELS[arch], rows, cols, generator=g)
    sigma = torch.full((batch,), 0.6)
    text_dim = TINY[arch].get("text_dim", TINY[arch].get("cap_dim"))
    kwargs = {"c_crossattn": torch.randn(batch, TEXT_TOKENS, text_dim, generator=g)}
    if arch.startswith("chroma"):
        kwargs["guidance"] = torch.zeros(batch)
    if arch == "flux1":  # CLIP's pooled prompt and dev's guidance
        kwargs["y"] = torch.randn(batch, TINY[arch]["vec_dim"], generator=g)
        kwargs["guidance"] = torch.full((batch,), 3.5)
    if arch == "zimage":
        kwargs["num_tokens"] = TEXT_TOKENS
    if arch == "qwen_image":  # ComfyUI's Qwen-Image takes video latents (Wan 2.1's format): one frame
        x = x[:, :, None]
    return x, sigma, kwargs


def run(comfy, model, arch: str, **shape) -> torch.Tensor:
    comfy.mm.load_models_gpu([model])
    x, sigma, kwargs = model_inputs(arch, **shape)
    with torch.inference_mode():
        return model.model.apply_model(x, sigma, **kwargs).float()


def error(a: torch.Tensor, reference: torch.Tensor) -> float:
    return float((a - reference).norm() / reference.norm())


def assert_as_close_as_native(comfy, source, converted, ours, x: torch.Tensor, kwargs: dict) -> None:
    """``ours`` (our node's model of the int8 file ``converted``) is at most ALLOWED times further from
    ComfyUI's float load of ``source`` than ComfyUI's own load of ``converted``, on one ``apply_model``."""

    def run(model) -> torch.Tensor:
        comfy.mm.load_models_gpu([model])
        with torch.inference_mode():
            return model.model.apply_model(x, torch.full((x.shape[0],), 0.6), **kwargs).float()

    reference = run(comfy.sd.load_diffusion_model(str(source)))
    native = run(comfy.sd.load_diffusion_model(str(converted)))
    output = run(ours)
    assert output.shape == x.shape and torch.isfinite(output).all()
    assert 0 < error(output, reference) <= ALLOWED * error(native, reference)


def test_node_is_declared_as_comfyui_reads_it(comfy, files):
    assert comfyui_nodes.NODE_DISPLAY_NAME_MAPPINGS[NODE] == "Load Diffusion Model (INT8 Studio)"
    node = comfyui_nodes.NODE_CLASS_MAPPINGS[NODE]
    assert node.RETURN_TYPES == ("MODEL",) and callable(getattr(node, node.FUNCTION))
    assert node.CATEGORY == comfy.nodes.UNETLoader.CATEGORY and node.DESCRIPTION
    inputs = node.INPUT_TYPES()
    assert set(inputs) == {"required"}
    for name, (choices, options) in inputs["required"].items():
        assert options["tooltip"], name
    assert files["flux2", "rowwise"] in inputs["required"]["unet_name"][0]


@pytest.mark.parametrize("arch", ARCHS)
def test_output_is_as_close_to_float_as_comfyuis_own_int8(comfy, files, arch):
    name = files[arch, "rowwise"]
    reference = run(comfy, load_comfy(comfy, files[arch, "float"]), arch)
    native = run(comfy, load_comfy(comfy, name), arch)
    ours = run(comfy, load_ours(comfy, name), arch)
    assert torch.isfinite(ours).all()
    native_error, our_error = error(native, reference), error(ours, reference)
    print(f"{arch}: ours {our_error:.3%}, ComfyUI int8 {native_error:.3%} from ComfyUI float; "
          f"ours vs ComfyUI int8 {error(ours, native):.3%}")  # fmt: skip
    assert 0 < our_error <= ALLOWED * native_error


@pytest.mark.parametrize("variant", ["tensorwise", "rotated", "header-markers", "1-d-scales", "no-markers"])
def test_other_int8_files(comfy, files, variant):
    name = files["flux2", variant]
    reference = run(comfy, load_comfy(comfy, files["flux2", "float"]), "flux2")
    model = load_ours(comfy, name)
    layers = int8_layers(model.model)
    assert layers and all(bool(m.rotation) == (variant == "rotated") for m in layers.values())
    assert all((m.weight_scale.ndim == 0) == (variant == "tensorwise") for m in layers.values())
    ours = run(comfy, model, "flux2")
    native = run(comfy, load_comfy(comfy, name), "flux2")
    print(f"flux2 {variant}: ours {error(ours, reference):.3%}, ComfyUI int8 {error(native, reference):.3%}")
    if variant == "no-markers":  # ComfyUI takes unmarked int8 weights for float ones (unscaled): garbage
        assert error(native, reference) > 0.2
        native = run(comfy, load_comfy(comfy, files["flux2", "rowwise"]), "flux2")
    assert error(ours, reference) <= ALLOWED * error(native, reference)


def test_a_file_comfyui_wrote(comfy, files, tmp_path):
    """ComfyUI's own serialization of its int8 layers (its model's state dict) loads as ours."""
    native = load_comfy(comfy, files["flux2", "rowwise"])
    path = tmp_path / "saved-by-comfyui.safetensors"
    state = {k: v.contiguous() for k, v in native.model.diffusion_model.state_dict().items()}
    assert any(v.dtype == torch.int8 for v in state.values())
    from comfy.utils import save_torch_file

    save_torch_file(state, str(path))
    saved = load_diffusion_model(path)
    assert len(int8_layers(saved.model)) == len(int8_layers(load_ours(comfy, files["flux2", "rowwise"]).model))
    assert torch.equal(run(comfy, saved, "flux2"), run(comfy, load_ours(comfy, files["flux2", "rowwise"]), "flux2"))


def test_zimage_from_a_diffusers_folder_runs_in_comfyui(comfy, tmp_path):
    """A Z-Image diffusers folder converts to a complete file (its norm_final, which the diffusers layout
    lacks and the model never uses, at the module's ones) that ComfyUI's own loader runs, with the
    output of the same weights converted from a single file; our node runs it too."""
    arch, config = REGISTRY["zimage"], TINY["zimage"]
    tensors = dict(random_weights(arch, config, torch.bfloat16, torch.Generator().manual_seed(23)))
    tensors["norm_final.weight"] = torch.ones_like(tensors["norm_final.weight"])
    folder = tmp_path / "models"
    folder.mkdir()
    single = write_single_file(tmp_path / "zimage-single.safetensors", arch, tensors=tensors).path
    diffusers = write_diffusers(tmp_path / "zimage-diffusers", arch, tensors=tensors, config=config).path
    names = []
    for source in (single, diffusers):
        output = folder / f"{source.stem}-int8.safetensors"
        result = run_convert(ConvertRequest(source, output=output, scheme="rowwise", device="cpu"))
        with safe_open(str(result.output), "pt") as f:
            assert "norm_final.weight" in f.keys()  # noqa: SIM118 (not a dict)
        names.append(output.name)
    comfy.folder_paths.add_model_folder_path("diffusion_models", str(folder))
    from_single, from_diffusers = (run(comfy, load_comfy(comfy, name), "zimage") for name in names)
    assert torch.isfinite(from_diffusers).all() and torch.equal(from_diffusers, from_single)
    assert torch.equal(run(comfy, load_ours(comfy, names[1]), "zimage"), run(comfy, load_ours(comfy, names[0]), "zimage"))


def test_our_model_saves_as_comfyui_reads_it(comfy, files, tmp_path):
    """Our layers' state dict is the file format: ComfyUI's own loader reads it back natively."""
    ours = load_ours(comfy, files["flux2", "rowwise"])
    path = tmp_path / "saved-from-ours.safetensors"
    state = {k: v.contiguous() for k, v in ours.model.diffusion_model.state_dict().items()}
    assert any(k.endswith(".comfy_quant") for k in state)
    from comfy.utils import save_torch_file

    save_torch_file(state, str(path))
    comfy.folder_paths.add_model_folder_path("diffusion_models", str(tmp_path))
    assert torch.equal(run(comfy, load_comfy(comfy, path.name), "flux2"), run(comfy, load_comfy(comfy, files["flux2", "rowwise"]), "flux2"))


def test_a_file_that_is_no_diffusion_model(comfy, tmp_path):
    lora = write_lora(tmp_path / "a-lora.safetensors", "flux2", fmt="comfyui", config=TINY["flux2"])
    with pytest.raises(Int8LoadError, match="does not recognise the diffusion model in a-lora.safetensors"):
        load_diffusion_model(lora.path)


@pytest.mark.parametrize("arch", ARCHS)
def test_two_sampling_steps_with_cfg(comfy, files, arch):
    """ComfyUI's KSampler node, 2 steps at CFG 3.5 (the model sees a batch of 2), an odd size."""
    text_dim = TINY[arch].get("text_dim", TINY[arch].get("cap_dim"))
    g = torch.Generator().manual_seed(1)
    positive = [[torch.randn(1, TEXT_TOKENS, text_dim, generator=g), {}]]
    negative = [[torch.randn(1, TEXT_TOKENS, text_dim, generator=g), {}]]
    latent = {"samples": torch.zeros(1, LATENT_CHANNELS[arch], 11, 7)}
    sampler = comfy.nodes.KSampler()

    def sample(model):
        (out,) = sampler.sample(model, 3, 2, 3.5, "euler", "simple", positive, negative, latent, denoise=1.0)
        return out["samples"].float()

    reference = sample(load_comfy(comfy, files[arch, "float"]))
    native = sample(load_comfy(comfy, files[arch, "rowwise"]))
    ours = sample(load_ours(comfy, files[arch, "rowwise"]))
    print(f"{arch} sampled: ours {error(ours, reference):.3%}, ComfyUI int8 {error(native, reference):.3%}")
    assert torch.isfinite(ours).all() and 0 < error(ours, reference) <= ALLOWED * error(native, reference)


def test_any_resolution_and_batch(comfy, files):
    model = load_ours(comfy, files["zimage", "rowwise"])
    for batch, rows, cols in ((1, 2, 2), (3, 5, 17), (2, 16, 6)):
        out = run(comfy, model, "zimage", batch=batch, rows=rows, cols=cols)
        assert out.shape == (batch, LATENT_CHANNELS["zimage"], rows, cols) and torch.isfinite(out).all()

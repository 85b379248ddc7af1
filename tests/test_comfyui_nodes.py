"""The node pack (comfyui_nodes/) inside ComfyUI's real code, on the CPU.

ComfyUI's own model classes, loader, sampler and model management run tiny Flux.2, Chroma and Z-Image
files of the real layouts; the node is called as ComfyUI calls it (``INPUT_TYPES``, then its
``FUNCTION``). Each int8 file runs three ways: our node, ComfyUI's own int8 path (its "Load Diffusion
Model" node on the same file) and ComfyUI on the float original. Ours must be as close to the float
output as ComfyUI's own int8 path is.
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
from comfyui_nodes import ops as node_ops
from comfyui_nodes.loader import OVERRIDE, Int8LoadError, comfy_int8_attention, int8_layers, load_diffusion_model
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


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
@pytest.mark.parametrize("guidance,expected", [(True, "Flux"), (False, "FluxSchnell")])
def test_comfyui_detects_our_flux1(comfy, tmp_path, prefix, guidance, expected):
    """ComfyUI's own detection reads our tiny Flux.1 file as Flux.1 dev or schnell, with our sizes."""
    config = {**TINY["flux1"], "guidance": guidance}
    tensors = dict(random_weights(REGISTRY["flux1"], config, torch.bfloat16, torch.Generator().manual_seed(5)))
    path = write_single_file(tmp_path / "flux1.safetensors", "flux1", prefix=prefix, tensors=tensors).path
    from comfy.utils import load_torch_file

    model_config = comfy.detection.model_config_from_unet(load_torch_file(str(path)), prefix)
    assert type(model_config).__name__ == expected
    unet = model_config.unet_config
    assert (unet["hidden_size"], unet["num_heads"], unet["vec_in_dim"], unet["context_in_dim"]) == (256, 2, 24, 48)
    assert (unet["depth"], unet["depth_single_blocks"], unet["guidance_embed"]) == (2, 2, guidance)


# What two Qwen-Image releases add to its layout, and what ComfyUI's detection makes of each.
QWEN_RELEASES = {
    "20B": ({}, {"default_ref_method": None, "use_additional_t_cond": None}),
    "Edit 2511": ({"__index_timestep_zero__": torch.empty(0, dtype=torch.bfloat16)},
                  {"default_ref_method": "index_timestep_zero", "use_additional_t_cond": None}),
    "Layered": ({"time_text_embed.addition_t_embedding.weight": torch.zeros(2, 256, dtype=torch.bfloat16)},
                {"default_ref_method": "negative_index", "use_additional_t_cond": True}),
}  # fmt: skip


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
@pytest.mark.parametrize("release", QWEN_RELEASES)
def test_comfyui_detects_our_qwen_image_and_its_int8_conversion(comfy, tmp_path, prefix, release):
    """ComfyUI's own detection reads our tiny Qwen-Image file, and our int8 conversion of it, as
    Qwen-Image with our sizes; the tensors by which it tells Edit 2511 and Layered apart pass through."""
    extra, expected = QWEN_RELEASES[release]
    generator = torch.Generator().manual_seed(6)
    tensors = dict(random_weights(REGISTRY["qwen_image"], TINY["qwen_image"], torch.bfloat16, generator)) | extra
    source = write_single_file(tmp_path / "qwen.safetensors", "qwen_image", prefix=prefix, tensors=tensors).path
    converted = run_convert(ConvertRequest(source, scheme="rowwise", device="cpu")).output
    from comfy.utils import load_torch_file

    for path, key_prefix in ((source, prefix), (converted, "")):
        model_config = comfy.detection.model_config_from_unet(load_torch_file(str(path)), key_prefix)
        assert type(model_config).__name__ == "QwenImage"
        unet = model_config.unet_config
        assert (unet["in_channels"], unet["num_layers"], unet["num_attention_heads"], unet["joint_attention_dim"]) == (64, 2, 2, 48)
        assert {k: unet.get(k) for k in expected} == expected


def test_our_qwen_image_module_matches_comfyuis(comfy, files):
    """Our engine's Qwen-Image and ComfyUI's, on one file, give one output on an even patch grid (on
    an odd one ComfyUI centres RoPE's positions one higher than diffusers, which ours follows)."""
    from engine.checkpoint import CheckpointReader
    from engine.models.build import load_model

    name = files["qwen_image", "float"]
    model = load_comfy(comfy, name)
    comfy.mm.load_models_gpu([model])
    x, sigma, kwargs = model_inputs("qwen_image", rows=8, cols=12)
    with CheckpointReader(comfy.folder_paths.get_full_path_or_raise("diffusion_models", name)) as reader:
        ours = load_model(reader, torch.device("cpu"), torch.float32)[0]
    with torch.inference_mode():
        theirs = model.model.diffusion_model(x, sigma, kwargs["c_crossattn"]).float()[:, :, 0]
        assert error(ours(x[:, :, 0], sigma, kwargs["c_crossattn"]), theirs) < 1e-5


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
def test_int8_layers_are_ours_and_run_our_op(comfy, files, arch, monkeypatch):
    """Every layer the file stores in int8 is our layer, and every one of them runs our op: the test
    fails if ComfyUI built its own layers or ran them some other way."""
    name = files[arch, "rowwise"]
    model = load_ours(comfy, name)
    path = comfy.folder_paths.get_full_path_or_raise("diffusion_models", name)
    with safe_open(path, "pt") as f:
        stored = {k.removesuffix(".weight") for k in f.keys() if k.endswith(".weight") and f.get_slice(k).get_dtype() == "I8"}  # noqa: SIM118
    layers = int8_layers(model.model.diffusion_model)
    assert stored and set(layers) == stored
    assert all(type(m).__qualname__.endswith("Int8StudioOperations.Linear") for m in layers.values())
    assert all(m.weight.dtype == torch.int8 and m.weight_scale.dtype == torch.float32 for m in layers.values())
    # the float layers are ComfyUI's, kept in the dtype its own int8 path keeps them in
    native = load_comfy(comfy, name).model.diffusion_model.named_parameters()
    floats = {n: p.dtype for n, p in native if n.rsplit(".", 1)[0] not in stored}
    assert floats == {n: p.dtype for n, p in model.model.diffusion_model.named_parameters() if n in floats}

    calls, ran = [], set()
    original = node_ops.int8_linear
    monkeypatch.setattr(node_ops, "int8_linear", lambda *a, **k: calls.append(1) or original(*a, **k))
    handles = [m.register_forward_hook(lambda m, *_, n=n: ran.add(n)) for n, m in layers.items()]
    try:
        run(comfy, model, arch)
    finally:
        for h in handles:
            h.remove()
    assert ran == stored and len(calls) == len(ran)


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


def test_low_vram_loading_and_offloading(comfy, files):
    """ComfyUI's partial loading (every layer left offloaded, cast at run time), then unloading and
    loading again: the same output as a full load."""
    model = load_ours(comfy, files["flux2", "rowwise"])
    full = run(comfy, model, "flux2")
    comfy.mm.unload_all_models()
    device = comfy.mm.get_torch_device()
    model.patch_model(device_to=device, lowvram_model_memory=1)  # nothing fits: all layers offloaded
    try:
        layers = int8_layers(model.model)
        assert model.model.model_lowvram and all(m.comfy_cast_weights for m in layers.values())
        x, sigma, kwargs = model_inputs("flux2")
        with torch.inference_mode():
            partial = model.model.apply_model(x, sigma, **kwargs).float()
    finally:
        model.unpatch_model(device_to=model.offload_device)
    assert not any(m.comfy_cast_weights for m in int8_layers(model.model).values())
    assert torch.equal(partial, full)
    assert torch.equal(run(comfy, model, "flux2"), full)


def test_comfyuis_lora_loader(comfy, files, tmp_path):
    """ComfyUI's own LoRA loader on our model: merged into the int8 weights at load (full load), applied
    at run time (partial load), and removed again when the LoRA is gone."""
    torch.manual_seed(0)  # the LoRA's random factors
    lora = write_lora(tmp_path / "style.safetensors", "flux2", fmt="comfyui", config=TINY["flux2"])
    comfy.folder_paths.add_model_folder_path("loras", str(tmp_path))
    loader = comfy.nodes.LoraLoaderModelOnly()
    with_lora = lambda model: loader.load_lora_model_only(model, lora.path.name, 4.0)[0]

    float_model = load_comfy(comfy, files["flux2", "float"])
    reference = run(comfy, with_lora(float_model), "flux2")
    change = reference - run(comfy, float_model, "flux2")
    native = run(comfy, with_lora(load_comfy(comfy, files["flux2", "rowwise"])), "flux2")
    ours_model = load_ours(comfy, files["flux2", "rowwise"])
    before = run(comfy, ours_model, "flux2")
    stored = {n: m.weight.clone() for n, m in int8_layers(ours_model.model).items()}
    patched = with_lora(ours_model)
    ours = run(comfy, patched, "flux2")
    merged = int8_layers(patched.model)
    assert merged and all(not torch.equal(m.weight, stored[n]) for n, m in merged.items())
    print(f"flux2 + LoRA: ours {error(ours, reference):.3%}, ComfyUI int8 {error(native, reference):.3%}, "
          f"LoRA's change kept {1 - error(ours - before, change):.1%}")  # fmt: skip
    assert error(ours, reference) <= ALLOWED * error(native, reference)
    assert error(ours - before, change) < 0.3

    comfy.mm.unload_all_models()  # the LoRA leaves the weights: the model without it is as before
    assert all(torch.equal(m.weight, stored[n]) for n, m in int8_layers(ours_model.model).items())
    assert torch.equal(run(comfy, ours_model, "flux2"), before)

    comfy.mm.unload_all_models()
    patched.patch_model(device_to=comfy.mm.get_torch_device(), lowvram_model_memory=1)
    try:
        assert any(m.weight_function for m in int8_layers(patched.model).values())
        x, sigma, kwargs = model_inputs("flux2")
        with torch.inference_mode():
            partial = patched.model.apply_model(x, sigma, **kwargs).float()
    finally:
        patched.unpatch_model(device_to=patched.offload_device)
    print(f"flux2 + LoRA, partial load: {error(partial, reference):.3%}")
    assert error(partial, reference) <= ALLOWED * error(native, reference)


def test_compiles_without_graph_breaks(comfy, files, monkeypatch):
    """What ComfyUI's TorchCompileModel compiles (the diffusion model) traces as one graph with our int8
    layers in it, given an attention that compiles (PyTorch's SDPA, what ComfyUI picks on a GPU); the
    int8 op is in that graph, not run beside it."""
    from comfy.ldm.flux import math as flux_math
    from comfy.ldm.modules.attention import attention_pytorch

    monkeypatch.setattr(flux_math, "optimized_attention", attention_pytorch)
    model = load_ours(comfy, files["flux2", "rowwise"])
    comfy.mm.load_models_gpu([model])
    x, sigma, kwargs = model_inputs("flux2", batch=1)
    with torch.inference_mode():
        explanation = torch._dynamo.explain(model.model.apply_model)(x, sigma, **kwargs)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    assert "int8_studio" in explanation.graphs[0].code


def test_int8_attention_runs_through_comfyuis_override(comfy, files):
    """attention="int8" puts our attention in ComfyUI's per-model override, which ComfyUI's sampler calls
    for every attention of the model: each runs our registered op (counted by the profiler; on the CPU
    the op computes SDPA, in bf16 for ComfyUI's float32, so the samples stay close to ComfyUI's)."""
    node = comfyui_nodes.NODE_CLASS_MAPPINGS[NODE]
    assert node.INPUT_TYPES()["required"]["attention"][1]["default"] == "bf16"
    load = getattr(node(), node.FUNCTION)
    name = files["flux2", "rowwise"]
    assert OVERRIDE not in load(unet_name=name)[0].model_options["transformer_options"]
    assert load(unet_name=name, attention="int8")[0].model_options["transformer_options"][OVERRIDE] is comfy_int8_attention

    g = torch.Generator().manual_seed(2)
    positive = [[torch.randn(1, TEXT_TOKENS, TINY["flux2"]["text_dim"], generator=g), {}]]
    latent = {"samples": torch.zeros(1, LATENT_CHANNELS["flux2"], 8, 8)}
    path = comfy.folder_paths.get_full_path_or_raise("diffusion_models", name)

    def sample(attention):
        model = load_diffusion_model(path, attention=attention)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            (out,) = comfy.nodes.KSampler().sample(model, 3, 2, 1.0, "euler", "simple", positive, positive, latent)
        return out["samples"], sum(e.count for e in profile.key_averages() if e.key == "int8_studio::attention")

    (ours, ran), (comfys, none) = sample("int8"), sample("bf16")
    blocks = TINY["flux2"]["double_blocks"] + TINY["flux2"]["single_blocks"]
    assert (ran, none) == (2 * blocks, 0)  # 2 steps, every block's attention
    assert 0 < error(ours, comfys) < 0.02


def test_comfy_int8_attention_is_int8_attention_where_the_kernel_runs(comfy):
    from comfy.ldm.modules.attention import attention_pytorch

    from engine.int8.attention import int8_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 24, 3 * 128, generator=g).bfloat16() for _ in range(3))
    heads = [t.view(2, 24, 3, 128).transpose(1, 2) for t in (q, k, v)]
    expected = int8_attention(*heads).transpose(1, 2).reshape(2, 24, 3 * 128)
    assert torch.equal(comfy_int8_attention(attention_pytorch, q, k, v, 3), expected)
    assert torch.equal(comfy_int8_attention(attention_pytorch, *heads, 3, skip_reshape=True, skip_output_reshape=True),
                       int8_attention(*heads))  # fmt: skip
    mask = torch.zeros(24, 24, dtype=torch.bfloat16)  # a mask: ComfyUI's own attention
    assert torch.equal(comfy_int8_attention(attention_pytorch, q, k, v, 3, mask=mask),
                       attention_pytorch(q, k, v, 3, mask=mask))  # fmt: skip

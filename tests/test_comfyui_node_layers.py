"""Our node's int8 layers within ComfyUI's machinery, in its real code on the CPU: every int8 layer is
ours and runs our op, ComfyUI's low-VRAM partial loading and its LoRA loader work on them,
TorchCompileModel traces them without graph breaks, and attention="int8" runs our attention through
ComfyUI's per-model override. Tiny files of the real layouts (the fixtures of test_comfyui_nodes).
"""

# ruff: noqa: F811  (the fixtures of test_comfyui_nodes, imported by name)

from __future__ import annotations

import pytest
import torch
from comfyui_env import LATENT_CHANNELS, TINY
from safetensors import safe_open
from test_comfyui_nodes import (  # noqa: F401  (comfy, files: the session fixtures)
    ALLOWED,
    ARCHS,
    NODE,
    TEXT_TOKENS,
    comfy,
    error,
    files,
    load_comfy,
    load_ours,
    model_inputs,
    run,
)
from tiny_loras import write_lora

import comfyui_nodes
from comfyui_nodes import ops as node_ops
from comfyui_nodes.loader import OVERRIDE, comfy_int8_attention, int8_layers, load_diffusion_model


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

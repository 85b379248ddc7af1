"""Dynamic (unmerged) LoRAs: the added term per layer, several LoRAs, strengths without recompiling."""

from __future__ import annotations

import random

import pytest
import torch
import torch._dynamo.testing
import torch.nn.functional as F

from engine.checkpoint import CheckpointReader
from engine.int8.backends import quantize_tokens_torch
from engine.int8.linear import Int8Linear
from engine.lora import LoraError, LoraFile, match_model
from engine.lora.dynamic import DynamicLoras
from engine.int8.apply import Int8Layers
from engine.models.build import load_model
from tests.tiny_checkpoints import write_single_file
from tests.tiny_loras import TinyLora, write_lora

CPU = torch.device("cpu")


def loaded(tmp_path, arch: str = "flux2"):
    """A tiny int8 model loaded as it runs (Int8Linear layers, float32), and its detection."""
    path = tmp_path / "model.safetensors"
    if not path.exists():
        write_single_file(path, arch, fmt="int8_rowwise")
    with CheckpointReader(path) as reader:
        return load_model(reader, CPU, torch.float32, stored=Int8Layers)


def add(dynamic: DynamicLoras, detected, lora: TinyLora, strength: float) -> str:
    with LoraFile(lora.path) as file:
        return dynamic.add(match_model(file, detected), strength)


def without_lora(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(module, Int8Linear):
        adapter, module.lora = module.lora, None
        try:
            return module(x)
        finally:
            module.lora = adapter
    return F.linear(x, module.weight, module.bias)


def seen(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What a layer's LoRA term acts on, in float64: an int8 layer's int8 tokens (those its weight
    multiplies, as when the LoRA is merged into it), a float layer's input."""
    if not isinstance(module, Int8Linear):
        return x.double()
    assert not module.rotation
    q, x_scale = quantize_tokens_torch(x)
    return q.double() * x_scale.double()[:, None]


def added_terms(model, lora: TinyLora, strength: float):
    """(what each adapted layer adds to its output, what the LoRA's float64 delta says it should add)."""
    for name, change in lora.changes.items():
        module = model.get_submodule(name.removesuffix(".weight"))
        x = torch.randn(7, module.weight.shape[1])
        with torch.no_grad():
            yield name, module(x) - without_lora(module, x), seen(module, x) @ (strength * change.delta).T


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_each_layer_adds_the_loras_low_rank_term(tmp_path, fmt):
    model, detected = loaded(tmp_path)
    lora = write_lora(tmp_path / "lora.safetensors", "flux2", fmt)
    s = random.uniform(0.3, 1.5)
    dynamic = DynamicLoras(model, torch.float32)
    keys = set(model.state_dict())
    add(dynamic, detected, lora, s)
    assert set(model.state_dict()) == keys  # the factors are not part of the checkpoint
    assert {n.removesuffix(".weight") for n in lora.changes} == set(dynamic.adapters)
    kinds = {type(model.get_submodule(n)).__name__ for n in dynamic.adapters}
    assert kinds == {"Int8Linear", "Linear"}  # quantized and high-precision layers alike
    for name, actual, expected in added_terms(model, lora, s):
        torch.testing.assert_close(actual.double(), expected, rtol=1e-4, atol=1e-5, msg=name)


def test_several_loras_and_strength_changes(tmp_path):
    model, detected = loaded(tmp_path, "zimage")
    a = write_lora(tmp_path / "a.safetensors", "zimage", "comfyui", only=("layers.0.",))
    b = write_lora(tmp_path / "b.safetensors", "zimage", "ai-toolkit", only=("layers.",))
    dynamic = DynamicLoras(model, torch.float32)
    names = add(dynamic, detected, a, 1.0), add(dynamic, detected, b, 0.5), add(dynamic, detected, a, 1.0)
    assert names == ("a.safetensors", "b.safetensors", "a.safetensors #2")
    sa, sb = random.uniform(-1, 1), random.uniform(-1, 1)
    dynamic.set_strength("a.safetensors", sa)
    dynamic.set_strength("a.safetensors #2", 0.0)
    dynamic.set_strength("b.safetensors", sb)
    for name in b.changes:
        module = model.get_submodule(name.removesuffix(".weight"))
        x = torch.randn(3, module.weight.shape[1])
        delta = sb * b.changes[name].delta + (sa * a.changes[name].delta if name in a.changes else 0)
        with torch.no_grad():
            actual = module(x) - without_lora(module, x)
        torch.testing.assert_close(actual.double(), seen(module, x) @ delta.T, rtol=1e-4, atol=1e-5, msg=name)
    with pytest.raises(LoraError) as caught:
        dynamic.set_strength("c.safetensors", 1.0)
    assert str(caught.value) == (
        "no LoRA named 'c.safetensors' is applied; applied: a.safetensors, b.safetensors, a.safetensors #2"
    )


def test_compiled_layers_take_new_strengths_without_recompiling(tmp_path):
    model, detected = loaded(tmp_path)
    # a LoRA on a high-precision nn.Linear (forward hook) and a split q/k/v one on an Int8Linear (adapter)
    lora = write_lora(
        tmp_path / "lora.safetensors",
        "flux2",
        "diffusers",
        only=("^x_embedder$", r"^transformer_blocks\.0\.attn\.to_"),
    )
    dynamic = DynamicLoras(model, torch.float32)
    name = add(dynamic, detected, lora, 1.0)
    layers = torch.nn.Sequential(model.img_in, model.double_blocks[0].img_attn.qkv)
    x = torch.randn(2, 9, model.img_in.weight.shape[1])

    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layers, backend=counter, fullgraph=True)
    outputs = {}
    with torch.no_grad():
        for strength in (1.0, random.uniform(-2, 2), 0.0):
            dynamic.set_strength(name, strength)
            outputs[strength] = compiled(x)
            torch.testing.assert_close(outputs[strength], layers(x), rtol=1e-6, atol=1e-6)
        fresh = loaded(tmp_path)[0]
        assert torch.equal(
            outputs[0.0], fresh.double_blocks[0].img_attn.qkv(fresh.img_in(x))
        )  # exactly no LoRA
    assert counter.frame_count == 1
    assert not torch.equal(outputs[1.0], outputs[0.0])


@pytest.mark.parametrize(
    "fmt,label,stem",
    [("loha", "LoHa", "lora_unet_img_in"), ("lokr", "LoKr", "lora_unet_img_in"),
     ("diff", "full diff", "diffusion_model.img_in"), ("dora", "LoRA with DoRA", "lora_unet_img_in")],
)  # fmt: skip
def test_only_plain_lora_runs_unmerged(tmp_path, fmt, label, stem):
    model, detected = loaded(tmp_path)
    lora = write_lora(tmp_path / "x.safetensors", "flux2", fmt, only=("^img_in$",))
    with pytest.raises(LoraError) as caught:
        add(DynamicLoras(model, torch.float32), detected, lora, 1.0)
    assert str(caught.value) == (
        f"x.safetensors has {label} layers ('{stem}'), which only work merged: "
        "merge it into the model instead"
    )

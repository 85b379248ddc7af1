"""The node pack's LoRA nodes (merged and dynamic) inside ComfyUI's real code, on the CPU.

Tiny Flux.2, Chroma and Z-Image files of the real layouts (the fixtures of test_comfyui_nodes); the
nodes are called as ComfyUI calls them. LoRA results are compared with the float merge of
tests/tiny_loras (float64, independent of the engine) on the weights the model holds. (The loader's
convert-on-load cache: test_comfyui_convert_cache.py.)
"""

# ruff: noqa: F811  (the fixtures of test_comfyui_nodes, imported by name)

from __future__ import annotations

import pytest
import torch

pytest.importorskip(
    "comfy_kitchen", reason="ComfyUI's test environment is not installed"
)

from comfyui_env import TINY
from test_comfyui_nodes import (  # noqa: F401
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
from comfyui_nodes import lora as lora_nodes

ARCHS = tuple(TINY)
STRENGTH = 4.0  # the tiny LoRAs' changes are a few int8 steps at this strength


@pytest.fixture(scope="module")
def loras(comfy, tmp_path_factory):
    """A LoRA per architecture (ComfyUI names; Flux.2 also diffusers names, split q/k/v), in ComfyUI's
    loras folder."""
    folder = tmp_path_factory.mktemp("loras")
    torch.manual_seed(0)
    out = {
        arch: write_lora(
            folder / f"{arch}.safetensors", arch, fmt="comfyui", config=TINY[arch]
        )
        for arch in ARCHS
    }
    out["flux2-diffusers"] = write_lora(
        folder / "flux2-diffusers.safetensors",
        "flux2",
        fmt="diffusers",
        config=TINY["flux2"],
    )
    out["flux2-loha"] = write_lora(
        folder / "flux2-loha.safetensors", "flux2", fmt="loha", config=TINY["flux2"]
    )
    comfy.folder_paths.add_model_folder_path("loras", str(folder))
    return out


def node(name: str):
    cls = comfyui_nodes.NODE_CLASS_MAPPINGS[name]
    return cls, getattr(cls(), cls.FUNCTION)


def merged_node(model, lora, strength=STRENGTH, mode="auto"):
    cls, apply = node("Int8StudioLoraMerged")
    assert lora.path.name in cls.INPUT_TYPES()["required"]["lora_name"][0]
    return apply(
        model=model, lora_name=lora.path.name, strength=strength, merge_mode=mode
    )[0]


def dynamic_node(model, lora, strength=STRENGTH):
    _, apply = node("Int8StudioLoraDynamic")
    return apply(model=model, lora_name=lora.path.name, strength=strength)[0]


def loaded(comfy, model):
    """``model`` loaded as for sampling (ComfyUI applies its patches): its diffusion model."""
    comfy.mm.load_models_gpu([model])
    return model.model


def weights(base) -> dict[str, torch.Tensor]:
    """The float weights the model stands for, by single-file name: int8 layers dequantized and
    un-rotated (``convert_weight``), float ones as they are; with every int8 layer's raw tensors."""
    out = {}
    for name, m in base.diffusion_model.named_modules():
        if getattr(m, "int8", False):
            out[f"{name}.weight"] = m.convert_weight(m.weight).double()
            out[f"{name}.q"] = (m.weight.clone(), m.weight_scale.clone())
        elif (
            isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.ndim == 2
        ):
            out[f"{name}.weight"] = m.weight.detach().double().clone()
    return out


def against_float_merge(before, after, lora, strength=STRENGTH) -> tuple[float, float]:
    """(rms error / rms change, fraction of the change kept) of ``after`` against the float merge
    of ``lora`` into ``before``, over the int8 layers it adapts."""
    reference = lora.merged(
        {n: w for n, w in before.items() if not n.endswith(".q")}, strength
    )
    err = change = kept = 0.0
    for name, ref in reference.items():
        if name.removesuffix(".weight") + ".q" not in before:
            continue
        delta = ref - before[name]
        moved = after[name] - before[name]
        err += float((moved - delta).square().sum())
        change += float(delta.square().sum())
        kept += float((moved * delta).sum())
    return (err / change) ** 0.5, kept / change


def unchanged(before, after) -> bool:
    return all(
        torch.equal(before[n][0], after[n][0])
        and torch.equal(before[n][1], after[n][1])
        for n in before
        if n.endswith(".q")
    )


# --- declarations --------------------------------------------------------------------------------


def test_nodes_are_declared_as_comfyui_reads_them(comfy, loras):
    names = comfyui_nodes.NODE_DISPLAY_NAME_MAPPINGS
    assert names["Int8StudioLoraMerged"] == "INT8 LoRA (merged)"
    assert names["Int8StudioLoraDynamic"] == "INT8 LoRA (dynamic)"
    for key in (
        "Int8StudioLoadDiffusionModel",
        "Int8StudioLoraMerged",
        "Int8StudioLoraDynamic",
    ):
        cls = comfyui_nodes.NODE_CLASS_MAPPINGS[key]
        assert (
            cls.RETURN_TYPES == ("MODEL",)
            and cls.DESCRIPTION
            and callable(getattr(cls, cls.FUNCTION))
        )
        inputs = cls.INPUT_TYPES()
        assert set(inputs) == {"required"}
        for name, (kind, options) in inputs["required"].items():
            assert options["tooltip"], (key, name)
    merged = comfyui_nodes.NODE_CLASS_MAPPINGS["Int8StudioLoraMerged"].INPUT_TYPES()[
        "required"
    ]
    assert (
        merged["merge_mode"][0] == ["auto", "requant", "stochastic"]
        and merged["merge_mode"][1]["default"] == "auto"
    )
    loader = comfyui_nodes.NODE_CLASS_MAPPINGS[
        "Int8StudioLoadDiffusionModel"
    ].INPUT_TYPES()["required"]
    assert (loader["scheme"][1]["default"], loader["rotation"][1]["default"]) == (
        "rowwise", "none"
    )  # int8-studio convert's


# --- merged LoRA ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "variant"),
    [(a, "rowwise") for a in ARCHS] + [("flux2", "rotated"), ("flux2", "tensorwise")],
)
def test_merged_lora_against_the_float_merge(comfy, files, loras, arch, variant):
    base = load_ours(comfy, files[arch, variant])
    before = weights(loaded(comfy, base))
    results = {}
    for mode in ("auto", "requant", "stochastic"):
        after = weights(loaded(comfy, merged_node(base, loras[arch], mode=mode)))
        results[mode] = against_float_merge(before, after, loras[arch])
    print(
        f"{arch} {variant}: "
        + ", ".join(f"{m} error {e:.1%} kept {k:.1%}" for m, (e, k) in results.items())
    )
    for mode, (err, kept) in results.items():
        assert 0.9 < kept < 1.1, mode
        assert err < (
            0.75 if mode != "requant" or variant != "tensorwise" else 1.0
        ), mode
    assert unchanged(
        before, weights(loaded(comfy, base))
    )  # the model without the LoRA: restored


def test_merged_lora_chain_change_and_removal_restore_exactly(comfy, files, loras):
    base = load_ours(comfy, files["flux2", "rowwise"])
    before = weights(loaded(comfy, base))
    out_before = run(comfy, base, "flux2")
    one = merged_node(base, loras["flux2"], mode="requant")
    one_weights = weights(loaded(comfy, one))
    assert not unchanged(before, one_weights)
    two = merged_node(
        one, loras["flux2-diffusers"], strength=2.0, mode="requant"
    )  # chained: summed, rounded once
    both = loras["flux2"].merged(
        {n: w for n, w in before.items() if not n.endswith(".q")}, STRENGTH
    )
    both = {
        n: w + 2.0 * loras["flux2-diffusers"].changes[n].delta
        if n in loras["flux2-diffusers"].changes
        else w
        for n, w in both.items()
    }
    after = weights(loaded(comfy, two))
    err = sum(
        float((after[n] - w).square().sum())
        for n, w in both.items()
        if n.removesuffix(".weight") + ".q" in before
    )
    change = sum(
        float((before[n] - w).square().sum())
        for n, w in both.items()
        if n.removesuffix(".weight") + ".q" in before
    )
    print(f"two LoRAs chained: error {(err / change) ** 0.5:.1%} of the change")
    assert (err / change) ** 0.5 < 0.5
    weaker = merged_node(
        base, loras["flux2"], strength=1.0, mode="requant"
    )  # a changed strength
    assert not unchanged(one_weights, weights(loaded(comfy, weaker)))
    again = weights(loaded(comfy, one))  # back to the first: the same weights again
    assert unchanged(one_weights, again)
    assert unchanged(
        before, weights(loaded(comfy, base))
    )  # removed: the file's weights, no reload
    assert torch.equal(run(comfy, base, "flux2"), out_before)


def test_merged_lora_output(comfy, files, loras):
    """The model's output with the LoRA merged, against ComfyUI float + its own LoRA loader."""
    loader = comfy.nodes.LoraLoaderModelOnly()
    float_model = load_comfy(comfy, files["flux2", "float"])
    reference = run(
        comfy,
        loader.load_lora_model_only(float_model, loras["flux2"].path.name, STRENGTH)[0],
        "flux2",
    )
    change = reference - run(comfy, float_model, "flux2")
    native = run(
        comfy,
        loader.load_lora_model_only(
            load_comfy(comfy, files["flux2", "rowwise"]),
            loras["flux2"].path.name,
            STRENGTH,
        )[0],
        "flux2",
    )
    base = load_ours(comfy, files["flux2", "rowwise"])
    plain = run(comfy, base, "flux2")
    ours = run(comfy, merged_node(base, loras["flux2"]), "flux2")
    print(f"flux2 + merged LoRA: ours {error(ours, reference):.3%}, ComfyUI int8 {error(native, reference):.3%}, "
          f"change kept {1 - error(ours - plain, change):.1%}")  # fmt: skip
    assert (
        error(ours, reference) <= 1.25 * error(native, reference)
        and error(ours - plain, change) < 0.3
    )


@pytest.mark.parametrize(
    ("arch", "variant"), [(a, "rowwise") for a in ARCHS] + [("flux2", "rotated")]
)
def test_comfyuis_own_lora_loader_on_each_family(comfy, files, loras, arch, variant):
    """ComfyUI's LoraLoaderModelOnly on our model merges correctly (stochastically, on the layer's
    grid) in every family, rotated layers included, and leaves no trace when taken away."""
    base = load_ours(comfy, files[arch, variant])
    before = weights(loaded(comfy, base))
    patched = comfy.nodes.LoraLoaderModelOnly().load_lora_model_only(
        base, loras[arch].path.name, STRENGTH
    )[0]
    err, kept = against_float_merge(
        before, weights(loaded(comfy, patched)), loras[arch]
    )
    print(f"{arch} {variant} + ComfyUI's LoRA loader: error {err:.1%}, kept {kept:.1%}")
    assert 0.9 < kept < 1.1 and err < 0.75
    assert unchanged(before, weights(loaded(comfy, base)))


# --- dynamic LoRA --------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_dynamic_lora_matches_the_merged_one(comfy, files, loras, arch):
    base = load_ours(comfy, files[arch, "rowwise"])
    plain = run(comfy, base, arch)
    float_merge = run(comfy, merged_node(base, loras[arch], mode="requant"), arch)
    dynamic = dynamic_node(base, loras[arch])
    out = run(comfy, dynamic, arch)
    assert unchanged(
        weights(loaded(comfy, base)), weights(loaded(comfy, dynamic))
    )  # weights untouched
    print(
        f"{arch}: dynamic vs merged {error(out, float_merge):.3%}, LoRA change {error(float_merge, plain):.3%}"
    )
    assert error(out, float_merge) < 0.25 * error(float_merge, plain)
    assert torch.equal(run(comfy, base, arch), plain)  # without it: as before


def test_dynamic_lora_strength_is_a_tensor_and_recompiles_nothing(comfy, files, loras):
    from torch._dynamo.testing import CompileCounter

    base = load_ours(comfy, files["flux2", "rowwise"])
    one, half = (
        dynamic_node(base, loras["flux2"], 1.0),
        dynamic_node(base, loras["flux2"], 0.5),
    )
    patches = lambda m: (
        m.model_options["transformer_options"]["patches"][lora_nodes.DYNAMIC_PATCH][
            0
        ].layers
    )
    for name, lora in patches(
        one
    ).items():  # same factors, the strength only in the scale tensor
        other = patches(half)[name]
        assert torch.equal(lora.down, other.down) and torch.equal(lora.up, other.up)
        assert torch.allclose(other.scale * 2, lora.scale)
    chained = dynamic_node(one, loras["flux2-diffusers"], 1.0)
    for name, lora in patches(
        one
    ).items():  # chained: the second LoRA's columns after the first's
        rank, both = lora.down.shape[0], patches(chained)[name]
        assert (
            both.down.shape[0] > rank
            and torch.equal(both.down[:rank], lora.down)
            and torch.equal(both.scale[:rank], lora.scale)
        )

    # one adapted int8 layer compiled whole (no graph break in our op, the LoRA term included), run
    # with one strength and then another: the same compiled code
    counter = CompileCounter()
    layer = base.model.diffusion_model.double_blocks[0].img_attn.qkv
    compiled = torch.compile(layer, backend=counter, fullgraph=True, dynamic=False)
    x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(0))
    outputs = []
    for model in (one, half, one):
        comfy.mm.load_models_gpu([model])
        with torch.inference_mode():
            outputs.append(compiled(x))
            assert torch.equal(outputs[-1], layer(x))
    assert counter.frame_count == 1  # a new strength: no recompile
    plain = adapted_layer(comfy, base, x)
    assert torch.equal(outputs[0], outputs[2]) and not torch.equal(
        outputs[0], outputs[1]
    )
    assert torch.allclose(
        outputs[1] - plain, (outputs[0] - plain) / 2, atol=1e-5, rtol=1e-3
    )
    comfy.mm.unload_all_models()


def adapted_layer(comfy, model, x):
    """The adapted layer's output in ``model`` (loaded as for sampling)."""
    comfy.mm.load_models_gpu([model])
    with torch.inference_mode():
        return model.model.diffusion_model.double_blocks[0].img_attn.qkv(x)


# --- bad inputs ----------------------------------------------------------------------------------


def test_bad_inputs(comfy, files, loras):
    flux2 = load_ours(comfy, files["flux2", "rowwise"])
    with pytest.raises(
        lora_nodes.Int8LoraError, match="is not for this Flux.2.*looks like a Z-Image"
    ):
        merged_node(flux2, loras["zimage"])
    with pytest.raises(
        lora_nodes.Int8LoraError, match="is not for this Flux.2.*looks like a Z-Image"
    ):
        dynamic_node(flux2, loras["zimage"])
    with pytest.raises(
        lora_nodes.Int8LoraError, match="LoHa layers .* use 'INT8 LoRA \\(merged\\)'"
    ):
        dynamic_node(flux2, loras["flux2-loha"])
    stock = load_comfy(comfy, files["flux2", "rowwise"])
    with pytest.raises(
        lora_nodes.Int8LoraError, match="Load Diffusion Model \\(INT8 Studio\\)"
    ):
        merged_node(stock, loras["flux2"])
    _, kept = against_float_merge(
        weights(loaded(comfy, flux2)),
        weights(loaded(comfy, merged_node(flux2, loras["flux2-loha"]))),
        loras["flux2-loha"],
    )
    assert 0.9 < kept < 1.1, "LoHa merges"

"""The runnable Flux.2, Chroma, Z-Image and Flux.1 modules: key layout, fidelity to diffusers, loading
every checkpoint layout and format, int8 quantization, compile-friendliness."""

from __future__ import annotations

import functools
import random

import pytest
import torch
from torch import nn

from engine.checkpoint import CheckpointReader
from engine.int8.linear import Int8Linear
from engine.models import REGISTRY, ModelLayoutError
from engine.int8.apply import Int8Layers, quantize_model, quantizer
from engine.models.build import (
    UnknownModelNameError,
    build_model,
    checkpoint_filler,
    load_model,
    named_config,
    random_filler,
    random_model,
    streamed_blocks,
)
from engine.models.detect import detect
from engine.models.spec import Architecture, NoModuleError
from tests.test_models import diffusers_kwargs
from tests.tiny_checkpoints import random_tensors, to_diffusers, write_diffusers, write_single_file

RUNNABLE = ("flux2", "chroma", "zimage", "flux1", "qwen_image")
CPU = torch.device("cpu")
DEQUANTIZED = functools.partial(Int8Layers, dequantize=True)
# Z-Image's diffusers class fixes the time MLP width (1024), the adaLN width (min(dim, 256)) and the
# FFN width (8/3 dim), so its fidelity test uses a small config with those widths.
ZIMAGE_DIFFUSERS = {**REGISTRY["zimage"].tiny["tiny"], "adaln_dim": 64, "t_mid": 1024, "ffn_hidden": 170}
FIDELITY_CONFIGS = [
    ("flux2", REGISTRY["flux2"].tiny["tiny"]),
    ("flux2", REGISTRY["flux2"].tiny["tiny-guidance"]),
    ("chroma", REGISTRY["chroma"].tiny["tiny"]),
    ("zimage", ZIMAGE_DIFFUSERS),
    ("flux1", REGISTRY["flux1"].tiny["tiny"]),
    ("flux1", REGISTRY["flux1"].tiny["tiny-schnell"]),
]


def seed() -> int:
    return random.randrange(2**31)


def inputs(model: nn.Module, batch: int = 2, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """One step's inputs at 80² pixels (25 image tokens) and 40 text tokens, so Z-Image pads both,
    with a different time per sample."""
    x = model.random_inputs(batch, 80, text=40, seed=seed())
    time = "t" if "t" in x else "timestep"
    x[time] = torch.rand(batch)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in x.items()}


def run(model: nn.Module, x: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**x).float()


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def tiny(arch: str, variant: str = "tiny") -> dict:
    return REGISTRY[arch].tiny[variant]


# --- layout --------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", RUNNABLE)
def test_state_dict_is_the_single_file_layout(arch):
    a = REGISTRY[arch]
    for config in [*a.variants.values(), *a.tiny.values()]:
        model = build_model(a, config)
        assert {n: tuple(t.shape) for n, t in model.state_dict().items()} == a.tensor_shapes(config)
        assert all(t.is_meta for t in model.state_dict().values())


def test_full_size_models_have_their_published_sizes():
    billions = {"flux2-klein-4b": 3.88, "flux2-klein-9b": 9.08, "chroma1-hd": 8.90, "zimage-turbo": 6.15,
                "flux1-dev": 11.90, "flux1-schnell": 11.89, "qwen-image": 20.43}
    for name, size in billions.items():
        arch, config, _ = named_config(name)
        params = sum(p.numel() for p in build_model(arch, config).parameters())
        assert params / 1e9 == pytest.approx(size, abs=0.01), name


# --- fidelity ------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,config", FIDELITY_CONFIGS)
def test_output_matches_diffusers(arch, config):
    import diffusers

    a = REGISTRY[arch]
    ours = random_model(a, config, CPU, torch.float32, seed=seed())
    kwargs = diffusers_kwargs(arch, config)
    if arch == "flux2":
        kwargs["axes_dims_rope"] = (config["head_dim"] // 4,) * 4
    reference = getattr(diffusers, a.diffusers_class)(**kwargs).eval()
    # the diffusers weights are ours split and renamed through the architecture's one rule table
    reference.load_state_dict(to_diffusers(a, ours.state_dict(), config), strict=True)
    x = inputs(ours)
    with torch.no_grad():
        if arch == "zimage":
            out = reference([i[:, None] for i in x["x"]], x["t"], list(x["cap"]), return_dict=False)[0]
            expected = torch.stack([o[:, 0] for o in out])
        else:
            expected = reference(
                hidden_states=x["img"], encoder_hidden_states=x["txt"], timestep=x["timestep"],
                img_ids=x["img_ids"], txt_ids=x["txt_ids"], return_dict=False,
                **({"guidance": x["guidance"]} if "guidance" in x else {}),
                **({"pooled_projections": x["y"]} if "y" in x else {}),
            )[0]  # fmt: skip
    actual = run(ours, x)
    assert actual.shape == expected.shape
    assert expected.std() > 0.1
    assert rel_error(actual, expected) < 1e-5


# --- loading checkpoints -------------------------------------------------------------------------


def load(path, stored=Int8Layers) -> nn.Module:
    with CheckpointReader(path) as reader:
        return load_model(reader, CPU, torch.float32, stored=stored)[0]


def from_tensors(arch: str, tensors: dict[str, torch.Tensor], variant: str = "tiny") -> nn.Module:
    model = REGISTRY[arch].build_module(tiny(arch, variant)).eval()
    model.load_state_dict({n: t.float() for n, t in tensors.items()})
    return model


@pytest.mark.parametrize("arch", RUNNABLE)
@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_single_file_loads_as_written(tmp_path, arch, prefix):
    ckpt = write_single_file(tmp_path / "m.safetensors", arch, prefix=prefix)
    model = load(ckpt.path)
    assert all(t.dtype == torch.float32 and t.device == CPU for t in model.state_dict().values())
    expected = {n: t.float() for n, t in ckpt.reference.items()}
    assert all(torch.equal(t, expected[n]) for n, t in model.state_dict().items())


@pytest.mark.parametrize("arch", RUNNABLE)
def test_diffusers_folder_loads_through_the_rules(tmp_path, arch):
    tensors = random_tensors(arch)
    model = load(write_diffusers(tmp_path / "m", arch, tensors=tensors).path)
    x = inputs(model)
    assert torch.equal(run(model, x), run(from_tensors(arch, tensors), x))
    if arch == "zimage":  # unused and absent from the diffusers layout: initial value
        assert torch.equal(model.norm_final.weight, torch.ones(tiny(arch)["dim"]))


@pytest.mark.parametrize("fmt", ["fp8_scaled", "fp8_comfy_quant"])
def test_fp8_loads_dequantized(tmp_path, fmt):
    ckpt = write_single_file(tmp_path / "m.safetensors", "chroma", fmt=fmt)
    model = load(ckpt.path)
    assert not any(isinstance(m, Int8Linear) for m in model.modules())
    x = inputs(model)
    assert torch.equal(run(model, x), run(from_tensors("chroma", ckpt.reference), x))


@pytest.mark.parametrize("arch", RUNNABLE)
@pytest.mark.parametrize("scheme", ["tensorwise", "rowwise"])
def test_int8_file_loads_into_int8_layers(tmp_path, arch, scheme):
    tensors = random_tensors(arch)
    ckpt = write_single_file(tmp_path / "m.safetensors", arch, fmt=f"int8_{scheme}", tensors=tensors)
    model = load(ckpt.path)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, Int8Linear)}
    assert {f"{n}.weight" for n in layers} == {n for n, t in ckpt.tensors.items() if t.dtype == torch.int8}
    for name, layer in layers.items():
        assert torch.equal(layer.weight, ckpt.tensors[f"{name}.weight"])
        assert layer.weight_scale.dtype == torch.float32
        assert (layer.weight_scale.ndim == 0) == (scheme == "tensorwise")
    x = inputs(model)
    reference = run(from_tensors(arch, tensors), x)
    assert rel_error(run(model, x), reference) < 0.06
    dequantized = load(ckpt.path, DEQUANTIZED)
    assert not any(isinstance(m, Int8Linear) for m in dequantized.modules())
    assert rel_error(run(dequantized, x), reference) < 0.06


@pytest.mark.parametrize(
    "arch,missing,label",
    [("flux2", "double_blocks.1.img_mlp.0.weight", "Flux.2"), ("flux1", "single_blocks.2.modulation.lin.bias", "Flux.1")],
)
def test_missing_tensor_is_named(tmp_path, arch, missing, label):
    tensors = random_tensors(arch)
    del tensors[missing]
    ckpt = write_single_file(tmp_path / "m.safetensors", arch, prefix="diffusion_model.", tensors=tensors)
    with pytest.raises(ModelLayoutError) as err:
        load(ckpt.path)
    assert str(err.value) == f"{label} model without tensor diffusion_model.{missing}: the file is incomplete"


def test_extra_tensor_is_named(tmp_path):
    tensors = random_tensors("chroma") | {"nerf_blocks.0.param_generator.weight": torch.randn(32, 32)}
    ckpt = write_single_file(tmp_path / "m.safetensors", "chroma", tensors=tensors)
    with pytest.raises(ModelLayoutError) as err:
        load(ckpt.path)
    assert str(err.value) == (
        "Chroma custom: tensor nerf_blocks.0.param_generator.weight has no place in the Chroma module: "
        "this variant cannot be run"
    )


def test_inconsistent_shape_is_named(tmp_path):
    tensors = random_tensors("zimage")
    tensors["layers.2.attention.out.weight"] = torch.randn(64, 32)
    ckpt = write_single_file(tmp_path / "m.safetensors", "zimage", tensors=tensors)
    with pytest.raises(ModelLayoutError) as err:
        load(ckpt.path)
    assert str(err.value) == (
        "Z-Image model whose tensors do not fit its architecture (wrong shapes): layers.2.attention.out.weight "
        "is [64, 32], expected [64, 64]: the file is damaged or not a Z-Image model"
    )


def test_model_without_module_is_refused():
    class Unrunnable(Architecture):
        label = "Unrunnable"

    with pytest.raises(NoModuleError) as err:
        Unrunnable().build_module({})
    # the registry's runnable families, in detection order (later ones may follow)
    message = str(err.value)
    assert message.startswith(
        "Unrunnable models cannot be run by INT8 Studio's engine (models that can: Flux.2, Chroma, Z-Image, Flux.1"
    )
    assert message.endswith("; they run in ComfyUI with INT8 Studio's node pack")


def test_unknown_model_name():
    with pytest.raises(UnknownModelNameError) as err:
        named_config("flux3-giant")
    assert str(err.value).startswith(
        "'flux3-giant' is neither a checkpoint file nor a known model; known models: flux2-klein-4b, "
    )
    assert "zimage-tiny" in str(err.value)


# --- random weights and quantization -------------------------------------------------------------


@pytest.mark.parametrize("arch", RUNNABLE)
def test_random_model_is_reproducible(arch):
    a, s = REGISTRY[arch], seed()
    first, second = (random_model(a, tiny(arch), CPU, torch.bfloat16, seed=s) for _ in range(2))
    other = random_model(a, tiny(arch), CPU, torch.bfloat16, seed=s + 1)
    for (name, p), q, r in zip(
        first.state_dict().items(), second.state_dict().values(), other.state_dict().values()
    ):
        assert p.dtype == torch.bfloat16 and not p.is_meta, name
        assert torch.equal(p, q) and not torch.equal(p, r), name
    out = run(first, inputs(first, dtype=torch.bfloat16))
    assert torch.isfinite(out).all() and 0.1 < out.std() < 10


@pytest.mark.parametrize("arch", RUNNABLE)
@pytest.mark.parametrize("scheme", ["tensorwise", "rowwise"])
def test_quantize_model_follows_the_high_precision_rules(arch, scheme):
    a = REGISTRY[arch]
    model = random_model(a, tiny(arch), CPU, torch.bfloat16, seed=seed())
    x = inputs(model, dtype=torch.bfloat16)
    reference = run(model, x)
    eligible = {
        name for name, shape in a.tensor_shapes(tiny(arch)).items() if not a.keeps_high_precision(name, shape)
    }
    assert quantize_model(model, a, scheme) == len(eligible)
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, Int8Linear)):
            assert isinstance(module, Int8Linear) == (f"{name}.weight" in eligible), name
    assert set(model.state_dict()) >= set(a.tensor_shapes(tiny(arch)))
    out = run(model, x)
    # tiny random models: 1–3% typical, up to ~4.5% seen over many seeds; a broken layer gives ~100%
    assert rel_error(out, reference) < 0.06
    assert torch.cosine_similarity(out.flatten(), reference.flatten(), dim=0) > 0.998


def one_float_layer_at_a_time(model: nn.Module, a, make):
    """``make``, checking at each call that the layer it converts is the model's only materialized
    float linear the architecture allows to quantize."""

    def checked(name: str, linear: nn.Linear) -> nn.Module:
        floats = [
            f"{n}.weight"
            for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and not m.weight.is_meta
            and not a.keeps_high_precision(f"{n}.weight", tuple(m.weight.shape))
        ]  # fmt: skip
        assert floats == [name]
        return make(name, linear)

    return checked


@pytest.mark.parametrize("arch", RUNNABLE)
def test_random_model_converted_while_drawn(arch):
    """Each eligible layer is quantized as soon as it is drawn: the same model as quantizing after."""
    a, s = REGISTRY[arch], seed()
    after = random_model(a, tiny(arch), CPU, torch.bfloat16, seed=s)
    quantize_model(after, a)
    model = build_model(a, tiny(arch))
    random_filler(a, CPU, torch.bfloat16, s, one_float_layer_at_a_time(model, a, quantizer(a)))(model, lambda _: True)
    assert model.state_dict().keys() == after.state_dict().keys()
    assert all(torch.equal(t, after.state_dict()[n]) for n, t in model.state_dict().items())


@pytest.mark.parametrize("arch", RUNNABLE)
@pytest.mark.parametrize("fmt", ["float", "int8_rowwise"])
def test_checkpoint_converted_while_read(tmp_path, arch, fmt):
    """A float file's eligible layers are replaced as they are read; an int8 file's layers, dequantized,
    too (what the fp8 benchmark format does with an int8 file)."""
    ckpt = write_single_file(tmp_path / "m.safetensors", arch, fmt=fmt)
    with CheckpointReader(ckpt.path) as reader:
        after, detected = load_model(reader, CPU, torch.float32, stored=DEQUANTIZED)
        quantize_model(after, detected.arch, "tensorwise")
        model = build_model(detected.arch, detected.config)
        make = one_float_layer_at_a_time(model, detected.arch, quantizer(detected.arch, "tensorwise"))
        checkpoint_filler(reader, detected, CPU, torch.float32, make=make, stored=Int8Layers(reader, detected, torch.float32, True))(model, lambda _: True)
    assert all(torch.equal(t, after.state_dict()[n]) for n, t in model.state_dict().items())
    assert sum(isinstance(m, Int8Linear) for m in model.modules()) > 0


@pytest.mark.parametrize("arch", RUNNABLE)
def test_streamed_blocks_give_the_whole_models_output(tmp_path, arch):
    """One block's weights at a time, random or read from a file: the same output, bit for bit, and
    no block holds weights after the call."""
    a, s = REGISTRY[arch], seed()
    whole = random_model(a, tiny(arch), CPU, torch.bfloat16, seed=s)
    x = inputs(whole, dtype=torch.bfloat16)
    ckpt = write_single_file(tmp_path / "m.safetensors", arch, fmt="int8_rowwise")
    with CheckpointReader(ckpt.path) as reader:
        detected = detect(reader)
        from_file = load_model(reader, CPU, torch.bfloat16, stored=DEQUANTIZED)[0]
        sources = [
            (whole, random_filler(a, CPU, torch.bfloat16, s)),
            (from_file, checkpoint_filler(reader, detected, CPU, torch.bfloat16, stored=Int8Layers(reader, detected, torch.bfloat16, True))),
        ]
        for reference, fill in sources:
            with streamed_blocks(build_model(a, tiny(arch)), fill) as model:
                assert torch.equal(run(model, x), run(reference, x))
                assert torch.equal(run(model, x), run(reference, x))  # a second call refills the blocks
            lists = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, nn.ModuleList))
            tensors = model.state_dict()
            assert any(n.startswith(lists) for n in tensors)
            assert all(t.is_meta == n.startswith(lists) for n, t in tensors.items()), tensors


@pytest.mark.parametrize("arch", RUNNABLE)
def test_compiles_without_graph_breaks(arch):
    a = REGISTRY[arch]
    model = random_model(a, tiny(arch), CPU, torch.float32, seed=seed())
    quantize_model(model, a)
    x = inputs(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    assert rel_error(run(compiled, x), run(model, x)) < 1e-6


def test_zimage_rope_tables_are_built_once_per_shape():
    from engine.models.layers import position_ids, rope
    from engine.models.zimage_module import ROTATIONS_KEPT

    model = random_model(REGISTRY["zimage"], tiny("zimage"), CPU, torch.float32, seed=seed())
    x = inputs(model)
    with torch.inference_mode():
        first = model(**x)
    assert list(model._rotations) == [(64, 5, 5, CPU)]  # 40 text tokens and 5 × 5 patches, padded
    tables = model.rotations(64, 5, 5, CPU)
    cap_pe, img_pe, pe = tables
    assert torch.equal(cap_pe, rope(position_ids(range(1, 65), 1, 1), model.axes_dims, model.theta))
    assert torch.equal(img_pe[:25], rope(position_ids(range(65, 66), 5, 5), model.axes_dims, model.theta))
    assert torch.equal(img_pe[25:], rope(torch.zeros(7, 3, dtype=torch.long), model.axes_dims, model.theta))
    assert torch.equal(pe, torch.cat([img_pe, cap_pe])) and img_pe.shape[0] == 32
    # kept across steps, built under inference mode yet usable where autograd records
    out = model.requires_grad_(True)(**x)
    assert model.rotations(64, 5, 5, CPU) is tables and not img_pe.is_inference()
    assert torch.equal(out.detach(), first)
    out.float().square().mean().backward()
    for shape in range(ROTATIONS_KEPT):
        model.rotations(32, 1, shape + 1, CPU)
    assert model.rotations(64, 5, 5, CPU) is not tables and len(model._rotations) == ROTATIONS_KEPT

"""Qwen-Image in our engine: the module against diffusers' QwenImageTransformer2DModel, its RoPE
positions, int8 conversion, the CPU benchmark of the tiny model and the LoRA layouts published for it
(what every runnable family must do is in test_modules.py, every LoRA format in test_lora.py)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from engine.bench import BenchRequest, run_bench
from engine.checkpoint import CheckpointReader
from engine.convert import ConvertRequest, run_convert
from engine.int8 import linear, ops
from engine.int8.apply import quantize_model
from engine.int8.linear import Int8Linear
from engine.models import REGISTRY, ModelLayoutError, detect
from engine.models.build import random_model
from engine.models.layers import position_ids, rope
from tests.test_lora import merge, strength, tiny_model
from tests.test_models import diffusers_kwargs
from tests.test_modules import CPU, load, rel_error, run, seed
from tests.tiny_checkpoints import (
    random_tensors,
    to_diffusers,
    write_diffusers,
    write_single_file,
)
from tests.tiny_loras import write_lora

QWEN = REGISTRY["qwen_image"]
TINY = QWEN.tiny["tiny"]


def diffusers_output(reference, x: dict[str, torch.Tensor]) -> torch.Tensor:
    """diffusers' output for our inputs: it takes the latents packed (2×2 patches, channel-major, as
    its pipeline packs them) with each image's (frames, rows, columns)."""
    batch, channels, height, width = x["x"].shape
    rows, cols = height // 2, width // 2
    packed = x["x"].view(batch, channels, rows, 2, cols, 2).permute(0, 2, 4, 1, 3, 5).reshape(batch, rows * cols, -1)
    with torch.no_grad():
        out = reference(hidden_states=packed, encoder_hidden_states=x["txt"], timestep=x["t"],
                        img_shapes=[(1, rows, cols)] * batch, return_dict=False)[0]  # fmt: skip
    return out.view(batch, rows, cols, channels, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(x["x"].shape)


@pytest.mark.parametrize("height,width,text", [(10, 10, 40), (6, 14, 7), (16, 4, 1)])
def test_output_matches_diffusers(height, width, text):
    """Even and odd patch grids (5 × 5 is centred differently by ComfyUI: we follow diffusers), wide
    and tall images, short and long prompts, a different time per sample."""
    import diffusers

    ours = random_model(QWEN, TINY, CPU, torch.float32, seed=seed())
    reference = diffusers.QwenImageTransformer2DModel(**diffusers_kwargs("qwen_image", TINY)).eval()
    # the diffusers weights are ours through the architecture's rule table (identical names)
    reference.load_state_dict(to_diffusers(QWEN, ours.state_dict(), TINY), strict=True)
    g = torch.Generator().manual_seed(seed())
    channels = TINY["in_channels"] // 4
    x = {"x": torch.randn(2, channels, height, width, generator=g), "t": torch.rand(2, generator=g),
         "txt": torch.randn(2, text, TINY["text_dim"], generator=g)}  # fmt: skip
    expected, actual = diffusers_output(reference, x), run(ours, x)
    assert actual.shape == expected.shape and expected.std() > 0.1
    assert rel_error(actual, expected) < 1e-5


def test_rope_positions():
    """Image patches at (0, row, column) centred on 0, text at max(rows, columns) // 2 onwards on all
    three axes; head_dim / 8, 7/16, 7/16 channels per axis."""
    model = random_model(QWEN, TINY, CPU, torch.float32, seed=seed())
    assert model.axes_dims == (4, 14, 14)
    img_pe, txt_pe = model.rotations(3, 6, 5, CPU)
    assert torch.equal(img_pe, rope(position_ids(1, range(-2, 1), range(-3, 3)), model.axes_dims, model.theta))
    assert torch.equal(txt_pe, rope(torch.arange(3, 8)[:, None].expand(-1, 3), model.axes_dims, model.theta))


def test_converted_file_runs_in_int8(tmp_path):
    """``convert`` of a bf16 single file, loaded into our module: every block linear int8 but the
    modulation, the output close to the float model's."""
    source = write_single_file(tmp_path / "qwen.safetensors", "qwen_image")
    result = run_convert(ConvertRequest(source.path, scheme="rowwise", device="cpu"))
    model = load(result.output)
    int8 = {n for n, m in model.named_modules() if isinstance(m, Int8Linear)}
    assert int8 == {n.removesuffix(".weight") for n, s in QWEN.tensor_shapes(TINY).items()
                    if n.startswith("transformer_blocks.") and len(s) == 2 and "_mod." not in n}  # fmt: skip
    reference = load(source.path)
    x = reference.random_inputs(2, 80, text=40, seed=seed())
    assert rel_error(run(model, x), run(reference, x)) < 0.06


def test_each_streams_q_k_v_quantize_their_input_once(monkeypatch):
    """Three projections of one normalized input: one quantization for the three (the same values each
    would compute), not one each."""
    model = random_model(QWEN, TINY, CPU, torch.float32, 0)
    quantize_model(model, QWEN, "rowwise", "none")
    x = model.random_inputs(1, 64, text=8, seed=seed())
    quantized = []

    def counting(*args, **kwargs):
        quantized.append(args)
        return ops.quantize_input(*args, **kwargs)

    monkeypatch.setattr(linear, "quantize_input", counting)
    shared = run(model, x)
    assert len(quantized) == 2 * TINY["layers"]  # q|k|v of each stream, each block
    monkeypatch.setattr(Int8Linear, "prepared_input", lambda *args: None)
    assert torch.equal(shared, run(model, x))


def test_a_diffusers_file_alone_or_in_its_folder(tmp_path):
    """diffusers' transformer saved as one file: beside its config.json a diffusers model, alone a
    single file (the names are the same); either way the same model and tensors."""
    tensors = random_tensors("qwen_image")
    folder = write_diffusers(tmp_path / "model", "qwen_image", tensors=tensors, shards=1).path
    (inside,) = (folder / "transformer").glob("*.safetensors")
    alone = shutil.copy(inside, tmp_path / "qwen-image.safetensors")
    for path, layout in ((inside, "diffusers"), (alone, "single-file")):
        with CheckpointReader(path) as reader:
            model = detect(reader)
            built = {t.name: t.build([reader.get(s) for s in t.sources]) for t in model.tensors}
        assert (model.arch, model.layout, model.config) == (QWEN, layout, TINY)
        assert built.keys() == tensors.keys() and all(torch.equal(built[n], t) for n, t in tensors.items())


@pytest.mark.parametrize("extra", ["__index_timestep_zero__", "time_text_embed.addition_t_embedding.weight"])
def test_edit_2511_and_layered_convert_but_do_not_run(tmp_path, extra):
    """Their extra tensor (Edit 2511's marker, Layered's second time condition) is kept by conversion,
    so ComfyUI tells them apart (test_comfyui_detection); our module has no place for it."""
    shape = (0,) if extra.startswith("__") else (2, TINY["hidden"])
    tensors = random_tensors("qwen_image") | {extra: torch.zeros(shape, dtype=torch.bfloat16)}
    source = write_single_file(tmp_path / "qwen.safetensors", "qwen_image", tensors=tensors)
    output = run_convert(ConvertRequest(source.path, scheme="rowwise", device="cpu")).output
    with CheckpointReader(output) as reader:
        assert reader.tensors[extra].dtype == "BF16" and tuple(reader.tensors[extra].shape) == shape
    with pytest.raises(ModelLayoutError) as err:
        load(output)
    assert str(err.value) == (
        f"Qwen-Image custom: tensor {extra} has no place in the Qwen-Image module: this variant cannot be run"
    )


def test_a_diffusers_edit_2511_converts_with_comfyuis_marker(tmp_path):
    """diffusers tells Edit 2511 by ``zero_cond_t`` in config.json, ComfyUI by an empty tensor: the
    converted file gets the tensor, so ComfyUI runs its reference images as 2511 wants."""
    folder = write_diffusers(tmp_path / "model", "qwen_image").path
    config = folder / "transformer" / "config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"zero_cond_t": True}))
    output = run_convert(ConvertRequest(folder, output=tmp_path / "edit-2511.safetensors", device="cpu")).output
    with CheckpointReader(output) as reader:
        marker = reader.tensors["__index_timestep_zero__"]
        assert (marker.dtype, tuple(marker.shape)) == ("F32", (0,))
        assert reader.get("__index_timestep_zero__").numel() == 0


def test_bench_on_the_cpu():
    result = run_bench(BenchRequest("qwen_image-tiny", resolution=64, steps=1, warmup=1, formats=("bf16", "int8"),
                                    text_tokens=24, device="cpu"))  # fmt: skip
    rows = {row.format: row for row in result.rows}
    assert list(rows) == ["bf16", "int8"] and result.model == "Qwen-Image tiny (random weights)"
    assert (result.image_tokens, result.text_tokens) == (16, 24)
    assert all(row.seconds_per_step > 0 for row in rows.values())
    assert 1e-4 < rows["int8"].relative_error < 0.06 and rows["int8"].cosine > 0.998


# Qwen-Image LoRAs as published, made from the tiny LoRA writer's formats by renaming their prefix:
# layout → (writer format, its prefix, the published prefix, what the report calls it). Qwen-Image's
# single files use diffusers' names, so the ComfyUI and ai-toolkit layouts are the same.
LORA_LAYOUTS = {
    "musubi-tuner / kohya": ("kohya", "lora_unet_", "lora_unet_", "kohya LoRA"),
    "diffusers / PEFT": ("diffusers", "transformer.", "transformer.", "diffusers/PEFT LoRA"),
    "ComfyUI / ai-toolkit": ("comfyui_ab", "diffusion_model.", "diffusion_model.", "ComfyUI LoRA"),
    "Lightning (no prefix)": ("comfyui", "diffusion_model.", "", "ComfyUI LoRA"),
    "SimpleTuner LyCORIS": ("kohya", "lora_unet_", "lycoris_", "LyCORIS LoRA"),
}


@pytest.mark.parametrize("layout", LORA_LAYOUTS)
def test_published_lora_layouts_merge_like_the_float_reference(tmp_path, layout):
    fmt, prefix, published, label = LORA_LAYOUTS[layout]
    model = tiny_model(tmp_path, "qwen_image")
    lora = write_lora(tmp_path / "lora.safetensors", "qwen_image", fmt)
    if published != prefix:
        lora.tensors = {published + k.removeprefix(prefix): t for k, t in lora.tensors.items()}
        save_file(lora.tensors, str(lora.path))
    s = strength()
    result, merged = merge(tmp_path, model, (lora, s))
    (report,) = result.matches
    assert (report.format, report.unmatched, report.matched_keys) == (label, (), len(lora.tensors))
    expected = lora.merged(model.reference, s)
    assert result.tensors_changed == len(expected) == 14 * TINY["layers"] + 6  # every linear
    for name, tensor in merged.items():
        if name in expected:
            torch.testing.assert_close(tensor.double(), expected[name], rtol=1e-5, atol=1e-6, msg=name)
        else:
            assert torch.equal(tensor, model.reference[name]), name

"""Models whose tensors do not fit their architecture, or hold NaN/Inf, are refused by convert and by
lora merge with a message naming each tensor (issue 23, item 3), and tensors too large for memory are
refused before they are allocated (item 2); Z-Image's norm_final is filled in from a diffusers folder
and required of a single file (item 6)."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from engine.checkpoint import CheckpointReader
from engine.models.build import load_model
from tests.reliability import refused
from tests.tiny_checkpoints import random_tensors, write_diffusers, write_single_file
from tests.tiny_loras import write_lora

DAMAGE = "the file is damaged or not a {} model"


def zimage_case(change):
    def make():
        t = random_tensors("zimage")
        change(t)
        return "zimage", t

    return make


def flux2_case(change):
    def make():
        t = random_tensors("flux2")
        change(t)
        return "flux2", t

    return make


def _set(name, value):
    return lambda t: t.__setitem__(name, value(t[name]).contiguous())


def _drop(*names):
    return lambda t: [t.pop(n) for n in names]


def _poke(name, index, value):
    return lambda t: t[name].__setitem__(index, value)


FIT = "Z-Image model whose tensors do not fit its architecture"
CASES = {
    "zero-size weight": (
        zimage_case(_set("layers.0.feed_forward.w1.weight", lambda w: w[:0])),
        f"{FIT} (empty tensors): layers.0.feed_forward.w1.weight is empty ([0, 64]): {DAMAGE.format('Z-Image')}",
    ),
    "zero-size norm": (
        zimage_case(_set("layers.1.ffn_norm2.weight", lambda w: w[:0])),
        f"{FIT} (empty tensors): layers.1.ffn_norm2.weight is empty ([0]): {DAMAGE.format('Z-Image')}",
    ),
    "transposed weight": (
        zimage_case(_set("layers.1.feed_forward.w2.weight", lambda w: w.T)),
        f"{FIT} (wrong shapes): layers.1.feed_forward.w2.weight is [160, 64], expected [64, 160]: "
        + DAMAGE.format("Z-Image"),
    ),
    "transposed weight, Flux.2": (
        flux2_case(_set("single_blocks.1.linear2.weight", lambda w: w.T)),
        (
            "Flux.2 model whose tensors do not fit its architecture (wrong shapes): "
            f"single_blocks.1.linear2.weight is [256, 64], expected [64, 256]: {DAMAGE.format('Flux.2')}"
        ),
    ),
    "fused qkv with rows missing": (
        zimage_case(_set("layers.0.attention.qkv.weight", lambda w: w[:-8])),
        f"{FIT} (wrong shapes): layers.0.attention.qkv.weight is [184, 64], expected [192, 64]: "
        + DAMAGE.format("Z-Image"),
    ),
    "a block missing a layer": (
        zimage_case(_drop("layers.1.feed_forward.w3.weight")),
        "Z-Image model without tensor layers.1.feed_forward.w3.weight: the file is incomplete",
    ),
    "two blocks missing layers": (
        zimage_case(_drop("layers.1.feed_forward.w3.weight", "noise_refiner.0.attention.out.weight")),
        (
            "Z-Image model without tensors noise_refiner.0.attention.out.weight, "
            "layers.1.feed_forward.w3.weight: the file is incomplete"
        ),
    ),
    "a vector where a matrix belongs": (
        zimage_case(_set("layers.0.attention.out.weight", lambda w: w[0])),
        f"{FIT} (wrong number of dimensions): layers.0.attention.out.weight is 1-D [64], not a matrix: "
        + DAMAGE.format("Z-Image"),
    ),
    "a vector where a matrix belongs, Flux.2": (
        flux2_case(_set("double_blocks.0.img_attn.qkv.weight", lambda w: w[:, 0])),
        (
            "Flux.2 model whose tensors do not fit its architecture (wrong number of dimensions): "
            f"double_blocks.0.img_attn.qkv.weight is 1-D [192], not a matrix: {DAMAGE.format('Flux.2')}"
        ),
    ),
    "a number where a vector belongs": (
        zimage_case(_set("layers.0.attention_norm1.weight", lambda w: w[0])),
        f"{FIT} (wrong number of dimensions): layers.0.attention_norm1.weight is 0-D [], not a vector: "
        + DAMAGE.format("Z-Image"),
    ),
    "single file without norm_final": (
        zimage_case(_drop("norm_final.weight")),
        "Z-Image model without tensor norm_final.weight: the file is incomplete",
    ),
}
NOT_FINITE = {
    "NaN in a norm (kept)": (zimage_case(_poke("layers.0.attention_norm1.weight", 3, float("nan"))),
                             "layers.0.attention_norm1.weight"),
    "Inf in a weight (quantized)": (zimage_case(_poke("layers.1.feed_forward.w1.weight", (0, 0), float("inf"))),
                                    "layers.1.feed_forward.w1.weight"),
    "-Inf in a Flux.2 weight": (flux2_case(_poke("final_layer.linear.weight", (0, 0), float("-inf"))),
                                "final_layer.linear.weight"),
}  # fmt: skip


def write(tmp_path, make):
    arch, tensors = make()
    folder = tmp_path / "in"
    folder.mkdir()
    model = write_single_file(folder / "model.safetensors", arch, tensors=tensors).path
    lora = write_lora(folder / "lora.safetensors", arch, "kohya").path
    return folder, model, lora


@pytest.mark.parametrize("case", list(CASES))
def test_models_that_do_not_fit_their_architecture_are_refused(tmp_path, capsys, case):
    make, message = CASES[case]
    folder, model, lora = write(tmp_path, make)
    assert refused(capsys, folder, "convert", model) == message
    assert refused(capsys, folder, "lora", "merge", model, lora, "-o", folder / "merged.safetensors") == message


@pytest.mark.parametrize("case", list(NOT_FINITE))
def test_nan_and_inf_are_reported_wherever_they_are(tmp_path, capsys, case):
    make, name = NOT_FINITE[case]
    folder, model, lora = write(tmp_path, make)
    message = f"model.safetensors: tensor '{name}' has NaN or Inf values (the file is corrupt); download or export it again"
    assert refused(capsys, folder, "convert", model) == message
    assert refused(capsys, folder, "lora", "merge", model, lora, "-o", folder / "merged.safetensors") == message


def test_nan_in_an_int8_models_scale_is_reported_by_merge(tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    ckpt = write_single_file(folder / "model.safetensors", "zimage", fmt="int8_rowwise")
    tensors = dict(ckpt.tensors)
    tensors["layers.0.attention.out.weight_scale"] = tensors["layers.0.attention.out.weight_scale"].clone()
    tensors["layers.0.attention.out.weight_scale"][2] = float("nan")
    from safetensors.torch import save_file

    save_file({n: t.contiguous() for n, t in tensors.items()}, str(ckpt.path))
    lora = write_lora(folder / "lora.safetensors", "zimage", "kohya").path
    message = refused(capsys, folder, "lora", "merge", ckpt.path, lora, "-o", folder / "merged.safetensors")
    assert message == (
        "model.safetensors: tensor 'layers.0.attention.out.weight_scale' has NaN or Inf values (the file is "
        "corrupt); download or export it again"
    )


@pytest.mark.parametrize("shards", [1, 2])
def test_zimage_from_diffusers_converts_to_a_complete_file(tmp_path, capsys, shards):
    """The diffusers layout has no norm_final: the single file gets its module's initial value, ones,
    so that our loader (and ComfyUI, whose loader wants every key) accept it."""
    ckpt = write_diffusers(tmp_path / "model", "zimage", shards=shards)
    from engine.cli import main

    assert main(["convert", str(ckpt.path), "-o", str(tmp_path / "z.safetensors")]) == 0
    with safe_open(str(tmp_path / "z.safetensors"), "pt") as f:
        norm = f.get_tensor("norm_final.weight")
    assert norm.dtype == torch.bfloat16 and torch.equal(norm, torch.ones(ckpt.config["dim"], dtype=torch.bfloat16))
    assert main(["convert", str(ckpt.path), "--keep", "*", "-o", str(tmp_path / "f.safetensors")]) == 0
    with CheckpointReader(tmp_path / "f.safetensors") as reader:  # our loader takes it: nothing missing
        load_model(reader, torch.device("cpu"))


def test_a_tensor_larger_than_memory_is_refused_before_building_it(tmp_path, capsys, monkeypatch):
    """Each source fits in memory, but what convert builds from them (q|k|v of a diffusers folder, a
    float32 copy to quantize) does not: refused before allocating, not a RuntimeError."""
    ckpt = write_diffusers(tmp_path / "model", "zimage", shards=1)
    import engine.checkpoint

    monkeypatch.setattr(engine.checkpoint, "available_memory", lambda: 40_000)  # 40 KB: a q/k/v part fits
    message = refused(capsys, tmp_path, "convert", ckpt.path)
    assert message.startswith("tensor 'context_refiner.0.attention.qkv.weight' needs ") and message.endswith(
        " of memory, 40.0 KB is free: the file is damaged, or too large for this computer"
    )

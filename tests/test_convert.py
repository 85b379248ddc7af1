"""The conversion job on tiny checkpoints with the real key layouts: every architecture and layout,
the numbers in the written file, the source left untouched, and every way it can refuse or fail."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from fnmatch import fnmatchcase
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import engine.checkpoint_writer
from engine.checkpoint import (
    CheckpointError,
    CheckpointReader,
    format_bytes,
)
from engine.checkpoint_writer import CheckpointWriter
from engine.convert import ConvertError, ConvertRequest, default_output, run_convert
from engine.int8.choices import DEFAULT_SCHEME
from engine.int8.rotation import hadamard
from engine.info import inspect_checkpoint
from engine.jobs import Cancelled, CancelToken, OutputExistsError, Progress
from engine.models import UnknownModelError, detect, supported_text
from engine.int8.apply import Int8Layers
from engine.models.build import load_model
from tests.tiny_checkpoints import (
    TinyCheckpoint,
    every_tiny_variant,
    write_diffusers,
    write_single_file,
)

MARKER = b'{"format": "int8_tensorwise"}'
SCHEMES = ("tensorwise", "rowwise")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden partial files included) → its SHA-256."""
    return {str(p.relative_to(folder)): sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118 (safe_open has no __iter__)


def assert_faithful(ckpt: TinyCheckpoint, output: Path, scheme: str, keep: tuple[str, ...] = ()) -> set[str]:
    """The written file against what the source holds; returns the quantized layers.

    Quantized: int8 in [-127, 127], float32 scale of the scheme's shape, the ComfyUI marker, and
    within half a step (plus float32 rounding) of the source. Everything else: byte-identical.
    """
    tensors, metadata = load(output)
    quantized = set()
    for name, ref in ckpt.reference.items():
        layer = name.removesuffix(".weight")
        if tensors[name].dtype != torch.int8:
            assert tensors[name].dtype == ref.dtype and torch.equal(tensors[name], ref), name
            continue
        quantized.add(layer)
        q, scale = tensors[name], tensors[f"{layer}.weight_scale"]
        assert scale.dtype == torch.float32
        assert scale.shape == (() if scheme == "tensorwise" else (ref.shape[0], 1))
        assert q.abs().max() <= 127
        assert bytes(tensors[f"{layer}.comfy_quant"].tolist()) == MARKER
        err = (q.double() * scale.double() - ref.double()).abs()
        assert (err <= scale.double() * (0.5 + 1e-5)).all(), name
    expected = {
        n.removesuffix(".weight")
        for n, ref in ckpt.reference.items()
        if not ckpt.arch.keeps_high_precision(n, tuple(ref.shape))
        and not any(fnmatchcase(n, p) for p in keep)
    }
    assert quantized == expected
    added = {f"{layer}.{suffix}" for layer in quantized for suffix in ("weight_scale", "comfy_quant")}
    assert set(tensors) == set(ckpt.reference) | added
    layers = json.loads(metadata["_quantization_metadata"])["layers"]
    assert layers == {layer: {"format": "int8_tensorwise"} for layer in quantized}
    assert metadata["int8_studio.scheme"] == scheme
    assert metadata["int8_studio.architecture"] == ckpt.arch.name
    return quantized


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize(("arch", "variant"), every_tiny_variant())
def test_single_file_converts_faithfully(tmp_path, arch, variant, scheme):
    ckpt = write_single_file(tmp_path / "model.safetensors", arch, variant, prefix="model.diffusion_model.")
    before = sha256(ckpt.path)
    result = run_convert(ConvertRequest(ckpt.path, scheme=scheme))
    assert result.output == tmp_path / f"model-int8-{scheme}.safetensors"
    quantized = assert_faithful(ckpt, result.output, scheme)
    assert sha256(ckpt.path) == before
    assert result.quantized == len(quantized) > 0
    assert result.kept == len(ckpt.reference) - len(quantized)
    assert (result.bytes_in, result.bytes_out) == (ckpt.path.stat().st_size, result.output.stat().st_size)
    _, metadata = load(result.output)
    assert metadata["int8_studio.source_name"] == "model.safetensors"
    assert metadata["int8_studio.source_sha256"] == before
    assert metadata["int8_studio.source_format"] == "bf16"
    info = inspect_checkpoint(result.output)
    assert (info.architecture, info.prefix, info.marker_mismatches) == (arch, "", [])
    assert info.quantized_layers == {f"int8_{scheme}": len(quantized)}


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize(("arch", "variant"), every_tiny_variant(diffusers=True))
def test_diffusers_folder_converts_to_the_single_file_layout(tmp_path, arch, variant, scheme):
    ckpt = write_diffusers(tmp_path / "my-model", arch, variant, shards=2)
    before = snapshot(ckpt.path)
    result = run_convert(ConvertRequest(ckpt.path, scheme=scheme))
    assert result.output == tmp_path / f"my-model-int8-{scheme}.safetensors"
    assert_faithful(ckpt, result.output, scheme)
    assert snapshot(ckpt.path) == before
    _, metadata = load(result.output)
    shards = {Path(f).name: h for f, h in before.items() if f.endswith(".safetensors")}
    assert json.loads(metadata["int8_studio.source_sha256"]) == shards
    assert metadata["int8_studio.source_name"] == "my-model"


@pytest.mark.parametrize("fmt", ["fp8_scaled", "fp8_comfy_quant"])
def test_fp8_sources_are_dequantized_and_requantized(tmp_path, fmt):
    ckpt = write_single_file(tmp_path / "fp8.safetensors", "flux2", fmt=fmt)
    assert any(t.dtype == torch.float8_e4m3fn for t in ckpt.tensors.values())
    result = run_convert(ConvertRequest(ckpt.path, scheme="rowwise"))
    assert_faithful(ckpt, result.output, "rowwise")  # reference: the fp8 weights dequantized to bf16
    tensors, metadata = load(result.output)
    assert not [n for n in tensors if n.endswith(("scale_weight", "input_scale")) or n == "scaled_fp8"]
    assert metadata["int8_studio.source_format"] == "fp8_scaled"


@pytest.mark.parametrize("scheme", SCHEMES)
def test_already_int8_is_refused(tmp_path, scheme):
    ckpt = write_single_file(tmp_path / "q.safetensors", "zimage", fmt=f"int8_{scheme}")
    with pytest.raises(ConvertError) as e:
        run_convert(ConvertRequest(ckpt.path))
    assert str(e.value) == (
        f"q.safetensors is already INT8 (int8_{scheme}); convert the original bf16/fp8 checkpoint instead"
    )
    assert os.listdir(tmp_path) == ["q.safetensors"]


def test_keep_patterns_stay_in_high_precision(tmp_path):
    ckpt = write_single_file(tmp_path / "m.safetensors", "flux2")
    keep = ("double_blocks.*", "single_blocks.0.linear1.weight")
    result = run_convert(ConvertRequest(ckpt.path, keep=keep))
    quantized = assert_faithful(ckpt, result.output, DEFAULT_SCHEME, keep)
    assert quantized and all(layer.startswith("single_blocks.") for layer in quantized)
    _, metadata = load(result.output)
    assert json.loads(metadata["int8_studio.keep"]) == list(keep)


def test_zimage_edits_image_prompt_path_stays_in_high_precision(tmp_path):
    """Z-Image Omni/Edit files add a SigLIP embedder and refiner blocks (ComfyUI tells them by
    ``siglip_embedder.0.weight``): carried through as they are, none of their linears made int8."""
    siglip = {
        "siglip_embedder.0.weight": torch.randn(32),
        "siglip_embedder.1.weight": torch.randn(64, 32).bfloat16(),
        "siglip_refiner.0.attention.qkv.weight": torch.randn(192, 64).bfloat16(),
        "siglip_refiner.0.feed_forward.w2.weight": torch.randn(64, 160).bfloat16(),
        "siglip_pad_token": torch.randn(1, 64).bfloat16(),
    }
    ckpt = write_single_file(tmp_path / "m.safetensors", "zimage", extra=siglip)
    tensors, _ = load(run_convert(ConvertRequest(ckpt.path)).output)
    for name, t in siglip.items():
        assert tensors[name].dtype == t.dtype and torch.equal(tensors[name], t), name
    assert any(t.dtype == torch.int8 for t in tensors.values())


def test_keep_pattern_that_matches_nothing_is_refused(tmp_path):
    ckpt = write_single_file(tmp_path / "m.safetensors", "flux2")
    with pytest.raises(ConvertError) as e:
        run_convert(ConvertRequest(ckpt.path, keep=("double_block.*",)))
    assert str(e.value) == (
        "keep pattern 'double_block.*' matches no tensor of this Flux.2 model "
        "(names look like 'double_blocks.0.img_attn.proj.weight')"
    )
    assert os.listdir(tmp_path) == ["m.safetensors"]


@pytest.mark.parametrize("arch", sorted({arch for arch, _ in every_tiny_variant()}))
def test_first_blocks_keep_the_first_block_of_every_stack(tmp_path, arch):
    """``Architecture.first_blocks`` (the app's cautious preset): each pattern keeps layers that would
    be int8 otherwise, and no block but a first one is kept."""
    ckpt = write_single_file(tmp_path / "m.safetensors", arch)
    keep = ckpt.arch.first_blocks
    result = run_convert(ConvertRequest(ckpt.path, keep=keep))
    quantized = assert_faithful(ckpt, result.output, DEFAULT_SCHEME, keep)
    eligible = [n for n, r in ckpt.reference.items() if not ckpt.arch.keeps_high_precision(n, tuple(r.shape))]
    kept = {n.removesuffix(".weight") for n in eligible} - quantized
    assert keep and all(any(fnmatchcase(f"{layer}.weight", p) for layer in kept) for p in keep)
    assert all(".0." in layer for layer in kept) and quantized


def test_float32_leftovers_can_be_cast_to_bf16(tmp_path):
    ckpt = write_single_file(tmp_path / "m.safetensors", "chroma", dtype=torch.float32)
    plain = run_convert(ConvertRequest(ckpt.path, output=tmp_path / "plain.safetensors"))
    cast = run_convert(
        ConvertRequest(ckpt.path, output=tmp_path / "cast.safetensors", cast_float32_to_bf16=True)
    )
    plain_tensors, _ = load(plain.output)
    cast_tensors, _ = load(cast.output)
    assert plain_tensors.keys() == cast_tensors.keys()
    kept = [
        n for n, t in plain_tensors.items() if t.dtype == torch.float32 and not n.endswith("weight_scale")
    ]
    assert kept
    for name in kept:
        assert cast_tensors[name].dtype == torch.bfloat16
        assert torch.equal(cast_tensors[name], plain_tensors[name].to(torch.bfloat16))
    for name, t in plain_tensors.items():
        if t.dtype == torch.int8:
            assert torch.equal(cast_tensors[name], t)  # quantized from the same float32 weights


def test_source_metadata_that_still_holds_is_kept(tmp_path):
    ckpt = write_single_file(tmp_path / "m.safetensors", "zimage")
    source = {
        "format": "pt",
        "modelspec.title": "Z-Image test",
        "modelspec.hash_sha256": "0x1234",
        "_quantization_metadata": json.dumps({"layers": {}}),
        "int8_studio.scheme": "tensorwise",
    }
    save_file({n: t.contiguous() for n, t in ckpt.tensors.items()}, str(ckpt.path), metadata=source)
    result = run_convert(ConvertRequest(ckpt.path))
    _, metadata = load(result.output)
    assert metadata["modelspec.title"] == "Z-Image test" and metadata["format"] == "pt"
    assert "modelspec.hash_sha256" not in metadata
    assert metadata["int8_studio.scheme"] == DEFAULT_SCHEME == "rowwise"
    assert json.loads(metadata["_quantization_metadata"])["layers"]


def test_existing_output_is_kept_unless_overwrite(tmp_path):
    ckpt = write_single_file(tmp_path / "m.safetensors", "flux2")
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"precious")
    with pytest.raises(OutputExistsError) as e:
        run_convert(ConvertRequest(ckpt.path, output=target))
    assert str(e.value) == f"{target} already exists; choose another name or replace it"
    assert target.read_bytes() == b"precious"
    run_convert(ConvertRequest(ckpt.path, output=target, overwrite=True))
    assert_faithful(ckpt, target, DEFAULT_SCHEME)
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors", "out.safetensors"]


def test_output_cannot_be_the_source(tmp_path):
    ckpt = write_single_file(tmp_path / "m.safetensors", "flux2")
    before = sha256(ckpt.path)
    with pytest.raises(ConvertError) as e:
        run_convert(ConvertRequest(ckpt.path, output=ckpt.path, overwrite=True))
    assert str(e.value) == f"the output {ckpt.path} is the source itself; choose another output name"
    assert sha256(ckpt.path) == before


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ("out.bin", "the output out.bin must be a .safetensors file"),
        (
            "missing/out.safetensors",
            "output folder {tmp}/missing does not exist; create it or choose another",
        ),
    ],
)
def test_bad_output_names_are_refused(tmp_path, output, message):
    ckpt = write_single_file(tmp_path / "m.safetensors", "flux2")
    with pytest.raises(ConvertError) as e:
        run_convert(ConvertRequest(ckpt.path, output=tmp_path / output))
    assert str(e.value) == message.format(tmp=tmp_path)
    assert os.listdir(tmp_path) == ["m.safetensors"]


def test_cancel_in_the_middle_leaves_no_file(tmp_path):
    ckpt = write_single_file(tmp_path / "m.safetensors", "flux2")
    token = CancelToken()
    converted: list[Progress] = []

    def progress(p: Progress) -> None:
        if p.stage == "converting":
            converted.append(p)
            if len(converted) == 5:
                token.cancel()

    with pytest.raises(Cancelled):
        run_convert(ConvertRequest(ckpt.path), progress=progress, cancel=token)
    assert len(converted) == 5 and converted[-1].done < converted[-1].total
    assert os.listdir(tmp_path) == ["m.safetensors"]


def test_progress_counts_up_to_the_total(tmp_path):
    ckpt = write_diffusers(tmp_path / "model", "flux2")
    reports: list[Progress] = []
    run_convert(ConvertRequest(ckpt.path), progress=reports.append)
    assert {p.stage for p in reports} == {"converting"}
    done = [p.done for p in reports]
    assert done == sorted(done) and done[-1] == reports[0].total
    assert {p.message for p in reports} >= {
        "double_blocks.0.img_attn.qkv.weight",
        "single_blocks.1.linear2.weight",
    }


def test_writer_metadata_can_be_filled_in_after_the_data(tmp_path):
    """What the converter does with the source's hash: a placeholder, then the value, same length."""
    target = tmp_path / "t.safetensors"
    data = torch.randn(3, 5)
    with CheckpointWriter(target, {"x": (torch.float32, (3, 5))}, {"hash": "0" * 64}) as writer:
        writer.write("x", data)
        with pytest.raises(ValueError, match="same length"):
            writer.set_metadata("hash", "abc")
        writer.set_metadata("hash", "f" * 64)
        writer.commit()
    tensors, metadata = load(target)
    assert metadata == {"hash": "f" * 64} and torch.equal(tensors["x"], data)


class DiskFillsUp:
    """``os`` as the checkpoint writer sees it, except that writes fail once ``room`` bytes are used."""

    def __init__(self, room: int) -> None:
        self.room = room

    def __getattr__(self, name: str):
        return getattr(os, name)

    def write(self, fd: int, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return os.write(fd, data)


def test_disk_filling_up_during_the_write_leaves_no_file(tmp_path, monkeypatch):
    ckpt = write_single_file(tmp_path / "m.safetensors", "flux2")
    monkeypatch.setattr(engine.checkpoint_writer, "os", DiskFillsUp(room=ckpt.path.stat().st_size // 3))
    with pytest.raises(CheckpointError, match=r"^not enough free space on .*: need \d.* free$"):
        run_convert(ConvertRequest(ckpt.path))
    assert os.listdir(tmp_path) == ["m.safetensors"]


def test_nan_weights_are_refused(tmp_path):
    ckpt = write_single_file(tmp_path / "m.safetensors", "flux2", prefix="diffusion_model.")
    tensors = dict(ckpt.tensors)
    tensors["diffusion_model.single_blocks.1.linear2.weight"][3, 4] = float("nan")
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(ckpt.path))
    with pytest.raises(ConvertError) as e:
        run_convert(ConvertRequest(ckpt.path))
    assert str(e.value) == (
        "m.safetensors: tensor 'diffusion_model.single_blocks.1.linear2.weight' has NaN or Inf values "
        "(the file is corrupt); download or export it again"
    )
    assert os.listdir(tmp_path) == ["m.safetensors"]


@pytest.mark.parametrize("bad", ["truncated", "pickle", "empty", "folder", "lora", "scheme"])
def test_bad_inputs_are_refused_with_their_message_and_leave_no_file(tmp_path, bad):
    ckpt = write_single_file(tmp_path / "m.safetensors", "flux2")
    source, scheme, error = ckpt.path, "tensorwise", CheckpointError
    if bad == "truncated":
        data = ckpt.path.read_bytes()
        ckpt.path.write_bytes(data[: len(data) // 2])
        message = (
            f"{source} is truncated: the header says the data ends at {format_bytes(len(data))}, "
            f"the file has {format_bytes(len(data) // 2)}; download or export it again"
        )
    elif bad == "pickle":
        source = tmp_path / "m.ckpt"
        torch.save({"w": torch.zeros(2)}, source)
        message = (
            f"{source} is a pickle (PyTorch .pt/.ckpt) file; INT8 Studio reads only .safetensors — "
            "convert it to safetensors first"
        )
    elif bad == "empty":
        source = tmp_path / "e.safetensors"
        source.write_bytes(b"")
        message = f"{source} is empty (0 bytes); download or export it again"
    elif bad == "folder":
        source = tmp_path / "folder"
        source.mkdir()
        message = (
            f"{source} is a folder with no safetensors model in it "
            "(expected a .safetensors file, a *.safetensors.index.json or a transformer/ folder)"
        )
    elif bad == "lora":
        source, error = tmp_path / "l.safetensors", UnknownModelError
        save_file({"lora_unet_x.lora_down.weight": torch.zeros(4, 16)}, str(source))
        message = (
            "not a supported diffusion model: it looks like a LoRA "
            f"(1 tensors, e.g. 'lora_unet_x.lora_down.weight'); supported: {supported_text()}"
        )
    else:
        scheme, error = "blockwise", ConvertError
        message = "unknown scheme 'blockwise'; choose tensorwise or rowwise"
    before = snapshot(tmp_path)
    with pytest.raises(error) as e:
        run_convert(ConvertRequest(source, scheme=scheme))
    assert str(e.value) == message
    assert snapshot(tmp_path) == before


def test_default_output_of_a_transformer_folder_is_named_after_the_model(tmp_path):
    ckpt = write_diffusers(tmp_path / "Klein-9B", "flux2")
    expected = tmp_path / "Klein-9B-int8-rowwise.safetensors"
    for source in (ckpt.path, ckpt.path / "transformer"):
        with CheckpointReader(source) as reader:
            assert default_output(detect(reader), reader, "rowwise") == expected


@pytest.mark.parametrize("rotate", ["down", "all"])
def test_rotated_conversion_marks_rotates_and_loads_back(tmp_path, rotate):
    """Chroma's tiny config has 256-wide MLP outputs (rotatable with ComfyUI's group of 256) and
    320-wide linear2 inputs (not): both cases in one file."""
    ckpt = write_single_file(tmp_path / "model.safetensors", "chroma")
    result = run_convert(ConvertRequest(ckpt.path, scheme="rowwise", rotate=rotate))
    assert result.output == tmp_path / f"model-int8-rowwise-{'rotdown' if rotate == 'down' else 'rotated'}.safetensors"
    tensors, metadata = load(result.output)
    listed = json.loads(metadata["_quantization_metadata"])["layers"]
    rotated = set()
    for name, ref in ckpt.reference.items():
        layer = name.removesuffix(".weight")
        if tensors[name].dtype != torch.int8:
            continue
        entry = json.loads(bytes(tensors[f"{layer}.comfy_quant"].tolist()))
        assert listed[layer] == entry
        q, scale = tensors[name].double(), tensors[f"{layer}.weight_scale"].double()
        if entry.get("convrot"):
            assert entry == {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 256}
            rotated.add(layer)
            err = (rotate_back(q * scale) - ref.double()).abs()
            assert (err <= 16 * scale * (0.5 + 1e-5)).all(), name  # 256 errors ≤ step/2, each × 1/16
        else:
            assert entry == {"format": "int8_tensorwise"}
    wide = {n.removesuffix(".weight") for n, t in ckpt.reference.items() if t.ndim == 2 and t.shape[1] % 256 == 0}
    mlp_out = {n for n in wide if n.endswith("_mlp.2")}
    assert rotated and rotated == (mlp_out if rotate == "down" else {n for n in wide if n in listed})
    assert result.rotated == len(rotated)
    assert metadata["int8_studio.rotate"] == rotate

    with CheckpointReader(result.output) as reader:
        model = load_model(reader, torch.device("cpu"), torch.float32, stored=Int8Layers)[0]
    assert {n for n, m in model.named_modules() if getattr(m, "rotation", 0)} == rotated
    with CheckpointReader(ckpt.path) as reader:
        reference = load_model(reader, torch.device("cpu"), torch.float32, stored=Int8Layers)[0]
    inputs = reference.random_inputs(1, 64, seed=0)
    expected, out = reference(**inputs), model(**inputs)
    assert ((out - expected).norm() / expected.norm()) < 0.05


def test_rotation_named_only_in_the_header_is_applied(tmp_path):
    """A file whose layers carry no comfy_quant tensor: _quantization_metadata alone says 'rotated'."""
    ckpt = write_single_file(tmp_path / "model.safetensors", "chroma")
    converted = run_convert(ConvertRequest(ckpt.path, scheme="rowwise", rotate="down")).output
    tensors, metadata = load(converted)
    stripped = tmp_path / "stripped.safetensors"
    save_file({k: v for k, v in tensors.items() if not k.endswith(".comfy_quant")}, str(stripped), metadata)
    for path in (converted, stripped):
        with CheckpointReader(path) as reader:
            model = load_model(reader, torch.device("cpu"), torch.float32, stored=Int8Layers)[0]
        assert model.double_blocks[0].img_mlp[2].rotation == 256


def test_unknown_rotation_is_refused(tmp_path):
    ckpt = write_single_file(tmp_path / "model.safetensors", "chroma")
    with pytest.raises(ConvertError, match="unknown rotation 'some'; choose none, down, all"):
        run_convert(ConvertRequest(ckpt.path, rotate="some"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def rotate_back(w: torch.Tensor) -> torch.Tensor:
    return (w.reshape(w.shape[0], -1, 256) @ hadamard(256, dtype=torch.float64)).reshape(w.shape)

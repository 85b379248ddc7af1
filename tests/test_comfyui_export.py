"""Export into ComfyUI's model folders, on fake but realistic install trees: hard links and copies,
never overwriting without asking, free space, failures, cancelling and read-only folders leaving
nothing behind, the verification of int8 files, LoRAs to the LoRA folder, and `int8-studio export`."""

# ruff: noqa: F811  (home: the fixture of test_comfyui, imported by name)

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from engine.checkpoint import CheckpointError
from engine.cli import main
from engine.comfyui import open_install
from engine.convert import ConvertRequest, run_convert
from engine.export import ExportError, ExportRequest, run_export
from engine.jobs import Cancelled, CancelToken, OutputExistsError
from engine.lora.files import LoraError
from engine.models import UnknownModelError
from tests.test_comfyui import home, make_checkout, make_portable  # noqa: F401 (home: the fixture)
from tests.tiny_checkpoints import write_single_file

# --- export -------------------------------------------------------------------------------------


@pytest.fixture
def comfy(tmp_path) -> Path:
    return make_checkout(tmp_path / "ComfyUI")


@pytest.fixture(scope="module")
def int8_file(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    return write_single_file(folder / "klein-int8-rowwise.safetensors", "flux2", fmt="int8_rowwise").path


@pytest.fixture
def int8_model(tmp_path, int8_file) -> Path:
    """A fresh copy of a tiny int8 Flux.2 file, in its own folder."""
    (tmp_path / "work").mkdir()
    return Path(shutil.copy(int8_file, tmp_path / "work"))


def folder_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_export_links_on_the_same_filesystem(comfy, int8_model):
    target = comfy / "models" / "diffusion_models"
    reports = []
    result = run_export(ExportRequest(int8_model, target), progress=reports.append)
    assert result.path == target / int8_model.name
    assert result.linked and not result.already_there
    assert result.path.stat().st_ino == int8_model.stat().st_ino
    assert result.size == int8_model.stat().st_size
    assert result.description.startswith("Flux.2 ") and "int8_rowwise" in result.description
    assert folder_files(target) == [int8_model.name]
    assert reports[-1].done == reports[-1].total == result.size
    # exporting it again finds it already there
    again = run_export(ExportRequest(result.path, target))
    assert again.already_there and again.path == result.path


def test_export_copies_when_asked(comfy, int8_model):
    target = comfy / "models" / "diffusion_models"
    reports = []
    result = run_export(ExportRequest(int8_model, target, name="mine.safetensors", link=False), reports.append)
    assert not result.linked
    assert result.path.read_bytes() == int8_model.read_bytes()
    assert result.path.stat().st_ino != int8_model.stat().st_ino
    assert folder_files(target) == ["mine.safetensors"]
    assert reports[-1].done == result.size and reports[-1].stage == "export"


def test_export_creates_a_missing_models_folder(tmp_path, int8_model):
    root = make_checkout(tmp_path / "Old", models=("unet",))
    result = run_export(ExportRequest(int8_model, open_install(root).export_folder()))
    assert result.path == root / "models" / "diffusion_models" / int8_model.name


def test_export_folder_without_parent(tmp_path, int8_model):
    folder = tmp_path / "gone" / "models"
    with pytest.raises(ExportError) as e:
        run_export(ExportRequest(int8_model, folder))
    assert str(e.value) == f"{folder} does not exist, nor does {folder.parent}; check the install or choose another folder"


def test_export_never_overwrites_without_asking(comfy, int8_model):
    target = comfy / "models" / "diffusion_models"
    existing = target / int8_model.name
    users = os.urandom(1000)
    existing.write_bytes(users)
    with pytest.raises(OutputExistsError) as e:
        run_export(ExportRequest(int8_model, target, link=False))
    assert str(e.value) == f"{existing} already exists; choose another name or replace it"
    assert existing.read_bytes() == users
    assert folder_files(target) == [int8_model.name]

    result = run_export(ExportRequest(int8_model, target, overwrite=True, link=False))
    assert result.path.read_bytes() == int8_model.read_bytes()
    assert folder_files(target) == [int8_model.name]


def test_export_checks_free_space_first(comfy, int8_model, monkeypatch):
    target = comfy / "models" / "diffusion_models"
    size = int8_model.stat().st_size
    real = shutil.disk_usage

    def nearly_full(path):
        usage = real(path)
        return usage._replace(free=100_000_000 + size - 1)

    monkeypatch.setattr(shutil, "disk_usage", nearly_full)
    with pytest.raises(ExportError) as e:
        run_export(ExportRequest(int8_model, target, link=False))
    assert str(e.value) == (
        f"not enough space in {target}: the file needs {size / 1000:.1f} KB and "
        f"{(100_000_000 + size - 1) / 1e6:.1f} MB is free (keeping 100.0 MB spare); "
        "free up space or choose another folder"
    )
    assert folder_files(target) == []
    # a hard link takes no space
    assert run_export(ExportRequest(int8_model, target)).linked


@contextmanager
def file_size_limit(limit: int):
    """Writes past ``limit`` bytes fail with EFBIG, as on a full disk (instead of SIGXFSZ killing us)."""
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, old_handler)


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX")
def test_export_write_failure_leaves_nothing(comfy, int8_model):
    target = comfy / "models" / "diffusion_models"
    with file_size_limit(int8_model.stat().st_size // 2), pytest.raises(ExportError) as e:
        run_export(ExportRequest(int8_model, target, link=False))
    assert str(e.value) == f"cannot write {target / int8_model.name}: File too large"
    assert folder_files(target) == []


def test_export_cancel_leaves_nothing(comfy, int8_model):
    target = comfy / "models" / "diffusion_models"
    cancel = CancelToken()
    cancel.cancel()
    with pytest.raises(Cancelled):
        run_export(ExportRequest(int8_model, target, link=False), cancel=cancel)
    assert folder_files(target) == []


@contextmanager
def unprivileged():
    """Root ignores file permissions: drop to user 'nobody' for the block when running as root."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions")
@pytest.mark.parametrize("link", [True, False])
def test_export_into_a_read_only_folder(int8_model, link):
    # outside tmp_path: pytest's temporary folders are closed to other users, and 'nobody' must get in
    with tempfile.TemporaryDirectory() as top:
        top = Path(top)
        top.chmod(0o755)
        source = top / int8_model.name
        shutil.copy(int8_model, source)
        source.chmod(0o644)
        target = make_checkout(top / "ComfyUI") / "models" / "diffusion_models"
        target.chmod(0o555)
        with unprivileged(), pytest.raises(ExportError) as e:
            run_export(ExportRequest(source, target, link=link))
        assert str(e.value) == f"cannot write to {target}: permission denied; choose another folder or fix its permissions"
        assert folder_files(target) == []


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(path), metadata=metadata)
    return path


def marker(entry: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(entry).encode()), dtype=torch.uint8)


def broken(tensors: dict[str, torch.Tensor], problem: str):
    """(tensors, metadata, expected message) of one broken int8 invariant in a tiny Flux.2 file."""
    layer = next(n.removesuffix(".weight") for n, t in tensors.items() if t.dtype == torch.int8)
    rows = tensors[f"{layer}.weight"].shape[0]
    listed = {n.removesuffix(".comfy_quant"): {"format": "int8_tensorwise"} for n in tensors if "comfy_quant" in n}
    if problem == "scale dtype":
        tensors[f"{layer}.weight_scale"] = tensors[f"{layer}.weight_scale"].bfloat16()
        shape = list(tensors[f"{layer}.weight_scale"].shape)
        message = f"'{layer}.weight_scale' is BF16 {shape}; ComfyUI needs F32 of shape [], [1], [{rows}] or [{rows}, 1]"
    elif problem == "scale shape":
        tensors[f"{layer}.weight_scale"] = torch.rand(2, dtype=torch.float32)
        message = f"'{layer}.weight_scale' is F32 [2]; ComfyUI needs F32 of shape [], [1], [{rows}] or [{rows}, 1]"
    elif problem == "no marker":
        del tensors[f"{layer}.comfy_quant"]
        del listed[layer]
        message = (
            f"int8 layer '{layer}' has neither a comfy_quant marker nor a _quantization_metadata entry: "
            "ComfyUI would not load it as int8"
        )
    elif problem == "disagree":
        listed[layer] = {"format": "int8_tensorwise", "convrot": True}
        message = (
            f"int8 layer '{layer}': its comfy_quant marker {{'format': 'int8_tensorwise'}} disagrees with "
            f"_quantization_metadata {{'format': 'int8_tensorwise', 'convrot': True}}"
        )
    elif problem == "not int8":
        tensors[f"{layer}.comfy_quant"] = marker({"format": "float8_e4m3fn"})
        del listed[layer]
        message = f"int8 layer '{layer}' is marked with format 'float8_e4m3fn', not an int8 format"
    elif problem == "bad marker":
        tensors[f"{layer}.comfy_quant"] = torch.tensor(list(b"{format"), dtype=torch.uint8)
        message = f"'{layer}.comfy_quant' is not the UTF-8 bytes of a JSON object"
    elif problem == "extra listed":
        listed["double_blocks.99.img_attn.qkv"] = {"format": "int8_tensorwise"}
        message = "_quantization_metadata lists layer 'double_blocks.99.img_attn.qkv', which the file does not have"
    elif problem == "bad rotation":
        entry = {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 256}
        tensors[f"{layer}.comfy_quant"], listed[layer] = marker(entry), entry
        inputs = tensors[f"{layer}.weight"].shape[1]
        message = (
            f"int8 layer '{layer}' is marked rotated, but Hadamard group size 256 does not divide the "
            f"layer's {inputs} inputs"
        )
    elif problem == "bad metadata":
        listed = ["not", "layers"]
        message = 'the header\'s _quantization_metadata is not JSON of the form {"layers": {layer: {...}}}'
    return tensors, {"_quantization_metadata": json.dumps({"layers": listed})}, message


PROBLEMS = [
    "scale dtype", "scale shape", "no marker", "disagree", "not int8", "bad marker", "extra listed", "bad rotation",
    "bad metadata",
]  # fmt: skip


@pytest.fixture(scope="module")
def tensorwise(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The tensors of a tiny int8 tensor-wise Flux.2 file."""
    return write_single_file(tmp_path_factory.mktemp("tw") / "m.safetensors", "flux2", fmt="int8_tensorwise").tensors


@pytest.mark.parametrize("problem", PROBLEMS)
@pytest.mark.parametrize("link", [True, False])
def test_export_verification_failure_leaves_nothing(tmp_path, comfy, tensorwise, problem, link):
    tensors, metadata, message = broken(dict(tensorwise), problem)
    source = write_tensors(tmp_path / "bad.safetensors", tensors, metadata)
    target = comfy / "models" / "diffusion_models"
    with pytest.raises(ExportError) as e:
        run_export(ExportRequest(source, target, link=link))
    assert str(e.value) == message
    assert folder_files(target) == []


def test_a_consistent_file_with_both_markers_exports(tmp_path, comfy):
    tiny = write_single_file(tmp_path / "ok.safetensors", "zimage", fmt="int8_tensorwise")
    listed = {n.removesuffix(".comfy_quant"): {"format": "int8_tensorwise"} for n in tiny.tensors if "comfy_quant" in n}
    source = write_tensors(tmp_path / "z.safetensors", tiny.tensors, {QUANT: json.dumps({"layers": listed})})
    result = run_export(ExportRequest(source, comfy / "models" / "diffusion_models"))
    assert result.description.endswith(f"int8_tensorwise ({len(listed)} int8 layers)")


QUANT = "_quantization_metadata"


def test_a_rotated_file_exports_and_says_what_it_needs(tmp_path, comfy):
    source = write_single_file(tmp_path / "c.safetensors", "chroma").path
    rotated = run_convert(ConvertRequest(source, scheme="rowwise", rotate="down")).output
    result = run_export(ExportRequest(rotated, comfy / "models" / "diffusion_models"))
    assert result.description.endswith(
        "(22 int8 layers, 4 Hadamard-rotated: needs a ComfyUI that reads 'convrot')"
    )


def test_export_refuses_what_is_not_a_model(tmp_path, comfy):
    target = comfy / "models" / "diffusion_models"
    vae = write_tensors(tmp_path / "vae.safetensors", {"decoder.conv_in.weight": torch.randn(8, 4, 3, 3)})
    with pytest.raises(UnknownModelError, match="it looks like a VAE"):
        run_export(ExportRequest(vae, target))
    incomplete = write_single_file(tmp_path / "i.safetensors", "flux2", fmt="int8_rowwise")
    scale = next(n for n in incomplete.tensors if n.endswith(".weight_scale"))
    del incomplete.tensors[scale]
    write_tensors(incomplete.path, incomplete.tensors)
    with pytest.raises(ExportError, match=f"int8 weight '{scale[:-6]}' has no '{scale}': the file is incomplete"):
        run_export(ExportRequest(incomplete.path, target))
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"PK\x03\x04" + os.urandom(100))
    with pytest.raises(CheckpointError, match="is a pickle"):
        run_export(ExportRequest(pickle, target, name="model.safetensors"))
    (tmp_path / "diffusers" / "transformer").mkdir(parents=True)
    with pytest.raises(ExportError, match=r"diffusers is a folder; export a single .safetensors file"):
        run_export(ExportRequest(tmp_path / "diffusers", target))
    assert folder_files(target) == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "vae"}, "cannot export as 'vae'; choose one of: diffusion_models, loras"),
        ({"name": "model.ckpt"}, "'model.ckpt' is not a file name ending in .safetensors; choose another name"),
        ({"name": "../up.safetensors"}, "'../up.safetensors' is not a file name ending in .safetensors; choose another name"),
    ],
)
def test_export_bad_requests(comfy, int8_model, kwargs, message):
    with pytest.raises(ExportError) as e:
        run_export(ExportRequest(int8_model, comfy / "models" / "diffusion_models", **kwargs))
    assert str(e.value) == message


def tiny_lora(path: Path, rank: int = 4) -> Path:
    stem = "lora_unet_double_blocks_0_img_attn_qkv"
    return write_tensors(
        path,
        {
            f"{stem}.lora_down.weight": torch.randn(rank, 64, dtype=torch.bfloat16),
            f"{stem}.lora_up.weight": torch.randn(192, rank, dtype=torch.bfloat16),
            f"{stem}.alpha": torch.tensor(float(rank)),
        },
    )


def test_export_lora(tmp_path, comfy, int8_model):
    lora = tiny_lora(tmp_path / "style.safetensors")
    target = open_install(comfy).export_folder("loras")
    result = run_export(ExportRequest(lora, target, kind="loras"))
    assert result.path == comfy / "models" / "loras" / "style.safetensors"
    assert result.description == "LoRA, 1 layers"
    with pytest.raises(LoraError, match="is a Flux.2 custom model, not a LoRA$"):
        run_export(ExportRequest(int8_model, target, kind="loras"))
    assert folder_files(target) == ["style.safetensors"]


# --- CLI ----------------------------------------------------------------------------------------


def test_cli_export(home, int8_model, capsys):
    root = make_checkout(home / "ComfyUI")
    assert main(["export", str(int8_model)]) == 0
    target = root / "models" / "diffusion_models" / int8_model.name
    size = int8_model.stat().st_size
    out = capsys.readouterr().out
    assert out.startswith(f"exported {target} (hard link, {size / 1000:.1f} KB): Flux.2 custom, int8_rowwise (")
    assert main(["export", str(int8_model)]) == 0  # the same file: nothing to do
    assert capsys.readouterr().out.startswith(f"exported {target} (already there, ")
    twin = Path(shutil.copy(int8_model, home / int8_model.name))
    assert main(["export", str(twin)]) == 2
    assert capsys.readouterr().err == (
        f"int8-studio: error: {target} already exists; choose another name or replace it with --overwrite\n"
    )
    assert main(["export", str(twin), "--copy", "--overwrite"]) == 0
    assert capsys.readouterr().out.startswith(f"exported {target} (copy, ")
    assert target.stat().st_ino not in (int8_model.stat().st_ino, twin.stat().st_ino)

    other = make_portable(home / "Desktop")
    assert main(["export", str(int8_model)]) == 2
    assert capsys.readouterr().err == (
        f"int8-studio: error: found 2 ComfyUI installs (git checkout at {root}; Windows portable at {other}); "
        "choose one with --comfyui PATH\n"
    )
    assert main(["export", str(int8_model), "--comfyui", str(other.parent), "--kind", "loras"]) == 2
    assert capsys.readouterr().err.endswith(f"{int8_model.name} is a Flux.2 custom model, not a LoRA\n")
    assert folder_files(other / "models" / "loras") == []

    lora = tiny_lora(home / "style.safetensors")  # no --kind: a LoRA goes where LoRAs go, as in the app
    assert main(["export", str(lora), "--comfyui", str(root)]) == 0
    assert capsys.readouterr().out.startswith(f"exported {root / 'models/loras/style.safetensors'} (hard link, ")

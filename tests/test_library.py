"""The model library scan, on a folder tree with every kind of file a user has."""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from engine.cli import main
from engine.comfyui import load_install
from engine.jobs import Cancelled, CancelToken
from engine.library import LibraryRequest, comfyui_folders, describe_file, export_kind, run_library_scan
from engine.models import REGISTRY
from tests.test_comfyui import make_checkout
from tests.tiny_checkpoints import write_single_file

ROTATED = {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 256}


def save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(path), metadata=metadata)
    return path


def marker(entry: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(entry).encode()), dtype=torch.uint8)


def label(arch: str) -> str:
    a = REGISTRY[arch]
    return f"{a.label} {a.variant_of(a.tiny['tiny'])}"


def kohya_lora(rank: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    tensors = {}
    for block in range(2):
        stem = f"lora_unet_double_blocks_{block}_img_attn_qkv"
        tensors[f"{stem}.lora_down.weight"] = torch.randn(rank, 64, dtype=dtype)
        tensors[f"{stem}.lora_up.weight"] = torch.randn(192, rank, dtype=dtype)
        tensors[f"{stem}.alpha"] = torch.tensor(float(rank))
    return tensors


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """A user's folders: models in every format, LoRAs, a VAE, broken files, links, hidden partials.

    Returns (folders, expected rows by path relative to the tree: (kind, model, architecture, format)).
    """
    top = tmp_path_factory.mktemp("library")
    diffusion, loras = top / "diffusion_models", top / "loras"
    expect: dict[str, tuple[str, str, str, str]] = {}

    (diffusion / "sub").mkdir(parents=True)
    write_single_file(diffusion / "flux2-bf16.safetensors", "flux2")
    expect["diffusion_models/flux2-bf16.safetensors"] = ("diffusion model", label("flux2"), "flux2", "bf16")
    vae = {"first_stage_model.decoder.conv_in.weight": torch.randn(8, 4, 3, 3)}
    write_single_file(diffusion / "sub" / "chroma-fp8.sft", "chroma", fmt="fp8_scaled", prefix="model.diffusion_model.", extra=vae)
    expect["diffusion_models/sub/chroma-fp8.sft"] = ("checkpoint", label("chroma"), "chroma", "fp8 scaled")
    write_single_file(diffusion / "zimage-int8-rowwise.safetensors", "zimage", fmt="int8_rowwise")
    expect["diffusion_models/zimage-int8-rowwise.safetensors"] = ("diffusion model", label("zimage"), "zimage", "int8 row-wise")

    int8 = write_single_file(top / "scratch.safetensors", "flux1", fmt="int8_tensorwise").tensors
    (top / "scratch.safetensors").unlink()
    listed = {n.removesuffix(".comfy_quant"): ROTATED for n in int8 if n.endswith(".comfy_quant")}
    rotated_markers = {n: marker(ROTATED) if n.endswith(".comfy_quant") else t for n, t in int8.items()}
    save(diffusion / "flux1-rot-header.safetensors", int8, {"_quantization_metadata": json.dumps({"layers": listed})})
    save(diffusion / "flux1-rot-markers.safetensors", rotated_markers)
    save(diffusion / "flux1-int8.safetensors", int8)
    for name, fmt in [("flux1-rot-header", "int8 tensor-wise rotated"), ("flux1-rot-markers", "int8 tensor-wise rotated"),
                      ("flux1-int8", "int8 tensor-wise")]:  # fmt: skip
        expect[f"diffusion_models/{name}.safetensors"] = ("diffusion model", label("flux1"), "flux1", fmt)

    save(loras / "style.safetensors", kohya_lora(8, torch.bfloat16), {"ss_base_model_version": "flux1"})
    expect["loras/style.safetensors"] = ("LoRA", "flux1", "", "LoRA rank 8, bf16")
    peft = {
        f"transformer.layers.{i}.attention.to_q.lora_{ab}.weight": torch.randn(*shape)
        for i in range(2)
        for ab, shape in (("A", (4 * (i + 1), 32)), ("B", (32, 4 * (i + 1))))
    }
    save(loras / "peft" / "adapter_model.safetensors", peft)
    expect["loras/peft/adapter_model.safetensors"] = ("LoRA", "", "", "LoRA rank 4–8, fp32")
    lokr = {"lycoris_blocks_0_attn_to_q.lokr_w1": torch.randn(4, 4, dtype=torch.float16),
            "lycoris_blocks_0_attn_to_q.lokr_w2": torch.randn(8, 8, dtype=torch.float16)}  # fmt: skip
    save(loras / "lokr.safetensors", lokr)
    expect["loras/lokr.safetensors"] = ("LoRA", "", "", "LoKr, fp16")

    save(loras / "vae.safetensors", {"decoder.conv_in.weight": torch.randn(8, 4, 3, 3)})
    expect["loras/vae.safetensors"] = ("other", "", "", "")
    truncated = loras / "truncated.safetensors"
    truncated.write_bytes((diffusion / "flux2-bf16.safetensors").read_bytes()[:5000])
    expect["loras/truncated.safetensors"] = ("unreadable", "", "", "")

    # not listed: hidden partial files and folders, pickles, other files; links to known files
    (diffusion / ".flux2.safetensors.partial-1a2b").write_bytes(os.urandom(64))
    save(diffusion / ".cache" / "huggingface" / "download" / "x.safetensors", {"a": torch.zeros(1)})
    (diffusion / "old.ckpt").write_bytes(b"PK\x03\x04")
    (diffusion / "README.md").write_text("models")
    (loras / "same-style.safetensors").symlink_to(loras / "style.safetensors")
    (loras / "loop").symlink_to(loras)
    (top / "shared").symlink_to(diffusion)

    when = {}
    for path in top.rglob("*"):
        if path.is_file() and not path.is_symlink():
            when[path] = random.uniform(1.5e9, 1.8e9)
            os.utime(path, (when[path], when[path]))
    return top, [diffusion, loras, top / "shared", top / "not-there"], expect


def test_scan_describes_every_file(tree):
    top, folders, expect = tree
    reports = []
    result = run_library_scan(LibraryRequest(tuple(folders)), progress=reports.append)

    assert result.missing == [top / "not-there"]
    rows = {str(e.path.relative_to(top)): e for e in result.entries}
    assert sorted(rows) == sorted(expect)
    for name, (kind, model, arch, fmt) in expect.items():
        entry = rows[name]
        assert (entry.kind, entry.model, entry.architecture, entry.format) == (kind, model, arch, fmt), name
        stat = (top / name).stat()
        assert (entry.size, entry.modified) == (stat.st_size, stat.st_mtime)
    assert rows["loras/vae.safetensors"].note.startswith("not a supported diffusion model: it looks like a VAE")
    assert rows["loras/truncated.safetensors"].note.startswith(f"{top / 'loras/truncated.safetensors'} is truncated")
    assert [r.done for r in reports] == list(range(1, len(expect) + 1))
    assert reports[-1].total == len(expect)


def test_scan_of_comfyui_folders(tmp_path):
    root = make_checkout(tmp_path / "ComfyUI", models=("unet", "diffusion_models", "loras", "checkpoints"))
    extra = tmp_path / "big-disk" / "models"
    (extra / "diffusion_models").mkdir(parents=True)
    (root / "extra_model_paths.yaml").write_text(f"big:\n  base_path: {extra}\n  diffusion_models: diffusion_models\n")
    install = load_install(root, "git checkout", [root / "extra_model_paths.yaml"])
    folders = comfyui_folders([install, install])
    assert folders == [root / "models/unet", root / "models/diffusion_models", extra / "diffusion_models",
                       root / "models/checkpoints", root / "models/loras"]  # fmt: skip

    write_single_file(extra / "diffusion_models" / "q.safetensors", "qwen_image", fmt="int8_rowwise")
    save(root / "models" / "loras" / "l.safetensors", kohya_lora(16, torch.float16))
    entries = run_library_scan(LibraryRequest(tuple(folders))).entries
    assert [(e.path.name, e.kind, e.format) for e in entries] == [
        ("q.safetensors", "diffusion model", "int8 row-wise"),
        ("l.safetensors", "LoRA", "LoRA rank 16, fp16"),
    ]


def test_scan_cancel(tree):
    _, folders, _ = tree
    cancel = CancelToken()
    seen = []

    def progress(p):
        seen.append(p.done)
        if p.done == 2:
            cancel.cancel()

    with pytest.raises(Cancelled):
        run_library_scan(LibraryRequest(tuple(folders)), progress=progress, cancel=cancel)
    assert seen == [1, 2]


def test_single_files_join_the_folders(tree, tmp_path):
    """Files given one by one (the app's recent and dropped files) are listed after the folders' files,
    once, unless a folder lists them already; those that are gone are skipped."""
    top, folders, expect = tree
    elsewhere = write_single_file(tmp_path / "z.safetensors", "zimage").path
    style = top / "loras" / "style.safetensors"
    files = (elsewhere, style, tmp_path / "gone.safetensors", elsewhere, top / "loras")
    result = run_library_scan(LibraryRequest((folders[1],), files))
    paths = [e.path for e in result.entries]
    assert paths[-1] == elsewhere and paths.count(elsewhere) == 1 and paths.count(style) == 1
    assert len(paths) == 1 + sum(name.startswith("loras/") for name in expect)
    assert result.entries[-1] == describe_file(elsewhere)


def test_export_kind_follows_the_file(tree, tmp_path):
    top, _, _ = tree
    assert export_kind(top / "loras" / "style.safetensors") == "loras"
    assert export_kind(top / "diffusion_models" / "flux2-bf16.safetensors") == "diffusion_models"
    assert export_kind(tmp_path / "gone.safetensors") == "diffusion_models"  # the export then says why


def test_scan_of_nothing(tmp_path):
    result = run_library_scan(LibraryRequest((tmp_path,)))
    assert result.entries == [] and result.missing == []


def test_cli_library(tree, tmp_path, monkeypatch, capsys):
    top, folders, expect = tree
    assert main(["library", str(folders[1])]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["kind", "model", "format", "size", "date", "file"]
    style = top / "loras" / "style.safetensors"
    date = time.strftime("%Y-%m-%d", time.localtime(style.stat().st_mtime))
    row = next(line for line in lines if line.endswith(str(style)))
    assert row.split()[:6] == ["LoRA", "flux1", "LoRA", "rank", "8,", "bf16"]
    assert f"{style.stat().st_size / 1000:.1f} KB  {date}" in row
    other = next(line for line in lines if line.endswith("vae.safetensors"))
    assert other.startswith("other           not a supported diffusion ")
    assert len(lines) == 1 + sum(name.startswith("loras/") for name in expect)

    assert main(["library", str(folders[0]), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["path"] for r in rows} == {str(top / n) for n in expect if n.startswith("diffusion_models/")}

    monkeypatch.setenv("HOME", str(tmp_path))
    assert main(["library"]) == 2
    assert capsys.readouterr().err == (
        "int8-studio: error: no ComfyUI install found in the usual places; give the folders to scan\n"
    )
    assert main(["library", str(tmp_path / "nowhere")]) == 0
    assert capsys.readouterr().out == f"(missing folder: {tmp_path / 'nowhere'})\nno .safetensors files found\n"

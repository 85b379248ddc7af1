"""File-system edges end in one line and a non-zero status, never a traceback or a hang: FIFOs and
devices as inputs, names that are not UTF-8, names at the length limit, a read-only models folder,
``demo --folder`` given a file, a closed pipe; and one bad file never hides the others in the library
(issue 23, item 5)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from engine.checkpoint import CheckpointReader
from engine.cli import main
from engine.jobs import NAME_MAX
from tests.reliability import comfyui, digests, refused
from tests.tiny_checkpoints import write_diffusers, write_single_file
from tests.tiny_loras import write_lora

ROOT = Path(__file__).resolve().parent.parent
posix = pytest.mark.skipif(sys.platform == "win32", reason="FIFOs and byte file names are POSIX")


@posix
@pytest.mark.parametrize("role", ["model", "lora", "export source", "index"])
def test_a_fifo_is_refused_not_read(tmp_path, capsys, role):
    """A FIFO never gets opened for reading (that would block until someone writes to it)."""
    fifo = tmp_path / ("x.safetensors.index.json" if role == "index" else "x.safetensors")
    os.mkfifo(fifo)
    model = write_single_file(tmp_path / "m.safetensors", "flux2", fmt="int8_rowwise").path
    argv = {
        "model": ["convert", fifo],
        "lora": ["lora", "merge", model, fifo, "-o", tmp_path / "out.safetensors"],
        "export source": ["export", fifo, "--comfyui", comfyui(tmp_path / "ComfyUI")],
        "index": ["inspect", fifo],
    }[role]
    assert refused(capsys, tmp_path, *argv) == (
        f"{fifo} is not a regular file; give a .safetensors file or a model folder"
    )


@posix
@pytest.mark.parametrize("device", ["/dev/zero", "/dev/null"])
def test_a_device_is_refused(tmp_path, capsys, device):
    if not os.path.exists(device):
        pytest.skip(f"no {device}")
    assert refused(capsys, tmp_path, "convert", device) == (
        f"{device} is not a regular file; give a .safetensors file or a model folder"
    )


@posix
@pytest.mark.parametrize("raw", [b"m\xff\xfe.safetensors", b"mod\xe8le-\xc3.safetensors"])
def test_names_that_are_not_utf8_work(tmp_path, capsys, raw):
    source = Path(os.fsdecode(bytes(tmp_path) + b"/" + raw))
    try:
        write_single_file(source, "flux2")
    except OSError:
        pytest.skip("this file system wants UTF-8 names")
    before = digests(tmp_path)
    assert main(["convert", str(source)]) == 0
    out, err = capsys.readouterr()
    output = source.with_name(source.name.removesuffix(".safetensors") + "-int8-rowwise.safetensors")
    assert err == "" and out.startswith("wrote ") and "\\udc" in out  # the odd bytes shown, escaped
    with CheckpointReader(output) as reader:  # (safetensors itself cannot open such a name)
        assert "\ufffd" in reader.metadata["int8_studio.source_name"]  # metadata is text: U+FFFD
    assert main(["inspect", str(output)]) == 0 and "\\udc" in capsys.readouterr().out
    lora = write_lora(Path(os.fsdecode(bytes(tmp_path) + b"/l\xff.safetensors")), "flux2").path
    assert main(["lora", "merge", str(output), str(lora), "-o", str(tmp_path / "merged.safetensors")]) == 0
    with safe_open(str(tmp_path / "merged.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["int8_studio.loras"])[0]["name"] == "l\ufffd.safetensors"
    assert {k: v for k, v in digests(tmp_path).items() if k in before} == before


def test_names_at_the_length_limit(tmp_path, capsys):
    """The longest name a file system takes converts (its temporary name is cut to fit); a default
    output name past the limit, or a given one, is refused in words; an input past it too."""
    stem = "a" * (NAME_MAX - len(".safetensors"))
    source = write_single_file(tmp_path / f"{stem}.safetensors", "flux2").path
    default = f"{stem}-int8-rowwise.safetensors"
    assert refused(capsys, tmp_path, "convert", source) == (
        f"the output name {default[:39]}…{default[-40:]} is {len(default)} bytes long, over the 255-byte limit "
        "of file names; choose a shorter name"
    )
    given = "b" * 300 + ".safetensors"
    assert refused(capsys, tmp_path, "convert", source, "-o", tmp_path / given) == (
        f"the output name {given[:39]}…{given[-40:]} is 312 bytes long, over the 255-byte limit of file names; "
        "choose a shorter name"
    )
    too_long = tmp_path / ("c" * 300 + ".safetensors")
    assert refused(capsys, tmp_path, "inspect", too_long) == (
        f"cannot open {str(too_long)[:39]}…{str(too_long)[-40:]}: File name too long"
    )
    longest = tmp_path / ("d" * (NAME_MAX - len(".safetensors")) + ".safetensors")
    assert main(["convert", str(source), "-o", str(longest)]) == 0 and longest.is_file()
    capsys.readouterr()
    assert not [p for p in os.listdir(tmp_path) if ".partial-" in p]


def test_export_into_a_read_only_folder(tmp_path, capsys, monkeypatch):
    """A read-only file system refuses even the removal of a temporary file that was never made
    (unlink gives EROFS before it looks): one line, not a traceback from the clean-up."""
    comfy = comfyui(tmp_path / "ComfyUI")
    model = write_single_file(tmp_path / "m.safetensors", "flux2", fmt="int8_rowwise").path
    real_unlink = Path.unlink

    def read_only(path, *args, **kwargs):
        if ".partial-" in path.name:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_unlink(path, *args, **kwargs)

    def no_link(source, target):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(target))

    real_open = open

    def no_create(file, mode="r", *args, **kwargs):
        if ".partial-" in str(file) and "x" in mode:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", read_only)
    monkeypatch.setattr(os, "link", no_link)
    monkeypatch.setattr("builtins.open", no_create)
    folder = comfy / "models" / "diffusion_models"
    for copy in ([], ["--copy"]):
        assert refused(capsys, tmp_path, "export", model, "--comfyui", comfy, *copy) == (
            f"cannot write {folder / 'm.safetensors'}: Read-only file system"
        )


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes anywhere")
def test_export_into_a_folder_without_write_permission(tmp_path, capsys):
    comfy = comfyui(tmp_path / "ComfyUI")
    model = write_single_file(tmp_path / "m.safetensors", "flux2", fmt="int8_rowwise").path
    folder = comfy / "models" / "diffusion_models"
    folder.chmod(0o555)
    try:
        for copy in ([], ["--copy"]):
            assert refused(capsys, tmp_path, "export", model, "--comfyui", comfy, *copy) == (
                f"cannot write to {folder}: permission denied; choose another folder or fix its permissions"
            )
    finally:
        folder.chmod(0o755)


def test_demo_folder_that_is_a_file(tmp_path, capsys):
    file = tmp_path / "notes.txt"
    file.write_text("not a folder")
    assert refused(capsys, tmp_path, "demo", "--folder", file) == (
        f"{file} is a file, not a folder; give a folder for the demo files"
    )
    assert refused(capsys, tmp_path, "demo", "--folder", file / "sub") == (
        f"cannot create {file / 'sub'}: Not a directory"
    )


@posix
@pytest.mark.parametrize("argv", [["inspect", "{model}"], ["inspect", "{model}", "--json"], ["library", "{folder}"]])
def test_a_closed_pipe_ends_quietly(tmp_path, argv):
    """``int8-studio inspect … | head -0``: the reader is gone; no traceback, status 141 as SIGPIPE gives."""
    model = write_single_file(tmp_path / "m.safetensors", "flux2").path
    argv = [a.format(model=model, folder=tmp_path) for a in argv]
    child = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", *argv], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    child.stdout.close()  # as head -0 does
    err = child.stderr.read()
    assert (child.wait(timeout=60), err) == (141, b"")


@posix
def test_the_library_lists_every_other_file_beside_bad_ones(tmp_path, capsys):
    good = write_single_file(tmp_path / "good.safetensors", "flux2").path
    write_lora(tmp_path / "lora.safetensors", "flux2")
    write_diffusers(tmp_path / "diffusers-folder", "zimage")
    os.mkfifo(tmp_path / "fifo.safetensors")  # not a regular file: not listed, not read
    nested = tmp_path / "nested.safetensors"
    header = b"[" * 100_000 + b"]" * 100_000
    nested.write_bytes(len(header).to_bytes(8, "little") + header)
    (tmp_path / "truncated.safetensors").write_bytes(good.read_bytes()[:-3])
    odd = Path(os.fsdecode(bytes(tmp_path) + b"/odd\xff.safetensors"))
    odd.write_bytes(good.read_bytes())
    damaged = tmp_path / "damaged.safetensors"
    from tests.tiny_checkpoints import random_tensors

    tensors = random_tensors("zimage")
    tensors["layers.0.attention.out.weight"] = tensors["layers.0.attention.out.weight"][0].contiguous()
    write_single_file(damaged, "zimage", tensors=tensors)
    before = digests(tmp_path)
    assert main(["library", str(tmp_path), "--json"]) == 0
    out, err = capsys.readouterr()
    entries = {Path(e["path"]).name: e for e in json.loads(out)}
    assert err == ""
    assert entries["good.safetensors"]["kind"] == "diffusion model"
    assert entries[odd.name]["kind"] == "diffusion model"
    assert entries["lora.safetensors"]["kind"] == "LoRA"
    assert entries["nested.safetensors"]["kind"] == "unreadable"
    assert "nested too deeply" in entries["nested.safetensors"]["note"]
    assert entries["truncated.safetensors"]["note"].startswith(f"{tmp_path / 'truncated.safetensors'} is truncated")
    assert entries["damaged.safetensors"]["kind"] == "other"
    assert "layers.0.attention.out.weight is 1-D [64], not a matrix" in entries["damaged.safetensors"]["note"]
    assert "fifo.safetensors" not in entries
    assert digests(tmp_path) == before

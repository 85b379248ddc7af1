"""`int8-studio convert / inspect / demo`: exit codes, messages, defaults, --overwrite, and the progress bar."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
from fnmatch import fnmatch

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.cli import main
from engine.cli.progress import ProgressBar
from engine.demo import DEMO_FILE, DEMO_LORA_FILE
from engine.jobs import Progress, format_duration
from engine.lora import inspect_lora
from tests.tiny_checkpoints import write_single_file


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def error_line(err: str) -> str:
    """The single line a user error prints on stderr."""
    assert err.endswith("\n") and err.count("\n") == 1, err
    return err.removeprefix("int8-studio: error: ").rstrip("\n")


def test_convert_writes_the_file_and_says_what_it_did(tmp_path, capsys):
    ckpt = write_single_file(tmp_path / "m.safetensors", "zimage")
    code, out, err = run(capsys, "convert", ckpt.path, "--scheme", "rowwise", "--keep", "layers.0.*")
    output = tmp_path / "m-int8-rowwise.safetensors"
    assert (code, err) == (0, "")  # stderr is not a TTY here: no progress bar
    assert out.startswith(f"wrote {output}: Z-Image ") and "int8 rowwise" in out
    with safe_open(str(output), "pt") as f:
        assert f.metadata()["int8_studio.keep"] == '["layers.0.*"]'
        assert "layers.1.attention.qkv.weight_scale" in f.keys()  # noqa: SIM118
        assert "layers.0.attention.qkv.weight_scale" not in f.keys()  # noqa: SIM118


def test_convert_rotate_marks_the_rotated_layers(tmp_path, capsys):
    ckpt = write_single_file(tmp_path / "c.safetensors", "chroma")
    code, out, err = run(capsys, "convert", ckpt.path, "--scheme", "rowwise", "--rotate", "down")
    output = tmp_path / "c-int8-rowwise-rotdown.safetensors"
    assert (code, err) == (0, "")
    assert out.startswith(f"wrote {output}: Chroma ") and "int8 rowwise (4 Hadamard-rotated)" in out
    with safe_open(str(output), "pt") as f:
        assert f.metadata()["int8_studio.rotate"] == "down"
        marker = json.loads(bytes(f.get_tensor("double_blocks.0.img_mlp.2.comfy_quant").tolist()))
    assert marker == {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 256}
    with pytest.raises(SystemExit) as e:
        main(["convert", str(ckpt.path), "--rotate", "half"])
    assert e.value.code == 2 and "invalid choice: 'half'" in capsys.readouterr().err


def test_keep_repeats_splits_on_commas_and_never_takes_the_source(tmp_path, capsys):
    ckpt = write_single_file(tmp_path / "m.safetensors", "zimage")
    code, _, err = run(capsys, "convert", "--keep", "layers.0.*", "--keep", "layers.2.*, noise_refiner.*", ckpt.path)
    assert (code, err) == (0, "")
    patterns = ["layers.0.*", "layers.2.*", "noise_refiner.*"]
    with safe_open(str(tmp_path / "m-int8-rowwise.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["int8_studio.keep"]) == patterns
        int8 = [n for n in f.keys() if f.get_slice(n).get_dtype() == "I8"]  # noqa: SIM118
    assert any(n.startswith("layers.1.") for n in int8)
    assert not [n for n in int8 if any(fnmatch(n, p) for p in patterns)]


def test_cast_float32_writes_the_kept_float32_tensors_as_bf16(tmp_path, capsys):
    ckpt = write_single_file(tmp_path / "m.safetensors", "chroma", dtype=torch.float32)
    kept_dtypes = {}
    for name, flag in (("plain", ()), ("cast", ("--cast-float32",))):
        output = tmp_path / f"{name}.safetensors"
        assert run(capsys, "convert", ckpt.path, "-o", output, *flag)[0] == 0
        with safe_open(str(output), "pt") as f:
            tensors = {n: f.get_tensor(n) for n in f.keys()}  # noqa: SIM118
        kept_dtypes[name] = {t.dtype for n, t in tensors.items() if t.is_floating_point() and "_scale" not in n}
    assert kept_dtypes == {"plain": {torch.float32}, "cast": {torch.bfloat16}}


def test_convert_never_overwrites_without_overwrite(tmp_path, capsys):
    ckpt = write_single_file(tmp_path / "m.safetensors", "flux2")
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"keep me")
    code, out, err = run(capsys, "convert", ckpt.path, "-o", target)
    assert (code, out) == (2, "")
    assert error_line(err) == f"{target} already exists; choose another name or replace it with --overwrite"
    assert target.read_bytes() == b"keep me"
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors", "out.safetensors"]
    for flag in ("--overwrite", "--force"):  # --force: the earlier name, still taken
        code, out, err = run(capsys, "convert", ckpt.path, "-o", target, flag)
        assert (code, err) == (0, "") and out.startswith(f"wrote {target}:")
        with safe_open(str(target), "pt") as f:
            assert f.metadata()["int8_studio.architecture"] == "flux2"


@pytest.mark.parametrize("command", [("convert",), ("lora", "merge"), ("export",)])
def test_every_command_that_replaces_a_file_says_overwrite(capsys, command):
    """One name for one switch: `--overwrite` in every command's help; `--force` is not listed."""
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    help_text = capsys.readouterr().out
    assert "--overwrite" in help_text and "--force" not in help_text


def test_convert_is_rowwise_by_default_and_says_why(tmp_path, capsys):
    """The app's default too: the lower error (docs/PERFORMANCE.md), said in the help."""
    ckpt = write_single_file(tmp_path / "m.safetensors", "flux2")
    code, out, err = run(capsys, "convert", ckpt.path)
    output = tmp_path / "m-int8-rowwise.safetensors"
    assert (code, err) == (0, "") and out.startswith(f"wrote {output}: ") and "int8 rowwise" in out
    with safe_open(str(output), "pt") as f:
        assert f.metadata()["int8_studio.scheme"] == "rowwise"
        assert f.get_slice("double_blocks.0.img_attn.qkv.weight_scale").get_shape()[1:] == [1]
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "(default: rowwise, the lower error, for a few KB per layer)" in help_text


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: write_single_file(d / "q.safetensors", "flux2", fmt="int8_tensorwise").path,
         "q.safetensors is already INT8 (int8_tensorwise); convert the original bf16/fp8 checkpoint instead"),
        (lambda d: d / "nothing.safetensors", "{d}/nothing.safetensors does not exist"),
    ],
)  # fmt: skip
def test_convert_user_errors_exit_2_with_one_line(tmp_path, capsys, make, message):
    source = make(tmp_path)
    before = sorted(os.listdir(tmp_path))
    code, out, err = run(capsys, "convert", source)
    assert (code, out) == (2, "")
    assert error_line(err) == message.format(d=tmp_path)
    assert sorted(os.listdir(tmp_path)) == before


def test_bad_arguments_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["convert", str(tmp_path / "m.safetensors"), "--scheme", "blockwise"])
    assert e.value.code == 2
    assert "invalid choice: 'blockwise'" in capsys.readouterr().err


def test_models_lists_every_family_with_its_variants_and_bench_names(capsys):
    from engine.models import REGISTRY

    code, out, err = run(capsys, "models")
    assert (code, err) == (0, "")
    *rows, last = [re.split(r"\s{2,}", line) for line in out.splitlines()]
    assert rows[0] == ["family", "variants", "int8-studio bench names (random weights)"]
    assert [row[0] for row in rows[1:]] == [a.label for a in REGISTRY.values()]
    flux1 = ["Flux.1", "dev, schnell, Fill dev, Depth/Canny dev", "flux1-dev, flux1-schnell, flux1-tiny, flux1-tiny-schnell"]
    assert flux1 in rows
    assert last == ["every family: convert, inspect and lora merge"]


def test_inspect_text_and_json(tmp_path, capsys):
    ckpt = write_single_file(tmp_path / "m.safetensors", "chroma", prefix="model.diffusion_model.")
    run(capsys, "convert", ckpt.path)
    output = tmp_path / "m-int8-rowwise.safetensors"
    code, out, err = run(capsys, "inspect", output)
    assert (code, err) == (0, "")
    assert "model        Chroma " in out and "single-file layout" in out
    assert "_quantization_metadata lists" in out and "agrees" in out
    assert "int8_studio.source_name = m.safetensors" in out
    code, out, err = run(capsys, "inspect", output, "--json")
    info = json.loads(out)
    assert (info["architecture"], info["layout"], info["marker_mismatches"]) == ("chroma", "single-file", [])
    n = info["metadata_layers"]
    assert n > 0 and info["quantized_layers"] == {"int8_rowwise": n}
    assert info["markers"] == {'{"format": "int8_tensorwise"}': n}
    assert info["dtypes"]["I8"]["tensors"] == n


def test_inspect_describes_a_file_that_is_no_model(tmp_path, capsys):
    path = tmp_path / "vae.safetensors"
    save_file({"decoder.conv_in.weight": torch.zeros(8, 4, 3, 3)}, str(path))
    code, out, err = run(capsys, "inspect", path)
    assert (code, err) == (0, "")
    assert "model        none recognised: not a supported diffusion model: it looks like a VAE" in out
    assert "dtypes       F32 1 (1.2 KB)" in out


def test_inspect_of_a_broken_file_exits_2(tmp_path, capsys):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    code, out, err = run(capsys, "inspect", path)
    assert (code, out) == (2, "")
    assert error_line(err).startswith(f"{path} ")


def test_demo_builds_converts_and_inspects_once(tmp_path, capsys):
    code, out, err = run(capsys, "demo", "--folder", tmp_path)
    assert (code, err) == (0, "")
    model, lora = tmp_path / DEMO_FILE, tmp_path / DEMO_LORA_FILE
    assert out.startswith(f"demo model: {model} (")
    assert out.splitlines()[1].startswith(f"demo LoRA: {lora} (") and lora.is_file()
    assert "int8 rowwise" in out and "model        Flux.2 " in out
    built = model.stat().st_mtime_ns
    lora_built = lora.stat().st_mtime_ns
    code, out2, _ = run(capsys, "demo", "--folder", tmp_path)
    assert code == 0 and (model.stat().st_mtime_ns, lora.stat().st_mtime_ns) == (built, lora_built)  # reused
    assert out2.splitlines()[:2] == out.splitlines()[:2]
    suggested = out.splitlines()[-1].removeprefix("next, merge the demo LoRA: int8-studio ")
    code, out, err = run(capsys, *suggested.split(" "))
    assert (code, err) == (0, "") and f"1 LoRA, {inspect_lora(lora).layers} tensors changed" in out


def test_internal_errors_exit_1(tmp_path):
    """A bug (not a JobError) is not dressed up as a user error: Python's traceback and status 1."""
    script = (
        "import sys, engine.convert as c\n"
        "def boom(*a, **k): raise RuntimeError('bug')\n"
        "c.detect = boom\n"
        "from engine.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    ckpt = write_single_file(tmp_path / "m.safetensors", "flux2")
    done = subprocess.run(
        [sys.executable, "-c", script, "convert", str(ckpt.path)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 1 and "RuntimeError: bug" in done.stderr


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.4, "0 s"), (59, "59 s"), (61, "1 min 01 s"), (3599, "59 min 59 s"), (7440, "2 h 04 min")],
)
def test_format_duration(seconds, text):
    """The one way durations are written: the progress bar's ETA here, the app's job panel there."""
    assert format_duration(seconds) == text


def test_progress_bar_draws_on_a_terminal_only():
    started = time.monotonic() - 10
    reports = [Progress("converting", done, 100, f"t{done}", started) for done in (0, 50, 100)]
    pipe = io.StringIO()
    with ProgressBar(pipe) as bar:
        for p in reports:
            bar(p)
    assert pipe.getvalue() == ""
    terminal = Terminal()
    with ProgressBar(terminal, interval=0) as bar:
        for p in reports:
            bar(p)
        bar(Progress("verifying", 1, 1))
    lines = terminal.getvalue().split("\n")
    assert len(lines) == 3 and lines[-1] == ""  # one line per stage, each finished
    draws = lines[0].split("\r")[1:]
    assert "converting [" in draws[0] and "0%" in draws[0] and "ETA" not in draws[0]
    assert re.search(r" 50%  ETA 1[0-2] s  t50", draws[1])  # 10 s for half: about 10 s left
    assert "100%" in draws[2] and "ETA" not in draws[2]
    assert lines[1].startswith("\rverifying [") and "100%" in lines[1]


def test_help_imports_no_torch_triton_qt_or_hub():
    """`int8-studio --help` starts in a fraction of a second: the parser and the command modules import
    the heavy packages only inside the command that needs them (timings: benchmarks/startup.py)."""
    heavy = ("torch", "triton", "PySide6", "huggingface_hub", "yaml")
    code = (
        "import sys\nfrom engine.cli.parser import build_parser\nbuild_parser('').format_help()\n"
        f"print([m for m in {heavy!r} if m in sys.modules])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


def test_every_subcommand_still_builds_its_full_parser(capsys):
    """Only the command being run gets its arguments; each one still parses them."""
    from engine.cli.parser import build_parser, command_name

    assert command_name(["--version"]) is None and command_name(["lora", "merge", "-o", "x"]) == "lora"
    full = build_parser()
    for name in ("convert", "inspect", "bench", "lora", "comfyui", "export", "library", "download", "app"):
        with pytest.raises(SystemExit):
            build_parser(name).parse_args([name, "--help"])
        alone = capsys.readouterr().out
        with pytest.raises(SystemExit):
            full.parse_args([name, "--help"])
        assert capsys.readouterr().out == alone

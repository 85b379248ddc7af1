"""`int8-studio lora merge / inspect`: output, strengths, modes, exit codes and one-line errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from safetensors import safe_open

from engine.cli import main
from engine.cli.lora import lora_spec
from engine.lora import LoraSpec
from tests.tiny_checkpoints import write_diffusers, write_single_file
from tests.tiny_loras import write_lora


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_merge_with_strengths_and_modes(tmp_path, capsys):
    model = write_single_file(tmp_path / "m.safetensors", "flux2", fmt="int8_rowwise")
    a = write_lora(tmp_path / "a.safetensors", "flux2", "kohya")
    b = write_lora(tmp_path / "b.safetensors", "flux2", "diffusers", only=("^single_transformer_blocks",))
    out = tmp_path / "merged.safetensors"
    code, stdout, err = run(
        capsys,
        "lora",
        "merge",
        model.path,
        f"{a.path}:0.75",
        b.path,
        "-o",
        out,
        "--mode",
        "stochastic",
        "--seed",
        7,
    )
    assert (code, err) == (0, "")
    lines = stdout.splitlines()
    assert lines[0] == f"wrote {out}: Flux.2 custom + 2 LoRAs, {len(a.changes)} tensors changed"
    assert re.fullmatch(
        r"  stochastic: \d+ int8 weights, change kept \d+%, rms error vs the float merge \d+\.\d\d% of the "
        r"LoRAs' change, \d+ values clipped at ±127",
        lines[1],
    )
    assert lines[2] == f"  a.safetensors × 0.75: kohya LoRA, rank 4, {len(a.changes)} layers"
    assert lines[3] == f"  b.safetensors × 1: diffusers/PEFT LoRA, rank 4, {len(b.changes)} layers"
    with safe_open(str(out), "pt") as f:
        loras = json.loads(f.metadata()["int8_studio.loras"])
    assert loras == [{"name": "a.safetensors", "strength": 0.75}, {"name": "b.safetensors", "strength": 1.0}]
    again = tmp_path / "again.safetensors"  # the same seed gives the same file
    code, _, _ = run(
        capsys,
        "lora",
        "merge",
        model.path,
        f"{a.path}:0.75",
        b.path,
        "-o",
        again,
        "--mode",
        "stochastic",
        "--seed",
        7,
    )
    assert code == 0 and again.read_bytes() == out.read_bytes()


def test_merge_is_auto_by_default_and_warns_when_requant_drops_the_change(tmp_path, capsys):
    model = write_single_file(tmp_path / "m.safetensors", "flux2", fmt="int8_tensorwise")
    lora = write_lora(tmp_path / "a.safetensors", "flux2", "kohya")
    small = f"{lora.path}:0.05"
    code, out, err = run(capsys, "lora", "merge", model.path, small, "-o", tmp_path / "auto.safetensors")
    assert (code, err) == (0, "")
    assert re.fullmatch(
        r"  auto: (\d+) int8 weights \(\1 stochastic\), change kept \d+%, rms error vs the float merge "
        r"\d+\.\d\d% of the LoRAs' change, \d+ values clipped at ±127",
        out.splitlines()[1],
    )
    code, out, err = run(
        capsys, "lora", "merge", model.path, small, "-o", tmp_path / "requant.safetensors",
        "--mode", "requant",
    )  # fmt: skip
    assert code == 0
    assert re.fullmatch(r"  requant: \d+ int8 weights, change kept -?\d+%, .*", out.splitlines()[1])
    assert re.fullmatch(
        r"warning: requant rounded away \d+% of the LoRAs' change \(it is smaller than half an int8 step in "
        r"most layers\); use auto or stochastic to keep it\n",
        err,
    )


def test_merge_errors_are_one_line(tmp_path, capsys):
    model = write_single_file(tmp_path / "m.safetensors", "flux2")
    lora = write_lora(tmp_path / "z.safetensors", "zimage", "comfyui")
    code, out, err = run(capsys, "lora", "merge", model.path, lora.path, "-o", tmp_path / "out.safetensors")
    assert (code, out) == (2, "")
    assert re.fullmatch(
        r"int8-studio: error: z\.safetensors is not for this Flux\.2 custom model: "
        r"it looks like a Z-Image tiny LoRA \(e\.g\. 'diffusion_model\.[\w.]+'\)\n",
        err,
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors", "z.safetensors"]


def test_merge_names_overwrite_when_the_output_exists(tmp_path, capsys):
    model = write_single_file(tmp_path / "m.safetensors", "flux2")
    lora = write_lora(tmp_path / "a.safetensors", "flux2", "kohya")
    taken = tmp_path / "taken.safetensors"
    taken.write_bytes(b"keep me")
    code, out, err = run(capsys, "lora", "merge", model.path, lora.path, "-o", taken)
    assert (code, out) == (2, "")
    assert err == f"int8-studio: error: {taken} already exists; choose another name or replace it with --overwrite\n"
    assert taken.read_bytes() == b"keep me"
    assert run(capsys, "lora", "merge", model.path, lora.path, "-o", taken, "--overwrite")[0] == 0
    assert run(capsys, "lora", "merge", model.path, lora.path, "-o", taken, "--force")[0] == 0  # the earlier name


def test_merge_without_output_writes_beside_the_model(tmp_path, capsys):
    """No ``-o``: ``<model>-<lora>[-<lora>…].safetensors`` beside the model (a diffusers folder's too),
    as ``convert`` names its output; never replaced unless asked."""
    model = write_single_file(tmp_path / "m.safetensors", "flux2", fmt="int8_rowwise")
    (tmp_path / "loras").mkdir()
    a = write_lora(tmp_path / "loras" / "a.safetensors", "flux2", "kohya")
    b = write_lora(tmp_path / "loras" / "b.safetensors", "flux2", "comfyui")
    code, out, err = run(capsys, "lora", "merge", model.path, f"{a.path}:0.5", b.path)
    merged = tmp_path / "m-a-b.safetensors"
    assert (code, err) == (0, "") and out.startswith(f"wrote {merged}: Flux.2 custom + 2 LoRAs, ")
    before = merged.read_bytes()
    code, out, err = run(capsys, "lora", "merge", model.path, f"{a.path}:0.5", b.path)
    assert (code, out) == (2, "")
    assert err == f"int8-studio: error: {merged} already exists; choose another name or replace it with --overwrite\n"
    assert merged.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loras", "m-a-b.safetensors", "m.safetensors"]

    folder = write_diffusers(tmp_path / "klein", "flux2")
    code, out, err = run(capsys, "lora", "merge", folder.path, a.path)
    assert (code, err) == (0, "") and out.startswith(f"wrote {tmp_path / 'klein-a.safetensors'}: ")


def test_merge_never_writes_over_the_model(tmp_path, capsys):
    model = write_single_file(tmp_path / "m.safetensors", "flux2")
    lora = write_lora(tmp_path / "a.safetensors", "flux2", "kohya")
    before = model.path.read_bytes()
    code, out, err = run(capsys, "lora", "merge", model.path, lora.path, "-o", model.path, "--overwrite")
    assert (code, out) == (2, "")
    assert err == (
        f"int8-studio: error: the output {model.path} is the model itself; write the merged model to a new file\n"
    )
    assert model.path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "m.safetensors"]


def test_inspect_without_and_with_a_model(tmp_path, capsys):
    lora = write_lora(tmp_path / "l.safetensors", "zimage", "kohya", rank=8)
    code, out, err = run(capsys, "lora", "inspect", lora.path)
    assert (code, err) == (0, "")
    linears, keys = len(lora.changes), len(lora.tensors)  # the LoRA adapts every linear layer
    assert out.splitlines()[1:] == [
        f"format    kohya LoRA, {linears} layers",
        "rank      8 (alpha/rank 0.5)",
        "target    Z-Image tiny",
        f"coverage  {keys} of {keys} keys matched; adapts {linears} of the model's {linears} linear layers",
    ]
    model = write_single_file(tmp_path / "m.safetensors", "zimage")
    code, out, err = run(capsys, "lora", "inspect", lora.path, "--model", model.path, "--json")
    info = json.loads(out)
    assert (code, err) == (0, "")
    assert (info["target"], info["fits"], info["target_layers"], info["unmatched"]) == (
        "Z-Image custom",
        True,
        linears,
        [],
    )
    other = write_single_file(tmp_path / "f.safetensors", "flux2")
    code, out, err = run(capsys, "lora", "inspect", lora.path, "--model", other.path)
    assert (code, out) == (2, "") and err.startswith(
        "int8-studio: error: l.safetensors is not for this Flux.2 custom model"
    )


@pytest.mark.parametrize(
    "text,spec",
    [
        ("a.safetensors", LoraSpec(Path("a.safetensors"))),
        ("dir/a.safetensors:0.8", LoraSpec(Path("dir/a.safetensors"), 0.8)),
        ("a.safetensors:-1.5", LoraSpec(Path("a.safetensors"), -1.5)),
        (r"C:\loras\a.safetensors", LoraSpec(Path(r"C:\loras\a.safetensors"))),
        (r"C:\loras\a.safetensors:2", LoraSpec(Path(r"C:\loras\a.safetensors"), 2.0)),
    ],
)
def test_lora_strength_syntax(text, spec):
    assert lora_spec(text) == spec


def test_a_strength_that_is_not_a_number(tmp_path, capsys):
    with pytest.raises(SystemExit) as caught:
        main(["lora", "merge", "m.safetensors", "a.safetensors:strong", "-o", "out.safetensors"])
    assert caught.value.code == 2
    assert "strength 'strong' of a.safetensors is not a number" in capsys.readouterr().err

"""The demo LoRA: it fits every linear layer of the demo model, merges, and is built once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from engine.convert import ConvertRequest, run_convert
from engine.demo import (
    DEMO_FILE,
    DEMO_LORA_FILE,
    DEMO_LORA_RANK,
    build_demo_lora,
    build_demo_model,
    made_from_demo,
)
from engine.info import inspect_checkpoint
from engine.jobs import Cancelled, CancelToken
from engine.lora import LoraMergeRequest, LoraSpec, inspect_lora, run_lora_merge
from tests.tiny_checkpoints import write_single_file


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("demo")
    build_demo_model(folder)
    build_demo_lora(folder)
    return folder


def load(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)


def test_demo_lora_covers_every_linear_layer_of_the_demo_model(demo_folder):
    info = inspect_lora(demo_folder / DEMO_LORA_FILE, demo_folder / DEMO_FILE)
    assert (info.format, info.ranks, info.fits) == ("ComfyUI LoRA", (DEMO_LORA_RANK,), True)
    assert info.unmatched == () and info.matched_keys == info.tensors
    assert info.target_layers == info.target_linears == info.layers > 0
    assert inspect_lora(demo_folder / DEMO_LORA_FILE).target.startswith("Flux.2")


def test_demo_lora_merges_into_the_demo_model(demo_folder, tmp_path):
    strength = round(float(torch.empty(()).uniform_(0.3, 1.5)), 2)
    request = LoraMergeRequest(
        demo_folder / DEMO_FILE, (LoraSpec(demo_folder / DEMO_LORA_FILE, strength),), tmp_path / "m.safetensors"
    )
    result = run_lora_merge(request)
    model, lora, merged = load(demo_folder / DEMO_FILE), load(demo_folder / DEMO_LORA_FILE), load(result.output)
    stems = [name.removesuffix(".alpha") for name in lora if name.endswith(".alpha")]
    targets = {stem.removeprefix("diffusion_model.") + ".weight": stem for stem in stems}
    assert result.tensors_changed == len(targets)
    for name, stem in targets.items():
        up, down = lora[f"{stem}.lora_up.weight"].double(), lora[f"{stem}.lora_down.weight"].double()
        expected = model[name].double() + strength * float(lora[f"{stem}.alpha"]) / DEMO_LORA_RANK * (up @ down)
        step = expected.abs().max() / 2**7  # one bf16 rounding
        assert (merged[name].double() - expected).abs().max() <= step, name
    assert all(torch.equal(merged[n], t) for n, t in model.items() if n not in targets)


def test_demo_lora_is_deterministic_and_built_once(demo_folder, tmp_path):
    built = (demo_folder / DEMO_LORA_FILE).stat().st_mtime_ns
    assert build_demo_lora(demo_folder) == demo_folder / DEMO_LORA_FILE
    assert (demo_folder / DEMO_LORA_FILE).stat().st_mtime_ns == built
    again = build_demo_lora(tmp_path)
    assert again.read_bytes() == (demo_folder / DEMO_LORA_FILE).read_bytes()
    assert os.listdir(tmp_path) == [DEMO_LORA_FILE]


def test_a_cancelled_demo_lora_leaves_nothing(tmp_path):
    cancel = CancelToken()
    cancel.cancel()
    with pytest.raises(Cancelled):
        build_demo_lora(tmp_path, cancel=cancel)
    assert os.listdir(tmp_path) == []


def test_files_made_from_the_demo_model_are_known(demo_folder, tmp_path):
    converted = run_convert(ConvertRequest(demo_folder / DEMO_FILE, tmp_path / "renamed.safetensors")).output
    other = write_single_file(tmp_path / "other.safetensors", "flux2").path
    made = {p.name: made_from_demo(inspect_checkpoint(p).metadata) for p in (demo_folder / DEMO_FILE, converted, other)}
    assert made == {DEMO_FILE: True, "renamed.safetensors": True, "other.safetensors": False}

"""What a LoRA merge reports and refuses, on tiny real-layout models and LoRAs: the keys that found no
layer, LoRAs for another model or size, text-encoder LoRAs, files that are no LoRA, corrupt, NaN or
truncated LoRAs, bad requests and cancelling; a refused or cancelled merge leaves nothing behind."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from engine.checkpoint import CheckpointError, CheckpointReader
from engine.jobs import Cancelled, CancelToken, OutputExistsError
from engine.lora import LoraError, LoraMergeRequest, LoraSpec, run_lora_merge
from engine.models import REGISTRY
from engine.models.spec import natural_key
from tests.test_lora import merge, tiny_model
from tests.tiny_checkpoints import write_single_file
from tests.tiny_loras import TinyLora, write_lora


def files_in(folder) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_match_report_lists_what_found_no_layer(tmp_path):
    model = tiny_model(tmp_path)
    lora = write_lora(tmp_path / "lora.safetensors", "flux2", "comfyui", only=("single_blocks.0.",))
    extra = {
        "diffusion_model.double_blocks.99.img_attn.qkv.lora_down.weight": torch.zeros(4, 64),
        "diffusion_model.double_blocks.99.img_attn.qkv.lora_up.weight": torch.zeros(192, 4),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 8),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(8, 4),
        "training_step": torch.zeros(1),
    }
    save_file(lora.tensors | extra, str(lora.path))
    result, _ = merge(tmp_path, model, (lora, 1.0))
    (report,) = result.matches
    assert sorted(report.unmatched) == sorted(
        k for k in extra if "double_blocks.99" in k or k == "training_step"
    )
    assert sorted(report.text_encoder) == sorted(k for k in extra if k.startswith("lora_te1"))
    assert report.matched_keys == len(lora.tensors)


def run_expecting(tmp_path, error, message, model, *loras, **kw):
    before = files_in(tmp_path)
    with pytest.raises(error) as caught:
        merge(tmp_path, model, *loras, **kw)
    assert str(caught.value) == message
    assert files_in(tmp_path) == before  # nothing left behind


def test_a_lora_for_another_architecture(tmp_path):
    model = tiny_model(tmp_path, "flux2")
    lora = write_lora(tmp_path / "zimage.safetensors", "zimage", "kohya")
    first = min(lora.tensors, key=natural_key).split(".")[0]
    run_expecting(
        tmp_path, LoraError,
        "zimage.safetensors is not for this Flux.2 custom model: it looks like a Z-Image tiny LoRA "
        f"(e.g. '{first}')",
        model, (lora, 1.0),
    )  # fmt: skip


def test_a_lora_for_another_size(tmp_path):
    model = tiny_model(tmp_path, "flux2")
    small = {**REGISTRY["flux2"].tiny["tiny"], "hidden": 32, "head_dim": 8}
    lora = write_lora(
        tmp_path / "small.safetensors", "flux2", "kohya", config=small, only=("double_blocks.0.img_attn.qkv",)
    )
    run_expecting(
        tmp_path, LoraError,
        "small.safetensors does not fit this Flux.2 custom model: its layer "
        "'lora_unet_double_blocks_0_img_attn_qkv' changes a [96, 32] weight but "
        "'double_blocks.0.img_attn.qkv.weight' needs [192, 64]; it looks like a "
        "Flux.2 LoRA",
        model, (lora, 1.0),
    )  # fmt: skip


def test_a_text_encoder_lora(tmp_path):
    model = tiny_model(tmp_path)
    path = tmp_path / "te.safetensors"
    stem = "lora_te1_text_model_encoder_layers_0_mlp_fc1"
    save_file(
        {f"{stem}.lora_down.weight": torch.zeros(4, 8), f"{stem}.lora_up.weight": torch.zeros(8, 4)},
        str(path),
    )
    message = "te.safetensors only adapts a text encoder (1 layers), not a Flux.2 model"
    run_expecting(tmp_path, LoraError, message, model, (TinyLora(path, "kohya", {}), 1.0))


def test_a_model_or_other_file_given_as_lora(tmp_path):
    model = tiny_model(tmp_path)
    other = write_single_file(tmp_path / "other.safetensors", "zimage")
    message = "other.safetensors is a Z-Image custom model, not a LoRA"
    run_expecting(tmp_path, LoraError, message, model, (TinyLora(other.path, "", {}), 1.0))
    save_file({"b.weight": torch.zeros(2), "a.10": torch.zeros(1), "a.9": torch.zeros(1)}, str(other.path))
    message = "other.safetensors holds no LoRA layers (3 tensors, e.g. 'a.9', 'a.10', 'b.weight'): "
    message += "it is not a LoRA file"
    run_expecting(tmp_path, LoraError, message, model, (TinyLora(other.path, "", {}), 1.0))


def corrupted(lora: TinyLora, change) -> TinyLora:
    tensors = dict(lora.tensors)
    change(tensors)
    save_file(tensors, str(lora.path))
    return lora


@pytest.mark.parametrize(
    "fmt,change,problem",
    [
        ("kohya", lambda t: t.pop("lora_unet_img_in.lora_up.weight"),
         "layer 'lora_unet_img_in' has no lora_up.weight (lora_B.weight)"),
        ("loha", lambda t: t.pop("lora_unet_img_in.hada_w2_b"), "layer 'lora_unet_img_in' has no hada_w2_b"),
        ("lokr", lambda t: t.pop("lora_unet_img_in.lokr_w2_a"),
         "layer 'lora_unet_img_in' has no lokr_w2 (or lokr_w2_a and lokr_w2_b)"),
        ("kohya", lambda t: t.update({"lora_unet_img_in.lora_up.weight": torch.zeros(64, 3)}),
         "layer 'lora_unet_img_in' has rank 4 in its down factor but 3 in its up factor"),
        ("kohya", lambda t: t.update({"lora_unet_img_in.hada_w1_a": torch.zeros(64, 4)}),
         "layer 'lora_unet_img_in' mixes LoRA and LoHa factors"),
        ("kohya", lambda t: t.update({"lora_unet_img_in.alpha": torch.zeros(2)}),
         "layer 'lora_unet_img_in' has an alpha of shape [2], not a number"),
        ("dora", lambda t: t.update({"lora_unet_img_in.dora_scale": torch.zeros(3)}),
         "layer 'lora_unet_img_in' has a DoRA scale of shape [3] for a delta of shape [64, 16]"),
    ],
)  # fmt: skip
def test_an_inconsistent_lora(tmp_path, fmt, change, problem):
    model = tiny_model(tmp_path)
    lora = corrupted(write_lora(tmp_path / "bad.safetensors", "flux2", fmt), change)
    message = f"bad.safetensors: {problem}: the file is corrupt or incomplete"
    run_expecting(tmp_path, LoraError, message, model, (lora, 1.0))


def test_nan_in_a_lora_stops_the_merge_and_leaves_nothing(tmp_path):
    model = tiny_model(tmp_path)
    key = "lora_unet_single_blocks_2_linear2.lora_down.weight"
    lora = write_lora(tmp_path / "nan.safetensors", "flux2", "kohya")
    corrupted(lora, lambda t: t[key].view(-1).__setitem__(5, float("nan")))
    message = f"nan.safetensors: '{key}' has NaN or Inf values: the file is corrupt"
    run_expecting(tmp_path, LoraError, message, model, (lora, 1.0))


def test_a_truncated_lora(tmp_path):
    model = tiny_model(tmp_path)
    lora = write_lora(tmp_path / "cut.safetensors", "flux2", "kohya")
    data = lora.path.read_bytes()
    lora.path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError) as direct:
        CheckpointReader(lora.path)
    assert "cut.safetensors is truncated" in str(direct.value)
    run_expecting(tmp_path, CheckpointError, str(direct.value), model, (lora, 1.0))


def test_bad_requests(tmp_path):
    model = tiny_model(tmp_path)
    lora = write_lora(tmp_path / "lora.safetensors", "flux2", "kohya", only=("img_in",))
    run_expecting(tmp_path, LoraError, "no LoRA to merge: give at least one LoRA file", model)
    run_expecting(
        tmp_path, LoraError, "unknown merge mode 'nearest'; use auto, requant, stochastic", model, (lora, 1.0),
        mode="nearest",
    )  # fmt: skip
    run_expecting(
        tmp_path, LoraError, "strength nan of lora.safetensors is not a number; give one between -100 and 100",
        model, (lora, float("nan")),
    )  # fmt: skip
    run_expecting(
        tmp_path, LoraError,
        f"the output {model.path} is the model itself; write the merged model to a new file",
        model, (lora, 1.0), out=model.path.name,
    )  # fmt: skip
    (tmp_path / "taken.safetensors").write_bytes(b"x")
    run_expecting(
        tmp_path, OutputExistsError,
        f"{tmp_path / 'taken.safetensors'} already exists; choose another name or replace it",
        model, (lora, 1.0), out="taken.safetensors",
    )  # fmt: skip


def test_cancel_leaves_nothing(tmp_path):
    model = tiny_model(tmp_path)
    lora = write_lora(tmp_path / "lora.safetensors", "flux2", "kohya")
    token = CancelToken()

    def progress(p):
        if p.done >= 3:
            token.cancel()

    before = files_in(tmp_path)
    request = LoraMergeRequest(model.path, (LoraSpec(lora.path),), tmp_path / "out.safetensors")
    with pytest.raises(Cancelled):
        run_lora_merge(request, progress, token)
    assert files_in(tmp_path) == before

"""LoRA reading, mapping and merging on tiny real-layout models and LoRAs in every published layout:
every format lands on the right tensors and rows (against a float reference and against peft), the
architecture a LoRA is for, and the merged file listing its LoRAs. Also the helpers the other LoRA tests
share (test_lora_int8_merge.py: the int8 merge modes; test_lora_errors.py: reports and refusals)."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.checkpoint import CheckpointReader
from engine.lora import LoraFile, LoraMergeRequest, LoraSpec, guess_target, run_lora_merge
from engine.lora.job import LORAS_METADATA
from engine.models import REGISTRY
from tests.tiny_checkpoints import TinyCheckpoint, write_single_file
from tests.tiny_loras import FORMAT_LABELS, FORMATS, TinyLora, write_lora

ARCHS = tuple(REGISTRY)


def tiny_model(tmp_path, arch: str = "flux2", fmt: str = "float", dtype=torch.float32) -> TinyCheckpoint:
    return write_single_file(tmp_path / f"{arch}-{fmt}.safetensors", arch, dtype=dtype, fmt=fmt)


def merge(
    tmp_path, model: TinyCheckpoint, *loras: tuple[TinyLora, float], out: str = "out.safetensors", **kw
):
    request = LoraMergeRequest(model.path, tuple(LoraSpec(l.path, s) for l, s in loras), tmp_path / out, **kw)
    result = run_lora_merge(request)
    return result, load_file(str(result.output))


def strength() -> float:
    return round(random.uniform(0.3, 1.5), 3)


# --- every format lands on the right tensors and rows ---------------------------------------------


@pytest.mark.parametrize(
    "arch,fmt",
    [("flux2", fmt) for fmt in FORMATS]
    + [(a, f) for a in ARCHS if a != "flux2" for f in ("kohya", "diffusers") if f == "kohya" or REGISTRY[a].rules]
    + [("flux1", f) for f in ("comfyui", "ai-toolkit")]
    + [("wan", f) for f in ("comfyui", "comfyui_ab")]  # kohya is musubi-tuner's Wan layout
    + [(a, "comfyui") for a in ("ltx2", "krea2", "ernie", "hidream_o1", "anima")],
)
def test_every_format_merges_like_the_float_reference(tmp_path, arch, fmt):
    model = tiny_model(tmp_path, arch)
    lora, s = write_lora(tmp_path / "lora.safetensors", arch, fmt), strength()
    result, merged = merge(tmp_path, model, (lora, s))

    (report,) = result.matches
    assert (report.format, report.unmatched, report.text_encoder) == (FORMAT_LABELS[fmt], (), ())
    assert report.matched_keys == len(lora.tensors)
    expected = lora.merged(model.reference, s)
    assert result.tensors_changed == len(expected)
    for name, tensor in merged.items():
        if name in expected:
            torch.testing.assert_close(tensor.double(), expected[name], rtol=1e-5, atol=1e-6, msg=name)
        else:
            assert torch.equal(tensor, model.reference[name]), name


@pytest.mark.parametrize("arch", ["flux2", "chroma", "qwen_image", "flux1"])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_a_peft_lora_merges_like_peft(tmp_path, arch, dora):
    """peft trains the LoRA on diffusers' own module; diffusers saves it; peft's merge is the reference."""
    import diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    from tests.test_models import diffusers_kwargs
    from tests.tiny_checkpoints import to_diffusers

    a, model = REGISTRY[arch], tiny_model(tmp_path, arch)
    config = a.tiny["tiny"]
    transformer = getattr(diffusers, a.diffusers_class)(**diffusers_kwargs(arch, config))
    transformer.load_state_dict(to_diffusers(a, model.reference, config))
    targets = [
        "to_q",
        "to_k",
        "to_v",
        "to_qkv_mlp_proj",
        "proj_mlp",
        "norm_out.linear",
        "linear_in",
        "to_out.0",
        "img_mod.1",
        "txt_mlp.net.2",
    ]
    lora_config = LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, use_dora=dora
    )
    transformer.add_adapter(lora_config)
    diffusers.Flux2KleinPipeline.save_lora_weights(
        tmp_path, get_peft_model_state_dict(transformer), weight_name="peft.safetensors",
        transformer_lora_adapter_metadata=lora_config.to_dict(),
    )  # fmt: skip
    s = 1.0 if dora else strength()  # peft scales a DoRA's delta, ComfyUI blends the result: equal at 1
    transformer.fuse_lora(lora_scale=s)
    transformer.unload_lora()
    reference = transformer.state_dict()

    result, merged = merge(tmp_path, model, (TinyLora(tmp_path / "peft.safetensors", "diffusers", {}), s))

    assert result.matches[0].format == "diffusers/PEFT LoRA" + (" with DoRA" if dora else "")
    assert result.matches[0].unmatched == ()
    changed = 0
    for name, tensor in merged.items():
        pieces = a.diffusers_pieces(name, config)
        expected = torch.cat([reference[p.name][p.rows] for p in pieces])
        torch.testing.assert_close(tensor, expected, rtol=1e-5, atol=1e-6, msg=name)
        changed += not torch.equal(tensor, model.reference[name])
    assert changed == result.tensors_changed > 0


def test_split_parts_patch_only_their_rows(tmp_path):
    """A diffusers LoRA on to_q alone changes rows [0:h] of the fused qkv and nothing else."""
    model = tiny_model(tmp_path, "flux2", "int8_rowwise")
    lora = write_lora(
        tmp_path / "q.safetensors", "flux2", "diffusers", only=(r"^transformer_blocks\.\d+\.attn\.to_q$",)
    )
    result, merged = merge(tmp_path, model, (lora, 1.0), mode="stochastic")
    h = REGISTRY["flux2"].tiny["tiny"]["hidden"]
    qkv = [n for n in merged if n.endswith("img_attn.qkv.weight")]
    assert qkv and result.tensors_changed == len(qkv)
    for name in qkv:
        assert not torch.equal(merged[name][:h], model.reference[name][:h])
        assert torch.equal(merged[name][h:], model.reference[name][h:])


def test_architecture_guess(tmp_path):
    for arch in ARCHS:
        for fmt in ("kohya", "diffusers") if REGISTRY[arch].rules else ("kohya",):
            path = write_lora(tmp_path / f"{arch}-{fmt}.safetensors", arch, fmt).path
            with LoraFile(path) as lora:
                # diffusers names no pixel-head layer of Radiance: its LoRA is on Chroma's blocks, which
                # fit both families, and the first one wins
                family = REGISTRY["chroma" if (arch, fmt) == ("chroma_radiance", "diffusers") else arch]
                assert str(guess_target(lora)) == f"{family.label} tiny"


def test_merged_file_lists_its_loras(tmp_path):
    model = tiny_model(tmp_path, "zimage", "int8_tensorwise", dtype=torch.bfloat16)
    source = {
        "format": "pt",
        "int8_studio.source_sha256": "ab12",
        "modelspec.hash_sha256": "0x99",
        "note": "kept",
    }
    save_file(load_file(str(model.path)), str(model.path), metadata=source)
    a, b = (write_lora(tmp_path / f"{n}.safetensors", "zimage", "kohya", only=("layers.0.",)) for n in "ab")
    once, _ = merge(tmp_path, model, (a, 0.5), out="once.safetensors")
    twice = TinyCheckpoint(once.output, model.arch, model.config, {}, {})
    result, _ = merge(tmp_path, twice, (b, -1.25), out="twice.safetensors")
    with CheckpointReader(result.output) as reader:
        loras = [{"name": "a.safetensors", "strength": 0.5}, {"name": "b.safetensors", "strength": -1.25}]
        # a hash of the model's own bytes no longer holds; where it came from still does
        assert reader.metadata == {
            "format": "pt", "int8_studio.source_sha256": "ab12", "note": "kept",
            LORAS_METADATA: json.dumps(loras),
        }  # fmt: skip

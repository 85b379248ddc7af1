"""LoRA reading, mapping and merging on tiny real-layout models and LoRAs in every published layout."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.checkpoint import CheckpointError, CheckpointReader
from engine.convert import ConvertRequest, run_convert
from engine.int8.rotation import hadamard
from engine.jobs import Cancelled, CancelToken, OutputExistsError
from engine.lora import MODES, LoraError, LoraFile, LoraMergeRequest, LoraSpec, guess_target, run_lora_merge
from engine.lora.job import LORAS_METADATA
from engine.models import REGISTRY
from engine.models.spec import natural_key
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


def dequantized(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every weight as float64: int8 weights times their scale."""
    out = {}
    for name, t in tensors.items():
        scale = tensors.get(name.removesuffix(".weight") + ".weight_scale")
        if t.dtype == torch.int8:
            out[name] = t.double() * (scale.double().reshape(()) if scale.numel() == 1 else scale.double())
        elif t.is_floating_point() and not name.endswith(".weight_scale"):
            out[name] = t.double()
    return out


def float32_slack(want: torch.Tensor) -> float:
    """What float32 arithmetic may add to a rounding bound (the engine patches in float32; the
    reference is float64): a value on a rounding boundary may go either way."""
    return float(want.abs().max()) * 2**-20


def files_in(folder) -> set[str]:
    return {p.name for p in folder.iterdir()}


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


# --- int8 merge modes --------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["tensorwise", "rowwise"])
@pytest.mark.parametrize("mode", MODES)
def test_int8_merge_is_within_the_modes_bound(tmp_path, scheme, mode):
    model = tiny_model(tmp_path, "flux2", f"int8_{scheme}", dtype=torch.bfloat16)
    original = dequantized(model.reference)
    lora, s = write_lora(tmp_path / "lora.safetensors", "flux2", "kohya"), strength()
    result, merged = merge(tmp_path, model, (lora, s), mode=mode, seed=random.randrange(2**31))
    expected = lora.merged(original, s)
    actual = dequantized(merged)

    errors, changes, kept = 0.0, 0.0, 0.0
    for name, want in expected.items():
        if merged[name].dtype != torch.int8:  # high-precision layers: the float merge, rounded to bf16
            torch.testing.assert_close(actual[name], want, rtol=2**-8, atol=1e-7, msg=name)
            continue
        scale = merged[name.removesuffix(".weight") + ".weight_scale"].double()
        step = scale.reshape(()) if scale.numel() == 1 else scale
        error = actual[name] - want
        used = result.stats.per_layer[name].mode
        assert used == mode or mode == "auto", name
        if used == "requant":  # fresh absmax scales, rounded to nearest
            absmax = want.abs().amax() if scale.numel() == 1 else want.abs().amax(dim=1, keepdim=True)
            torch.testing.assert_close(step, absmax / 127, rtol=1e-6, atol=0)
            assert (error.abs() <= step / 2 + float32_slack(want)).all(), name
        else:  # the existing scale, stochastic rounding: less than one step off, unless clipped at ±127
            old_scale = model.reference[name.removesuffix(".weight") + ".weight_scale"]
            assert torch.equal(merged[name.removesuffix(".weight") + ".weight_scale"], old_scale)
            beyond = (want.abs() / step - 127).clamp_min(0)
            assert (error.abs() < step * (1 + beyond) + float32_slack(want)).all(), name
        change = want - original[name]
        errors += float(error.square().sum())
        changes += float(change.square().sum())
        kept += float(((actual[name] - original[name]) * change).sum())
    assert result.stats.relative_error == pytest.approx(math.sqrt(errors / changes), rel=1e-3)
    assert result.stats.kept == pytest.approx(kept / changes, rel=1e-3, abs=1e-3)
    assert sum(result.stats.modes.values()) == result.stats.layers == len(result.stats.per_layer)


def test_stochastic_rounding_is_unbiased_where_rounding_to_nearest_loses_the_change(tmp_path):
    """A change of a fraction of a step vanishes under round-to-nearest; stochastic keeps it on average."""
    model = tiny_model(tmp_path, "flux2", "int8_tensorwise", dtype=torch.bfloat16)
    lora = write_lora(tmp_path / "lora.safetensors", "flux2", "comfyui", only=("single_blocks.",))
    s = 0.05
    _, merged = merge(tmp_path, model, (lora, s), mode="stochastic", seed=random.randrange(2**31))
    for name, change in lora.changes.items():
        scale = float(model.reference[name.removesuffix(".weight") + ".weight_scale"])
        steps = change.delta * s / scale
        assert steps.abs().max() < 0.5  # round to nearest would leave every value unchanged
        moved = merged[name].double() - model.reference[name].double()
        # Each value moves by floor(steps + u) - 0: mean steps, variance at most 1/4 per value.
        assert abs(float(moved.sum() - steps.sum())) < 5 * math.sqrt(steps.numel() / 4), name


def small_change(tmp_path, model) -> tuple[TinyLora, float]:
    """A LoRA and a strength whose change is under half an int8 step everywhere on ``model``."""
    lora, s = write_lora(tmp_path / "small.safetensors", "flux2", "kohya"), 0.05
    for name, change in lora.changes.items():
        scale = model.reference.get(name.removesuffix(".weight") + ".weight_scale")
        if scale is not None:
            assert (change.delta * s / float(scale)).abs().max() < 0.5, name
    return lora, s


def test_requant_drops_a_small_change_and_says_so_where_auto_keeps_it(tmp_path):
    model = tiny_model(tmp_path, "flux2", "int8_tensorwise", dtype=torch.bfloat16)
    lora, s = small_change(tmp_path, model)
    requant, _ = merge(tmp_path, model, (lora, s), out="requant.safetensors", mode="requant")
    auto, _ = merge(tmp_path, model, (lora, s), out="auto.safetensors", seed=random.randrange(2**31))
    assert requant.stats.kept < 0.1
    assert requant.warnings == [
        (
            f"requant rounded away {1 - max(requant.stats.kept, 0):.0%} of the LoRAs' change (it is "
            "smaller than half an int8 step in most layers); use auto or stochastic to keep it"
        )
    ]
    assert auto.stats.kept >= 0.8 and auto.warnings == []
    assert auto.stats.modes == {"stochastic": auto.stats.layers} and auto.stats.layers > 0


@pytest.mark.parametrize("scheme", ["tensorwise", "rowwise"])
def test_auto_requantizes_a_large_change_like_requant(tmp_path, scheme):
    model = tiny_model(tmp_path, "flux2", f"int8_{scheme}", dtype=torch.bfloat16)
    lora, s = write_lora(tmp_path / "lora.safetensors", "flux2", "kohya"), 8.0
    auto, a = merge(tmp_path, model, (lora, s), out="auto.safetensors", seed=random.randrange(2**31))
    requant, r = merge(tmp_path, model, (lora, s), out="requant.safetensors", mode="requant")
    assert auto.stats.modes == {"requant": auto.stats.layers} and auto.stats.layers > 0
    assert a.keys() == r.keys() and all(torch.equal(a[n], r[n]) for n in a)
    assert auto.stats.kept > 0.99 and auto.warnings == requant.warnings == []


def test_auto_is_reproducible_where_it_rounds_stochastically(tmp_path):
    model = tiny_model(tmp_path, "flux2", "int8_tensorwise", dtype=torch.bfloat16)
    lora, s = small_change(tmp_path, model)
    seed = random.randrange(2**31)
    first, a = merge(tmp_path, model, (lora, s), out="a.safetensors", seed=seed)
    _, b = merge(tmp_path, model, (lora, s), out="b.safetensors", seed=seed)
    _, c = merge(tmp_path, model, (lora, s), out="c.safetensors", seed=seed + 1)
    assert first.stats.modes["stochastic"] > 0
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not all(torch.equal(a[n], c[n]) for n in a)


def test_values_clipped_by_stochastic_rounding_are_a_warning(tmp_path):
    model = tiny_model(tmp_path, "flux2", "int8_rowwise", dtype=torch.bfloat16)
    lora = write_lora(tmp_path / "lora.safetensors", "flux2", "kohya", only=("double_blocks.0.",))
    # ten times the largest strength allowed: the LoRA stacked ten times at 100
    result, _ = merge(tmp_path, model, *[(lora, 100.0)] * 10, mode="stochastic")
    assert result.stats.kept < 0.5
    assert result.warnings == [
        (
            f"the int8 rounding lost {1 - max(result.stats.kept, 0):.0%} of the LoRAs' change: "
            f"{result.stats.clipped} values were clipped at ±127, the existing scales are too small for "
            "the change; use auto or requant, which choose fresh scales"
        )
    ]


def test_stochastic_merge_is_reproducible_and_clips_at_127(tmp_path):
    model = tiny_model(tmp_path, "flux2", "int8_rowwise", dtype=torch.bfloat16)
    lora = write_lora(tmp_path / "lora.safetensors", "flux2", "kohya", only=("double_blocks.0.",))
    seed, s = random.randrange(2**31), 40.0
    first, a = merge(tmp_path, model, (lora, s), out="a.safetensors", mode="stochastic", seed=seed)
    _, b = merge(tmp_path, model, (lora, s), out="b.safetensors", mode="stochastic", seed=seed)
    _, c = merge(tmp_path, model, (lora, s), out="c.safetensors", mode="stochastic", seed=seed + 1)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not all(torch.equal(a[n], c[n]) for n in a)

    surely, maybe = 0, 0  # values whose float merge is beyond ±128 steps must clip; beyond ±126 may
    for name, change in lora.changes.items():
        if a[name].dtype != torch.int8:
            continue
        scale = model.reference[name.removesuffix(".weight") + ".weight_scale"].double()
        steps = (dequantized(model.reference)[name] + s * change.delta) / scale
        surely += int((steps.abs() >= 128).sum())
        maybe += int((steps.abs() > 126).sum())
        assert (a[name][steps.abs() >= 128].abs() == 127).all()
    assert 0 < surely <= first.stats.clipped <= maybe


def test_a_stack_is_summed_in_float_and_rounded_once(tmp_path):
    model = tiny_model(tmp_path, "chroma", "int8_rowwise", dtype=torch.bfloat16)
    first = write_lora(tmp_path / "a.safetensors", "chroma", "kohya")
    second = write_lora(tmp_path / "b.safetensors", "chroma", "diffusers")
    s1, s2 = strength(), -strength()
    result, merged = merge(tmp_path, model, (first, s1), (second, s2), mode="requant")
    original = dequantized(model.reference)
    expected = second.merged(original | first.merged(original, s1), s2)
    actual = dequantized(merged)
    assert [m.lora.name for m in result.matches] == ["a.safetensors", "b.safetensors"]
    for name, want in expected.items():
        if merged[name].dtype == torch.int8:
            scale = merged[name.removesuffix(".weight") + ".weight_scale"].double()
            assert ((actual[name] - want).abs() <= scale / 2 + float32_slack(want)).all(), name


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


# --- match report and errors -------------------------------------------------------------------------


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


@pytest.mark.parametrize("mode", ["requant", "stochastic"])
def test_lora_merges_into_rotated_weights(tmp_path, mode):
    """Chroma's tiny MLP outputs are 256 wide: converted with every possible layer rotated, the
    LoRA's change lands on the un-rotated weights and is stored rotated like them."""
    source = tiny_model(tmp_path, "chroma", dtype=torch.bfloat16)
    model_path = run_convert(ConvertRequest(source.path, scheme="rowwise", rotate="all")).output
    converted = load_file(str(model_path))
    model = TinyCheckpoint(model_path, source.arch, source.config, converted, converted)
    target = "double_blocks.0.img_mlp.2.weight"
    lora = write_lora(tmp_path / "lora.safetensors", "chroma", "kohya", only=(r"double_blocks\.0\.img_mlp\.2$",))
    s = 4.0  # a change of several int8 steps: both modes keep it
    result, merged = merge(tmp_path, model, (lora, s), mode=mode, seed=7)
    h = hadamard(256, dtype=torch.float64)

    def unrotated(tensors, name):
        w = dequantized(tensors)[name]
        return (w.reshape(w.shape[0], -1, 256) @ h).reshape(w.shape)

    step = merged[target.replace(".weight", ".weight_scale")].double()
    want = lora.merged({target: unrotated(converted, target)}, s)[target]
    error = unrotated(merged, target) - want
    assert (error.abs() <= 16 * step * (1.0 if mode == "stochastic" else 0.5) + 1e-6).all()  # 256 errors × 1/16
    assert result.stats.kept > 0.95 and result.stats.layers == 1
    untouched = "double_blocks.0.txt_mlp.2.weight"
    assert torch.equal(merged[untouched], converted[untouched])
    assert bytes(merged[target.replace(".weight", ".comfy_quant")].tolist()) == bytes(
        converted[target.replace(".weight", ".comfy_quant")].tolist()
    )


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

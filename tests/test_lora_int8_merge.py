"""Merging LoRAs into int8 models, on tiny real-layout models: each merge mode (auto, requant,
stochastic) within its rounding bound, what each keeps of a small or large change and says when it
loses it, reproducible stochastic rounding and clipping at ±127, a stack summed in float and rounded
once, and Hadamard-rotated weights."""

from __future__ import annotations

import math
import random

import pytest
import torch
from safetensors.torch import load_file

from engine.convert import ConvertRequest, run_convert
from engine.int8.rotation import hadamard
from engine.lora import MODES
from tests.test_lora import merge, strength, tiny_model
from tests.tiny_checkpoints import TinyCheckpoint
from tests.tiny_loras import TinyLora, write_lora


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

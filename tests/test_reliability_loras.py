"""LoRA strengths that cannot be right are refused in one place for every face (issue 23, item 4), and
every PEFT adapter type merges at the scale PEFT itself applies (item 6)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from engine.lora import (
    STRENGTH_LIMIT,
    LoraError,
    LoraMergeRequest,
    LoraSpec,
    check_strength,
    run_lora_merge,
)
from engine.models import REGISTRY
from tests.reliability import refused
from tests.tiny_checkpoints import write_single_file
from tests.tiny_loras import write_lora


@pytest.mark.parametrize(
    ("strength", "message"),
    [
        ("nan", "strength nan of lora.safetensors is not a number; give one between -100 and 100"),
        ("inf", "strength inf of lora.safetensors is not a number; give one between -100 and 100"),
        ("-inf", "strength -inf of lora.safetensors is not a number; give one between -100 and 100"),
        ("1e38", "strength 1e+38 of lora.safetensors is outside -100…100; 1 applies the LoRA as trained"),
        ("-100.5", "strength -100.5 of lora.safetensors is outside -100…100; 1 applies the LoRA as trained"),
    ],
)
def test_a_strength_that_cannot_be_right_is_refused(tmp_path, capsys, strength, message):
    model = write_single_file(tmp_path / "model.safetensors", "flux2", fmt="int8_rowwise").path
    lora = write_lora(tmp_path / "lora.safetensors", "flux2").path
    out = tmp_path / "merged.safetensors"
    assert refused(capsys, tmp_path, "lora", "merge", model, f"{lora}:{strength}", "-o", out) == message
    with pytest.raises(LoraError, match="^" + message.replace("+", r"\+") + "$"):  # the app's way in
        run_lora_merge(LoraMergeRequest(model, (LoraSpec(lora, float(strength)),), out))
    assert not out.exists()


def test_the_strength_limit_itself_is_accepted():
    assert check_strength(STRENGTH_LIMIT, "l") == check_strength(-STRENGTH_LIMIT, "l") * -1 == 100.0
    assert check_strength(0, "l") == 0.0


def test_run_time_loras_use_the_same_check():
    from engine.lora.dynamic import DynamicLoras

    loras = DynamicLoras.__new__(DynamicLoras)
    loras.strengths = {"a": 1.0}
    loras.adapters = {}
    with pytest.raises(LoraError, match="^strength nan of a is not a number"):
        loras.set_strength("a", float("nan"))
    with pytest.raises(LoraError, match="^strength 1000 of a is outside"):
        loras.set_strength("a", 1000.0)


ADAPTERS = {
    "LoRA": ("LoraConfig", {"lora_alpha": 12}),
    "LoHa": ("LoHaConfig", {"alpha": 12}),
    "LoKr": ("LoKrConfig", {"alpha": 12}),
    "LoKr, both factors decomposed": ("LoKrConfig", {"alpha": 12, "decompose_both": True}),
    "LoHa, alpha and rank patterns": ("LoHaConfig", {"alpha": 12, "alpha_pattern": {"to_q": 3}, "rank_pattern": {"to_out.0": 2}}),
}  # fmt: skip


@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_every_peft_adapter_type_merges_like_peft(tmp_path, adapter):
    """peft makes the adapter on diffusers' own module and saves it as save_pretrained does
    (adapter_model.safetensors beside adapter_config.json); peft's merge is the reference."""
    import diffusers
    import peft

    from tests.test_models import diffusers_kwargs
    from tests.tiny_checkpoints import to_diffusers

    arch = REGISTRY["flux2"]
    config = arch.tiny["tiny"]
    model = write_single_file(tmp_path / "model.safetensors", "flux2", dtype=torch.float32)
    transformer = getattr(diffusers, arch.diffusers_class)(**diffusers_kwargs("flux2", config))
    transformer.load_state_dict(to_diffusers(arch, model.reference, config))
    kind, options = ADAPTERS[adapter]
    init = {"init_lora_weights": False} if kind == "LoraConfig" else {"init_weights": False}
    adapter_config = getattr(peft, kind)(r=4, target_modules=["to_q", "to_out.0", "linear_in"], **init, **options)
    torch.manual_seed(0)
    peft_model = peft.get_peft_model(transformer, adapter_config)
    with torch.no_grad():  # LoHa/LoKr start near zero: make the change large enough to measure
        for name, p in peft_model.named_parameters():
            if any(k in name for k in ("hada_", "lokr_", "lora_")):
                p.normal_(0, 0.2)
    peft_model.save_pretrained(tmp_path / "adapter")
    reference = peft_model.merge_and_unload().state_dict()

    out = tmp_path / "merged.safetensors"
    lora = tmp_path / "adapter" / "adapter_model.safetensors"
    result = run_lora_merge(LoraMergeRequest(model.path, (LoraSpec(lora),), out))
    merged = load_file(str(out))
    assert result.matches[0].unmatched == ()
    changed = 0
    for name, tensor in merged.items():
        pieces = arch.diffusers_pieces(name, config)
        expected = torch.cat([reference[p.name][p.rows] for p in pieces])
        torch.testing.assert_close(tensor, expected, rtol=1e-5, atol=1e-5, msg=name)
        changed += not torch.equal(tensor, model.reference[name])
    assert changed == result.tensors_changed > 0

"""The attention option through the seam: a model given int8 attention (``use_attention``,
``quantize_model(..., attention=)``) runs ``int8_attention`` in every block, a model without it runs SDPA
bit for bit, and compiled blocks call the op in their graph without a break; convert records the choice,
bench follows it unless told otherwise."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

from engine.cli import main
from engine.convert import ATTENTION_KEY, ConvertRequest, run_convert
from engine.int8 import ops
from engine.int8.apply import quantize_model
from engine.int8.attention import use_attention
from engine.int8.choices import DEFAULT_ATTENTION
from engine.models.build import named_config, random_model
from tests.int8_reference import NEEDS_INTERPRETER
from tests.tiny_checkpoints import write_single_file

CPU = torch.device("cpu")
MODELS = ("flux2-tiny", "chroma-tiny", "zimage-tiny", "flux1-tiny", "qwen_image-tiny")
"""One tiny model per runnable family: every block that calls attention."""


def tiny(name: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Model ``name`` with heads of 64 (the kernel's smallest) in bfloat16 with seeded random weights,
    and one step's inputs at 64² pixels."""
    arch, config, _ = named_config(name)
    model = random_model(arch, {**config, "head_dim": 64}, CPU, torch.bfloat16, seed=0)
    inputs = model.random_inputs(1, 64, 8, seed=0)
    return model, {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs.items()}


@torch.no_grad()
def step(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**inputs).float()


@pytest.mark.parametrize("name", MODELS)
def test_bf16_attention_is_sdpa_bit_for_bit(name):
    model, inputs = tiny(name)
    untouched = step(model, inputs)
    use_attention(model, "int8")
    use_attention(model, "bf16")  # and back: nothing of the int8 choice is left
    assert torch.equal(step(model, inputs), untouched)


@NEEDS_INTERPRETER
@pytest.mark.parametrize("name", ["flux2-tiny", "zimage-tiny"])
def test_int8_attention_runs_the_kernel_in_the_model(name):
    """On the Triton backend the kernel's rounding moves the output a little: int8 attention ran."""
    model, inputs = tiny(name)
    with ops.use_backend("triton"):
        sdpa = step(model, inputs)
        quantize_model(model, named_config(name)[0], attention="int8")
        int8 = step(model, inputs)
        use_attention(model, "bf16")
        linears_only = step(model, inputs)
    error = ((int8 - linears_only).norm() / linears_only.norm()).item()
    assert 0 < error < 0.05, error
    assert not torch.equal(linears_only, sdpa)  # the linears are int8 in both


def test_unknown_attention_is_refused():
    with pytest.raises(ValueError, match="bf16 or int8"):
        use_attention(nn.Linear(2, 2), "fp8")


@pytest.mark.parametrize("name", MODELS)
def test_compiled_blocks_call_int8_attention_without_a_graph_break(name):
    """Every repeated block compiled whole (``fullgraph``: a break would raise), the blocks that attend
    calling the op and no SDPA; the output is the eager one's."""
    model, inputs = tiny(name)
    use_attention(model, "int8")
    eager = step(model, inputs)
    graphs = []

    def record(gm: torch.fx.GraphModule, _) -> object:
        graphs.append(gm.code)
        return gm.forward

    torch._dynamo.reset()
    blocks = [block for m in model.modules() if isinstance(m, nn.ModuleList) for block in m]
    for block in blocks:
        block.compile(fullgraph=True, backend=record)
    torch.testing.assert_close(step(model, inputs), eager, rtol=0, atol=0)
    assert any("int8_studio.attention" in code for code in graphs)
    assert not any("scaled_dot_product_attention" in code for code in graphs)


def test_convert_records_the_choice_and_bench_follows_it_unless_told_otherwise(tmp_path, capsys):
    source = write_single_file(tmp_path / "z.safetensors", "zimage").path
    out = tmp_path / "z-int8.safetensors"
    assert main(["convert", str(source), "-o", str(out), "--attention", "int8"]) == 0
    with safe_open(str(out), "pt") as f:
        assert f.metadata()[ATTENTION_KEY] == "int8"

    def bench_scheme(*flags: str) -> str:
        capsys.readouterr()
        argv = ["bench", str(out), "--formats", "int8", "--res", "64", "--steps", "1", "--json", *flags]
        assert main(argv) == 0
        return json.loads(capsys.readouterr().out)["scheme"]

    assert bench_scheme() == "as in the file, int8 attention"
    assert bench_scheme("--attention", "bf16") == "as in the file"


def test_convert_defaults_to_bf16_attention(tmp_path):
    result = run_convert(ConvertRequest(write_single_file(tmp_path / "f.safetensors", "flux2").path))
    with safe_open(str(result.output), "pt") as f:
        assert f.metadata()[ATTENTION_KEY] == DEFAULT_ATTENTION == "bf16"

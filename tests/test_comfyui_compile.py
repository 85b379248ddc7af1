"""Our node's model under ComfyUI's own TorchCompileModel node, on the CPU: inductor compiles ComfyUI's
Flux.2 code with our int8 ops in it, :mod:`engine.int8.graph_fusion` fuses around them (norms and
modulation, the MLPs' gates, the single blocks' concatenation), and the compiled model samples what the
eager one does. The Triton kernels run in the interpreter, as they run compiled on a GPU."""

from __future__ import annotations

import pytest
import torch
import torch._inductor.config
from comfyui_env import LATENT_CHANNELS
from test_comfyui_int8_nodes import dynamic_node, loras  # noqa: F401 (a module fixture)
from test_comfyui_nodes import TEXT_TOKENS, TINY, comfy, files, load_ours  # noqa: F401 (session fixtures)

from engine.int8.backends import use_backend
from engine.int8.graph_fusion import Int8GraphFusion
from tests.int8_reference import NEEDS_INTERPRETER

FLUX2 = TINY["flux2"]
FUSED = {  # each double block's two MLPs (gate|up in one layer), each single block's linear1 and linear2
    "shared quantizations": 0,
    "gated GEMMs": 2 * FLUX2["double_blocks"] + FLUX2["single_blocks"],
    "narrowed GEMMs": FLUX2["single_blocks"],
    # the inputs after a norm and modulation (four per double block, one per single block); linear2's
    "fused quantizations": 4 * FLUX2["double_blocks"] + 2 * FLUX2["single_blocks"],
    "inlined RoPE": FLUX2["double_blocks"] + FLUX2["single_blocks"],  # one per attention
}


@NEEDS_INTERPRETER
def test_torch_compile_model_node_runs_our_flux2_fused(comfy, files, loras):  # noqa: F811
    """With INT8 LoRA (dynamic) on it, which keeps every fusion (the same rewrites as without, which
    tests/test_graph_fusion.py also checks on ComfyUI-like code). Z-Image's shared quantization and gate:
    tests/test_graph_fusion.py's ForeignBlock has its layout."""
    from comfy.ldm.flux import math as flux_math
    from comfy.ldm.modules import attention
    from comfy_extras.nodes_torch_compile import TorchCompileModel

    model = load_ours(comfy, files["flux2", "rowwise"])
    # the LoRA changes this model's output by ~5%: a fusion that dropped its term would show
    model = dynamic_node(model, loras["flux2"])
    assert isinstance(torch._inductor.config.post_grad_custom_post_pass, Int8GraphFusion)  # the loader put it there
    compiled = TorchCompileModel.execute(model=model, backend="inductor").result[0]
    positive = [[torch.randn(1, TEXT_TOKENS, FLUX2["text_dim"], generator=torch.Generator().manual_seed(1)), {}]]
    latent = {"samples": torch.zeros(1, LATENT_CHANNELS["flux2"], 11, 7)}
    def sample(model):  # ComfyUI's KSampler node, one step at CFG 1
        (out,) = comfy.nodes.KSampler().sample(model, 3, 1, 1.0, "euler", "simple", positive, positive, latent)
        return out["samples"].double()

    # PyTorch's SDPA, as ComfyUI picks on a GPU (its CPU default splits attention into graph breaks)
    with (
        pytest.MonkeyPatch.context() as patch,
        torch._inductor.config.patch(force_disable_caches=True),  # so that the pass runs
        use_backend("triton"),
    ):
        patch.setattr(flux_math, "optimized_attention", attention.attention_pytorch)
        patch.setattr(attention, "optimized_attention", attention.attention_pytorch)
        torch._dynamo.reset()
        Int8GraphFusion.totals.clear()
        eager, fused = sample(model), sample(compiled)
    assert dict(Int8GraphFusion.totals) == FUSED
    # the same int8 products: compiled float ops (and a gate that rounds once) move a few activations by one
    # int8 step (0.2% here); a product on the wrong weight rows would be off by the order of the output
    assert float((fused - eager).norm() / eager.norm()) < 1e-2

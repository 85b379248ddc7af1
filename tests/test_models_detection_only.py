"""Detection-only families of issue 26 (Krea 2, ERNIE-Image, HiDream-O1, Anima, …): tiny files of the real
single-file layout, bare and ComfyUI-prefixed, are read with their config and variant, and a conversion
quantizes exactly the blocks' attention and MLP linears (the generic layout tests in test_models*.py run on
them too)."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors import safe_open

from engine.convert import ConvertRequest, run_convert
from engine.models import REGISTRY, detect_tensors
from tests.test_models import detect_file, headers
from tests.tiny_checkpoints import write_single_file

# Per family: the int8 weights a conversion writes (every other tensor stays as the file has it).
QUANTIZED = {
    "krea2": r"blocks\.\d+\.(attn\.(wq|wk|wv|gate|wo)|mlp\.(gate|up|down))\.weight",
    "ernie": r"layers\.\d+\.(self_attention\.(to_q|to_k|to_v|to_out\.0)|mlp\.(gate_proj|up_proj|linear_fc2))\.weight",
    "hidream_o1": r"language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight",
    "anima": r"blocks\.\d+\.((self|cross)_attn\.(q|k|v|output)_proj|mlp\.layer[12])\.weight",
}
# Prefixes a family's releases use beyond ComfyUI's (Anima's original file is under net., as Cosmos').
RELEASE_PREFIXES = {"anima": ("net.",)}


def int8_weights(path) -> set[str]:
    with safe_open(str(path), "pt") as f:
        return {k for k in f.keys() if f.get_slice(k).get_dtype() == "I8"}  # noqa: SIM118


@pytest.mark.parametrize(
    "arch,prefix",
    [(a, p) for a in QUANTIZED for p in ("", "model.diffusion_model.", *RELEASE_PREFIXES.get(a, ()))],
)
def test_files_are_read_and_only_block_linears_converted_to_int8(tmp_path, arch, prefix):
    ckpt = write_single_file(tmp_path / f"{arch}.safetensors", arch, prefix=prefix)
    model = detect_file(ckpt.path)
    assert (model.arch.name, model.prefix, model.config) == (arch, prefix, REGISTRY[arch].tiny["tiny"])
    expected = {n for n in ckpt.reference if re.fullmatch(QUANTIZED[arch], n)}
    assert {t.name for t in model.tensors if t.quantize} == expected
    converted = run_convert(ConvertRequest(ckpt.path, scheme="rowwise", device="cpu")).output
    assert int8_weights(converted) == expected


@pytest.mark.parametrize("arch", QUANTIZED)
def test_released_sizes_are_named_and_read_back(arch):
    a = REGISTRY[arch]
    for variant, config in a.variants.items():
        model = detect_tensors(headers(a.tensor_shapes(config), "model.diffusion_model."))
        assert (model.variant, model.config) == (variant, config)


def test_krea2_released_size():
    """Released as "12.9B": 28 blocks at width 6144, GQA with 12 key/value heads, a 16384-wide SwiGLU
    (12.8B in the transformer's file)."""
    krea2 = REGISTRY["krea2"]
    shapes = krea2.tensor_shapes(krea2.variants["Raw / Turbo"])
    assert round(sum(torch.Size(s).numel() for s in shapes.values()) / 1e9, 1) == 12.8
    assert (shapes["blocks.0.attn.wk.weight"], shapes["blocks.27.mlp.down.weight"]) == ((1536, 6144), (6144, 16384))


@pytest.mark.parametrize("arch,billions", [("hidream_o1", 8.1), ("anima", 2.1)])
def test_released_sizes(arch, billions):
    """HiDream-O1 is Qwen3-VL-8B with its pixel heads; Anima is Cosmos-Predict2-2B with its adapter."""
    a = REGISTRY[arch]
    (config,) = a.variants.values()
    assert round(sum(torch.Size(s).numel() for s in a.tensor_shapes(config).values()) / 1e9, 1) == billions


def test_anima_diffusers_names_are_the_diffusers_classes():
    """The names an Anima LoRA trained with diffusers uses: CosmosTransformer3DModel's (``transformer.``)
    and AnimaTextConditioner's (``text_conditioner.``), shapes included."""
    from diffusers import CosmosTransformer3DModel
    from diffusers.models.condition_embedders.condition_embedder_anima import AnimaTextConditioner

    anima = REGISTRY["anima"]
    c = anima.variants["2B (preview)"]
    with torch.device("meta"):
        transformer = CosmosTransformer3DModel(
            in_channels=c["in_channels"], out_channels=c["out_channels"], num_attention_heads=c["heads"],
            attention_head_dim=c["dim"] // c["heads"], num_layers=c["layers"], text_embed_dim=c["text_dim"],
            rope_scale=(1.0, 4.0, 4.0), extra_pos_embed_type=None,
        )  # fmt: skip
        conditioner = AnimaTextConditioner(
            source_dim=c["llm_dim"], target_dim=c["text_dim"], model_dim=c["text_dim"],
            num_layers=c["adapter_layers"], num_attention_heads=c["adapter_heads"],
        )  # fmt: skip
    expected = {n: tuple(t.shape) for n, t in transformer.state_dict().items()}
    expected |= {f"text_conditioner.{n}": tuple(t.shape) for n, t in conditioner.state_dict().items()}
    assert anima.diffusers_shapes(c) == expected


@pytest.mark.parametrize("variant", ["19B (dev, distilled)", "2.3 22B (dev, distilled)"])
def test_ltx2_diffusers_names_are_the_diffusers_class(variant):
    """The names an LTX-2 LoRA trained with diffusers uses: LTX2VideoTransformer3DModel's, shapes
    included (the text connectors are another diffusers model, so they have none)."""
    from diffusers import LTX2VideoTransformer3DModel

    ltx2 = REGISTRY["ltx2"]
    c = ltx2.variants[variant]
    v2_3 = bool(c["v2_3"])
    with torch.device("meta"):
        transformer = LTX2VideoTransformer3DModel(
            in_channels=c["in_channels"], out_channels=c["in_channels"], num_attention_heads=32,
            attention_head_dim=c["dim"] // 32, cross_attention_dim=c["dim"], audio_in_channels=c["audio_in_channels"],
            audio_out_channels=c["audio_in_channels"], audio_num_attention_heads=32,
            audio_attention_head_dim=c["audio_dim"] // 32, audio_cross_attention_dim=c["audio_dim"],
            num_layers=c["layers"], caption_channels=c["caption_channels"] or 3840, gated_attn=v2_3,
            audio_gated_attn=v2_3, cross_attn_mod=v2_3, audio_cross_attn_mod=v2_3, use_prompt_embeddings=not v2_3,
        )  # fmt: skip
    assert ltx2.diffusers_shapes(c) == {n: tuple(t.shape) for n, t in transformer.state_dict().items()}

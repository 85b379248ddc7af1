"""The single-file and diffusers key layouts as data (which diffusers rows make up each single-file
tensor, and back), and those facts checked against diffusers itself: its model classes' state dicts
and its single-file converters."""

from __future__ import annotations

import pytest
import torch

from engine.models import REGISTRY, Piece
from tests.test_models import assert_same, diffusers_kwargs
from tests.tiny_checkpoints import random_tensors, to_diffusers

# --- key layouts as data --------------------------------------------------------------------------


def test_pieces_give_explicit_rows():
    flux2, flux1 = REGISTRY["flux2"], REGISTRY["flux1"]
    klein = flux2.variants["Klein 9B"]
    assert flux2.diffusers_pieces("final_layer.adaLN_modulation.1.weight", klein) == (
        Piece("norm_out.linear.weight", slice(4096, 8192)),
        Piece("norm_out.linear.weight", slice(0, 4096)),
    )
    assert flux2.diffusers_pieces("double_blocks.3.txt_attn.qkv.weight", klein) == tuple(
        Piece(f"transformer_blocks.3.attn.add_{x}_proj.weight", slice(0, 4096)) for x in "qkv"
    )
    assert flux1.diffusers_pieces("single_blocks.7.linear1.bias", flux1.variants["dev"]) == (
        *(Piece(f"single_transformer_blocks.7.attn.to_{x}.bias", slice(0, 3072)) for x in "qkv"),
        Piece("single_transformer_blocks.7.proj_mlp.bias", slice(0, 12288)),
    )
    assert REGISTRY["zimage"].diffusers_pieces("norm_final.weight", {}) == ()


@pytest.mark.parametrize("arch", REGISTRY)
def test_mapping_is_invertible(arch):
    a = REGISTRY[arch]
    config = next(iter(a.variants.values()))
    for name in a.tensor_shapes(config):
        for piece in a.diffusers_pieces(name, config):
            assert a.single_file_name(piece.name) == name


# --- the facts, checked against diffusers itself -------------------------------------------------


def test_diffusers_layouts_match_the_diffusers_classes():
    import diffusers

    for a in (a for a in REGISTRY.values() if a.diffusers_class):
        for config in a.variants.values():
            with torch.device("meta"):
                model = getattr(diffusers, a.diffusers_class)(**diffusers_kwargs(a.name, config))
            expected = {n: tuple(t.shape) for n, t in model.state_dict().items()}
            assert a.diffusers_shapes(config) == expected, a.name


@pytest.mark.parametrize("arch,converter", [("flux2", "flux2"), ("zimage", "z_image")])
def test_split_matches_the_diffusers_converter(arch, converter):
    from diffusers.loaders import single_file_utils

    convert = getattr(single_file_utils, f"convert_{converter}_transformer_checkpoint_to_diffusers")
    for variant, config in REGISTRY[arch].tiny.items():
        tensors = random_tensors(arch, variant)
        assert_same(to_diffusers(arch, tensors, config), convert(dict(tensors)))

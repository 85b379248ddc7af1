"""The node pack's convert-on-load cache inside ComfyUI's real code, on the CPU: a float file given to
the loader is converted once (as `int8-studio convert` would) and then loaded from the cache until its
options or the source change; int8 files are loaded as they are; the cache keeps to its size limit,
least recently used first; files of the node this product descends from load.

Tiny Flux.2, Chroma and Z-Image files of the real layouts (the fixtures of test_comfyui_nodes); the
loader is called as ComfyUI calls it.
"""

# ruff: noqa: F811  (the fixtures of test_comfyui_nodes, imported by name)

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip(
    "comfy_kitchen", reason="ComfyUI's test environment is not installed"
)

from safetensors import safe_open
from safetensors.torch import save_file
from test_comfyui_int8_nodes import ARCHS, node
from test_comfyui_nodes import comfy, files, load_ours, run  # noqa: F401  (comfy, files: the session fixtures)

from comfyui_nodes import convert_cache
from comfyui_nodes.loader import int8_layers
from engine.convert import SHA256_KEY


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    """INT8 Studio's cache in a fresh folder, and a count of conversions."""
    monkeypatch.setenv("INT8_STUDIO_CACHE", str(tmp_path / "cache"))
    calls = []
    original = convert_cache.run_convert
    monkeypatch.setattr(
        convert_cache,
        "run_convert",
        lambda *a, **k: calls.append(a[0]) or original(*a, **k),
    )
    return calls


def load_node(comfy, name: str, **options):
    cls, load = node("Int8StudioLoadDiffusionModel")
    assert name in cls.INPUT_TYPES()["required"]["unet_name"][0]
    return load(unet_name=name, **options)[0]


# --- convert on load -----------------------------------------------------------------------------


def test_convert_on_load_miss_then_hit(comfy, files, cache, caplog):
    float_name = files["flux2", "float"]
    source = Path(
        comfy.folder_paths.get_full_path_or_raise("diffusion_models", float_name)
    )
    with caplog.at_level("INFO", logger="int8_studio"):
        first = load_node(comfy, float_name, scheme="rowwise", rotation="none")
    assert len(cache) == 1
    cached = list(convert_cache.folder().glob("*.safetensors"))
    assert len(cached) == 1 and any(
        str(cached[0]) in r.getMessage() for r in caplog.records
    )
    with safe_open(
        str(cached[0]), "pt"
    ) as f:  # the converter's hash of the source, for verification
        assert (
            f.metadata()[SHA256_KEY] == hashlib.sha256(source.read_bytes()).hexdigest()
        )
    assert int8_layers(first.model)
    # the same conversion as `int8-studio convert --scheme rowwise`: the same output, bit for bit
    assert torch.equal(
        run(comfy, first, "flux2"),
        run(comfy, load_ours(comfy, files["flux2", "rowwise"]), "flux2"),
    )

    caplog.clear()
    with caplog.at_level("INFO", logger="int8_studio"):
        second = load_node(comfy, float_name, scheme="rowwise", rotation="none")
    assert len(cache) == 1  # a hit: nothing converted
    assert any(
        "from the cache" in r.getMessage() and str(cached[0]) in r.getMessage()
        for r in caplog.records
    )
    assert torch.equal(run(comfy, second, "flux2"), run(comfy, first, "flux2"))

    load_node(
        comfy, float_name, scheme="rowwise", rotation="all"
    )  # other options: a miss
    assert len(cache) == 2
    rotated = load_node(comfy, float_name, scheme="rowwise", rotation="all")
    assert len(cache) == 2 and all(
        m.rotation for m in int8_layers(rotated.model).values()
    )

    stat = source.stat()  # the source changed (its modification time): a miss
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    load_node(comfy, float_name, scheme="rowwise", rotation="none")
    assert len(cache) == 3


def test_an_int8_file_is_not_converted(comfy, files, cache):
    load_node(comfy, files["zimage", "rowwise"], scheme="tensorwise", rotation="all")
    assert cache == [] and not convert_cache.folder().exists()


def test_cache_limit_evicts_the_least_recently_used(comfy, files, cache):
    names = {arch: files[arch, "float"] for arch in ARCHS}
    path = lambda arch: Path(
        comfy.folder_paths.get_full_path_or_raise("diffusion_models", names[arch])
    )
    big = 100.0
    load_node(comfy, names["flux2"], cache_limit_gb=big)
    load_node(comfy, names["chroma"], cache_limit_gb=big)
    cached = {
        f.name.split("-int8-")[0]: f
        for f in convert_cache.folder().glob("*.safetensors")
    }
    assert set(cached) == {"flux2", "chroma"}
    os.utime(cached["chroma"], ns=(1, 1))  # chroma: the least recently used
    load_node(comfy, names["flux2"], cache_limit_gb=big)  # a hit refreshes flux2
    sizes = {k: f.stat().st_size for k, f in cached.items()}
    zimage_size = (
        convert_cache.int8_file(path("zimage"), limit_gb=big).path.stat().st_size
    )
    limit = (sizes["flux2"] + zimage_size + 1) / 1e9  # room for two: chroma goes
    convert_cache.int8_file(path("zimage"), limit_gb=limit)
    left = sorted(
        f.name.split("-int8-")[0] for f in convert_cache.folder().glob("*.safetensors")
    )
    assert left == ["flux2", "zimage"] and len(cache) == 3
    convert_cache.int8_file(
        path("zimage"), limit_gb=0.0
    )  # below one file: only the one in use stays
    assert [
        f.name.split("-int8-")[0] for f in convert_cache.folder().glob("*.safetensors")
    ] == ["zimage"]


def test_the_seed_nodes_files_load(comfy, files, tmp_path):
    """Files of the INT8 node this product descends from: int8 weights with a one-element
    weight_scale and a placeholder input_scale, no comfy_quant markers."""
    source = comfy.folder_paths.get_full_path_or_raise(
        "diffusion_models", files["flux2", "tensorwise"]
    )
    with safe_open(source, "pt") as f:
        names = [k for k in f.keys() if not k.endswith(".comfy_quant")]  # noqa: SIM118 (not a dict)
        tensors = {k: f.get_tensor(k) for k in names}
    for key in [k for k in tensors if k.endswith(".weight_scale")]:
        tensors[key] = tensors[key].reshape(1)
        tensors[key.replace(".weight_scale", ".input_scale")] = torch.ones(())
    save_file(tensors, str(tmp_path / "seed-node.safetensors"))
    comfy.folder_paths.add_model_folder_path("diffusion_models", str(tmp_path))
    seed = load_node(comfy, "seed-node.safetensors")
    assert all(m.weight_scale.ndim == 0 for m in int8_layers(seed.model).values())
    assert torch.equal(
        run(comfy, seed, "flux2"),
        run(comfy, load_ours(comfy, files["flux2", "tensorwise"]), "flux2"),
    )

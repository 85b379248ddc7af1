"""Hugging Face downloads against a local hub cache laid out as huggingface_hub lays it out.

huggingface_hub itself runs (in the download child process too); the tests never reach the network:
either downloads are off (offline mode), or the files are already in the cache.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from engine.hub import DownloadRequest, HubError, RemoteFile, choose_files, plan_download, run_download
from engine.jobs import Cancelled, CancelToken

REPO = "acme/tiny-flux"


def safetensors_bytes(n: int = 16) -> bytes:
    return save({"double_blocks.0.img_attn.qkv.weight": torch.randn(3 * n, n, dtype=torch.bfloat16)})


def add_snapshot(cache: Path, repo_id: str, files: dict[str, bytes], refs: tuple[str, ...] = ("main",)) -> str:
    """Put ``files`` into ``cache`` as huggingface_hub does: content in blobs/ (named by hash),
    snapshots/<commit>/<path> symlinks to them, refs/<name> holding the commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = secrets.token_hex(20)
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return commit


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "hub"


def test_offline_plan_and_download_from_the_cache(cache):
    model, readme = safetensors_bytes(), os.urandom(300)
    commit = add_snapshot(cache, REPO, {"tiny-flux.safetensors": model, "README.md": readme})
    request = DownloadRequest(REPO, cache_dir=cache, offline=True)

    assert plan_download(request) == [RemoteFile("tiny-flux.safetensors", len(model), True)]
    reports = []
    result = run_download(request, progress=reports.append)
    snapshot = cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / commit
    assert result.paths == [snapshot / "tiny-flux.safetensors"]
    assert result.paths[0].read_bytes() == model
    assert result.downloaded == 0
    assert reports[0].message == "1 files, 0 bytes to fetch"
    assert {r.stage for r in reports} == {"download"}

    both = DownloadRequest(REPO, ("*",), cache_dir=cache, offline=True)
    assert run_download(both).paths == [snapshot / "README.md", snapshot / "tiny-flux.safetensors"]


def test_hf_hub_offline_environment(cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = safetensors_bytes()
    add_snapshot(cache, REPO, {"m.safetensors": data})
    assert run_download(DownloadRequest(REPO, cache_dir=cache)).paths[0].read_bytes() == data
    with pytest.raises(HubError) as e:
        plan_download(DownloadRequest("acme/elsewhere", cache_dir=cache))
    assert str(e.value) == (
        "acme/elsewhere (main) is not in the hub cache and downloads are off (offline mode); "
        "connect and run again without offline mode (unset HF_HUB_OFFLINE)"
    )


def test_offline_snapshot_broken_by_a_cache_cleanup(cache):
    add_snapshot(cache, REPO, {"m.safetensors": safetensors_bytes()})
    blob = next((cache / f"models--{REPO.replace('/', '--')}" / "blobs").iterdir())
    blob.unlink()  # the snapshot's link now leads nowhere
    with pytest.raises(HubError) as e:
        run_download(DownloadRequest(REPO, ("m.safetensors",), cache_dir=cache, offline=True))
    assert str(e.value) == (
        f"{REPO} (main) is not in the hub cache and downloads are off (offline mode); "
        "connect and run again without offline mode (unset HF_HUB_OFFLINE)"
    )


def test_revisions(cache):
    old, new = safetensors_bytes(8), safetensors_bytes(16)
    first = add_snapshot(cache, REPO, {"m.safetensors": old}, refs=("v1.0",))
    add_snapshot(cache, REPO, {"m.safetensors": new})
    for revision, data in [("v1.0", old), (first, old), (None, new)]:
        request = DownloadRequest(REPO, revision=revision, cache_dir=cache, offline=True)
        assert run_download(request).paths[0].read_bytes() == data
    with pytest.raises(HubError, match=r"acme/tiny-flux \(v2\) is not in the hub cache"):
        plan_download(DownloadRequest(REPO, revision="v2", cache_dir=cache, offline=True))


def test_straight_into_a_folder_offline(tmp_path):
    folder = tmp_path / "ComfyUI" / "models" / "diffusion_models"
    data = safetensors_bytes()
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "m.safetensors").write_bytes(data)
    (folder / ".cache" / "huggingface").mkdir(parents=True)
    request = DownloadRequest(REPO, ("sub/m.safetensors",), folder=folder, offline=True)
    assert run_download(request).paths == [folder / "sub" / "m.safetensors"]

    with pytest.raises(HubError) as e:
        run_download(DownloadRequest(REPO, ("sub/*",), folder=tmp_path / "empty", offline=True))
    assert str(e.value) == f"{REPO} has no file 'sub/*'; it has: "


def test_cancel_stops_before_anything_is_fetched(cache):
    add_snapshot(cache, REPO, {"m.safetensors": safetensors_bytes()})
    cancel = CancelToken()
    cancel.cancel()
    with pytest.raises(Cancelled, match="download cancelled; the partial file is kept, download again to resume"):
        run_download(DownloadRequest(REPO, cache_dir=cache, offline=True), cancel=cancel)


def test_a_corrupt_cached_model_is_reported(cache):
    add_snapshot(cache, REPO, {"m.safetensors": safetensors_bytes()[:40]})
    with pytest.raises(Exception, match=r"m.safetensors is truncated|m.safetensors has a corrupt header"):
        run_download(DownloadRequest(REPO, cache_dir=cache, offline=True))


# --- choosing files -----------------------------------------------------------------------------


def remote(*names_and_sizes: tuple[str, int]) -> list[RemoteFile]:
    return [RemoteFile(name, size, False) for name, size in names_and_sizes]


DIFFUSERS = remote(
    ("model_index.json", 500),
    ("transformer/config.json", 600),
    ("transformer/diffusion_pytorch_model-00001-of-00002.safetensors", 9_900_000_000),
    ("transformer/diffusion_pytorch_model-00002-of-00002.safetensors", 7_200_000_000),
    ("transformer/diffusion_pytorch_model.safetensors.index.json", 90_000),
    ("text_encoder/model.safetensors", 8_000_000_000),
    ("vae/diffusion_pytorch_model.safetensors", 160_000_000),
)


def test_choose_the_model():
    request = DownloadRequest(REPO)
    assert [f.name for f in choose_files(request, DIFFUSERS)] == [f.name for f in DIFFUSERS[1:5]]
    single = remote(("README.md", 10), ("flux-2-klein-9b.safetensors", 18_000_000_000), ("vae/x.safetensors", 1))
    assert choose_files(request, single) == [single[1]]


def test_choose_named_files_and_patterns():
    request = DownloadRequest(REPO, ("vae/*", "model_index.json", "transformer/*.json", "vae/*"))
    assert [f.name for f in choose_files(request, DIFFUSERS)] == [
        "vae/diffusion_pytorch_model.safetensors",
        "model_index.json",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model.safetensors.index.json",
    ]


def test_choose_errors():
    with pytest.raises(HubError) as e:
        choose_files(DownloadRequest(REPO, ("transformer/model.safetensors",)), DIFFUSERS)
    assert str(e.value) == (
        f"{REPO} has no file 'transformer/model.safetensors'; it has: model_index.json, transformer/config.json, "
        "transformer/diffusion_pytorch_model-00001-of-00002.safetensors, "
        "transformer/diffusion_pytorch_model-00002-of-00002.safetensors, "
        "transformer/diffusion_pytorch_model.safetensors.index.json, text_encoder/model.safetensors, "
        "vae/diffusion_pytorch_model.safetensors"
    )
    several = remote(("a-bf16.safetensors", 18_000_000_000), ("a-fp8.safetensors", 9_100_000_000))
    with pytest.raises(HubError) as e:
        choose_files(DownloadRequest(REPO), several)
    assert str(e.value) == f"{REPO} has 2 models: a-bf16.safetensors (18.0 GB), a-fp8.safetensors (9.1 GB); name the one you want"
    nested = remote(("split_files/diffusion_models/a.safetensors", 5), ("README.md", 1))
    with pytest.raises(HubError) as e:
        choose_files(DownloadRequest(REPO), nested)
    assert str(e.value) == (
        f"{REPO} has no single model file or transformer/ folder; name the files you want, "
        "e.g. split_files/diffusion_models/a.safetensors"
    )
    with pytest.raises(HubError, match="it holds no .safetensors files$"):
        choose_files(DownloadRequest(REPO), remote(("README.md", 1)))

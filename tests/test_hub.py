"""Hugging Face downloads against a local hub cache laid out as huggingface_hub lays it out.

huggingface_hub itself runs (in the download child process too); the tests never reach the network:
either downloads are off (offline mode), or the files are already in the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import torch
from huggingface_hub import constants as hub_constants
from safetensors.torch import save

from engine.cli import main
from engine.hub import (
    DownloadRequest,
    DownloadResult,
    HubError,
    RemoteFile,
    choose_files,
    plan_download,
    plan_summary,
    run_download,
)
from engine.jobs import Cancelled, CancelToken
from tests.test_comfyui import make_checkout
from tests.tiny_checkpoints import write_single_file

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

    plan = plan_download(request)
    assert plan == [RemoteFile("tiny-flux.safetensors", len(model), True)]
    size = f"{len(model) / 1000:.1f} KB"
    assert plan_summary(plan) == f"1 file, {size}; 0 bytes to download"
    assert plan[0].label == f"tiny-flux.safetensors ({size}, already here)"
    reports = []
    result = run_download(request, progress=reports.append)
    snapshot = cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / commit
    assert result.paths == [snapshot / "tiny-flux.safetensors"]
    assert result.paths[0].read_bytes() == model
    assert result.downloaded == 0
    assert reports[0].message == "1 file, 0 bytes to fetch"
    assert {r.stage for r in reports} == {"download"}

    assert result.models == result.paths and result.model == result.paths[0]
    both = DownloadRequest(REPO, ("*",), cache_dir=cache, offline=True)
    assert run_download(both).paths == [snapshot / "README.md", snapshot / "tiny-flux.safetensors"]


def test_what_a_download_holds(tmp_path):
    """``models``: what can be exported as it is; ``model``: what to convert (a diffusers folder whole)."""
    plan = [RemoteFile("a.safetensors", 2000, False), RemoteFile("b.json", 3_000_000, True)]
    assert plan_summary(plan) == "2 files, 3.0 MB; 2.0 KB to download"
    assert [f.label for f in plan] == ["a.safetensors (2.0 KB)", "b.json (3.0 MB, already here)"]
    diffusers = [tmp_path / n for n in ("model_index.json", "transformer/config.json", "transformer/d-1.safetensors",
                                        "transformer/d-2.safetensors")]  # fmt: skip
    assert DownloadResult(diffusers, 0).models == diffusers[2:]
    assert DownloadResult(diffusers, 0).model == tmp_path
    assert DownloadResult([tmp_path / "README.md"], 0).model is None


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
    assert str(e.value) == (
        f"sub/* of {REPO} is not downloaded yet (in {tmp_path / 'empty'}) and downloads are off (offline mode); "
        "connect and run again without offline mode (unset HF_HUB_OFFLINE)"
    )


def test_cancel_stops_before_anything_is_fetched(cache):
    add_snapshot(cache, REPO, {"m.safetensors": safetensors_bytes()})
    cancel = CancelToken()
    cancel.cancel()
    with pytest.raises(Cancelled, match="^download cancelled; finished files are kept$"):
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
    with pytest.raises(HubError) as e:
        choose_files(DownloadRequest(REPO), [])
    assert str(e.value) == f"{REPO} has no .safetensors model file or transformer/ folder (found: no files)"


# --- against a hub on loopback ------------------------------------------------------------------


class FakeHub(ThreadingHTTPServer):
    """Just enough of the Hugging Face hub's HTTP API for huggingface_hub to list and download:
    ``GET /api/models/<repo>[/revision/<rev>]``, ``HEAD``/``GET /<repo>/resolve/<rev>/<file>`` (with
    ranges), and its error codes. ``rate`` slows downloads (bytes per second) to test cancel/resume."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.repos: dict[str, dict] = {}
        self.gated: set[str] = set()
        self.rate: float | None = None
        self.drop_after: int | None = None  # close the first download's connection after so many bytes
        self.ranges: list[str] = []  # Range headers of the file GETs
        self.url = f"http://127.0.0.1:{self.server_port}"

    def add(self, repo_id: str, files: dict[str, bytes]) -> str:
        commit = secrets.token_hex(20)
        self.repos[repo_id] = {"id": repo_id, "commit": commit, "files": files}
        return commit


class HubHandler(BaseHTTPRequestHandler):
    server: FakeHub

    def log_message(self, *args) -> None:
        pass

    def fail(self, status: int, code: str) -> None:
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def route(self) -> tuple[dict, str, str] | None:
        path = unquote(urlsplit(self.path).path)
        api = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
        resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        repo_id, revision, name = (api[1], api[2] or "main", "") if api else resolve.groups() if resolve else (None,) * 3
        repo = self.server.repos.get(repo_id)
        if repo is None:
            return self.fail(404 if self.headers.get("Authorization") else 401, "RepoNotFound")
        if revision not in ("main", repo["commit"]):
            return self.fail(404, "RevisionNotFound")
        if resolve and repo_id in self.server.gated:
            return self.fail(403 if self.headers.get("Authorization") else 401, "GatedRepo")
        if resolve and name not in repo["files"]:
            return self.fail(404, "EntryNotFound")
        return repo, name, "api" if api else "resolve"

    def do_HEAD(self) -> None:
        self.answer(body=False)

    def do_GET(self) -> None:
        self.answer(body=True)

    def answer(self, body: bool) -> None:
        found = self.route()
        if found is None:
            return
        repo, name, kind = found
        if kind == "api":
            siblings = [{"rfilename": n, "size": len(d), "blobId": hashlib.sha1(d).hexdigest()}
                        for n, d in repo["files"].items()]  # fmt: skip
            data = json.dumps({"id": repo["id"], "sha": repo["commit"], "siblings": siblings}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        data = repo["files"][name]
        start = 0
        if body and (wanted := self.headers.get("Range")):
            self.server.ranges.append(wanted)
            start = int(re.fullmatch(r"bytes=(\d+)-", wanted)[1])
        elif body:
            self.server.ranges.append("")
        self.send_response(206 if start else 200)
        self.send_header("X-Repo-Commit", repo["commit"])
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data) - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if body:
            drop, self.server.drop_after = self.server.drop_after, None
            self.send_slowly(data[start:drop])
            if drop:
                self.close_connection = True

    def send_slowly(self, data: bytes, chunk: int = 65536) -> None:
        for at in range(0, len(data), chunk):
            if self.server.rate:
                time.sleep(chunk / self.server.rate)
            try:
                self.wfile.write(data[at : at + chunk])
            except (BrokenPipeError, ConnectionResetError):  # the client went away (cancelled)
                return


@pytest.fixture
def hub(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    server = FakeHub()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_online_sizes_first_then_download_with_progress(hub, cache):
    files = {"tiny.safetensors": safetensors_bytes(64), "README.md": os.urandom(2000), "vae/v.safetensors": b"x"}
    commit = hub.add(REPO, files)
    request = DownloadRequest(REPO, cache_dir=cache, endpoint=hub.url)
    size = len(files["tiny.safetensors"])
    assert plan_download(request) == [RemoteFile("tiny.safetensors", size, False)]

    reports = []
    result = run_download(request, progress=reports.append)
    snapshot = cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / commit
    assert result.paths == [snapshot / "tiny.safetensors"]
    assert result.paths[0].read_bytes() == files["tiny.safetensors"]
    assert result.downloaded == size
    done = [r.done for r in reports]
    assert done == sorted(done) and done[-1] == size and {r.total for r in reports} == {size}

    # a second time it is all there: nothing fetched, and the same works offline
    assert plan_download(request) == [RemoteFile("tiny.safetensors", size, True)]
    assert run_download(request).downloaded == 0
    assert run_download(DownloadRequest(REPO, cache_dir=cache, offline=True)).paths == result.paths


def test_online_into_a_folder(hub, tmp_path):
    files = {"transformer/config.json": b"{}", "transformer/diffusion_pytorch_model.safetensors": safetensors_bytes()}
    hub.add(REPO, files)
    folder = tmp_path / "models"
    result = run_download(DownloadRequest(REPO, folder=folder, endpoint=hub.url))
    assert result.paths == [folder / name for name in files]
    assert [p.read_bytes() for p in result.paths] == list(files.values())
    assert plan_download(DownloadRequest(REPO, folder=folder, endpoint=hub.url))[0].present


def test_cancel_mid_download_leaves_nothing(hub, cache):
    data = safetensors_bytes(1450)  # 12.6 MB
    commit = hub.add(REPO, {"big.safetensors": data})
    hub.rate = 2_000_000
    request = DownloadRequest(REPO, cache_dir=cache, endpoint=hub.url)
    cancel = CancelToken()

    def cancel_once_it_flows():
        while not hub.ranges:
            time.sleep(0.01)
        time.sleep(0.5)
        cancel.cancel()

    threading.Thread(target=cancel_once_it_flows, daemon=True).start()
    with pytest.raises(Cancelled, match="^download cancelled; finished files are kept$"):
        run_download(request, cancel=cancel)
    repo = cache / f"models--{REPO.replace('/', '--')}"
    assert [p.name for p in (repo / "blobs").iterdir()] == []
    assert not (repo / "snapshots" / commit / "big.safetensors").exists()

    hub.rate = None
    assert run_download(request).paths[0].read_bytes() == data


def test_a_dropped_connection_resumes(hub, cache):
    data = safetensors_bytes(1450)  # more than huggingface_hub's 10 MiB write chunk
    hub.add(REPO, {"big.safetensors": data})
    hub.drop_after = 11_000_000
    reports = []
    result = run_download(DownloadRequest(REPO, cache_dir=cache, endpoint=hub.url), progress=reports.append)
    assert result.paths[0].read_bytes() == data
    assert hub.ranges == ["", f"bytes={10 * 1024 * 1024}-"]
    done = [r.done for r in reports]
    assert done == sorted(done) and done[-1] == len(data)


def test_gated_repo(hub, cache, monkeypatch):
    hub.add(REPO, {"m.safetensors": safetensors_bytes()})
    hub.gated.add(REPO)
    request = DownloadRequest(REPO, cache_dir=cache, endpoint=hub.url)
    with pytest.raises(HubError) as e:
        run_download(request)
    assert str(e.value) == (
        f"{REPO} is gated: accept its terms at {hub.url}/{REPO}, then log in with `hf auth login` or set HF_TOKEN"
    )
    monkeypatch.setenv("HF_TOKEN", "hf_" + secrets.token_hex(8))
    with pytest.raises(HubError) as e:
        run_download(request)
    assert str(e.value) == f"{REPO} is gated and your token has no access yet: accept its terms at {hub.url}/{REPO}"
    assert list(cache.rglob("*.safetensors")) == []


def test_hub_errors(hub, cache):
    hub.add(REPO, {"m.safetensors": safetensors_bytes()})
    with pytest.raises(HubError) as e:
        plan_download(DownloadRequest("acme/nothing", cache_dir=cache, endpoint=hub.url))
    assert str(e.value) == (
        "acme/nothing was not found on the Hugging Face hub (if it is private, log in with `hf auth login` or set HF_TOKEN)"
    )
    with pytest.raises(HubError) as e:
        plan_download(DownloadRequest(REPO, revision="v9", cache_dir=cache, endpoint=hub.url))
    assert str(e.value) == f"{REPO} has no branch, tag or commit 'v9'"
    hub.add("someone/x", {"README.md": b"# x", "config.json": b"{}"})
    with pytest.raises(HubError) as e:
        plan_download(DownloadRequest("someone/x", cache_dir=cache, endpoint=hub.url))
    assert str(e.value) == "someone/x has no .safetensors model file or transformer/ folder (found: README.md, config.json)"
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    with pytest.raises(HubError) as e:
        plan_download(DownloadRequest(REPO, cache_dir=cache, endpoint=f"http://127.0.0.1:{port}"))
    assert str(e.value).startswith(f"cannot download from http://127.0.0.1:{port} (")
    assert str(e.value).endswith("); check your connection and run again (files already downloaded are kept)")


def test_not_enough_space(hub, cache, monkeypatch):
    data = safetensors_bytes(64)
    hub.add(REPO, {"m.safetensors": data})
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=len(data) - 1))
    with pytest.raises(HubError) as e:
        run_download(DownloadRequest(REPO, cache_dir=cache, endpoint=hub.url))
    assert str(e.value) == (
        f"not enough space in {cache.parent}: the download needs {len(data) / 1000:.1f} KB and "
        f"{(len(data) - 1) / 1000:.1f} KB is free; free up space or download into another folder"
    )
    assert not cache.exists()


def test_cli_download_then_export(tmp_path, cache, monkeypatch, capsys):
    """``download --offline --comfyui``: from the cache into ComfyUI's folder, as a verified hard link."""
    model = write_single_file(tmp_path / "m.safetensors", "zimage", fmt="int8_rowwise").path.read_bytes()
    commit = add_snapshot(cache, REPO, {"zimage-int8.safetensors": model, "README.md": b"# tiny"})
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))  # where the CLI's default cache is
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))  # and the download child's
    root = make_checkout(tmp_path / "ComfyUI")

    assert main(["download", REPO, "--offline", "--comfyui", str(root)]) == 0
    snapshot = cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / commit / "zimage-int8.safetensors"
    exported = root / "models" / "diffusion_models" / "zimage-int8.safetensors"
    size = f"{len(model) / 1000:.1f} KB"
    lines = capsys.readouterr().out.splitlines()
    assert lines[:4] == [
        f"{REPO}: 1 file, {size}; 0 bytes to download",
        f"  zimage-int8.safetensors ({size}, already here)",
        str(snapshot),
        f"exported {exported} (hard link, {size}): Z-Image custom, int8_rowwise ({lines[3].split('(')[-1]}",
    ]
    assert exported.stat().st_ino == snapshot.resolve().stat().st_ino

    assert main(["download", REPO, "README.md", "--offline", "--to", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.startswith(
        f"int8-studio: error: README.md of acme/tiny-flux is not downloaded yet (in {tmp_path / 'x'})"
    )

"""Downloads from the Hugging Face hub: choose the files, show their sizes first, then fetch them
with progress, resume and cancel, into the hub cache or straight into a folder.

Everything goes through ``huggingface_hub``: the token comes from where it keeps it (``HF_TOKEN`` or
``hf auth login``), files land in its cache (``HF_HOME``) unless a folder is given, a dropped
connection resumes where it stopped (an HTTP range request), and files already downloaded are never
fetched again, so running a download again carries on with the files it had not finished. Offline
(``offline=True`` or ``HF_HUB_OFFLINE=1``) only what is already downloaded is used.

The transfer itself runs in a child process: the hub's Xet transfer path cannot be interrupted from
a progress callback, and a user's Cancel must stop the download at once. Progress comes back through
a queue; a stopped child's partial file is removed. This module imports no torch, so that child
starts in a fraction of a second.
"""

from __future__ import annotations

import fnmatch
import io
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TextIO

import tqdm
from huggingface_hub import (
    HfApi,
    get_token,
    hf_hub_download,
    scan_cache_dir,
    try_to_load_from_cache,
)
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import (
    CacheNotFound,
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from engine.jobs import Cancelled, CancelToken, JobError, ProgressFn, Reporter

HUB_URL = "https://huggingface.co"
EXAMPLE_REPO = "black-forest-labs/FLUX.2-klein-9B"
"""The repo both faces give as an example of what to type."""
MODEL_SUFFIX = ".safetensors"
POLL_SECONDS = 0.1
MESSAGE_MARK = "\x1eint8-studio "  # starts each line the download child sends
PACKAGE_ROOT = str(Path(__file__).resolve().parents[1])  # so the child imports this engine


class HubError(JobError):
    """A download that cannot be done: unknown repo or file, no access, offline, no space."""


@dataclass(frozen=True)
class DownloadRequest:
    repo_id: str  # "black-forest-labs/FLUX.2-klein-9B"
    files: tuple[str, ...] = ()  # names or shell patterns in the repo; () = the model (choose_files)
    revision: str | None = None  # branch, tag or commit; None = main
    folder: Path | None = None  # straight into this folder, repo paths kept; None = the hub cache
    cache_dir: Path | None = None  # None = the hub's (HF_HUB_CACHE, under HF_HOME)
    token: str | None = None  # None = HF_TOKEN or the token `hf auth login` saved
    offline: bool = False  # only what is already downloaded (also when HF_HUB_OFFLINE=1)
    endpoint: str | None = None  # a hub mirror; None = HF_ENDPOINT or huggingface.co


@dataclass(frozen=True)
class RemoteFile:
    name: str  # path in the repo, "transformer/config.json"
    size: int  # bytes
    present: bool  # already downloaded (in the cache, or in the folder)

    @property
    def label(self) -> str:
        """``"model.safetensors (9.2 GB, already here)"``."""
        return f"{self.name} ({_size(self.size)}{', already here' if self.present else ''})"


@dataclass(frozen=True)
class DownloadResult:
    paths: list[Path]  # local files, in plan order (inside the cache's snapshots/ or the folder)
    downloaded: int  # bytes that had to be fetched (0 when everything was there)

    @property
    def models(self) -> list[Path]:
        """The ``.safetensors`` files downloaded (what can be exported as it is)."""
        return [p for p in self.paths if p.name.endswith(MODEL_SUFFIX)]

    @property
    def model(self) -> Path | None:
        """What to convert: the diffusers model folder (the one holding ``transformer/``), else the first
        model file; None when the download holds neither."""
        transformer = next((p.parent for p in self.models if p.parent.name == "transformer"), None)
        return transformer.parent if transformer else next(iter(self.models), None)


def is_offline(request: DownloadRequest) -> bool:
    """``HF_HUB_OFFLINE`` is read by huggingface_hub once, at import; the environment may have changed."""
    env = os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}
    return request.offline or env or hub_constants.HF_HUB_OFFLINE


# --- which files --------------------------------------------------------------------------------


def list_files(request: DownloadRequest) -> list[RemoteFile]:
    """Every file of the repo at the revision, with its size: from the hub, or offline from what is
    already downloaded (the hub cache, or the folder)."""
    if is_offline(request):
        return _local_files(request)
    try:
        # one request, without the retries that listing the tree makes (half a minute when offline)
        info = HfApi(endpoint=request.endpoint, token=request.token).model_info(
            request.repo_id, revision=request.revision, files_metadata=True
        )
    except Exception as e:
        explained = _explain(e, request)
        if explained is e:
            raise
        raise explained from None
    siblings = info.siblings or []
    return [RemoteFile(f.rfilename, f.size or 0, _present(request, f.rfilename, f.size)) for f in siblings]


def _cache_dir(request: DownloadRequest) -> Path:
    return Path(request.cache_dir or hub_constants.HF_HUB_CACHE)


def _present(request: DownloadRequest, name: str, size: int | None) -> bool:
    if request.folder is not None:
        path = Path(request.folder) / name
        return path.is_file() and path.stat().st_size == size
    cached = try_to_load_from_cache(
        request.repo_id, name, cache_dir=_cache_dir(request), revision=request.revision
    )
    return isinstance(cached, str) and os.path.getsize(cached) == size


def _local_files(request: DownloadRequest) -> list[RemoteFile]:
    if request.folder is not None:
        folder = Path(request.folder)
        return [
            RemoteFile(p.relative_to(folder).as_posix(), p.stat().st_size, True)
            for p in sorted(folder.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        ]
    try:
        repos = scan_cache_dir(_cache_dir(request)).repos
    except CacheNotFound:
        repos = frozenset()
    revision = request.revision or "main"
    snapshot = next(
        (
            r
            for repo in repos
            if repo.repo_id == request.repo_id and repo.repo_type == "model"
            for r in repo.revisions
            if revision in r.refs or r.commit_hash == revision
        ),
        None,
    )
    if snapshot is None:
        raise HubError(
            f"{request.repo_id} ({revision}) is not in the hub cache and downloads are off (offline mode); "
            "connect and run again without offline mode (unset HF_HUB_OFFLINE)"
        )
    names = sorted((f.file_path.relative_to(snapshot.snapshot_path).as_posix(), f) for f in snapshot.files)
    return [RemoteFile(name, f.size_on_disk, True) for name, f in names]


def choose_files(request: DownloadRequest, files: list[RemoteFile]) -> list[RemoteFile]:
    """The files a request means. Named files and patterns select those; with none, "the model":
    the repo's one ``.safetensors`` file at the top, else its diffusers ``transformer/`` folder."""
    if request.files:
        chosen = []
        for pattern in request.files:
            matches = [f for f in files if fnmatch.fnmatchcase(f.name, pattern) and f not in chosen]
            if not matches and not any(fnmatch.fnmatchcase(f.name, pattern) for f in files):
                if is_offline(request):
                    raise HubError(_offline_message(request, pattern))
                raise HubError(f"{request.repo_id} has no file '{pattern}'; it has: {_names(files)}")
            chosen += matches
        return chosen
    top = [f for f in files if "/" not in f.name and f.name.endswith(MODEL_SUFFIX)]
    if len(top) == 1:
        return top
    transformer = [f for f in files if f.name.startswith("transformer/")]
    if not top and any(f.name.endswith(MODEL_SUFFIX) for f in transformer):
        return transformer
    if top:
        sizes = ", ".join(f"{f.name} ({_size(f.size)})" for f in top)
        raise HubError(f"{request.repo_id} has {len(top)} models: {sizes}; name the one you want")
    models = [f for f in files if f.name.endswith(MODEL_SUFFIX)]
    if models:
        raise HubError(
            f"{request.repo_id} has no single model file or transformer/ folder; name the files you want, "
            f"e.g. {_names(models)}"
        )
    raise HubError(
        f"{request.repo_id} has no .safetensors model file or transformer/ folder (found: {_names(files)})"
    )


def plan_download(request: DownloadRequest) -> list[RemoteFile]:
    """The files :func:`run_download` would fetch, with their sizes: what to show before starting."""
    return choose_files(request, list_files(request))


def plan_summary(plan: list[RemoteFile]) -> str:
    """``"2 files, 9.2 GB; 1.1 GB to download"``: a plan in one line."""
    fetch = sum(f.size for f in plan if not f.present)
    return f"{_count(len(plan), 'file')}, {_size(sum(f.size for f in plan))}; {_size(fetch)} to download"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _names(files: list[RemoteFile], count: int = 8) -> str:
    if not files:
        return "no files"
    names = [f.name for f in files[:count]]
    return ", ".join(names) + (f" and {len(files) - count} more" if len(files) > count else "")


def _size(n: int) -> str:
    # not imported at the top: engine.checkpoint imports torch (see the module docstring)
    from engine.checkpoint import format_bytes

    return format_bytes(n)


# --- download -----------------------------------------------------------------------------------


def run_download(
    request: DownloadRequest, progress: ProgressFn | None = None, cancel: CancelToken | None = None
) -> DownloadResult:
    cancel = cancel or CancelToken()
    plan = plan_download(request)
    missing = [f for f in plan if not f.present]
    needed = sum(f.size for f in missing)
    if missing:
        _check_free_space(request, needed)
    request = replace(request, offline=is_offline(request))
    report = Reporter(progress, "download", needed)
    report(0, f"{_count(len(plan), 'file')}, {_size(needed)} to fetch")
    paths = _fetch_in_child(request, plan, report, cancel)
    for path in paths:
        if path.name.endswith(MODEL_SUFFIX):
            _verify(path)
    return DownloadResult(paths, needed)


def _check_free_space(request: DownloadRequest, needed: int) -> None:
    target = Path(request.folder or _cache_dir(request))
    existing = next(p for p in (target, *target.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise HubError(
            f"not enough space in {existing}: the download needs {_size(needed)} and {_size(free)} is free; "
            "free up space or download into another folder"
        )


def _verify(path: Path) -> None:
    from engine.checkpoint import read_header  # (see _size)

    read_header(path)


def _fetch_in_child(
    request: DownloadRequest, plan: list[RemoteFile], report: Reporter, cancel: CancelToken
) -> list[Path]:
    """Run :func:`_child_main` in a child process, relaying its progress, until it is done, fails,
    or the user cancels (then the child is stopped and its partial file removed)."""
    before = _partial_files(request)
    python_path = [PACKAGE_ROOT, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(python_path)}
    child = subprocess.Popen(
        [sys.executable, "-c", "from engine.hub import _child_main; _child_main()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        encoding="utf-8",
        errors="replace",
        env=env,
        creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0),  # no console window on Windows
    )
    job = {**asdict(request), "folder": _str(request.folder), "cache_dir": _str(request.cache_dir)}
    child.stdin.write(json.dumps({"request": job, "names": [f.name for f in plan]}))
    child.stdin.close()
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_read_lines, args=(child.stdout, lines), daemon=True).start()
    log: deque[str] = deque(maxlen=30)  # what the child printed besides its messages

    sizes = [0 if f.present else f.size for f in plan]
    finished, current, bars = 0, -1, {}
    paths: list[Path] = []
    completed = False
    try:
        while True:
            if cancel.cancelled:
                raise Cancelled("download cancelled; finished files are kept")
            try:
                line = lines.get(timeout=POLL_SECONDS)
            except queue.Empty:
                continue
            if line is None:  # the child ended without saying it was done
                code = child.wait()
                if code == 1:  # a traceback: a bug
                    raise RuntimeError(f"the download process failed:\n{''.join(log)}")
                raise HubError(f"the download stopped unexpectedly (exit code {code}); run it again")
            if not line.startswith(MESSAGE_MARK):
                log.append(line)
                continue
            message = json.loads(line[len(MESSAGE_MARK) :])
            if "progress" in message:
                index, bar, done = message["progress"]
                if index != current:
                    current, bars = index, {}
                bars[bar] = done  # Xet reports network and disk bytes on two bars: take the furthest
                report(finished + min(max(bars.values()), sizes[index]), plan[index].name)
            elif "file" in message:
                index, path = message["file"]
                finished += sizes[index]
                paths.append(Path(path))
                report(finished, plan[index].name)
            elif "error" in message:
                raise HubError(message["error"])
            else:
                completed = True
                return paths
    finally:
        if child.poll() is None:
            child.terminate()
        child.wait()
        if not completed:  # a stopped child cannot remove its partial file: we do
            for partial in _partial_files(request) - before:
                partial.unlink(missing_ok=True)


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)


def _read_lines(stream: TextIO, lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def _partial_files(request: DownloadRequest) -> set[Path]:
    """The partial downloads (``*.incomplete``) where huggingface_hub writes them for ``request``."""
    if request.folder is not None:
        where = Path(request.folder) / ".cache" / "huggingface"
    else:
        where = _cache_dir(request) / f"models--{request.repo_id.replace('/', '--')}"
    return set(where.rglob("*.incomplete")) if where.is_dir() else set()


class _Forward(tqdm.tqdm):
    """A silent progress bar that sends its position to the parent process (in the child only)."""

    send: Callable[..., None]
    index = 0

    def __init__(self, *args, **kwargs) -> None:
        kwargs.pop("name", None)  # huggingface_hub's own bars take a name, plain tqdm does not
        super().__init__(*args, **{**kwargs, "disable": False, "file": io.StringIO()})

    def update(self, n: float | None = 1) -> bool | None:
        displayed = super().update(n)
        _Forward.send(progress=[self.index, id(self), self.n])
        return displayed

    def display(self, *args, **kwargs) -> None:
        pass


def _child_main() -> None:
    """The download child process: the job comes as JSON on stdin, messages go out on stdout, one
    JSON object a line behind :data:`MESSAGE_MARK` (anything else there is libraries' output)."""
    out, lock = sys.stdout, threading.Lock()
    sys.stdout = sys.stderr  # libraries print; keep it apart from our messages

    def send(**message: object) -> None:
        with lock:  # Xet reports progress from its own threads
            out.write(MESSAGE_MARK + json.dumps(message) + "\n")
            out.flush()

    job = json.loads(sys.stdin.read())
    request = DownloadRequest(**job["request"])
    _Forward.send = send
    name = None
    try:
        for index, name in enumerate(job["names"]):
            _Forward.index = index
            path = hf_hub_download(
                request.repo_id,
                name,
                revision=request.revision,
                cache_dir=request.cache_dir,
                local_dir=request.folder,
                token=request.token,
                local_files_only=request.offline,
                endpoint=request.endpoint,
                tqdm_class=_Forward,
            )
            send(file=[index, path])
        send(done=True)
    except Exception as e:
        explained = _explain(e, request, name)
        if explained is e:
            raise  # a bug: the traceback goes to the parent
        send(error=str(explained))


def _offline_message(request: DownloadRequest, name: str) -> str:
    where = f"in {request.folder}" if request.folder else "in the hub cache"
    return (
        f"{name} of {request.repo_id} is not downloaded yet ({where}) and downloads are off (offline mode); "
        "connect and run again without offline mode (unset HF_HUB_OFFLINE)"
    )


def _explain(e: Exception, request: DownloadRequest, name: str | None = None) -> Exception:
    """The hub's and the network's exceptions as one line a user can act on (others unchanged)."""
    repo, url = request.repo_id, f"{request.endpoint or HUB_URL}/{request.repo_id}"
    login = "log in with `hf auth login` or set HF_TOKEN"
    if isinstance(e, GatedRepoError):
        if get_token() or request.token:
            return HubError(f"{repo} is gated and your token has no access yet: accept its terms at {url}")
        return HubError(f"{repo} is gated: accept its terms at {url}, then {login}")
    if isinstance(e, RepositoryNotFoundError | HFValidationError):
        return HubError(f"{repo} was not found on the Hugging Face hub (if it is private, {login})")
    if isinstance(e, RevisionNotFoundError):
        return HubError(f"{repo} has no branch, tag or commit '{request.revision}'")
    if isinstance(e, LocalEntryNotFoundError | OfflineModeIsEnabled):
        return HubError(_offline_message(request, name or repo))
    if isinstance(e, EntryNotFoundError):
        return HubError(f"{repo} has no file '{name}'")
    network = isinstance(e, HfHubHTTPError | ConnectionError | TimeoutError)
    if network or type(e).__module__.startswith("httpx"):
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return HubError(
            f"cannot download from {request.endpoint or HUB_URL} ({first_line}); check your connection and "
            "run again (files already downloaded are kept)"
        )
    if isinstance(e, OSError) and e.errno == 28:  # ENOSPC
        return HubError(f"the disk is full while downloading {name}; free up space and run again to resume")
    return e

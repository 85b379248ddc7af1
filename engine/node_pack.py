"""The ComfyUI node pack (``comfyui_nodes/``) in a ComfyUI install: install/update and remove (its status:
:mod:`engine.node_pack_status`).

Installed, the pack is one self-contained folder, ``custom_nodes/int8_studio/``: the node modules
(``comfyui_nodes/``'s files, example workflows included), a copy of the engine under ``vendor/engine``
(the pack's bootstrap puts ``vendor/`` first on ``sys.path``; the app's ``app`` package is never copied:
ComfyUI has a top-level ``app`` package of its own) and a manifest, ``int8_studio.json`` (version,
digest of the files, what was installed into ComfyUI's Python). Nothing outside ``custom_nodes/`` is
written, and ComfyUI's own files are never changed.

Installing is atomic. What the pack needs in ComfyUI's Python (Triton; ``triton-windows`` on Windows) is
installed first, and only when missing (torch never: it is ComfyUI's). The new folder is then built
under a temporary name beside the target (``.int8_studio.partial-*.disabled``: ComfyUI skips folders
ending in ``.disabled``), verified by importing it with ComfyUI's own Python, and renamed into place;
an update moves the old folder aside only then, and back if the rename fails. Removing renames our
folder aside and deletes it; a folder of that name that INT8 Studio did not install is never touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from engine import __version__
from engine.comfyui import ComfyInstall
from engine.jobs import Cancelled, CancelToken, ProgressFn, Reporter
from engine.node_pack_status import (
    MANIFEST,
    NODE,
    PACK_FOLDER,
    VENDOR,
    NodePackError,
    PackSource,
    PackStatus,
    custom_nodes_folder,
    files_digest,
    node_pack_status,
    read_manifest,
)

PACKAGES_STAGE = "Installing packages"
TORCH_MINIMUM = (2, 8)  # pyproject's torch>=2.8
PROBE_TIMEOUT = 120  # seconds: the probe imports torch (a cold start from a slow disk takes a while)
VERIFY_TIMEOUT = 300


# --- ComfyUI's Python ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ComfyPython:
    executable: Path
    how: str  # where it was found, for messages: "the portable build's python_embeded", …


def _venv_python(venv: Path, platform: str) -> Path | None:
    names = ("Scripts/python.exe",) if platform == "win32" else ("bin/python", "bin/python3")
    return next((venv / n for n in names if (venv / n).is_file()), None)


def find_comfy_python(
    install: ComfyInstall,
    platform: str = sys.platform,
    which: Callable[[str], str | None] | None = None,
) -> ComfyPython:
    """The Python that runs ``install``: the portable build's ``python_embeded``, ComfyUI Desktop's
    ``.venv``, a virtual environment in or beside the ComfyUI folder (git checkouts, Stability Matrix
    packages, comfy-cli workspaces), else the ``python`` on PATH. What it finds is checked by running it
    (:func:`probe_python`): it must import torch."""
    root = install.root
    portable = root.parent / "python_embeded"
    for name in ("python.exe", "python"):
        if (portable / name).is_file():
            return ComfyPython(portable / name, "the portable build's python_embeded")
    places = [(root / ".venv", "ComfyUI Desktop's .venv")] if install.flavour == "ComfyUI Desktop" else []
    for folder, where in ((root, "in the ComfyUI folder"), (root.parent, "beside the ComfyUI folder")):
        places += [(folder / name, f"the virtual environment {where} ({name})") for name in ("venv", ".venv")]
    for venv, how in places:
        python = _venv_python(venv, platform)
        if python is not None:
            return ComfyPython(python, how)
    for name in ("python", "python3") if platform != "win32" else ("python",):
        found = (which or shutil.which)(name)
        if found:
            return ComfyPython(Path(found), f"the {name} on PATH")
    raise NodePackError(
        f"cannot find the Python that runs ComfyUI at {root}: no python_embeded, no venv or .venv in or "
        "beside it, and no python on PATH; give it with --python PATH"
    )


PROBE = """# int8-studio probe: what the node pack needs from this Python
import importlib.metadata as md, importlib.util as u, json, sys
def version(*names):
    for name in names:
        try:
            return md.version(name)
        except Exception:
            pass
    return None
found = {m: (version(*d) or "?") if u.find_spec(m) else None for m, d in json.loads(sys.argv[1]).items()}
try:
    import torch
    torch_info = {"version": torch.__version__.split("+")[0], "cuda": torch.version.cuda, "hip": torch.version.hip}
except Exception as e:
    torch_info = {"error": f"{type(e).__name__}: {e}"}
print(json.dumps({"python": sys.version.split()[0], "platform": sys.platform, "executable": sys.executable,
                  "torch": torch_info, "modules": found, "pip": u.find_spec("pip") is not None}))
"""

MODULES = {
    "triton": ("triton", "triton-windows", "pytorch-triton", "pytorch-triton-rocm"),
    "safetensors": ("safetensors",),
    "numpy": ("numpy",),
    "psutil": ("psutil",),
    "yaml": ("pyyaml", "PyYAML"),
}
"""The modules the pack imports besides torch, with the distributions that provide each."""
SPECS = {"safetensors": "safetensors>=0.4", "numpy": "numpy", "psutil": "psutil", "yaml": "pyyaml"}


@dataclass(frozen=True)
class PythonInfo:
    python: ComfyPython
    version: str
    platform: str
    torch: str  # e.g. "2.9.1"
    cuda: str | None
    modules: dict[str, str | None]  # module → installed version, None when missing
    has_pip: bool

    def needs_triton(self) -> bool:
        """Triton runs the int8 kernels on NVIDIA (and AMD) GPUs, on Linux and Windows; elsewhere (a
        Mac, a CPU-only torch) the engine runs its other paths and needs none."""
        return self.platform.startswith(("linux", "win32")) and bool(self.cuda)

    def missing(self) -> list[str]:
        """pip requirement specifiers for what the pack needs and this Python lacks."""
        specs = [SPECS[m] for m in SPECS if self.modules.get(m) is None]
        if self.needs_triton() and self.modules.get("triton") is None:
            specs.insert(0, triton_spec(self.torch, self.platform))
        return specs


def triton_spec(torch_version: str, platform: str) -> str:
    """The Triton that matches ``torch_version``: each torch 2.N release is built against Triton
    3.(N-4) (2.8 → 3.4, 2.9 → 3.5, 2.10 → 3.6), on Windows as the ``triton-windows`` package."""
    major, minor = _version_tuple(torch_version)[:2]
    name = "triton-windows" if platform == "win32" else "triton"
    if major != 2:
        return name
    return f"{name}>=3.{minor - 4},<3.{minor - 3}"


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", version.split("+")[0])[:3]) or (0,)


def probe_python(python: ComfyPython) -> PythonInfo:
    """Run ``python`` to learn its version, platform, torch and which of the pack's modules it has."""
    command = [str(python.executable), "-c", PROBE, json.dumps(MODULES)]
    try:
        out = subprocess.run(
            command, check=False, capture_output=True, text=True, timeout=PROBE_TIMEOUT, stdin=subprocess.DEVNULL, env=_env()
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NodePackError(f"cannot run ComfyUI's Python {python.executable} ({python.how}): {e}") from None
    try:
        report = json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["no output"]
        raise NodePackError(f"{python.executable} ({python.how}) did not run as Python: {tail[0]}") from None
    torch = report.get("torch", {})
    if "error" in torch or not torch.get("version"):
        raise NodePackError(
            f"{python.executable} ({python.how}) cannot import torch ({torch.get('error', 'not installed')}): "
            "it is not the Python that runs ComfyUI; give that one with --python PATH"
        )
    if _version_tuple(torch["version"])[:2] < TORCH_MINIMUM:
        minimum = ".".join(map(str, TORCH_MINIMUM))
        raise NodePackError(
            f"ComfyUI's torch is {torch['version']}; the INT8 Studio nodes need torch {minimum} or newer. "
            "Update ComfyUI (INT8 Studio never installs torch)"
        )
    return PythonInfo(
        python, report["python"], report["platform"], torch["version"], torch.get("cuda") or torch.get("hip"),
        dict(report["modules"]), bool(report.get("pip")),
    )  # fmt: skip


def install_command(info: PythonInfo, specs: Sequence[str], which: Callable[[str], str | None] | None = None) -> list[str]:
    """The command that installs ``specs`` into ComfyUI's Python: its pip (``-s``: the portable build's
    embedded Python must not see the user's site-packages, as ComfyUI's own instructions run it), else
    uv's pip aimed at it (ComfyUI Desktop's environment is made by uv, without pip)."""
    python = str(info.python.executable)
    if info.has_pip:
        flags = ["-s"] if "python_embeded" in info.python.how else []
        return [python, *flags, "-m", "pip", "install", *specs]
    uv = (which or shutil.which)("uv")
    if uv:
        return [uv, "pip", "install", "--python", python, *specs]
    raise NodePackError(
        f"ComfyUI's Python {python} has no pip and no uv is on PATH; install {' '.join(specs)} into it yourself"
    )


def show_command(command: Sequence[str]) -> str:
    """``command`` as one line a user can paste into their shell."""
    if sys.platform == "win32":
        return subprocess.list2cmdline(list(command))
    return shlex.join(command)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONUNBUFFERED="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONIOENCODING="utf-8")
    for name in ("PYTHONPATH", "PYTHONHOME"):  # INT8 Studio's own: ComfyUI's Python runs as it does normally
        env.pop(name, None)
    return env


def run_streamed(command: Sequence[str], report: Reporter, cancel: CancelToken | None = None) -> list[str]:
    """Run ``command``, each line of its output (stdout and stderr together) a progress message as it
    comes; its lines. A cancel stops it; a non-zero exit is a :class:`NodePackError` with the last line."""
    report(0, "$ " + show_command(command))
    try:
        process = subprocess.Popen(
            list(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            text=True, encoding="utf-8", errors="replace", bufsize=1, env=_env(),
        )  # fmt: skip
    except OSError as e:
        raise NodePackError(f"cannot run {show_command(command)}: {e.strerror or e}") from None
    lines = []
    with process:
        for line in process.stdout:
            line = line.rstrip()
            if line:
                lines.append(line)
                report(0, line)
            if cancel is not None and cancel.cancelled:
                process.terminate()
                process.wait()
                raise Cancelled()
        code = process.wait()
    if code != 0:
        last = lines[-1] if lines else "no output"
        raise NodePackError(f"{show_command(command)} failed (exit status {code}): {last}")
    return lines


# --- install / update ---------------------------------------------------------------------------


@dataclass(frozen=True)
class NodePackRequest:
    install: ComfyInstall
    python: Path | None = None  # ComfyUI's Python; None: found (find_comfy_python)
    source: PackSource | None = None  # what to install; None: this INT8 Studio's own pack


@dataclass(frozen=True)
class NodePackResult:
    folder: Path
    version: str | None  # what is there now (None after a removal)
    previous: str | None  # the version that was there before (None: none)
    python: ComfyPython | None = None
    commands: tuple[str, ...] = ()  # the package installs run in ComfyUI's Python, as shown
    packages: tuple[str, ...] = ()  # what they installed (pip specifiers)
    summary: str = ""


def _resolve_python(request: NodePackRequest) -> ComfyPython:
    if request.python is not None:
        return ComfyPython(Path(request.python), "given")
    return find_comfy_python(request.install)


def run_install_node(
    request: NodePackRequest, progress: ProgressFn | None = None, cancel: CancelToken | None = None
) -> NodePackResult:
    """Install or update the node pack in ``request.install`` (see the module's docstring)."""
    cancel = cancel or CancelToken()
    source = request.source or PackSource.here()
    nodes = custom_nodes_folder(request.install)
    status = node_pack_status(request.install, source)
    if status.state == "not ours":
        raise NodePackError(f"{status.folder} exists but INT8 Studio did not install it; move it out of custom_nodes first")
    report = Reporter(progress, "ComfyUI's Python", 1)
    python = _resolve_python(request)
    report(0, f"{python.executable} ({python.how})")
    info = probe_python(python)
    report(1, f"Python {info.version}, torch {info.torch}")
    cancel.check()

    specs = info.missing()
    commands: list[str] = []
    if specs:
        command = install_command(info, specs)
        commands.append(show_command(command))
        run_streamed(command, Reporter(progress, PACKAGES_STAGE, 0), cancel)
        info = probe_python(python)
        still = info.missing()
        if still:
            raise NodePackError(f"{' '.join(still)} still missing from {python.executable} after {commands[-1]}")
    cancel.check()

    nodes.mkdir(parents=True, exist_ok=True)
    _sweep(nodes)
    files = source.files()
    token = secrets.token_hex(4)
    temp = nodes / f".{PACK_FOLDER}.partial-{token}.disabled"
    try:
        _build(temp, files, source, info, status, specs, progress, cancel)
        _verify(temp, info, Reporter(progress, "Verifying in ComfyUI's Python", 1), cancel)
        _swap(temp, nodes / PACK_FOLDER, token)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    verb = {"not installed": "installed", "update available": "updated", "installed": "reinstalled"}[status.state]
    before = f" (was v{status.installed_version})" if status.state == "update available" else ""
    summary = f"{verb} INT8 Studio nodes v{source.version}{before} in {nodes / PACK_FOLDER}; restart ComfyUI to load them"
    return NodePackResult(
        nodes / PACK_FOLDER, source.version, status.installed_version, python, tuple(commands), tuple(specs), summary
    )


def _build(
    temp: Path, files: dict[str, Path], source: PackSource, info: PythonInfo, status: PackStatus,
    specs: Sequence[str], progress: ProgressFn | None, cancel: CancelToken,
) -> None:  # fmt: skip
    """Copy the pack into ``temp``, check every copy against its source, write the manifest."""
    report = Reporter(progress, "Copying the nodes", len(files))
    contents = []
    for n, (name, path) in enumerate(files.items()):
        cancel.check()
        data = path.read_bytes()
        target = temp / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        if target.read_bytes() != data:
            raise NodePackError(f"{target} did not read back as written: check the disk")
        contents.append((name, data))
        report(n + 1, name)
    digest = files_digest(contents)
    earlier = status.manifest.get("packages_installed", []) if status.manifest else []
    manifest = {
        "name": "INT8 Studio nodes",
        "version": source.version,
        "digest": digest,
        "files": len(files),
        "installed": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "installed_by": f"int8-studio {__version__}",
        "python": str(info.python.executable),
        "torch": info.torch,
        # what INT8 Studio installed into ComfyUI's Python, over all installs (removing the nodes
        # leaves them: other custom nodes may use them)
        "packages_installed": sorted(set(earlier) | set(specs)),
    }
    (temp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


VERIFY = """# int8-studio verify: import the pack as ComfyUI imports a custom node folder
import importlib.util, json, os, sys
folder = sys.argv[1]
spec = importlib.util.spec_from_file_location(folder.replace(".", "_x_"), os.path.join(folder, "__init__.py"))
module = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = module
spec.loader.exec_module(module)
import engine
print(json.dumps({"nodes": sorted(module.NODE_CLASS_MAPPINGS), "engine": os.path.abspath(engine.__file__),
                  "app": "app" in sys.modules}))
"""


def _verify(folder: Path, info: PythonInfo, report: Reporter, cancel: CancelToken) -> None:
    """Import ``folder`` with ComfyUI's Python the way ComfyUI imports a custom node: it must register
    its nodes with the engine from its own ``vendor/`` and import no ``app`` package."""
    report(0, "importing the nodes")
    command = [str(info.python.executable), "-B", "-c", VERIFY, str(folder)]
    try:
        out = subprocess.run(
            command, check=False, capture_output=True, text=True, timeout=VERIFY_TIMEOUT, stdin=subprocess.DEVNULL, env=_env()
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NodePackError(f"cannot verify the nodes with {info.python.executable}: {e}") from None
    cancel.check()
    try:
        result = json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        lines = out.stderr.strip().splitlines() or ["no output"]
        raise NodePackError(
            f"the nodes do not import in ComfyUI's Python {info.python.executable}: {lines[-1]}"
        ) from None
    vendored = (folder / VENDOR / "engine").resolve()
    if NODE not in result["nodes"]:
        raise NodePackError(f"the nodes imported in ComfyUI's Python but do not register {NODE}")
    if not Path(result["engine"]).resolve().is_relative_to(vendored):
        raise NodePackError(
            f"ComfyUI's Python imports another package named engine ({result['engine']}) before the nodes' own"
        )
    report(1, f"{len(result['nodes'])} nodes")


def _swap(temp: Path, target: Path, token: str) -> None:
    """Put ``temp`` at ``target``; an existing ``target`` is moved aside first and back on failure."""
    old = target.with_name(f".{PACK_FOLDER}.old-{token}.disabled")
    if target.exists():
        try:
            os.rename(target, old)
        except OSError as e:
            raise NodePackError(_in_use(target, e)) from None
    try:
        os.rename(temp, target)
    except OSError as e:
        if old.exists():
            os.rename(old, target)
        raise NodePackError(f"cannot put the nodes at {target}: {e.strerror or e}") from None
    shutil.rmtree(old, ignore_errors=True)


def _in_use(folder: Path, error: OSError) -> str:
    return f"cannot move {folder} ({error.strerror or error}): close ComfyUI (it may be using it) and try again"


def _sweep(nodes: Path) -> None:
    """Remove what an interrupted install or removal left: our own hidden, disabled folders only."""
    pattern = re.compile(rf"^\.{PACK_FOLDER}\.(partial|old|removing)-[0-9a-f]+\.disabled$")
    with contextlib.suppress(OSError):
        for entry in nodes.iterdir():
            if pattern.match(entry.name) and entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)


# --- remove -------------------------------------------------------------------------------------


def run_remove_node(
    request: NodePackRequest, progress: ProgressFn | None = None, cancel: CancelToken | None = None
) -> NodePackResult:
    """Remove the node pack from ``request.install``: only our folder, and only if INT8 Studio put it
    there. Packages installed into ComfyUI's Python stay (other custom nodes may use them)."""
    nodes = custom_nodes_folder(request.install)
    folder = nodes / PACK_FOLDER
    if not folder.exists():
        return NodePackResult(folder, None, None, summary=f"INT8 Studio nodes are not installed in {nodes}")
    manifest = read_manifest(folder)
    if manifest is None:
        raise NodePackError(f"{folder} was not installed by INT8 Studio; it is left as it is")
    report = Reporter(progress, "Removing the nodes", 1)
    report(0, str(folder))
    _sweep(nodes)
    aside = nodes / f".{PACK_FOLDER}.removing-{secrets.token_hex(4)}.disabled"
    try:
        os.rename(folder, aside)
    except OSError as e:
        raise NodePackError(_in_use(folder, e)) from None
    shutil.rmtree(aside, ignore_errors=True)
    report(1)
    kept = manifest.get("packages_installed") or []
    note = f"; left in ComfyUI's Python: {', '.join(kept)}" if kept else ""
    summary = f"removed INT8 Studio nodes v{manifest['version']} from {folder}; restart ComfyUI{note}"
    return NodePackResult(folder, None, manifest["version"], packages=tuple(kept), summary=summary)

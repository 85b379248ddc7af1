"""The node pack and a ComfyUI install: what INT8 Studio ships (:class:`PackSource`) and what an install
has of it (:func:`node_pack_status`: not installed, installed, update available, or a folder of that name
that is not ours). Installing and removing: :mod:`engine.node_pack`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from engine import __version__
from engine.comfyui import ComfyInstall
from engine.jobs import JobError

PACK_FOLDER = "int8_studio"
"""The pack's folder under ``custom_nodes/`` (also the name ComfyUI lists it by)."""
MANIFEST = "int8_studio.json"
VENDOR = "vendor"
"""The progress stage of a package install into ComfyUI's Python: its messages are the command (first,
after ``$ ``) and then each line of its output, which the CLI and the app show whole."""
NODE = "Int8StudioLoadDiffusionModel"
"""A node the installed pack must register (the verification imports the pack and looks for it)."""

SKIPPED = ("__pycache__", ".pytest_cache", VENDOR)


class NodePackError(JobError):
    """The node pack cannot be installed or removed here; nothing was changed."""


# --- what is shipped ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PackSource:
    """Where the files of the pack come from: the ``comfyui_nodes`` and ``engine`` package folders."""

    nodes: Path
    engine: Path
    version: str = __version__

    @classmethod
    def here(cls) -> PackSource:
        """This INT8 Studio's own packages (found without importing ``comfyui_nodes``: it imports torch)."""
        spec = importlib.util.find_spec("comfyui_nodes")
        if spec is None or not spec.submodule_search_locations:
            raise NodePackError("this INT8 Studio has no comfyui_nodes package: reinstall INT8 Studio")
        return cls(Path(next(iter(spec.submodule_search_locations))), Path(__file__).resolve().parent)

    def files(self) -> dict[str, Path]:
        """The installed folder's files (relative POSIX path → source file), in a stable order."""
        found = {}
        for base, prefix in ((self.nodes, ""), (self.engine, f"{VENDOR}/engine/")):
            for path in sorted(base.rglob("*")):
                relative = path.relative_to(base)
                if path.is_file() and not any(part in SKIPPED for part in relative.parts[:-1]) and _shipped(path):
                    found[prefix + relative.as_posix()] = path
        return found

    def digest(self) -> str:
        """A SHA-256 over the shipped files' paths and contents: a changed file is an update."""
        return files_digest((name, path.read_bytes()) for name, path in self.files().items())


def _shipped(path: Path) -> bool:
    return path.suffix not in (".pyc", ".pyo") and path.name != MANIFEST and not path.name.startswith(".")


def files_digest(items: Iterable[tuple[str, bytes]]) -> str:
    h = hashlib.sha256()
    for name, data in items:
        h.update(name.encode() + b"\0" + len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


# --- status -------------------------------------------------------------------------------------


def custom_nodes_folder(install: ComfyInstall) -> Path:
    """``custom_nodes/`` of the install (ComfyUI Desktop keeps it in its base path, its root here)."""
    return install.root / "custom_nodes"


def read_manifest(folder: Path) -> dict | None:
    """The manifest of an installed pack folder, or None when there is none (or it is unreadable)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("version"), str) else None


@dataclass(frozen=True)
class PackStatus:
    state: str  # "not installed", "installed", "update available", "not ours"
    folder: Path  # custom_nodes/int8_studio
    current_version: str
    installed_version: str | None = None
    manifest: dict = field(default_factory=dict, compare=False)

    @property
    def installed(self) -> bool:
        return self.state in ("installed", "update available")

    @property
    def summary(self) -> str:
        """One line: "INT8 Studio nodes: installed v0.1.0" (the app's status line, the CLI's words)."""
        if self.state == "installed":
            what = f"installed v{self.installed_version}"
        elif self.state == "update available":
            newer = "" if self.installed_version == self.current_version else f", v{self.current_version} here"
            what = f"update available (installed v{self.installed_version}{newer})"
        elif self.state == "not ours":
            what = f"{self.folder} exists but was not installed by INT8 Studio"
        else:
            what = "not installed"
        return f"INT8 Studio nodes: {what}"

    @property
    def action(self) -> str:
        """The one thing to do next: "Install", "Update" or "Reinstall" (the app's button)."""
        return {"installed": "Reinstall", "update available": "Update"}.get(self.state, "Install")


def node_pack_status(install: ComfyInstall, source: PackSource | None = None) -> PackStatus:
    """Whether the pack is in ``install``, and whether this INT8 Studio ships a different one."""
    source = source or PackSource.here()
    folder = custom_nodes_folder(install) / PACK_FOLDER
    if not folder.exists():
        return PackStatus("not installed", folder, source.version)
    manifest = read_manifest(folder)
    if manifest is None:
        return PackStatus("not ours", folder, source.version)
    same = manifest["version"] == source.version and manifest.get("digest") == source.digest()
    state = "installed" if same else "update available"
    return PackStatus(state, folder, source.version, manifest["version"], manifest)

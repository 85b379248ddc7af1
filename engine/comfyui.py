"""ComfyUI installs: finding them and where they keep models (:mod:`engine.export` puts files there).

An install is a folder ComfyUI runs from (a git checkout, the Windows portable build, a Stability
Matrix package, a comfy-cli workspace) or ComfyUI Desktop's base path. Its model folders are the
defaults under ``models/`` plus whatever its ``extra_model_paths.yaml`` adds, read the way ComfyUI
reads it (``utils/extra_config.py`` and ``folder_paths.py``), so we agree with ComfyUI on where a
file must go for it to be listed.
"""

from __future__ import annotations

import configparser
import json
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from engine.jobs import JobError

DEFAULT_FOLDERS: dict[str, tuple[str, ...]] = {
    "diffusion_models": ("unet", "diffusion_models"),
    "loras": ("loras",),
    "checkpoints": ("checkpoints",),
    "text_encoders": ("text_encoders", "clip"),
    "vae": ("vae",),
}
"""Folder key → its default folders under ``models/``, in ComfyUI's search order (``folder_paths.py``)."""

OUTPUT_KINDS = ("checkpoints", "clip", "vae", "diffusion_models", "loras")
"""Kinds ComfyUI also lists from ``output/<kind>`` (where its own save nodes write)."""

LEGACY_KEYS = {"unet": "diffusion_models", "clip": "text_encoders"}
MODEL_EXTENSIONS = (".safetensors", ".sft")  # the ones ComfyUI lists that are not pickles
EXTRA_PATHS_FILE = "extra_model_paths.yaml"
DESKTOP_PATHS_FILE = "extra_models_config.yaml"


class ComfyUIError(JobError):
    """An install that cannot be read or a model folder that cannot be used."""


@dataclass(frozen=True)
class ModelFolder:
    kind: str  # ComfyUI's folder key, legacy names mapped: "diffusion_models", "loras", …
    path: Path
    is_default: bool = False  # an extra path marked is_default: where ComfyUI (and we) put new files
    origin: str = "models"  # "models", "output", or "extra_model_paths.yaml [section]"


@dataclass
class ComfyInstall:
    root: Path  # the folder holding main.py, or ComfyUI Desktop's base path
    flavour: str  # "git checkout", "Windows portable", "ComfyUI Desktop", "Stability Matrix", "comfy-cli"
    config_files: tuple[Path, ...] = ()  # the extra model path YAML files that were read
    folders: dict[str, list[ModelFolder]] = field(default_factory=dict)  # kind → search order
    problems: tuple[str, ...] = ()  # YAML files that could not be read, one message each

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def label(self) -> str:
        return f"{self.flavour} at {self.root}"

    def export_folder(self, kind: str = "diffusion_models") -> Path:
        """Where a new file of ``kind`` goes: the first ``is_default`` extra path, else ``models/<kind>``.

        Not "the first folder": ``models/unet`` comes before ``models/diffusion_models`` in ComfyUI's
        list. The file goes at the folder's top level (ComfyUI Desktop's missing-model check looks
        only there). A YAML that could not be read might have named the default, so it is an error.
        """
        if self.problems:
            raise ComfyUIError(self.problems[0])
        default = next((f for f in self.folders.get(kind, []) if f.is_default), None)
        return default.path if default else self.models_dir / kind


# --- extra_model_paths.yaml ---------------------------------------------------------------------


def read_extra_model_paths(path: Path) -> list[ModelFolder]:
    """The folders a ComfyUI extra model paths YAML file adds, in file order.

    Each root key is a free-form section: optional ``base_path`` (``~`` and ``$VARS`` expanded,
    relative to the YAML's own folder), optional ``is_default``, then ``kind: path`` pairs where a
    YAML block scalar holds several paths, one per line. Paths without a base are relative to the
    YAML's folder. Unknown kinds are kept: they define new folder types in ComfyUI too.
    """
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ComfyUIError(f"cannot read {path}: {e.strerror or e}") from e
    except UnicodeDecodeError:
        raise ComfyUIError(f"{path} is not UTF-8 text; save it as UTF-8") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ComfyUIError(
            f"{path} is not valid YAML ({where}{problem}); ComfyUI cannot read it either — fix it"
        ) from None
    if config is None:
        return []
    if not isinstance(config, dict):
        kind = type(config).__name__
        raise ComfyUIError(f"{path} must map section names to folder settings, not be a {kind}")
    here = path.parent.absolute()
    folders = []
    for section, settings in config.items():
        if settings is None:
            continue
        if not isinstance(settings, dict):
            raise ComfyUIError(
                f"{path}: section '{section}' must map folder kinds to paths, not be {settings!r}"
            )
        settings = dict(settings)
        base = settings.pop("base_path", None)
        if base is not None:
            base = here / os.path.expandvars(os.path.expanduser(str(base)))
        is_default = bool(settings.pop("is_default", False))
        for kind, value in settings.items():
            if not isinstance(value, str):
                raise ComfyUIError(
                    f"{path}: '{kind}' in section '{section}' must be a path, or several with '|' one per "
                    f"line; found {value!r}"
                )
            for line in value.splitlines():
                if line.strip():
                    folder = Path(os.path.normpath((base or here) / line.strip()))
                    origin = f"{path.name} [{section}]"
                    folders.append(ModelFolder(LEGACY_KEYS.get(kind, kind), folder, is_default, origin))
    return folders


def _add(folders: dict[str, list[ModelFolder]], folder: ModelFolder) -> None:
    """ComfyUI's ``add_model_folder_path``: defaults go first, others last, a known path is not repeated."""
    paths = folders.setdefault(folder.kind, [])
    known = next((i for i, f in enumerate(paths) if f.path == folder.path), None)
    if known is not None:
        if folder.is_default:
            paths.insert(0, folder)
            del paths[known + 1]
    elif folder.is_default:
        paths.insert(0, folder)
    else:
        paths.append(folder)


def load_install(root: Path, flavour: str, config_files: Iterable[Path] = ()) -> ComfyInstall:
    """The install at ``root`` with its model folders: defaults, then each YAML that exists, then output/."""
    folders: dict[str, list[ModelFolder]] = {}
    for kind, names in DEFAULT_FOLDERS.items():
        for name in names:
            _add(folders, ModelFolder(kind, root / "models" / name))
    read, problems = [], []
    for file in config_files:
        if not file.is_file():
            continue
        read.append(file)
        try:
            for folder in read_extra_model_paths(file):
                _add(folders, folder)
        except ComfyUIError as e:
            problems.append(str(e))
    for kind in OUTPUT_KINDS:
        _add(folders, ModelFolder(LEGACY_KEYS.get(kind, kind), root / "output" / kind, origin="output"))
    return ComfyInstall(root, flavour, tuple(read), folders, tuple(problems))


# --- recognising and finding installs -----------------------------------------------------------


def is_comfyui_code(folder: Path) -> bool:
    """A folder ComfyUI runs from: ``main.py``, ``folder_paths.py`` and ``comfy/``."""
    files = (folder / "main.py").is_file() and (folder / "folder_paths.py").is_file()
    return files and (folder / "comfy").is_dir()


def _code_install(folder: Path, flavour: str | None = None) -> ComfyInstall:
    if flavour is None:
        portable = folder.parent / "python_embeded"
        if portable.is_dir() or (folder.parent / "run_nvidia_gpu.bat").is_file():
            flavour = "Windows portable"
        elif folder.parent.name == "Packages":
            flavour = "Stability Matrix"
        else:
            flavour = "git checkout"
    return load_install(folder, flavour, [folder / EXTRA_PATHS_FILE])


def open_install(path: str | Path) -> ComfyInstall:
    """The install a user pointed at: the ComfyUI folder, the portable build's top folder, or a base
    path holding ``models/`` (ComfyUI Desktop's, or any folder laid out like ComfyUI's)."""
    path = Path(os.path.expanduser(str(path))).absolute()
    if not path.is_dir():
        raise ComfyUIError(f"{path} is not a folder; give the ComfyUI folder (the one with main.py)")
    for folder in (path, path / "ComfyUI"):
        if is_comfyui_code(folder):
            return _code_install(folder)
    if (path / "models").is_dir():
        return load_install(path, "ComfyUI folder", [path / EXTRA_PATHS_FILE])
    raise ComfyUIError(
        f"{path} is not a ComfyUI folder: it has no main.py, folder_paths.py and comfy/, and no models/ "
        "folder; give the folder that holds main.py (or ComfyUI Desktop's base path)"
    )


@dataclass(frozen=True)
class Places:
    """Where per-user application data lives on this machine (injectable, so tests use a fake home)."""

    home: Path
    platform: str  # sys.platform: "win32", "darwin", "linux"
    env: Mapping[str, str]

    @classmethod
    def here(cls) -> Places:
        return cls(Path.home(), sys.platform, os.environ)

    @property
    def roaming(self) -> Path:
        """Windows %APPDATA%, macOS Application Support, Linux $XDG_CONFIG_HOME."""
        if self.platform == "win32":
            return Path(self.env.get("APPDATA") or self.home / "AppData" / "Roaming")
        if self.platform == "darwin":
            return self.home / "Library" / "Application Support"
        return Path(self.env.get("XDG_CONFIG_HOME") or self.home / ".config")

    @property
    def local(self) -> Path:
        """Windows %LOCALAPPDATA%; elsewhere the same as :attr:`roaming`."""
        if self.platform == "win32":
            return Path(self.env.get("LOCALAPPDATA") or self.home / "AppData" / "Local")
        return self.roaming

    @property
    def documents(self) -> Path:
        return self.home / "Documents"


def _desktop(places: Places) -> Iterable[ComfyInstall]:
    """ComfyUI Desktop: ``basePath`` in the user-data ``config.json``; its YAML sits beside that file."""
    user_data = places.roaming / "ComfyUI"
    base = _json_value(user_data / "config.json", "basePath")
    if base and Path(base).is_dir():
        yield load_install(Path(base), "ComfyUI Desktop", [user_data / DESKTOP_PATHS_FILE])


def _comfy_cli(places: Places) -> Iterable[ComfyInstall]:
    """comfy-cli: the workspaces in its ``config.ini``, then its default workspace locations."""
    config = configparser.ConfigParser(interpolation=None)
    try:
        config.read(places.local / "comfy-cli" / "config.ini", encoding="utf-8")
    except (configparser.Error, UnicodeDecodeError):
        pass
    named = [config.defaults().get(key) for key in ("default_workspace", "recent_workspace")]
    default = (places.home if places.platform.startswith("linux") else places.documents) / "comfy" / "ComfyUI"
    for workspace in [Path(os.path.expanduser(p)) for p in named if p] + [default]:
        for folder in (workspace, workspace / "ComfyUI"):
            if is_comfyui_code(folder):
                yield _code_install(folder, "comfy-cli")
                break


def _stability_matrix(places: Places) -> Iterable[ComfyInstall]:
    """Stability Matrix: ``LibraryPath`` in its ``library.json``; every ComfyUI package under Packages/."""
    homes = [places.roaming / "StabilityMatrix"]
    if places.platform == "darwin":  # older releases used ~/.config there too
        homes.append(places.home / ".config" / "StabilityMatrix")
    for home in homes:
        library = _json_value(home / "library.json", "LibraryPath")
        packages = Path(library) / "Packages" if library else None
        if packages and packages.is_dir():
            for package in sorted(packages.iterdir()):
                if is_comfyui_code(package):
                    yield _code_install(package, "Stability Matrix")


def _usual_folders(places: Places) -> Iterable[ComfyInstall]:
    """Checkouts and portable builds where people usually unpack them."""
    bases = [places.home, places.documents, places.home / "Desktop", places.home / "Downloads"]
    if places.platform == "win32":
        bases += [Path(f"{drive}:\\") for drive in "CDEF"]
    for base in bases:
        for folder in (base / "ComfyUI", base / "ComfyUI_windows_portable" / "ComfyUI"):
            if is_comfyui_code(folder):
                yield _code_install(folder)


def find_installs(paths: Iterable[str | Path] = (), places: Places | None = None) -> list[ComfyInstall]:
    """Every ComfyUI install found, one per root: the ``paths`` a user gave first (an error for one
    that is not an install), then ComfyUI Desktop, comfy-cli, Stability Matrix and the usual folders.

    A given path that discovery also found is described as discovery knows it (Desktop's base path
    then comes with Desktop's YAML, which lives elsewhere).
    """
    places = places or Places.here()
    given = [open_install(p) for p in paths]
    discovered: dict[Path, ComfyInstall] = {}
    for source in (_desktop, _comfy_cli, _stability_matrix, _usual_folders):
        for install in source(places):
            discovered.setdefault(install.root.resolve(), install)
    found: dict[Path, ComfyInstall] = {}
    for install in given:
        root = install.root.resolve()
        found.setdefault(root, discovered.get(root, install))
    for root, install in discovered.items():
        found.setdefault(root, install)
    return list(found.values())


def _json_value(path: Path, key: str) -> str | None:
    """``key`` of the JSON object in ``path``, or None when the file is missing or not what we expect."""
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get(key)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None
    return value if isinstance(value, str) and value else None

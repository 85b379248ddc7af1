"""ComfyUI installs: finding them, where they keep models, and exporting verified files into them.

An install is a folder ComfyUI runs from (a git checkout, the Windows portable build, a Stability
Matrix package, a comfy-cli workspace) or ComfyUI Desktop's base path. Its model folders are the
defaults under ``models/`` plus whatever its ``extra_model_paths.yaml`` adds, read the way ComfyUI
reads it (``utils/extra_config.py`` and ``folder_paths.py``), so we agree with ComfyUI on where a
file must go for it to be listed.

Export puts a file into one of those folders the safe way: free space checked first, hard link or
copy to a temporary name beside the target, the result verified (it must load as what it claims to
be), then renamed into place. Nothing is overwritten unless asked, and a failure leaves nothing.
"""

from __future__ import annotations

import configparser
import errno
import json
import os
import secrets
import shutil
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from engine.checkpoint import CheckpointReader, format_bytes
from engine.info import QUANT_METADATA, listed_layers
from engine.int8.rotation import RotationError, check_group, marker_group, parse_marker
from engine.jobs import CancelToken, JobError, OutputExistsError, ProgressFn, Reporter
from engine.lora.files import LoraFile
from engine.models import detect

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
EXPORT_KINDS = ("diffusion_models", "loras")
MODEL_EXTENSIONS = (".safetensors", ".sft")  # the ones ComfyUI lists that are not pickles
EXTRA_PATHS_FILE = "extra_model_paths.yaml"
DESKTOP_PATHS_FILE = "extra_models_config.yaml"
FREE_SPACE_RESERVE = 100_000_000  # never fill a disk to the last byte
COPY_CHUNK = 16 << 20
INT8_FORMAT_PREFIX = "int8"


class ComfyUIError(JobError):
    """An install that cannot be read or a model folder that cannot be used."""


class ExportError(JobError):
    """An export that cannot be done or whose result failed verification; nothing was left behind."""


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


# --- verification -------------------------------------------------------------------------------


def check_int8_layers(reader: CheckpointReader) -> tuple[int, int]:
    """Check what ComfyUI's INT8 loaders need of every int8 weight; return the number of int8 layers
    and how many of them are Hadamard-rotated.

    Each ``L.weight`` of dtype int8 needs a float32 ``L.weight_scale`` of shape ``[]``, ``[1]``,
    ``[out]`` or ``[out, 1]``, and an int8 format marker: the ``L.comfy_quant`` tensor, or its entry
    in the header's ``_quantization_metadata`` (ComfyUI turns one into the other); where both exist
    they must agree, and the metadata may name no layer the file lacks. A rotated layer's group size
    must be a power of 4 that divides its input width.
    """
    listed = _listed_layers(reader)
    count = rotated = 0
    for name, info in reader.tensors.items():
        if info.dtype != "I8" or not name.endswith(".weight"):
            continue
        layer = name.removesuffix(".weight")
        scale = reader.tensors.get(f"{layer}.weight_scale")
        if scale is None:
            raise ExportError(f"int8 weight '{name}' has no '{layer}.weight_scale': the file is incomplete")
        rows = info.shape[0] if info.shape else 1
        if scale.dtype != "F32" or scale.shape not in ((), (1,), (rows,), (rows, 1)):
            raise ExportError(
                f"'{layer}.weight_scale' is {scale.dtype} {list(scale.shape)}; ComfyUI needs F32 of shape "
                f"[], [1], [{rows}] or [{rows}, 1]"
            )
        marker = _comfy_quant(reader, layer)
        entry = listed.get(layer)
        if marker is None and entry is None:
            raise ExportError(
                f"int8 layer '{layer}' has neither a comfy_quant marker nor a {QUANT_METADATA} entry: "
                "ComfyUI would not load it as int8"
            )
        if marker is not None and entry is not None and marker != entry:
            raise ExportError(
                f"int8 layer '{layer}': its comfy_quant marker {marker} disagrees with "
                f"{QUANT_METADATA} {entry}"
            )
        fmt = str((marker or entry).get("format", ""))
        if not fmt.startswith(INT8_FORMAT_PREFIX):
            raise ExportError(f"int8 layer '{layer}' is marked with format '{fmt}', not an int8 format")
        try:
            if group := marker_group(marker or entry):
                check_group(group, info.shape[-1])
        except RotationError as e:
            raise ExportError(f"int8 layer '{layer}' is marked rotated, but {e}") from None
        count += 1
        rotated += bool(group)
    for layer in listed:
        if f"{layer}.weight" not in reader:
            raise ExportError(f"{QUANT_METADATA} lists layer '{layer}', which the file does not have")
    return count, rotated


def _listed_layers(reader: CheckpointReader) -> dict[str, dict]:
    """The header's per-layer entries; {} without the key, an error when it is malformed."""
    if QUANT_METADATA not in reader.metadata:
        return {}
    layers = listed_layers(reader.metadata)
    if layers is None or not all(isinstance(v, dict) for v in layers.values()):
        form = '{"layers": {layer: {...}}}'
        raise ExportError(f"the header's {QUANT_METADATA} is not JSON of the form {form}")
    return layers


def _comfy_quant(reader: CheckpointReader, layer: str) -> dict | None:
    name = f"{layer}.comfy_quant"
    info = reader.tensors.get(name)
    if info is None:
        return None
    try:
        if info.dtype != "U8" or len(info.shape) != 1:
            raise RotationError(name)
        return parse_marker(reader.get(name), name)
    except RotationError:
        raise ExportError(f"'{name}' is not the UTF-8 bytes of a JSON object") from None


def verify_export(path: Path, kind: str) -> str:
    """Open ``path`` the way ComfyUI will use it and return what it holds ("Flux.2 Klein 9B, int8_rowwise").

    A diffusion model must be a recognised architecture whose int8 layers satisfy
    :func:`check_int8_layers`; a LoRA must read as a LoRA. Raises ExportError (or the reader's error).
    """
    if kind == "loras":
        with LoraFile(path) as lora:
            return f"{lora.kinds}, {len(lora.layers)} layers"
    with CheckpointReader(path) as reader:
        int8_layers, rotated = check_int8_layers(reader)
        model = detect(reader)
    what = f"{model.label}, {model.source_format}"
    if rotated:
        needs = "needs a ComfyUI that reads 'convrot'"
        return f"{what} ({int8_layers} int8 layers, {rotated} Hadamard-rotated: {needs})"
    return f"{what} ({int8_layers} int8 layers)" if int8_layers else what


# --- export -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportRequest:
    source: Path
    folder: Path  # the models folder, usually ComfyInstall.export_folder(kind)
    kind: str = "diffusion_models"  # "diffusion_models" | "loras": what the file is checked to be
    name: str | None = None  # file name in the folder; default: the source's
    overwrite: bool = False  # replace a file of that name (never the source itself)
    link: bool = True  # hard-link instead of copying when source and folder share a filesystem


@dataclass(frozen=True)
class ExportResult:
    path: Path
    description: str  # what verification found: "Flux.2 Klein 9B, int8_rowwise (84 int8 layers)"
    size: int
    linked: bool  # a hard link to the source rather than a copy
    already_there: bool = False  # the target already was the source file: nothing was done

    @property
    def summary(self) -> str:
        """``"exported PATH (hard link, 9.2 GB): Flux.2 Klein 9B, int8_rowwise (…)"``."""
        how = "already there" if self.already_there else "hard link" if self.linked else "copy"
        return f"exported {self.path} ({how}, {format_bytes(self.size)}): {self.description}"


def run_export(
    request: ExportRequest, progress: ProgressFn | None = None, cancel: CancelToken | None = None
) -> ExportResult:
    if request.kind not in EXPORT_KINDS:
        raise ExportError(f"cannot export as '{request.kind}'; choose one of: {', '.join(EXPORT_KINDS)}")
    if Path(request.source).is_dir():
        raise ExportError(
            f"{request.source} is a folder; export a single .safetensors file (convert a diffusers model "
            "first)"
        )
    name = request.name or Path(request.source).name
    if Path(name).name != name or not name.lower().endswith(MODEL_EXTENSIONS):
        raise ExportError(f"'{name}' is not a file name ending in .safetensors; choose another name")
    description = verify_export(Path(request.source), request.kind)  # fail before writing anything
    source = Path(request.source).resolve()  # a hub cache entry is a link into its blobs/: export the file
    target, size = Path(request.folder) / name, source.stat().st_size
    if target.exists() and os.path.samefile(source, target):
        return ExportResult(target, description, size, linked=False, already_there=True)
    _refuse_to_overwrite(target, request.overwrite)
    _make_folder(target.parent)
    temp = target.with_name(f".{name}.partial-{secrets.token_hex(4)}")
    report = Reporter(progress, "export", size)
    try:
        linked = request.link and _try_link(source, temp)
        if linked:
            report(size, "hard link")
        else:
            _check_free_space(target.parent, size)
            _copy(source, temp, report, cancel or CancelToken())
        if temp.stat().st_size != size:
            copied = temp.stat().st_size
            raise ExportError(f"the copy of {source} has {copied} bytes, not {size}: a disk error?")
        description = verify_export(temp, request.kind)
        _refuse_to_overwrite(target, request.overwrite)  # it may have appeared meanwhile
        os.replace(temp, target)
    except PermissionError:
        raise ExportError(_permission_message(target.parent, target)) from None
    except OSError as e:
        raise ExportError(f"cannot write {target}: {e.strerror or e}") from e
    finally:
        temp.unlink(missing_ok=True)
    return ExportResult(target, description, size, linked)


def _refuse_to_overwrite(target: Path, overwrite: bool) -> None:
    if target.exists() and not overwrite:
        raise OutputExistsError(target)


def _make_folder(folder: Path) -> None:
    """Create a missing models folder whose parent exists (``models/diffusion_models`` in old installs)."""
    try:
        folder.mkdir(exist_ok=True)
    except FileNotFoundError:
        raise ExportError(
            f"{folder} does not exist, nor does {folder.parent}; check the install or choose another folder"
        ) from None
    except FileExistsError:
        raise ExportError(f"{folder} is a file, not a folder; choose another folder") from None
    except PermissionError:
        raise ExportError(_permission_message(folder)) from None


def _check_free_space(folder: Path, size: int) -> None:
    free = shutil.disk_usage(folder).free
    if free - FREE_SPACE_RESERVE < size:
        raise ExportError(
            f"not enough space in {folder}: the file needs {format_bytes(size)} and {format_bytes(free)} is "
            f"free (keeping {format_bytes(FREE_SPACE_RESERVE)} spare); free up space or choose another folder"
        )


def _try_link(source: Path, temp: Path) -> bool:
    """Hard-link ``source`` as ``temp``; False where that cannot be (another filesystem, or one
    without hard links: then we copy)."""
    try:
        os.link(source, temp)
    except OSError as e:
        if e.errno == errno.EACCES:  # the folder is not writable (EPERM: a filesystem without links)
            raise
        return False
    return True


def _copy(source: Path, temp: Path, report: Reporter, cancel: CancelToken) -> None:
    done = 0
    buffer = bytearray(COPY_CHUNK)
    with open(source, "rb") as fin, open(temp, "xb") as fout:
        while n := fin.readinto(buffer):
            cancel.check()
            fout.write(memoryview(buffer)[:n])
            done += n
            report(done)
        fout.flush()
        os.fsync(fout.fileno())


def _permission_message(folder: Path, target: Path | None = None) -> str:
    if target is not None and target.is_file() and sys.platform == "win32":
        return f"cannot replace {target}: it is in use (close ComfyUI or choose another name)"
    return f"cannot write to {folder}: permission denied; choose another folder or fix its permissions"

"""ComfyUI installs and extra_model_paths.yaml, on fake but realistic install trees: every flavour found
where it installs itself, given paths, the YAML's features and problems, and `int8-studio comfyui find`.
Also the fake installs the other tests share (test_comfyui_export.py, test_hub.py, test_library.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.cli import main
from engine.comfyui import (
    ComfyUIError,
    Places,
    find_installs,
    load_install,
    open_install,
    read_extra_model_paths,
)

# --- fake installs ------------------------------------------------------------------------------


def make_checkout(folder: Path, models: tuple[str, ...] = ("unet", "diffusion_models", "loras")) -> Path:
    """A ComfyUI folder as git leaves it, with a few model folders."""
    (folder / "comfy").mkdir(parents=True)
    (folder / "comfy" / "model_management.py").write_text("")
    (folder / "main.py").write_text("import folder_paths\n")
    (folder / "folder_paths.py").write_text("supported_pt_extensions = set()\n")
    for name in models:
        (folder / "models" / name).mkdir(parents=True)
    return folder


def make_portable(parent: Path) -> Path:
    top = parent / "ComfyUI_windows_portable"
    (top / "python_embeded").mkdir(parents=True)
    (top / "run_nvidia_gpu.bat").write_text(".\\python_embeded\\python.exe -s ComfyUI\\main.py\n")
    return make_checkout(top / "ComfyUI")


def make_desktop(home: Path, places: Places) -> Path:
    """ComfyUI Desktop: models under the base path, config.json and the YAML in the user-data folder."""
    base = home / "Documents" / "ComfyUI"
    for name in ("models/diffusion_models", "models/loras", "user", "input", "output", "custom_nodes"):
        (base / name).mkdir(parents=True)
    user_data = places.roaming / "ComfyUI"
    user_data.mkdir(parents=True)
    (user_data / "config.json").write_text(json.dumps({"installState": "installed", "basePath": str(base)}))
    (user_data / "extra_models_config.yaml").write_text(
        f"comfyui_desktop:\n  is_default: true\n  base_path: {base}\n"
        "  diffusion_models: models/diffusion_models/\n  loras: models/loras/\n  custom_nodes: custom_nodes/\n"
    )
    return base


def make_stability_matrix(home: Path, places: Places) -> tuple[Path, Path]:
    library = home / "StabilityMatrix"
    package = make_checkout(library / "Packages" / "ComfyUI")
    for name in ("DiffusionModels", "Lora", "LyCORIS"):
        (library / "Models" / name).mkdir(parents=True)
    (package / "extra_model_paths.yaml").write_text(
        f"stability_matrix:\n  base_path: {library / 'Models'}\n  diffusion_models: DiffusionModels\n"
        "  loras: |\n    Lora\n    LyCORIS\n"
    )
    (places.roaming / "StabilityMatrix").mkdir(parents=True)
    (places.roaming / "StabilityMatrix" / "library.json").write_text(json.dumps({"LibraryPath": str(library)}))
    return package, library / "Models"


def make_comfy_cli(home: Path, places: Places) -> Path:
    workspace = make_checkout(home / "work" / "comfy-ws")
    (places.local / "comfy-cli").mkdir(parents=True)
    (places.local / "comfy-cli" / "config.ini").write_text(f"[DEFAULT]\ndefault_workspace = {workspace}\n")
    return workspace


def kinds(install, kind: str) -> list[Path]:
    return [f.path for f in install.folders[kind]]


# --- finding installs ---------------------------------------------------------------------------


def test_finds_every_flavour_on_linux(tmp_path):
    home = tmp_path / "home"
    places = Places(home, "linux", {})
    checkout = make_checkout(home / "ComfyUI")
    desktop = make_desktop(home, places)
    package, sm_models = make_stability_matrix(home, places)
    workspace = make_comfy_cli(home, places)
    make_checkout(home / "Downloads" / "not-comfy" / "x")  # somewhere we do not look

    installs = find_installs(places=places)

    assert {(i.flavour, i.root) for i in installs} == {
        ("git checkout", checkout),
        ("ComfyUI Desktop", desktop),
        ("Stability Matrix", package),
        ("comfy-cli", workspace),
    }
    by_flavour = {i.flavour: i for i in installs}
    assert by_flavour["ComfyUI Desktop"].export_folder() == desktop / "models" / "diffusion_models"
    assert by_flavour["ComfyUI Desktop"].config_files == (places.roaming / "ComfyUI" / "extra_models_config.yaml",)
    sm = by_flavour["Stability Matrix"]
    assert kinds(sm, "loras") == [
        package / "models" / "loras", sm_models / "Lora", sm_models / "LyCORIS", package / "output" / "loras"
    ]
    assert sm.export_folder() == package / "models" / "diffusion_models"


def test_finds_portable_and_desktop_on_windows(tmp_path):
    home = tmp_path / "Users" / "ada"
    places = Places(home, "win32", {"APPDATA": str(home / "AppData" / "Roaming")})
    portable = make_portable(home / "Desktop")
    desktop = make_desktop(home, places)

    installs = find_installs(places=places)

    assert [(i.flavour, i.root) for i in installs] == [("ComfyUI Desktop", desktop), ("Windows portable", portable)]
    assert installs[1].export_folder("loras") == portable / "models" / "loras"


def test_nothing_found_in_an_empty_home(tmp_path):
    assert find_installs(places=Places(tmp_path, "darwin", {})) == []


def test_broken_app_configs_are_skipped(tmp_path):
    places = Places(tmp_path, "linux", {})
    (places.roaming / "ComfyUI").mkdir(parents=True)
    (places.roaming / "ComfyUI" / "config.json").write_text("{not json")
    (places.roaming / "StabilityMatrix").mkdir(parents=True)
    (places.roaming / "StabilityMatrix" / "library.json").write_text(json.dumps({"LibraryPath": 3}))
    (places.local / "comfy-cli").mkdir(parents=True)
    (places.local / "comfy-cli" / "config.ini").write_text("no section header\n")
    assert find_installs(places=places) == []


def test_given_paths(tmp_path):
    places = Places(tmp_path / "home", "linux", {})
    checkout = make_checkout(tmp_path / "src" / "ComfyUI")
    portable = make_portable(tmp_path / "apps")
    desktop = make_desktop(places.home, places)

    assert open_install(checkout).flavour == "git checkout"
    assert open_install(portable.parent).root == portable  # the top folder of the portable build
    assert open_install(portable).flavour == "Windows portable"
    # Desktop's base path has no main.py; known from Desktop's config, it comes with Desktop's YAML
    given = find_installs([desktop], places)
    assert (given[0].flavour, given[0].root) == ("ComfyUI Desktop", desktop)
    assert given[0].export_folder() == desktop / "models" / "diffusion_models"
    assert given[0].folders["diffusion_models"][0].is_default
    # unknown to discovery, a folder with models/ is taken as it is
    (tmp_path / "plain" / "models").mkdir(parents=True)
    assert open_install(tmp_path / "plain").flavour == "ComfyUI folder"


def test_given_path_that_is_not_comfyui(tmp_path):
    (tmp_path / "photos").mkdir()
    with pytest.raises(ComfyUIError) as e:
        find_installs([tmp_path / "photos"], Places(tmp_path, "linux", {}))
    assert str(e.value) == (
        f"{tmp_path / 'photos'} is not a ComfyUI folder: it has no main.py, folder_paths.py and comfy/, and no "
        "models/ folder; give the folder that holds main.py (or ComfyUI Desktop's base path)"
    )
    with pytest.raises(ComfyUIError, match=r"missing is not a folder; give the ComfyUI folder \(the one with main.py\)"):
        open_install(tmp_path / "missing")


# --- extra_model_paths.yaml ---------------------------------------------------------------------


def test_yaml_every_feature(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("MODEL_DRIVE", str(tmp_path / "drive"))
    yaml_dir = tmp_path / "ComfyUI"
    yaml_dir.mkdir()
    config = yaml_dir / "extra_model_paths.yaml"
    config.write_text(
        """
a111:
    base_path: ~/stable-diffusion-webui/
    checkpoints: models/Stable-diffusion
    loras: |
         models/Lora
         models/LyCORIS

    unet: models/unet
shared:
    base_path: $MODEL_DRIVE/models
    is_default: true
    diffusion_models: diffusion_models
    ipadapter: ipadapter/sdxl
relative:
    base_path: ../shared-models
    clip: clip
no_base:
    loras: here/loras
    vae: /abs/vae
empty:
"""
    )
    folders = read_extra_model_paths(config)
    webui, drive = home / "stable-diffusion-webui", tmp_path / "drive" / "models"
    assert [(f.kind, f.path, f.is_default, f.origin) for f in folders] == [
        ("checkpoints", webui / "models/Stable-diffusion", False, "extra_model_paths.yaml [a111]"),
        ("loras", webui / "models/Lora", False, "extra_model_paths.yaml [a111]"),
        ("loras", webui / "models/LyCORIS", False, "extra_model_paths.yaml [a111]"),
        ("diffusion_models", webui / "models/unet", False, "extra_model_paths.yaml [a111]"),
        ("diffusion_models", drive / "diffusion_models", True, "extra_model_paths.yaml [shared]"),
        ("ipadapter", drive / "ipadapter/sdxl", True, "extra_model_paths.yaml [shared]"),
        ("text_encoders", tmp_path / "shared-models" / "clip", False, "extra_model_paths.yaml [relative]"),
        ("loras", yaml_dir / "here" / "loras", False, "extra_model_paths.yaml [no_base]"),
        ("vae", Path("/abs/vae"), False, "extra_model_paths.yaml [no_base]"),
    ]


def test_search_order_and_export_target(tmp_path):
    root = make_checkout(tmp_path / "ComfyUI")
    plain = load_install(root, "git checkout")
    # models/unet is searched first, but new files go to models/diffusion_models
    assert kinds(plain, "diffusion_models") == [
        root / "models/unet", root / "models/diffusion_models", root / "output/diffusion_models"
    ]
    assert plain.export_folder() == root / "models" / "diffusion_models"
    assert plain.export_folder("loras") == root / "models" / "loras"

    (root / "extra_model_paths.yaml").write_text(
        f"first:\n  diffusion_models: {tmp_path / 'a'}\n"
        f"second:\n  is_default: true\n  diffusion_models: {root / 'models' / 'diffusion_models'}\n"
        f"third:\n  is_default: true\n  unet: {tmp_path / 'b'}\n  loras: {tmp_path / 'l'}\n"
    )
    install = load_install(root, "git checkout", [root / "extra_model_paths.yaml"])
    # each is_default path goes to the front (a known one moves there), the others to the back;
    # ComfyUI adds output/ after the YAML files
    assert kinds(install, "diffusion_models") == [
        tmp_path / "b", root / "models/diffusion_models", root / "models/unet",
        tmp_path / "a", root / "output/diffusion_models",
    ]  # fmt: skip
    assert install.export_folder() == tmp_path / "b"
    assert install.export_folder("loras") == tmp_path / "l"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("comfyui:\n  base_path: /x\n   loras: y\n", "is not valid YAML (line 3: mapping values are not allowed here)"),
        ("comfyui: [\n", "is not valid YAML (line 2: expected the node content, but found '<stream end>')"),
        ("- a\n- b\n", "must map section names to folder settings, not be a list"),
        ("comfyui: models\n", ": section 'comfyui' must map folder kinds to paths, not be 'models'"),
        (
            "comfyui:\n  loras: [a, b]\n",
            ": 'loras' in section 'comfyui' must be a path, or several with '|' one per line; found ['a', 'b']",
        ),
    ],
)
def test_malformed_yaml(tmp_path, text, problem):
    root = make_checkout(tmp_path / "ComfyUI")
    config = root / "extra_model_paths.yaml"
    config.write_text(text)
    with pytest.raises(ComfyUIError) as e:
        read_extra_model_paths(config)
    assert str(e.value).startswith(f"{config}{'' if problem.startswith(':') else ' '}{problem}")
    # the install is still found, with the problem; choosing where to export is refused
    install = open_install(root)
    assert install.problems == (str(e.value),)
    assert kinds(install, "loras")[0] == root / "models" / "loras"
    with pytest.raises(ComfyUIError, match="extra_model_paths.yaml"):
        install.export_folder()


def test_yaml_not_utf8(tmp_path):
    config = tmp_path / "extra_model_paths.yaml"
    config.write_bytes("comfyui:\n  loras: Modèles\n".encode("latin-1"))
    with pytest.raises(ComfyUIError, match=r"extra_model_paths.yaml is not UTF-8 text; save it as UTF-8$"):
        read_extra_model_paths(config)


# --- CLI ----------------------------------------------------------------------------------------


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A fake home folder: what discovery looks at when the CLI runs."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    return home


def test_cli_comfyui_find(home, capsys):
    places = Places.here()
    checkout = make_checkout(home / "ComfyUI")
    (checkout / "extra_model_paths.yaml").write_text("broken: [\n")
    desktop = make_desktop(home, places)
    assert main(["comfyui", "find"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(
        f"ComfyUI Desktop at {desktop}\n"
        f"  export diffusion_models  {desktop / 'models/diffusion_models'}\n"
        f"  export loras             {desktop / 'models/loras'}\n"
        f"  diffusion_models         {desktop / 'models/diffusion_models'}  "
        "(default, extra_models_config.yaml [comfyui_desktop])\n"
        f"                           {desktop / 'models/unet'}  (missing)\n"
    )
    assert f"\n\ngit checkout at {checkout}\n  diffusion_models         {checkout / 'models/unet'}\n" in out
    assert f"  problem                  {checkout / 'extra_model_paths.yaml'} is not valid YAML (line 2: " in out

    assert main(["comfyui", "find", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert [(i["flavour"], i["export_folders"]) for i in found] == [
        ("ComfyUI Desktop", {"diffusion_models": str(desktop / "models/diffusion_models"),
                             "loras": str(desktop / "models/loras")}),
        ("git checkout", {}),
    ]  # fmt: skip


def test_cli_comfyui_find_nothing(home, capsys):
    assert main(["comfyui", "find"]) == 2
    assert capsys.readouterr().err == (
        "int8-studio: error: no ComfyUI install found in the usual places; give its folder: comfyui find PATH\n"
    )

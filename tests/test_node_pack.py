"""Installing, updating and removing the node pack (engine/node_pack.py) and its CLI, without ComfyUI.

ComfyUI's Python is a fake here: an executable script that answers the installer's probe with the
versions a test sets, records the package installs it is asked for (and prints what pip would) and
answers the verification import as a good (or broken) pack would. pip never runs. The real thing, the
pack installed and loaded by ComfyUI's real server, is tests/test_comfyui_server.py.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import tomllib

from engine.cli import main
from engine.comfyui import ComfyInstall, open_install
from engine.jobs import Progress
from engine.node_pack import (
    NodePackRequest,
    find_comfy_python,
    run_install_node,
    run_remove_node,
    triton_spec,
)
from engine.node_pack_status import (
    MANIFEST,
    NODE,
    PACK_FOLDER,
    NodePackError,
    PackSource,
    node_pack_status,
)

ROOT = Path(__file__).resolve().parents[1]

FAKE_PYTHON = """#!{python}
# A stand-in for ComfyUI's Python: answers INT8 Studio's probe and verification, records pip installs.
import json, os, sys
state_file = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake-python.json")
with open(state_file) as f:
    state = json.load(f)
args = sys.argv[1:]
if args[:3] == ["pip", "install", "--python"]:  # uv's pip, aimed at another (fake) Python
    state_file = os.path.join(os.path.dirname(args[3]), "fake-python.json")
    with open(state_file) as f:
        state = json.load(f)
if "pip" in args[:3]:
    specs = args[args.index("pip") + 2:]
    specs = specs[2:] if specs[:1] == ["--python"] else specs
    state["pip"].append(args)
    with open(state_file, "w") as f:
        json.dump(state, f)
    for spec in specs:
        print("Collecting " + spec, flush=True)
    if state.get("pip_fails"):
        print("ERROR: No matching distribution found for " + specs[0])
        sys.exit(1)
    for spec in specs:
        module = "triton" if spec.startswith("triton") else spec.split(">")[0].split("=")[0]
        state["modules"]["yaml" if module == "pyyaml" else module] = "1.0"
    with open(state_file, "w") as f:
        json.dump(state, f)
    print("Successfully installed " + " ".join(specs))
elif args[:1] == ["-c"] and args[1].startswith("# int8-studio probe"):
    print(json.dumps({{"python": "3.12.9", "platform": state["platform"], "executable": sys.argv[0],
                      "torch": state["torch"], "modules": state["modules"], "pip": state["has_pip"]}}))
elif args[:2] == ["-B", "-c"] and args[2].startswith("# int8-studio verify"):
    if state.get("broken"):
        print("Traceback (most recent call last):", file=sys.stderr)
        print("ImportError: cannot import name 'x' from 'engine'", file=sys.stderr)
        sys.exit(1)
    folder = args[3]
    print(json.dumps({{"nodes": ["{node}"], "engine": os.path.join(folder, "vendor", "engine", "__init__.py"),
                      "app": False}}))
else:
    print("unexpected call: " + repr(args), file=sys.stderr)
    sys.exit(3)
"""

PRESENT = {"triton": "3.5.1", "safetensors": "0.6.2", "numpy": "2.3.0", "psutil": "7.0.0", "yaml": "6.0.2"}


def fake_python(path: Path, platform: str = "linux", torch: str = "2.9.1", cuda: str | None = "12.8",
                missing: tuple[str, ...] = (), has_pip: bool = True) -> Path:  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(FAKE_PYTHON.format(python=sys.executable, node=NODE))
    path.chmod(0o755)
    modules = {m: (None if m in missing else v) for m, v in PRESENT.items()}
    state = {"platform": platform, "torch": {"version": torch, "cuda": cuda, "hip": None}, "modules": modules,
             "has_pip": has_pip, "pip": []}  # fmt: skip
    (path.parent / "fake-python.json").write_text(json.dumps(state))
    return path


def fake_state(python: Path) -> dict:
    return json.loads((python.parent / "fake-python.json").read_text())


def set_state(python: Path, **changes) -> None:
    (python.parent / "fake-python.json").write_text(json.dumps(fake_state(python) | changes))


def fake_comfyui(root: Path) -> Path:
    """A ComfyUI folder as its own code lays it out, with another custom node in custom_nodes/."""
    for folder in ("comfy", "models/diffusion_models", "custom_nodes/someone_elses_nodes"):
        (root / folder).mkdir(parents=True)
    (root / "main.py").write_text("")
    (root / "folder_paths.py").write_text("")
    (root / "custom_nodes/example_node.py.example").write_text("")
    (root / "custom_nodes/someone_elses_nodes/__init__.py").write_text("NODE_CLASS_MAPPINGS = {}\n")
    return root


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture
def comfy(tmp_path) -> tuple[ComfyInstall, Path]:
    """A git checkout with a virtual environment inside (ComfyUI/venv/bin/python: the fake)."""
    root = fake_comfyui(tmp_path / "ComfyUI")
    python = fake_python(root / "venv" / "bin" / "python", missing=("triton",))
    return open_install(root), python


def pack(install: ComfyInstall) -> Path:
    return install.root / "custom_nodes" / PACK_FOLDER


# --- finding ComfyUI's Python -----------------------------------------------------------------


def test_comfyuis_python_is_found_for_every_kind_of_install(tmp_path):
    portable = fake_comfyui(tmp_path / "ComfyUI_windows_portable" / "ComfyUI")
    embedded = fake_python(tmp_path / "ComfyUI_windows_portable" / "python_embeded" / "python.exe")
    found = find_comfy_python(open_install(portable), platform="win32")
    assert found.executable == embedded and "python_embeded" in found.how

    git = fake_comfyui(tmp_path / "git" / "ComfyUI")
    beside = fake_python(tmp_path / "git" / ".venv" / "bin" / "python")
    assert find_comfy_python(open_install(git), platform="linux").executable == beside
    inside = fake_python(git / "venv" / "bin" / "python")  # one in the folder comes first
    assert find_comfy_python(open_install(git), platform="linux").executable == inside
    windows = fake_python(git / "venv" / "Scripts" / "python.exe")
    assert find_comfy_python(open_install(git), platform="win32").executable == windows

    packages = tmp_path / "StabilityMatrix" / "Packages"
    matrix = fake_comfyui(packages / "ComfyUI")
    venv = fake_python(matrix / "venv" / "Scripts" / "python.exe")
    install = open_install(matrix)
    assert install.flavour == "Stability Matrix"
    assert find_comfy_python(install, platform="win32").executable == venv

    base = tmp_path / "Documents" / "ComfyUI"  # ComfyUI Desktop's base path: models/, custom_nodes/, .venv
    (base / "models").mkdir(parents=True)
    desktop_python = fake_python(base / ".venv" / "Scripts" / "python.exe")
    desktop = ComfyInstall(base, "ComfyUI Desktop")
    found = find_comfy_python(desktop, platform="win32")
    assert found.executable == desktop_python and found.how == "ComfyUI Desktop's .venv"

    bare = fake_comfyui(tmp_path / "bare" / "ComfyUI")
    on_path = find_comfy_python(open_install(bare), platform="linux", which=lambda name: f"/usr/bin/{name}")
    assert on_path.executable == Path("/usr/bin/python") and on_path.how == "the python on PATH"
    with pytest.raises(NodePackError, match="--python PATH"):
        find_comfy_python(open_install(bare), platform="linux", which=lambda name: None)


def test_triton_matches_comfyuis_torch():
    assert triton_spec("2.9.1", "linux") == "triton>=3.5,<3.6"
    assert triton_spec("2.10.0", "win32") == "triton-windows>=3.6,<3.7"
    assert triton_spec("2.8.0+cu128", "win32") == "triton-windows>=3.4,<3.5"


# --- installing --------------------------------------------------------------------------------


def test_install_runs_the_exact_pip_command_once_and_streams_its_output(comfy):
    install, python = comfy
    set_state(python, platform="win32")
    reports: list[Progress] = []
    before = listing(install.root / "custom_nodes")
    result = run_install_node(NodePackRequest(install), progress=reports.append)

    command = [str(python), "-m", "pip", "install", "triton-windows>=3.5,<3.6"]
    assert fake_state(python)["pip"] == [command[1:]]
    shown = [r.message for r in reports if r.stage == "Installing packages"]
    assert shown[0] == "$ " + " ".join(command[:-1]) + " 'triton-windows>=3.5,<3.6'"  # as a shell takes it
    assert "Successfully installed triton-windows>=3.5,<3.6" in shown
    assert result.commands == (shown[0][2:],) and result.packages == ("triton-windows>=3.5,<3.6",)
    assert result.summary.startswith(f"installed INT8 Studio nodes v{PackSource.here().version} in {pack(install)}")

    folder = pack(install)
    files = listing(folder)
    assert {"__init__.py", "bootstrap.py", "nodes.py", "vendor/engine/__init__.py", "vendor/engine/int8/ops.py",
            MANIFEST, "workflows/flux2-klein-int8.json", "workflows/api/z-image-int8.json"} <= set(files)  # fmt: skip
    assert not [f for f in files if "__pycache__" in f or f.endswith(".pyc") or f.split("/")[0] == "app"]
    assert (folder / "vendor/engine/node_pack.py").read_bytes() == (ROOT / "engine/node_pack.py").read_bytes()
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["packages_installed"] == ["triton-windows>=3.5,<3.6"] and manifest["python"] == str(python)
    assert node_pack_status(install).summary == f"INT8 Studio nodes: installed v{manifest['version']}"
    # nothing but our folder was added; no temporary folder is left
    assert listing(install.root / "custom_nodes") == sorted(before + [f"{PACK_FOLDER}/{f}" for f in files] + [PACK_FOLDER])

    run_install_node(NodePackRequest(install))  # everything is there now: no second install
    assert len(fake_state(python)["pip"]) == 1


def test_nothing_is_installed_into_comfyuis_python_when_it_has_everything(comfy):
    install, python = comfy
    set_state(python, modules=PRESENT)
    result = run_install_node(NodePackRequest(install))
    assert fake_state(python)["pip"] == [] and result.commands == ()
    set_state(python, modules={**PRESENT, "triton": None}, torch={"version": "2.9.1", "cuda": None, "hip": None})
    run_install_node(NodePackRequest(install))  # a CPU-only torch: no Triton needed
    assert fake_state(python)["pip"] == []


def test_the_portable_builds_python_installs_without_user_site_packages(tmp_path):
    root = fake_comfyui(tmp_path / "ComfyUI_windows_portable" / "ComfyUI")
    python = fake_python(tmp_path / "ComfyUI_windows_portable" / "python_embeded" / "python.exe",
                         platform="win32", missing=("triton", "psutil"))  # fmt: skip
    run_install_node(NodePackRequest(open_install(root)))
    assert fake_state(python)["pip"] == [["-s", "-m", "pip", "install", "triton-windows>=3.5,<3.6", "psutil"]]


def test_without_pip_uv_installs_or_the_message_says_what_to_install(comfy, monkeypatch):
    install, python = comfy
    set_state(python, has_pip=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(NodePackError, match=r"has no pip and no uv is on PATH; install triton>=3.5,<3.6 into it"):
        run_install_node(NodePackRequest(install))
    assert not pack(install).exists()
    uv = fake_python(install.root.parent / "bin" / "uv")  # the fake answers uv's "pip install" the same way
    monkeypatch.setattr(shutil, "which", lambda name: str(uv) if name == "uv" else None)
    reports: list[Progress] = []
    run_install_node(NodePackRequest(install), progress=reports.append)
    assert fake_state(python)["pip"] == [["pip", "install", "--python", str(python), "triton>=3.5,<3.6"]]
    assert any(r.message.startswith(f"$ {uv} pip install --python {python} ") for r in reports)


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({"torch": {"version": "2.6.0", "cuda": "12.4", "hip": None}},
         "ComfyUI's torch is 2.6.0; the INT8 Studio nodes need torch 2.8 or newer. Update ComfyUI (INT8 Studio never installs torch)"),
        ({"torch": {"error": "ModuleNotFoundError: No module named 'torch'"}},
         "cannot import torch (ModuleNotFoundError: No module named 'torch'): it is not the Python that runs ComfyUI"),
        ({"pip_fails": True}, "failed (exit status 1): ERROR: No matching distribution found for triton>=3.5,<3.6"),
        ({"broken": True, "modules": PRESENT}, "the nodes do not import in ComfyUI's Python .*: ImportError: cannot import name 'x'"),
    ],
)  # fmt: skip
def test_a_failed_install_changes_nothing_in_custom_nodes(comfy, state, message):
    install, python = comfy
    set_state(python, **state)
    before = listing(install.root / "custom_nodes")
    with pytest.raises(NodePackError, match=message if "*" in message else None) as error:
        run_install_node(NodePackRequest(install))
    assert "*" in message or message in str(error.value)
    assert listing(install.root / "custom_nodes") == before


def test_an_update_replaces_the_old_version_only_once_the_new_one_is_verified(comfy):
    install, python = comfy
    set_state(python, modules=PRESENT)
    here = PackSource.here()
    run_install_node(NodePackRequest(install, source=PackSource(here.nodes, here.engine, "0.0.9")))
    status = node_pack_status(install)
    assert (status.state, status.action) == ("update available", "Update")
    assert status.summary == f"INT8 Studio nodes: update available (installed v0.0.9, v{here.version} here)"

    set_state(python, broken=True)  # the new version fails its verification: the old one stays
    old = listing(pack(install))
    with pytest.raises(NodePackError):
        run_install_node(NodePackRequest(install))
    assert listing(pack(install)) == old and node_pack_status(install).installed_version == "0.0.9"
    assert [p.name for p in (install.root / "custom_nodes").iterdir() if p.name.startswith(".")] == []

    set_state(python, broken=False)
    stale = install.root / "custom_nodes" / f".{PACK_FOLDER}.partial-0badc0de.disabled"  # a crash left it
    stale.mkdir()
    result = run_install_node(NodePackRequest(install))
    assert result.previous == "0.0.9" and "(was v0.0.9)" in result.summary and result.summary.startswith("updated")
    assert node_pack_status(install).state == "installed" and not stale.exists()
    assert [p.name for p in (install.root / "custom_nodes").iterdir() if p.name.startswith(".")] == []


def test_a_folder_that_intel_studio_did_not_install_is_never_touched(comfy):
    install, _ = comfy
    theirs = pack(install)
    theirs.mkdir()
    (theirs / "__init__.py").write_text("# someone else's\n")
    assert node_pack_status(install).state == "not ours"
    with pytest.raises(NodePackError, match="INT8 Studio did not install it"):
        run_install_node(NodePackRequest(install))
    with pytest.raises(NodePackError, match="was not installed by INT8 Studio"):
        run_remove_node(NodePackRequest(install))
    assert listing(theirs) == ["__init__.py"]


# --- removing ----------------------------------------------------------------------------------


def test_remove_deletes_only_our_folder(comfy):
    install, _ = comfy
    before = listing(install.root / "custom_nodes")
    assert node_pack_status(install).summary == "INT8 Studio nodes: not installed"
    run_install_node(NodePackRequest(install))
    result = run_remove_node(NodePackRequest(install))
    assert listing(install.root / "custom_nodes") == before
    assert result.summary == (
        f"removed INT8 Studio nodes v{PackSource.here().version} from {pack(install)}; restart ComfyUI; "
        "left in ComfyUI's Python: triton>=3.5,<3.6"
    )
    again = run_remove_node(NodePackRequest(install))
    assert again.summary == f"INT8 Studio nodes are not installed in {install.root / 'custom_nodes'}"


# --- the CLI -----------------------------------------------------------------------------------


def test_cli_install_status_and_remove(comfy, capsys):
    install, python = comfy
    assert main(["comfyui", "install-node", "--comfyui", str(install.root)]) == 0
    out, err = capsys.readouterr()
    assert out == f"installed INT8 Studio nodes v{PackSource.here().version} in {pack(install)}; restart ComfyUI to load them\n"
    assert err.splitlines()[:2] == [
        f"$ {python} -m pip install 'triton>=3.5,<3.6'", "Collecting triton>=3.5,<3.6"
    ]  # fmt: skip
    assert main(["comfyui", "node-status", "--comfyui", str(install.root)]) == 0
    assert capsys.readouterr().out.startswith("INT8 Studio nodes: installed v")
    assert main(["comfyui", "remove-node", "--comfyui", str(install.root)]) == 0
    assert capsys.readouterr().out.startswith(f"removed INT8 Studio nodes v{PackSource.here().version} from ")
    assert not pack(install).exists()


def test_cli_errors_are_one_line(comfy, capsys):
    install, python = comfy
    set_state(python, torch={"version": "2.4.0", "cuda": "12.1", "hip": None})
    assert main(["comfyui", "install-node", "--comfyui", str(install.root), "--python", str(python)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("int8-studio: error: ComfyUI's torch is 2.4.0")


def test_package_data_ships_every_workflow():
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    nodes = ROOT / "comfyui_nodes"
    shipped = {p for pattern in package_data["comfyui_nodes"] for p in nodes.glob(pattern)}
    assert shipped == set(nodes.glob("workflows/**/*.json")) and len(shipped) == 6

"""The node pack in ComfyUI's real server (``main.py --cpu``), installed by our own installer.

A fresh ComfyUI tree (``../shared/comfyui``) is unpacked into a temporary folder; ``engine.node_pack``
installs the pack into its ``custom_nodes/`` with this test's Python as ComfyUI's Python (everything the
pack needs is present, so nothing is pip-installed); the server starts on a free local port with its
output, input, temp and user folders in the temporary folder, no browser, no API nodes, an in-memory
database and an empty front-end folder (the front-end package is not needed to serve the HTTP API).

What the server runs, CPU-sized:
- a tiny Flux.2 of the real layout converted to int8 by our converter, loaded by our node; its text
  width is 1024 so that ComfyUI's stock ``LotusConditioning`` (a fixed [1, 77, 1024] embedding, no
  text encoder) can condition it: real text encoders cannot be built offline in seconds (the tree lacks
  their tokenizer files, and their weights are gigabytes);
- ComfyUI's ``KSampler`` for two steps, then ``VAEDecode`` with ``taef2`` (ComfyUI's tiny Flux.2
  autoencoder, through the stock ``VAELoader``), its weights random, made by ComfyUI's own TAESD class;
- ``SaveImage``, whose file must appear.

The shipped example workflows are checked against the server's ``/object_info`` (ComfyUI's real node
registry, our node included as installed). Afterwards the server is stopped, the pack removed (which
must leave ``custom_nodes/`` as it was) and the folder deleted.

torchvision and torchaudio are stand-ins in the server process too (see comfyui_env): a launcher puts
the finder in place and runs ``main.py`` as ``__main__``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

for _package in ("aiohttp", "alembic", "sqlalchemy", "av", "einops", "torchsde", "scipy", "transformers",
                 "comfy_kitchen", "comfy_aimdo", "simpleeval", "blake3", "yarl", "requests"):  # fmt: skip
    pytest.importorskip(_package, reason=f"{_package} is needed by ComfyUI's server (its requirements.txt)")

import torch
from comfyui_env import SHARED, TINY, unpack
from tiny_checkpoints import write_single_file

from engine.comfyui import open_install
from engine.convert import ConvertRequest, run_convert
from engine.demo import random_weights
from engine.models import REGISTRY
from engine.node_pack import NodePackRequest, run_install_node, run_remove_node
from engine.node_pack_status import MANIFEST, PACK_FOLDER, PackSource, node_pack_status

if not (SHARED / "unpack").exists():
    pytest.skip(f"the ComfyUI test tree is missing ({SHARED})", allow_module_level=True)

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parent
WORKFLOWS = PackSource.here().nodes / "workflows"
START_TIMEOUT = 90
RUN_TIMEOUT = 120
TEXT_DIM = 1024  # LotusConditioning's width

LAUNCHER = """# runs ComfyUI's main.py with the tests' stand-ins for torchvision and torchaudio
import os, runpy, sys
tests, tree = sys.argv[1], sys.argv[2]
sys.path.insert(0, tests)
from comfyui_env import _StandIns
sys.meta_path.insert(0, _StandIns())
sys.path.remove(tests)
sys.path.insert(0, tree)
os.chdir(tree)
sys.argv = [os.path.join(tree, "main.py"), *sys.argv[3:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

TAEF2 = """# ComfyUI's tiny Flux.2 autoencoder with random weights, as the two files VAELoader's "taef2" reads
import sys
sys.path.insert(0, sys.argv[1])
from comfyui_env import _StandIns
sys.meta_path.insert(0, _StandIns())
sys.path.insert(0, sys.argv[2])
import torch
torch.manual_seed(0)
import comfy.cli_args
comfy.cli_args.args.cpu = True  # what --cpu sets, before model_management reads it
import comfy.taesd.taesd
from safetensors.torch import save_file
tae = comfy.taesd.taesd.TAESD(latent_channels=128)
for part in ("encoder", "decoder"):
    state = {k: v.contiguous() for k, v in getattr(tae, f"taesd_{part}").state_dict().items()}
    save_file(state, f"{sys.argv[3]}/taef2_{part}.safetensors")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        raise AssertionError(f"POST {url}: {e.code} {e.read().decode(errors='replace')}") from None


class Server:
    def __init__(self, root: Path, tree: Path, process: subprocess.Popen, url: str, log: Path) -> None:
        self.root, self.tree, self.process, self.url, self.log = root, tree, process, url, log

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def tiny_int8_flux2(folder: Path) -> str:
    """Our row-wise int8 file of a tiny Flux.2 whose text input is LotusConditioning's width."""
    config = {**TINY["flux2"], "text_dim": TEXT_DIM}
    tensors = dict(random_weights(REGISTRY["flux2"], config, torch.bfloat16, torch.Generator().manual_seed(0)))
    source = write_single_file(folder.parent / "tiny-flux2.safetensors", "flux2", tensors=tensors).path
    result = run_convert(ConvertRequest(source, output=folder / "tiny-flux2-int8.safetensors", scheme="rowwise", device="cpu"))
    return result.output.name


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("comfyui-server")
    tree = unpack(root)
    before = sorted(p.name for p in (tree / "custom_nodes").iterdir())
    folders = {name: root / name for name in ("output", "input", "temp", "user", "home", "frontend")}
    for folder in folders.values():
        folder.mkdir()
    env = {**os.environ, "HOME": str(folders["home"]), "USERPROFILE": str(folders["home"]),
           "XDG_CONFIG_HOME": str(folders["home"] / ".config"), "XDG_CACHE_HOME": str(folders["home"] / ".cache"),
           "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}  # fmt: skip
    env.pop("PYTHONPATH", None)

    model = tiny_int8_flux2(tree / "models" / "diffusion_models")
    (tree / "models" / "vae_approx").mkdir(exist_ok=True)
    subprocess.run(
        [sys.executable, "-c", TAEF2, str(TESTS), str(tree), str(tree / "models" / "vae_approx")],
        check=True, env=env, cwd=root, capture_output=True, timeout=120,
    )  # fmt: skip

    # the pack as shipped now, copied first: a file edited meanwhile in the working tree changes nothing
    here = PackSource.here()
    for name, path in here.files().items():
        (root / "source" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, root / "source" / name)
    source = PackSource(root / "source", root / "source" / "vendor" / "engine", here.version)
    install = open_install(tree)
    result = run_install_node(NodePackRequest(install, python=Path(sys.executable), source=source))
    assert result.folder == tree / "custom_nodes" / PACK_FOLDER and result.commands == ()  # nothing was missing

    port = free_port()
    log = root / "server.log"
    command = [
        sys.executable, "-c", LAUNCHER, str(TESTS), str(tree), "--cpu", "--listen", "127.0.0.1", "--port", str(port),
        "--disable-auto-launch", "--disable-api-nodes", "--database-url", "sqlite:///:memory:",
        "--output-directory", str(folders["output"]), "--input-directory", str(folders["input"]),
        "--temp-directory", str(folders["temp"]), "--user-directory", str(folders["user"]),
        "--front-end-root", str(folders["frontend"]),
    ]  # fmt: skip
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tree)
    running = Server(root, tree, process, f"http://127.0.0.1:{port}", log)
    running.model, running.before, running.output, running.source = model, before, folders["output"], source
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if process.poll() is not None:
                pytest.fail(f"ComfyUI's server exited with status {process.returncode}:\n{running.log_tail()}")
            with contextlib.suppress(OSError):
                get(f"{running.url}/system_stats")
                break
            if time.monotonic() > deadline:
                pytest.fail(f"ComfyUI's server did not answer within {START_TIMEOUT} s:\n{running.log_tail()}")
            time.sleep(0.25)
        yield running
    finally:
        running.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_the_server_loads_the_installed_pack_with_its_own_engine(server):
    pack = server.tree / "custom_nodes" / PACK_FOLDER
    assert (pack / MANIFEST).is_file() and (pack / "vendor" / "engine" / "int8").is_dir()
    assert not (pack / "app").exists() and not (pack / "vendor" / "app").exists()
    assert node_pack_status(open_install(server.tree), server.source).state == "installed"
    info = get(f"{server.url}/object_info/Int8StudioLoadDiffusionModel")["Int8StudioLoadDiffusionModel"]
    assert info["display_name"] == "Load Diffusion Model (INT8 Studio)"
    assert server.model in info["input"]["required"]["unet_name"][0]
    log = server.log.read_text(errors="replace")
    assert f"engine from {pack / 'vendor' / 'engine'}" in log
    timed = [line for line in log.splitlines() if "seconds" in line and line.rstrip().endswith(str(pack))]
    assert timed and "IMPORT FAILED" not in timed[0]  # ComfyUI's "Import times for custom nodes" list
    assert get(f"{server.url}/workflow_templates").get(PACK_FOLDER) is not None  # the UI workflows, as templates


def _check_inputs(where: str, inputs: dict, spec: dict, sources: dict, object_info: dict) -> None:
    """``inputs`` (name → value or ``[node id, slot]``) against the node's input spec."""
    known = {**spec.get("required", {}), **spec.get("optional", {})}
    assert set(inputs) <= set(known), f"{where}: unknown inputs {sorted(set(inputs) - set(known))}"
    missing = set(spec.get("required", {})) - set(inputs)
    assert not missing, f"{where}: required inputs missing: {sorted(missing)}"
    for name, value in inputs.items():
        kind = known[name][0]
        options = known[name][1].get("options") if kind == "COMBO" and len(known[name]) > 1 else kind
        if isinstance(value, list):  # a link
            source_type = sources[value[0]]
            outputs = object_info[source_type]["output"]
            assert value[1] < len(outputs), f"{where}.{name}: {source_type} has no output {value[1]}"
            assert outputs[value[1]] == kind, f"{where}.{name}: needs {kind}, gets {source_type}'s {outputs[value[1]]}"
        elif isinstance(options, list) and not str(value).endswith(".safetensors"):  # a choice (not a file)
            assert value in options, f"{where}.{name}: {value!r} is not one of ComfyUI's choices"
        elif kind in ("INT", "FLOAT"):
            assert isinstance(value, (int, float)), f"{where}.{name}: {value!r} is not a number"
        elif kind == "STRING":
            assert isinstance(value, str), f"{where}.{name}: {value!r} is not text"


def test_the_shipped_workflows_match_comfyuis_node_registry(server):
    object_info = get(f"{server.url}/object_info")
    api_files = sorted((WORKFLOWS / "api").glob("*.json"))
    ui_files = sorted(WORKFLOWS.glob("*.json"))
    assert {p.name for p in api_files} == {p.name for p in ui_files} == {
        "flux2-klein-int8.json", "chroma-int8.json", "z-image-int8.json"
    }  # fmt: skip
    for api_file, ui_file in zip(api_files, ui_files):
        prompt = json.loads(api_file.read_text())
        sources = {node_id: node["class_type"] for node_id, node in prompt.items()}
        assert "Int8StudioLoadDiffusionModel" in sources.values()
        for node_id, node in prompt.items():
            assert node["class_type"] in object_info, f"{api_file.name}: no node {node['class_type']} in ComfyUI"
            spec = object_info[node["class_type"]]["input"]
            _check_inputs(f"{api_file.name} #{node_id} {node['class_type']}", node["inputs"], spec, sources, object_info)

        ui = json.loads(ui_file.read_text())
        links = {link[0]: link for link in ui["links"]}
        by_id = {n["id"]: n for n in ui["nodes"]}
        assert {str(i): n["type"] for i, n in by_id.items()} == sources, f"{ui_file.name}: not the API graph"
        for node in ui["nodes"]:
            info = object_info[node["type"]]
            order = [n for key in ("required", "optional") for n in info["input_order"].get(key, [])]
            spec = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
            linked = {i["name"] for i in node["inputs"]}
            widgets = []  # the widget values ComfyUI's editor expects, in its order, from the API graph
            for name in order:
                if name in linked or name not in prompt[str(node["id"])]["inputs"]:
                    continue
                widgets.append(prompt[str(node["id"])]["inputs"][name])
                if len(spec[name]) > 1 and spec[name][1].get("control_after_generate"):
                    widgets.append("fixed")
            assert node["widgets_values"] == widgets, f"{ui_file.name} #{node['id']} {node['type']}: widget values"
            for slot in node["inputs"]:
                link = links[slot["link"]]
                assert link[3] == node["id"] and by_id[link[1]]["outputs"][link[2]]["type"] == slot["type"]
                assert [str(link[1]), link[2]] == prompt[str(node["id"])]["inputs"][slot["name"]]


def loader_inputs(info: dict, unet_name: str) -> dict:
    """Our loader's inputs as the editor fills them: ``unet_name``, every other at its default."""
    inputs = {}
    for name, (kind, *options) in info["input"]["required"].items():
        default = (options[0] if options else {}).get("default")
        inputs[name] = unet_name if name == "unet_name" else default if default is not None else kind[0]
    return inputs


def test_a_workflow_through_our_loader_writes_an_image(server):
    node = "Int8StudioLoadDiffusionModel"
    info = get(f"{server.url}/object_info/{node}")[node]
    prompt = {
        "1": {"class_type": node, "inputs": loader_inputs(info, server.model)},
        "2": {"class_type": "LotusConditioning", "inputs": {}},
        "3": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["2", 0]}},
        "4": {"class_type": "EmptyFlux2LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": 7, "steps": 2, "cfg": 2.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}},
        "6": {"class_type": "VAELoader", "inputs": {"vae_name": "taef2"}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["6", 0]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "int8-studio-e2e"}},
    }  # fmt: skip
    prompt_id = post(f"{server.url}/prompt", {"prompt": prompt, "client_id": "int8-studio-tests"})["prompt_id"]
    deadline = time.monotonic() + RUN_TIMEOUT
    while not (entry := get(f"{server.url}/history/{prompt_id}").get(prompt_id)):
        assert server.process.poll() is None, f"the server died:\n{server.log_tail()}"
        assert time.monotonic() < deadline, f"the workflow did not finish in {RUN_TIMEOUT} s:\n{server.log_tail()}"
        time.sleep(0.25)
    status = entry["status"]
    assert status["status_str"] == "success" and status["completed"], f"{status}\n{server.log_tail()}"
    images = entry["outputs"]["8"]["images"]
    assert len(images) == 1 and images[0]["type"] == "output"
    image = server.output / images[0]["subfolder"] / images[0]["filename"]
    assert image.is_file() and image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "int8 layers" in server.log.read_text()  # our loader's log line: its layers ran on our op


def test_removing_the_pack_leaves_comfyui_as_it_was(server):
    server.stop()
    result = run_remove_node(NodePackRequest(open_install(server.tree)))
    assert result.previous is not None and not result.folder.exists()
    assert sorted(p.name for p in (server.tree / "custom_nodes").iterdir()) == server.before

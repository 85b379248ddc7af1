#!/usr/bin/env python3
"""Write the node pack's example workflows (comfyui_nodes/workflows/): each graph below in ComfyUI's UI
format (``workflows/NAME.json``: what the editor opens or has dragged in; ComfyUI lists a custom node's
``workflows/*.json`` among its templates) and in its API format (``workflows/api/NAME.json``: what
``POST /prompt`` takes, kept out of the template list). Run it after changing a graph; the tests
check both files of each against ComfyUI's real node registry (tests/test_comfyui_server.py).

A graph is a list of nodes ``(id, class_type, inputs, outputs)``: ``inputs`` in the order of the node's
INPUT_TYPES, each a widget value or a link ``(node id, output slot)``; ``outputs`` the node's output
types. Model file names are what the official files are called, converted by INT8 Studio (the
``-int8-rowwise`` suffix of ``int8-studio convert``); the text encoders and VAEs are ComfyUI's usual ones.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / "comfyui_nodes" / "workflows"
SEEDED = {("KSampler", "seed"), ("RandomNoise", "noise_seed")}  # widgets with a control_after_generate
LOADER = "Int8StudioLoadDiffusionModel"
PROMPT = (
    "a red fox sitting in a snowy birch forest at dawn, soft golden light, detailed fur, shallow depth of field"
)


def link(node: int, slot: int = 0) -> tuple[int, int]:
    return (node, slot)


def loader(unet_name: str) -> dict:
    """Our loader's inputs: ``unet_name``, the others at their defaults, in the node's own order (read
    from its INPUT_TYPES, with a stand-in for ComfyUI's folder_paths that lists no files)."""
    sys.path.insert(0, str(ROOT))
    stub = types.ModuleType("folder_paths")
    stub.get_filename_list = lambda kind: []
    sys.modules.setdefault("folder_paths", stub)
    from comfyui_nodes import NODE_CLASS_MAPPINGS

    values = {}
    for group in ("required", "optional"):
        for name, (kind, *options) in NODE_CLASS_MAPPINGS[LOADER].INPUT_TYPES().get(group, {}).items():
            default = (options[0] if options else {}).get("default")
            if name == "unet_name":
                values[name] = unet_name
            elif default is not None:
                values[name] = default
            elif group == "required":
                values[name] = kind[0] if isinstance(kind, list) else None
    return values


KLEIN = [
    (1, LOADER, loader("flux-2-klein-4b-int8-rowwise.safetensors"), ["MODEL"]),
    (2, "CLIPLoader", {"clip_name": "qwen_3_4b.safetensors", "type": "flux2", "device": "default"}, ["CLIP"]),
    (3, "CLIPTextEncode", {"text": PROMPT, "clip": link(2)}, ["CONDITIONING"]),
    (4, "ConditioningZeroOut", {"conditioning": link(3)}, ["CONDITIONING"]),
    (5, "CFGGuider", {"model": link(1), "positive": link(3), "negative": link(4), "cfg": 1.0}, ["GUIDER"]),
    (6, "RandomNoise", {"noise_seed": 42}, ["NOISE"]),
    (7, "KSamplerSelect", {"sampler_name": "euler"}, ["SAMPLER"]),
    (8, "Flux2Scheduler", {"steps": 4, "width": 1024, "height": 1024}, ["SIGMAS"]),
    (9, "EmptyFlux2LatentImage", {"width": 1024, "height": 1024, "batch_size": 1}, ["LATENT"]),
    (10, "SamplerCustomAdvanced",
     {"noise": link(6), "guider": link(5), "sampler": link(7), "sigmas": link(8), "latent_image": link(9)},
     ["LATENT", "LATENT"]),
    (11, "VAELoader", {"vae_name": "flux2-vae.safetensors"}, ["VAE"]),
    (12, "VAEDecode", {"samples": link(10), "vae": link(11)}, ["IMAGE"]),
    (13, "SaveImage", {"images": link(12), "filename_prefix": "INT8 Studio/flux2-klein"}, []),
]  # fmt: skip

CHROMA = [
    (1, LOADER, loader("Chroma1-HD-int8-rowwise.safetensors"), ["MODEL"]),
    (2, "CLIPLoader", {"clip_name": "t5xxl_fp16.safetensors", "type": "chroma", "device": "default"}, ["CLIP"]),
    (3, "CLIPTextEncode", {"text": PROMPT, "clip": link(2)}, ["CONDITIONING"]),
    (4, "CLIPTextEncode", {"text": "low quality, blurry, deformed, watermark, text", "clip": link(2)}, ["CONDITIONING"]),
    (5, "EmptySD3LatentImage", {"width": 1024, "height": 1024, "batch_size": 1}, ["LATENT"]),
    (6, "KSampler",
     {"model": link(1), "seed": 42, "steps": 26, "cfg": 4.0, "sampler_name": "euler", "scheduler": "beta",
      "positive": link(3), "negative": link(4), "latent_image": link(5), "denoise": 1.0},
     ["LATENT"]),
    (7, "VAELoader", {"vae_name": "ae.safetensors"}, ["VAE"]),
    (8, "VAEDecode", {"samples": link(6), "vae": link(7)}, ["IMAGE"]),
    (9, "SaveImage", {"images": link(8), "filename_prefix": "INT8 Studio/chroma"}, []),
]  # fmt: skip

ZIMAGE = [
    (1, LOADER, loader("z_image_turbo_bf16-int8-rowwise.safetensors"), ["MODEL"]),
    (2, "ModelSamplingAuraFlow", {"model": link(1), "shift": 3.0}, ["MODEL"]),
    (3, "CLIPLoader", {"clip_name": "qwen_3_4b.safetensors", "type": "lumina2", "device": "default"}, ["CLIP"]),
    (4, "CLIPTextEncode", {"text": PROMPT, "clip": link(3)}, ["CONDITIONING"]),
    (5, "ConditioningZeroOut", {"conditioning": link(4)}, ["CONDITIONING"]),
    (6, "EmptySD3LatentImage", {"width": 1024, "height": 1024, "batch_size": 1}, ["LATENT"]),
    (7, "KSampler",
     {"model": link(2), "seed": 42, "steps": 8, "cfg": 1.0, "sampler_name": "res_multistep", "scheduler": "simple",
      "positive": link(4), "negative": link(5), "latent_image": link(6), "denoise": 1.0},
     ["LATENT"]),
    (8, "VAELoader", {"vae_name": "ae.safetensors"}, ["VAE"]),
    (9, "VAEDecode", {"samples": link(7), "vae": link(8)}, ["IMAGE"]),
    (10, "SaveImage", {"images": link(9), "filename_prefix": "INT8 Studio/z-image"}, []),
]  # fmt: skip

WORKFLOWS = {"flux2-klein-int8": KLEIN, "chroma-int8": CHROMA, "z-image-int8": ZIMAGE}
TITLES = {LOADER: "Load Diffusion Model (INT8 Studio)"}


def api_format(graph: list) -> dict:
    """``{"id": {"class_type", "inputs", "_meta"}}`` with links as ``["id", slot]``."""
    prompt = {}
    for node_id, class_type, inputs, _ in graph:
        values = {k: [str(v[0]), v[1]] if isinstance(v, tuple) else v for k, v in inputs.items()}
        prompt[str(node_id)] = {"class_type": class_type, "inputs": values, "_meta": {"title": TITLES.get(class_type, class_type)}}
    return prompt


def ui_format(graph: list) -> dict:
    """The editor's (LiteGraph) format: nodes with their link inputs, outputs and widget values, links."""
    outputs = {node_id: types for node_id, _, _, types in graph}
    links, ui_nodes, column = [], [], {}
    for node_id, _, inputs, _ in graph:  # column = longest path from a node without link inputs
        sources = [v[0] for v in inputs.values() if isinstance(v, tuple)]
        column[node_id] = 1 + max((column[s] for s in sources), default=-1)
    tops: dict[int, int] = {}  # per column, where its next node goes
    for order, (node_id, class_type, inputs, output_types) in enumerate(graph):
        node_inputs, widgets = [], []
        for name, value in inputs.items():
            if isinstance(value, tuple):
                source, slot = value
                links.append([len(links) + 1, source, slot, node_id, len(node_inputs), outputs[source][slot]])
                node_inputs.append({"name": name, "type": outputs[source][slot], "link": len(links)})
            else:
                widgets.append(value)
                if (class_type, name) in SEEDED:
                    widgets.append("fixed")
        slots = max(len(node_inputs), len(output_types))
        height, top = node_height(class_type, slots, len(widgets)), tops.get(column[node_id], 40)
        tops[column[node_id]] = top + height + 70
        ui_nodes.append({
            "id": node_id, "type": class_type, "pos": [40 + 360 * column[node_id], top],
            "size": [320, height], "flags": {}, "order": order, "mode": 0,
            "inputs": node_inputs,
            "outputs": [{"name": t, "type": t, "links": [], "slot_index": i} for i, t in enumerate(output_types)],
            "properties": {"Node name for S&R": class_type}, "widgets_values": widgets,
        } | ({"title": TITLES[class_type]} if class_type in TITLES else {}))  # fmt: skip
    for link_id, source, slot, *_ in links:
        next(n for n in ui_nodes if n["id"] == source)["outputs"][slot]["links"].append(link_id)
    return {
        "last_node_id": max(n["id"] for n in ui_nodes), "last_link_id": len(links), "nodes": ui_nodes,
        "links": links, "groups": [], "config": {}, "extra": {}, "version": 0.4,
    }  # fmt: skip


def node_height(class_type: str, slots: int, widgets: int) -> int:
    """A node's height in ComfyUI's canvas (below its title) that shows its ``slots`` rows of inputs and
    outputs and its ``widgets`` (a prompt's text box gets more)."""
    return 180 if class_type == "CLIPTextEncode" else 16 + 20 * slots + 24 * widgets


def main() -> None:
    (FOLDER / "api").mkdir(parents=True, exist_ok=True)
    for name, graph in WORKFLOWS.items():
        (FOLDER / "api" / f"{name}.json").write_text(json.dumps(api_format(graph), indent=2) + "\n", encoding="utf-8")
        (FOLDER / f"{name}.json").write_text(json.dumps(ui_format(graph), indent=2) + "\n", encoding="utf-8")
        print(FOLDER / f"{name}.json")


if __name__ == "__main__":
    main()

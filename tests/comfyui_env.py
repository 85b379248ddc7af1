"""ComfyUI's real code in this test process: the tree from ``../shared/comfyui``, imported as
``main.py --cpu`` would, plus what tiny models need to be recognised by its detection.

    tree = unpack(tmp_dir)                 # DEST/ComfyUI, once (a finished tree is reused)
    comfy = import_comfyui(tree)           # comfy.sd, nodes, folder_paths … (ComfyUI's --cpu)
    with tiny_detection(): ...             # ComfyUI recognises the TINY configs below

Nothing here copies ComfyUI code: ComfyUI's modules are imported from the unpacked tree.

torchvision and torchaudio from PyPI do not load beside the CPU torch the tests use; a few ComfyUI
modules import them at module level (VAEs and encoders of other families) and nothing in diffusion
model loading or sampling calls them. While ComfyUI is imported, a meta-path finder answers those
imports with stand-in modules whose attributes are classes that raise when used; afterwards the
finder and the stand-ins leave ``sys.modules`` again, so libraries imported later (diffusers) see the
packages as missing, as they are. ComfyUI's folder goes at the *end* of ``sys.path``, and the
project's ``app`` is imported first: ComfyUI's top-level ``app`` package must not shadow it in later
tests.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import importlib.abc
import importlib.machinery
import math
import os
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "comfyui"
STANDINS = ("torchvision", "torchaudio")

# Tiny models of the real layouts whose shapes ComfyUI's detection reads as these families.
# ComfyUI derives only some sizes from the tensors and hard-codes the rest to the released models'
# (model_detection.detect_unet_config): Flux.2 and Chroma have 128-wide heads (RoPE axes summing to
# 128), Flux.2 128 latent channels in and out and an MLP 3× the width, Chroma 64 channels in and out
# and an MLP 4× the width, an approximator input of 64 (its forward concatenates 16 + 16 + 32
# embedding channels); Flux.1 has 128-wide heads, 16 latent channels in 2×2 patches (64 in and out)
# and an MLP 4× the width; Z-Image is recognised by its width of 3840 alone, and its time embedder is
# 256 → min(dim, 1024) → 256; Chroma Radiance has 3 pixel channels and a pixel head 64 wide, 4 deep,
# 8 DCT frequencies, MLP ratio 4 (tiny_detection reads them off the tensors); Qwen-Image has
# 128-wide heads, 16 latent channels in 2×2 patches and an MLP 4× the width. The sizes below respect all of that; tiny_detection() supplies the rest.
TINY = {
    "flux2": {
        "hidden": 256, "head_dim": 128, "in_channels": 128, "out_channels": 128, "text_dim": 48,
        "mlp_hidden": 768, "double_blocks": 2, "single_blocks": 2, "guidance": False,
    },
    "chroma": {
        "hidden": 256, "head_dim": 128, "in_channels": 64, "out_channels": 64, "text_dim": 48,
        "mlp_hidden": 1024, "double_blocks": 2, "single_blocks": 2, "approximator_in": 64,
        "approximator_hidden": 64, "approximator_layers": 2,
    },
    "chroma_radiance": {
        "hidden": 256, "head_dim": 128, "in_channels": 3, "text_dim": 48, "mlp_hidden": 1024, "double_blocks": 2,
        "single_blocks": 2, "approximator_in": 64, "approximator_hidden": 64, "approximator_layers": 2, "patch": 2,
        "nerf_hidden": 16, "nerf_mlp_ratio": 2, "nerf_depth": 2, "nerf_freqs": 4, "nerf_conv": True,
    },
    "flux1": {
        "hidden": 256, "head_dim": 128, "in_channels": 64, "out_channels": 64, "text_dim": 48, "vec_dim": 24,
        "mlp_hidden": 1024, "double_blocks": 2, "single_blocks": 2, "guidance": True,
    },
    "zimage": {
        "dim": 384, "head_dim": 128, "patch_in": 64, "cap_dim": 48, "ffn_hidden": 1024, "t_mid": 384,
        "adaln_dim": 256, "layers": 2, "refiner_layers": 2,
    },
    "qwen_image": {
        "hidden": 256, "head_dim": 128, "in_channels": 64, "out_channels": 64, "text_dim": 48,
        "mlp_hidden": 1024, "layers": 2,
    },
}  # fmt: skip
LATENT_CHANNELS = {"flux2": 128, "chroma": 16, "chroma_radiance": 3, "flux1": 16, "zimage": 16, "qwen_image": 16}


def unpack(dest: Path) -> Path:
    """``dest/ComfyUI``: the shared tree, unpacked once (under a lock: sessions may share ``dest``)."""
    dest.mkdir(parents=True, exist_ok=True)
    with open(dest / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        out = subprocess.run([str(SHARED / "unpack"), str(dest)], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip())


class _StandIn(types.ModuleType):
    """A module whose every attribute is a class that raises when instantiated or called."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)

        def unavailable(*args, **kwargs):
            raise RuntimeError(f"{self.__name__}.{name} is a test stand-in: the package is not installed")

        cls = type(name, (), {"__init__": unavailable, "__call__": unavailable})
        setattr(self, name, cls)
        return cls


class _StandIns(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, packages: tuple[str, ...] = STANDINS) -> None:
        self.packages = packages

    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in self.packages:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StandIn(spec.name)
        module.__path__ = []
        module.__version__ = "0.0.0"
        return module

    def exec_module(self, module):
        pass


@contextlib.contextmanager
def _stand_ins(packages: tuple[str, ...]) -> Iterator[None]:
    finder = _StandIns(packages)
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
        for name in [n for n in sys.modules if n.split(".")[0] in packages]:
            if isinstance(sys.modules[name], _StandIn):
                del sys.modules[name]


def import_comfyui(
    tree: Path, home: Path, cpu: bool = True, stand_ins: tuple[str, ...] = STANDINS
) -> types.SimpleNamespace:
    """ComfyUI's modules from ``tree``, set up as ``main.py --cpu`` sets them up (``cpu=False``: as
    ``main.py`` on the GPU; ``home`` stands in for the user's home folder while they import), the
    packages in ``stand_ins`` answered by stand-in modules. Once per process: ComfyUI's modules are
    global."""
    if "comfy.sd" in sys.modules:
        loaded = Path(sys.modules["comfy"].__path__[0]).parent
        if loaded != tree:
            raise RuntimeError(f"ComfyUI is already imported from {loaded}")
    else:
        # ComfyUI's folder has top-level packages named like the project's (app): the project's
        # come first, and stay bound once imported whatever order sys.path finds things in later
        with contextlib.suppress(ImportError):
            importlib.import_module("app")
        if str(tree) not in sys.path:
            sys.path.append(str(tree))
        saved = {k: os.environ.get(k) for k in ("HOME", "USERPROFILE", "XDG_CONFIG_HOME", "XDG_CACHE_HOME")}
        os.environ.update(HOME=str(home), USERPROFILE=str(home), XDG_CONFIG_HOME=str(home / ".config"),
                          XDG_CACHE_HOME=str(home / ".cache"))  # fmt: skip
        try:
            with _stand_ins(stand_ins):
                import comfy.cli_args
                import comfy.options

                comfy.options.enable_args_parsing(False)
                comfy.cli_args.args.cpu = cpu  # what --cpu sets, before model_management reads it
                for name in ("comfy.model_management", "comfy.sd", "comfy.sample", "comfy.samplers", "nodes"):
                    importlib.import_module(name)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    import comfy.model_detection
    import comfy.model_management
    import comfy.sd
    import comfy.supported_models
    import folder_paths
    import nodes

    return types.SimpleNamespace(
        sd=comfy.sd, mm=comfy.model_management, nodes=nodes, folder_paths=folder_paths,
        detection=comfy.model_detection, supported=comfy.supported_models,
    )  # fmt: skip


@contextlib.contextmanager
def tiny_detection(comfy: types.SimpleNamespace) -> Iterator[None]:
    """ComfyUI recognises the TINY Chroma, Radiance, Z-Image, Qwen-Image, ERNIE-Image, HiDream-O1 and Anima: the
    sizes its detection hard-codes are read from the tensors instead, and its Z-Image entry matches their width.
    Flux.2 needs nothing. Anima's text adapter, which ComfyUI builds at the release's sizes whatever the file
    holds, is built at the sizes of the file last detected; HiDream-O1's timestep token, whose id ComfyUI
    hard-codes, is the last of a tiny vocabulary."""
    import comfy.ldm.anima.model as anima_model
    import comfy.ldm.hidream_o1.model as hidream_o1_model

    detection, zimage = comfy.detection, comfy.supported.ZImage
    original, original_zimage = detection.detect_unet_config, zimage.unet_config
    original_adapter, adapter_sizes = anima_model.LLMAdapter, {}
    original_tms = hidream_o1_model.TMS_TOKEN_ID

    def detect(state_dict, key_prefix, metadata=None):
        config = original(state_dict, key_prefix, metadata=metadata)
        if config is None:
            return None
        shape = lambda name: tuple(state_dict[f"{key_prefix}{name}"].shape)
        if config.get("image_model") in ("chroma", "chroma_radiance"):
            approximator = "distilled_guidance_layer"
            config["in_dim"] = shape(f"{approximator}.in_proj.weight")[1]
            config["hidden_dim"] = shape(f"{approximator}.in_proj.weight")[0]
            config["out_dim"] = shape(f"{approximator}.out_proj.weight")[0]
            config["n_layers"] = detection.count_blocks(list(state_dict), f"{key_prefix}{approximator}.layers.{{}}.")
        if config.get("image_model") == "chroma_radiance":  # its pixel head's sizes (nerf_*)
            nerf_hidden, nerf_in = shape("nerf_image_embedder.embedder.0.weight")
            config["nerf_hidden_size"], config["nerf_max_freqs"] = nerf_hidden, math.isqrt(nerf_in - 3)
            config["nerf_depth"] = detection.count_blocks(list(state_dict), f"{key_prefix}nerf_blocks.{{}}.")
            config["nerf_mlp_ratio"] = shape("nerf_blocks.0.param_generator.weight")[0] // (3 * nerf_hidden**2)
        if config.get("image_model") == "qwen_image":
            config["num_attention_heads"] = shape("img_in.weight")[0] // shape("transformer_blocks.0.attn.norm_q.weight")[0]
            config["joint_attention_dim"] = shape("txt_norm.weight")[0]
        if config.get("image_model") == "ltxav" and "config" not in (metadata or {}):  # LTX-2's metadata sizes
            caption = shape("caption_projection.linear_1.weight")[1]
            config.update(
                audio_attention_head_dim=shape("audio_patchify_proj.weight")[0] // 32, caption_channels=caption,
                audio_cross_attention_dim=shape("transformer_blocks.0.audio_attn2.to_k.weight")[1],
                connector_num_attention_heads=caption // 32, connector_attention_head_dim=32,
                connector_num_layers=detection.count_blocks(
                    list(state_dict), f"{key_prefix}video_embeddings_connector.transformer_1d_blocks.{{}}."
                ),
            )  # fmt: skip
        if config.get("image_model") == "ernie":  # its detection reads no size at all
            hidden, in_channels, patch, _ = shape("x_embedder.proj.weight")
            config.update(
                hidden_size=hidden, num_attention_heads=hidden // shape("layers.0.self_attention.norm_q.weight")[0],
                num_layers=detection.count_blocks(list(state_dict), f"{key_prefix}layers.{{}}."), in_channels=in_channels,
                ffn_hidden_size=shape("layers.0.mlp.gate_proj.weight")[0], patch_size=patch,
                out_channels=shape("final_linear.weight")[0] // patch**2, text_in_dim=shape("text_proj.weight")[1],
            )  # fmt: skip
        if config.get("image_model") == "hidream_o1":  # its detection reads no size: Qwen3-VL-8B's are defaults
            vocab, hidden = shape("language_model.embed_tokens.weight")
            hidream_o1_model.TMS_TOKEN_ID = original_tms if vocab > original_tms else vocab - 1
            head = shape("language_model.layers.0.self_attn.q_norm.weight")[0]
            config["text_config_overrides"] = dict(
                vocab_size=vocab, hidden_size=hidden, head_dim=head,
                num_hidden_layers=detection.count_blocks(list(state_dict), f"{key_prefix}language_model.layers.{{}}."),
                num_attention_heads=shape("language_model.layers.0.self_attn.q_proj.weight")[0] // head,
                num_key_value_heads=shape("language_model.layers.0.self_attn.k_proj.weight")[0] // head,
                intermediate_size=shape("language_model.layers.0.mlp.gate_proj.weight")[0],
            )  # fmt: skip
            config["vision_config_overrides"] = dict(
                hidden_size=shape("visual.patch_embed.proj.weight")[0],
                intermediate_size=shape("visual.blocks.0.mlp.linear_fc1.weight")[0],
                depth=detection.count_blocks(list(state_dict), f"{key_prefix}visual.blocks.{{}}."),
                num_position_embeddings=shape("visual.pos_embed.weight")[0],
            )  # fmt: skip
        if config.get("image_model") == "anima":  # sizes hard-coded for the 2B (and Cosmos' 14B) only
            adapter, head = "llm_adapter.blocks.0", shape("blocks.0.self_attn.q_norm.weight")[0]
            config.update(
                num_blocks=detection.count_blocks(list(state_dict), f"{key_prefix}blocks.{{}}."),
                num_heads=config["model_channels"] // head,
                crossattn_emb_channels=shape("blocks.0.cross_attn.k_proj.weight")[1],
            )  # fmt: skip
            width = shape(f"{adapter}.self_attn.q_proj.weight")[0]
            adapter_sizes.update(
                source_dim=shape(f"{adapter}.cross_attn.k_proj.weight")[1], target_dim=width, model_dim=width,
                num_layers=detection.count_blocks(list(state_dict), f"{key_prefix}llm_adapter.blocks.{{}}."),
                num_heads=width // shape(f"{adapter}.self_attn.q_norm.weight")[0],
            )  # fmt: skip
        if config.get("image_model") == "lumina2" and config["dim"] == TINY["zimage"]["dim"]:
            dim, head = config["dim"], shape("layers.0.attention.q_norm.weight")[0]
            config.update(
                n_heads=dim // head, n_kv_heads=dim // head, axes_dims=[head // 4, head * 3 // 8, head * 3 // 8],
                axes_lens=[1536, 512, 512], rope_theta=256.0, z_image_modulation=True, time_scale=1000.0,
                ffn_dim_multiplier=shape("layers.0.feed_forward.w1.weight")[0] / dim, pad_tokens_multiple=32,
            )  # fmt: skip
        return config

    detection.detect_unet_config = detect
    zimage.unet_config = {**original_zimage, "dim": TINY["zimage"]["dim"]}
    anima_model.LLMAdapter = lambda **kwargs: original_adapter(**{**kwargs, **adapter_sizes})
    try:
        yield
    finally:
        detection.detect_unet_config = original
        zimage.unet_config = original_zimage
        anima_model.LLMAdapter = original_adapter
        hidream_o1_model.TMS_TOKEN_ID = original_tms

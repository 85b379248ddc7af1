"""Reading LoRA files: which layers a file adapts, with which factors, at which rank and alpha.

Every family stores, per adapted layer, a few tensors under a common key stem::

    lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight      kohya / sd-scripts
    diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight   ComfyUI native, ai-toolkit
    transformer.transformer_blocks.0.attn.to_q.lora_B.weight     diffusers / PEFT
    ….hada_w1_a  ….lokr_w1  ….diff  ….dora_scale  ….alpha        LyCORIS LoHa / LoKr, full diff, DoRA

This module groups keys by stem into :class:`LoraLayer` s and checks that each layer is complete and
self-consistent (from headers only; alphas are read, they are scalars). Which model layer a stem
names is :mod:`engine.lora.mapping`'s business.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.checkpoint import CheckpointReader
from engine.jobs import JobError
from engine.models import detect
from engine.models.spec import natural_key

Shape = tuple[int, ...]


class LoraError(JobError):
    """A LoRA file that cannot be read, does not fit the model, or cannot be applied."""


STRENGTH_LIMIT = 100.0
"""The largest strength (either sign) a LoRA is applied at: 1 is as trained; past a few the change
swamps the weights, and far past this it only multiplies rounding noise or overflows."""


def check_strength(strength: float, name: str) -> float:
    """``strength`` as a float, or a LoraError saying why it cannot be one LoRA ``name`` is applied at:
    the one check of a strength, for the CLI, the app and run-time LoRAs alike."""
    try:
        value = float(strength)
    except (TypeError, ValueError):
        raise LoraError(f"strength {strength!r} of {name} is not a number") from None
    if not math.isfinite(value):
        raise LoraError(f"strength {value} of {name} is not a number; give one between -100 and 100")
    if abs(value) > STRENGTH_LIMIT:
        raise LoraError(
            f"strength {value:g} of {name} is outside -{STRENGTH_LIMIT:g}…{STRENGTH_LIMIT:g}; 1 applies the LoRA "
            "as trained"
        )
    return value


# Key suffix → (kind, role). kind None: an extra that goes with any kind (alpha, DoRA magnitude,
# bias diff). Tucker factors only exist for convolutions, which diffusion transformers do not have.
SUFFIXES: dict[str, tuple[str | None, str]] = {
    "lora_down.weight": ("lora", "down"),
    "lora_up.weight": ("lora", "up"),
    "lora_A.weight": ("lora", "down"),
    "lora_B.weight": ("lora", "up"),
    **{f"hada_{w}": ("loha", w) for w in ("w1_a", "w1_b", "w2_a", "w2_b")},
    **{f"lokr_{w}": ("lokr", w) for w in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b")},
    "diff": ("diff", "diff"),
    "alpha": (None, "alpha"),
    "dora_scale": (None, "dora"),
    "lora_magnitude_vector": (None, "dora"),  # PEFT's name for the DoRA magnitude
    "lora_magnitude_vector.weight": (None, "dora"),
    "diff_b": (None, "bias"),
    **{s: ("tucker", s) for s in ("lora_mid.weight", "hada_t1", "hada_t2", "lokr_t2")},
}
SUFFIXES_BY_ROLE = {
    ("lora", "up"): "lora_up.weight (lora_B.weight)",
    ("lora", "down"): "lora_down.weight (lora_A.weight)",
    **{("loha", role): f"hada_{role}" for role in ("w1_a", "w1_b", "w2_a", "w2_b")},
    **{("lokr", w): f"lokr_{w} (or lokr_{w}_a and lokr_{w}_b)" for w in ("w1", "w2")},
}  # for messages: the keys a layer lacks
_SUFFIX_RE = re.compile(r"^(?P<stem>.+?)\.(?P<suffix>" + "|".join(map(re.escape, SUFFIXES)) + r")$")
KIND_LABELS = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr", "diff": "full diff"}
REQUIRED = {"lora": ("up", "down"), "loha": ("w1_a", "w1_b", "w2_a", "w2_b"), "diff": ("diff",)}
PEFT_METADATA = "lora_adapter_metadata"  # diffusers' safetensors metadata key (JSON LoraConfig)
PEFT_FACTORED = ("LOHA", "LOKR")  # PEFT adapter types whose config names the alpha "alpha"
PEFT_CONFIG = "adapter_config.json"  # what peft's save_pretrained writes beside adapter_model.safetensors


@dataclass(frozen=True)
class LoraLayer:
    """One adapted layer: its tensors by role, the delta's shape, rank and alpha.

    ``kind`` is "lora", "loha", "lokr", "diff", or None for a layer that only shifts the bias.
    ``scale`` is what multiplies the factors' product (alpha / rank, or alpha / √rank for rsLoRA).
    """

    stem: str
    kind: str | None
    keys: dict[str, str]  # role ("up", "down", "w1_a", …, "dora", "bias") → key in the file
    shape: Shape  # shape of the weight delta (out, in); () when there is no weight delta
    rank: int | None
    scale: float
    bias_shape: Shape = ()  # shape of the bias delta (``diff_b``); () when there is none

    @property
    def dora(self) -> str | None:
        return self.keys.get("dora")

    @property
    def bias(self) -> str | None:
        return self.keys.get("bias")

    @property
    def label(self) -> str:
        kind = KIND_LABELS.get(self.kind or "", "bias diff")
        return f"{kind} with DoRA" if self.dora else kind


class LoraFile:
    """A LoRA ``.safetensors`` file opened for reading: its layers by stem.

    ``stray`` are keys that belong to no layer (unknown suffixes). Use as a context manager, or
    :meth:`close`; tensors are read on demand through :meth:`get`.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.reader = CheckpointReader(self.path)
        try:
            self.layers, self.stray = _layers(
                self.reader, self.path.name, _peft_config(self.reader, self.path)
            )
        except BaseException:
            self.reader.close()
            raise
        if not self.layers:
            message = _not_a_lora(self.path.name, self.reader)
            self.reader.close()
            raise LoraError(message)

    @property
    def name(self) -> str:
        return self.path.name

    def get(self, key: str) -> torch.Tensor:
        return self.reader.get(key)

    @property
    def kinds(self) -> str:
        """ "LoRA", "LoKr with DoRA", "LoRA, full diff", … over all layers, most common first."""
        labels = [layer.label for layer in self.layers.values()]
        return ", ".join(sorted(set(labels), key=lambda label: (-labels.count(label), label)))

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(sorted({layer.rank for layer in self.layers.values() if layer.rank}))

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> LoraFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LoraFile({self.name!r}, {len(self.layers)} layers, {self.kinds})"


def _not_a_lora(name: str, reader: CheckpointReader) -> str:
    keys = sorted(reader.keys(), key=natural_key)
    if not keys:
        return f"{name} holds no tensors: it is not a LoRA"
    try:
        return f"{name} is a {detect(reader).label} model, not a LoRA"
    except JobError:
        examples = ", ".join(repr(k) for k in keys[:3])
        return f"{name} holds no LoRA layers ({len(keys)} tensors, e.g. {examples}): it is not a LoRA file"


def _layers(reader: CheckpointReader, file: str, peft: dict) -> tuple[dict[str, LoraLayer], tuple[str, ...]]:
    grouped: dict[str, dict[str, str]] = {}
    kinds: dict[str, set[str]] = {}
    stray = []
    for key in reader:
        m = _SUFFIX_RE.match(key)
        if m is None:
            stray.append(key)
            continue
        kind, role = SUFFIXES[m["suffix"]]
        grouped.setdefault(m["stem"], {})[role] = key
        if kind:
            kinds.setdefault(m["stem"], set()).add(kind)
    layers = {
        stem: _layer(reader, file, stem, keys, kinds.get(stem, set()), peft) for stem, keys in grouped.items()
    }
    return layers, tuple(stray)


def _layer(
    reader: CheckpointReader, file: str, stem: str, keys: dict[str, str], kinds: set[str], peft: dict
) -> LoraLayer:
    def fail(problem: str) -> LoraError:
        return LoraError(f"{file}: layer '{stem}' {problem}: the file is corrupt or incomplete")

    if "tucker" in kinds:
        raise LoraError(
            f"{file}: layer '{stem}' has Tucker-decomposed convolution factors "
            f"({', '.join(sorted(k for k in keys if '_t' in k or 'mid' in k))}); diffusion transformers have "
            "no convolutions to apply them to"
        )
    if len(kinds) > 1:
        raise fail(f"mixes {' and '.join(label for k, label in KIND_LABELS.items() if k in kinds)} factors")
    kind = kinds.pop() if kinds else None
    if kind is None and "bias" not in keys:
        raise fail(f"has only {', '.join(sorted(keys))} and no factors")
    missing = [role for role in REQUIRED.get(kind or "", ()) if role not in keys]
    if kind == "lokr":
        missing = [w for w in ("w1", "w2") if w not in keys and not {f"{w}_a", f"{w}_b"} <= keys.keys()]
    if missing:
        suffixes = {SUFFIXES_BY_ROLE.get((kind, role), role) for role in missing}
        raise fail(f"has no {' and '.join(sorted(suffixes))}")
    shapes = {role: reader.tensors[key].shape for role, key in keys.items()}
    try:
        shape, rank = _shape_and_rank(kind, shapes)
    except ValueError as e:
        raise fail(str(e)) from None
    _check_extras(shapes, shape, fail)
    alpha = _alpha(reader, file, stem, keys, peft) if kind in ("lora", "loha", "lokr") else None
    if alpha is not None and "alpha" not in keys and kind in ("loha", "lokr"):
        rank = _peft_rank(stem, peft) or rank  # PEFT scales by alpha / its r, whatever the factors' shapes
    scale = 1.0
    if rank and alpha is not None:
        scale = alpha / (math.sqrt(rank) if peft.get("use_rslora") else rank)
    return LoraLayer(stem, kind, keys, shape, rank, scale, shapes.get("bias", ()))


def _shape_and_rank(kind: str | None, s: dict[str, Shape]) -> tuple[Shape, int | None]:
    """The weight delta's (out, in) and the rank, checking that the factors fit together."""

    def matrix(role: str) -> Shape:
        shape = s[role]
        if len(shape) == 4 and shape[2:] == (1, 1):  # 1×1 convolution factors are matrices
            shape = shape[:2]
        if len(shape) != 2:
            raise ValueError(f"has a {role} factor of shape {list(s[role])}, not a matrix")
        return shape

    if kind is None:
        return (), None
    if kind == "diff":
        return s["diff"], None
    if kind == "lora":
        (out, r_up), (rank, inp) = matrix("up"), matrix("down")
        if r_up != rank:
            raise ValueError(f"has rank {rank} in its down factor but {r_up} in its up factor")
        return (out, inp), rank
    if kind == "loha":
        (out, r1), (rank, inp), (out2, r2), (r2b, inp2) = (
            matrix(r) for r in ("w1_a", "w1_b", "w2_a", "w2_b")
        )
        if (r1, out2, r2, inp2) != (rank, out, r2b, inp):
            raise ValueError("has Hadamard factors whose shapes do not fit together")
        return (out, inp), rank
    dims, rank = [], None
    for w in ("w1", "w2"):
        if w in s:
            dims.append(matrix(w))
            continue
        (rows, r), (rb, cols) = matrix(f"{w}_a"), matrix(f"{w}_b")
        if r != rb:
            raise ValueError(f"has {w} factors of ranks {r} and {rb}")
        dims.append((rows, cols))
        rank = r  # the last decomposed factor's rank divides alpha, as LyCORIS does
    (a, b), (c, d) = dims
    return (a * c, b * d), rank


def _check_extras(shapes: dict[str, Shape], shape: Shape, fail) -> None:
    if "alpha" in shapes and math.prod(shapes["alpha"]) != 1:
        raise fail(f"has an alpha of shape {list(shapes['alpha'])}, not a number")
    if "dora" in shapes:
        out, inp = shape if len(shape) == 2 else (None, None)
        if shapes["dora"] not in ((out,), (out, 1), (1, inp)):
            raise fail(f"has a DoRA scale of shape {list(shapes['dora'])} for a delta of shape {list(shape)}")
    if "bias" in shapes and len(shapes["bias"]) != 1:
        raise fail(f"has a bias diff of shape {list(shapes['bias'])}")


def _alpha(reader: CheckpointReader, file: str, stem: str, keys: dict[str, str], peft: dict) -> float | None:
    """The layer's alpha: its ``.alpha`` tensor, else PEFT's alpha_pattern / lora_alpha, else None
    (alpha = rank, scale 1)."""
    if "alpha" in keys:
        alpha = float(reader.get(keys["alpha"]).float().reshape(()))
        if not math.isfinite(alpha):
            raise LoraError(f"{file}: layer '{stem}' has alpha {alpha}: the file is corrupt")
        return alpha
    patterns = peft.get("alpha_pattern") or {}
    # PEFT's LoRA config says "lora_alpha"; its LoHa and LoKr configs say "alpha"
    default = peft.get("alpha") if peft.get("peft_type") in PEFT_FACTORED else peft.get("lora_alpha")
    alpha = next((a for p, a in patterns.items() if re.fullmatch(rf"(?:.*\.)?(?:{p})", stem)), default)
    if alpha is None:
        return None
    if not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise LoraError(f"{file}: its PEFT config gives layer '{stem}' alpha {alpha!r}, not a number")
    return float(alpha)


def _peft_rank(stem: str, peft: dict) -> int | None:
    """The rank PEFT's config gives layer ``stem``: its rank_pattern, else r (None without a config)."""
    patterns = peft.get("rank_pattern") or {}
    rank = next((r for p, r in patterns.items() if re.fullmatch(rf"(?:.*\.)?(?:{p})", stem)), peft.get("r"))
    return rank if isinstance(rank, int) and rank > 0 else None


def _peft_config(reader: CheckpointReader, path: Path) -> dict:
    """PEFT's LoraConfig for the transformer: from diffusers' metadata, else peft's adapter_config.json."""
    text, source = reader.metadata.get(PEFT_METADATA), f"{path.name} metadata '{PEFT_METADATA}'"
    if text is None and (path.parent / PEFT_CONFIG).is_file():
        text, source = (path.parent / PEFT_CONFIG).read_text(encoding="utf-8"), str(path.parent / PEFT_CONFIG)
    if text is None:
        return {}
    try:
        config = json.loads(text)
    except ValueError as e:
        raise LoraError(f"{source} is not a valid PEFT LoRA config ({e})") from None
    if not isinstance(config, dict):
        raise LoraError(f"{source} is not a valid PEFT LoRA config (not a JSON object)")
    # diffusers prefixes each component's settings ("transformer.lora_alpha"); peft does not.
    settings = {k.removeprefix("transformer."): v for k, v in config.items()}
    return {k: v for k, v in settings.items() if "." not in k}

"""The one safetensors reader of INT8 Studio (its writer: :mod:`engine.checkpoint_writer`).

:class:`CheckpointReader` opens a ``.safetensors`` file or a sharded diffusers checkpoint, validates
every header before anything is read (so a bad file fails at once with a message a user can act on),
and reads one tensor at a time.

The safetensors format: an 8-byte little-endian header length N, N bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``, then the
data area; offsets are relative to its start.

Headers are read without torch (dtypes are safetensors' names), so that ``inspect`` and the library
start in a fraction of a second; torch is imported when a tensor is read (benchmarks/startup.py).
"""

from __future__ import annotations

import functools
import json
import math
import stat
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from os import stat_result
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import psutil

from engine.jobs import JobError, short
from engine.units import format_bytes  # noqa: F401  (where the engine and the app import it from)

if TYPE_CHECKING:
    import torch

DTYPES: dict[str, tuple[str, int]] = {
    "BOOL": ("bool", 1),
    "U8": ("uint8", 1),
    "I8": ("int8", 1),
    "U16": ("uint16", 2),
    "I16": ("int16", 2),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "U32": ("uint32", 4),
    "I32": ("int32", 4),
    "F32": ("float32", 4),
    "U64": ("uint64", 8),
    "I64": ("int64", 8),
    "F64": ("float64", 8),
    "C64": ("complex64", 8),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "F8_E4M3FNUZ": ("float8_e4m3fnuz", 1),
    "F8_E5M2FNUZ": ("float8_e5m2fnuz", 1),
    "F8_E8M0": ("float8_e8m0fnu", 1),
}
"""safetensors dtype name → (torch's name for it, bytes per element), for every whole-byte dtype both
know: names, so that reading a header needs no torch."""
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F8_E8M0"})
"""The floating-point ones (torch's ``is_floating_point``)."""


@functools.cache
def torch_dtypes() -> dict[str, torch.dtype]:
    """safetensors dtype name → torch dtype (imports torch)."""
    import torch

    return {name: getattr(torch, attr) for name, (attr, _) in DTYPES.items()}


MAX_HEADER_BYTES = 100_000_000
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
INDEX_SUFFIX = ".safetensors.index.json"
# diffusers' own names, preferred when a folder also has variants ("….fp16.safetensors")
DIFFUSERS_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model" + INDEX_SUFFIX)


class CheckpointError(JobError):
    """A checkpoint that cannot be read or written; the message names the file."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: ``nbytes`` bytes at absolute byte ``offset`` of ``file``."""

    name: str
    dtype: str  # safetensors name, "BF16"
    shape: tuple[int, ...]
    file: Path
    offset: int
    nbytes: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtypes()[self.dtype]


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Validate the header of one safetensors file: (tensors in data order, ``__metadata__``).

    Checks everything that can be checked without reading the data: the length is within the file
    and the limit, the JSON is an object, each entry has a known dtype, a shape of non-negative
    integers and a byte range of exactly that size inside the data area, and no two ranges overlap.
    """
    try:
        size = _regular_file(path).st_size
        with open(path, "rb") as f:
            start = f.read(9)
            if _is_pickle(start):
                raise CheckpointError(_pickle_message(path))
            if size == 0:
                raise CheckpointError(f"{path} is empty (0 bytes); download or export it again")
            if size < 8:
                raise CheckpointError(f"{path} is not a safetensors file: it has only {size} bytes")
            if start[:4] == b"GGUF":
                raise CheckpointError(
                    f"{path} is a GGUF file; INT8 Studio reads only .safetensors — use the safetensors original"
                )
            (header_len,) = struct.unpack("<Q", start[:8])
            if header_len > MAX_HEADER_BYTES:
                raise CheckpointError(
                    f"{path} is not a safetensors file or is corrupt: its header length "
                    f"({format_bytes(header_len)}) is over the {format_bytes(MAX_HEADER_BYTES)} limit"
                )
            if 8 + header_len > size:
                raise truncated(path, "the header ends", 8 + header_len, size)
            f.seek(8)
            raw = f.read(header_len)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from e

    def corrupt(what: str) -> CheckpointError:
        return CheckpointError(f"{path} has a corrupt header: {what}; download or export it again")

    if not raw.strip():
        raise corrupt("it is empty")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise corrupt(f"not valid JSON ({e})") from None
    except _DuplicateKey as e:
        raise corrupt(f"the name '{short(e.key)}' appears twice") from None
    except RecursionError:
        raise corrupt("it is nested too deeply to be a list of tensors") from None
    if not isinstance(header, dict):
        raise corrupt(f"it holds {_json_kind(header)}, not a list of tensors")

    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise corrupt("__metadata__ must map strings to strings")

    data_start = 8 + header_len
    infos: list[TensorInfo] = []
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise corrupt(f"the entry of tensor '{short(name)}' is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str):
            raise corrupt(f"tensor '{short(name)}' has no dtype")
        if dtype not in DTYPES:
            raise CheckpointError(
                f"{path}: tensor '{short(name)}' has unknown dtype '{short(dtype)}'; INT8 Studio cannot read it"
            )
        if not is_shape(shape):
            raise corrupt(f"tensor '{short(name)}' has shape {short(repr(shape))}, not a list of non-negative integers")
        if not is_shape(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
            raise corrupt(f"tensor '{short(name)}' has data_offsets {short(repr(offsets))}, not [begin, end]")
        begin, end = offsets
        expected = math.prod(shape) * DTYPES[dtype][1]
        if end - begin != expected:
            raise corrupt(
                f"tensor '{short(name)}' has {end - begin} bytes, but shape {short(str(shape))} of {dtype} needs {expected}"
            )
        infos.append(TensorInfo(name, dtype, tuple(shape), path, data_start + begin, end - begin))

    infos.sort(key=lambda t: t.offset)
    data_end = max((t.offset + t.nbytes for t in infos), default=data_start)
    if data_end > size:
        raise truncated(path, "the data ends", data_end, size)
    reach, last = 0, ""  # the furthest end so far, and whose it is
    for t in infos:
        if t.nbytes == 0:
            continue
        if t.offset < reach:
            raise corrupt(f"tensors '{short(last)}' and '{short(t.name)}' overlap")
        reach, last = t.offset + t.nbytes, t.name
    return {t.name: t for t in infos}, metadata


def truncated(path: Path, what: str, needed: int, size: int) -> CheckpointError:
    """The file ends before ``what`` (at byte ``needed``): sizes in bytes where rounding hides the gap."""
    need, have = format_bytes(needed), format_bytes(size)
    if need == have:
        need, have = f"{needed:,} bytes", f"{size:,} bytes"
    return CheckpointError(
        f"{path} is truncated: the header says {what} at {need}, the file has {have}; download or export it again"
    )


def available_memory() -> int:
    """Bytes of memory the process can still allocate without swapping."""
    return psutil.virtual_memory().available


def check_memory(what: str, nbytes: int) -> None:
    """Refuse, before allocating, work on ``what`` that needs ``nbytes`` of memory than is free (a
    header may declare a huge tensor over a sparse file)."""
    free = available_memory()
    if nbytes > free:
        raise CheckpointError(
            f"{what} needs {format_bytes(nbytes)} of memory, {format_bytes(free)} is free: "
            "the file is damaged, or too large for this computer"
        )


def _regular_file(path: Path) -> stat_result:
    """``path``'s status, refusing what is not a regular file (a FIFO or device would block a read)."""
    status = path.stat()
    if not stat.S_ISREG(status.st_mode):
        raise CheckpointError(f"{path} is not a regular file; give a .safetensors file or a model folder")
    return status


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    return {list: "a list", str: "a text", bool: "true or false", int: "a number", float: "a number"}[type(value)]


class CheckpointReader:
    """A validated, lazy, read-only view of a safetensors checkpoint.

    ``path`` is a ``.safetensors`` file, a diffusers ``*.safetensors.index.json``, a ``transformer/``
    folder holding either, or a model folder with a ``transformer/`` subfolder. Every header is
    validated on open; tensors are read one at a time by :meth:`get`.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            entry = _resolve(self.path)
        except OSError as e:  # a name over the length limit, a folder that cannot be listed, …
            raise CheckpointError(f"cannot open {short(str(self.path))}: {e.strerror or e}") from None
        weight_map = _load_index(entry) if entry.name.endswith(INDEX_SUFFIX) else None
        self.files = [entry] if weight_map is None else _shard_files(entry, weight_map)
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        for i, file in enumerate(self.files):
            tensors, metadata = read_header(file)
            if i == 0:
                self.metadata = metadata
            for name, info in tensors.items():
                if name in self.tensors:
                    raise CheckpointError(
                        f"{file}: tensor '{name}' is also in {self.tensors[name].file.name}; the shards overlap"
                    )
                self.tensors[name] = info
        if weight_map is not None:
            _check_index(entry, weight_map, self.tensors)
        self.config = _read_config(entry.parent / "config.json")
        self._handles: dict[Path, BinaryIO] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> torch.Tensor:
        """Read tensor ``name`` (and only it) into a new CPU tensor.

        A positioned read into fresh memory rather than an mmap view: the caller owns a writable
        tensor, and pages of the file never count towards the process's resident memory.
        """
        import torch

        info = self.tensors[name]
        check_memory(f"tensor '{short(name)}' of {info.file}", info.nbytes)
        try:
            buffer = torch.empty(info.nbytes, dtype=torch.uint8)
        except RuntimeError as e:  # the allocator refused
            raise CheckpointError(f"no memory for tensor '{short(name)}' ({format_bytes(info.nbytes)}): {e}") from None
        self._read_into(info, memoryview(buffer.numpy()))
        return buffer.view(info.torch_dtype).reshape(info.shape)

    def get_bytes(self, name: str) -> bytes:
        """The raw bytes of tensor ``name``, read without torch (a ``comfy_quant`` marker's JSON)."""
        info = self.tensors[name]
        check_memory(f"tensor '{short(name)}' of {info.file}", info.nbytes)
        data = bytearray(info.nbytes)
        self._read_into(info, memoryview(data))
        return bytes(data)

    def _read_into(self, info: TensorInfo, view: memoryview) -> None:
        name = info.name
        done = 0
        try:
            with self._lock:
                f = self._handle(info.file)
                f.seek(info.offset)
                while done < info.nbytes:
                    n = f.readinto(view[done:])
                    if not n:
                        raise CheckpointError(f"{info.file} was truncated while reading '{name}'")
                    done += n
        except OSError as e:
            raise CheckpointError(f"cannot read '{name}' from {info.file}: {e.strerror or e}") from e

    def _handle(self, file: Path) -> BinaryIO:
        if file not in self._handles:
            self._handles[file] = open(file, "rb", buffering=0)  # noqa: SIM115 (closed by close())
        return self._handles[file]

    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def __len__(self) -> int:
        return len(self.tensors)

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    @property
    def total_bytes(self) -> int:
        """Bytes of tensor data (what a conversion reads)."""
        return sum(t.nbytes for t in self.tensors.values())

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CheckpointReader({str(self.path)!r}, {len(self)} tensors, {format_bytes(self.total_bytes)})"


# --- opening ------------------------------------------------------------------------------------


def _resolve(path: Path) -> Path:
    """The checkpoint ``path`` names: a safetensors file or an index."""
    if path.is_dir():
        if (path / "transformer").is_dir():
            return _resolve(path / "transformer")
        return _resolve(_pick_in_folder(path))
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(_pickle_message(path))
    return path


def _pick_in_folder(folder: Path) -> Path:
    """The one checkpoint in a diffusers component folder: an index, else a safetensors file."""
    for pattern in (f"*{INDEX_SUFFIX}", "*.safetensors"):
        found = sorted(p for p in folder.glob(pattern) if not p.name.startswith("."))
        preferred = [p for p in found if p.name in DIFFUSERS_NAMES]
        if len(found) == 1 or len(preferred) == 1:
            return (preferred or found)[0]
        if found:
            names = ", ".join(p.name for p in found)
            raise CheckpointError(f"{folder} has several checkpoints ({names}); open the one you mean")
    pickles = sorted(p for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(_pickle_message(pickles[0]))
    raise CheckpointError(
        f"{folder} is a folder with no safetensors model in it "
        "(expected a .safetensors file, a *.safetensors.index.json or a transformer/ folder)"
    )


def _shard_files(index: Path, weight_map: dict[str, str]) -> list[Path]:
    """The shards an index lists, in name order (= shard number)."""
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        if not (index.parent / shard).is_file():
            raise CheckpointError(f"{index} lists shard {shard}, which is missing; download it again")
    return [index.parent / shard for shard in shards]


def _load_index(index: Path) -> dict[str, str]:
    try:
        _regular_file(index)  # a FIFO would block the read
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise CheckpointError(f"{index} is not a valid safetensors index ({e})") from None
    if (
        not isinstance(weight_map, dict)
        or not weight_map
        or not all(isinstance(v, str) and "/" not in v and "\\" not in v for v in weight_map.values())
    ):
        raise CheckpointError(
            f"{index} is not a valid safetensors index (its weight_map is not name → shard file)"
        )
    return weight_map


def _check_index(index: Path, weight_map: dict[str, str], tensors: dict[str, TensorInfo]) -> None:
    """The index and the shards' headers must agree on which tensor lives where."""
    for name, shard in weight_map.items():
        if name not in tensors:
            raise CheckpointError(f"{index} lists tensor '{name}' in {shard}, which does not have it")
        if tensors[name].file.name != shard:
            raise CheckpointError(
                f"{index} lists tensor '{name}' in {shard}, but it is in {tensors[name].file.name}"
            )
    extra = next((n for n in tensors if n not in weight_map), None)
    if extra is not None:
        raise CheckpointError(f"{index} does not list tensor '{extra}' of {tensors[extra].file.name}")


def _read_config(path: Path) -> dict | None:
    """The diffusers ``config.json`` beside the checkpoint, if there is one."""
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return config


# --- validation helpers -------------------------------------------------------------------------


def _is_pickle(start: bytes) -> bool:
    """torch.save's zip archive, or a raw pickle (protocol 2 and later start with 0x80, protocol).

    A safetensors header length can begin with the same bytes, but its JSON then starts with "{".
    """
    magic = start.startswith(b"PK\x03\x04") or (len(start) >= 2 and start[0] == 0x80 and 2 <= start[1] <= 5)
    return magic and start[8:9] != b"{"


def _pickle_message(path: Path) -> str:
    return (
        f"{path} is a pickle (PyTorch .pt/.ckpt) file; INT8 Studio reads only .safetensors — "
        "convert it to safetensors first"
    )


def is_shape(value: object) -> bool:
    """A safetensors shape: a list of non-negative integers."""
    return isinstance(value, list) and all(type(v) is int and v >= 0 for v in value)


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out

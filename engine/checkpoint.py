"""The one safetensors reader and writer of INT8 Studio.

:class:`CheckpointReader` opens a ``.safetensors`` file or a sharded diffusers checkpoint, validates
every header before anything is read (so a bad file fails at once with a message a user can act on),
and reads one tensor at a time. :class:`CheckpointWriter` streams tensors into a temporary file beside
the target, verifies it and renames it into place, so a failed or cancelled job leaves nothing behind.

The safetensors format: an 8-byte little-endian header length N, N bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``, then the
data area; offsets are relative to its start.
"""

from __future__ import annotations

import errno
import json
import math
import os
import secrets
import shutil
import struct
import threading
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from engine.jobs import JobError, OutputExistsError

DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "U16": torch.uint16,
    "I16": torch.int16,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "U32": torch.uint32,
    "I32": torch.int32,
    "F32": torch.float32,
    "U64": torch.uint64,
    "I64": torch.int64,
    "F64": torch.float64,
    "C64": torch.complex64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
    "F8_E8M0": torch.float8_e8m0fnu,
}
"""safetensors dtype name → torch dtype, for every whole-byte dtype both know."""

DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}

MAX_HEADER_BYTES = 100_000_000
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
INDEX_SUFFIX = ".safetensors.index.json"
# diffusers' own names, preferred when a folder also has variants ("….fp16.safetensors")
DIFFUSERS_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model" + INDEX_SUFFIX)


class CheckpointError(JobError):
    """A checkpoint that cannot be read or written; the message names the file."""


def format_bytes(n: float) -> str:
    """Human size with decimal units, as file managers and download pages show them: "9.2 GB"."""
    if abs(n) < 1000:
        return f"{int(n)} bytes"
    for unit in ("KB", "MB", "GB", "TB"):
        n /= 1000
        if abs(n) < 999.95 or unit == "TB":
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


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
        return DTYPES[self.dtype]


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Validate the header of one safetensors file: (tensors in data order, ``__metadata__``).

    Checks everything that can be checked without reading the data: the length is within the file
    and the limit, the JSON is an object, each entry has a known dtype, a shape of non-negative
    integers and a byte range of exactly that size inside the data area, and no two ranges overlap.
    """
    try:
        size = path.stat().st_size
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
                raise CheckpointError(
                    f"{path} is truncated: the header says the header ends at {format_bytes(8 + header_len)}, "
                    f"the file has {format_bytes(size)}; download or export it again"
                )
            f.seek(8)
            raw = f.read(header_len)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from e

    def corrupt(what: str) -> CheckpointError:
        return CheckpointError(f"{path} has a corrupt header: {what}; download or export it again")

    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise corrupt(f"not valid JSON ({e})") from None
    except _DuplicateKey as e:
        raise corrupt(f"the name '{e.key}' appears twice") from None
    if not isinstance(header, dict):
        raise corrupt(f"a JSON {type(header).__name__}, not an object")

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
            raise corrupt(f"the entry of tensor '{name}' is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str):
            raise corrupt(f"tensor '{name}' has no dtype")
        if dtype not in DTYPES:
            raise CheckpointError(
                f"{path}: tensor '{name}' has unknown dtype '{dtype}'; INT8 Studio cannot read it"
            )
        if not _int_list(shape):
            raise corrupt(f"tensor '{name}' has shape {shape!r}, not a list of non-negative integers")
        if not _int_list(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
            raise corrupt(f"tensor '{name}' has data_offsets {offsets!r}, not [begin, end]")
        begin, end = offsets
        expected = math.prod(shape) * DTYPES[dtype].itemsize
        if end - begin != expected:
            raise corrupt(
                f"tensor '{name}' has {end - begin} bytes, but shape {shape} of {dtype} needs {expected}"
            )
        infos.append(TensorInfo(name, dtype, tuple(shape), path, data_start + begin, end - begin))

    infos.sort(key=lambda t: t.offset)
    data_end = max((t.offset + t.nbytes for t in infos), default=data_start)
    if data_end > size:
        raise CheckpointError(
            f"{path} is truncated: the header says the data ends at {format_bytes(data_end)}, "
            f"the file has {format_bytes(size)}; download or export it again"
        )
    reach, last = 0, ""  # the furthest end so far, and whose it is
    for t in infos:
        if t.nbytes == 0:
            continue
        if t.offset < reach:
            raise corrupt(f"tensors '{last}' and '{t.name}' overlap")
        reach, last = t.offset + t.nbytes, t.name
    return {t.name: t for t in infos}, metadata


class CheckpointReader:
    """A validated, lazy, read-only view of a safetensors checkpoint.

    ``path`` is a ``.safetensors`` file, a diffusers ``*.safetensors.index.json``, a ``transformer/``
    folder holding either, or a model folder with a ``transformer/`` subfolder. Every header is
    validated on open; tensors are read one at a time by :meth:`get`.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        entry = _resolve(self.path)
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
        info = self.tensors[name]
        buffer = torch.empty(info.nbytes, dtype=torch.uint8)
        view = memoryview(buffer.numpy())
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
        return buffer.view(info.torch_dtype).reshape(info.shape)

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


def _int_list(value: object) -> bool:
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


# --- writing ------------------------------------------------------------------------------------

Layout = Mapping[str, tuple[torch.dtype, Sequence[int]]]
DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}  # no space left, or over quota


class CheckpointWriter:
    """Streams tensors into a safetensors file, atomically: the target appears complete or not at all.

    The header comes from the declared ``layout`` (name → (dtype, shape), in file order), so it is
    written first and each tensor goes straight to disk: memory holds one tensor at a time. Bytes go
    to ``.<name>.partial-<random>`` beside the target; :meth:`commit` fsyncs it, re-opens it with
    :class:`CheckpointReader`, checks names, dtypes, shapes, metadata and size, and renames it into
    place. Any failure, :meth:`abort`, leaving a ``with`` block without committing (KeyboardInterrupt
    included) and garbage collection remove the temporary file.

    Wrong names, order, dtypes or shapes are programming errors (``ValueError``); a full disk or an
    existing target are the user's (:class:`CheckpointError`).
    """

    def __init__(
        self,
        target: str | Path,
        layout: Layout,
        metadata: Mapping[str, str] | None = None,
        overwrite: bool = False,
    ) -> None:
        self.target = Path(target)
        self.overwrite = overwrite
        self.metadata = dict(metadata or {})
        self._layout = {name: (dtype, tuple(shape)) for name, (dtype, shape) in layout.items()}
        header = _header(self._layout, self.metadata)
        self.size = len(header) + sum(_nbytes(dtype, shape) for dtype, shape in self._layout.values())

        self._check_target()
        folder = self.target.parent
        if not folder.is_dir():
            raise CheckpointError(f"output folder {folder} does not exist; create it or choose another")
        free = shutil.disk_usage(folder).free
        if free < self.size:
            raise self._no_space(free)
        self.partial = folder / f".{self.target.name}.partial-{secrets.token_hex(4)}"
        try:
            self._file = open(self.partial, "xb", buffering=0)  # noqa: SIM115 (closed by commit or abort)
        except OSError as e:
            raise CheckpointError(f"cannot write to {folder}: {e.strerror or e}") from e
        self._cleanup = weakref.finalize(self, _discard, self._file, self.partial)
        self._pending = iter(self._layout.items())
        self._done = False
        self._write(memoryview(header))

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor``, the next one of the layout, with exactly its declared dtype and shape."""
        if self._done:
            raise ValueError(f"write('{name}') after the writer was committed or aborted")
        expected, (dtype, shape) = next(self._pending, (None, (None, None)))
        if name != expected or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            self.abort()
            if name != expected:
                raise ValueError(f"write('{name}') out of order: the layout's next tensor is {expected!r}")
            raise ValueError(
                f"tensor '{name}' is {tensor.dtype} {list(tensor.shape)}, the layout says {dtype} {list(shape)}"
            )
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        self._write(memoryview(data.numpy()))

    def set_metadata(self, key: str, value: str) -> None:
        """Rewrite metadata ``key`` in the header already on disk, to a value of the same length.

        For values known only once the data is written (a hash of the source computed meanwhile):
        declare ``key`` up front with a placeholder of the final length.
        """
        if self._done:
            raise ValueError(f"set_metadata('{key}') after the writer was committed or aborted")
        header = _header(self._layout, {**self.metadata, key: value})
        if key not in self.metadata or len(header) != len(_header(self._layout, self.metadata)):
            raise ValueError(f"set_metadata('{key}'): declare it up front, with a value of the same length")
        self.metadata[key] = value
        fd = self._file.fileno()
        end = os.lseek(fd, 0, os.SEEK_CUR)
        os.lseek(fd, 0, os.SEEK_SET)
        self._write(memoryview(header))
        os.lseek(fd, end, os.SEEK_SET)

    def commit(self) -> Path:
        """Make the file durable, verify it and rename it to the target; returns the target."""
        if self._done:
            raise ValueError("commit() after the writer was committed or aborted")
        try:
            missing = next(self._pending, None)
            if missing is not None:
                raise ValueError(f"commit() before every tensor was written: '{missing[0]}' is next")
            os.fsync(self._file.fileno())
            self._file.close()
            self._verify()
            self._check_target()
            os.replace(self.partial, self.target)
        except OSError as e:
            self.abort()
            raise CheckpointError(f"cannot write {self.target}: {e.strerror or e}") from e
        except BaseException:
            self.abort()
            raise
        self._cleanup.detach()
        self._done = True
        _fsync_folder(self.target.parent)
        return self.target

    def abort(self) -> None:
        """Close and remove the temporary file. Safe to call more than once."""
        self._done = True
        self._cleanup()

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._done:
            self.abort()

    def _write(self, data: memoryview) -> None:
        """All of ``data`` through ``os.write``; a disk that fills up becomes a CheckpointError."""
        try:
            while data:
                data = data[os.write(self._file.fileno(), data) :]
        except OSError as e:
            self.abort()
            if e.errno in DISK_FULL:
                raise self._no_space(shutil.disk_usage(self.target.parent).free) from e
            raise CheckpointError(f"cannot write {self.target}: {e.strerror or e}") from e
        except BaseException:
            self.abort()
            raise

    def _no_space(self, free: int) -> CheckpointError:
        return CheckpointError(
            f"not enough free space on {self.target.parent}: need {format_bytes(self.size)}, "
            f"{format_bytes(free)} free"
        )

    def _check_target(self) -> None:
        if self.target.is_dir():
            raise CheckpointError(f"output {self.target} is a folder; give a file name")
        if self.target.exists() and not self.overwrite:
            raise OutputExistsError(self.target)

    def _verify(self) -> None:
        """The file reads back as declared: names in order, dtypes, shapes, metadata and size."""
        declared = [(name, dtype, shape) for name, (dtype, shape) in self._layout.items()]
        try:
            with CheckpointReader(self.partial) as reader:
                found = [(t.name, t.torch_dtype, t.shape) for t in reader.tensors.values()]
                problem = (
                    "" if (found, reader.metadata) == (declared, self.metadata) else "its header differs"
                )
        except CheckpointError as e:
            problem = str(e)
        size = self.partial.stat().st_size
        if not problem and size != self.size:
            problem = f"it has {size} bytes, not {self.size}"
        if problem:
            raise CheckpointError(
                f"writing {self.target} failed: the file did not read back as written ({problem}); "
                "nothing was saved — check the disk and try again"
            )


def _header(layout: dict[str, tuple[torch.dtype, tuple[int, ...]]], metadata: dict[str, str]) -> bytes:
    """Length prefix and JSON header, padded with spaces so the data starts 8-byte aligned."""
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError("metadata must map strings to strings")
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, (dtype, shape) in layout.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise ValueError(f"invalid tensor name {name!r}")
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"tensor '{name}': safetensors cannot store {dtype}")
        if not _int_list(list(shape)):
            raise ValueError(f"tensor '{name}': shape {shape!r} is not a list of non-negative integers")
        end = offset + _nbytes(dtype, shape)
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * dtype.itemsize


def _discard(file: BinaryIO, path: Path) -> None:
    """Close and remove the temporary file of a writer that did not commit."""
    file.close()
    path.unlink(missing_ok=True)


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable where folders can be synced (POSIX; best effort)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass  # some network file systems refuse to sync a folder; the file itself is synced

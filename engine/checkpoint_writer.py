"""The one safetensors writer of INT8 Studio: :class:`CheckpointWriter` streams tensors into a temporary
file beside the target, verifies it with :class:`~engine.checkpoint.CheckpointReader` and renames it
into place, so a failed or cancelled job leaves nothing behind.
"""

from __future__ import annotations

import errno
import json
import math
import os
import secrets
import shutil
import struct
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import torch

from engine.checkpoint import CheckpointError, CheckpointReader, format_bytes, is_shape, torch_dtypes
from engine.jobs import TEMPORARY_FILES, OutputExistsError, check_name, temporary_name

Layout = Mapping[str, tuple[torch.dtype, Sequence[int]]]
DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}  # no space left, or over quota
DTYPE_NAMES = {dtype: name for name, dtype in torch_dtypes().items()}
"""torch dtype → safetensors dtype name."""


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
        self.partial = folder / temporary_name(self.target.name, secrets.token_hex(4))
        TEMPORARY_FILES.add(self.partial)  # before it exists: a stop request in between finds it there
        try:
            self._file = open(self.partial, "xb", buffering=0)  # noqa: SIM115 (closed by commit or abort)
        except OSError as e:
            TEMPORARY_FILES.discard(self.partial)
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
            TEMPORARY_FILES.discard(self.partial)
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
        check_name(self.target)
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
        if not is_shape(list(shape)):
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
    try:
        path.unlink(missing_ok=True)
    except OSError:
        return  # a folder made read-only meanwhile: the sweep on the way out tries again
    TEMPORARY_FILES.discard(path)


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

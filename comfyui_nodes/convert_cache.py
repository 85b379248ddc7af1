"""Converting a bf16/fp16/fp32/fp8 diffusion model to int8 when it is loaded, and keeping the result.

:func:`int8_file` returns the file to load for a chosen source: the source itself when it already has
int8 layers, else its conversion, made with the same rules as ``int8-studio convert``
(:func:`engine.convert.run_convert`, the scheme and rotation given) into the cache the first time and
reused after. Hashing an 18 GB file takes as long as converting it, so the cache key is what
identifies the source without reading it, the absolute path, size and modification time (ns), plus
the options and the file format's version; the converter still writes the source's SHA-256 into
the cached file's metadata (``int8_studio.source_sha256``), for anyone who wants to verify it. A
cached file is used only if its header says it was made from a file of the source's name with the
same options. The cache keeps at most ``limit_gb`` (the least recently used files go first; the file
just made or used always stays), and every load says in the log where the file is.

The cache folder is INT8 Studio's own (:func:`engine.paths.cache_dir` ``/comfyui-converted``,
``$INT8_STUDIO_CACHE`` moves it), not ComfyUI's: ComfyUI empties its ``temp`` folder at every start,
which would convert again after each restart, and its ``models`` folders are listed in every model
menu, where converted copies would appear as models of their own.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, fields
from pathlib import Path

from engine import __version__
from engine.checkpoint import CheckpointReader
from engine.convert import METADATA_PREFIX, SHA256_KEY, ConvertRequest, run_convert
from engine.jobs import JobError
from engine.models import detect
from engine.paths import cache_dir

log = logging.getLogger("int8_studio")

_DEFAULTS = {f.name: f.default for f in fields(ConvertRequest)}
DEFAULT_SCHEME: str = _DEFAULTS["scheme"]  # int8-studio convert's defaults
DEFAULT_ROTATE: str = _DEFAULTS["rotate"]
DEFAULT_LIMIT_GB = 40.0
"""The cache's default size: four int8 Flux.2 Klein 9B / Chroma conversions (about 9.5 GB each)."""
KEY_VERSION = 1  # bump when the converter's output for the same options changes


class ConvertOnLoadError(RuntimeError):
    """A source that cannot be converted (the message says why)."""


@dataclass(frozen=True)
class Resolved:
    path: Path  # the file to load
    converted: bool  # made now
    cached: bool  # a conversion from the cache (made now or before)


def folder() -> Path:
    return cache_dir() / "comfyui-converted"


def needs_conversion(path: Path) -> bool:
    """Whether ``path`` is a float or fp8 model (no int8 layers), from its headers."""
    with CheckpointReader(path) as reader:
        try:
            model = detect(reader)
        except JobError:
            return False  # not a model the converter knows: ComfyUI loads it as it is (or says why not)
        return not model.int8_layers


def cache_key(path: Path, scheme: str, rotate: str) -> str:
    stat = path.stat()
    identity = [
        str(path.resolve()),
        stat.st_size,
        stat.st_mtime_ns,
        scheme,
        rotate,
        KEY_VERSION,
    ]
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]


def cached_name(path: Path, scheme: str, rotate: str) -> str:
    stem = path.name.removesuffix(".safetensors")
    suffix = "" if rotate == "none" else f"-rot{rotate}"
    return f"{stem}-int8-{scheme}{suffix}.{cache_key(path, scheme, rotate)}.safetensors"


def int8_file(
    path: str | os.PathLike,
    scheme: str = DEFAULT_SCHEME,
    rotate: str = DEFAULT_ROTATE,
    limit_gb: float = DEFAULT_LIMIT_GB,
    progress=None,
) -> Resolved:
    """The int8 file to load for ``path`` (module docstring); ``progress(done, total)`` while converting."""
    path = Path(path)
    if not needs_conversion(path):
        return Resolved(path, converted=False, cached=False)
    target_dir = folder()
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / cached_name(path, scheme, rotate)
    if target.exists() and _matches(target, path, scheme, rotate):
        os.utime(target)  # its place in the least-recently-used order
        log.info(
            "INT8 Studio: %s: using its int8 conversion (%s, rotation %s) from the cache: %s",
            path.name,
            scheme,
            rotate,
            target,
        )
        _evict(target_dir, limit_gb, keep=target)
        return Resolved(target, converted=False, cached=True)
    log.info(
        "INT8 Studio: converting %s to int8 (%s, rotation %s) into the cache: %s",
        path.name,
        scheme,
        rotate,
        target,
    )
    started = time.monotonic()
    report = None if progress is None else (lambda p: progress(p.done, p.total))
    try:
        result = run_convert(
            ConvertRequest(
                path, output=target, scheme=scheme, rotate=rotate, overwrite=True
            ),
            progress=report,
        )
    except JobError as e:
        raise ConvertOnLoadError(
            f"{path.name} cannot be converted to int8: {e}"
        ) from None
    log.info(
        "INT8 Studio: %s converted in %.0f s (%d int8 layers, %.1f GB); cached at %s",
        path.name, time.monotonic() - started, result.quantized, result.bytes_out / 1e9, target,
    )  # fmt: skip
    _evict(target_dir, limit_gb, keep=target)
    return Resolved(target, converted=True, cached=True)


def _matches(cached: Path, source: Path, scheme: str, rotate: str) -> bool:
    """Whether the cached file's header says it is ``source`` converted with these options."""
    try:
        with CheckpointReader(cached) as reader:
            meta = reader.metadata
    except (OSError, JobError):
        return False
    return (
        meta.get(METADATA_PREFIX + "source_name") == source.name
        and meta.get(METADATA_PREFIX + "scheme") == scheme
        and meta.get(METADATA_PREFIX + "rotate", "none") == rotate
        and bool(meta.get(SHA256_KEY))
        and meta.get(METADATA_PREFIX + "version") == __version__
    )


def _evict(directory: Path, limit_gb: float, keep: Path) -> None:
    """Delete the least recently used conversions until the folder holds at most ``limit_gb``."""
    files = sorted(directory.glob("*.safetensors"), key=lambda f: f.stat().st_mtime_ns)
    total = sum(f.stat().st_size for f in files)
    limit = limit_gb * 1e9
    for f in files:
        if total <= limit:
            break
        if f == keep:
            continue
        size = f.stat().st_size
        try:
            f.unlink()
        except OSError as e:  # in use (Windows keeps mapped files), or gone already
            log.warning(
                "INT8 Studio: could not remove %s from the conversion cache: %s", f, e
            )
            continue
        total -= size
        log.info(
            "INT8 Studio: removed %s from the conversion cache (over its %g GB limit)",
            f.name,
            limit_gb,
        )
    if total > limit:
        log.warning(
            "INT8 Studio: the conversion cache (%s) holds %.1f GB, over its %g GB limit: the file in use is kept",
            directory, total / 1e9, limit_gb,
        )  # fmt: skip

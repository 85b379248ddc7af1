"""The GEMM tuner: the fastest correct :class:`~engine.int8.kernels.tiles.TileConfig` per shape and
epilogue, found on first use and kept on disk, and the float32 reference every candidate must match."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import tempfile
import threading
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import torch
import triton

from engine.heads import QKNormRope, attention_inputs, rope_of
from engine.int8.kernels.launcher import launch_scaled_mm
from engine.int8.kernels.runtime import AsyncCompileMode
from engine.int8.kernels.tiles import ARCH_CONFIGS, TileConfig, arch_of, candidate_configs, m_bucket, stacked_halves, usable
from engine.int8.operands import Epilogue
from engine.paths import cache_dir

CHECK_TOKENS = 32
"""Tokens (output rows), spread over M, that every tuning candidate must reproduce (``GemmTuner._benchmark``)."""


def reference_output(
    tokens: torch.Tensor, q, x_scale, w, w_scale, epilogue: Epilogue = Epilogue(), dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The GEMM's output for ``tokens`` (indices into q's rows) in float32 PyTorch, for an output in
    ``dtype`` (a gated GEMM rounds both products to it; attention's inputs come in the projection's
    layout, :func:`projection_layout`). The weight is widened a block of channels at a time (at most
    2²⁴ values, 64 MB), never as a whole."""
    bias, lora, up, heads, up_lora = epilogue
    if heads is not None:
        pe = rope_of(heads.tables)
        norm = QKNormRope(*heads.norm, heads.eps, pe[tokens % pe.shape[0]][:, None, None])
        projected = reference_output(tokens, q, x_scale, w, w_scale, Epilogue(bias, lora)).to(dtype)
        return torch.stack(attention_inputs(projected[:, None], norm), dim=1).flatten(1).float()
    if up is not None:
        gate = reference_output(tokens, q, x_scale, w, w_scale, Epilogue(bias, lora)).to(dtype).float()
        product = reference_output(tokens, q, x_scale, up.w_int8, up.w_scale, Epilogue(up.bias, up_lora))
        product = product.to(dtype).float()
        return torch.nn.functional.silu(gate) * product
    x = q[tokens].float()
    block = max(1, 2**24 // w.shape[1])
    acc = torch.cat([x @ part.float().t() for part in w.split(block)], dim=1)
    out = acc * x_scale[tokens].float()[:, None] * w_scale.float().reshape(-1)
    if bias is not None:
        out += bias.float()
    if lora is not None:
        out += (lora.x[tokens].float() * lora.scale.float()) @ lora.up.float().t()
    return out


def projection_layout(out: torch.Tensor) -> torch.Tensor:
    """Attention's inputs [3, batch, tokens, heads, head] (``Epilogue.heads``) back in the projection's
    layout [batch · tokens, 3 · heads · head] (a copy)."""
    three, batch, tokens, heads, head = out.shape
    return out.permute(1, 2, 0, 3, 4).reshape(batch * tokens, three * heads * head)


def agrees(out: torch.Tensor, expected: torch.Tensor) -> bool:
    """Whether a kernel's ``out`` is ``expected`` (float32) up to rounding: within 2⁻⁶ of each value plus
    2⁻⁸ of its token's largest (the kernel rounds the low-rank term's inputs to bf16). Loose for a precision
    test, tight enough to catch a miscompiled kernel; NaN and ±Inf must match exactly."""
    want = expected.to(out.dtype).float()
    got = out.float()
    finite = want.isfinite()
    row_max = want.abs().where(finite, 0).amax(dim=1, keepdim=True)
    close = (got - want).abs() <= want.abs() * 2**-6 + row_max * 2**-8
    same = (got == want) | (got.isnan() & want.isnan())
    return bool(torch.where(finite, close, same).all())


def epilogue_kind(w: torch.Tensor, epilogue: Epilogue) -> str:
    """What the GEMM computes beyond the plain product, as its tuning key names it (the names are in
    users' cache files): ``""``, ``"glu"`` for a gated GEMM, ``"glu-stacked"`` where the up weight
    follows or precedes ``w`` in memory (:func:`~engine.int8.kernels.tiles.stacked_halves`),
    ``"heads<size>"`` for attention's inputs."""
    if epilogue.heads is not None:
        return f"heads{epilogue.heads.size}"
    if epilogue.up is None:
        return ""
    return "glu-stacked" if stacked_halves(w, epilogue.up.w_int8) else "glu"


def epilogue_key(w: torch.Tensor, epilogue: Epilogue) -> str:
    """The epilogue's part of a tuning key: ``",lora<element size>"`` with a low-rank term on either
    product (its factors' tiles change how much shared memory a config needs), then ``",<kind>"``
    (:func:`epilogue_kind`), whose kernels differ; ``""`` for a plain GEMM (with or without a bias)."""
    low_rank = epilogue.lora if epilogue.lora is not None else epilogue.up_lora
    if low_rank is None and epilogue.up is None and epilogue.heads is None:
        return ""
    lora = f",lora{low_rank.up.element_size()}" if low_rank is not None else ""
    kind = epilogue_kind(w, epilogue)
    return lora + (f",{kind}" if kind else "")


def default_cache_path() -> Path:
    return cache_dir() / "gemm-configs.json"


class GemmTuner:
    """Picks the fastest :class:`TileConfig` per (device, M bucket, N, K, epilogue) and remembers it on disk.

    The first call of a new shape benchmarks the architecture's candidates on the call's own data
    (a few milliseconds each, after Triton has compiled them all at once: :func:`precompile`), then
    writes the winner to a JSON file keyed by GPU name, Triton version and candidate list. Later
    processes read the file and never re-tune (until one of those changes). Warp-specialized configs
    are not tried for a GEMM with a low-rank term (the epilogue's extra MMA is untested in a
    specialized loop) nor for a gated one (:func:`~engine.int8.kernels.tiles.gated_config`).
    During CUDA graph capture nothing can be timed, so an untuned shape gets its first candidate.
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or default_cache_path()
        self._lock = threading.Lock()
        self._table: dict[str, dict] | None = None
        self._devices: dict[int, tuple[str, int]] = {}  # index -> (cache key, multiprocessors)
        self._chosen: dict[tuple[int, int, int, int, int, str], TileConfig] = {}  # the per-call fast path

    def _device(self, device: torch.device) -> tuple[str, int]:
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in self._devices:
            props = torch.cuda.get_device_properties(index)
            candidates = zlib.crc32(repr(ARCH_CONFIGS[arch_of(device)]).encode())  # new candidates: tune again
            name = f"{props.name}|triton {triton.__version__}|candidates {candidates:08x}"
            self._devices[index] = (name, props.multi_processor_count)
        return self._devices[index]

    def num_sms(self, device: torch.device) -> int:
        return self._device(device)[1]

    def _load(self) -> dict[str, dict]:
        if self._table is None:
            try:
                self._table = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self._table = {}
        return self._table

    def _save(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".gemm-configs-")
            with os.fdopen(fd, "w") as f:
                json.dump(self._table, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError:
            pass  # a read-only cache only costs tuning time next run

    @staticmethod
    def _key(m: int, n: int, k: int, out_bytes: int, epilogue: str) -> str:
        """``"M bucket,N,K"``, plus the output's element size unless 2 (a staged fp32 tile needs more shared
        memory), then the epilogue's part (:func:`epilogue_key`)."""
        out = f",out{out_bytes}" if out_bytes != 2 else ""
        return f"{m_bucket(m)},{n},{k}{out}{epilogue}"

    def cached(self, device: torch.device, m: int, n: int, k: int, out_bytes: int = 2, epilogue: str = "") -> TileConfig | None:
        """The remembered config for this shape's bucket, output size and epilogue (:func:`epilogue_key`), if any."""
        key = (device.index or 0, m_bucket(m), n, k, out_bytes, epilogue)
        if key not in self._chosen:
            with self._lock:
                found = self._load().get(self._device(device)[0], {}).get(self._key(*key[1:]))
            if not found:
                return None
            self._chosen[key] = TileConfig(**found)
        return self._chosen[key]

    def config_for(self, q, x_scale, w, w_scale, out, epilogue: Epilogue = Epilogue()) -> TileConfig:
        M, K = q.shape
        N = w.shape[0]
        sizes = (out.element_size(), epilogue_key(w, epilogue))
        found = self.cached(q.device, M, N, K, *sizes)
        if found:
            return usable(found, q, w, out, epilogue.up)
        head = epilogue.heads.size if epilogue.heads is not None else 0
        configs = candidate_configs(arch_of(q.device), M, gated=epilogue.up is not None, head=head)
        no_lora = epilogue.lora is None and epilogue.up_lora is None
        candidates = [usable(c, q, w, out, epilogue.up) for c in configs if no_lora or not c.warp_specialize]
        candidates = list(dict.fromkeys(candidates))
        if torch.cuda.is_current_stream_capturing():
            return candidates[0]
        best = self._benchmark(candidates, q, x_scale, w, w_scale, out, epilogue)
        with self._lock:
            self._load().setdefault(self._device(q.device)[0], {})[self._key(M, N, K, *sizes)] = asdict(best)
            self._save()
        return best

    def _benchmark(self, candidates, q, x_scale, w, w_scale, out, epilogue: Epilogue) -> TileConfig:
        """The fastest candidate among those that compile and reproduce a PyTorch reference on a few tokens:
        a config that a compiler bug makes compute wrong values is dropped with a warning, not chosen."""
        (M, K), N = q.shape, w.shape[0]
        tokens = torch.linspace(0, M - 1, min(CHECK_TOKENS, M), device=q.device).round().long().unique()
        expected = reference_output(tokens, q, x_scale, w, w_scale, epilogue, out.dtype)
        timings = {}
        args = (q, x_scale, w, w_scale, out, epilogue, self.num_sms(q.device))
        precompile(candidates, *args)
        for config in candidates:
            run = functools.partial(launch_scaled_mm, config, *args)
            try:
                timing = triton.testing.do_bench(run, warmup=5, rep=20)
            except torch.OutOfMemoryError:  # the GPU's memory, not the config: the caller's to handle
                raise
            except Exception:  # noqa: BLE001, S112 - out of shared memory, or a feature this GPU/Triton lacks
                continue
            if agrees((out if epilogue.heads is None else projection_layout(out))[tokens], expected):
                timings[config] = timing
            else:
                warnings.warn(f"int8 GEMM: {config} computed wrong values for M={M}, N={N}, K={K}; not used",
                              RuntimeWarning, stacklevel=2)
        if not timings:
            raise RuntimeError(f"no int8 GEMM configuration compiles and computes correct values for M={M}, N={N}, K={K}")
        return min(timings, key=timings.get)


def precompile(configs: list[TileConfig], *args) -> None:
    """Compile the GEMM for every config at once, in a thread pool (``launch_scaled_mm``'s arguments
    after the config): Triton spends most of a compilation in LLVM and ptxas, outside the GIL, so a
    fresh machine tunes a shape in a fraction of the time (docs/PERFORMANCE.md). Half the CPU's threads
    at most, so that the user's machine stays usable and the compilers' memory stays bounded. A config
    that does not compile is left to fail again, with its error, when timed."""
    if AsyncCompileMode is None:
        return
    workers = max(1, (os.cpu_count() or 2) // 2)
    with ThreadPoolExecutor(workers) as pool, contextlib.ExitStack() as queue:
        try:
            queue.enter_context(AsyncCompileMode(pool, ignore_errors=True))
        except (TypeError, RuntimeError):  # another signature, or a queue already open around this call
            return
        for config in configs:
            try:
                launch_scaled_mm(config, *args, compile_only=True)
            except Exception:  # noqa: BLE001, S112 - the timing loop reports it
                continue


TUNER = GemmTuner()

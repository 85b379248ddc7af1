"""Where the int8 ops run: the backend choice, and the two backends that are not Triton's.

Backends, chosen per call from the tensors' device (:func:`use_backend` overrides, for tests and
comparisons):

* ``"triton"``: CUDA tensors with Triton available — the kernels in :mod:`engine.int8.kernels`. With
  ``TRITON_INTERPRET=1`` it also runs on CPU tensors, which is how the kernels are tested without a GPU.
* ``"int_mm"``: CUDA without Triton — ``torch._int_mm`` (cuBLAS int8) plus a separate dequantization.
* ``"torch"``: any device — the same integer arithmetic through float32 matmuls over K chunks small
  enough that every partial sum is exact.

All backends compute the same int8 tokens (bit for bit) and the same int32 products, so they differ
only in float32 rounding of the epilogue.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Literal

import torch
import torch.nn.functional as F

from engine.int8.operands import Epilogue, LowRank
from engine.int8.quantize import MIN_ABSMAX, QMAX

try:
    from engine.int8 import kernels

    KERNELS_MISSING: str | None = None
except ImportError as error:  # no Triton on this platform, or one older than the kernels need
    kernels = None
    KERNELS_MISSING = str(error)

Backend = Literal["triton", "int_mm", "torch"]
BACKENDS: tuple[Backend, ...] = ("triton", "int_mm", "torch")
EXACT_K_CHUNK = 1024
"""127² · 1024 < 2²⁴: float32 sums of this many int8 products are exact integers."""

class _Forced(threading.local):
    """The backend :func:`use_backend` forces in this thread (``None``: none). Not a ``ContextVar``:
    dynamo cannot trace ``ContextVar.get`` (a graph break in every compiled int8 layer), while it reads
    this attribute and guards on it, so a graph traced for one backend is traced again for another. Set
    in ``__init__``, which runs once in each thread: dynamo guards an attribute of the instance, not a
    class default, and a missing attribute would cost every call an exception."""

    def __init__(self) -> None:
        self.backend: Backend | None = None


_FORCED = _Forced()


@contextlib.contextmanager
def use_backend(backend: Backend | None) -> Iterator[None]:
    """Run the int8 ops of this thread on one backend inside the block (``None``: choose per call).
    Other threads (the app's jobs) keep their own choice."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    previous = _FORCED.backend
    _FORCED.backend = backend
    try:
        yield
    finally:
        _FORCED.backend = previous


def backend_for(x: torch.Tensor) -> Backend:
    return backend_on(x.device)


def backend_on(device: torch.device) -> Backend:
    forced = _FORCED.backend
    if forced is not None:
        return forced
    if device.type == "cuda":
        return "triton" if kernels is not None else "int_mm"
    return "torch"


def describe_backend(device: torch.device) -> str:
    """What ``int8_linear`` runs on ``device``, in words for reports (a slow fallback says why)."""
    backend = backend_on(device)
    if backend == "triton":
        return "Triton kernels"
    if backend == "torch":
        return "PyTorch float32 matmuls (no int8 speed-up)"
    why = f" ({KERNELS_MISSING})" if KERNELS_MISSING else ""
    return f"torch._int_mm + separate dequantization, slower than the Triton kernels{why}"


def quantize_tokens_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token int8 quantization of 2-D tokens [M, K] in PyTorch ops: the non-Triton backends and
    compiled graphs run this; the Triton kernel computes exactly the same values.

    Returns ``(q int8 [M, K], scale float32 [M])``; a token with NaN/Inf gets scale NaN and zeros.
    """
    x = x.float()
    absmax = x.abs().amax(dim=1)  # NaN or Inf where the token holds one
    # not ``(x * 0).sum()``: inductor folds ``x * 0`` to 0, and Inf tokens then came out as Inf scales
    finite = torch.isfinite(absmax)
    row_max = absmax.clamp(min=MIN_ABSMAX)
    # Tensor-by-tensor divisions: PyTorch may turn a division by or of a Python number into a
    # multiplication by a reciprocal, rounded twice, and then the values would differ from the kernel's.
    qmax = torch.full_like(row_max, QMAX)
    scale = torch.where(finite, row_max / qmax, torch.full_like(row_max, float("nan")))
    inv_scale = torch.where(finite, qmax / row_max, torch.zeros_like(row_max))
    q = torch.round(x * inv_scale[:, None]).clamp_(-QMAX, QMAX)
    q = torch.where(finite[:, None], q, torch.zeros_like(q))
    return q.to(torch.int8), scale


def _dequantize(acc, x_scale, w_scale, bias, out_dtype, lora: LowRank | None = None) -> torch.Tensor:
    out = acc.float() * x_scale[:, None] * w_scale.reshape(-1)
    if bias is not None:
        out = out + bias.float()
    if lora is not None:
        out = out + (lora.x.float() * lora.scale) @ lora.up.float().T
    return out.to(out_dtype)


def _int_mm(q: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """int32 ``q @ wᵀ`` through cuBLAS, within ``torch._int_mm``'s limits (M > 16, N and K multiples of 8)."""
    M, K = q.shape
    if K % 8 or w.shape[0] % 8:
        return _exact_int_matmul(q, w)
    if M <= 16:
        padded = torch.zeros(17, K, dtype=q.dtype, device=q.device)
        padded[:M] = q
        return torch._int_mm(padded, w.t())[:M]
    return torch._int_mm(q, w.t())


def _exact_int_matmul(q: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """int32 ``q @ wᵀ`` on any device through float32 matmuls whose sums are all exact."""
    acc = torch.zeros(q.shape[0], w.shape[0], dtype=torch.int32, device=q.device)
    for k in range(0, q.shape[1], EXACT_K_CHUNK):
        chunk = slice(k, k + EXACT_K_CHUNK)
        acc += (q[:, chunk].float() @ w[:, chunk].float().t()).to(torch.int32)
    return acc


def low_rank_torch(q: torch.Tensor, x_scale: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """:func:`engine.int8.kernels.low_rank` in tensor ops: ``(q · x_scale[:, None]) @ downᵀ`` in down's
    dtype, computed in float32."""
    return ((q.float() @ down.float().T) * x_scale[:, None]).to(down.dtype)


def fallback_scaled_mm(
    backend: Backend, q, x_scale, w, w_scale, out_dtype: torch.dtype, epilogue: Epilogue = Epilogue()
) -> torch.Tensor:
    """The Triton GEMM's result [M, N] on the ``"int_mm"`` or ``"torch"`` backend: the int32 product, then
    the dequantization and the epilogue in tensor ops (a gated product as the kernel computes it). Not
    attention's heads: their callers run :func:`engine.heads.attention_inputs` on the result."""
    matmul = _int_mm if backend == "int_mm" else _exact_int_matmul
    out = _dequantize(matmul(q, w), x_scale, w_scale, epilogue.bias, out_dtype, epilogue.lora)
    up = epilogue.up
    if up is None:
        return out
    product = _dequantize(matmul(q, up.w_int8), x_scale, up.w_scale, up.bias, out_dtype, epilogue.up_lora)
    return (F.silu(out.float()) * product.float()).to(out_dtype)  # what the kernel computes

"""``int8_linear``: the function every INT8 layer runs through, and ``int8_studio::scaled_mm``, its op.

``y = int8_linear(x, w_int8, w_scale, bias)`` computes ``x · (w_int8 · w_scale)ᵀ + bias`` the W8A8 way:
each row (token) of ``x`` is quantized to int8 with its own scale (symmetric, ``absmax / 127``, round to
nearest with ties to even), multiplied with the int8 weight in int32, and the product is rescaled by the
row's scale and the weight scale (one scalar, or one per output channel) before the bias is added.
An optional LoRA term ``(x · downᵀ · scale) · upᵀ`` is added in the same epilogue (dynamic LoRA).

The GEMM with its fused epilogue is a ``torch.library`` custom op with a fake implementation
(``torch.ops.int8_studio.scaled_mm``), and so is the Triton activation quantization
(``torch.ops.int8_studio.quantize_rows``). Compiled graphs call the same kernels as eager code, so
compiled and eager outputs are bit-identical on the Triton backend. Inductor could fuse the
quantization into the kernel that produces ``x``, but in these models that producer is an op it cannot
fuse (attention), or a norm, an activation or the previous GEMM, which our kernels apply on the way in;
and its own reductions are slower (H200, 4352 × 3840 bf16: 30 µs against 15 for a plain row, 44 against
24 after an RMSNorm; longer rows were worse still: Klein 9B's 10–16k-wide rows cost 8.6 ms a step
against 3.2 + 1.5 ms, H100). Other backends quantize in tensor ops, which inductor fuses (its code may
round a row's scale 1 ulp differently: int8 values can then differ by one step, within int8 rounding).
Down-projections take their input before the activation (:class:`ActivatedInput`: SwiGLU or GELU, after
an optional concatenated prefix) and quantize it with ``int8_studio::quantize_activated``, whose kernel
applies the activation on the way in. Projections after a norm take their input before it
(:class:`NormedInput`): one kernel normalizes, modulates and quantizes each row
(``int8_studio::quantize_normed``). A SwiGLU in-projection runs as one gated GEMM (``int8_linear``'s
``gate``: ``silu(x·W₁ᵀ) · (x·W₂ᵀ)``, the two products never written out), a fused q|k|v projection can
hand on attention's inputs (:func:`int8_attention_inputs`), and layers that share an input can quantize
it once (:func:`quantize_input`). Compiled graphs have no graph breaks and symbolic token counts.

Backends, chosen per call (``use_backend`` overrides, for tests and comparisons):

* ``"triton"``: CUDA tensors with Triton available — the kernels in ``kernels.py``. With
  ``TRITON_INTERPRET=1`` it also runs on CPU tensors, which is how the kernels are tested without a GPU.
* ``"int_mm"``: CUDA without Triton — ``torch._int_mm`` (cuBLAS int8) plus a separate dequantization.
* ``"torch"``: any device — the same integer arithmetic through float32 matmuls over K chunks small
  enough that every partial sum is exact.

All backends compute the same int8 activations (bit for bit) and the same int32 products, so they
differ only in float32 rounding of the epilogue.

Edge cases, identical on every backend:

* an all-zero row of ``x`` gives exactly ``bias`` (or zeros) in that output row;
* a row containing NaN or ±Inf gives an all-NaN output row (other rows are unaffected) — never
  finite garbage, so a broken upstream layer stays visible.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

from engine.fusion import ACTIVATIONS, NORMS, ActivatedInput, NormedInput
from engine.heads import QKNormRope, attention_inputs, rope_of, rotation_tables
from engine.int8.quantize import MIN_ABSMAX, QMAX
from engine.int8.rotation import check_group, hadamard, rotate

try:
    from engine.int8 import kernels

    KERNELS_MISSING: str | None = None
except ImportError as error:  # no Triton on this platform, or one older than the kernels need
    kernels = None
    KERNELS_MISSING = str(error)

Backend = Literal["triton", "int_mm", "torch"]
BACKENDS: tuple[Backend, ...] = ("triton", "int_mm", "torch")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
EXACT_K_CHUNK = 1024
"""127² · 1024 < 2²⁴: float32 sums of this many int8 products are exact integers."""

force_backend: Backend | None = None


@contextlib.contextmanager
def use_backend(backend: Backend | None) -> Iterator[None]:
    """Run ``int8_linear`` on one backend inside the block (``None``: choose per call)."""
    global force_backend
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    previous, force_backend = force_backend, backend
    try:
        yield
    finally:
        force_backend = previous


def backend_for(x: torch.Tensor) -> Backend:
    return backend_on(x.device)


def backend_on(device: torch.device) -> Backend:
    if force_backend is not None:
        return force_backend
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


def quantize_rows_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row int8 quantization in PyTorch ops: the non-Triton backends and compiled graphs run this;
    the Triton kernel computes exactly the same values.

    Returns ``(q int8 [M, K], scale float32 [M])``; a row with NaN/Inf gets scale NaN and zeros.
    """
    x = x.float()
    absmax = x.abs().amax(dim=1)  # NaN or Inf where the row holds one
    # not ``(x * 0).sum()``: inductor folds ``x * 0`` to 0, and Inf rows then came out as Inf scales
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


def normed_kernel_rows(normed: NormedInput) -> tuple[torch.Tensor, kernels.Normed] | None:
    """``normed.x`` as 2-D rows and the kernel's description of the rest, or None where the kernel does not
    apply: ``scale`` or ``shift`` varying along the tokens of a sample, rows longer than it handles."""
    x, width = normed.x, normed.width
    batch = x.shape[0] if x.ndim >= 3 else 1

    def per_sample(t: torch.Tensor) -> bool:  # one vector for all rows, or [batch, 1, ..., width]
        one_per_sample = t.ndim == x.ndim >= 3 and t.shape[0] == batch and t.shape[1:-1].numel() == 1
        return t.shape[-1] == width and (t.numel() == width or one_per_sample)

    vectors = []
    for t in (normed.scale, normed.shift):
        if t is not None and not per_sample(t):
            return None
        vectors.append(None if t is None else t.reshape(-1, width).expand(batch, width))
    if normed.norm not in NORMS or width > kernels.SINGLE_PASS_MAX_K:
        return None
    rows = x.reshape(-1, width)
    return rows, kernels.Normed(normed.norm == "rms", normed.weight, normed.eps, *vectors, rows.shape[0] // batch)


def _quantize(x: torch.Tensor | ActivatedInput, rotation: int) -> tuple[torch.Tensor, torch.Tensor]:
    activated = isinstance(x, ActivatedInput)
    rows = x.a if activated else x  # device and dtype of the input
    triton = backend_for(rows) == "triton"
    if triton and rotation in (0, kernels.ROTATION_GROUP):  # one kernel, whatever the input
        prefix, act = (x.prefix, kernels.Activated(x.activation, x.a, x.b)) if activated else (x, None)
        if not rotation:
            return kernels.quantize_rows(prefix, act)
        return kernels.quantize_rotated_rows(prefix, hadamard(16, rows.device, rows.dtype), act)
    x = x.materialize() if activated else x
    x = rotate(x, rotation) if rotation else x
    return kernels.quantize_rows(x) if triton else quantize_rows_torch(x)


_LIBRARY = torch.library.Library("int8_studio", "DEF")


def _register(schema: str, impl, fake) -> torch._ops.OpOverload:
    """Define ``int8_studio::<schema>`` with ``impl`` for every device and ``fake`` for tracing.

    A plain ``Library`` registration rather than ``torch.library.custom_op``: that one runs Python
    argument and autograd handling around every call, 70–100 µs of host time per call on a 2-core CPU
    (the op's body itself: 80 µs). Compiled int8 models make such a call per layer, and at small token
    counts their GPU waits for it. The ops have no autograd formula: INT8 Studio runs them for inference.
    """
    name = schema.split("(")[0]
    _LIBRARY.define(schema)
    _LIBRARY.impl(name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"int8_studio::{name}", fake, lib=_LIBRARY)
    return getattr(torch.ops.int8_studio, name).default


def _quantized_like(x: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    return x.new_empty(x.shape[0], width, dtype=torch.int8), x.new_empty(x.shape[0], dtype=torch.float32)


quantize_rows = _register(
    "quantize_rows(Tensor x, int rotation=0) -> (Tensor, Tensor)",
    lambda x, rotation=0: _quantize(x, rotation),
    lambda x, rotation=0: _quantized_like(x, x.shape[1]),
)
"""Per-row int8 quantization of a 2-D float tensor, rotated first by groups of ``rotation`` channels
when it is not 0 (:mod:`engine.int8.rotation`): ``(q int8 [M, K], scale float32 [M])``."""

quantize_activated = _register(
    "quantize_activated(str activation, Tensor a, Tensor? b, Tensor? prefix, int rotation=0) -> (Tensor, Tensor)",
    lambda activation, a, b, prefix, rotation=0: _quantize(ActivatedInput(activation, a, b, prefix), rotation),
    lambda activation, a, b, prefix, rotation=0: _quantized_like(
        a, a.shape[1] + (prefix.shape[1] if prefix is not None else 0)
    ),
)
""":data:`quantize_rows` of the 2-D :class:`ActivatedInput` ``(activation, a, b, prefix)``."""


def _quantize_normed(x, rms: bool, weight, eps: float, scale, shift, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    normed = kernels.Normed(rms, weight, eps, scale, shift, tokens)
    if backend_for(x) == "triton":
        return kernels.quantize_normed_rows(x, normed)
    per_row = (None if t is None else t.repeat_interleave(tokens, 0) for t in (scale, shift))
    return quantize_rows_torch(NormedInput(x, "rms" if rms else "layer", eps, weight, *per_row).materialize())


quantize_normed = _register(
    "quantize_normed(Tensor x, bool rms, Tensor? weight, float eps, Tensor? scale, Tensor? shift, SymInt tokens)"
    " -> (Tensor, Tensor)",
    _quantize_normed,
    lambda x, *normed: _quantized_like(x, x.shape[1]),
)
""":data:`quantize_rows` of 2-D rows ``x`` after their norm and modulation, ``kernels.Normed``'s fields
in order: one kernel on the Triton backend (``normed_kernel_rows``), the materialized input
elsewhere."""


class LoraFactors(NamedTuple):
    """Low-rank factors added to a layer at run time: ``down`` [r, K] and ``up`` [N, r] in the
    activations' float dtype, ``scale`` float32 [r] (strength × alpha / rank per rank column)."""

    down: torch.Tensor
    up: torch.Tensor
    scale: torch.Tensor


class Int8Weight(NamedTuple):
    """A layer's int8 weight [N, K], its scale (as :func:`int8_linear` takes it) and bias: the second
    product of a gated :func:`int8_linear`."""

    w_int8: torch.Tensor
    w_scale: torch.Tensor
    bias: torch.Tensor | None = None


class QuantizedInput(NamedTuple):
    """A layer input quantized per row (:func:`quantize_input`), for several layers that take it:
    ``q`` int8 [M, K], ``scale`` float32 [M], the input's leading shape, dtype and the Hadamard
    group it was rotated with (0: none)."""

    q: torch.Tensor
    scale: torch.Tensor
    lead: tuple[int, ...]
    dtype: torch.dtype
    rotation: int = 0


def _dequantize(acc, x_scale, w_scale, bias, out_dtype, lora_x=None, lora_up=None, lora_scale=None) -> torch.Tensor:
    out = acc.float() * x_scale[:, None] * w_scale.reshape(-1)
    if bias is not None:
        out = out + bias.float()
    if lora_x is not None:
        out = out + (lora_x.float() * lora_scale) @ lora_up.float().T
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


def _check_activated(x: ActivatedInput) -> None:
    gated = x.activation == "swiglu"
    if x.activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {x.activation!r}; expected one of {', '.join(ACTIVATIONS)}")
    if gated != (x.b is not None) or (gated and (x.b.shape != x.a.shape or x.b.dtype != x.a.dtype)):
        raise ValueError(f"{x.activation} takes {'a and b of one shape and dtype' if gated else 'a alone'}")
    if x.prefix is not None and (x.prefix.shape[:-1] != x.a.shape[:-1] or x.prefix.dtype != x.a.dtype):
        raise ValueError(f"prefix {x.prefix.dtype} {tuple(x.prefix.shape)} does not fit a {x.a.dtype} {tuple(x.a.shape)}")


def _described(x) -> tuple[torch.dtype, tuple[int, ...]]:
    """The dtype and shape of a layer input, whatever form it comes in."""
    if isinstance(x, QuantizedInput):
        return x.dtype, (*x.lead, x.q.shape[1])
    if isinstance(x, ActivatedInput):
        _check_activated(x)
        return x.a.dtype, (*x.a.shape[:-1], x.width)
    rows = x.x if isinstance(x, NormedInput) else x
    return rows.dtype, tuple(rows.shape)


def _check(dtype, shape, w_int8, w_scale, bias, out_dtype, lora=None, gate=None) -> None:
    if w_int8.dtype != torch.int8 or w_int8.ndim != 2:
        raise ValueError(f"w_int8 must be a 2-D int8 tensor, got {w_int8.dtype} {tuple(w_int8.shape)}")
    N, K = w_int8.shape
    if dtype not in FLOAT_DTYPES or shape[-1] != K:
        raise ValueError(f"x must be float16/bfloat16/float32 [..., {K}], got {dtype} {tuple(shape)}")
    if w_scale.numel() not in (1, N) or w_scale.ndim > 2 or not w_scale.is_floating_point():
        raise ValueError(f"w_scale must be a float tensor of shape [], [1], [{N}] or [{N}, 1], got {tuple(w_scale.shape)}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"bias must have shape [{N}], got {tuple(bias.shape)}")
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"out_dtype must be float16, bfloat16 or float32, got {out_dtype}")
    if lora is not None:
        r = lora.down.shape[0]
        if lora.down.shape != (r, K) or lora.up.shape != (N, r) or lora.scale.shape != (r,):
            raise ValueError(
                f"LoRA factors must be down [r, {K}], up [{N}, r], scale [r], got "
                f"{tuple(lora.down.shape)}, {tuple(lora.up.shape)}, {tuple(lora.scale.shape)}"
            )
    if gate is not None:
        if lora is not None:
            raise ValueError("a gated int8_linear takes no LoRA term: run the two layers separately")
        if gate.w_int8.shape != w_int8.shape:
            raise ValueError(f"the gate's weight must have the weight's shape {tuple(w_int8.shape)}, got {tuple(gate.w_int8.shape)}")
        _check(dtype, shape, gate.w_int8, gate.w_scale, gate.bias, out_dtype)


def quantize_input(x: torch.Tensor | ActivatedInput | NormedInput, rotation: int = 0) -> QuantizedInput:
    """Per-row int8 quantization of a layer input [..., K], rotated first by groups of ``rotation``
    channels when it is not 0; :func:`int8_linear` of the result skips its own quantization, so
    several layers on one input quantize it once. A :class:`NormedInput` is normalized in the
    quantization kernel where it can be (module docstring)."""
    dtype, shape = _described(x)
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"x must be float16, bfloat16 or float32, got {dtype}")
    return _quantized_input(x, rotation, dtype, shape)


def _quantized_input(x, rotation: int, dtype: torch.dtype, shape: tuple[int, ...]) -> QuantizedInput:
    """:func:`quantize_input` of an input already described (``_described``) and checked."""
    if rotation:
        check_group(rotation, shape[-1])
    compiling = torch.compiler.is_compiling()
    normed_rows = None
    if isinstance(x, NormedInput):
        if backend_for(x.x) == "triton" and not rotation:
            normed_rows = normed_kernel_rows(x)
        x = x if normed_rows is not None else x.materialize()
    activated = isinstance(x, ActivatedInput)
    x2 = x.flattened() if activated else normed_rows[0] if normed_rows else x.reshape(-1, shape[-1])
    if normed_rows:
        q, scale = quantize_normed(x2, *normed_rows[1]) if compiling else kernels.quantize_normed_rows(*normed_rows)
    elif not compiling:
        q, scale = _quantize(x2, rotation)
    elif activated:
        q, scale = quantize_activated(*x2, rotation)
    elif backend_for(x2) == "triton" or rotation:
        q, scale = quantize_rows(x2, rotation)
    else:
        q, scale = quantize_rows_torch(x2)  # inductor fuses this into the producer of x
    return QuantizedInput(q, scale, shape[:-1], dtype, rotation)


def _flat_scale(w_scale: torch.Tensor, n: int = 1) -> torch.Tensor:
    """A weight scale as the GEMM takes it: float32, contiguous, at least ``n`` elements."""
    if w_scale.numel() < n:
        w_scale = w_scale.reshape(1).expand(n)
    if w_scale.dtype != torch.float32 or not w_scale.is_contiguous():
        w_scale = w_scale.float().contiguous()
    return w_scale


def _gate_args(w_scale, bias, gate: Int8Weight | None) -> tuple:
    """``(w_scale, bias, gate_w, gate_scale, gate_bias)`` for the GEMM, whose two products must have
    the same kinds of scale and bias: a single scale widened to one per row where the other has those,
    a missing bias as zeros where the other has one."""
    if gate is None:
        return _flat_scale(w_scale), bias, None, None, None
    n = max(w_scale.numel(), gate.w_scale.numel())
    gate_bias = gate.bias
    if bias is None and gate_bias is not None:
        bias = torch.zeros_like(gate_bias)
    if gate_bias is None and bias is not None:
        gate_bias = torch.zeros_like(bias)
    return _flat_scale(w_scale, n), bias, gate.w_int8, _flat_scale(gate.w_scale, n), gate_bias


def _scaled_mm(
    q: torch.Tensor,
    x_scale: torch.Tensor,
    w_int8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    lora_x: torch.Tensor | None,
    lora_up: torch.Tensor | None,
    lora_scale: torch.Tensor | None,
    gate_w: torch.Tensor | None = None,
    gate_scale: torch.Tensor | None = None,
    gate_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    backend = backend_for(q)
    if backend == "triton":
        lora = kernels.LowRank(lora_x, lora_up, lora_scale) if lora_x is not None else None
        gate = kernels.Gate(gate_w, gate_scale, gate_bias) if gate_w is not None else None
        return kernels.scaled_mm(q, x_scale, w_int8, w_scale, bias, out_dtype, lora=lora, gate=gate)
    matmul = _int_mm if backend == "int_mm" else _exact_int_matmul
    out = _dequantize(matmul(q, w_int8), x_scale, w_scale, bias, out_dtype, lora_x, lora_up, lora_scale)
    if gate_w is None:
        return out
    gate = _dequantize(matmul(q, gate_w), x_scale, gate_scale, gate_bias, out_dtype)
    return (F.silu(out.float()) * gate.float()).to(out_dtype)  # what the kernel computes


scaled_mm = _register(
    "scaled_mm(Tensor q, Tensor x_scale, Tensor w_int8, Tensor w_scale, Tensor? bias, ScalarType out_dtype, "
    "Tensor? lora_x, Tensor? lora_up, Tensor? lora_scale, Tensor? gate_w=None, Tensor? gate_scale=None, "
    "Tensor? gate_bias=None) -> Tensor",
    _scaled_mm,
    lambda q, x_scale, w_int8, *rest, **gate: q.new_empty(q.shape[0], w_int8.shape[0], dtype=rest[2]),
)
"""``(q @ w_int8ᵀ) · x_scale[:, None] · w_scale + bias (+ (lora_x · lora_scale) @ lora_upᵀ)`` in
``out_dtype``: q int8 [M, K] with float32 row scales [M], w_int8 [N, K] with a float32 scale of 1 or N
elements (contiguous). With ``gate_w``: ``silu`` of that (rounded to ``out_dtype``) times the same
product of ``gate_w`` (rounded too), computed in float32; no LoRA term then. The op compiled graphs
call; eager callers go through :func:`int8_linear`."""


def _scaled_mm_heads(q, x_scale, w_int8, w_scale, bias, out_dtype: torch.dtype, norm, eps: float, tables) -> torch.Tensor:
    """:data:`scaled_mm_heads`' body (tensors as its schema and docstring say)."""
    head = norm.shape[1]
    if backend_for(q) == "triton" and head >= 16 and head & (head - 1) == 0:  # a tile is one head wide
        return kernels.scaled_mm(q, x_scale, w_int8, w_scale, bias, out_dtype, heads=kernels.Heads(norm, eps, tables))
    projected = _scaled_mm(q, x_scale, w_int8, w_scale, bias, out_dtype, None, None, None)
    qkv = projected.reshape(-1, tables.shape[1], w_int8.shape[0])
    return torch.stack([t.transpose(1, 2) for t in attention_inputs(qkv, QKNormRope(*norm, eps, rope_of(tables)))])


scaled_mm_heads = _register(
    "scaled_mm_heads(Tensor q, Tensor x_scale, Tensor w_int8, Tensor w_scale, Tensor? bias, ScalarType out_dtype, "
    "Tensor norm, float eps, Tensor tables) -> Tensor",
    _scaled_mm_heads,
    lambda q, x_scale, w_int8, w_scale, bias, out_dtype, norm, eps, tables: q.new_empty(
        3, q.shape[0] // tables.shape[1], tables.shape[1], w_int8.shape[0] // (3 * norm.shape[1]), norm.shape[1],
        dtype=out_dtype,
    ),
)
""":data:`scaled_mm` of a fused q|k|v projection, handed on as attention's inputs [3, batch, tokens,
heads, head]: queries and keys RMS-normalized per head (``norm`` [2, head]: the queries' weight,
the keys') and rotated by the angles in ``tables`` (:func:`~engine.heads.rotation_tables`;
:func:`engine.heads.attention_inputs`)."""


def int8_attention_inputs(
    x: torch.Tensor | NormedInput | QuantizedInput, weight: Int8Weight, norm: QKNormRope
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v [batch, heads, tokens, head] from a fused q|k|v projection of ``x`` [batch, tokens, K]:
    :func:`int8_linear` followed by :func:`~engine.heads.attention_inputs`, which the Triton GEMM
    computes in its epilogue (the projection's output never reaches memory as such). Each is stored
    token-major (a transposed view of [batch, tokens, heads, head]), so attention's output is too and
    its rows [batch · tokens, heads · head] go to the output projection without a copy."""
    dtype, shape = _described(x)
    _check(dtype, shape, *weight, None)
    head, tokens = norm.query_weight.shape[0], norm.rope.shape[0]
    n = weight.w_int8.shape[0]
    if len(shape) != 3 or shape[1] != tokens or n % (3 * head) or tuple(norm.rope.shape) != (tokens, head // 2, 2, 2):
        raise ValueError(
            f"attention's inputs need x [batch, {tokens}, K] (a token per rotation), a projection 3·heads·{head} "
            f"wide and rope [{tokens}, {head // 2}, 2, 2]; got x {tuple(shape)}, {n} outputs, rope {tuple(norm.rope.shape)}"
        )
    rows = x if isinstance(x, QuantizedInput) else _quantized_input(x, 0, dtype, shape)
    w_scale, bias, *_ = _gate_args(weight.w_scale, weight.bias, None)
    weights = torch.stack([norm.query_weight, norm.key_weight])
    run = scaled_mm_heads if torch.compiler.is_compiling() else _scaled_mm_heads
    out = run(rows.q, rows.scale, weight.w_int8, w_scale, bias, dtype, weights, norm.eps, rotation_tables(norm.rope))
    q, k, v = out.transpose(2, 3)
    return q, k, v


def int8_linear(
    x: torch.Tensor | ActivatedInput | NormedInput | QuantizedInput,
    w_int8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    lora: LoraFactors | None = None,
    rotation: int = 0,
    gate: Int8Weight | None = None,
) -> torch.Tensor:
    """``x · (w_int8 · w_scale)ᵀ + bias (+ LoRA term)`` with per-token int8 activations (module docstring).

    x: [..., K] float16/bfloat16/float32, an :class:`ActivatedInput` or :class:`NormedInput` of that
    width, or a :class:`QuantizedInput` (quantized with the same ``rotation``). w_int8: int8 [N, K].
    w_scale: float, [] / [1] (tensor-wise) or [N] / [N, 1] (per output channel). bias: [N] or None.
    Result: [..., N] in ``out_dtype`` (default x's). ``rotation``: the Hadamard group size ``w_int8`` was
    rotated with (0: not rotated); ``x`` is rotated the same way before it is quantized. The LoRA
    factors act on the unrotated ``x``. ``gate``: a second layer of the same shape on the same input;
    the result is then the SwiGLU ``silu(this layer) · gate layer``, in one GEMM.
    """
    if isinstance(x, QuantizedInput) and (lora is not None or x.rotation != rotation):
        raise ValueError("a quantized input takes no LoRA term, and the rotation it was quantized with")
    if lora is not None and not isinstance(x, torch.Tensor):  # the low-rank term needs the input itself
        x = x.materialize()
    dtype, shape = _described(x)
    _check(dtype, shape, w_int8, w_scale, bias, out_dtype, lora, gate)
    out_dtype = out_dtype or dtype
    lora_args = (None, None, None)
    if lora is not None:
        x2 = x.reshape(-1, shape[-1])
        lora_args = (x2 @ lora.down.to(dtype).T, lora.up.to(dtype), lora.scale.float())
    rows = x if isinstance(x, QuantizedInput) else _quantized_input(x, rotation, dtype, shape)
    w_scale, bias, *gate_args = _gate_args(w_scale, bias, gate)
    run = scaled_mm if torch.compiler.is_compiling() else _scaled_mm
    out = run(rows.q, rows.scale, w_int8, w_scale, bias, out_dtype, *lora_args, *gate_args)
    return out.reshape(*shape[:-1], w_int8.shape[0])

"""The int8 ops every INT8 layer runs through: :func:`int8_linear`, :func:`int8_swiglu`,
:func:`int8_attention_inputs`, and the ``int8_studio::*`` ops they call.

``y = int8_linear(x, w_int8, w_scale, bias)`` computes ``x · (w_int8 · w_scale)ᵀ + bias`` the W8A8 way:
each token of ``x`` is quantized to int8 with its own scale (symmetric, ``absmax / 127``, round to
nearest with ties to even), multiplied with the int8 weight in int32, and the product is rescaled by the
token's scale and the weight scale (one scalar, or one per output channel) before the bias is added.
An optional LoRA term ``(x · downᵀ · scale) · upᵀ`` is added in the same epilogue (dynamic LoRA), its
``x · downᵀ`` taken from the quantized tokens (:func:`engine.int8.kernels.low_rank`), so that the input
stays fused (below) and the LoRA sees the tokens the weight sees, as when it is merged into it.

The GEMM with its fused epilogue is a ``torch.library`` custom op with a fake implementation
(``torch.ops.int8_studio.scaled_mm``), and so is the Triton token quantization
(``torch.ops.int8_studio.quantize_tokens``). Compiled graphs call the same kernels as eager code, so
compiled and eager outputs are bit-identical on the Triton backend. Inductor could fuse the
quantization into the kernel that produces ``x``, but in these models that producer is an op it cannot
fuse (attention), or a norm, an activation or the previous GEMM, which our kernels apply on the way in;
and its own reductions are slower (docs/PERFORMANCE.md). Other backends quantize in tensor ops, which
inductor fuses (its code may round a token's scale 1 ulp differently: int8 values can then differ by
one step, within int8 rounding). Down-projections take their input before the activation
(:class:`ActivatedInput`: SwiGLU or GELU, after an optional concatenated prefix) and quantize it with
``int8_studio::quantize_activated_tokens``, whose kernel applies the activation on the way in.
Projections after a norm take their input before it (:class:`NormedInput`): one kernel normalizes,
modulates and quantizes each token (``int8_studio::quantize_normed_tokens``). A SwiGLU in-projection
runs as one gated GEMM (:func:`int8_swiglu`: ``silu(x·W_gateᵀ) · (x·W_upᵀ)``, the two products never
written out), a fused q|k|v projection can hand on attention's inputs (:func:`int8_attention_inputs`),
and layers that share an input can quantize it once (:func:`quantize_input`). Compiled graphs have no
graph breaks and symbolic token counts.

The backends (the Triton kernels, ``torch._int_mm``, exact PyTorch matmuls) and the choice between
them are in :mod:`engine.int8.backends`. Edge cases, identical on every backend:

* an all-zero token of ``x`` gives exactly ``bias`` (or zeros) in that output row;
* a token containing NaN or ±Inf gives an all-NaN output row (other rows are unaffected) — never
  finite garbage, so a broken upstream layer stays visible.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from engine.fusion import ACTIVATIONS, NORMS, ActivatedInput, NormedInput
from engine.heads import QKNormRope, attention_inputs, rope_of, rotation_tables
from engine.int8.backends import (
    BACKENDS,
    KERNELS_MISSING,
    Backend,
    backend_for,
    backend_on,
    describe_backend,
    fallback_scaled_mm,
    kernels,
    low_rank_torch,
    quantize_tokens_torch,
    use_backend,
)
from engine.int8.operands import Epilogue, Int8Weight, LowRank, QKNormTables, SampleNorm
from engine.int8.rotation import check_group, hadamard, rotate

__all__ = [
    "ACTIVATIONS", "BACKENDS", "KERNELS_MISSING", "NORMS", "ActivatedInput", "Backend", "Int8Weight", "LoraFactors",
    "NormedInput", "QuantizedInput", "backend_for", "backend_on", "describe_backend", "int8_attention_inputs",
    "int8_linear", "int8_swiglu", "normed_tokens", "quantize_activated_tokens", "quantize_input",
    "quantize_normed_tokens", "quantize_tokens", "quantize_tokens_torch", "scaled_mm", "scaled_mm_heads",
    "use_backend",
]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def normed_tokens(normed: NormedInput) -> tuple[torch.Tensor, SampleNorm] | None:
    """``normed.x`` flattened to 2-D tokens and the normed kernel's description of the rest, or None where
    the kernel does not apply: ``scale`` or ``shift`` varying along the tokens of a sample, tokens longer
    than it handles."""
    x, width = normed.x, normed.width
    batch = x.shape[0] if x.ndim >= 3 else 1

    def per_sample(t: torch.Tensor) -> bool:  # one vector for all tokens, or [batch, 1, ..., width]
        one_per_sample = t.ndim == x.ndim >= 3 and t.shape[0] == batch and t.shape[1:-1].numel() == 1
        return t.shape[-1] == width and (t.numel() == width or one_per_sample)

    vectors = []
    for t in (normed.scale, normed.shift):
        if t is not None and not per_sample(t):
            return None
        vectors.append(None if t is None else t.reshape(-1, width).expand(batch, width))
    if normed.norm not in NORMS or width > kernels.SINGLE_PASS_MAX_K:
        return None
    tokens = x.reshape(-1, width)
    return tokens, SampleNorm(normed.norm == "rms", normed.weight, normed.eps, *vectors, tokens.shape[0] // batch)


def _quantize(x: torch.Tensor | ActivatedInput, rotation: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token quantization of 2-D tokens or a 2-D :class:`ActivatedInput`, rotated first by groups of
    ``rotation`` channels when it is not 0: in one kernel on the Triton backend where it can."""
    source = x.a if isinstance(x, ActivatedInput) else x  # device and dtype of the input
    triton = backend_for(source) == "triton"
    if triton and rotation in (0, kernels.ROTATION_GROUP):  # one kernel, whatever the input
        if not rotation:
            return kernels.quantize_tokens(x)
        return kernels.quantize_rotated_tokens(x, hadamard(16, source.device, source.dtype))
    x = x.materialize() if isinstance(x, ActivatedInput) else x
    x = rotate(x, rotation) if rotation else x
    return kernels.quantize_tokens(x) if triton else quantize_tokens_torch(x)


_LIBRARY = torch.library.Library("int8_studio", "DEF")


def register_op(schema: str, impl, fake) -> torch._ops.OpOverload:
    """Define ``int8_studio::<schema>`` with ``impl`` for every device and ``fake`` for tracing.

    A plain ``Library`` registration rather than ``torch.library.custom_op``: that one runs Python
    argument and autograd handling around every call, host time of the order of the op's body itself
    (docs/PERFORMANCE.md). Compiled int8 models make such a call per layer, and at small token counts
    their GPU waits for it. The ops have no autograd formula: INT8 Studio runs them for inference.
    """
    name = schema.split("(")[0]
    _LIBRARY.define(schema)
    _LIBRARY.impl(name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"int8_studio::{name}", fake, lib=_LIBRARY)
    return getattr(torch.ops.int8_studio, name).default


def _quantized_like(x: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    return x.new_empty(x.shape[0], width, dtype=torch.int8), x.new_empty(x.shape[0], dtype=torch.float32)


quantize_tokens = register_op(
    "quantize_tokens(Tensor x, int rotation=0) -> (Tensor, Tensor)",
    lambda x, rotation=0: _quantize(x, rotation),
    lambda x, rotation=0: _quantized_like(x, x.shape[1]),
)
"""Per-token int8 quantization of 2-D float tokens, rotated first by groups of ``rotation`` channels
when it is not 0 (:mod:`engine.int8.rotation`): ``(q int8 [M, K], scale float32 [M])``."""

quantize_activated_tokens = register_op(
    "quantize_activated_tokens(str activation, Tensor a, Tensor? b, Tensor? prefix, int rotation=0) -> (Tensor, Tensor)",
    lambda activation, a, b, prefix, rotation=0: _quantize(ActivatedInput(activation, a, b, prefix), rotation),
    lambda activation, a, b, prefix, rotation=0: _quantized_like(
        a, a.shape[1] + (prefix.shape[1] if prefix is not None else 0)
    ),
)
""":data:`quantize_tokens` of the 2-D :class:`ActivatedInput` ``(activation, a, b, prefix)``."""


def _quantize_normed(x, rms: bool, weight, eps: float, scale, shift, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    norm = SampleNorm(rms, weight, eps, scale, shift, tokens)
    if backend_for(x) == "triton":
        return kernels.quantize_normed_tokens(x, norm)
    per_token = (None if t is None else t.repeat_interleave(tokens, 0) for t in (scale, shift))
    return quantize_tokens_torch(NormedInput(x, "rms" if rms else "layer", eps, weight, *per_token).materialize())


quantize_normed_tokens = register_op(
    "quantize_normed_tokens(Tensor x, bool rms, Tensor? weight, float eps, Tensor? scale, Tensor? shift, "
    "SymInt tokens) -> (Tensor, Tensor)",
    _quantize_normed,
    lambda x, *norm: _quantized_like(x, x.shape[1]),
)
""":data:`quantize_tokens` of 2-D tokens ``x`` after their norm and modulation, :class:`SampleNorm`'s
fields in order: one kernel on the Triton backend (:func:`normed_tokens`), the materialized input
elsewhere."""


class LoraFactors(NamedTuple):
    """Low-rank factors added to a layer at run time: ``down`` [r, K] and ``up`` [N, r] in the
    activations' float dtype, ``scale`` float32 [r] (strength × alpha / rank per rank column)."""

    down: torch.Tensor
    up: torch.Tensor
    scale: torch.Tensor


class QuantizedInput(NamedTuple):
    """A layer input quantized per token (:func:`quantize_input`), for several layers that take it:
    ``q`` int8 [M, K], ``scale`` float32 [M], the input's leading shape, dtype and the Hadamard
    group it was rotated with (0: none)."""

    q: torch.Tensor
    scale: torch.Tensor
    lead: tuple[int, ...]
    dtype: torch.dtype
    rotation: int = 0


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
    tokens = x.x if isinstance(x, NormedInput) else x
    return tokens.dtype, tuple(tokens.shape)


def _check(dtype, shape, w_int8, w_scale, bias, out_dtype, lora=None) -> None:
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


def _lora_args(lora: LoraFactors | None, rotation: int, dtype: torch.dtype) -> tuple:
    """``scaled_mm``'s ``(lora_down, lora_up, lora_scale)`` for ``lora`` (None: three Nones): the factors in
    the activations' dtype, the down factor rotated as the tokens are (the LoRA acts on the unrotated x)."""
    if lora is None:
        return None, None, None
    down = rotate(lora.down, rotation) if rotation else lora.down
    return down.to(dtype), lora.up.to(dtype), lora.scale.float()


def quantize_input(x: torch.Tensor | ActivatedInput | NormedInput, rotation: int = 0) -> QuantizedInput:
    """Per-token int8 quantization of a layer input [..., K], rotated first by groups of ``rotation``
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
    flat_normed = None
    if isinstance(x, NormedInput):
        if backend_for(x.x) == "triton" and not rotation:
            flat_normed = normed_tokens(x)
        x = x if flat_normed is not None else x.materialize()
    activated = isinstance(x, ActivatedInput)
    x2 = x.flattened() if activated else flat_normed[0] if flat_normed else x.reshape(-1, shape[-1])
    if flat_normed:
        norm = flat_normed[1]
        q, scale = quantize_normed_tokens(x2, *norm) if compiling else kernels.quantize_normed_tokens(x2, norm)
    elif not compiling:
        q, scale = _quantize(x2, rotation)
    elif activated:
        q, scale = quantize_activated_tokens(*x2, rotation)
    elif backend_for(x2) == "triton" or rotation:
        q, scale = quantize_tokens(x2, rotation)
    else:
        q, scale = quantize_tokens_torch(x2)  # inductor fuses this into the producer of x
    return QuantizedInput(q, scale, shape[:-1], dtype, rotation)


def _flat_scale(w_scale: torch.Tensor, n: int = 1) -> torch.Tensor:
    """A weight scale as the GEMM takes it: float32, contiguous, at least ``n`` elements."""
    if w_scale.numel() < n:
        w_scale = w_scale.reshape(1).expand(n)
    if w_scale.dtype != torch.float32 or not w_scale.is_contiguous():
        w_scale = w_scale.float().contiguous()
    return w_scale


def _swiglu_args(gate: Int8Weight, up: Int8Weight) -> tuple:
    """``(gate_scale, gate_bias, up_w, up_scale, up_bias)`` for the GEMM, whose two products must have
    the same kinds of scale and bias: a single scale widened to one per channel where the other has
    those, a missing bias as zeros where the other has one."""
    n = max(gate.w_scale.numel(), up.w_scale.numel())
    gate_bias, up_bias = gate.bias, up.bias
    if gate_bias is None and up_bias is not None:
        gate_bias = torch.zeros_like(up_bias)
    if up_bias is None and gate_bias is not None:
        up_bias = torch.zeros_like(gate_bias)
    return _flat_scale(gate.w_scale, n), gate_bias, up.w_int8, _flat_scale(up.w_scale, n), up_bias


def _low_rank(q, x_scale, down, up, scale, first: torch.Tensor | None = None) -> LowRank | None:
    """The epilogue's LoRA term for the factors ``down``, ``up``, ``scale`` (None without them): its
    ``x · downᵀ`` [M, r] from the quantized tokens, or ``first`` where that is it already."""
    if down is None:
        return None
    if first is None:
        triton = backend_for(q) == "triton"
        first = kernels.low_rank(q, x_scale, down) if triton else low_rank_torch(q, x_scale, down)
    return LowRank(first, up, scale)


def _scaled_mm(
    q: torch.Tensor,
    x_scale: torch.Tensor,
    w_int8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    lora_down: torch.Tensor | None,
    lora_up: torch.Tensor | None,
    lora_scale: torch.Tensor | None,
    up_w: torch.Tensor | None = None,
    up_scale: torch.Tensor | None = None,
    up_bias: torch.Tensor | None = None,
    up_lora_down: torch.Tensor | None = None,
    up_lora_up: torch.Tensor | None = None,
    up_lora_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    lora = _low_rank(q, x_scale, lora_down, lora_up, lora_scale)
    shared = lora.x if lora is not None and up_lora_down is lora_down else None  # the halves of one layer
    up_lora = _low_rank(q, x_scale, up_lora_down, up_lora_up, up_lora_scale, shared)
    up = Int8Weight(up_w, up_scale, up_bias) if up_w is not None else None
    epilogue = Epilogue(bias, lora, up, None, up_lora)
    backend = backend_for(q)
    if backend == "triton":
        return kernels.scaled_mm(q, x_scale, w_int8, w_scale, out_dtype, epilogue)
    return fallback_scaled_mm(backend, q, x_scale, w_int8, w_scale, out_dtype, epilogue)


scaled_mm = register_op(
    "scaled_mm(Tensor q, Tensor x_scale, Tensor w_int8, Tensor w_scale, Tensor? bias, ScalarType out_dtype, "
    "Tensor? lora_down, Tensor? lora_up, Tensor? lora_scale, Tensor? up_w=None, Tensor? up_scale=None, "
    "Tensor? up_bias=None, Tensor? up_lora_down=None, Tensor? up_lora_up=None, Tensor? up_lora_scale=None) -> Tensor",
    _scaled_mm,
    lambda q, x_scale, w_int8, *rest, **up: q.new_empty(q.shape[0], w_int8.shape[0], dtype=rest[2]),
)
"""``(q @ w_int8ᵀ) · x_scale[:, None] · w_scale + bias (+ ((q · x_scale[:, None]) @ lora_downᵀ · lora_scale)
@ lora_upᵀ)`` in ``out_dtype``: q int8 [M, K] with float32 token scales [M], w_int8 [N, K] with a float32
scale of 1 or N elements (contiguous); the LoRA factors down [r, K] and up [N, r] in one float dtype,
scale float32 [r]. With ``up_w`` (a SwiGLU: ``w_int8`` is then the gate's weight): ``silu`` of that
(rounded to ``out_dtype``) times the same product of ``up_w`` with its own bias and LoRA term (``up_*``;
rounded too), computed in float32. The op compiled graphs call; eager callers go through
:func:`int8_linear` and :func:`int8_swiglu`."""


def _scaled_mm_heads(
    q, x_scale, w_int8, w_scale, bias, out_dtype: torch.dtype, norm, eps: float, tables,
    lora_down=None, lora_up=None, lora_scale=None,
) -> torch.Tensor:  # fmt: skip
    """:data:`scaled_mm_heads`' body (tensors as its schema and docstring say)."""
    head = norm.shape[1]
    if backend_for(q) == "triton" and head >= 16 and head & (head - 1) == 0:  # a tile is one head wide
        lora = _low_rank(q, x_scale, lora_down, lora_up, lora_scale)
        epilogue = Epilogue(bias, lora, heads=QKNormTables(norm, eps, tables))
        return kernels.scaled_mm(q, x_scale, w_int8, w_scale, out_dtype, epilogue)
    projected = _scaled_mm(q, x_scale, w_int8, w_scale, bias, out_dtype, lora_down, lora_up, lora_scale)
    qkv = projected.reshape(-1, tables.shape[1], w_int8.shape[0])
    return torch.stack([t.transpose(1, 2) for t in attention_inputs(qkv, QKNormRope(*norm, eps, rope_of(tables)))])


scaled_mm_heads = register_op(
    "scaled_mm_heads(Tensor q, Tensor x_scale, Tensor w_int8, Tensor w_scale, Tensor? bias, ScalarType out_dtype, "
    "Tensor norm, float eps, Tensor tables, Tensor? lora_down=None, Tensor? lora_up=None, Tensor? lora_scale=None) "
    "-> Tensor",
    _scaled_mm_heads,
    lambda q, x_scale, w_int8, w_scale, bias, out_dtype, norm, eps, tables, *lora: q.new_empty(
        3, q.shape[0] // tables.shape[1], tables.shape[1], w_int8.shape[0] // (3 * norm.shape[1]), norm.shape[1],
        dtype=out_dtype,
    ),
)
""":data:`scaled_mm` of a fused q|k|v projection, handed on as attention's inputs [3, batch, tokens,
heads, head]: queries and keys RMS-normalized per head (``norm`` [2, head]: the queries' weight,
the keys') and rotated by the angles in ``tables`` (:func:`~engine.heads.rotation_tables`;
:func:`engine.heads.attention_inputs`); the projection with its LoRA term where ``lora_*`` are given
(:data:`scaled_mm`)."""


def int8_attention_inputs(
    x: torch.Tensor | NormedInput | QuantizedInput,
    weight: Int8Weight,
    norm: QKNormRope,
    lora: LoraFactors | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v [batch, heads, tokens, head] from a fused q|k|v projection of ``x`` [batch, tokens, K]:
    :func:`int8_linear` followed by :func:`~engine.heads.attention_inputs`, which the Triton GEMM
    computes in its epilogue (the projection's output never reaches memory as such). Each is stored
    token-major (a transposed view of [batch, tokens, heads, head]), so attention's output is too and
    its rows [batch · tokens, heads · head] go to the output projection without a copy. ``lora``: the
    projection's dynamic LoRA, added before the norms."""
    dtype, shape = _described(x)
    _check(dtype, shape, *weight, None, lora)
    head, tokens = norm.query_weight.shape[0], norm.rope.shape[0]
    n = weight.w_int8.shape[0]
    if len(shape) != 3 or shape[1] != tokens or n % (3 * head) or tuple(norm.rope.shape) != (tokens, head // 2, 2, 2):
        raise ValueError(
            f"attention's inputs need x [batch, {tokens}, K] (a token per rotation), a projection 3·heads·{head} "
            f"wide and rope [{tokens}, {head // 2}, 2, 2]; got x {tuple(shape)}, {n} outputs, rope {tuple(norm.rope.shape)}"
        )
    quantized = x if isinstance(x, QuantizedInput) else _quantized_input(x, 0, dtype, shape)
    weights = torch.stack([norm.query_weight, norm.key_weight])
    run = scaled_mm_heads if torch.compiler.is_compiling() else _scaled_mm_heads
    out = run(quantized.q, quantized.scale, weight.w_int8, _flat_scale(weight.w_scale), weight.bias, dtype, weights,
              norm.eps, rotation_tables(norm.rope), *_lora_args(lora, 0, dtype))  # fmt: skip
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
) -> torch.Tensor:
    """``x · (w_int8 · w_scale)ᵀ + bias (+ LoRA term)`` with per-token int8 activations (module docstring).

    x: [..., K] float16/bfloat16/float32, an :class:`ActivatedInput` or :class:`NormedInput` of that
    width, or a :class:`QuantizedInput` (quantized with the same ``rotation``). w_int8: int8 [N, K].
    w_scale: float, [] / [1] (tensor-wise) or [N] / [N, 1] (per output channel). bias: [N] or None.
    Result: [..., N] in ``out_dtype`` (default x's). ``rotation``: the Hadamard group size ``w_int8`` was
    rotated with (0: not rotated); ``x`` is rotated the same way before it is quantized. The LoRA
    factors act on the unrotated ``x`` (its down factor is rotated the same way, for the rotated tokens).
    """
    if isinstance(x, QuantizedInput) and x.rotation != rotation:
        raise ValueError("a quantized input takes the rotation it was quantized with")
    dtype, shape = _described(x)
    _check(dtype, shape, w_int8, w_scale, bias, out_dtype, lora)
    quantized = x if isinstance(x, QuantizedInput) else _quantized_input(x, rotation, dtype, shape)
    run = scaled_mm if torch.compiler.is_compiling() else _scaled_mm
    out = run(quantized.q, quantized.scale, w_int8, _flat_scale(w_scale), bias, out_dtype or dtype,
              *_lora_args(lora, rotation, dtype))  # fmt: skip
    return out.reshape(*shape[:-1], w_int8.shape[0])


def int8_swiglu(
    x: torch.Tensor | ActivatedInput | NormedInput | QuantizedInput,
    gate: Int8Weight,
    up: Int8Weight,
    out_dtype: torch.dtype | None = None,
    rotation: int = 0,
    loras: tuple[LoraFactors | None, LoraFactors | None] = (None, None),
) -> torch.Tensor:
    """SwiGLU of two layers on one input, ``silu(x · gateᵀ + gate bias) · (x · upᵀ + up bias)``, in one
    gated GEMM: the two products never reach memory. Each product is rounded to ``out_dtype`` (default
    x's) first, as two separate layers round their outputs; the rest is computed in float32 and
    rounded once.

    x as :func:`int8_linear` takes it; ``gate`` and ``up``: weights of one shape [N, K] (their scales
    and biases of any kind), rotated with ``rotation`` if it is not 0. ``loras``: the gate's and the up
    layer's dynamic LoRA factors (or None), each added to its product.
    """
    if isinstance(x, QuantizedInput) and x.rotation != rotation:
        raise ValueError("a quantized input takes the rotation it was quantized with")
    dtype, shape = _described(x)
    _check(dtype, shape, *gate, out_dtype, loras[0])
    if up.w_int8.shape != gate.w_int8.shape:
        raise ValueError(f"the up weight must have the gate's shape {tuple(gate.w_int8.shape)}, got {tuple(up.w_int8.shape)}")
    _check(dtype, shape, *up, out_dtype, loras[1])
    quantized = x if isinstance(x, QuantizedInput) else _quantized_input(x, rotation, dtype, shape)
    gate_scale, gate_bias, *up_args = _swiglu_args(gate, up)
    gate_lora, up_lora = (_lora_args(lora, rotation, dtype) for lora in loras)
    run = scaled_mm if torch.compiler.is_compiling() else _scaled_mm
    out = run(quantized.q, quantized.scale, gate.w_int8, gate_scale, gate_bias, out_dtype or dtype, *gate_lora,
              *up_args, *up_lora)  # fmt: skip
    return out.reshape(*shape[:-1], gate.w_int8.shape[0])

"""Fusions around the int8 ops in compiled graphs of model code that is not ours (ComfyUI's).

Our own models hand their int8 layers fused inputs (:mod:`engine.fusion`). Model code that is not ours
calls one int8 layer per Linear with finished tensors, and inductor cannot fuse across our ops (custom
ops, opaque to it), so a compiled ComfyUI model writes out what ours never do. :class:`Int8GraphFusion`,
an inductor post-grad pass that only touches ``int8_studio::*`` nodes and what lies between them,
rewrites the graph:

* **norm and modulation in the quantization**: quantizing ``norm(x) · (1 + scale) (+ shift)`` (a layer norm
  or an RMS norm with its weight, one scale and shift per sample: the blocks of Flux, Chroma and
  Z-Image) normalizes in the quantization kernel (``quantize_normed_tokens``): the normalized tokens are
  never written out;
* **one quantization** per tensor: ``quantize_tokens`` of a tensor already quantized the same way reuses
  that result (Z-Image's ``w1`` and ``w3`` take one input);
* **gated GEMM**: ``silu(A) · B``, where A and B are equally wide channel ranges of int8 GEMMs on one
  quantized input, becomes one gated ``scaled_mm`` on those rows of the weights: the two products are
  never written out (Flux.2's fused gate|up in-projection, Z-Image's ``w1``/``w3``);
* **narrowing**: a GEMM whose output is read only in some channel ranges computes those alone, one
  GEMM per range (a Flux.2 single block's ``linear1`` once its MLP half runs gated);
* **RoPE inlined**: comfy-kitchen's ``apply_rope`` (ComfyUI's Flux family) becomes its arithmetic in aten
  ops, which inductor fuses with the QK norm before it (q and k are written once, not twice);
* **activation and prefix in the quantization**: quantizing ``activation(A)`` or ``cat([P, activation(A)],
  -1)`` (GELU-tanh, a SwiGLU left ungated, or none) reads A and P where they are and applies the
  activation on the way in (``quantize_activated_tokens``): neither is written out (the MLP
  down-projections of Chroma and Flux.1, every single block's ``linear2`` input).

The int8 products are the same; the gated epilogue rounds once where ``silu(a) · b`` in bf16 rounds twice.
Weight rows are sliced as views of the layer's own int8 weight (contiguous: whole rows), so nothing is
copied. Nodes a rewrite makes get their fake values at once, so inductor lowers them like traced ones.
:func:`install` puts the pass in inductor's config (the node pack does on loading a model).
"""

from __future__ import annotations

import hashlib
import logging
import math
import operator
import os
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import torch
from torch import fx
from torch._guards import detect_fake_mode
from torch._inductor.custom_graph_pass import CustomGraphPass

import engine.int8.ops  # noqa: F401 (defines the int8_studio ops the pass matches)
from engine.int8.backends import kernels

log = logging.getLogger("int8_studio")

aten, prims, int8 = torch.ops.aten, torch.ops.prims, torch.ops.int8_studio
VIEWS = (aten.reshape.default, aten.view.default, aten._unsafe_view.default)
CASTS = (prims.convert_element_type.default,)


def _call(node, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _uncast(node: fx.Node) -> fx.Node:
    while _call(node, *CASTS):
        node = node.args[0]
    return node


def _shape(node: fx.Node) -> tuple[int, ...]:
    return tuple(node.meta["val"].shape)


def _plain_gemm(node) -> bool:
    """A ``scaled_mm`` without a LoRA term or a gate: one product, whose channels may be split."""
    return (
        _call(node, int8.scaled_mm.default)
        and all(a is None for a in node.args[6:])
        and all(v is None for v in node.kwargs.values())
    )


class Channels(NamedTuple):
    """Output channels ``[lo, hi)`` of the int8 GEMM ``gemm`` (2-D), in the leading shape ``sizes``
    (a view's size argument, whose last entry is ignored; None: the GEMM's own [tokens, channels])."""

    gemm: fx.Node
    lo: int
    hi: int
    sizes: list | None


def _last_dim(node: fx.Node, dim: int) -> bool:
    return dim in (-1, len(_shape(node)) - 1)


def channels(node: fx.Node) -> Channels | None:
    """The channels of a plain int8 GEMM that ``node`` is, through views that keep the last dimension
    and slices or splits of it; None if it is anything else."""
    if "val" not in node.meta or not isinstance(_shape(node)[-1], int):
        return None
    node, offset, width, sizes = _uncast(node), 0, _shape(node)[-1], None
    while True:
        if _plain_gemm(node):
            return Channels(node, offset, offset + width, sizes)
        if _call(node, *VIEWS) and _shape(node)[-1] == _shape(node.args[0])[-1]:
            sizes = node.args[1] if sizes is None else sizes
            node = node.args[0]
        elif _call(node, aten.slice.Tensor) and _last_dim(node.args[0], _arg(node, 1, 0)) and _arg(node, 4, 1) == 1:
            offset += _start(node)
            node = node.args[0]
        elif _call(node, operator.getitem) and _call(node.args[0], aten.split.Tensor, aten.split_with_sizes.default):
            split, index = node.args
            sizes_of_parts = _sizes(split)
            if sizes_of_parts is None or not _last_dim(split.args[0], _arg(split, 2, 0)):
                return None
            offset += sum(sizes_of_parts[:index])
            node = split.args[0]
        else:
            return None


def _arg(node: fx.Node, index: int, default):
    """``node``'s positional argument ``index``, or ``default`` where it is left out (or None)."""
    value = node.args[index] if len(node.args) > index else None
    return default if value is None else value


def _start(slice_node: fx.Node) -> int:
    start = _arg(slice_node, 2, 0)
    return start + _shape(slice_node.args[0])[-1] if start < 0 else start


def _sizes(split: fx.Node) -> list[int] | None:
    """The widths of a split's parts, or None where they are symbolic."""
    width, size = _shape(split.args[0])[-1], split.args[1]
    if isinstance(size, int) and isinstance(width, int):
        return [min(size, width - i) for i in range(0, width, size)]
    return list(size) if isinstance(size, (list, tuple)) and all(isinstance(n, int) for n in size) else None


def _silu_input(node: fx.Node) -> fx.Node | None:
    """x where ``node`` computes ``silu(x)``: the op itself or its decompositions, in any dtype."""
    node = _uncast(node)
    if _call(node, aten.silu.default):
        return node.args[0]
    if _call(node, aten.mul.Tensor):  # x · sigmoid(x)
        for x, s in (node.args, node.args[::-1]):
            if _call(s, aten.sigmoid.default) and _uncast(s.args[0]) is _uncast(x):
                return x
    if _call(node, aten.div.Tensor):  # x / (1 + exp(-x))
        x, d = node.args
        one = _call(d, aten.add.Tensor) and 1 in d.args
        e = next((a for a in d.args if _call(a, aten.exp.default)), None) if one else None
        if e is not None and _call(e.args[0], aten.neg.default) and _uncast(e.args[0].args[0]) is _uncast(x):
            return x
    return None


class _Builder:
    """New nodes with their fake values, so inductor lowers them as it lowers traced ones."""

    def __init__(self, graph: fx.Graph) -> None:
        self.graph = graph
        self.fake_mode = detect_fake_mode([n.meta.get("val") for n in graph.nodes if "val" in n.meta])

    def __call__(self, target, *args) -> fx.Node:
        node = self.graph.call_function(target, args)
        with self.fake_mode:
            node.meta["val"] = target(*fx.node.map_arg(args, lambda a: a.meta["val"]))
        return node

    def rows(self, tensor: fx.Node | None, lo: int, hi: int) -> fx.Node | None:
        """Rows ``[lo, hi)`` of a weight, its scale (unless one for the tensor) or bias: a view."""
        if tensor is None or tensor.meta["val"].numel() == 1:
            return tensor
        return self(aten.slice.Tensor, tensor, 0, lo, hi)

    def gemm(self, part: Channels, up: Channels | None = None) -> fx.Node:
        """The plain GEMM of ``part`` alone, or gated with ``up`` as its up product."""
        q, x_scale, w, w_scale, bias, dtype = part.gemm.args[:6]
        args = [q, x_scale, self.rows(w, part.lo, part.hi), self.rows(w_scale, part.lo, part.hi),
                self.rows(bias, part.lo, part.hi), dtype, None, None, None]  # fmt: skip
        if up is not None:
            _, _, up_w, up_scale, up_bias = up.gemm.args[:5]
            args += [self.rows(up_w, up.lo, up.hi), self.rows(up_scale, up.lo, up.hi), self.rows(up_bias, up.lo, up.hi)]
        return self(int8.scaled_mm.default, *args)

    def like(self, value: fx.Node, node: fx.Node, part: Channels) -> fx.Node:
        """``value``, a GEMM's output for ``part``, in ``node``'s shape and dtype (its leading shape from
        the view the graph made, whose sizes may be symbolic)."""
        if part.sizes is not None:
            value = self(aten.reshape.default, value, [*part.sizes[:-1], _shape(value)[-1]])
        dtype = node.meta["val"].dtype
        return value if value.meta["val"].dtype == dtype else self(prims.convert_element_type.default, value, dtype)


def _scale_kind(gemm: fx.Node) -> bool:
    return gemm.args[3].meta["val"].numel() == 1


def _gateable(gate: Channels | None, up: Channels | None) -> bool:
    """Whether one gated GEMM can compute both: one quantized input, equal widths, alike scales and biases."""
    if gate is None or up is None:
        return False
    a, b = gate.gemm, up.gemm
    return (
        a.args[0] is b.args[0] and a.args[1] is b.args[1] and a.args[5] == b.args[5]
        and gate.hi - gate.lo == up.hi - up.lo and _scale_kind(a) == _scale_kind(b)
        and (a.args[4] is None) == (b.args[4] is None)
    )  # fmt: skip


def share_quantizations(graph: fx.Graph, build: _Builder) -> int:
    """Make each ``quantize_tokens`` of a tensor already quantized the same way use that result."""
    seen: dict[tuple, fx.Node] = {}
    shared = 0
    for node in list(graph.nodes):
        if not _call(node, int8.quantize_tokens.default):
            continue
        x = node.args[0]
        base = x.args[0] if _call(x, *VIEWS) else x
        shape = tuple(map(str, _shape(x)))  # symbolic sizes as expressions: a SymInt has no hash
        key = (base, shape, tuple(node.args[1:]), tuple(sorted(node.kwargs.items())))
        if key in seen:  # its (q, scale) items become the first one's
            first = {item.args[1]: item for item in seen[key].users if _call(item, operator.getitem)}
            for item in [u for u in node.users if _call(u, operator.getitem)]:
                if item.args[1] in first:
                    item.replace_all_uses_with(first[item.args[1]])
                else:
                    item.replace_input_with(node, seen[key])
            if not node.users:
                graph.erase_node(node)
            shared += 1
        else:
            seen[key] = node
    return shared


def gate_products(graph: fx.Graph, build: _Builder) -> int:
    """``silu(A) · B`` of channels of int8 GEMMs on one input → one gated GEMM."""
    gated = 0
    for node in list(graph.nodes):
        if not _call(node, aten.mul.Tensor) or len(node.args) != 2:
            continue
        for s, b in (node.args, node.args[::-1]):
            a = _silu_input(s) if isinstance(s, fx.Node) else None
            gate, up = (channels(a), channels(b)) if a is not None and isinstance(b, fx.Node) else (None, None)
            if _gateable(gate, up):
                with graph.inserting_before(node):
                    node.replace_all_uses_with(build.like(build.gemm(gate, up), node, gate))
                gated += 1
                break
    return gated


def _channel_uses(gemm: fx.Node) -> list[tuple[fx.Node, Channels]] | None:
    """The nodes that read ``gemm``'s output as channel ranges (views, slices and splits followed to the
    first node that is none of them), or None if a use reads all of it."""
    uses, todo = [], [gemm]
    while todo:
        node = todo.pop()
        for user in node.users:
            if _call(user, *VIEWS, aten.slice.Tensor) and channels(user) is not None:
                todo.append(user)
            elif _call(user, aten.split.Tensor, aten.split_with_sizes.default):
                parts = list(user.users)
                if any(channels(p) is None for p in parts):
                    return None
                todo.extend(parts)
            elif node is gemm:
                return None
            elif all(u is not node for u, _ in uses):
                uses.append((node, channels(node)))
    return uses


def narrow_gemms(graph: fx.Graph, build: _Builder) -> int:
    """A GEMM read only in some disjoint channel ranges → one GEMM per range."""
    narrowed = 0
    for gemm in list(graph.nodes):
        if not _plain_gemm(gemm):
            continue
        uses = _channel_uses(gemm)
        if not uses:
            continue
        ranges = sorted((c.lo, c.hi) for _, c in uses)
        used = sum(hi - lo for lo, hi in ranges)
        disjoint = all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:], strict=False))
        if not disjoint or used >= _shape(gemm)[-1]:
            continue
        for node, part in uses:
            with graph.inserting_before(node):
                node.replace_all_uses_with(build.like(build.gemm(part), node, part))
        narrowed += 1
    return narrowed


def _constant(node, value: float) -> bool:
    return isinstance(node, float) and abs(node - value) < 1e-6 * abs(value)


def _scaled(node, value: float) -> fx.Node | None:
    """x where ``node`` is ``x · value``."""
    if _call(node, aten.mul.Tensor):
        x, c = node.args if isinstance(node.args[0], fx.Node) else node.args[::-1]
        return x if _constant(c, value) else None
    return None


def _gelu_tanh_input(node: fx.Node) -> fx.Node | None:
    """x where ``node`` computes ``gelu(x, approximate="tanh")`` as its decomposition does:
    ``x/2 · (1 + tanh(√(2/π) · (x + 0.044715 · x³)))``."""
    node = _uncast(node)
    if _call(node, aten.gelu.default) and node.kwargs.get("approximate", "none") == "tanh":
        return node.args[0]
    if not _call(node, aten.mul.Tensor) or len(node.args) != 2:
        return None
    for half, one_plus in (node.args, node.args[::-1]):
        x = _scaled(half, 0.5)
        if x is None or not (_call(one_plus, aten.add.Tensor) and 1 in one_plus.args):
            continue
        tanh = next((a for a in one_plus.args if _call(a, aten.tanh.default)), None)
        inner = _scaled(tanh.args[0], (2 / math.pi) ** 0.5) if tanh is not None else None
        if _call(inner, aten.add.Tensor) and x in inner.args:
            cubic = _scaled(next((a for a in inner.args if a is not x), None), 0.044715)
            if _call(cubic, aten.mul.Tensor) and x in cubic.args:
                return x
    return None


def _activation(y: fx.Node) -> tuple[str, fx.Node, fx.Node | None]:
    """``y`` as an activation the quantization kernel applies: ``(name, a, b)`` (``identity`` if none)."""
    a = _gelu_tanh_input(y)
    if a is not None:
        return "gelu_tanh", _uncast(a), None  # the kernel reads bf16 itself: no float32 copy
    if _call(y, aten.mul.Tensor) and len(y.args) == 2:
        for s, b in (y.args, y.args[::-1]):
            a = _silu_input(s) if isinstance(s, fx.Node) else None
            if a is not None and isinstance(b, fx.Node) and _same_shape(a, b):
                return "swiglu", _uncast(a), _uncast(b)
    return "identity", y, None


def _same_shape(a: fx.Node, b: fx.Node) -> bool:
    return tuple(map(str, _shape(a))) == tuple(map(str, _shape(b)))  # symbolic sizes compared as expressions


def _quantized(node: fx.Node) -> fx.Node | None:
    """What a ``quantize_tokens`` node quantizes, before the view that flattens it to tokens (None where
    that view regroups the channels)."""
    x = node.args[0]
    if not _call(x, *VIEWS):
        return x
    return x.args[0] if str(_shape(x.args[0])[-1]) == str(_shape(x)[-1]) else None


def quantize_activated(graph: fx.Graph, build: _Builder) -> int:
    """``quantize_tokens`` of ``activation(a, b)``, or of ``cat([P, activation(a, b)], -1)`` (any activation,
    identity too) → ``quantize_activated_tokens(activation, a, b, prefix=P)``: what the kernel applies on
    the way in is never written out."""
    fused = 0
    for node in list(graph.nodes):
        if not _call(node, int8.quantize_tokens.default):
            continue
        y = _quantized(node)
        if y is None:
            continue
        y, prefix = _uncast(y), None
        if _call(y, aten.cat.default) and len(y.args[0]) == 2 and _last_dim(y, y.args[1] if len(y.args) > 1 else 0):
            prefix, y = y.args[0]
        activation, a, b = _activation(_uncast(y))
        parts = [t for t in (a, b, prefix) if t is not None]
        if (prefix is None and activation == "identity") or not all(isinstance(_shape(t)[-1], int) for t in parts):
            continue
        rotation = node.args[1] if len(node.args) > 1 else node.kwargs.get("rotation", 0)
        with graph.inserting_before(node):
            a, b, prefix = (None if t is None else build(aten.reshape.default, t, [-1, _shape(t)[-1]]) for t in (a, b, prefix))
            quantized = build(int8.quantize_activated_tokens.default, activation, a, b, prefix, rotation)
        node.replace_all_uses_with(quantized)
        graph.erase_node(node)
        fused += 1
    return fused


def _layer_norm(node: fx.Node) -> tuple[fx.Node, float] | None:
    """``(x, eps)`` where ``node`` computes ``layer_norm(x, eps)`` without a weight, as decomposed:
    ``(x - mean) · rsqrt(var + eps)`` of ``var_mean(x)`` over the last dimension."""
    node = _uncast(node)
    if not _call(node, aten.mul.Tensor) or len(node.args) != 2:
        return None
    for centred, r in (node.args, node.args[::-1]):
        if not (_call(centred, aten.sub.Tensor) and _call(r, aten.rsqrt.default) and _call(r.args[0], aten.add.Tensor)):
            continue
        (x, mean), (var, eps) = centred.args, r.args[0].args
        stats = var.args[0] if _call(var, operator.getitem) else None
        if (
            _call(stats, aten.var_mean.correction) and stats.args[0] is x and isinstance(eps, float)
            and var.args[1] == 0 and _call(mean, operator.getitem) and mean.args == (stats, 1)
            and list(stats.args[1]) in ([-1], [len(_shape(x)) - 1]) and stats.kwargs.get("correction") == 0
        ):  # fmt: skip
            return _uncast(x), eps
    return None


def _rms_norm(node: fx.Node) -> tuple[fx.Node, float, fx.Node | None] | None:
    """``(x, eps, weight)`` where ``node`` computes ``rms_norm(x, eps) · weight`` (weight optional), as
    decomposed: ``x · rsqrt(mean(x², -1) + eps)``."""
    node, weight = _uncast(node), None
    if _call(node, aten.mul.Tensor) and len(node.args) == 2 and not any(_call(_uncast(a), aten.rsqrt.default) for a in node.args):
        inner, weight = node.args  # the weight's product
        node = _uncast(inner)
        if not isinstance(weight, fx.Node) or len(_shape(weight)) != 1:
            return None
    if not _call(node, aten.mul.Tensor) or len(node.args) != 2:
        return None
    for x, r in (node.args, node.args[::-1]):
        mean = _uncast(r.args[0]).args[0] if _call(r, aten.rsqrt.default) and _call(_uncast(r.args[0]), aten.add.Tensor, aten.add.Scalar) else None
        eps = _uncast(r.args[0]).args[1] if mean is not None else None
        square = mean.args[0] if _call(mean, aten.mean.dim) and list(mean.args[1]) in ([-1], [len(_shape(x)) - 1]) else None
        if _call(square, aten.pow.Tensor_Scalar) and square.args == (x, 2) and isinstance(eps, float):
            return _uncast(x), eps, None if weight is None else _uncast(weight)
    return None


def _modulated(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node | None] | None:
    """``(normed, scale, shift)`` where ``node`` is ``normed · (1 + scale) + shift`` (ComfyUI's
    ``addcmul(shift, normed, 1 + scale)``, or the product and the sum) or ``normed · (1 + scale)``
    (shift None)."""
    node, shift = _uncast(node), None
    if _call(node, aten.addcmul.default) and len(node.args) == 3 and not node.kwargs:
        shift, *factors = node.args
    elif _call(node, aten.add.Tensor) and _call(_uncast(node.args[0]), aten.mul.Tensor):
        factors, shift = _uncast(node.args[0]).args, node.args[1]
    elif _call(node, aten.mul.Tensor) and len(node.args) == 2:
        factors = node.args
    else:
        return None
    if shift is not None and not isinstance(shift, fx.Node):
        return None
    for normed, one_plus in (factors, factors[::-1]):
        one_plus = _uncast(one_plus)
        if _call(one_plus, aten.add.Tensor) and one_plus.args[1] == 1:
            return normed, one_plus.args[0], shift
    return None


def quantize_normed(graph: fx.Graph, build: _Builder) -> int:
    """``quantize_tokens`` of ``norm(x) · (1 + scale) (+ shift)``, a layer or RMS norm (with a weight), one
    scale and shift per sample → ``quantize_normed_tokens``: the normalized tokens are never written out."""
    fused = 0
    widest = kernels.SINGLE_PASS_MAX_K if kernels is not None else None
    for node in list(graph.nodes):
        if not _call(node, int8.quantize_tokens.default) or _arg(node, 1, 0):
            continue
        y = _quantized(node)
        modulated = _modulated(y) if y is not None else None
        if modulated is None:
            continue
        normed, scale, shift = modulated
        layer, rms = _layer_norm(normed), _rms_norm(normed)
        if layer is None and rms is None:
            continue
        x, eps, weight = (*layer, None) if layer else rms
        shape, width = _shape(x), _shape(x)[-1]
        per_sample = all(
            len(_shape(t)) == 3 and str(_shape(t)[0]) == str(shape[0]) and _shape(t)[1] == 1 and _shape(t)[2] == width
            for t in (scale, shift) if t is not None
        )  # fmt: skip
        if len(shape) != 3 or not per_sample or not isinstance(width, int) or (widest and width > widest):
            continue
        with graph.inserting_before(node):
            tokens = shape[1] if isinstance(shape[1], int) else build(aten.sym_size.int, x, 1)
            x2, scale, shift = (t if t is None else build(aten.reshape.default, t, [-1, width]) for t in (x, scale, shift))
            quantized = build(int8.quantize_normed_tokens.default, x2, layer is None, weight, eps, scale, shift, tokens)
        node.replace_all_uses_with(quantized)
        graph.erase_node(node)
        fused += 1
    return fused


def _rope(build: _Builder, x: fx.Node, freqs: fx.Node) -> fx.Node:
    """Interleaved RoPE in aten ops, as ComfyUI's reference computes it (``comfy.ldm.flux.math._apply_rope1``):
    channel pairs of x [..., D] rotated by ``freqs`` [..., D/2, 2, 2] in its float32, the result in x's dtype."""
    shape = [d if isinstance(d, int) else build(aten.sym_size.int, x, i) for i, d in enumerate(_shape(x))]
    pairs = build(aten.reshape.default, build(prims.convert_element_type.default, x, freqs.meta["val"].dtype),
                  [*shape[:-1], _shape(x)[-1] // 2, 1, 2])  # fmt: skip
    terms = [build(aten.mul.Tensor, build(aten.select.int, freqs, -1, i), build(aten.select.int, pairs, -1, i))
             for i in (0, 1)]  # fmt: skip
    rotated = build(aten.reshape.default, build(aten.add.Tensor, *terms), shape)
    return build(prims.convert_element_type.default, rotated, x.meta["val"].dtype)


def inline_rope(graph: fx.Graph, build: _Builder) -> int:
    """comfy-kitchen's ``apply_rope(q, k, freqs)`` (ComfyUI's Flux-family RoPE, a custom op inductor cannot
    fuse) → its arithmetic in aten ops, which inductor fuses with the QK norm before it: q and k are
    written once, not twice."""
    rope_op = getattr(getattr(torch.ops, "comfy_kitchen", None), "apply_rope", None)
    inlined = 0
    for node in list(graph.nodes):
        if rope_op is None or not _call(node, rope_op.default) or len(node.args) != 3 or node.kwargs:
            continue
        q, k, freqs = node.args
        width, f = _shape(q)[-1], _shape(freqs)
        same = [str(d) for d in _shape(q)] == [str(d) for d in _shape(k)] and len(f) == len(_shape(q)) + 2
        if not (same and isinstance(width, int) and f[-3:] == (width // 2, 2, 2) and str(f[2]) == str(_shape(q)[2])):
            continue
        items = {u.args[1]: u for u in node.users if _call(u, operator.getitem)}
        if len(items) != len(node.users):
            continue
        with graph.inserting_before(node):
            rotated = [_rope(build, t, freqs) for t in (q, k)]
        for index, item in items.items():
            item.replace_all_uses_with(rotated[index])
        inlined += 1
    return inlined


REWRITES = (
    ("shared quantizations", share_quantizations),
    ("gated GEMMs", gate_products),
    ("narrowed GEMMs", narrow_gemms),  # after the gates: what they left of a GEMM
    ("fused quantizations", quantize_activated),
    ("fused quantizations", quantize_normed),
    ("inlined RoPE", inline_rope),
)
"""The rewrites, in the order they run, each under the name ``Int8GraphFusion.totals`` counts it by."""


class Int8GraphFusion(CustomGraphPass):
    """The post-grad pass (module docstring)."""

    totals: Counter[str] = Counter()
    """What the pass rewrote, summed over the graphs it ran on since ``totals.clear()`` (a graph inductor
    takes from its cache is not rewritten again: it was when it was cached)."""

    def __call__(self, graph: fx.Graph) -> None:
        """Each rewrite in turn. One that fails on a graph it was not written for stops there and the rest
        of the graph stays as traced: every site it finished is whole (its new nodes replace the old ones'
        uses last), so the compilation goes on, only less fused, and a warning says so."""
        if not any(_call(n, int8.scaled_mm.default) for n in graph.nodes):
            return
        build, counts = _Builder(graph), Counter()
        for name, rewrite in REWRITES:
            try:
                counts[name] += rewrite(graph, build)
            except Exception:
                log.warning("INT8 Studio: graph fusion (%s) failed; that part of the graph runs unfused",
                            name, exc_info=True)  # fmt: skip
            graph.eliminate_dead_code()
        graph.lint()
        Int8GraphFusion.totals.update(counts)
        log.debug("INT8 Studio graph fusion: %s", dict(counts))

    def uuid(self) -> bytes:
        """This file's hash: compiled graphs cached with another version of the pass are not reused."""
        return hashlib.sha256(Path(__file__).read_bytes()).digest()


def install() -> bool:
    """Run :class:`Int8GraphFusion` in inductor's later compilations of this process. False (and a log
    line) where another post-grad pass is installed already (it is left alone), or where the environment
    sets ``INT8_STUDIO_GRAPH_FUSION=0`` (to compare, or to rule the pass out): the fusions are off then."""
    import torch._inductor.config as config

    current = config.post_grad_custom_post_pass
    if isinstance(current, Int8GraphFusion):
        return True
    if os.environ.get("INT8_STUDIO_GRAPH_FUSION") == "0":
        log.info("INT8 Studio: INT8_STUDIO_GRAPH_FUSION=0: compiled int8 graphs run unfused")
        return False
    if current is not None:
        log.info("INT8 Studio: another inductor post-grad pass is installed; compiled int8 graphs run unfused")
        return False
    config.post_grad_custom_post_pass = Int8GraphFusion()
    return True

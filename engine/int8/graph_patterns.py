"""What nodes of an inductor post-grad graph compute, for :mod:`engine.int8.graph_fusion`: channel ranges of
our int8 GEMMs' outputs, and SiLU, GELU-tanh, layer and RMS norms and their modulation in the forms
PyTorch's decompositions give them (any dtype, casts between the steps).

Each recognizer returns the inputs of what it recognized, or None: a graph it was not written for is
left alone.
"""

from __future__ import annotations

import math
import operator
from typing import NamedTuple

import torch
from torch import fx

import engine.int8.ops  # noqa: F401 (defines the int8_studio ops matched here)

aten, prims, int8 = torch.ops.aten, torch.ops.prims, torch.ops.int8_studio
VIEWS = (aten.reshape.default, aten.view.default, aten._unsafe_view.default)
CASTS = (prims.convert_element_type.default,)


def calls(node, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def uncast(node: fx.Node) -> fx.Node:
    while calls(node, *CASTS):
        node = node.args[0]
    return node


def shape_of(node: fx.Node) -> tuple[int, ...]:
    return tuple(node.meta["val"].shape)


def plain_gemm(node) -> bool:
    """A ``scaled_mm`` without a gate (with a LoRA term or not): one product, whose channels may be split."""
    return (
        calls(node, int8.scaled_mm.default)
        and all(a is None for a in node.args[9:])
        and all(v is None for k, v in node.kwargs.items() if k.startswith("up_"))
    )


class Channels(NamedTuple):
    """Output channels ``[lo, hi)`` of the int8 GEMM ``gemm`` (2-D), in the leading shape ``sizes``
    (a view's size argument, whose last entry is ignored; None: the GEMM's own [tokens, channels])."""

    gemm: fx.Node
    lo: int
    hi: int
    sizes: list | None


def last_dim(node: fx.Node, dim: int) -> bool:
    return dim in (-1, len(shape_of(node)) - 1)


def over_last_dim(node: fx.Node, reduced: list[int]) -> bool:
    """Whether a reduction's dimensions ``reduced`` are ``node``'s last one alone."""
    return len(reduced) == 1 and last_dim(node, reduced[0])


def channels(node: fx.Node) -> Channels | None:
    """The channels of a plain int8 GEMM that ``node`` is, through views that keep the last dimension
    and slices or splits of it; None if it is anything else."""
    if "val" not in node.meta or not isinstance(shape_of(node)[-1], int):
        return None
    node, offset, width, sizes = uncast(node), 0, shape_of(node)[-1], None
    while True:
        if plain_gemm(node):
            return Channels(node, offset, offset + width, sizes)
        if calls(node, *VIEWS) and shape_of(node)[-1] == shape_of(node.args[0])[-1]:
            sizes = node.args[1] if sizes is None else sizes
            node = node.args[0]
        elif _channel_slice(node):
            offset += _start(node)
            node = node.args[0]
        elif calls(node, operator.getitem) and calls(node.args[0], aten.split.Tensor, aten.split_with_sizes.default):
            split, index = node.args
            sizes_of_parts = _sizes(split)
            if sizes_of_parts is None or not last_dim(split.args[0], argument(split, 2, 0)):
                return None
            offset += sum(sizes_of_parts[:index])
            node = split.args[0]
        else:
            return None


def argument(node: fx.Node, index: int, default):
    """``node``'s positional argument ``index``, or ``default`` where it is left out (or None)."""
    value = node.args[index] if len(node.args) > index else None
    return default if value is None else value


def _channel_slice(node: fx.Node) -> bool:
    """Whether ``node`` is a slice of its input's last dimension with step 1."""
    return calls(node, aten.slice.Tensor) and last_dim(node.args[0], argument(node, 1, 0)) and argument(node, 4, 1) == 1


def _start(slice_node: fx.Node) -> int:
    start = argument(slice_node, 2, 0)
    return start + shape_of(slice_node.args[0])[-1] if start < 0 else start


def _sizes(split: fx.Node) -> list[int] | None:
    """The widths of a split's parts, or None where they are symbolic."""
    width, size = shape_of(split.args[0])[-1], split.args[1]
    if isinstance(size, int) and isinstance(width, int):
        return [min(size, width - i) for i in range(0, width, size)]
    return list(size) if isinstance(size, (list, tuple)) and all(isinstance(n, int) for n in size) else None


def silu_input(node: fx.Node) -> fx.Node | None:
    """x where ``node`` computes ``silu(x)``: the op itself or its decompositions, in any dtype."""
    node = uncast(node)
    if calls(node, aten.silu.default):
        return node.args[0]
    if calls(node, aten.mul.Tensor):  # x · sigmoid(x)
        for x, s in (node.args, node.args[::-1]):
            if calls(s, aten.sigmoid.default) and uncast(s.args[0]) is uncast(x):
                return x
    if calls(node, aten.div.Tensor):  # x / (1 + exp(-x))
        x, d = node.args
        one = calls(d, aten.add.Tensor) and 1 in d.args
        e = next((a for a in d.args if calls(a, aten.exp.default)), None) if one else None
        if e is not None and calls(e.args[0], aten.neg.default) and uncast(e.args[0].args[0]) is uncast(x):
            return x
    return None


def _constant(node, value: float) -> bool:
    return isinstance(node, (int, float)) and abs(node - value) < 1e-6 * abs(value)


def _scaled(node, value: float) -> fx.Node | None:
    """x where ``node`` is ``x · value``."""
    if calls(node, aten.mul.Tensor):
        x, c = node.args if isinstance(node.args[0], fx.Node) else node.args[::-1]
        return x if _constant(c, value) else None
    return None


def gelu_tanh_input(node: fx.Node) -> fx.Node | None:
    """x where ``node`` computes ``gelu(x, approximate="tanh")`` as its decomposition does:
    ``x/2 · (1 + tanh(√(2/π) · (x + 0.044715 · x³)))``."""
    node = uncast(node)
    if calls(node, aten.gelu.default) and node.kwargs.get("approximate", "none") == "tanh":
        return node.args[0]
    if not calls(node, aten.mul.Tensor) or len(node.args) != 2:
        return None
    for half, one_plus in (node.args, node.args[::-1]):
        x = _scaled(half, 0.5)
        if x is None or not (calls(one_plus, aten.add.Tensor) and 1 in one_plus.args):
            continue
        tanh = next((a for a in one_plus.args if calls(a, aten.tanh.default)), None)
        inner = _scaled(tanh.args[0], (2 / math.pi) ** 0.5) if tanh is not None else None
        if calls(inner, aten.add.Tensor) and x in inner.args:
            cubic = _scaled(next((a for a in inner.args if a is not x), None), 0.044715)
            if calls(cubic, aten.mul.Tensor) and x in cubic.args:
                return x
    return None


def activation_of(y: fx.Node) -> tuple[str, fx.Node, fx.Node | None]:
    """``y`` as an activation the quantization kernel applies: ``(name, a, b)`` (``identity`` if none)."""
    a = gelu_tanh_input(y)
    if a is not None:
        return "gelu_tanh", uncast(a), None  # the kernel reads bf16 itself: no float32 copy
    if calls(y, aten.mul.Tensor) and len(y.args) == 2:
        for s, b in (y.args, y.args[::-1]):
            a = silu_input(s) if isinstance(s, fx.Node) else None
            if a is not None and isinstance(b, fx.Node) and dims(a) == dims(b):
                return "swiglu", uncast(a), uncast(b)
    return "identity", y, None


def dims(node: fx.Node) -> tuple[str, ...]:
    """``node``'s sizes as expressions: symbolic ones compare equal where they are the same expression (a
    SymInt neither hashes nor compares without adding a guard), static ones as their numbers."""
    return tuple(map(str, shape_of(node)))


def layer_norm(node: fx.Node) -> tuple[fx.Node, float] | None:
    """``(x, eps)`` where ``node`` computes ``layer_norm(x, eps)`` without a weight, as decomposed:
    ``(x - mean) · rsqrt(var + eps)`` of ``var_mean(x)`` over the last dimension."""
    node = uncast(node)
    if not calls(node, aten.mul.Tensor) or len(node.args) != 2:
        return None
    for centred, r in (node.args, node.args[::-1]):
        if not (calls(centred, aten.sub.Tensor) and calls(r, aten.rsqrt.default) and calls(r.args[0], aten.add.Tensor)):
            continue
        (x, mean), (var, eps) = centred.args, r.args[0].args
        stats = var.args[0] if calls(var, operator.getitem) else None
        if (
            calls(stats, aten.var_mean.correction) and stats.args[0] is x and isinstance(eps, float)
            and var.args[1] == 0 and calls(mean, operator.getitem) and mean.args == (stats, 1)
            and over_last_dim(x, stats.args[1]) and stats.kwargs.get("correction") == 0
        ):  # fmt: skip
            return uncast(x), eps
    return None


def rms_norm(node: fx.Node) -> tuple[fx.Node, float, fx.Node | None] | None:
    """``(x, eps, weight)`` where ``node`` computes ``rms_norm(x, eps) · weight`` (weight optional), as
    decomposed: ``x · rsqrt(mean(x², -1) + eps)``."""
    node, weight = uncast(node), None
    if not calls(node, aten.mul.Tensor) or len(node.args) != 2:
        return None
    if not any(calls(uncast(a), aten.rsqrt.default) for a in node.args):  # the weight's product
        inner, weight = node.args
        node = uncast(inner)
        if not (isinstance(weight, fx.Node) and len(shape_of(weight)) == 1 and calls(node, aten.mul.Tensor)):
            return None
    for x, r in (node.args, node.args[::-1]):
        plus_eps = uncast(r.args[0]) if calls(r, aten.rsqrt.default) else None
        if not calls(plus_eps, aten.add.Tensor, aten.add.Scalar):
            continue
        mean, eps = plus_eps.args
        square = mean.args[0] if calls(mean, aten.mean.dim) and over_last_dim(x, mean.args[1]) else None
        if calls(square, aten.pow.Tensor_Scalar) and square.args == (x, 2) and isinstance(eps, float):
            return uncast(x), eps, None if weight is None else uncast(weight)
    return None


def modulated(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node | None] | None:
    """``(normed, scale, shift)`` where ``node`` is ``normed · (1 + scale) + shift`` (ComfyUI's
    ``addcmul(shift, normed, 1 + scale)``, or the product and the sum in either order) or ``normed · (1 +
    scale)`` (shift None)."""
    for factors, shift in _products(uncast(node)):
        if shift is not None and not isinstance(shift, fx.Node):
            continue
        for normed, one_plus in (factors, factors[::-1]):
            one_plus = uncast(one_plus)
            if calls(one_plus, aten.add.Tensor) and one_plus.args[1] == 1:
                return _times_one(normed), one_plus.args[0], shift
    return None


def _products(node: fx.Node):
    """``(factors, addend)`` pairs that ``node`` may be: an ``addcmul``, a product plus an addend, or a
    product alone (addend None)."""
    if calls(node, aten.addcmul.default) and len(node.args) == 3 and not node.kwargs:
        yield node.args[1:], node.args[0]
    elif calls(node, aten.add.Tensor) and len(node.args) == 2 and not node.kwargs:  # no alpha
        for product, addend in (node.args, node.args[::-1]):
            if calls(uncast(product), aten.mul.Tensor):
                yield uncast(product).args, addend
    elif calls(node, aten.mul.Tensor) and len(node.args) == 2:
        yield node.args, None


def _times_one(node: fx.Node) -> fx.Node:
    """``t`` for ``t · 1``: PyTorch ≤ 2.11 decomposes ``addcmul(s, t, m)`` as ``s + (t · 1) · m`` (its
    ``value``), newer releases keep the ``addcmul``."""
    x = _scaled(uncast(node), 1)
    return node if x is None else x

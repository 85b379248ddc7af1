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

Layers with a dynamic LoRA keep every fusion: ``scaled_mm`` takes the LoRA's factors and computes the
term from the quantized tokens, so a gate or a narrowing carries each product's LoRA rows along.
The int8 products are the same; the gated epilogue rounds once where ``silu(a) · b`` in bf16 rounds twice.
Weight rows are sliced as views of the layer's own int8 weight (contiguous: whole rows), so nothing is
copied. Nodes a rewrite makes get their fake values at once, so inductor lowers them like traced ones.
:func:`install` puts the pass in inductor's config (the node pack does on loading a model).
"""

from __future__ import annotations

import hashlib
import logging
import operator
import os
from collections import Counter
from pathlib import Path

import torch
from torch import fx
from torch._guards import detect_fake_mode
from torch._inductor.custom_graph_pass import CustomGraphPass

from engine.int8 import graph_patterns
from engine.int8.backends import kernels
from engine.int8.graph_patterns import (
    VIEWS,
    Channels,
    activation_of,
    argument,
    aten,
    calls,
    channels,
    dims,
    int8,
    last_dim,
    layer_norm,
    modulated,
    plain_gemm,
    prims,
    rms_norm,
    shape_of,
    silu_input,
    uncast,
)

log = logging.getLogger("int8_studio")


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
        """The plain GEMM of ``part`` alone, or gated with ``up`` as its up product, each with its
        LoRA term's rows."""
        q, x_scale, dtype = part.gemm.args[0], part.gemm.args[1], part.gemm.args[5]
        weight = self.product(part)
        args = [q, x_scale, *weight[:3], dtype, *weight[3:]]
        return self(int8.scaled_mm.default, *args, *(self.product(up) if up is not None else ()))

    def product(self, part: Channels) -> list:
        """``part``'s weight, scale, bias, LoRA down, up and scale, cut to its rows (weight, scale, bias
        and LoRA up have one per output channel)."""
        w, w_scale, bias = part.gemm.args[2:5]
        down, up, scale = (argument(part.gemm, i, None) for i in range(6, 9))
        rows = [self.rows(t, part.lo, part.hi) for t in (w, w_scale, bias)]
        return [*rows, down, None if up is None else self(aten.slice.Tensor, up, 0, part.lo, part.hi), scale]

    def tokens(self, tensor: fx.Node) -> fx.Node:
        """``tensor`` [..., C] as [tokens, C], the 2-D form the quantization kernels take."""
        return self(aten.reshape.default, tensor, [-1, shape_of(tensor)[-1]])

    def like(self, value: fx.Node, node: fx.Node, part: Channels) -> fx.Node:
        """``value``, a GEMM's output for ``part``, in ``node``'s shape and dtype (its leading shape from
        the view the graph made, whose sizes may be symbolic)."""
        if part.sizes is not None:
            value = self(aten.reshape.default, value, [*part.sizes[:-1], shape_of(value)[-1]])
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
        if not calls(node, int8.quantize_tokens.default):
            continue
        x = node.args[0]
        base = x.args[0] if calls(x, *VIEWS) else x
        key = (base, dims(x), tuple(node.args[1:]), tuple(sorted(node.kwargs.items())))
        if key in seen:  # its (q, scale) items become the first one's
            first = {item.args[1]: item for item in seen[key].users if calls(item, operator.getitem)}
            for item in [u for u in node.users if calls(u, operator.getitem)]:
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
        if not calls(node, aten.mul.Tensor) or len(node.args) != 2:
            continue
        for s, b in (node.args, node.args[::-1]):
            a = silu_input(s) if isinstance(s, fx.Node) else None
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
            if calls(user, *VIEWS, aten.slice.Tensor) and channels(user) is not None:
                todo.append(user)
            elif calls(user, aten.split.Tensor, aten.split_with_sizes.default):
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
        if not plain_gemm(gemm):
            continue
        uses = _channel_uses(gemm)
        if not uses:
            continue
        ranges = sorted((c.lo, c.hi) for _, c in uses)
        used = sum(hi - lo for lo, hi in ranges)
        disjoint = all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:], strict=False))
        if not disjoint or used >= shape_of(gemm)[-1]:
            continue
        for node, part in uses:
            with graph.inserting_before(node):
                node.replace_all_uses_with(build.like(build.gemm(part), node, part))
        narrowed += 1
    return narrowed


def _quantized(node: fx.Node) -> fx.Node | None:
    """What a ``quantize_tokens`` node quantizes, before the view that flattens it to tokens (None where
    that view regroups the channels)."""
    x = node.args[0]
    if not calls(x, *VIEWS):
        return x
    return x.args[0] if dims(x.args[0])[-1] == dims(x)[-1] else None


def quantize_activated(graph: fx.Graph, build: _Builder) -> int:
    """``quantize_tokens`` of ``activation(a, b)``, or of ``cat([P, activation(a, b)], -1)`` (any activation,
    identity too) → ``quantize_activated_tokens(activation, a, b, prefix=P)``: what the kernel applies on
    the way in is never written out."""
    fused = 0
    for node in list(graph.nodes):
        if not calls(node, int8.quantize_tokens.default):
            continue
        y = _quantized(node)
        if y is None:
            continue
        y, prefix = uncast(y), None
        if calls(y, aten.cat.default) and len(y.args[0]) == 2 and last_dim(y, argument(y, 1, 0)):
            prefix, y = y.args[0]
        activation, a, b = activation_of(uncast(y))
        parts = [t for t in (a, b, prefix) if t is not None]
        if (prefix is None and activation == "identity") or not all(isinstance(shape_of(t)[-1], int) for t in parts):
            continue
        rotation = node.args[1] if len(node.args) > 1 else node.kwargs.get("rotation", 0)
        with graph.inserting_before(node):
            a, b, prefix = (None if t is None else build.tokens(t) for t in (a, b, prefix))
            quantized = build(int8.quantize_activated_tokens.default, activation, a, b, prefix, rotation)
        node.replace_all_uses_with(quantized)
        graph.erase_node(node)
        fused += 1
    return fused


def quantize_normed(graph: fx.Graph, build: _Builder) -> int:
    """``quantize_tokens`` of ``norm(x) · (1 + scale) (+ shift)``, a layer or RMS norm (with a weight), one
    scale and shift per sample → ``quantize_normed_tokens``: the normalized tokens are never written out."""
    fused = 0
    widest = kernels.SINGLE_PASS_MAX_K if kernels is not None else None
    for node in list(graph.nodes):
        if not calls(node, int8.quantize_tokens.default) or argument(node, 1, 0):
            continue
        y = _quantized(node)
        parts = modulated(y) if y is not None else None
        if parts is None:
            continue
        normed, scale, shift = parts
        layer, rms = layer_norm(normed), rms_norm(normed)
        if layer is None and rms is None:
            continue
        x, eps, weight = (*layer, None) if layer else rms
        shape, width = shape_of(x), shape_of(x)[-1]
        per_sample = all(dims(t) == (dims(x)[0], "1", str(width)) for t in (scale, shift) if t is not None)
        if len(shape) != 3 or not per_sample or not isinstance(width, int) or (widest and width > widest):
            continue
        with graph.inserting_before(node):
            tokens = shape[1] if isinstance(shape[1], int) else build(aten.sym_size.int, x, 1)
            x2, scale, shift = (None if t is None else build.tokens(t) for t in (x, scale, shift))
            quantized = build(int8.quantize_normed_tokens.default, x2, layer is None, weight, eps, scale, shift, tokens)
        node.replace_all_uses_with(quantized)
        graph.erase_node(node)
        fused += 1
    return fused


def _rope(build: _Builder, x: fx.Node, freqs: fx.Node) -> fx.Node:
    """Interleaved RoPE in aten ops, as ComfyUI's reference computes it (``comfy.ldm.flux.math._apply_rope1``):
    channel pairs of x [..., D] rotated by ``freqs`` [..., D/2, 2, 2] in its float32, the result in x's dtype."""
    shape = [d if isinstance(d, int) else build(aten.sym_size.int, x, i) for i, d in enumerate(shape_of(x))]
    pairs = build(aten.reshape.default, build(prims.convert_element_type.default, x, freqs.meta["val"].dtype),
                  [*shape[:-1], shape_of(x)[-1] // 2, 1, 2])  # fmt: skip
    terms = [build(aten.mul.Tensor, build(aten.select.int, freqs, -1, i), build(aten.select.int, pairs, -1, i))
             for i in (0, 1)]  # fmt: skip
    rotated = build(aten.reshape.default, build(aten.add.Tensor, *terms), shape)
    return build(prims.convert_element_type.default, rotated, x.meta["val"].dtype)


def inline_rope(graph: fx.Graph, build: _Builder) -> int:
    """comfy-kitchen's ``apply_rope(q, k, freqs)`` (ComfyUI's Flux-family RoPE, a custom op inductor cannot
    fuse) → its arithmetic in aten ops, which inductor fuses with the QK norm before it: q and k are
    written once, not twice."""
    rope_op = getattr(getattr(torch.ops, "comfy_kitchen", None), "apply_rope", None)
    if rope_op is None:  # comfy-kitchen not loaded: no such op in any graph
        return 0
    inlined = 0
    for node in list(graph.nodes):
        if not calls(node, rope_op.default) or len(node.args) != 3 or node.kwargs:
            continue
        q, k, freqs = node.args
        width, f = shape_of(q)[-1], shape_of(freqs)
        same = dims(q) == dims(k) and len(f) == len(shape_of(q)) + 2
        if not (same and isinstance(width, int) and f[-3:] == (width // 2, 2, 2) and dims(freqs)[2] == dims(q)[2]):
            continue
        items = {u.args[1]: u for u in node.users if calls(u, operator.getitem)}
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
        if not any(calls(n, int8.scaled_mm.default) for n in graph.nodes):
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
        """The hash of the pass's two modules: compiled graphs cached with another version of the pass are
        not reused."""
        sources = (Path(__file__), Path(graph_patterns.__file__))
        return hashlib.sha256(b"".join(path.read_bytes() for path in sources)).digest()


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

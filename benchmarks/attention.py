"""8-bit attention on the GPU against the anchors, at the models' shapes (issue 27).

Self-attention of bf16 q, k, v [1, 24 heads, tokens, 128] (Flux.2 / Z-Image: 4608 tokens at 1024², 16896
at 2048²), each contestant timed with ``triton.testing.do_bench`` in the same run: our
``int8_attention`` (its block quantization of q and k included; on GPUs with fp8 MMA also with its ``P V``
in float8, ``quantized_attention(fp8_pv=True)``, V's quantization included), PyTorch SDPA with each backend it has
(flash, cuDNN, memory-efficient; the best one is the baseline), and where they import the
``sageattention`` package and FlashAttention (2, and 3 as ``flash_attn_interface``). Error: relative L2
against SDPA's output.

    PYTHONPATH=. python3 benchmarks/attention.py [--quick] [--tokens N ...] [--sweep]

``--sweep`` times our kernel's launches (``AttentionTiles``: queries and keys per tile, warps, stages), each
``P V`` precision, against the best SDPA of the same run, to choose the defaults from.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
from collections.abc import Callable

import torch
import torch.nn.functional as F
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel

from engine.int8 import kernels
from engine.int8.kernels.attention import AttentionTiles
from engine.int8.attention import int8_attention

HEADS, HEAD_DIM = 24, 128
TOKENS = (4608, 16896)
SDPA_BACKENDS = {
    "SDPA flash": SDPBackend.FLASH_ATTENTION,
    "SDPA cuDNN": SDPBackend.CUDNN_ATTENTION,
    "SDPA efficient": SDPBackend.EFFICIENT_ATTENTION,
}

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def tokens_major(flash_attn_func) -> Attention:
    """A FlashAttention function (q, k, v [batch, tokens, heads, head_dim]) on [batch, heads, tokens,
    head_dim] views, as the models hold them."""

    def attend(q, k, v):
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return (out[0] if isinstance(out, tuple) else out).transpose(1, 2)  # FA3 also returns the LSE

    return attend


def contestants() -> dict[str, Attention]:
    """Every attention this machine has, ours first (SDPA's run under their backend, chosen by
    :func:`measure` outside the timed calls)."""
    found: dict[str, Attention] = {"int8 (ours)": int8_attention}
    if torch.cuda.get_device_capability() >= (8, 9):
        fp8_pv = functools.partial(kernels.quantized_attention, sm_scale=HEAD_DIM**-0.5, fp8_pv=True)
        found["int8, fp8 PV (ours)"] = fp8_pv
    found |= dict.fromkeys(SDPA_BACKENDS, F.scaled_dot_product_attention)
    try:
        from sageattention import sageattn

        found["sageattention"] = lambda q, k, v: sageattn(q, k, v, tensor_layout="HND", is_causal=False)
    except ImportError:
        pass
    for name, module in (("FlashAttention-2", "flash_attn"), ("FlashAttention-3", "flash_attn_interface")):
        try:
            found[name] = tokens_major(__import__(module).flash_attn_func)
        except ImportError:
            pass
    return found


def measure(tokens: int, rep: int) -> list[dict]:
    """One row per contestant that runs at this size: ms per call, TFLOPS, error against SDPA's output."""
    q, k, v = torch.randn(3, 1, HEADS, tokens, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    with sdpa_kernel(list(SDPA_BACKENDS.values())):
        want = F.scaled_dot_product_attention(q, k, v).double()
    flops = 4 * HEADS * tokens**2 * HEAD_DIM
    rows = []
    for name, attend in contestants().items():
        backend = SDPA_BACKENDS.get(name)
        with sdpa_kernel([backend]) if backend else contextlib.nullcontext():
            try:
                out = attend(q, k, v)
            except RuntimeError as error:  # an SDPA backend this GPU or build lacks
                print(f"  {name}: unavailable ({str(error).splitlines()[0][:80]})")
                continue
            ms = triton.testing.do_bench(lambda attend=attend: attend(q, k, v), rep=rep)
        error = ((out.double() - want).norm() / want.norm()).item()
        rows.append({"tokens": tokens, "name": name, "ms": ms, "TFLOPS": flops / ms / 1e9, "error": error})
    best_sdpa = min(r["ms"] for r in rows if r["name"].startswith("SDPA"))
    for row in rows:
        row["× best SDPA"] = best_sdpa / row["ms"]
    return rows


def sweep(tokens: int, rep: int) -> list[str]:
    """Our kernel with each :class:`AttentionTiles` and ``P V`` precision, fastest first."""
    q, k, v = torch.randn(3, 1, HEADS, tokens, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    want = F.scaled_dot_product_attention(q, k, v).double()
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]):
        sdpa_ms = triton.testing.do_bench(lambda: F.scaled_dot_product_attention(q, k, v), rep=rep)
    fp8 = [False, True] if torch.cuda.get_device_capability() >= (8, 9) else [False]
    rows = []
    for fp8_pv, queries, keys, warps, stages in itertools.product(fp8, (64, 128), (64, 128), (4, 8), (2, 3, 4)):
        tiles = AttentionTiles(queries, keys, warps, stages)
        attend = functools.partial(kernels.quantized_attention, q, k, v, HEAD_DIM**-0.5, fp8_pv=fp8_pv, tiles=tiles)
        try:
            error = ((attend().double() - want).norm() / want.norm()).item()
            ms = triton.testing.do_bench(attend, rep=rep)
        except Exception as failed:  # noqa: BLE001 - out of shared memory or registers: reported, not ranked
            print(f"  {tiles} fp8 PV {fp8_pv}: {str(failed).splitlines()[0][:80]}")
            continue
        rows.append((ms, f"{tokens:>6}  fp8 PV {fp8_pv!s:<5} {tiles}  {ms:7.3f} ms  {sdpa_ms / ms:5.2f}× SDPA  "
                         f"error {error:.2%}"))
    return [f"{tokens:>6}  best SDPA {sdpa_ms:.3f} ms"] + [line for _, line in sorted(rows)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS), help="token counts (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="the first token count only, shorter timings")
    parser.add_argument("--sweep", action="store_true", help="time our kernel's launches (module docstring)")
    args = parser.parse_args()
    tokens = args.tokens[:1] if args.quick else args.tokens
    print(f"Attention of bf16 [1, {HEADS}, tokens, {HEAD_DIM}] on {torch.cuda.get_device_name()}")
    if args.sweep:
        for n in tokens:
            print("\n".join(sweep(n, rep=20 if args.quick else 50)), flush=True)
        return
    for n in tokens:
        for row in measure(n, rep=20 if args.quick else 100):
            print(
                f"{row['tokens']:>6}  {row['name']:<18} {row['ms']:8.3f} ms  {row['TFLOPS']:6.0f} TFLOPS  "
                f"{row['× best SDPA']:5.2f}× best SDPA  error vs SDPA {row['error']:.2%}",
                flush=True,
            )


if __name__ == "__main__":
    main()

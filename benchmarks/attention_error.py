"""The error int8 attention adds to a model step, next to the int8 linears' (issue 27), on the CPU.

    PYTHONPATH=. python3 benchmarks/attention_error.py flux2-klein-9b --res 1024 2048 --blocks 1 [--fp8-pv]

The named model (``int8-studio bench``'s names) is built as ``benchmarks/layer_error.py`` builds it: real
widths, ``--blocks`` blocks per stack, random weights with std 1/√in, float32 on the CPU. One step at each
``--res`` with the model's own prompt length (Flux 512 text tokens, Z-Image and Qwen-Image 256) runs four
ways, each compared with the first (relative L2 of the output):

- reference: float32 linears, float32 SDPA;
- int8 attention: q, k, v rounded to bfloat16 and attended as the int8 kernel does, its output in bfloat16
  (``tests.int8_reference.attention_emulation``: the Triton kernel's rounding in PyTorch, checked against
  the kernel in ``tests/test_int8_attention.py``; the interpreter would take hours per call here); with
  ``--fp8-pv``, its ``P V`` in float8 (``quantized_attention(fp8_pv=True)``);
- int8 linears: the architecture's high-precision rule, row-wise weights, per-token activations; SDPA;
- both.

Per call, in the int8-attention run: each attention call's error against float32 SDPA of the same q, k, v,
for int8 and for bfloat16 SDPA (q, k, v and output rounded: what any bf16 model's attention has). Random
weights make nearly uniform attention: docs/PERFORMANCE.md says how far the numbers carry to trained
checkpoints. Peak memory: the float32 model, its int8 layers and one step's activations (the emulation
runs a few heads at a time).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.layer_error import quantized, rel_error
from engine.bench import SEED
from engine.fusion import install_attention
from engine.models.build import named_config, random_model
from tests.int8_reference import attention_emulation

Call = tuple[int, float, float]
"""One attention call: tokens, int8 error, bfloat16 SDPA error (against float32 SDPA)."""


def emulated_int8_attention(calls: list[Call] | None = None, fp8_pv: bool = False) -> Callable:
    """The model's attention as the int8 kernel computes it in a bfloat16 model (``fp8_pv``: with its
    float8 ``P V``); with ``calls``, each call's errors appended to it."""

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        half = [t.to(torch.bfloat16) for t in (q, k, v)]
        out = attention_emulation(*half, q.shape[-1] ** -0.5, fp8_pv=fp8_pv).to(q.dtype)
        if calls is not None:
            exact = F.scaled_dot_product_attention(q, k, v)
            bf16 = F.scaled_dot_product_attention(*half)
            calls.append((q.shape[2], rel_error(out, exact), rel_error(bf16, exact)))
        return out

    return attend


@torch.no_grad()
def step(model: nn.Module, inputs: dict, attention: Callable | None = None) -> torch.Tensor:
    """One step's output with ``attention`` installed (None: SDPA)."""
    install_attention(model, attention)
    try:
        return model(**inputs)
    finally:
        install_attention(model, None)


def per_call(calls: list[Call]) -> str:
    """The calls' errors by token count: ``tokens: int8 (bf16)``, a range where calls differ."""
    spans = []
    for tokens in sorted({c[0] for c in calls}, reverse=True):
        int8, bf16 = zip(*((c[1], c[2]) for c in calls if c[0] == tokens))
        spans.append(f"{tokens}: {_span(int8)} ({_span(bf16)})")
    return ", ".join(spans)


def _span(errors: tuple[float, ...]) -> str:
    low, high = min(errors), max(errors)
    return f"{low:.2%}" + (f"–{high:.2%}" if high - low >= 5e-5 else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a known model name, e.g. flux2-klein-9b, zimage-turbo, qwen-image")
    parser.add_argument("--res", type=int, nargs="+", default=[1024, 2048], help="image sides in pixels")
    parser.add_argument("--blocks", type=int, default=1, help="blocks per stack (default 1)")
    parser.add_argument("--no-linears", action="store_true",
                        help="skip the int8-linear runs (half the time; their error is per token, like at 1024²)")
    parser.add_argument("--fp8-pv", action="store_true", help="the int8 attention's P V in float8 (its option)")
    args = parser.parse_args()

    arch, config, label = named_config(args.model)
    config = {**config, **{k: min(args.blocks, int(config[k])) for k in arch.depth_keys}}
    model = random_model(arch, config, torch.device("cpu"), torch.float32, SEED).eval()
    blocks = ", ".join(f"{k} {config[k]}" for k in arch.depth_keys)
    pv = "float8" if args.fp8_pv else "bfloat16"
    print(f"{label} at its widths, {blocks}, float32 on the CPU; int8 attention's P V in {pv}", flush=True)
    started = time.monotonic()
    inputs = {res: model.random_inputs(1, res, None, SEED) for res in args.res}
    reference, int8_attention, calls = {}, {}, {res: [] for res in args.res}
    for res in args.res:
        reference[res] = step(model, inputs[res])
        attended = step(model, inputs[res], emulated_int8_attention(calls[res], args.fp8_pv))
        int8_attention[res] = rel_error(attended, reference[res])
    print("| model | res | int8 attention | int8 linears | both | per call, tokens: int8 (bf16) |")
    for res in args.res:
        linears = both = "not run"
        if not args.no_linears:
            with quantized(model, "rowwise", arch.keeps_high_precision):
                linears = f"{rel_error(step(model, inputs[res]), reference[res]):.2%}"
                attended = step(model, inputs[res], emulated_int8_attention(None, args.fp8_pv))
                both = f"{rel_error(attended, reference[res]):.2%}"
        row = (label, f"{res}²", f"{int8_attention[res]:.2%}", linears, both, per_call(calls[res]))
        print(f"| {' | '.join(row)} |", flush=True)
    print(f"({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()

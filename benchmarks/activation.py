"""The activation fused into the down-projections' activation quantization: what it saves per call.

For the down-projection inputs of Flux.2 Klein 9B and Z-Image at 1024² (M = 4608 tokens), times
``kernels.quantize_tokens`` of the activation computed in PyTorch first (what a layer did before:
SwiGLU or GELU in bf16, a concatenation with the attention output in Flux single blocks, then the
quantization kernel) against the same quantization given the activation's inputs
(``engine.fusion.ActivatedInput``), with and without the Hadamard rotation. Run on a GPU machine:

    PYTHONPATH=. python3 benchmarks/activation.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import triton.testing

from engine.int8 import kernels
from engine.fusion import ActivatedInput
from engine.int8.rotation import hadamard

TOKENS = 4608
# name: (activation, width of its output, prefix width, width of the in-projection's output, whose
# last columns are the activation's inputs)
INPUTS = {
    "Klein 9B double mlp.2": ("swiglu", 12288, 0, 2 * 12288),
    "Klein 9B single linear2": ("swiglu", 12288, 4096, 3 * 4096 + 2 * 12288),
    "Chroma single linear2": ("gelu_tanh", 12288, 3072, 3 * 3072 + 12288),
    "Z-Image w2": ("swiglu", 10240, 0, 2 * 10240),
}


def activated_input(activation: str, width: int, prefix: int, source: int) -> ActivatedInput:
    inputs = 2 * width if activation == "swiglu" else width
    h = torch.randn(TOKENS, source, device="cuda", dtype=torch.bfloat16)[:, source - inputs :]
    a, b = h.chunk(2, dim=1) if activation == "swiglu" else (h, None)
    p = torch.randn(TOKENS, prefix, device="cuda", dtype=torch.bfloat16) if prefix else None
    return ActivatedInput(activation, a, b, p)


def times(x: ActivatedInput) -> dict[str, float]:
    """µs per call: unfused and fused, plain and rotated."""
    h16 = hadamard(16, "cuda", torch.bfloat16)
    calls = {
        "unfused": lambda: kernels.quantize_tokens(x.materialize()),
        "fused": lambda: kernels.quantize_tokens(x),
        "unfused, rotated": lambda: kernels.quantize_rotated_tokens(x.materialize(), h16),
        "fused, rotated": lambda: kernels.quantize_rotated_tokens(x, h16),
    }
    return {name: triton.testing.do_bench(call) * 1e3 for name, call in calls.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    rows = []
    print(f"{'input':26} {'K':>6} {'unfused':>9} {'fused':>9} {'ratio':>6} {'rot. unfused':>13} {'rot. fused':>11} {'ratio':>6}")
    for name, spec in INPUTS.items():
        x = activated_input(*spec)
        t = times(x)
        rows.append({"input": name, "K": x.width, **t})
        print(f"{name:26} {x.width:6} {t['unfused']:9.1f} {t['fused']:9.1f} {t['unfused'] / t['fused']:5.2f}× "
              f"{t['unfused, rotated']:13.1f} {t['fused, rotated']:11.1f} {t['unfused, rotated'] / t['fused, rotated']:5.2f}×",
              flush=True)  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "activation.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

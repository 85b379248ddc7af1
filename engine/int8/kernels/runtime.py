"""The Triton side of every int8 kernel launch: the version check, the launch cache, host-side helpers.

Importing this module (and so :mod:`engine.int8.kernels`) raises ``ImportError`` where Triton is
missing or older than :data:`MIN_TRITON`; :mod:`engine.int8.backends` then falls back to
``torch._int_mm`` and says why (``KERNELS_MISSING``).
"""

from __future__ import annotations

import torch
import triton

MIN_TRITON = (3, 4)
"""``tl.range(warp_specialize=...)`` and descriptors made inside a kernel arrived in Triton 3.4."""


def triton_release(version: str) -> tuple[int, int]:
    """``(major, minor)`` of a Triton version string such as ``"3.6.0"`` or ``"3.4.0+git1a2b"``."""
    major, minor = version.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


if triton_release(triton.__version__) < MIN_TRITON:  # the backends then fall back to torch._int_mm
    raise ImportError(f"the int8 kernels need Triton 3.4 or newer, found {triton.__version__}")

# imported after the check, whose error says why an old Triton is refused
from triton.compiler import CompiledKernel
from triton.tools.tensor_descriptor import TensorDescriptor

try:  # Triton's compile queue (a private module): where it is missing, kernels compile one by one
    from triton.runtime._async_compile import AsyncCompileMode
except ImportError:
    AsyncCompileMode = None

_COMPILED: dict[tuple, tuple[CompiledKernel, list[str]]] = {}


def launch(kernel: triton.JITFunction, grid: tuple[int, ...], *args, compile_only: bool = False, **named) -> None:
    """``kernel[grid](*args, **named)``: runtime arguments by position, constexprs and launch options
    (``num_warps``, …) by name; through the binary Triton compiled for an earlier call alike in
    everything Triton specializes on (:func:`_arg_key`) and in every named value.

    Triton's own launch binds and specializes each argument again at every call, a host cost per
    layer that left small images host-bound (docs/PERFORMANCE.md has the measurements). A first call,
    and every call in the interpreter, goes through Triton. The current GPU is part of the key: a
    compiled kernel is loaded into one GPU's context. ``compile_only`` compiles without launching
    (under ``AsyncCompileMode``: queues the compilation)."""
    if compile_only:
        kernel.warmup(*args, grid=grid, **named)
        return
    device = torch.cuda.current_device() if torch.cuda.is_initialized() else None  # binaries load per GPU
    key = (kernel, device, *map(_arg_key, args), *named.items())
    hit = _COMPILED.get(key)
    if hit is None:
        compiled = kernel[grid](*args, **named)
        constexprs = kernel.arg_names[len(args) :]
        if isinstance(compiled, CompiledKernel) and all(name in named for name in constexprs):
            _COMPILED[key] = compiled, constexprs
        return
    compiled, constexprs = hit
    compiled[(*grid, 1, 1)[:3]](*args, *[named[name] for name in constexprs])


# triton.cdiv and triton.next_power_of_2 are JIT functions in newer Triton releases, slow host calls
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _arg_key(arg) -> tuple | type:
    """What Triton (3.4–3.6) compiles a runtime argument into its kernel: a tensor's dtype and whether
    its address is a multiple of 16; an integer's width (i32, i64, u64), whether it is 1 (then a
    constant) and whether it is a multiple of 16; a descriptor's dtype and block shape. Other values
    (floats, booleans, None) only by their type. ``tests/test_kernels.py`` checks this against Triton's
    own specialization."""
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() & 15 == 0
    if type(arg) is int:
        return arg == 1, arg & 15 == 0, -(2**31) <= arg < 2**31, arg < 2**63
    if isinstance(arg, TensorDescriptor):
        return arg.base.dtype, tuple(arg.block_shape)
    return type(arg)

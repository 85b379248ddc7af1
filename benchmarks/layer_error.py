"""The int8 error of each Linear of a model on its real widths, and what the high-precision rule buys.

    PYTHONPATH=. python3 benchmarks/layer_error.py flux1-dev --blocks 1 --res 256 --text 128

The named model (``int8-studio bench``'s names) is built at its real widths with ``--blocks`` blocks per
stack, its weights drawn as the benchmark draws them (``random_tensor``: std 1/√in, so activations keep
unit scale), and one step runs in float32 with each Linear's input recorded. Each Linear then runs in
int8 (``Int8Linear``: ``--scheme`` weight scales, per-token activations) on its own recorded input; its
error is ‖int8 − float‖ / ‖float‖ of the layer's output. Last, the whole model's output error with the
architecture's high-precision rule, with it and each ``--keep`` glob (and its first-blocks preset) kept in
float too, with the kept weights each ``--int8`` glob matches in int8, and with every Linear quantized.
Fits a CPU (Flux.1 dev, one block per stack: ~0.7B parameters, float32). Random weights give each layer
realistic inputs only as far as the model's own norms and activations shape them: trained checkpoints
have outlier channels these lack. ``layer_error_comfyui.py`` measures the families only ComfyUI runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from fnmatch import fnmatchcase

import torch
from torch import nn

from engine.bench import SEED
from engine.int8.linear import Int8Linear
from engine.models.build import named_config, random_model
from engine.models.spec import MIN_QUANT_DIM, Architecture


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def recorded_inputs(model: nn.Module, run: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``run()``'s output and every Linear's input in it, by layer name (the last call's for a shared layer)."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        m.register_forward_pre_hook(lambda m, args, n=n: seen.__setitem__(n, args[0].detach()))
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear)
    ]
    with torch.no_grad():
        out = run()
    for h in hooks:
        h.remove()
    return out, seen


@contextmanager
def quantized(model: nn.Module, scheme: str, keep) -> Iterator[None]:
    """Every Linear whose weight ``keep`` does not keep is an ``Int8Linear`` inside the block, the float
    layer again after it."""
    swapped = [
        (name, m) for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and not keep(f"{name}.weight", tuple(m.weight.shape))
    ]  # fmt: skip
    for name, m in swapped:
        _set(model, name, Int8Linear.from_float(m, scheme))
    try:
        yield
    finally:
        for name, m in swapped:
            _set(model, name, m)


def _set(model: nn.Module, name: str, layer: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, layer)


def kept_with(arch: Architecture, globs: tuple[str, ...]):
    """The architecture's high-precision rule, with the weights ``globs`` match kept too."""
    return lambda name, shape: arch.keeps_high_precision(name, shape) or any(fnmatchcase(name, g) for g in globs)


def int8_with(arch: Architecture, globs: tuple[str, ...]):
    """The architecture's high-precision rule, with the weights ``globs`` match in int8 all the same."""
    return lambda name, shape: arch.keeps_high_precision(name, shape) and (
        min(shape) < MIN_QUANT_DIM or not any(fnmatchcase(name, g) for g in globs)
    )


def print_errors(model: nn.Module, run: Callable[[], torch.Tensor], arch: Architecture, args) -> None:
    """The per-layer table, then the output error of each rule (``args``: :func:`arguments`' options):
    ``run()`` runs ``model`` once."""
    reference, seen = recorded_inputs(model, run)
    print(f"{'layer':48} {'[out, in]':>14} {'tokens':>7} {'error':>7}  kept by rule")
    for name, x in seen.items():
        linear = model.get_submodule(name)
        shape = tuple(linear.weight.shape)
        with torch.no_grad():
            error = rel_error(Int8Linear.from_float(linear, args.scheme)(x), linear(x))
        kept = "yes" if arch.keeps_high_precision(f"{name}.weight", shape) else ""
        tokens = x.reshape(-1, x.shape[-1]).shape[0]
        print(f"{name:48} {str(list(shape)):>14} {tokens:>7} {error:7.3%}  {kept}", flush=True)
    del seen

    print()
    for what, rule in (
        ("the architecture's rule", arch.keeps_high_precision),
        (f"the rule, first blocks kept ({', '.join(arch.first_blocks)})", kept_with(arch, arch.first_blocks)),
        *((f"the rule, {glob} kept", kept_with(arch, (glob,))) for glob in args.keep),
        *((f"the rule, {glob} int8", int8_with(arch, (glob,))) for glob in args.int8),
        ("every Linear", lambda _name, shape: min(shape) < MIN_QUANT_DIM),
    ):
        with quantized(model, args.scheme, rule), torch.no_grad():
            out = run()
        print(f"model output error, int8 by {what}: {rel_error(out, reference):.3%}", flush=True)


def arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options both this benchmark and ``layer_error_comfyui.py`` take."""
    parser.add_argument("--blocks", type=int, default=1, help="blocks per stack (default 1)")
    parser.add_argument("--text", type=int, default=128, help="prompt tokens (default 128)")
    parser.add_argument("--scheme", choices=("rowwise", "tensorwise"), default="rowwise")
    parser.add_argument("--keep", action="append", default=[], metavar="GLOB",
                        help="also measure the rule with these weights kept (repeatable), e.g. '*_mod.lin.*'")
    parser.add_argument("--int8", action="append", default=[], metavar="GLOB",
                        help="also measure the rule with these kept weights int8 (repeatable), e.g. 'tproj.*'")
    return parser


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a known model name, e.g. flux1-dev, flux2-klein-4b, zimage-turbo")
    parser.add_argument("--res", type=int, default=256, help="image side in pixels (default 256)")
    args = arguments(parser).parse_args()

    arch, config, label = named_config(args.model)
    config = {**config, **{k: min(args.blocks, int(config[k])) for k in arch.depth_keys}}
    model = random_model(arch, config, torch.device("cpu"), torch.float32, SEED).eval()
    inputs = model.random_inputs(1, args.res, args.text, SEED)
    params = sum(p.numel() for p in model.parameters()) / 1e9
    blocks = ", ".join(f"{k} {config[k]}" for k in arch.depth_keys)
    print(f"{label} at its widths, {blocks} ({params:.2f}B parameters), {args.res}², {args.text} text tokens, "
          f"{args.scheme} int8, float32 on the CPU\n")  # fmt: skip
    print_errors(model, lambda: model(**inputs), arch, args)


if __name__ == "__main__":
    main()

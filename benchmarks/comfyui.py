"""ComfyUI's own model forward per step at full size: ComfyUI bf16 and its native int8 path against
INT8 Studio's node pack, eager and under ComfyUI's TorchCompileModel node (issue 22).

For one model (Flux.2, Chroma, Z-Image, Flux.1 or Qwen-Image), the bf16 tensors of its single file
(random weights, std 1/√in, drawn by name with ``engine.models.build.random_tensor``) and their row-wise
int8 conversion (the tensors ``int8-studio convert`` writes: int8 weight, ``weight_scale``,
``comfy_quant`` marker, in the layers the architecture allows) are loaded by ComfyUI's own loader and by
ours, and sampled with ComfyUI's own sampler (euler, CFG 1: one model call per step, batch 1). Rows:

========================  ================================================================
bf16                      ComfyUI's loader on the bf16 tensors
native int8               ComfyUI's loader on the int8 tensors (comfy-kitchen's int8 op)
node int8                 our loader (``comfyui_nodes.loader``): INT8 Studio's int8 op
node int8 + LoRA          + INT8 LoRA (dynamic), rank ``--rank`` on every int8 layer
``… + compile``           the same model through ComfyUI's TorchCompileModel node (inductor), with
                          ``engine.int8.graph_fusion``'s fusions (the loader installs them)
``(unfused)``             experiment: compiled without those fusions
``(inductor …)``          experiment: narrow inputs quantized in inductor-fused PyTorch ops
========================  ================================================================

Time: the step's wall time (the sampler's callback, synchronized), median of ``--steps`` steps after
two warm-up steps; the speed-up is against bf16 with the same compile setting. Error: one model call
on fixed inputs, relative L2 distance to bf16's output. Before the table, the comfy-kitchen backends
ComfyUI found and the GPU kernels of one native int8 step (which backend ran).

GPU machine (ComfyUI's tree unpacked, its packages installed; ``--stand-ins av`` where PyAV is
missing: only video nodes use it)::

    PYTHONPATH=. python3 benchmarks/comfyui.py flux2-klein-9b --comfyui /tmp/c/ComfyUI [--res 1024]
        [--steps 8] [--rows bf16,bf16+compile,...] [--out DIR]

CPU smoke run of every row on a full-width model with fewer blocks::

    PYTHONPATH=. python3 benchmarks/comfyui.py flux2-klein-4b --comfyui /tmp/c/ComfyUI --device cpu \\
        --depth double_blocks=1,single_blocks=1 --res 128 --steps 1
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch._inductor.config
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from comfyui_env import import_comfyui

from benchmarks.model import depth_overrides
from comfyui_nodes.loader import int8_layers, load_diffusion_model
from comfyui_nodes.lora import apply_dynamic
from engine.int8.graph_fusion import Int8GraphFusion
from engine.int8.quantize import quantize_weight
from engine.int8.rotation import comfy_quant_entry, json_bytes
from engine.models.build import named_config, random_tensor

ROWS = (
    "bf16", "bf16+compile", "node int8", "node int8+compile", "native int8", "native int8+compile",
    "node int8+LoRA+compile", "node int8+compile (unfused)", "node int8+compile (inductor quantization)",
)  # fmt: skip
TEXT_TOKENS = {"flux2": 512, "chroma": 512, "zimage": 256, "flux1": 512, "qwen_image": 256}
LATENT = {
    "flux2": (128, 16),
    "chroma": (16, 8),
    "zimage": (16, 8),
    "flux1": (16, 8),
    "qwen_image": (16, 8),
}  # channels, pixels per latent pixel
FRAMED = {"qwen_image"}  # latents [batch, channels, frames, height, width] (Wan 2.1's VAE): one frame
POOLED_DIM = 768  # Flux.1's vector input (CLIP-L)
WARMUP = 2
SEED = 0


def float_tensors(arch, config, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """The single file's tensors in ``dtype`` (on the CPU, where ComfyUI's loader takes them from)."""
    return {
        name: random_tensor(name, shape, device, dtype, SEED).cpu()
        for name, shape in arch.tensor_shapes(config).items()
    }


def int8_tensors(
    arch, tensors: dict[str, torch.Tensor], device: torch.device
) -> dict[str, torch.Tensor]:
    """``tensors`` converted as ``int8-studio convert --scheme rowwise`` converts them."""
    out = {}
    for name, t in tensors.items():
        if not (
            t.ndim == 2
            and name.endswith(".weight")
            and not arch.keeps_high_precision(name, tuple(t.shape))
        ):
            out[name] = t
            continue
        layer = name.removesuffix(".weight")
        out[name], out[f"{layer}.weight_scale"] = quantize_weight(t, "rowwise", device)
        out[f"{layer}.comfy_quant"] = json_bytes(comfy_quant_entry(0))
    return out


def lora_file(int8: dict[str, torch.Tensor], rank: int, folder: Path) -> Path:
    """A ComfyUI-format LoRA of rank ``rank`` on every int8 layer (ΔW about 1% of W)."""
    g = torch.Generator().manual_seed(SEED)
    tensors = {}
    for name in int8:
        if not name.endswith(".comfy_quant"):
            continue
        layer = name.removesuffix(".comfy_quant")
        out, inp = int8[f"{layer}.weight"].shape
        stem = f"diffusion_model.{layer}"
        tensors[f"{stem}.lora_down.weight"] = (
            torch.randn(rank, inp, generator=g) / inp**0.5
        ).bfloat16()
        tensors[f"{stem}.lora_up.weight"] = (
            torch.randn(out, rank, generator=g) * 0.01 / rank**0.5
        ).bfloat16()
        tensors[f"{stem}.alpha"] = torch.tensor(float(rank))
    path = folder / "lora.safetensors"
    save_file(tensors, str(path))
    return path


class Bench:
    """One model's inputs and ComfyUI's modules; :meth:`row` measures one row."""

    def __init__(
        self,
        comfy,
        family: str,
        text_dim: int,
        resolution: int,
        steps: int,
        device: torch.device,
    ):
        self.comfy, self.family, self.steps, self.device = comfy, family, steps, device
        g = torch.Generator().manual_seed(SEED)
        channels, down = LATENT[family]
        side = resolution // down
        shape = (1, channels, 1, side, side) if family in FRAMED else (1, channels, side, side)
        self.latent = torch.zeros(shape)
        self.noise = torch.randn(shape, generator=g)
        context = torch.randn(1, TEXT_TOKENS[family], text_dim, generator=g)
        self.call = {"c_crossattn": context}
        extra = {}
        if family == "flux1":  # CLIP's pooled prompt, and dev's guidance (ComfyUI's default)
            extra = {"pooled_output": torch.randn(1, POOLED_DIM, generator=g)}
            self.call |= {"y": extra["pooled_output"], "guidance": torch.full((1,), 3.5)}
        self.positive = [[context, extra]]
        if family == "chroma":
            self.call["guidance"] = torch.zeros(1)
        if family == "zimage":
            self.call["num_tokens"] = TEXT_TOKENS[family]
        self.x = torch.randn(shape, generator=g)

    def step_ms(self, model) -> tuple[float, list[float]]:
        """Seconds to the end of the first sampling step (loading, compiling), and wall milliseconds
        of each step after the warm-up."""
        import comfy.sample

        marks = [time.perf_counter()]

        def callback(step, x0, x, total):
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            marks.append(time.perf_counter())

        comfy.sample.sample(
            model, self.noise, WARMUP + self.steps, 1.0, "euler", "simple", self.positive, self.positive,
            self.latent, callback=callback, disable_pbar=True, seed=SEED,
        )  # fmt: skip
        return marks[1] - marks[0], [
            (b - a) * 1e3
            for a, b in zip(marks[WARMUP:-1], marks[WARMUP + 1 :], strict=True)
        ]

    def output(self, model) -> torch.Tensor:
        """One eager model call on the fixed inputs."""
        self.comfy.mm.load_models_gpu([model])
        call = {
            k: v.to(self.device) if torch.is_tensor(v) else v
            for k, v in self.call.items()
        }
        with torch.inference_mode():
            sigma = torch.full((1,), 0.6, device=self.device)
            return (
                model.model.apply_model(self.x.to(self.device), sigma, **call)
                .float()
                .cpu()
            )


def compiled(model):
    """ComfyUI's TorchCompileModel node on ``model`` (inductor), as a workflow runs it."""
    from comfy_extras.nodes_torch_compile import TorchCompileModel

    return TorchCompileModel.execute(model=model, backend="inductor").result[0]


def top_kernels(run, calls: int, n: int) -> list[str]:
    """The ``n`` longest GPU kernels of ``run()`` (which makes ``calls`` model calls): ms per call."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
    kernels = [
        e
        for e in prof.key_averages()
        if e.device_type == torch.autograd.DeviceType.CUDA
    ]
    kernels.sort(key=lambda e: -e.self_device_time_total)
    total = sum(e.self_device_time_total for e in kernels) / 1e3 / calls
    return [f"{'GPU total':>10} {total:8.2f} ms"] + [
        f"{e.self_device_time_total / 1e3 / calls:8.2f} ms {e.count // calls:4d}×  {e.key[:100]}"
        for e in kernels[:n]
    ]


@contextlib.contextmanager
def inductor_quantization():
    """Experiment: compiled graphs quantize plain inputs up to 8192 channels in PyTorch ops, which
    inductor fuses into the op that produced them (ComfyUI's norm and modulation), instead of calling
    our quantization kernel on the finished tensor."""
    from engine.int8 import backends, ops

    kernel = ops.quantize_tokens

    def quantize(x, rotation=0):
        if rotation or x.shape[-1] > 8192:
            return kernel(x, rotation)
        return backends.quantize_tokens_torch(x)

    ops.quantize_tokens = quantize
    try:
        yield
    finally:
        ops.quantize_tokens = kernel


def experiment(row: str):
    """What an experiment row changes while it compiles and runs: the graph fusions off ("unfused", to
    measure what :mod:`engine.int8.graph_fusion` gains), or :func:`inductor_quantization`."""
    if "unfused" in row:
        return torch._inductor.config.patch(post_grad_custom_post_pass=None)
    return inductor_quantization() if "inductor" in row else contextlib.nullcontext()


def free(comfy) -> None:
    comfy.mm.unload_all_models()
    torch._dynamo.reset()
    gc.collect()
    comfy.mm.soft_empty_cache()


def run(args, scratch: Path) -> dict:
    """The rows of ``args.rows`` (files and ComfyUI's home go to ``scratch``)."""
    device = torch.device(args.device)
    comfy = import_comfyui(Path(args.comfyui), scratch / "home", cpu=device.type == "cpu",
                           stand_ins=tuple(filter(None, args.stand_ins.split(","))))  # fmt: skip
    import comfy_kitchen

    arch, config, label = named_config(args.model)
    config = {**config, **args.depth}
    text_dim = config.get("text_dim") or config["cap_dim"]
    bench = Bench(comfy, arch.name, text_dim, args.res, args.steps, device)
    rows = [r for r in ROWS if r in args.rows.split(",")]
    t0 = time.perf_counter()
    bf16 = float_tensors(arch, config, device)
    int8 = int8_tensors(arch, bf16, device)
    folder = scratch
    int8_file = folder / f"{args.model}-int8-rowwise.safetensors"
    save_file(int8, str(int8_file))
    print(
        f"{label}: tensors drawn, converted and written in {time.perf_counter() - t0:.0f} s",
        flush=True,
    )
    backends = [k for k, v in comfy_kitchen.list_backends().items() if v["available"] and not v["disabled"]]
    result = {"model": args.model, "resolution": args.res, "steps": args.steps, "device": str(device),
              "kitchen_backends": backends, "rows": {}}  # fmt: skip
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
    result["torch"] = torch.__version__
    reference = None
    for source, names in (
        ("bf16", ("bf16", "bf16+compile")),
        ("node int8", ("node int8", "node int8+compile", "node int8+LoRA+compile", "node int8+compile (unfused)",
                       "node int8+compile (inductor quantization)")),
        ("native int8", ("native int8", "native int8+compile")),
    ):  # fmt: skip
        wanted = [r for r in names if r in rows]
        if not wanted and not (source == "bf16" and args.errors):
            continue
        if source == "bf16":
            model = comfy.sd.load_diffusion_model_state_dict(dict(bf16))
        elif source == "native int8":
            model = comfy.sd.load_diffusion_model_state_dict(dict(int8))
        else:
            # from a file, as the node loads it: the LoRA nodes read the model's file header
            model = load_diffusion_model(int8_file)
            result["node_int8_layers"] = len(int8_layers(model.model))
        error = None
        if args.errors:
            out = bench.output(model)
            reference = out if source == "bf16" else reference
            error = float((out - reference).norm() / reference.norm())
        if source == "native int8" and device.type == "cuda":
            bench.output(model)
            result["native_kernels"] = top_kernels(
                functools.partial(bench.output, model), 1, 5
            )
        for row in wanted:
            target = model
            if "LoRA" in row:
                target = apply_dynamic(model, lora_file(int8, args.rank, folder), 1.0)
            if "compile" in row:
                # else dynamo reuses the previous row's code for the same forward, fusions and all
                torch._dynamo.reset()
                target = compiled(target)
            start = time.perf_counter()
            Int8GraphFusion.totals.clear()
            with experiment(row):
                first, times = bench.step_ms(target)
            total = time.perf_counter() - start
            row_error = (
                None if "LoRA" in row else error
            )  # the LoRA changes the output on purpose
            result["rows"][row] = {"ms": statistics.median(times), "all_ms": times, "error": row_error,
                                   "first_step_s": first, "wall_s": total,
                                   "graph_fusions": dict(Int8GraphFusion.totals)}  # fmt: skip
            if args.profile and device.type == "cuda":
                profiled = top_kernels(
                    functools.partial(bench.step_ms, target), WARMUP + args.steps, 12
                )
                result["rows"][row]["kernels"] = profiled
                print("\n".join(profiled))
            line = f"{row:<42} {statistics.median(times):8.1f} ms/step  ({total:.0f} s)"
            fusions = ", ".join(f"{n} {k}" for k, n in Int8GraphFusion.totals.items() if n)
            print(f"{line}  graph fusions: {fusions}" if fusions else line, flush=True)
            (args.out / f"comfyui-{args.model}-{args.res}.json").write_text(
                json.dumps(result, indent=2)
            )
            del target
        del model
        free(comfy)
    return result


def restarts(args, scratch: Path) -> dict[str, dict[str, float]]:
    """Seconds to the end of the first step of each compiled row in ``--rows``, in two fresh processes
    sharing one empty compile cache: the first compiles, the second is a ComfyUI restart (PyTorch's
    caches of compiled graphs can hit only where the weights are plain tensors)."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(scratch / "compile-cache")}
    out = {}
    for row in [r for r in args.rows.split(",") if "compile" in r]:
        for start in ("cold", "warm"):
            folder = scratch / f"{len(out)}-{start}"
            command = [sys.executable, __file__, args.model, "--comfyui", args.comfyui, "--res", str(args.res),
                       "--steps", "1", "--rows", row, "--no-errors", "--device", args.device,
                       "--stand-ins", args.stand_ins, "--out", str(folder)]  # fmt: skip
            if args.depth:
                command += [
                    "--depth",
                    ",".join(f"{k}={v}" for k, v in args.depth.items()),
                ]
            subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
            result = json.loads(next(Path(folder).glob("*.json")).read_text())
            out.setdefault(row, {})[start] = result["rows"][row]["first_step_s"]
            print(
                f"{row:<42} first step, {start} cache: {out[row][start]:6.1f} s",
                flush=True,
            )
    return out


def table(result: dict) -> str:
    rows = result["rows"]
    lines = [
        f"{result['model']} at {result['resolution']}², {result.get('gpu', result['device'])}, torch {result['torch']}",
        f"comfy-kitchen backends: {result['kitchen_backends']}",
        *(f"  {k}" for k in result.get("native_kernels", [])),
        f"{'row':<42} {'ms/step':>9} {'speed-up':>9} {'error':>8}",
    ]
    for row, r in rows.items():
        base = rows.get("bf16+compile" if "compile" in row else "bf16")
        speedup = f"{base['ms'] / r['ms']:.2f}×" if base else "—"
        error = "—" if r["error"] is None else f"{r['error']:.3%}"
        lines.append(f"{row:<42} {r['ms']:9.1f} {speedup:>9} {error:>8}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "model",
        help="a known model name: flux2-klein-9b, zimage-turbo, chroma1-hd, flux1-dev, qwen-image, …",
    )
    parser.add_argument("--comfyui", required=True, help="ComfyUI's unpacked tree")
    parser.add_argument("--res", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--rank", type=int, default=32, help="the dynamic LoRA's rank")
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--stand-ins",
        default="",
        help="packages ComfyUI imports that are missing (e.g. av)",
    )
    parser.add_argument(
        "--depth", type=depth_overrides, default={}, metavar="KEY=N[,KEY=N]"
    )
    parser.add_argument("--profile", action="store_true", help="print each row's longest GPU kernels")
    parser.add_argument(
        "--no-errors", dest="errors", action="store_false", help="skip the error column"
    )
    parser.add_argument(
        "--restarts", action="store_true",
        help="only the first step of each compiled row, compiling, then after a restart on a warm cache",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        if args.restarts:
            (args.out / f"comfyui-restarts-{args.model}-{args.res}.json").write_text(
                json.dumps(restarts(args, Path(scratch)), indent=2)
            )
            return
        result = run(args, Path(scratch))
        (args.out / f"comfyui-{args.model}-{args.res}.json").write_text(
            json.dumps(result, indent=2)
        )
        print(table(result))


if __name__ == "__main__":
    main()

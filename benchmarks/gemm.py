"""INT8 W8A8 GEMM benchmark on the linear shapes of Flux.2 Klein 9B/4B, Chroma1-HD and Z-Image.

Compares, in one run and on the same random data (median of ``triton.testing.do_bench``, L2 flushed
before every call):

* ``bf16``: ``F.linear`` (cuBLAS), the baseline every ratio is against;
* ``int_mm``: our activation quantization + ``torch._int_mm`` (cuBLAS int8) + a separate dequantization;
* ``fp8``: ``torch._scaled_mm`` with row-wise scales on activations already in fp8 (GEMM only);
* ``ours``: ``int8_linear`` — activation quantization + the Triton GEMM with the fused epilogue.

``--gated`` and ``--lora`` time a SwiGLU in-projection and a dynamic LoRA's cost per layer instead.

``ours`` is also timed replayed from a CUDA graph (so is ``bf16``, for its ratio): GPU time without the
host's launch costs, what a compiled model with CUDA graphs, or any model whose GPU queue stays full, sees.

M = image tokens + 512 text tokens at 512², 1024² and 2048². Run on a GPU machine:

    PYTHONPATH=. python3 benchmarks/gemm.py [--quick] [--sweep] [--small-m] [--gated] [--lora] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import itertools
import json
import math
import platform
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench, do_bench_cudagraph

from engine.fusion import ActivatedInput
from engine.int8 import kernels
from engine.int8.operands import Epilogue, Int8Weight, LowRank
from engine.int8.ops import LoraFactors, int8_linear
from engine.int8.quantize import quantize_weight

TEXT_TOKENS = 512
IMAGE_TOKENS = {"512²": 1024, "1024²": 4096, "2048²": 16384}
# (N, K) = (out, in) features of the linear layers inside the repeated blocks.
MODELS = {
    "Klein 9B": {"qkv": (12288, 4096), "proj": (4096, 4096), "mlp.0": (24576, 4096), "mlp.2": (4096, 12288),
                 "linear1": (36864, 4096), "linear2": (4096, 16384)},
    "Klein 4B": {"qkv": (9216, 3072), "proj": (3072, 3072), "mlp.0": (18432, 3072), "mlp.2": (3072, 9216),
                 "linear1": (27648, 3072), "linear2": (3072, 12288)},
    "Chroma1-HD": {"qkv": (9216, 3072), "proj": (3072, 3072), "mlp.0": (12288, 3072), "mlp.2": (3072, 12288),
                   "linear1": (21504, 3072), "linear2": (3072, 15360)},
    "Z-Image": {"qkv": (11520, 3840), "out": (3840, 3840), "w1/w3": (10240, 3840), "w2": (3840, 10240)},
}
INT8_PEAK_TOPS = 1979  # H100 SXM dense


def bench(fn) -> float:
    """Median time of one call of ``fn`` in microseconds, L2 flushed before each call."""
    return do_bench(fn, warmup=10, rep=60, return_mode="median") * 1e3


def bench_graph(fn) -> float:
    """Median time of one call of ``fn`` replayed from a CUDA graph: GPU time, no launch gaps."""
    return do_bench_cudagraph(fn, rep=60, return_mode="median") * 1e3


class Problem:
    """Random x [M, K] bf16 and a row-wise quantized weight [N, K], with the baselines' own operands."""

    def __init__(self, m: int, n: int, k: int):
        self.m, self.n, self.k = m, n, k
        self.x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda") * (0.5 + torch.rand(n, 1, device="cuda"))
        self.w_bf16 = w.to(torch.bfloat16)
        q, scale = quantize_weight(w, "rowwise")
        self.w_int8, self.w_scale = q.cuda(), scale.cuda()
        self.w_scale_flat = self.w_scale.reshape(-1).contiguous()
        self.q, self.x_scale = kernels.quantize_tokens(self.x)
        fp8 = torch.float8_e4m3fn
        fmax = torch.finfo(fp8).max
        x_amax = self.x.float().abs().amax(1, keepdim=True).clamp(min=1e-12)
        w_amax = w.abs().amax(1, keepdim=True).clamp(min=1e-12)
        self.x_fp8, self.x_fp8_scale = (self.x.float() * fmax / x_amax).to(fp8), x_amax / fmax
        self.w_fp8, self.w_fp8_scale = (w * fmax / w_amax).to(fp8), (w_amax / fmax).t().contiguous()

    def bf16(self):
        return F.linear(self.x, self.w_bf16)

    def int_mm(self):
        q, x_scale = kernels.quantize_tokens(self.x)
        acc = torch._int_mm(q, self.w_int8.t())
        return (acc.float() * x_scale[:, None] * self.w_scale_flat).to(torch.bfloat16)

    def fp8(self):
        return torch._scaled_mm(self.x_fp8, self.w_fp8.t(), scale_a=self.x_fp8_scale, scale_b=self.w_fp8_scale,
                                out_dtype=torch.bfloat16)

    def ours(self):
        return int8_linear(self.x, self.w_int8, self.w_scale)  # what Int8Linear runs in eager mode

    def quant(self):
        return kernels.quantize_tokens(self.x)

    def gemm(self):
        return kernels.scaled_mm(self.q, self.x_scale, self.w_int8, self.w_scale_flat, torch.bfloat16)

    def tops(self, us: float) -> float:
        return 2 * self.m * self.n * self.k / us / 1e6


def check(p: Problem) -> float:
    """Relative error of ours against the float product of x and the dequantized weight."""
    ref = p.x.float() @ (p.w_int8.float() * p.w_scale).t()
    return ((p.ours().float() - ref).norm() / ref.norm()).item()


def run_shapes(models: dict, resolutions: dict) -> list[dict]:
    shapes = sorted({(IMAGE_TOKENS[r] + TEXT_TOKENS, n, k) for m in models.values() for r in resolutions
                     for n, k in m.values()})
    timings = {}
    for m, n, k in shapes:
        p = Problem(m, n, k)
        start = time.perf_counter()
        p.ours()  # first call tunes (or reads the cache)
        first_call = time.perf_counter() - start
        t = {name: bench(getattr(p, name)) for name in ("bf16", "int_mm", "fp8", "ours", "quant", "gemm")}
        t |= {f"{name}_graph": bench_graph(getattr(p, name)) for name in ("bf16", "ours")}
        t |= {"first_call_s": first_call, "rel_err": check(p), "config": kernels.TUNER.cached(p.x.device, m, n, k)}
        timings[m, n, k] = t
        print(f"{m:6d} {n:6d} {k:6d}  bf16 {t['bf16']:8.1f}  ours {t['ours']:8.1f} ({t['bf16'] / t['ours']:.2f}×)"
              f"  graph {t['bf16_graph'] / t['ours_graph']:.2f}×"
              f"  quant {t['quant']:6.1f}  gemm {t['gemm']:8.1f} ({p.tops(t['gemm']):.0f} TOPS)  err {t['rel_err']:.4f}"
              f"  first {first_call:.1f}s", flush=True)
        del p
        torch.cuda.empty_cache()
    rows = []
    for model, layers in models.items():
        for res in resolutions:
            m = IMAGE_TOKENS[res] + TEXT_TOKENS
            for layer, (n, k) in layers.items():
                rows.append({"model": model, "resolution": res, "layer": layer, "m": m, "n": n, "k": k,
                             **{key: v for key, v in timings[m, n, k].items() if key != "config"},
                             "config": str(timings[m, n, k]["config"])})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | res | layer | M×N×K | bf16 µs | int_mm+dequant | fp8 (GEMM only) | ours | ours, CUDA graph | quant share | ours GEMM TOPS |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    def ratio(r: dict, name: str) -> str:
        return f"{r[name]:.0f} µs ({r['bf16'] / r[name]:.2f}×)"

    for r in rows:
        tops = 2 * r["m"] * r["n"] * r["k"] / r["gemm"] / 1e6
        lines.append(f"| {r['model']} | {r['resolution']} | {r['layer']} | {r['m']}×{r['n']}×{r['k']} | {r['bf16']:.0f} "
                     f"| {ratio(r, 'int_mm')} | {ratio(r, 'fp8')} | **{ratio(r, 'ours')}** | {r['ours_graph']:.0f} µs "
                     f"({r['bf16_graph'] / r['ours_graph']:.2f}×) | {r['quant'] / r['ours']:.0%} | {tops:.0f} |")
    return "\n".join(lines)


def geomean(rows: list[dict], name: str, baseline: str = "bf16") -> float:
    return math.exp(sum(math.log(r[baseline] / r[name]) for r in rows) / len(rows))


def summary(rows: list[dict]) -> str:
    lines = [("| resolution | M | ours/bf16: min | geomean | max | time-weighted | same, CUDA graphs: min | geomean "
              "| fp8/bf16 geomean | int_mm/bf16 geomean |"), "|---|---|---|---|---|---|---|---|---|---|"]
    for res in IMAGE_TOKENS:
        sel = [r for r in rows if r["resolution"] == res]
        if not sel:
            continue
        ratios = [r["bf16"] / r["ours"] for r in sel]
        weighted = sum(r["bf16"] for r in sel) / sum(r["ours"] for r in sel)
        graph = [r["bf16_graph"] / r["ours_graph"] for r in sel]
        lines.append(f"| {res} | {sel[0]['m']} | {min(ratios):.2f}× | {geomean(sel, 'ours'):.2f}× | {max(ratios):.2f}× | "
                     f"{weighted:.2f}× | {min(graph):.2f}× | {geomean(sel, 'ours_graph', 'bf16_graph'):.2f}× "
                     f"| {geomean(sel, 'fp8'):.2f}× | {geomean(sel, 'int_mm'):.2f}× |")
    return "\n".join(lines)


def small_m() -> str:
    """Few tokens (modulation-like layers, tiny batches): bf16 vs ours, eager and in a CUDA graph."""
    lines = [("| M×N×K | bf16 µs (graph) | ours µs (graph) | ratio (graph) | of which quant / GEMM (graph) "
              "| bf16 µs (eager) | ours µs (eager) |"), "|---|---|---|---|---|---|---|"]
    for m, (n, k) in itertools.product((1, 16), ((3072, 3072), (4096, 4096), (12288, 4096), (4096, 12288))):
        p = Problem(m, n, k)
        p.ours()
        g = {name: bench_graph(getattr(p, name)) for name in ("bf16", "ours", "quant", "gemm")}
        e = {name: bench(getattr(p, name)) for name in ("bf16", "ours")}
        lines.append(f"| {m}×{n}×{k} | {g['bf16']:.1f} | {g['ours']:.1f} | {g['bf16'] / g['ours']:.2f}× | "
                     f"{g['quant']:.1f} / {g['gemm']:.1f} | {e['bf16']:.1f} | {e['ours']:.1f} |")
        print(lines[-1], flush=True)
    return "\n".join(lines)


SWEEP_SHAPES = [(4608, 4096, 4096), (4608, 12288, 4096), (4608, 4096, 12288), (4608, 4096, 16384), (4608, 36864, 4096),
                (1536, 3072, 3072), (1536, 12288, 4096), (512, 12288, 4096)]


def sweep_configs() -> list[kernels.TileConfig]:
    """sm90's large-M candidates, then more warp-specialized ones (session 1 swept 18 configs without any).
    Warp specialization with a TMA store fails to compile in Triton 3.6 (a descriptor type mismatch)."""
    T = kernels.TileConfig
    ws = functools.partial(T, tma=True, persistent=True, warp_specialize=True)
    return list(dict.fromkeys(kernels.ARCH_CONFIGS["sm90"]["large"] + [
        ws(128, 128, 128, 4, 5), ws(128, 128, 128, 4, 4, group_m=16), ws(128, 128, 64, 4, 6), ws(64, 256, 128, 4, 4),
        ws(128, 64, 128, 4, 6), ws(256, 128, 128, 8, 3),
    ]))


def sweep() -> str:
    """Every tile config on a few shapes, to choose the per-architecture candidate lists."""
    lines = []
    configs = sweep_configs()
    for m, n, k in SWEEP_SHAPES:
        p = Problem(m, n, k)
        bf16 = bench(p.bf16)
        out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        tokens = torch.arange(0, m, 97, device="cuda")
        expected = kernels.reference_output(tokens, p.q, p.x_scale, p.w_int8, p.w_scale_flat)
        results = []
        for c in configs:
            run = functools.partial(kernels.launch_scaled_mm, c, p.q, p.x_scale, p.w_int8, p.w_scale_flat, out,
                                    Epilogue(), kernels.TUNER.num_sms(out.device))
            try:
                us = bench(run)
            except Exception as e:  # noqa: BLE001 - a config that does not compile is a result too
                print(f"  {c}: {type(e).__name__}: {str(e)[:100]}")
                continue
            if kernels.agrees(out[tokens], expected):
                results.append((us, c))
            else:  # session 5 timed a miscompiled kernel for a while: never rank wrong values
                print(f"  {c}: WRONG VALUES ({us:.1f} µs)")
        results.sort(key=lambda r: r[0])
        lines.append(f"{m}×{n}×{k}: bf16 {bf16:.0f} µs ({p.tops(bf16):.0f} TFLOPS)")
        for us, c in results[:8]:
            lines.append(f"  {us:7.1f} µs {p.tops(us):5.0f} TOPS {bf16 / us:.2f}×  {c}")
        print("\n".join(lines[-9:]), flush=True)
    for m, k in ((4608, 3072), (4608, 4096), (4608, 12288), (4608, 16384), (16896, 4096)):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        us = bench(functools.partial(kernels.quantize_tokens, x))
        floor_us = m * k * 3 / 3.0e12 * 1e6
        lines.append(f"quant {m}×{k}: {us:.1f} µs (one read of x, one write of q at 3 TB/s: {floor_us:.1f})")
        print(lines[-1], flush=True)
    return "\n".join(lines)


GATED = {"Klein 9B mlp.0 / linear1": (12288, 4096), "Klein 4B mlp.0 / linear1": (9216, 3072), "Z-Image w1/w3": (10240, 3840)}
"""(hidden, K) of the SwiGLU in-projections: two products of ``hidden`` channels each."""


def gated(resolution: str = "1024²") -> str:
    """A SwiGLU in-projection and its down-projection's quantization, GPU time (CUDA graphs): one GEMM of
    both halves written out [M, 2·hidden] then an activating quantization that reads both, against the
    gated GEMM writing silu(a)·b [M, hidden] then a plain one. Each pair is checked against the other."""
    m = IMAGE_TOKENS[resolution] + TEXT_TOKENS
    lines = [f"| {resolution}, M = {m} | two halves + SwiGLU quantization (µs) | gated GEMM + quantization (µs) | gain |",
             "|---|---|---|---|"]
    for name, (hidden, k) in GATED.items():
        p = Problem(m, 2 * hidden, k)
        gate, gate_scale = p.w_int8[:hidden], p.w_scale_flat[:hidden]
        swiglu = Epilogue(up=Int8Weight(p.w_int8[hidden:], p.w_scale_flat[hidden:]))

        def separate():
            y = kernels.scaled_mm(p.q, p.x_scale, p.w_int8, p.w_scale_flat, torch.bfloat16)
            return kernels.quantize_tokens(ActivatedInput("swiglu", y[:, :hidden], y[:, hidden:]))

        def fused():
            y = kernels.scaled_mm(p.q, p.x_scale, gate, gate_scale, torch.bfloat16, swiglu)
            return kernels.quantize_tokens(ActivatedInput("identity", y))

        (q_sep, s_sep), (q_fused, s_fused) = separate(), fused()  # also tunes both
        diff = q_sep.float() * s_sep[:, None] - q_fused.float() * s_fused[:, None]
        steps = (diff.abs() / s_sep[:, None]).amax()  # in int8 steps of each row: ~1 where a rounding flips
        sep_us, fused_us = bench_graph(separate), bench_graph(fused)
        lines.append(f"| {name} ({hidden}×2, K {k}) | {sep_us:.1f} | {fused_us:.1f} | {sep_us / fused_us:.3f}× "
                     f"(values differ by ≤ {steps:.2f} int8 steps) |")
        print(lines[-1], flush=True)
    return "\n".join(lines)


LORA_RANK = 32


def lora_cost(resolution: str = "1024²") -> str:
    """What a rank-32 dynamic LoRA adds to one int8 layer, GPU time (CUDA graphs), on each Klein 9B and
    Z-Image shape: the plain layer, the layer with its LoRA as it runs (``x·downᵀ`` from the int8 tokens,
    ``kernels.low_rank``), and as it ran before s18 (``x·downᵀ`` from the bf16 input, a cuBLAS GEMM),
    each term added in the GEMM's epilogue. The two LoRA paths are checked against each other."""
    m = IMAGE_TOKENS[resolution] + TEXT_TOKENS
    lines = [f"| {resolution}, M = {m} | plain (µs) | LoRA from int8 tokens (µs) | LoRA from the bf16 input (µs) |",
             "|---|---|---|---|"]
    for model in ("Klein 9B", "Z-Image"):
        for name, (n, k) in MODELS[model].items():
            p = Problem(m, n, k)
            down = torch.randn(LORA_RANK, k, device="cuda", dtype=torch.bfloat16) / k**0.5
            up = torch.randn(n, LORA_RANK, device="cuda", dtype=torch.bfloat16) / 10
            scale = torch.full((LORA_RANK,), 0.5, device="cuda")
            lora = LoraFactors(down, up, scale)

            def from_input():
                q, x_scale = kernels.quantize_tokens(p.x)
                term = LowRank(p.x @ down.T, up, scale)
                return kernels.scaled_mm(q, x_scale, p.w_int8, p.w_scale_flat, torch.bfloat16, Epilogue(lora=term))

            ours = functools.partial(int8_linear, p.x, p.w_int8, p.w_scale, lora=lora)
            want = from_input().float()
            differ = (ours().float() - want).norm() / want.norm()
            plain_us, ours_us, input_us = (bench_graph(fn) for fn in (p.ours, ours, from_input))
            lines.append(f"| {model} {name} ({n}×{k}) | {plain_us:.1f} | {ours_us:.1f} ({ours_us / plain_us:.3f}×) | "
                         f"{input_us:.1f} ({input_us / plain_us:.3f}×) | outputs {differ:.2%} apart |")
            print(lines[-1], flush=True)
    return "\n".join(lines)


HOST_CONFIGS = {
    "pointer loads": kernels.TileConfig(128, 128, 128, 4, 3),
    "host TMA descriptors": kernels.TileConfig(128, 128, 128, 4, 3, tma=True),
    "host TMA, persistent": kernels.TileConfig(128, 128, 128, 4, 3, tma=True, persistent=True),
    "warp-specialized (kernel descriptors)": kernels.TileConfig(
        128, 128, 128, 4, 3, tma=True, persistent=True, warp_specialize=True
    ),
}
"""One config of each launch kind: each kind passes the kernel different arguments (pointers, host
descriptors, a scratch allocator), at a different host cost."""


def host_overhead(profile: bool = False, rounds: int = 5) -> str:
    """Host time per call on a tiny problem (the GPU waits on the host): launch and dispatch costs,
    the least of ``rounds`` rounds that each time every call in turn (a machine's host speed drifts).
    ``profile``: also the top functions of ``int8_linear`` by own time (cProfile)."""
    p = Problem(16, 1024, 1024)
    rank = 32
    lora = LoraFactors(torch.randn(rank, p.k, device="cuda", dtype=torch.bfloat16),
                       torch.randn(p.n, rank, device="cuda", dtype=torch.bfloat16), torch.rand(rank, device="cuda"))
    swiglu = Epilogue(up=Int8Weight(p.w_int8, p.w_scale_flat))
    calls = {"F.linear": p.bf16, "int8_linear": p.ours, "quantize_tokens": p.quant, "kernels.scaled_mm (tuned)": p.gemm,
             "torch.ops.int8_studio.scaled_mm": lambda: torch.ops.int8_studio.scaled_mm(
                 p.q, p.x_scale, p.w_int8, p.w_scale_flat, None, torch.bfloat16, None, None, None),
             "int8_linear + LoRA r32": lambda: int8_linear(p.x, p.w_int8, p.w_scale, lora=lora)}
    sm90 = kernels.arch_of(torch.device("cuda")) == "sm90"
    for kind, config in HOST_CONFIGS.items() if sm90 else list(HOST_CONFIGS.items())[:1]:
        calls[f"kernels.scaled_mm, {kind}"] = functools.partial(
            kernels.scaled_mm, p.q, p.x_scale, p.w_int8, p.w_scale_flat, torch.bfloat16, Epilogue(), config
        )
        calls[f"kernels.scaled_mm, {kind}, gated"] = functools.partial(
            kernels.scaled_mm, p.q, p.x_scale, p.w_int8, p.w_scale_flat, torch.bfloat16, swiglu,
            kernels.gated_config(config),
        )  # fmt: skip

    def per_call(fn) -> float:
        for _ in range(50):
            fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(500):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / 500 * 1e6

    timings: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            timings[name].append(per_call(fn))
    lines = [f"host per call, {name}: {min(us):.1f} µs" for name, us in timings.items()]
    print("\n".join(lines), flush=True)
    if profile:
        import cProfile
        import io
        import pstats

        profiler = cProfile.Profile()
        profiler.runcall(lambda: [p.ours() for _ in range(2000)])
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
        lines.append(text.getvalue())
        print(lines[-1], flush=True)
    return "\n".join(lines)


def versions() -> str:
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        driver = "?"
    return (f"{torch.cuda.get_device_name()} (driver {driver}), torch {torch.__version__}, CUDA {torch.version.cuda}, "
            f"Triton {triton.__version__}, Python {platform.python_version()}, {datetime.date.today()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1024² only, Klein 9B and Z-Image")
    parser.add_argument("--only-small-m", action="store_true", help="M = 1 and 16 only")
    parser.add_argument("--sweep", action="store_true", help="time every tile config on a few shapes first")
    parser.add_argument("--small-m", action="store_true", help="also time M = 1 and 16")
    parser.add_argument("--host", action="store_true", help="host time per call only, with a cProfile breakdown")
    parser.add_argument("--gated", action="store_true", help="SwiGLU in-projections only: gated GEMM against two halves")
    parser.add_argument("--lora", action="store_true", help="a rank-32 dynamic LoRA's cost per layer only")
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for gemm.md and gemm.json")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report = [versions()]
    print(report[0], flush=True)
    if args.only_small_m:
        print(small_m())
        return
    if args.host:
        host_overhead(profile=True)
        return
    if args.gated:
        (args.out / "gated.md").write_text("\n\n".join([*report, *(gated(r) for r in IMAGE_TOKENS)]) + "\n")
        return
    if args.lora:
        (args.out / "lora.md").write_text("\n\n".join([*report, lora_cost()]) + "\n")
        return
    if args.sweep:
        report.append(sweep())
    models = {k: MODELS[k] for k in ("Klein 9B", "Z-Image")} if args.quick else MODELS
    resolutions = {"1024²": IMAGE_TOKENS["1024²"]} if args.quick else IMAGE_TOKENS
    rows = run_shapes(models, resolutions)
    (args.out / "gemm.json").write_text(json.dumps(rows, indent=1))
    report.append(host_overhead())
    if args.small_m:
        report.append(small_m())
    report += [table(rows), summary(rows)]
    (args.out / "gemm.md").write_text("\n\n".join(report) + "\n")
    print("\n\n".join(report[-1:]))


if __name__ == "__main__":
    main()

"""Conversion speed and memory against a plain file copy, on a synthetic Flux.2 Klein 9B checkpoint.

    python benchmarks/convert.py                        # 2 double + 4 single blocks: 4.1 GB, on the CPU
    python benchmarks/convert.py --full --device cuda    # all 8 double + 24 single blocks: 18 GB
    python benchmarks/convert.py --full --build-only     # write the source first (a few minutes)

The source has the real Klein 9B layout and widths (hidden 4096, MLP 12288, text 12288) with random
bf16 weights; it is built once in --workdir and reused. Each measurement runs in a fresh child
process, which reports its wall time and peak resident memory (``VmHWM``): the copy
(``shutil.copyfile`` plus ``fsync``, since the converter syncs its output too) and the conversion
(hashing, quantizing, writing, verifying). Every run is done twice: "cold" after evicting the
source from the page cache (``posix_fadvise(DONTNEED)``; on a VM the host may still cache it) and
"warm" right after a read. Targets (issue 2): peak RSS at most 1.5 GB plus twice the largest tensor,
wall time at most 3x the copy.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GB = 1e9


def source_config(full: bool) -> dict[str, int | bool]:
    from engine.models import REGISTRY

    config = dict(REGISTRY["flux2"].variants["Klein 9B"])
    if not full:
        config |= {"double_blocks": 2, "single_blocks": 4}
    return config


def build_source(path: Path, config: dict[str, int | bool]) -> None:
    """Random bf16 weights in the Klein 9B layout, written one tensor at a time."""
    import torch

    from engine.checkpoint_writer import CheckpointWriter
    from engine.demo import random_weights
    from engine.models import REGISTRY

    arch = REGISTRY["flux2"]
    layout = {name: (torch.bfloat16, shape) for name, shape in arch.tensor_shapes(config).items()}
    with CheckpointWriter(path, layout, {"format": "pt"}, overwrite=True) as writer:
        for name, tensor in random_weights(arch, config, generator=torch.Generator().manual_seed(0)):
            writer.write(name, tensor)
        writer.commit()


def evict(path: Path) -> bool:
    """Drop ``path``'s pages from the page cache (Linux); False where that is not possible."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


def read_through(path: Path) -> None:
    with open(path, "rb", buffering=0) as f:
        while f.read(64 << 20):
            pass


def child(args: argparse.Namespace) -> None:
    """One measured run; prints {"seconds", "cpu", "peak_rss"} as JSON on its last line.

    CPU time (user and system, imports included) is what the run costs whatever else the machine is
    doing; wall time depends on that too.
    """
    from engine.convert import ConvertRequest, run_convert

    started = time.perf_counter()
    if args.child == "copy":
        shutil.copyfile(args.source, args.output)
        fd = os.open(args.output, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    elif args.child == "convert":
        request = ConvertRequest(
            args.source, args.output, args.scheme, overwrite=True, device=args.device, rotate=args.rotate
        )
        run_convert(request)
    seconds = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = {"user": usage.ru_utime, "sys": usage.ru_stime}
    print(json.dumps({"seconds": seconds, "cpu": cpu, "peak_rss": peak_rss()}))


def peak_rss() -> int:
    """This process's peak resident memory in bytes.

    Linux: ``VmHWM`` of its own address space. ``ru_maxrss`` would do elsewhere, but on Linux it
    keeps the parent's high-water mark across fork + exec, so a child of a big parent looks big.
    """
    status = Path("/proc/self/status")
    if status.exists():
        line = next(ln for ln in status.read_text().splitlines() if ln.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def measure(kind: str, args: argparse.Namespace, source: Path, output: Path) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", kind, "--source", str(source), "--output", str(output)]
    command += ["--scheme", args.scheme, "--rotate", args.rotate] + (["--device", args.device] if args.device else [])
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        sys.exit(f"{kind} failed:\n{done.stderr}")
    output.unlink(missing_ok=True)
    return json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="all 8 double + 24 single blocks (18 GB)")
    parser.add_argument("--device", help="where quantization runs (cpu, cuda; default: the GPU if any)")
    parser.add_argument("--scheme", choices=("tensorwise", "rowwise"), default="tensorwise")
    parser.add_argument("--rotate", choices=("none", "down", "all"), default="none", help="Hadamard rotation")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/int8-studio-bench"))
    parser.add_argument("--build-only", action="store_true", help="only write the source (for a later run)")
    parser.add_argument("--cache", choices=("cold", "warm", "both"), default="both", help="which runs")
    parser.add_argument("--child", choices=("idle", "copy", "convert"), help=argparse.SUPPRESS)
    parser.add_argument("--source", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    from engine.checkpoint import CheckpointReader, format_bytes
    from engine.models import detect

    config = source_config(args.full)
    args.workdir.mkdir(parents=True, exist_ok=True)
    source = args.workdir / f"klein9b-{config['double_blocks']}d{config['single_blocks']}s.safetensors"
    if not source.exists():
        started = time.perf_counter()
        build_source(source, config)
        print(f"built {source} in {time.perf_counter() - started:.0f} s")
    if args.build_only:
        return
    with CheckpointReader(source) as reader:
        label = detect(reader).label
        largest = max(reader.tensors.values(), key=lambda t: t.nbytes)
    size = source.stat().st_size
    target_rss = 1.5 * GB + 2 * largest.nbytes
    print(
        f"source: {label}, {format_bytes(size)}; largest tensor {largest.name} {format_bytes(largest.nbytes)}"
    )
    device = args.device or ("cuda" if _has_cuda() else "cpu")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"device: {device}, scheme {args.scheme}, rotate {args.rotate}, {os.cpu_count()} CPUs, load average {load}")

    baseline = measure("idle", args, source, args.workdir / "idle")
    rows = []
    for cache in ("cold", "warm") if args.cache == "both" else (args.cache,):
        for kind in ("copy", "convert"):
            if cache == "cold":
                evict(source)
            else:
                read_through(source)
            run = measure(kind, args, source, args.workdir / f"out-{kind}.safetensors")
            rows.append((cache, kind, run))
            print(f"{cache:4} {kind:7} {run['seconds']:6.1f} s", flush=True)

    copies = {cache: run["seconds"] for cache, kind, run in rows if kind == "copy"}
    print("\n| run | page cache | wall time | vs copy | CPU time (user + system) | peak RSS |")
    print("|---|---|---|---|---|---|")
    for cache, kind, run in rows:
        cpu, rss = run["cpu"], format_bytes(run["peak_rss"])
        print(
            f"| {kind} | {cache} | {run['seconds']:.1f} s | {run['seconds'] / copies[cache]:.2f}× "
            f"| {cpu['user']:.1f} + {cpu['sys']:.1f} s | {rss} |"
        )
    worst = max(run["seconds"] / copies[cache] for cache, kind, run in rows if kind == "convert")
    peak = max(run["peak_rss"] for _, kind, run in rows if kind == "convert")
    idle = baseline["cpu"]
    print(
        f"\nPython + torch alone: {format_bytes(baseline['peak_rss'])} RSS, "
        f"{idle['user']:.1f} + {idle['sys']:.1f} s CPU. Targets: peak RSS ≤ {format_bytes(target_rss)} "
        f"(1.5 GB + 2 × {format_bytes(largest.nbytes)}): {'met' if peak <= target_rss else 'MISSED'}; "
        f"time ≤ 3× copy: {'met' if worst <= 3 else 'MISSED'} (worst {worst:.2f}×)"
    )


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()

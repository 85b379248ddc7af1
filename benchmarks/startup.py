"""How long the CLI takes to start: wall time of `int8-studio --help`, `inspect` on a small file and
`convert --help`, each the median of several fresh processes (no timed test: numbers go to
docs/PERFORMANCE.md).

    python benchmarks/startup.py                  # this checkout
    python benchmarks/startup.py --repo /tmp/old  # another checkout (its engine/ first on sys.path)
"""

from __future__ import annotations

import argparse
import json
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def small_checkpoint(folder: Path) -> Path:
    """A 4×4 bf16 safetensors file with one metadata entry, written without torch."""
    header = {"a.weight": {"dtype": "BF16", "shape": [4, 4], "data_offsets": [0, 32]}, "__metadata__": {"x": "y"}}
    data = json.dumps(header).encode()
    data += b" " * (-len(data) % 8)
    path = folder / "small.safetensors"
    path.write_bytes(struct.pack("<Q", len(data)) + data + bytes(32))
    return path


def wall_time(args: list[str], repo: Path, runs: int) -> float:
    """Median seconds of ``python -m engine.cli ARGS`` run from ``repo`` (its engine/ is imported)."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "engine.cli", *args], cwd=repo, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=ROOT, help="the checkout to time (default: this one)")
    parser.add_argument("--runs", type=int, default=5, help="processes per command (default 5)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        small = small_checkpoint(Path(folder))
        commands = {"--help": ["--help"], "inspect FILE": ["inspect", str(small)], "convert --help": ["convert", "--help"]}
        for label, argv in commands.items():
            print(f"{label:<16} {wall_time(argv, args.repo.resolve(), args.runs):.2f} s")


if __name__ == "__main__":
    main()

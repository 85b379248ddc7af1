"""What a benchmark found (:mod:`engine.bench`): a row per weight format and the run's settings, and the
words both faces show them in (the CLI's table, the app's table, run summary and tooltips).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


@dataclass(frozen=True)
class FormatResult:
    format: str
    seconds_per_step: float | None = None  # median of the timed steps; None: not run (see note)
    speedup: float | None = None  # against bf16 with the same compile setting
    compile_seconds: float | None = None  # first call minus a step: compilation and autotuning
    peak_vram_gb: float | None = None  # weights + activations while stepping (GPU only)
    relative_error: float | None = None  # ‖out − out_bf16‖ / ‖out_bf16‖
    cosine: float | None = None
    note: str = ""
    launch_bound: bool | None = None  # the GPU waited for the host to enqueue the step (None: on the CPU)


@dataclass(frozen=True)
class BenchResult:
    model: str  # "Flux.2 Klein 9B (random weights)"
    device: str
    versions: dict[str, str]
    resolution: int
    batch: int
    steps: int
    image_tokens: int
    text_tokens: int
    scheme: str
    quantized_layers: int  # linear layers in int8/fp8 (the rest stay bf16)
    linear_layers: int
    cuda_graphs: bool = False
    int8_backend: str = ""  # ops.describe_backend: what the int8 rows ran on ("" when none ran)
    rows: tuple[FormatResult, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> BenchResult:
        """The result back from :meth:`to_dict` (the app keeps results between runs); keys this
        version does not know are left out."""
        rows = tuple(FormatResult(**_known(FormatResult, row)) for row in data.get("rows", ()))
        return cls(**{**_known(cls, data), "rows": rows})

    def header(self) -> list[str]:
        """What was measured, on what, and how: the table's three first lines, the app's run summary."""
        shape = f"{self.resolution}×{self.resolution}, batch {self.batch}"
        tokens = f"{self.image_tokens} image + {self.text_tokens} text tokens"
        versions = ", ".join(f"{k} {v}" for k, v in self.versions.items())
        layers = f"{self.quantized_layers} of {self.linear_layers} linear layers quantized"
        gemm = f"; int8 GEMM: {self.int8_backend}" if self.int8_backend else ""
        steps = f"median of {self.steps} steps" + (", replayed from a CUDA graph" if self.cuda_graphs else "")
        return [
            f"{self.model}: {shape} ({tokens}), {steps}",
            f"{self.device}; {versions}",
            f"{layers} ({self.scheme} int8 weight scales, per-token activation scales){gemm}",
        ]

    def table(self) -> str:
        """The result as text: the :meth:`header`, one row per format, a footnote."""
        head = [*self.header(), ""]
        lines = [COLUMNS, *(cells(r) for r in self.rows)]
        bound = any(r.launch_bound for r in self.rows)
        # a row that did not run holds its note in the second column: it sets no width
        widths = [max(len(line[i]) for line in lines if i == 0 or len(line) > 2) for i in range(len(COLUMNS))]
        body = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
        foot = [
            "",
            (
                "speed-up: against bf16 with the same compile setting; errors: against bf16 eager "
                "(run one block at a time where it does not fit)"
            ),
            *[LAUNCH_BOUND_NOTE] * bound,
        ]
        return "\n".join(head + body + foot)


COLUMNS = ("format", "s/step", "speed-up", "first call", "peak VRAM", "rel. error", "cosine")
LAUNCH_BOUND_NOTE = (
    "*: launch-bound, the GPU waited for the CPU to enqueue the step's kernels (timed with CUDA graphs, a "
    "step shows the GPU's own speed)"
)


def gpu_device(name: str, capability: tuple[int, int]) -> str:
    """How a result names a GPU (:attr:`BenchResult.device`): the app finds a GPU's kept runs by it."""
    return f"{name} (sm{capability[0]}{capability[1]})"


def _known(cls: type, data: dict) -> dict:
    return {f.name: data[f.name] for f in fields(cls) if f.name in data}


def cells(r: FormatResult) -> tuple[str, ...]:
    """A row's cells under :data:`COLUMNS`, in the CLI's table and the app's; a format that did not run
    has two, its name and its note."""
    if r.seconds_per_step is None:
        return (r.format, r.note or "not run")

    def cell(value: float | None, fmt: str) -> str:
        return "—" if value is None else fmt.format(value)

    return (
        r.format,
        f"{r.seconds_per_step:.3f}" + "*" * bool(r.launch_bound),
        cell(r.speedup, "{:.2f}×"),
        cell(r.compile_seconds, "{:.1f} s"),
        cell(r.peak_vram_gb, "{:.1f} GB"),
        cell(r.relative_error, "{:.2%}"),
        cell(r.cosine, "{:.5f}"),
    )

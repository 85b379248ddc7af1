"""The GPU advisor: which format to run on this GPU, from a benchmark just measured, in words both faces
show (`int8-studio bench --advise`, the app's Benchmark page and its status bar's GPU line).

:func:`advise` is the whole decision; it reads only the :class:`BenchResult` (no torch), so a result kept
between runs gives the same advice again.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from engine.bench_result import BenchResult, FormatResult

NOISE = 0.03
"""A step time moves by ±3% between runs (docs/PERFORMANCE.md, "How it is measured"): a format must be
more than 3% faster than a simpler one to be worth its extra step (a conversion, a compilation)."""

ERROR_BUDGET = 0.05
"""The largest output error (against bf16 eager) advised. int8 with each family's high-precision rule
measures 2.9% (Klein 9B) and 4.6% (Z-Image) on random weights of the released shapes, where bf16 itself
is 1.3–1.9% from float32 and compiling bf16 alone moves the output by 1.4–1.9%; every Linear in int8
(Chroma, 6.1%) or fp8 (Z-Image, 9.2%) is what the rules exist to avoid (docs/PERFORMANCE.md,
docs/MODELS.md)."""

ADVISED = {"bf16": "bf16", "int8": "the INT8 file"}
"""The formats the advice can name (a row's format without ``+compile``), and how a sentence names them.
fp8 is a yardstick, never advised: the bench's own fp8 layer is no file INT8 Studio writes. 8-bit
attention (issue 27) joins here under its bench format (e.g. ``"int8+attn8": "the INT8 file with 8-bit
attention"``): each ``+`` counts as one more step in :func:`_extras`, so it is advised only where it beats
plain int8 by more than the noise."""

COMPILE = " with torch.compile (TorchCompileModel in ComfyUI)"


@dataclass(frozen=True)
class Advice:
    text: str  # the recommendation, one sentence
    basis: str  # what it rests on, one sentence
    format: str | None = None  # a key of ADVISED; None: nothing advised
    compile: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        """The advice as the CLI prints it after its table and the Benchmark page shows it after its own."""
        return [f"Advice: {self.text}", self.basis]


def advise(result: BenchResult) -> Advice:
    """The advice for ``result``'s device and model.

    Candidates are the measured rows of an :data:`ADVISED` format whose output error is within
    :data:`ERROR_BUDGET` (bf16 rows always are: they are the reference). Of the candidates within
    :data:`NOISE` of the fastest, the one with the fewest extra steps wins (bf16 eager before int8 or
    bf16 + compile, before int8 + compile), so a compiled format is advised only where a compiled row
    was measured and beat the others by more than the noise. The sentence gives the ratio against the
    bf16 row with the same compile setting (the table's speed-up column) where it was measured."""
    rows = {r.format: r for r in result.rows}
    measured = [r for r in result.rows if r.seconds_per_step is not None]
    usable = [r for r in measured if _key(r) in ADVISED and _within_budget(r)]
    where = f"On {_where(result.device)}, for {result.model.split(' (')[0]} at {result.resolution}²"
    basis = _basis(result, measured)
    if not usable:
        nothing = "no bf16 or int8 row within the error budget was measured: nothing to advise"
        return Advice(f"{where}, {nothing}.", basis)
    fastest = min(r.seconds_per_step for r in usable)
    near = [r for r in usable if r.seconds_per_step <= fastest * (1 + NOISE)]
    choice = min(near, key=lambda r: (_extras(r), r.seconds_per_step))
    compiled = choice.format.endswith("+compile")
    words = COMPILE if compiled else ""
    if _key(choice) == "bf16":
        verdict = _why_not_int8(choice, rows) + f": keep bf16{words}"
    else:
        bf16 = sorted((r for r in measured if _key(r) == "bf16"), key=lambda r: r.seconds_per_step)
        same = [r for r in bf16 if r.format == ("bf16+compile" if compiled else "bf16")]
        if bf16:
            baseline = (same or bf16)[0]  # the same compile setting where measured, else the faster bf16
            gain = f"{_ratio(baseline, choice):.2f}× faster than {_label(baseline)}"
        else:
            gain = "bf16 was not measured" + (f" ({rows['bf16'].note})" if "bf16" in rows else "")
        verdict = f"use {ADVISED[_key(choice)]}{words}: {gain}, output error {choice.relative_error:.1%}"
    return Advice(f"{where}, {verdict}.", basis, _key(choice), compiled)


def _why_not_int8(choice: FormatResult, rows: dict[str, FormatResult]) -> str:
    """Why bf16 is advised: int8 was not measured, its error is over budget, or it is not faster."""
    int8 = [r for r in rows.values() if _key(r) != "bf16" and _key(r) in ADVISED]
    ran = [r for r in int8 if r.seconds_per_step is not None]
    if not ran:
        notes = "; ".join(f"{r.format}: {r.note}" for r in int8 if r.note)
        return f"int8 was not measured ({notes})" if notes else "int8 was not measured"
    within = [r for r in ran if _within_budget(r)]
    if not within:
        errors = [r.relative_error for r in ran if r.relative_error is not None]
        error = f"({min(errors):.1%}) is over" if errors else "was not measured, against"
        return f"int8's output error {error} the {ERROR_BUDGET:.0%} budget"
    best = min(within, key=lambda r: r.seconds_per_step)
    ratio = _ratio(choice, best)
    noise = f", within the ±{NOISE:.0%} noise" if ratio >= 1 else ""
    return f"int8 does not pay ({_label(best)} at {ratio:.2f}× {_label(choice)}'s speed{noise})"


def _basis(result: BenchResult, measured: list[FormatResult]) -> str:
    """What the advice rests on: the rows measured and how, those that were not, the launch-bound ones."""
    formats = ", ".join(r.format for r in measured) or "no format"
    parts = [f"Based on the median of {result.steps} steps of {formats}"]
    missing = [f"{r.format} ({r.note or 'not run'})" for r in result.rows if r.seconds_per_step is None]
    if missing:
        parts.append(f"not measured: {', '.join(missing)}")
    bound = [r.format for r in measured if r.launch_bound]
    if bound:
        waited = "launch-bound (the GPU waited for the CPU; a faster CPU may change the ratios)"
        parts.append(f"{waited}: {', '.join(bound)}")
    parts.append(f"errors against bf16 eager, budget {ERROR_BUDGET:.0%}")
    if result.device.startswith("CPU"):
        parts.append("CPU times say nothing about a GPU's")
    return "; ".join(parts) + "."


def _key(row: FormatResult) -> str:
    return row.format.removesuffix("+compile")


def _extras(row: FormatResult) -> int:
    """Steps beyond running the original file: a conversion, each added option, a compilation."""
    return row.format.count("+") + (_key(row) != "bf16")


def _within_budget(row: FormatResult) -> bool:
    if _key(row) == "bf16":
        return True
    return row.relative_error is not None and row.relative_error <= ERROR_BUDGET


def _ratio(slow: FormatResult, fast: FormatResult) -> float:
    return slow.seconds_per_step / fast.seconds_per_step


def _label(row: FormatResult) -> str:
    return row.format.replace("+", " + ")


def _where(device: str) -> str:
    """``"NVIDIA H100 80GB HBM3 (sm90)"`` → ``"this NVIDIA H100 80GB HBM3"``; any CPU → ``"the CPU"``."""
    if device.startswith("CPU"):
        return "the CPU"
    return "this " + device.rsplit(" (sm", 1)[0]

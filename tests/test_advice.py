"""The GPU advisor (:mod:`engine.advice`): its rules on results shaped as the bench makes them (rows
timed, not run, launch-bound, over the error budget), and `int8-studio bench --advise` end to end on
the CPU."""

from __future__ import annotations

import json
import re

import pytest

from engine.advice import ERROR_BUDGET, NOISE, advise
from engine.bench import _with_speedups
from engine.bench_result import BenchResult, FormatResult
from engine.cli import main

H100 = "NVIDIA H100 80GB HBM3 (sm90)"
DOES_NOT_FIT = "does not fit: its weights take 18.2 GB of the 12.0 GB available"


def timed(fmt: str, seconds: float, error: float, launch_bound: bool = False) -> FormatResult:
    """A row as the bench makes it for a format that ran (speed-ups are added by the bench's own code)."""
    return FormatResult(fmt, seconds, None, 10.0, 9.0, error, 1 - error**2 / 2, launch_bound=launch_bound)


def result(*rows: FormatResult, device: str = H100, resolution: int = 1024) -> BenchResult:
    return BenchResult(
        "Flux.2 Klein 9B (random weights)", device, {"torch": "2.11.0"}, resolution, 1, 10, 4096, 512,
        "rowwise", 112, 121, rows=tuple(_with_speedups(list(rows))),
    )  # fmt: skip


KLEIN_1024 = (  # PERFORMANCE.md's whole-model step (H200)
    timed("bf16", 0.153, 0.0),
    timed("bf16+compile", 0.123, 0.0155),
    FormatResult("fp8", note="n/a (needs sm89+)"),
    timed("int8", 0.084, 0.0293),
    timed("int8+compile", 0.081, 0.0297),
)


def test_int8_with_compile_where_it_is_fastest():
    advice = advise(result(*KLEIN_1024))
    assert (advice.format, advice.compile) == ("int8", True)
    assert advice.text == (
        "On this NVIDIA H100 80GB HBM3, for Flux.2 Klein 9B at 1024², use the INT8 file with torch.compile "
        "(TorchCompileModel in ComfyUI): 1.52× faster than bf16 + compile, output error 3.0%."
    )
    assert advice.basis == (
        "Based on the median of 10 steps of bf16, bf16+compile, int8, int8+compile; not measured: fp8 "
        "(n/a (needs sm89+)); errors against bf16 eager, budget 5%."
    )
    assert advice.lines() == [f"Advice: {advice.text}", advice.basis]


def test_compile_must_beat_the_noise():
    """int8 + compile 2% faster than int8: within the noise, so no compilation is advised."""
    rows = (timed("bf16", 0.153, 0.0), timed("int8", 0.084, 0.029), timed("int8+compile", 0.0824, 0.03))
    advice = advise(result(*rows))
    assert (advice.format, advice.compile) == ("int8", False)
    assert ": 1.82× faster than bf16, output error 2.9%." in advice.text


def test_a_compiled_format_only_where_compiled_rows_were_measured():
    """bf16 + compile beats int8 eager and int8 + compile was not asked for: bf16 with compile."""
    rows = (timed("bf16", 0.153, 0.0), timed("bf16+compile", 0.080, 0.015), timed("int8", 0.084, 0.029))
    advice = advise(result(*rows))
    assert (advice.format, advice.compile) == ("bf16", True)
    assert advice.text.endswith(
        "int8 does not pay (int8 at 0.95× bf16 + compile's speed): keep bf16 with torch.compile "
        "(TorchCompileModel in ComfyUI)."
    )


def test_int8_slower_than_bf16_on_a_launch_bound_step():
    rows = (timed("bf16", 0.050, 0.0, launch_bound=True), timed("int8", 0.054, 0.029, launch_bound=True))
    advice = advise(result(*rows, device="NVIDIA GeForce RTX 3060 (sm86)", resolution=512))
    assert (advice.format, advice.compile) == ("bf16", False)
    assert advice.text == (
        "On this NVIDIA GeForce RTX 3060, for Flux.2 Klein 9B at 512², int8 does not pay (int8 at 0.93× "
        "bf16's speed): keep bf16."
    )
    assert "launch-bound (the GPU waited for the CPU; a faster CPU may change the ratios): bf16, int8" in (
        advice.basis
    )


def test_a_gain_within_the_noise_keeps_bf16():
    advice = advise(result(timed("bf16", 0.050, 0.0), timed("int8", 0.050 / (1 + NOISE / 2), 0.029)))
    assert advice.format == "bf16"
    assert "(int8 at 1.01× bf16's speed, within the ±3% noise): keep bf16." in advice.text


def test_an_error_over_the_budget_keeps_bf16():
    advice = advise(result(timed("bf16", 0.050, 0.0), timed("int8", 0.030, ERROR_BUDGET + 0.021)))
    assert advice.format == "bf16"
    assert advice.text.endswith("int8's output error (7.1%) is over the 5% budget: keep bf16.")


def test_bf16_that_does_not_fit_leaves_int8():
    advice = advise(result(FormatResult("bf16", note=DOES_NOT_FIT), timed("int8", 0.071, 0.0293)))
    assert (advice.format, advice.compile) == ("int8", False)
    assert advice.text.endswith(f"use the INT8 file: bf16 was not measured ({DOES_NOT_FIT}), output error 2.9%.")
    assert f"; not measured: bf16 ({DOES_NOT_FIT});" in advice.basis


def test_int8_that_did_not_run_and_fp8_that_is_never_advised():
    rows = (timed("bf16", 0.05, 0.0), timed("fp8", 0.02, 0.047), FormatResult("int8", note="out of GPU memory"))
    advice = advise(result(*rows))
    assert advice.format == "bf16"
    assert advice.text.endswith("int8 was not measured (int8: out of GPU memory): keep bf16.")
    assert advice.basis.startswith("Based on the median of 10 steps of bf16, fp8; not measured: int8")


def test_nothing_measured():
    advice = advise(result(FormatResult("bf16", note=DOES_NOT_FIT), FormatResult("int8", note=DOES_NOT_FIT)))
    assert (advice.format, advice.compile) == (None, False)
    assert advice.text.endswith("no bf16 or int8 row within the error budget was measured: nothing to advise.")


def test_a_kept_result_gives_the_same_advice():
    kept = BenchResult.from_dict(json.loads(json.dumps(result(*KLEIN_1024).to_dict())))
    assert advise(kept) == advise(result(*KLEIN_1024))


TINY = ["bench", "zimage-tiny", "--res", "64", "--steps", "2", "--text-tokens", "8", "--formats", "bf16,int8"]


def test_cli_advise_ends_the_table_with_advice_that_agrees_with_it(capsys):
    """A real run on the CPU: the advice follows the table, quotes the int8 row's speed-up, advises int8
    exactly where that speed-up beats the noise, and says the times are a CPU's."""
    assert main([*TINY, "--device", "cpu", "--advise"]) == 0
    table, advice = capsys.readouterr().out.split("\n\nAdvice: ")
    int8 = re.search(r"^int8 +[\d.]+ +([\d.]+)× .* ([\d.]+)% ", table, re.MULTILINE)
    speedup, error = float(int8[1]), float(int8[2]) / 100
    text, basis = advice.rstrip("\n").split("\n")
    assert text.startswith("On the CPU, for Z-Image tiny at 64², ") and f"{int8[1]}×" in text
    pays = speedup > 1 + NOISE and error <= ERROR_BUDGET
    assert ("use the INT8 file: " in text) == pays
    assert text.endswith(f"output error {error:.1%}." if pays else "bf16.")
    assert basis == (
        "Based on the median of 2 steps of bf16, int8; errors against bf16 eager, budget 5%; "
        "CPU times say nothing about a GPU's."
    )


def test_cli_advise_in_json(capsys):
    assert main([*TINY, "--device", "cpu", "--json"]) == 0
    assert "advice" not in json.loads(capsys.readouterr().out)
    assert main([*TINY, "--device", "cpu", "--json", "--advise"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["advice"] == advise(BenchResult.from_dict(out)).to_dict()
    assert out["advice"]["format"] in ("bf16", "int8") and out["advice"]["compile"] is False


@pytest.mark.parametrize("fmt", ["int8", "bf16"])
def test_advice_names_only_what_was_measured(fmt):
    """One format alone: nothing to compare it with, and the sentence says what is missing."""
    advice = advise(result(timed(fmt, 0.05, 0.02)))
    assert advice.format == fmt
    alone = "bf16 was not measured, output error 2.0%." if fmt == "int8" else "int8 was not measured: keep bf16."
    assert advice.text.endswith(alone)

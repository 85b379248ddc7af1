"""The benchmark job and `int8-studio bench`, on the CPU with tiny models: structure and sanity of
the results (int8 quality against bf16), never times."""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch

from engine.bench import FORMATS, BenchError, BenchRequest, bench_defaults, run_bench
from engine.bench_result import LAUNCH_BOUND_NOTE, BenchResult, FormatResult, cells
from engine.cli import main
from engine.jobs import Cancelled, CancelToken, Progress
from engine.models.build import UnknownModelNameError, named_config
from tests.tiny_checkpoints import write_single_file

# 16 image tokens, 24 text tokens (Z-Image pads both), on the CPU even where there is a GPU
SMALL = {"resolution": 64, "steps": 2, "text_tokens": 24, "device": "cpu"}
NO_GPU = not torch.cuda.is_available()


def check_rows(result, formats):
    rows = {r.format: r for r in result.rows}
    assert list(rows) == [f for f in FORMATS if f in formats]
    for r in rows.values():
        if r.format == "fp8":  # no GPU here
            assert r.note == "n/a (needs a CUDA GPU, sm89+)"
            assert (r.seconds_per_step, r.relative_error, r.speedup) == (None, None, None)
            continue
        assert r.seconds_per_step > 0 and r.compile_seconds >= 0 and r.peak_vram_gb is None
        assert r.launch_bound is None  # a CPU step is computed as it is enqueued
        baseline = rows["bf16+compile" if r.format.endswith("+compile") else "bf16"]
        assert r.speedup == pytest.approx(baseline.seconds_per_step / r.seconds_per_step)
    if "bf16" in rows:
        assert (rows["bf16"].relative_error, rows["bf16"].speedup) == (0.0, 1.0)
        assert rows["bf16"].cosine == pytest.approx(1.0)
    for fmt in ("int8", "int8+compile"):
        if fmt in rows:
            assert 1e-4 < rows[fmt].relative_error < 0.06  # 1–3% typical on tiny random models
            assert 0.998 < rows[fmt].cosine < 1
    return rows


@pytest.mark.parametrize("name", ["flux2-tiny", "chroma-tiny", "zimage-tiny", "flux1-tiny"])
def test_bench_a_named_model(name):
    reports: list[Progress] = []
    result = run_bench(BenchRequest(name, formats=("int8", "fp8", "bf16"), **SMALL), progress=reports.append)
    check_rows(result, ("bf16", "fp8", "int8"))
    assert result.model.endswith("tiny (random weights)")
    assert result.device.startswith("CPU — no CUDA GPU found") if NO_GPU else result.device == "CPU"
    assert (result.image_tokens, result.text_tokens, result.scheme) == (16, 24, "rowwise")
    assert 0 < result.quantized_layers < result.linear_layers
    assert [p.done for p in reports] == [1, 2, 3, 4, 8, 9, 10, 11, 12]  # fp8 skips its 4 calls at once
    assert reports[-1].total == 12 and reports[-1].message == "int8: step 2/2"
    assert json.loads(json.dumps(result.to_dict()))["rows"][2]["format"] == "int8"
    table = result.table()
    assert "fp8     n/a (needs a CUDA GPU, sm89+)" in table
    assert result.int8_backend == "PyTorch float32 matmuls (no int8 speed-up)"
    assert "per-token activation scales); int8 GEMM: PyTorch float32 matmuls (no int8 speed-up)\n" in table


def test_compiled_formats(monkeypatch):
    # inductor's C++ code generation takes minutes on CI's CPU: the same graph capture (fullgraph, the
    # int8 op included) runs through aot_eager here; the GPU run uses inductor
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    result = run_bench(BenchRequest("flux2-tiny", formats=FORMATS, scheme="tensorwise", **SMALL))
    rows = check_rows(result, FORMATS)
    assert rows["bf16+compile"].relative_error < 1e-2


def test_rotated_int8_is_measured_and_labelled():
    """Chroma's tiny MLP output layers are 256 wide: the only ones a group of 256 can rotate."""
    plain = run_bench(BenchRequest("chroma-tiny", formats=("bf16", "int8"), **SMALL))
    rotated = run_bench(BenchRequest("chroma-tiny", formats=("bf16", "int8"), rotate="down", **SMALL))
    check_rows(rotated, ("bf16", "int8"))
    assert rotated.scheme == "rowwise, down-projections rotated"
    assert rotated.rows[1].relative_error != plain.rows[1].relative_error  # other int8 values


def test_bench_a_file(tmp_path):
    ckpt = write_single_file(tmp_path / "klein.safetensors", "flux2", prefix="model.diffusion_model.")
    result = run_bench(BenchRequest(str(ckpt.path), formats=("bf16", "int8"), **SMALL))
    check_rows(result, ("bf16", "int8"))
    assert result.model == "Flux.2 custom (klein.safetensors, bf16)"


def test_bench_an_int8_file_uses_its_layers(tmp_path):
    ckpt = write_single_file(tmp_path / "z.safetensors", "zimage", fmt="int8_rowwise")
    result = run_bench(BenchRequest(str(ckpt.path), formats=("bf16", "int8"), **SMALL))
    rows = check_rows(result, ("bf16", "int8"))
    int8_tensors = sum(t.dtype == torch.int8 for t in ckpt.tensors.values())
    assert (result.scheme, result.quantized_layers) == ("as in the file", int8_tensors)
    assert rows["int8"].relative_error > 0  # bf16 runs the dequantized weights, int8 the file's


def test_cancel():
    cancel = CancelToken()

    def progress(p: Progress) -> None:
        if p.done == 3:
            cancel.cancel()

    with pytest.raises(Cancelled):
        run_bench(BenchRequest("chroma-tiny", formats=("bf16", "int8"), **SMALL), progress, cancel)


@pytest.mark.parametrize(
    "changes,message",
    [
        (
            {"formats": ("bf16", "int4")},
            "unknown format 'int4'; choose from bf16, bf16+compile, fp8, int8, int8+compile",
        ),
        ({"formats": ()}, "no format to measure; choose from bf16, bf16+compile, fp8, int8, int8+compile"),
        ({"resolution": 1000}, "resolution 1000 is not a positive multiple of 16"),
        ({"steps": 0}, "steps must be at least 1, got 0"),
        ({"text_tokens": 0}, "text tokens must be at least 1, got 0"),
        ({"scheme": "blockwise"}, "unknown scheme 'blockwise'; choose from tensorwise, rowwise"),
        ({"rotate": "some"}, "unknown rotation 'some'; choose from none, down, all"),
        (
            {"device": "cuda"},
            "no CUDA GPU found: benchmark on the CPU (small models only) or on a machine with one",
        ),
        (
            {"device": "cuda:1"},
            "no CUDA GPU found: benchmark on the CPU (small models only) or on a machine with one",
        ),
        ({"device": "gpu1"}, "unknown device 'gpu1'; choose cpu, cuda or cuda:N (a GPU's index)"),
        ({"device": "cuda:x"}, "unknown device 'cuda:x'; choose cpu, cuda or cuda:N (a GPU's index)"),
        ({"device": "cpu", "cuda_graphs": True}, "CUDA graphs need a CUDA GPU: benchmark without them on the CPU"),
        ({"max_vram_gb": 0}, "max VRAM must be a positive number of GB, got 0"),
        ({"max_vram_gb": -2.5}, "max VRAM must be a positive number of GB, got -2.5"),
        (
            {"source": "flux2-klein-9b"},
            (
                "Flux.2 Klein 9B (random weights) has 9.1B parameters: benchmark it on a CUDA GPU; "
                "on the CPU use a small model such as flux2-tiny, flux2-tiny-guidance"
            ),
        ),
    ],
)
def test_bad_requests(changes, message):
    if changes.get("device") in ("cuda", "cuda:1") and not NO_GPU:
        pytest.skip("there is a GPU")
    request = BenchRequest(**{"source": "zimage-tiny", **SMALL, **changes})
    with pytest.raises(BenchError) as err:
        run_bench(request)
    assert str(err.value) == message


def test_unknown_source(tmp_path):
    with pytest.raises(
        UnknownModelNameError, match="^'nothing-here' is neither a checkpoint file nor a known model"
    ):
        run_bench(BenchRequest("nothing-here"))


def test_cli_json_and_table(capsys):
    args = [
        "bench",
        "zimage-tiny",
        "--res",
        "64",
        "--steps",
        "1",
        "--text-tokens",
        "8",
        "--formats",
        "bf16,int8",
    ]
    args += ["--device", "cpu"]
    assert main([*args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [r["format"] for r in result["rows"]] == ["bf16", "int8"]
    assert result["model"] == "Z-Image tiny (random weights)" and result["steps"] == 1
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.startswith(
        "Z-Image tiny (random weights): 64×64, batch 1 (16 image + 8 text tokens), median of 1 steps"
    )
    assert "\nint8 " in out


def weights_mb(name: str, fmt: str) -> float:
    """A format's weight size, counted here from the architecture's shapes and high-precision rules."""
    arch, config, _ = named_config(name)
    eligible = lambda n, s: len(s) == 2 and n.endswith(".weight") and not arch.keeps_high_precision(n, s)
    narrow = fmt.startswith(("int8", "fp8"))
    shapes = arch.tensor_shapes(config).items()
    return sum(math.prod(s) * (1 if narrow and eligible(n, s) else 2) for n, s in shapes) / 1e6


def test_formats_that_do_not_fit():
    """A GPU too small for bf16 still measures int8, with errors against bf16 run block by block."""
    bf16_mb, int8_mb = weights_mb("flux2-tiny", "bf16"), weights_mb("flux2-tiny", "int8")
    limit_mb = (bf16_mb + int8_mb) / 2
    formats = ("bf16", "bf16+compile", "int8")
    full = {r.format: r for r in run_bench(BenchRequest("flux2-tiny", formats=formats, **SMALL)).rows}
    reports: list[Progress] = []
    limited = run_bench(
        BenchRequest("flux2-tiny", formats=formats, max_vram_gb=limit_mb / 1e3, **SMALL), reports.append
    )
    bf16, compiled, int8 = limited.rows
    note = f"does not fit: its weights take {bf16_mb:.1f} MB of the {limit_mb:.1f} MB available"
    assert (bf16.note, compiled.note) == (note, note)
    assert bf16.seconds_per_step is None and compiled.seconds_per_step is None
    assert int8.seconds_per_step > 0 and int8.speedup is None
    assert int8.relative_error == full["int8"].relative_error and int8.cosine == full["int8"].cosine
    assert [p.done for p in reports] == [4, 8, 9, 10, 11, 12]
    assert f"bf16+compile  {note}\n" in limited.table()
    nothing = run_bench(BenchRequest("flux2-tiny", formats=formats, max_vram_gb=int8_mb / 2e3, **SMALL))
    assert all(r.note.startswith("does not fit") and r.relative_error is None for r in nothing.rows)


def test_cli_max_vram(capsys):
    args = ["bench", "zimage-tiny", "--res", "64", "--steps", "1", "--formats", "bf16,int8", "--device", "cpu"]
    assert main([*args, "--max-vram", "0.000001", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["note"][:13] for r in rows] == ["does not fit:"] * 2
    with pytest.raises(SystemExit) as exit:
        main([*args, "--max-vram", "none"])
    assert exit.value.code == 2
    assert "argument --max-vram: invalid float value: 'none'" in capsys.readouterr().err
    assert main([*args, "--max-vram", "nan"]) == 2
    assert "max VRAM must be a positive number of GB, got nan" in capsys.readouterr().err


def test_a_launch_bound_row_is_marked():
    rows = (FormatResult("bf16", 0.05, 1.0, 0.1, 9.0, 0.0, 1.0, launch_bound=False),
            FormatResult("int8", 0.06, 0.83, 0.1, 5.0, 0.03, 0.999, launch_bound=True))  # fmt: skip
    result = BenchResult("m", "GPU", {}, 512, 1, 10, 1024, 512, "rowwise", 1, 2, rows=rows)
    table = result.table()
    assert "\nbf16    0.050   1.00×" in table and "\nint8    0.060*  0.83×" in table
    assert table.endswith("\n" + LAUNCH_BOUND_NOTE)
    assert LAUNCH_BOUND_NOTE not in BenchResult(**{**result.__dict__, "rows": rows[:1]}).table()


def test_a_kept_result_reads_back_with_the_same_table():
    """The app keeps ``to_dict()`` between runs and shows it through ``from_dict``: the same header and
    cells as the CLI's table; keys of other versions are left out."""
    rows = (FormatResult("bf16", note="does not fit: its weights take 18.2 GB of the 12.0 GB available"),
            FormatResult("int8", 0.071, None, 13.4, 9.9, 0.0293, 0.99956, launch_bound=True))  # fmt: skip
    result = BenchResult("m", "GPU", {"torch": "2.13"}, 512, 1, 10, 1024, 512, "rowwise", 1, 2, rows=rows)
    kept = json.loads(json.dumps(result.to_dict()))
    kept["rows"][1]["future"] = kept["gone"] = 1
    back = BenchResult.from_dict(kept)
    assert back == result and back.table() == result.table()
    assert back.table().startswith("\n".join(back.header()) + "\n\nformat  s/step")
    assert [cells(r) for r in back.rows] == [
        ("bf16", rows[0].note),
        ("int8", "0.071*", "—", "13.4 s", "9.9 GB", "2.93%", "0.99956"),
    ]


def test_cli_bad_input(capsys):
    assert main(["bench", "zimage-tiny", "--formats", "bf16,int2"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "int8-studio: error: unknown format 'int2'; choose from bf16, bf16+compile, fp8, int8, int8+compile\n"
    )


def test_cli_without_a_model_runs_the_engines_defaults(capsys):
    """`int8-studio bench` alone measures what the app's form starts from on that device; options
    given still apply."""
    cpu = bench_defaults(gpu=False)
    assert main(["bench", "--device", "cpu", "--steps", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"] == f"{named_config(cpu.source)[2]} (random weights)"
    assert (result["resolution"], result["steps"]) == (cpu.resolution, 1)
    assert tuple(r["format"] for r in result["rows"]) == cpu.formats
    assert bench_defaults(gpu=True) == BenchRequest(bench_defaults(gpu=True).source)  # the request's defaults


def test_cli_a_file_on_the_cpu_is_a_quick_run_that_says_how_to_ask_for_more(tmp_path, capsys):
    """`bench FILE` without a GPU measures the CPU's defaults (not 1024², 10 steps, every format: tens of
    minutes) and says so after the table; options given still apply, and all three given ask for no note."""
    cpu = bench_defaults(gpu=False)
    ckpt = write_single_file(tmp_path / "m.safetensors", "zimage")
    args = ["bench", str(ckpt.path), "--device", "cpu", "--steps", "1", "--text-tokens", "8"]
    assert main([*args, "--json"]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert (result["resolution"], result["steps"]) == (cpu.resolution, 1)
    assert tuple(r["format"] for r in result["rows"]) == cpu.formats
    assert err == (
        f"int8-studio: on the CPU, a quick run: {cpu.resolution}×{cpu.resolution}, 1 steps, bf16,int8; "
        "ask for more with --res, --steps and --formats\n"
    )
    assert main([*args, "--res", "64", "--formats", "int8"]) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.gpu
def test_cuda_graph_replays_give_the_eager_outputs():
    request = BenchRequest("flux2-tiny", resolution=128, steps=2, formats=FORMATS, device="cuda")
    eager = {r.format: r for r in run_bench(request).rows}
    graphs = run_bench(BenchRequest(**{**request.__dict__, "cuda_graphs": True}))
    assert graphs.cuda_graphs and "replayed from a CUDA graph" in graphs.table()
    # on a GPU to itself a tiny model's eager step is launch-bound, but the GPU may be shared (parallel
    # tests) and then the step waits for it instead; a replay is one launch whatever else runs
    assert all(isinstance(r.launch_bound, bool) for r in eager.values())
    for r in graphs.rows:
        assert r.launch_bound is False and LAUNCH_BOUND_NOTE not in graphs.table()
        assert r.seconds_per_step > 0
        assert r.relative_error == pytest.approx(eager[r.format].relative_error, rel=1e-3, abs=1e-6)


@pytest.mark.gpu
def test_a_gpu_by_index():
    last = torch.cuda.device_count() - 1
    result = run_bench(BenchRequest("flux2-tiny", resolution=64, steps=1, formats=("int8",), device=f"cuda:{last}"))
    assert result.device.startswith(torch.cuda.get_device_name(last)) and result.int8_backend == "Triton kernels"
    with pytest.raises(BenchError, match=rf"^no CUDA GPU {last + 1}: this machine has {last + 1} \(0–{last}\)$"):
        run_bench(BenchRequest("flux2-tiny", device=f"cuda:{last + 1}"))


@pytest.mark.gpu
def test_a_small_gpu_runs_what_fits():
    """On the GPU the limit caps the allocator. Klein 4B's bf16 weights (7.8 GB) do not fit in its int8
    weights plus 2 GB; int8 runs there, built without the bf16 model, with errors against bf16 run one
    block at a time. With almost no room beyond the weights, the allocator's own out-of-memory error
    (here while building or tuning) becomes the row's note."""
    bf16_gb, int8_gb = (weights_mb("flux2-klein-4b", fmt) / 1e3 for fmt in ("bf16", "int8"))
    request = BenchRequest(
        "flux2-klein-4b", resolution=256, steps=1, warmup=1, formats=("bf16", "int8"), device="cuda",
        max_vram_gb=int8_gb + 2,
    )  # fmt: skip
    bf16, int8 = run_bench(request).rows
    assert bf16.note == f"does not fit: its weights take {bf16_gb:.1f} GB of the {int8_gb + 2:.1f} GB available"
    assert int8.seconds_per_step > 0 and int8_gb < int8.peak_vram_gb < int8_gb + 2
    assert 1e-3 < int8.relative_error < 0.06 and int8.cosine > 0.998
    tight = {"resolution": 2048, "formats": ("int8",), "max_vram_gb": int8_gb + 0.05}
    (row,) = run_bench(BenchRequest(**{**request.__dict__, **tight})).rows
    limits = f"weights {int8_gb:.1f} GB of {int8_gb + 0.05:.1f} GB"
    assert row.note == f"out of GPU memory ({limits}): try a lower resolution or batch"
    x = torch.empty(int(1.5 * bf16_gb * 1e9), dtype=torch.uint8, device="cuda")  # the cap is lifted after
    del x

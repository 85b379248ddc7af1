"""Triton kernels against float64: in the interpreter on CPU tensors, and on the GPU (marker ``gpu``)."""

from __future__ import annotations

import pytest
import torch

from engine.int8 import kernels
from engine.int8.backends import low_rank_torch, quantize_tokens_torch
from engine.int8.kernels import entry, gemm, runtime, tuner
from engine.int8.kernels import tokens as token_kernels
from engine.int8.operands import Epilogue, LowRank
from engine.int8.quantize import quantize_weight
from tests.int8_reference import (
    DEVICES,
    NEEDS_INTERPRETER,
    ULP,
    assert_within_int8_rounding,
    exact_scaled_mm,
)

# Interpreter: one config per code path (pointer loads with and without EVEN_K, TMA, persistent grid,
# warp specialization with descriptors made in the kernel).
INTERPRETER_CONFIGS = [
    kernels.TileConfig(16, 32, 64, 4, 2),
    kernels.TileConfig(32, 16, 128, 4, 2, tma=True, tma_store=True),
    kernels.TileConfig(16, 16, 32, 4, 2, group_m=2, persistent=True),
    kernels.TileConfig(16, 32, 32, 4, 2, persistent=True, tma=True, warp_specialize=True),
]


def configs_for(device: str) -> list[kernels.TileConfig]:
    if device == "cpu":
        return INTERPRETER_CONFIGS
    # the GPU: the first config of each size class, and the first TMA and persistent ones
    table = kernels.ARCH_CONFIGS[kernels.arch_of(torch.device("cuda"))]
    every = [c for size in table.values() for c in size]
    firsts = [configs[0] for configs in table.values()]
    paths = [next(c for c in every if c.tma), next(c for c in every if c.persistent), next(c for c in every if c.tma_store)]
    return firsts + paths + [c for c in every if c.warp_specialize][:1]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 40), (17, 300), (6, 3072), (3, 4096), (5, 4100)])  # 3072, 4100: two loops
@pytest.mark.parametrize("single_pass_max_k", [16384, 64])  # 64: the two-loop path on every shape
def test_quantize_tokens_matches_reference_bit_for_bit(device, dtype, shape, single_pass_max_k, monkeypatch):
    monkeypatch.setattr(token_kernels, "SINGLE_PASS_MAX_K", single_pass_max_k)
    x = (torch.randn(shape) * torch.rand(shape[0], 1) * 10).to(dtype).to(device)
    q, scale = kernels.quantize_tokens(x)
    q_ref, scale_ref = quantize_tokens_torch(x)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (shape[0],)
    assert torch.equal(q, q_ref) and torch.equal(scale, scale_ref)
    assert q.abs().max() <= 127 and (q.abs().amax(dim=1) >= 126).all()
    err = (x.double() - q.double() * scale.double()[:, None]).abs()
    assert (err <= scale.double()[:, None] * (0.5 + 1e-5)).all()  # half a step, plus fp32 rounding


@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply")  # numpy in the interpreter
@pytest.mark.parametrize("device", DEVICES)
def test_quantize_tokens_zero_and_non_finite_tokens(device):
    x = torch.randn(6, 300, dtype=torch.bfloat16)
    x[0] = 0
    x[1, 7] = float("nan")
    x[2, 299] = float("inf")
    x[3, 0] = float("-inf")
    q, scale = kernels.quantize_tokens(x.to(device))
    assert (q[:4] == 0).all()
    assert torch.isfinite(scale[0]) and scale[0] > 0
    assert torch.isnan(scale[1:4]).all() and torch.isfinite(scale[4:]).all()
    q_ref, scale_ref = quantize_tokens_torch(x.to(device))
    assert torch.equal(q, q_ref) and torch.equal(scale.nan_to_num(), scale_ref.nan_to_num())
    assert torch.equal(scale.isnan(), scale_ref.isnan())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 16, 17])
@pytest.mark.parametrize("n, k", [(70, 256), (40, 272)])
@pytest.mark.parametrize("scheme, with_bias", [("tensorwise", True), ("rowwise", False), ("rowwise", True)])
def test_scaled_mm_against_float64(device, dtype, m, n, k, scheme, with_bias):
    x = torch.randn(m, k, dtype=dtype, device=device)
    w_int8, w_scale = quantize_weight(torch.randn(n, k) * torch.rand(n, 1), scheme)
    w_int8, w_scale = w_int8.to(device), w_scale.to(device)
    bias = torch.randn(n, dtype=dtype, device=device) if with_bias else None
    q, x_scale = kernels.quantize_tokens(x)
    exact = exact_scaled_mm(q, x_scale, w_int8, w_scale, bias)
    flat_scale = w_scale.reshape(-1).contiguous()
    for config in configs_for(device):
        out = kernels.scaled_mm(q, x_scale, w_int8, flat_scale, dtype, Epilogue(bias), config=config)
        assert out.shape == (m, n) and out.dtype == dtype
        tolerance = exact.abs() * (ULP[dtype] + 2.0**-20) + 1e-6
        assert ((out.double() - exact).abs() <= tolerance).all(), config
        assert_within_int8_rounding(out, x, w_int8, w_scale, bias)


@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply")  # numpy in the interpreter
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m, k, rank", [(1, 72, 1), (17, 300, 45), (40, 256, 70)])  # 70: two blocks of ranks
def test_low_rank_first_factor_against_float64(device, dtype, m, k, rank):
    q, x_scale = kernels.quantize_tokens(torch.randn(m, k, device=device) * 3)
    x_scale[m // 2] = float("nan")  # a token that held NaN or ±Inf (its q is all zeros)
    q[m // 2] = 0
    down = torch.randn(rank, k, device=device).to(dtype)
    out = kernels.low_rank(q, x_scale, down)
    assert out.shape == (m, rank) and out.dtype == dtype
    want = (q.double() @ down.double().T) * x_scale.double()[:, None]
    assert torch.isnan(out[m // 2]).all()
    ok = torch.arange(m) != m // 2
    bound = ((q.double().abs() @ down.double().abs().T) * x_scale.double()[:, None] * (ULP[dtype] + 2**-20))[ok]
    assert ((out[ok].double() - want[ok]).abs() <= bound + 1e-30).all()
    fallback = low_rank_torch(q, x_scale, down)  # the other backends' (float32 all through)
    assert ((fallback[ok].double() - want[ok]).abs() <= bound + 1e-30).all()


@pytest.mark.gpu
def test_scaled_mm_with_several_tiles_per_program():
    """More tiles than multiprocessors, so each persistent program walks several: a warp-specialized loop
    once computed every tile wrong except the first (the small shapes above are one tile on a GPU)."""
    x = torch.randn(2000, 520, dtype=torch.bfloat16, device="cuda")
    w_int8, w_scale = quantize_weight(torch.randn(2100, 520), "rowwise")
    w_int8, w_scale = w_int8.cuda(), w_scale.cuda()
    q, x_scale = kernels.quantize_tokens(x)
    exact = exact_scaled_mm(q, x_scale, w_int8, w_scale)
    for config in configs_for("cuda"):
        out = kernels.scaled_mm(q, x_scale, w_int8, w_scale.reshape(-1), torch.bfloat16, config=config)
        assert ((out.double() - exact).abs() <= exact.abs() * (ULP[torch.bfloat16] + 2.0**-20) + 1e-6).all(), config


@pytest.mark.parametrize("device", DEVICES)
def test_scaled_mm_float32_output_and_tuned_config(device, tmp_path, monkeypatch):
    monkeypatch.setattr(entry, "TUNER", kernels.GemmTuner(tmp_path / "configs.json"))
    x = torch.randn(33, 128, device=device)
    w_int8, w_scale = quantize_weight(torch.randn(48, 128), "rowwise")
    w_int8, w_scale = w_int8.to(device), w_scale.to(device)
    q, x_scale = kernels.quantize_tokens(x)
    config = None if device == "cuda" else INTERPRETER_CONFIGS[0]
    out = kernels.scaled_mm(q, x_scale, w_int8, w_scale.reshape(-1), torch.float32, config=config)
    exact = exact_scaled_mm(q, x_scale, w_int8, w_scale)
    torch.testing.assert_close(out.double(), exact, rtol=1e-6, atol=1e-6)


def test_tile_configs_fit_each_architecture():
    smem = {"sm90": 227 * 1024, "sm80": 163 * 1024, "sm89": 99 * 1024, "sm120": 99 * 1024}
    for arch, table in kernels.ARCH_CONFIGS.items():
        for size, configs in table.items():
            assert configs, (arch, size)
            for c in configs:
                assert c.smem_bytes() <= smem[arch], (arch, c)
                assert arch == "sm90" or not (c.tma or c.tma_store)
    assert [kernels.m_bucket(m) for m in (1, 16, 17, 4096, 4608)] == [16, 16, 32, 4096, 8192]
    with pytest.raises(ValueError, match="needs TMA loads and a persistent grid"):
        kernels.TileConfig(128, 128, 128, 4, 4, tma=True, warp_specialize=True)


def test_tuner_remembers_winners_on_disk(tmp_path):
    path = tmp_path / "cache" / "configs.json"
    gemm_tuner = kernels.GemmTuner(path)
    assert gemm_tuner._load() == {}
    gemm_tuner._table = {"GPU|triton x": {"16,8,8": {"block_m": 16}}}
    gemm_tuner._save()
    assert kernels.GemmTuner(path)._load() == gemm_tuner._table
    assert [p.name for p in path.parent.iterdir()] == ["configs.json"]


def test_unaligned_operands_leave_the_descriptor_paths():
    ws = kernels.TileConfig(128, 128, 128, 4, 4, tma=True, persistent=True, warp_specialize=True, tma_store=True)
    aligned = torch.zeros(8, 64, dtype=torch.int8)
    assert kernels.usable(ws, aligned, aligned, torch.zeros(8, 8, dtype=torch.bfloat16)) is ws
    odd = torch.zeros(8, 40, dtype=torch.int8)  # 40-byte rows: no TMA
    plain = kernels.usable(ws, odd, aligned[:, :40], torch.zeros(8, 8, dtype=torch.bfloat16))
    assert (plain.tma, plain.warp_specialize, plain.persistent, plain.tma_store) == (False, False, True, True)


def test_launch_keys_tell_apart_what_triton_compiles_apart():
    """``runtime.launch`` reuses a compiled kernel for calls with one key: two arguments with one key
    must get one specialization from Triton (tensors of each dtype and alignment, integers around 1,
    16 and the type widths, descriptors, floats, booleans, None)."""
    specialize = pytest.importorskip("triton._C.libtriton").native_specialize_impl
    from triton.backends.compiler import BaseBackend
    from triton.tools.tensor_descriptor import TensorDescriptor

    base = torch.zeros(4096, dtype=torch.int8)
    tensors = [base, base[1:], base[16:], base[8:], base.view(torch.uint8), base.view(torch.float16)[3:]]
    ints = [0, 1, 2, 15, 16, 17, 32, -16, -1, 2**31 - 16, 2**31, 2**31 + 1, 2**63 - 1, 2**63, 2**64 - 16]
    descriptors = [TensorDescriptor.from_tensor(torch.zeros(64, 64, dtype=t), b) for t in (torch.int8, torch.float16)
                   for b in ([16, 32], [32, 16])]  # fmt: skip
    args = [*tensors, *ints, *descriptors, 0.5, 2.0, True, False, None]
    triton_view = [specialize(BaseBackend, a, False, True, True) for a in args]
    ours = [runtime._arg_key(a) for a in args]
    for i, j in [(i, j) for i in range(len(args)) for j in range(len(args))]:
        if ours[i] == ours[j]:
            assert triton_view[i] == triton_view[j], (args[i], args[j])


@NEEDS_INTERPRETER
def test_the_interpreter_launches_through_triton(monkeypatch):
    monkeypatch.setattr(runtime, "_COMPILED", {})
    kernels.quantize_tokens(torch.randn(3, 40))
    assert runtime._COMPILED == {}


@pytest.mark.gpu
def test_a_repeated_launch_runs_the_kernel_triton_compiled():
    """The second of two alike calls launches the cached binary: the same values as Triton's launch,
    for every config kind (pointers, host descriptors, a persistent grid, warp specialization) and for
    inputs whose alignment, and so specialization, differs."""
    w_int8, w_scale = quantize_weight(torch.randn(300, 256), "rowwise")
    w_int8, w_scale = w_int8.cuda(), w_scale.cuda().reshape(-1)
    storage = torch.randn(40 * 256 + 1, dtype=torch.bfloat16, device="cuda")
    for x in (storage[: 40 * 256].view(40, 256), storage[1:].view(40, 256)):  # aligned, then not
        q, x_scale = kernels.quantize_tokens(x)
        again = kernels.quantize_tokens(x)
        assert torch.equal(q, again[0]) and torch.equal(x_scale, again[1])
        exact = exact_scaled_mm(q, x_scale, w_int8, w_scale)
        for config in configs_for("cuda"):
            before = len(runtime._COMPILED)
            first = kernels.scaled_mm(q, x_scale, w_int8, w_scale, torch.bfloat16, config=config)
            cached = len(runtime._COMPILED)
            second = kernels.scaled_mm(q, x_scale, w_int8, w_scale, torch.bfloat16, config=config)
            assert len(runtime._COMPILED) == cached <= before + 1, config
            assert torch.equal(first, second), config
            assert ((first.double() - exact).abs() <= exact.abs() * (ULP[torch.bfloat16] + 2.0**-20) + 1e-6).all()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_launches_on_two_gpus_keep_their_own_binaries():
    """A binary is loaded into one GPU's context: alike calls on two GPUs must not share one."""
    for index in (0, 1, 0, 1):
        with torch.cuda.device(index):
            x = torch.randn(40, 256, dtype=torch.bfloat16, device=f"cuda:{index}")
            q, scale = kernels.quantize_tokens(x)
            q_ref, scale_ref = quantize_tokens_torch(x)
            assert torch.equal(q, q_ref) and torch.equal(scale, scale_ref), index


def test_triton_release_parses_the_versions_in_use():
    assert kernels.triton_release("3.6.0") == (3, 6)
    assert kernels.triton_release("3.4.0+git1a2b3c") == (3, 4)
    assert kernels.triton_release("3.10.1") > kernels.MIN_TRITON > kernels.triton_release("3.3.1")


@pytest.mark.parametrize("scheme, with_bias, rank", [("rowwise", True, 8), ("tensorwise", False, 0)])
def test_reference_output_matches_float64(scheme, with_bias, rank):
    m, n, k = 40, 70, 300
    q = torch.randint(-127, 128, (m, k), dtype=torch.int8)
    x_scale = torch.rand(m) + 0.01
    w_int8, w_scale = quantize_weight(torch.randn(n, k), scheme)
    bias = torch.randn(n, dtype=torch.bfloat16) if with_bias else None
    lora = LowRank(torch.randn(m, rank), torch.randn(n, rank), torch.rand(rank)) if rank else None
    tokens = torch.tensor([0, 17, 39])
    got = kernels.reference_output(tokens, q, x_scale, w_int8, w_scale.reshape(-1), Epilogue(bias, lora))
    want = exact_scaled_mm(q, x_scale, w_int8, w_scale, bias)[tokens]
    if lora is not None:
        want += (lora.x[tokens].double() * lora.scale.double()) @ lora.up.double().t()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@NEEDS_INTERPRETER
@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply")  # numpy in the interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_agrees_accepts_the_kernel_and_rejects_wrong_values(dtype):
    x = torch.randn(20, 96)
    x[3, 5] = float("nan")  # a NaN row: the documented NaN output row, in the kernel and the reference
    w_int8, w_scale = quantize_weight(torch.randn(50, 96), "rowwise")
    q, x_scale = kernels.quantize_tokens(x)
    expected = kernels.reference_output(torch.arange(20), q, x_scale, w_int8, w_scale.reshape(-1))
    out = kernels.scaled_mm(q, x_scale, w_int8, w_scale.reshape(-1), dtype, config=INTERPRETER_CONFIGS[0])
    assert out[3].isnan().all() and kernels.agrees(out, expected)
    wrong = [out.clone() for _ in range(4)]
    wrong[0][7, 11] += out[7].float().abs().max() / 20  # off by 5% of the row's largest value
    wrong[1][:, 32:] = 0  # a tile never written
    wrong[2][0, 0] = float("nan")
    wrong[3][3] = 0  # a NaN row that came back as numbers
    assert not any(kernels.agrees(w, expected) for w in wrong)


def test_agrees_takes_an_overflow_to_inf_as_the_dtype_rounds():
    expected = torch.tensor([[7.0e4, -1.0, 2.0]])  # past float16's 65504
    assert kernels.agrees(expected.to(torch.float16), expected)
    assert not kernels.agrees(torch.tensor([[65504.0, -1.0, 2.0]], dtype=torch.float16), expected)


@pytest.mark.gpu
def test_tuner_drops_a_config_that_computes_wrong_values(tmp_path, monkeypatch):
    """A candidate that returns at once without writing its output would be the fastest: the tuner must
    notice that its values are wrong, warn, and pick a correct one."""
    gemm_tuner = kernels.GemmTuner(tmp_path / "configs.json")
    broken = kernels.candidate_configs(kernels.arch_of(torch.device("cuda")), 300)[0]
    launch = kernels.launch_scaled_mm

    def sabotaged(config, q, x_scale, w, w_scale, out, *args, compile_only=False):
        if config == broken and not compile_only:
            out.zero_()
        else:
            launch(config, q, x_scale, w, w_scale, out, *args, compile_only=compile_only)

    monkeypatch.setattr(tuner, "launch_scaled_mm", sabotaged)
    x = torch.randn(300, 512, dtype=torch.bfloat16, device="cuda")
    w_int8, w_scale = quantize_weight(torch.randn(640, 512), "rowwise")
    w_int8, w_scale = w_int8.cuda(), w_scale.reshape(-1).cuda()
    q, x_scale = kernels.quantize_tokens(x)
    out = torch.empty(300, 640, dtype=torch.bfloat16, device="cuda")
    with pytest.warns(RuntimeWarning, match="computed wrong values for M=300, N=640, K=512"):
        chosen = gemm_tuner.config_for(q, x_scale, w_int8, w_scale, out)
    assert chosen != broken


def _gemm_args(device: str, m: int = 300, n: int = 640, k: int = 512):
    """``launch_scaled_mm``'s arguments after the config, with the output filled with NaN."""
    x = torch.randn(m, k, device=device)
    w_int8, w_scale = quantize_weight(torch.randn(n, k), "rowwise")
    q, x_scale = kernels.quantize_tokens(x)
    out = torch.full((m, n), float("nan"), device=device)
    return q, x_scale, w_int8.to(device), w_scale.reshape(-1).to(device), out, Epilogue(), 4


@pytest.mark.parametrize("device", DEVICES)
def test_precompiling_compiles_and_never_launches(device):
    args = _gemm_args(device)
    configs = [kernels.TileConfig(32, 64, 64, 4, 2, group_m=3), kernels.TileConfig(64, 32, 64, 4, 2, group_m=3)]
    kernels.precompile(configs, *args)
    out = args[4]
    assert out.isnan().all()
    exact = exact_scaled_mm(*args[:4])
    for config in configs:  # the compiled kernels compute what a launch that compiles computes
        kernels.launch_scaled_mm(config, *args)
        torch.testing.assert_close(out.double(), exact, rtol=1e-6, atol=1e-6)
        out.fill_(float("nan"))


def test_precompiling_inside_another_compile_queue_leaves_it_alone():
    """Code around the tuner may hold its own queue open (only one can be): the candidates then
    compile one by one when timed, and the caller's queue is not disturbed."""
    if kernels.AsyncCompileMode is None:
        pytest.skip("this Triton has no compile queue")
    from concurrent.futures import ThreadPoolExecutor

    from triton.runtime._async_compile import active_mode

    with ThreadPoolExecutor(1) as pool, kernels.AsyncCompileMode(pool) as outer:
        kernels.precompile([kernels.TileConfig(32, 64, 64, 4, 2)], *_gemm_args("cpu"))
        assert active_mode.get() is outer


@pytest.mark.gpu
def test_precompiling_fills_the_kernel_cache_in_a_thread_pool():
    """The tuner compiles its candidates at once (``kernels.precompile``): afterwards each one's
    kernel is in Triton's cache, so timing them compiles nothing. A group size no other test uses
    makes the kernels new to this process."""
    if kernels.AsyncCompileMode is None:
        pytest.skip("this Triton has no compile queue")
    args = _gemm_args("cuda")
    configs = [kernels.TileConfig(64, 64, 64, 4, 2, group_m=5), kernels.TileConfig(64, 128, 64, 4, 3, group_m=5)]
    compiled = gemm._scaled_mm_kernel.device_caches[torch.cuda.current_device()][0]
    before = len(compiled)
    kernels.precompile(configs, *args)
    assert len(compiled) == before + len(configs)
    assert args[4].isnan().all()

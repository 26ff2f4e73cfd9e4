"""No silent slow path: the product policy's probes and warnings, one rounding for half weight gradients, and tile
plans without a ragged tail (issue: GPU hardening). Everything here runs on the CPU: accelerator behaviour is reached
through the ``meta`` device, whose GEMMs accept half operands with an fp32 output as CUDA's do."""

from __future__ import annotations

import warnings

import pytest
import torch

from dpo_kernels.ops.linear import plan, products
from dpo_kernels.options import TokenOptions


_CACHED = (products.half_into_float, products.accumulates_into_float, products._warn_promotion, products._log_policy)


@pytest.fixture
def fresh_probes():
    for f in _CACHED:
        f.cache_clear()
    yield
    for f in _CACHED:
        f.cache_clear()


def _failing_mm(error):
    def mm(*args, **kwargs):
        if kwargs.get("out_dtype") is not None:
            raise error
        return torch.ops.aten.mm(*args)
    return mm


def test_a_probe_that_works_says_so_quietly(fresh_probes):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert products.half_into_float("meta", torch.bfloat16)
        assert products.accumulates_into_float("meta", torch.bfloat16)


def test_an_unsupported_probe_on_an_accelerator_warns_with_the_cost_and_the_fix(fresh_probes, monkeypatch):
    monkeypatch.setattr(torch, "mm", _failing_mm(NotImplementedError("Could not run 'aten::mm.dtype'")))
    with pytest.warns(products.SlowProductsWarning, match=r"fp32 x fp32.*15x slower.*Fix: torch >= 2.8"):
        assert not products.half_into_float("meta", torch.bfloat16)
    # cached: asked again, no second warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not products.half_into_float("meta", torch.bfloat16)


def test_the_cpu_widens_by_design_without_a_warning(fresh_probes):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not products.half_into_float("cpu", torch.bfloat16)  # NotImplementedError in torch 2.13: by design


@pytest.mark.parametrize("message", ["CUDA error: an illegal memory access was encountered",
                                     "CUDA out of memory. Tried to allocate 2.00 MiB"])
def test_a_probe_raises_what_is_not_an_answer_about_capability(fresh_probes, monkeypatch, message):
    monkeypatch.setattr(torch, "mm", _failing_mm(RuntimeError(message)))
    with pytest.raises(RuntimeError, match=message.split(".")[0]):
        products.half_into_float("meta", torch.bfloat16)
    monkeypatch.undo()
    assert products.half_into_float("meta", torch.bfloat16)  # the error was not cached as "unsupported"


@pytest.mark.parametrize("message", ["self and mat2 must have the same dtype, but got BFloat16 and Float",
                                     "expected mat1 and mat2 to have the same dtype, but got: c10::BFloat16 != float"])
def test_the_accumulation_probe_reads_older_torch_refusals_as_unsupported(fresh_probes, monkeypatch, message):
    """Issue 27: torch 2.8-2.9 refuse an fp32 accumulator beside half operands with "must have the same dtype";
    the probe raised it, so every half backward would have crashed there instead of taking the fp32 temporary."""
    def addmm(*args, **kwargs):
        raise RuntimeError(message)

    monkeypatch.setattr(torch, "addmm", addmm)
    assert not products.accumulates_into_float("meta", torch.bfloat16)


def test_a_large_fp32_promotion_on_an_accelerator_warns_once(fresh_probes):
    hidden = torch.empty(8192, 4096, dtype=torch.bfloat16, device="meta")
    weight = torch.empty(128256, 4096, dtype=torch.float32, device="meta")
    p = products.Products.in_dtype(products.product_dtype(hidden, weight), "meta", torch.float32)
    assert p.operand_dtype == torch.float32  # outside autocast the mix is multiplied in fp32, as documented
    with pytest.warns(products.SlowProductsWarning, match=r"bfloat16 beside a head in torch.float32.*autocast"):
        products.report_products(p, hidden, weight)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        products.report_products(p, hidden, weight)  # once per device and dtypes
        small = torch.empty(16, 4096, dtype=torch.bfloat16, device="meta")
        products._warn_promotion.cache_clear()
        products.report_products(p, small, torch.empty(512, 4096, device="meta"))  # below the threshold
        half = products.Products.in_dtype(torch.bfloat16, "meta", torch.float32)
        products.report_products(half, hidden, weight)  # half operands: nothing to say


def test_the_policy_is_logged_once_per_device_and_dtypes(fresh_probes, caplog):
    hidden = torch.empty(4, 8, dtype=torch.bfloat16, device="meta")
    weight = torch.empty(16, 8, dtype=torch.bfloat16, device="meta")
    p = products.Products.in_dtype(torch.bfloat16, "meta", torch.float32)
    with caplog.at_level("INFO", logger="dpo_kernels"):
        products.report_products(p, hidden, weight)
        products.report_products(p, hidden, weight)
    lines = [r.getMessage() for r in caplog.records if "GEMM operands" in r.getMessage()]
    assert lines == ["dpo_kernels: on meta, hidden torch.bfloat16 x head torch.bfloat16: products defined in "
                     "torch.bfloat16, GEMM operands torch.bfloat16, output torch.float32"]


def test_half_weight_gradients_are_rounded_once(monkeypatch):
    """The bf16 ``dW`` GEMM runs with cuBLAS's reduced-precision split-K reduction off, and the flag is restored."""
    seen = []
    real_mm = torch.mm

    def mm(*args, **kwargs):
        seen.append(torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction)
        return real_mm(*args, **kwargs)

    before = torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
    monkeypatch.setattr(torch, "mm", mm)
    p = products.Products(torch.bfloat16, torch.bfloat16, torch.float32)
    a = torch.randn(64, 32, dtype=torch.bfloat16)
    b = torch.randn(32, 16, dtype=torch.bfloat16)
    out = torch.empty(64, 16, dtype=torch.bfloat16)
    assert p.write(out, a, b)
    assert seen == [False]
    assert torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction == before
    torch.testing.assert_close(out, (a.float() @ b.float()).bfloat16(), rtol=0, atol=0)


def _widths(p: plan.TilePlan, v: int) -> list[int]:
    chunks = list(p.vocab_chunks(v))
    assert chunks[0][0] == 0 and chunks[-1][1] == v
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
    return [e - s for s, e in chunks]


def _estimated_seconds(widths: list[int], tokens: int, dim: int) -> float:
    return sum(plan.chunk_seconds(tokens, dim, w, plan.DEFAULT_MULTIPROCESSORS) for w in widths)


@pytest.mark.parametrize("n, vocab, dim, per_entry", [(8192, 128256, 4096, 6), (8192, 256000, 3584, 6),
                                                      (8192, 151936, 3584, 4), (500, 32000, 2048, 6),
                                                      (100000, 128256, 4096, 6), (3, 50, 8, 6),
                                                      (6144, 256000, 2304, 8), (6144, 128256, 4096, 14)])
def test_accelerator_plans_fit_the_gemm_waves(n, vocab, dim, per_entry):
    """Chunks of one width (a multiple of VOCAB_ALIGN) and a last one of what is left, within the budget's cap, and
    never estimated slower than the balanced chunks of the budget's own width (what the plan made before)."""
    p = plan.plan_tiles(n, vocab, per_entry, TokenOptions(), torch.device("cuda"), dim=dim)
    widths = _widths(p, vocab)
    assert max(widths) <= p.vocab
    if len(widths) > 1:
        assert set(widths[:-1]) == {p.vocab} and p.vocab % plan.VOCAB_ALIGN == 0 and widths[-1] <= p.vocab
        budget = plan.default_tile_budget_mb(torch.device("cuda"), n, dim, per_entry) * 2**20
        widest = int(budget // per_entry // p.tokens) // plan.VOCAB_ALIGN * plan.VOCAB_ALIGN
        balanced = _widths(plan.TilePlan(p.tokens, widest, balanced_vocab=True), vocab)
        assert _estimated_seconds(widths, p.tokens, dim) <= _estimated_seconds(balanced, p.tokens, dim)
    blocks = [e - s for s, e in p.token_blocks(n)]
    assert sum(blocks) == n and max(blocks) - min(blocks) <= 1 and max(blocks) <= p.tokens
    assert p.tokens * p.vocab * per_entry <= plan.ACCELERATOR_TILE_BUDGET_CAP_MB * 2**20


def test_wave_fitting_at_the_gemma2_head():
    """6144 kept tokens, D = 2304: the budget's 4608 columns make 48 x 18 forward tiles of 128 x 256 (6.5 waves of
    132) and 36 x 9 weight-gradient tiles (2.5 waves); 5632 (within a quarter above it) makes exactly 8 and 3."""
    p = plan.plan_tiles(6144, 256000, 6, TokenOptions(), torch.device("cuda"), dim=2304)
    assert p.vocab == 5632 and not p.balanced_vocab
    assert plan._waves(6144, 5632, 132) * 132 == 48 * 22 and plan._waves(5632, 2304, 132) * 132 == 44 * 9
    # a caller's tile budget is a bound: the fitting stays within it
    mine = plan.plan_tiles(6144, 256000, 6, TokenOptions(tile_budget_mb=162), torch.device("cuda"), dim=2304)
    assert mine.vocab * 6144 * 6 <= 162 * 2**20
    # the CPU, and a plan without a head (from logits), keep balanced chunks
    assert plan.plan_tiles(6144, 256000, 6, TokenOptions(), torch.device("cpu"), dim=2304).balanced_vocab
    assert plan.plan_tiles(6144, 256000, 6, TokenOptions(), torch.device("cuda")).balanced_vocab


def test_a_device_without_a_count_fits_the_default_multiprocessors():
    assert plan.multiprocessors(torch.device("meta")) == plan.DEFAULT_MULTIPROCESSORS
    if not torch.cuda.is_available():
        assert plan.multiprocessors(torch.device("cuda")) == plan.DEFAULT_MULTIPROCESSORS


def test_the_accelerator_default_is_derived_from_the_dh_traffic():
    """Llama-3 head, 8192 bf16 tokens: 16 chunks of about 2 D columns (was 51 of 2560 and a last one of 256)."""
    p = plan.plan_tiles(8192, 128256, 6, TokenOptions(), torch.device("cuda"), dim=4096)
    widths = _widths(p, 128256)
    assert len(widths) == 16 and min(widths[:-1]) == 2 * 4096  # 64 x 32 tiles of 128 x 256: 15.5 waves of 132
    assert plan.default_tile_budget_mb(torch.device("cuda"), 8192, 4096, 6) == plan.ACCELERATOR_TILE_BUDGET_CAP_MB
    # few tokens: the floor; no head width known (from logits): the floor
    assert plan.default_tile_budget_mb(torch.device("cuda"), 256, 4096, 6) == plan.ACCELERATOR_TILE_BUDGET_MB
    assert plan.default_tile_budget_mb(torch.device("cuda")) == plan.ACCELERATOR_TILE_BUDGET_MB
    # the caller's budget wins
    mine = plan.plan_tiles(8192, 128256, 6, TokenOptions(tile_budget_mb=96), torch.device("cuda"), dim=4096)
    assert mine.tokens * mine.vocab * 6 <= 96 * 2**20


def test_fixed_chunk_sizes_are_kept_exactly():
    p = plan.plan_tiles(50, 1000, 6, TokenOptions(token_chunk_size=7, vocab_chunk_size=300), torch.device("cpu"))
    assert _widths(p, 1000) == [300, 300, 300, 100]
    assert [e - s for s, e in p.token_blocks(50)] == [7] * 7 + [1]


def test_cpu_tiles_count_kept_tiles_as_their_working_set():
    from dpo_kernels.ops.linear.loop import bytes_per_entry
    from dpo_kernels.ops.linear.sources import StoredSource

    p = products.Products(torch.float32, torch.float32, torch.float32)
    cpu, acc = torch.device("cpu"), torch.device("meta")
    stored = StoredSource(torch.zeros(2, 3), torch.zeros(5, 3), None, p)
    assert bytes_per_entry(stored, None, cpu) == 4
    assert bytes_per_entry(stored, None, acc) == 1


def test_every_triton_launch_is_guarded_on_its_tensors_device(monkeypatch):
    pytest.importorskip("triton")
    from dpo_kernels import linear_token_logprobs, token_logprobs
    from dpo_kernels.ops.triton_kernels import launch, logits as logits_kernels, tiles

    guarded = []

    def recording(t):
        guarded.append(t.device)
        return launch.on_device(t)

    monkeypatch.setattr(tiles, "on_device", recording)
    monkeypatch.setattr(logits_kernels, "on_device", recording)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 16, generator=g, requires_grad=True)
    weight = torch.randn(96, 16, generator=g, requires_grad=True)
    labels = torch.randint(0, 96, (2, 5), generator=g)
    linear_token_logprobs(hidden, weight, labels, backend="triton", vocab_chunk_size=32).sum().backward()
    tile_launches = len(guarded)
    assert tile_launches >= 6  # 3 vocabulary chunks, fold and grad
    logits = torch.randn(2, 5, 96, generator=g, requires_grad=True)
    token_logprobs(logits, labels, backend="triton").sum().backward()
    assert len(guarded) == tile_launches + 2  # the from-logits forward and backward
    assert set(guarded) == {torch.device("cpu")}


def test_the_guard_selects_the_tensors_gpu(monkeypatch):
    from dpo_kernels.ops.triton_kernels import launch

    entered = []

    class Guard:
        def __init__(self, device):
            entered.append(device)

    monkeypatch.setattr(torch.cuda, "device", Guard)

    class OnSecondGpu:
        device = torch.device("cuda", 1)

    launch.on_device(OnSecondGpu())
    assert entered == [torch.device("cuda", 1)]
    launch.on_device(torch.empty(1))  # off CUDA: no guard
    assert entered == [torch.device("cuda", 1)]


def _fake_cuda_home(tmp_path, release: str) -> str:
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.1'\n")
    nvcc.chmod(0o755)
    return str(tmp_path)


def test_an_nvcc_of_another_major_version_builds_the_cpu_part_and_says_why(tmp_path):
    from dpo_kernels import build_config

    home = _fake_cuda_home(tmp_path, "12.4")
    assert build_config.nvcc_version(home) == "12.4"
    use, why = build_config.cuda_decision(True, "13.0", home, build_config.nvcc_version(home))
    assert not use and "nvcc 12.4" in why and "CUDA 13.0" in why
    assert build_config.cuda_decision(True, "13.0", home, "13.1") == (True, None)
    assert build_config.cuda_decision(True, None, home, "13.0")[1] == "torch is not a CUDA build"
    assert build_config.cuda_decision(True, "13.0", None, None)[1] == "no nvcc was found (CUDA_HOME)"
    assert build_config.nvcc_version(str(tmp_path / "nowhere")) is None
    info = tmp_path / "info.json"
    build_config.write_build_info(why, str(info))
    assert build_config.read_build_info(str(info)) == {"cuda_left_out": why}


def test_the_backend_report_carries_the_build_reason(monkeypatch):
    from dpo_kernels.ops import extension

    module, reason = extension.load()
    if module is None:
        pytest.skip(f"dpo_kernels._C is not loadable here: {reason}")
    if module.built_with_cuda():
        pytest.skip("this build has its CUDA kernels")
    monkeypatch.setattr(extension, "read_build_info", lambda: {"cuda_left_out": "nvcc 12.4 differs from CUDA 13.0"})
    assert extension.cuda_unavailable_reason() == ("dpo_kernels._C was built without its CUDA kernels: nvcc 12.4 "
                                                   "differs from CUDA 13.0")


# --------------------------------------------------------------------------------------------- kernel details


@pytest.mark.parametrize("width", [256 * k for k in range(1, 65)] + [67, 300, 1000, 32000])
def test_the_gradient_kernel_blocks_leave_few_lanes_idle(width):
    """Point 6: the column block of the gradient kernel fits the plan's chunk widths (multiples of 256), at most
    1/16 of the lanes idle, where a fixed 1024 left a sixth idle at 2560 columns."""
    from dpo_kernels.ops.triton_kernels import config

    cfg = config.tile_row_config(width, elementwise=True)
    idle = -(-width // cfg.block_v) * cfg.block_v - width
    if width % 256 == 0:
        assert cfg.block_v in config.GRAD_BLOCKS and 16 * idle <= width, (width, cfg)
    assert cfg.num_warps == max(1, cfg.block_v // 128)  # 4 fp32 values per thread, the configuration compiled
    assert config.tile_row_config(2560, elementwise=True).block_v == 512


def test_the_compile_check_covers_every_block_and_both_specialisations(monkeypatch):
    """The variants the JIT builds: every gradient block, and the 16-divisibility specialisation of pointers and
    integers (the vectorised loads and stores) beside the unaligned one."""
    import os

    from dpo_kernels.ops.triton_kernels import config

    # importing the compile check turns the interpreter off for the process; the other tests still need it
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "0"))
    from dpo_kernels.tools import compile_check

    variants = compile_check._variants(torch.bfloat16)
    blocks = {v.flags["BLOCK_V"] for v in variants if v.kernel == "grad_tile"}
    assert blocks == set(config.GRAD_BLOCKS)
    assert compile_check.ALIGNMENTS == ("aligned", "unaligned")
    grad = next(v for v in variants if v.kernel == "grad_tile")
    marked = {grad.fn.arg_names[i] for (i,) in compile_check._divisibility(grad.fn, grad.flags)}
    assert {"x_ptr", "out_ptr", "labels_ptr", "width", "v0"} <= marked
    assert not marked & (compile_check.FLOAT_SCALARS | set(grad.flags))
    logits = next(v for v in variants if v.kernel == "logits_backward")
    assert "ignore_index" not in {logits.fn.arg_names[i] for (i,) in compile_check._divisibility(logits.fn, logits.flags)}


def test_the_compile_check_fails_a_spill_inside_a_loop_only(monkeypatch):
    """Spills are judged by where they fall in the machine code: a value kept across the row loop (a store before
    it, a load after) passes, a local-memory access between a backward branch and its target fails; also the
    frozen head's shifted fold is compiled in every head variant."""
    import os

    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "0"))
    from dpo_kernels.tools import compile_check

    sass = """
        /*0100*/                   STL [R1], R0 ;
        /*0110*/                   FADD R2, R2, R3 ;
        /*0120*/               @!P3 BRA 0x110 ;
        /*0130*/                   LDL.LU R19, [R1] ;
        /*0140*/                   EXIT ;"""
    assert compile_check.local_accesses_in_loops(sass) == 0
    inside = sass.replace("FADD R2, R2, R3", "LDL R4, [R1+0x4]")
    assert compile_check.local_accesses_in_loops(inside) == 1
    shifted = [v for v in compile_check._variants(torch.bfloat16) if v.kernel == "fold_tile" and v.flags["SHIFTED"]]
    assert len(shifted) == 16 and all(v.flags["WEIGHTS"] and v.flags["SUMS"] for v in shifted)
    assert {v.flags["LOGGING"] for v in shifted} == {False, True}  # the rows trainers log, beside the weights
    store = [v for v in compile_check._variants(torch.float16) if v.kernel == "fold_tile" and v.flags["SHIFTED"]
             and not v.flags["SUMS"]]
    assert len(store) == 16


_VIEWS = {"view", "slice", "select", "t", "transpose", "as_strided", "reshape", "_unsafe_view", "alias", "expand",
          "unsqueeze", "squeeze", "permute", "detach", "_reshape_alias", "split", "unbind", "chunk", "narrow",
          "numpy_T"}


def _ops_per_pass(backend: str, chunks: int) -> tuple[dict, dict]:
    """Every op (views aside) of one forward and one backward of the linear path over ``chunks`` vocabulary chunks."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    from dpo_kernels import linear_token_logprobs

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ not in _VIEWS:
                self.count[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(0)
    vocab, width = 4096, 4096 // chunks
    h = torch.randn(1, 40, 16, generator=g, requires_grad=True)
    w = torch.randn(vocab, 16, generator=g, requires_grad=True)
    labels = torch.randint(0, vocab, (1, 40), generator=g)
    labels[0, :5] = -100
    with Ops() as forward:
        out = linear_token_logprobs(h, w, labels, backend=backend, vocab_chunk_size=width)
    with Ops() as backward:
        out.sum().backward()
    return forward.count, backward.count


def test_each_vocabulary_chunk_launches_its_gemms_and_one_tile_kernel():
    """Per chunk, counted: forward one GEMM and the fold; backward the recomputing GEMM, the gradient kernel, the
    ``dH`` and ``dW`` GEMMs, and nothing else (no copy, fill or conversion per chunk)."""
    from ..conftest import skip_if_unsupported

    skip_if_unsupported("cpu", torch.float32)
    (f4, b4), (f8, b8) = _ops_per_pass("cpu", 4), _ops_per_pass("cpu", 8)
    per_chunk = ({k: (f8[k] - f4[k]) // 4 for k in f8 if f8[k] != f4[k]},
                 {k: (b8[k] - b4[k]) // 4 for k in b8 if b8[k] != b4[k]})
    assert per_chunk == ({"mm": 1, "fold_tile": 1}, {"mm": 2, "grad_tile": 1, "addmm_": 1}), per_chunk

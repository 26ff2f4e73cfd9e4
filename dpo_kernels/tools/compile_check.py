"""Compile every kernel ahead of time for sm_80 and sm_90, with no GPU, and report its resources.

    python -m dpo_kernels.tools.compile_check            # Triton: every variant, fp32 / bf16 / fp16, sm_80, sm_90
    python -m dpo_kernels.tools.compile_check --arch 90 --dtype bf16 --filter tile
    python -m dpo_kernels.tools.compile_check --cuda     # csrc/**/*.cu with nvcc and ptxas -v (see cuda_check.py)

Each row is one kernel variant: the constexpr flags the dispatcher can launch, at the launch configuration the
heuristics choose for a Llama-3-sized problem (V=128256; the fold's 2048-wide steps, and every column block the
gradient kernel can take, ``config.GRAD_BLOCKS``), each in the two specialisations the JIT builds: ``aligned``
(every pointer 16-byte aligned and every integer argument a multiple of 16, as at that shape: ``tt.divisibility``
16, which lets Triton vectorise loads and stores) and ``unaligned`` (an odd vocabulary such as GPT-2's 50257). The
tile kernels read fp32 tiles whatever the input dtype; the dtype of a row is that of the gradient tile they write.
Registers, spill bytes and shared memory come from ``ptxas -v`` (the same ptxas Triton uses for that architecture)
run on the PTX Triton generated. Exit status 1 if any compile fails or any default configuration spills inside a
loop of its machine code (``cuobjdump -sass``: a local-memory access between a backward branch and its target); a
spill outside every loop (a value kept across the row loop, one store and one load per program) is reported and
passes.

The transform flags (``HAS_SCALE``, ``HAS_SOFTCAP``, ``HAS_TEMPERATURE``) add only elementwise arithmetic; every
kernel is compiled with none of them and with all three, which bounds the register use of the subsets between.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

if os.environ.get("TRITON_INTERPRET") == "1":
    # The interpreter replaces @triton.jit functions with Python ones: there would be nothing to compile.
    os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from ..ops.triton_kernels import config  # noqa: E402
from ..ops.triton_kernels.logits import _logits_backward_kernel, _logits_forward_kernel  # noqa: E402
from ..ops.triton_kernels.tiles import _fold_tile_kernel, _grad_tile_kernel, _scaled_grad_kernel  # noqa: E402

VOCAB, TILE_WIDTH = 128256, 8192
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TRITON_TYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# Pointer arguments that carry the row's dtype; every other pointer is fp32 (tiles, statistics) or int64 labels.
INPUT_POINTERS = {"x_ptr", "ref_ptr", "grad_ptr"}
TILE_INPUT_POINTERS = {"out_ptr", "weights_ptr", "ref_weights_ptr"}
SCALED_STORE_POINTERS = {"weights_ptr", "ref_weights_ptr"}  # plan.SCALED_STORE_DTYPE, whatever the operands
FLOAT_SCALARS = {"logit_scale", "softcap", "inv_temperature", "headroom"}
# Innermost strides are 1 in practice; Triton specialises an argument equal to 1 into a constant, and so do we.
UNIT_STRIDES = {"x_stride_v", "ref_stride_v", "grad_stride_v"}
# Integer arguments that are not multiples of 16 even at the aligned shape.
NEVER_ALIGNED = {"ignore_index"}
ALIGNMENTS = ("aligned", "unaligned")
TRANSFORMS = {
    "plain": dict(HAS_SCALE=False, HAS_SOFTCAP=False, HAS_TEMPERATURE=False),
    "transformed": dict(HAS_SCALE=True, HAS_SOFTCAP=True, HAS_TEMPERATURE=True),
}


@dataclass
class Variant:
    kernel: str
    fn: object
    flags: dict
    num_warps: int
    num_stages: int = 3
    label: str = ""
    extra: dict = field(default_factory=dict)


def _variants(dtype: torch.dtype) -> list[Variant]:
    out = []
    for (tname, tflags), with_ref in itertools.product(TRANSFORMS.items(), (False, True)):
        row = config.row_config(VOCAB, with_ref)
        tag = f"{'kl' if with_ref else 'logp'},{tname}"
        for raw in (False, True):  # logits_forward, and its RAW variant logits_fold
            out.append(Variant("logits_forward", _logits_forward_kernel.fn, dict(
                HAS_REF=with_ref, RAW=raw, BLOCK_V=row.block_v, **tflags,
                **_absent(ref_ptr=with_ref, logp_ptr=not raw, lse_ptr=not raw, ref_logp_ptr=with_ref and not raw,
                          ref_lse_ptr=with_ref and not raw, kl_ptr=with_ref and not raw, stats_ptr=raw,
                          ref_stats_ptr=with_ref and raw),
            ), row.num_warps, label=tag + (",fold" if raw else "")))
        out.append(Variant("logits_backward", _logits_backward_kernel.fn, dict(
            HAS_KL_GRAD=with_ref, BLOCK_V=row.block_v, **tflags,
            **_absent(ref_ptr=with_ref, ref_lse_ptr=with_ref, g_kl_ptr=with_ref),
        ), row.num_warps, label=tag))
    heads = [(False, False), (True, False), (False, True), (True, True)]  # (bias, reference)
    for (tname, tflags), (bias, ref) in itertools.product(TRANSFORMS.items(), heads):
        tag = f"{'bias,' if bias else ''}{'kl,' if ref else ''}{tname}"
        fold = config.tile_row_config(TILE_WIDTH, with_reference=ref)
        for logging in (False, True) if dtype == torch.float32 else ():  # fp32 tiles only: one set of variants
            out.append(Variant("fold_tile", _fold_tile_kernel.fn, dict(
                HAS_BIAS=bias, HAS_REF=ref, HAS_REF_BIAS=bias and ref, LOGGING=logging, WEIGHTS=False,
                REF_WEIGHTS=False, SHIFTED=False, SUMS=False, BLOCK_V=fold.block_v, **tflags,
                **_absent(bias_ptr=bias, xr_ptr=ref, ref_bias_ptr=bias and ref, ref_stats_ptr=ref, weights_ptr=False,
                          ref_weights_ptr=False, **_NO_ACCUMULATORS),
            ), fold.num_warps, label=tag + (",logging" if logging else "")))
        # fold_weights and fold_shifted: a frozen head's weights in this dtype (fp32 tiles, bf16 / fp16 GEMM
        # operands) with its sums, and the eager schedule's scaled store (fp16 weights, shifts without sums); the
        # shifted ones also with the rows trainers log (TRL's entropy under PEFT, or beside the store)
        kinds = ((False, False, False), (True, True, False), (True, True, True))
        if dtype == torch.float16:
            kinds += ((True, False, False), (True, False, True))
        for shifted, sums, logging in kinds:
            block = config.tile_row_config(TILE_WIDTH, with_reference=ref or shifted)
            kind = (",shifted" + ("" if sums else ",store") if shifted else ",weights") + (",logging" if logging else "")
            out.append(Variant("fold_tile", _fold_tile_kernel.fn, dict(
                HAS_BIAS=bias, HAS_REF=ref, HAS_REF_BIAS=bias and ref, LOGGING=logging, WEIGHTS=True,
                REF_WEIGHTS=ref, SHIFTED=shifted, SUMS=sums, BLOCK_V=block.block_v, **tflags,
                **_absent(bias_ptr=bias, xr_ptr=ref, ref_bias_ptr=bias and ref, ref_stats_ptr=ref, ref_weights_ptr=ref,
                          acc_ptr=sums, shift_ptr=shifted, ref_acc_ptr=sums and ref, ref_shift_ptr=shifted and ref,
                          shift_out_ptr=shifted, ref_shift_out_ptr=shifted and ref),
            ), block.num_warps, label=tag + kind))
        for filtered, block in itertools.product((False, True), config.GRAD_BLOCKS):
            out.append(Variant("grad_tile", _grad_tile_kernel.fn, dict(
                HAS_BIAS=bias, HAS_KL_GRAD=ref, HAS_REF_BIAS=bias and ref, FILTER=filtered, BLOCK_V=block,
                **tflags, **_absent(bias_ptr=bias, xr_ptr=ref, ref_bias_ptr=bias and ref, ref_lse_ptr=ref,
                                    g_kl_ptr=ref, deviation_ptr=filtered),
            ), config.tile_row_config(block, elementwise=True).num_warps,
                label=tag + (",filter" if filtered else "") + f",{block}"))
    # scaled_grad (the eager schedule's scaled store, kept only for bf16 operands): fp16 weights in, dZ out in bf16
    for (tname, tflags), ref, block in itertools.product(TRANSFORMS.items(), (False, True), config.GRAD_BLOCKS):
        if dtype != torch.bfloat16:
            break
        out.append(Variant("scaled_grad", _scaled_grad_kernel.fn, dict(
            HAS_REF=ref, BLOCK_V=block, **tflags,
            **_absent(ref_weights_ptr=ref, ref_maxes_ptr=ref, ref_label_logits_ptr=ref, ref_lse_ptr=ref, g_kl_ptr=ref),
        ), config.tile_row_config(block, elementwise=True).num_warps,
            label=f"{'kl,' if ref else ''}{tname},{block}"))
    return out


def _divisibility(fn, constexprs: dict) -> dict:
    """The ``aligned`` specialisation: ``tt.divisibility`` 16 on every pointer and integer argument that is not a
    constant, as the JIT marks a 16-byte-aligned pointer or an integer multiple of 16."""
    return {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
            if name not in constexprs and name not in FLOAT_SCALARS and name not in NEVER_ALIGNED}


_NO_ACCUMULATORS = dict(acc_ptr=False, shift_ptr=False, ref_acc_ptr=False, ref_shift_ptr=False, shift_out_ptr=False,
                        ref_shift_out_ptr=False)


def _absent(**present: bool) -> dict:
    """Pointer arguments passed as ``None`` (constexpr) when their buffer is absent, as the launchers do."""
    return {name: None for name, given in present.items() if not given}


def _signature(fn, constexprs: dict, dtype: torch.dtype) -> dict[str, str]:
    tile_kernel = fn is _fold_tile_kernel.fn or fn is _grad_tile_kernel.fn  # their tiles are fp32 in every variant
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif tile_kernel and name in INPUT_POINTERS:
            sig[name] = "*fp32"
        elif fn is _scaled_grad_kernel.fn and name in SCALED_STORE_POINTERS:
            sig[name] = "*fp16"
        elif name in INPUT_POINTERS or name in TILE_INPUT_POINTERS:
            sig[name] = "*" + TRITON_TYPE[dtype]
        elif name == "labels_ptr":
            sig[name] = "*i64"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        elif name in FLOAT_SCALARS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _ptxas_path(arch: int) -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(arch).path


def _resources(ptx: str, arch: int) -> dict:
    """Registers, spill bytes and shared memory of the one kernel in ``ptx``, from ``ptxas -v``, and how many
    local-memory accesses (spills) lie inside a loop of its machine code (``cuobjdump -sass`` beside that ptxas)."""
    gpu = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1)
    ptxas = _ptxas_path(arch)
    with tempfile.TemporaryDirectory() as tmp:
        src, obj = os.path.join(tmp, "kernel.ptx"), os.path.join(tmp, "k.o")
        with open(src, "w") as f:
            f.write(ptx)
        result = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", src, "-o", obj],
                                capture_output=True, text=True, check=True)
        log = result.stderr + result.stdout
        regs = int(re.search(r"Used (\d+) registers", log).group(1))
        stores = int(re.search(r"(\d+) bytes spill stores", log).group(1))
        loads = int(re.search(r"(\d+) bytes spill loads", log).group(1))
        in_loops = 0
        if stores + loads:
            sass = subprocess.run([os.path.join(os.path.dirname(ptxas), "cuobjdump"), "-sass", obj],
                                  capture_output=True, text=True, check=True).stdout
            in_loops = local_accesses_in_loops(sass)
    return {"registers": regs, "spill_bytes": stores + loads, "spills_in_loops": in_loops}


_SASS = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def local_accesses_in_loops(sass: str) -> int:
    """Local-memory loads and stores (``LDL``/``STL``: spills) inside a loop of ``sass``: between a backward
    branch and its target. A spill outside every loop costs one store and one load per program."""
    ops = [(int(a, 16), op, rest) for a, op, rest in _SASS.findall(sass)]
    loops = []
    for addr, op, rest in ops:
        target = re.search(r"0x([0-9a-f]+)", rest)
        if op.startswith("BRA") and target and int(target.group(1), 16) < addr:
            loops.append((int(target.group(1), 16), addr))
    return sum(1 for addr, op, _ in ops if op.startswith(("LDL", "STL"))
               and any(lo <= addr <= hi for lo, hi in loops))


def _compile_one(job: tuple[str, int, int, str]) -> str:
    """Compile variant ``index`` of ``dtype_name`` for ``arch`` in ``alignment``; returns its report row (prefixed
    ``!`` on failure)."""
    dtype_name, index, arch, alignment = job
    dtype = DTYPES[dtype_name]
    variant = _variants(dtype)[index]
    constexprs = {**variant.flags, **{s: 1 for s in UNIT_STRIDES if s in variant.fn.arg_names}}
    attrs = _divisibility(variant.fn, constexprs) if alignment == "aligned" else {}
    head = f"{variant.kernel:<16} {variant.label + ',' + alignment:<46} {dtype_name:<5} sm_{arch:<3}"
    try:
        compiled = triton.compile(
            ASTSource(fn=variant.fn, signature=_signature(variant.fn, constexprs, dtype), constexprs=constexprs,
                      attrs=attrs),
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": variant.num_warps, "num_stages": variant.num_stages},
        )
        res = _resources(compiled.asm["ptx"], arch)
    except Exception as exc:  # a compile error is a result to report, not a crash
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"!{head} FAILED: {first}"
    verdict = ("ok" if res["spill_bytes"] == 0 else "SPILLS IN A LOOP" if res["spills_in_loops"]
               else "ok (spills outside loops)")
    row = (f"{head} {variant.num_warps:>5} {res['registers']:>5} {res['spill_bytes']:>8} "
           f"{compiled.metadata.shared:>7}  {verdict}")
    return row if verdict.startswith("ok") else "!" + row


def check(archs: list[int], dtypes: list[str], name_filter: str | None, jobs: int) -> int:
    print(f"Triton {triton.__version__} (its ptxas for each architecture), torch {torch.__version__}")
    print(f"{'kernel':<16} {'variant':<46} {'dtype':<5} {'arch':<6} {'warps':>5} {'regs':>5} {'spill B':>8} "
          f"{'smem B':>7}  result", flush=True)
    work = [
        (dtype_name, i, arch, alignment)
        for dtype_name in dtypes
        for i, variant in enumerate(_variants(DTYPES[dtype_name]))
        if not name_filter or name_filter in variant.kernel
        for arch in archs
        for alignment in ALIGNMENTS
    ]
    failures = 0
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs) as pool:
        for row in pool.map(_compile_one, work):
            failures += row.startswith("!")
            print(row.removeprefix("!"), flush=True)
    print(f"\n{failures} failure(s) in {len(work)} compiles" if failures
          else f"\nall {len(work)} compiles succeeded without spills inside a loop")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpo_kernels.tools.compile_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, action="append", choices=(80, 90), help="default: 80 and 90")
    parser.add_argument("--dtype", action="append", choices=tuple(DTYPES), help="default: all three")
    parser.add_argument("--filter", default=None, help="only kernels whose name contains this")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles (default: cores)")
    parser.add_argument("--cuda", action="store_true", help="check the CUDA C++ kernels of csrc/ instead")
    args = parser.parse_args(argv)
    if args.cuda:
        from . import cuda_check

        return cuda_check.check()
    return check(args.arch or [80, 90], args.dtype or list(DTYPES), args.filter, args.jobs)


if __name__ == "__main__":
    sys.exit(main())

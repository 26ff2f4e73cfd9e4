"""Tile sizes of the linear path, from one memory budget.

A tile is ``tokens x vocab`` logits. Everything the tile loop allocates per tile (the fp32 logits tile, the reference
tile, the ``dZ`` tile in the GEMM operand dtype) counts against ``tile_budget_mb``; the default keeps the scratch
small next to what a training step already holds (the head's weight gradient is ``V x D``). This module is the one
place that states the defaults (the docstrings elsewhere point here):

- CPU: 16 MiB, so a tile stays near the last-level cache between the GEMM that writes it and the kernel that folds it.
  There the budget bounds a tile's working set, so a tile kept in the eager schedule's store counts like a scratch
  tile (measured on the 2-core development machine, 32 MiB L3: sizing the kept tiles by the scratch alone made
  3072 x 1280 fp32 tiles, policy and reference 31 MiB together, and the eager forward 0.2-0.5 s slower than the same
  GEMMs at the recompute schedule's 2048 x 1024);
- accelerators: derived from the traffic of the backward, between 128 and 384 MiB. Each vocabulary chunk reads and
  writes the fp32 ``dH [n, D]`` accumulator once, ``8 n D`` bytes, against about 14 bytes per tile entry for the tile
  itself in bf16 (the fp32 logits written and read, ``dZ`` written and read by two GEMMs). A chunk at least
  ``CHUNK_COLUMNS_PER_DIM x D`` = 2 D columns wide keeps the accumulator at or under 4 bytes per entry, so the
  default is the budget of a full-height tile that wide, ``n x 2D x bytes per entry``, within those bounds. At the
  Llama-3 head (D = 4096, V = 128256) and N = 8192 bf16 tokens that is the 384 MiB cap: 16 vocabulary chunks of
  about 8k columns and 4.3 GB of ``dH`` traffic, where a fixed 128 MiB made 51 chunks of 2560 (a last one of 256)
  and 13.7 GB. What it costs: up to 256 MiB more scratch than 128 MiB, for the length of one forward or backward.
  A caller's ``tile_budget_mb`` replaces the derived default.

Tiles are balanced: the tokens are split into blocks that differ by at most one token, the vocabulary into chunks
whose widths differ by at most one ``VOCAB_ALIGN`` (the last one is trimmed to the vocabulary, by less than
``VOCAB_ALIGN`` columns), so no ragged tail of a few columns runs a nearly empty GEMM. On an accelerator, with a head,
the chunks are instead fitted to the GEMMs' waves (:func:`wave_fitted_width`): a GEMM's output tiles run one per
multiprocessor at a time, and a last wave that is partly empty takes as long as a full one, so a width whose
``[tokens, width]`` forward product and ``[width, D]`` weight-gradient product leave few multiprocessors idle in their
last waves is worth a few more chunks or a shorter last one. At the Gemma-2 head (D = 2304, V = 256000) and 6144
kept tokens the balanced widths were 4352 and 4608 columns: ``48 x 18`` output tiles of ``128 x 256`` make 6.5 waves
of 132 (the last one half idle) and the weight gradient's ``36 x 9`` 2.5 waves; 5632 columns make exactly 8 and 3.
All tokens go in one block whenever a tile of ``MIN_VOCAB_CHUNK`` columns fits the budget (then the backward writes
each vocabulary chunk's weight gradient with one GEMM). ``token_chunk_size`` / ``vocab_chunk_size`` fix either size exactly (the last block
or chunk then takes what is left).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ...options import TokenOptions

DEFAULT_TILE_BUDGET_MB = {"cpu": 16.0}
ACCELERATOR_TILE_BUDGET_MB = 128.0  # the floor of the derived accelerator default
ACCELERATOR_TILE_BUDGET_CAP_MB = 384.0  # its cap
CHUNK_COLUMNS_PER_DIM = 2
MIN_VOCAB_CHUNK = 1024
VOCAB_ALIGN = 256  # vocabulary chunks are multiples of this when wider (aligned rows, whole GEMM tiles)


def default_tile_budget_mb(device: torch.device, n: int | None = None, dim: int | None = None,
                           bytes_per_entry: int | None = None) -> float:
    """The default tile budget in MiB: the CPU's, or on an accelerator the traffic-derived one of this module's
    docstring for ``n`` tokens of a ``dim``-wide head (the floor when any of them is unknown)."""
    if device.type in DEFAULT_TILE_BUDGET_MB:
        return DEFAULT_TILE_BUDGET_MB[device.type]
    if n is None or dim is None or bytes_per_entry is None:
        return ACCELERATOR_TILE_BUDGET_MB
    wanted = n * CHUNK_COLUMNS_PER_DIM * dim * bytes_per_entry / 2**20
    return min(ACCELERATOR_TILE_BUDGET_CAP_MB, max(ACCELERATOR_TILE_BUDGET_MB, wanted))


def kept_tiles_count(device: torch.device) -> bool:
    """Whether the tile budget counts tiles kept in the eager schedule's store (a cache budget: the CPU) or only the
    scratch the tile sources allocate (accelerators, where larger tiles mean fewer, fuller launches)."""
    return device.type == "cpu"


def tile_budget_bytes(opts: TokenOptions, device: torch.device, n: int | None = None, dim: int | None = None,
                      bytes_per_entry: int | None = None) -> int:
    """The one tile budget, in bytes: ``opts.tile_budget_mb``, else :func:`default_tile_budget_mb`; the linear path's
    tiles and the torch backend's from-logits tiles are sized from it."""
    return int((opts.tile_budget_mb or default_tile_budget_mb(device, n, dim, bytes_per_entry)) * 2**20)


DEFAULTS_TEXT = (f"{DEFAULT_TILE_BUDGET_MB['cpu']:g} MiB on CPU; on accelerators derived from the backward's traffic, "
                 f"{ACCELERATOR_TILE_BUDGET_MB:g} to {ACCELERATOR_TILE_BUDGET_CAP_MB:g} MiB")

# The eager schedule's budget (dpo_kernels.ops.linear.eager): the kept tiles, 2 V bytes per kept token for bf16
# operands (kept_store_dtype) less what the weight's gradient holds of them (a trainable head's: D x its element
# size a column; a store larger than the budget keeps the vocabulary chunks that fit and the backward recomputes
# the others), 4 V for fp32 in groups of pairs (twice that for TDPO), plus the fp32 weight-gradient accumulator of a
# half weight over several such groups. On an accelerator 2 GiB holds a 2-byte store of about 8k tokens over a
# 128k vocabulary beside the gradient (more in it), 4k tokens of fp32 tiles; on the CPU, 1 GiB.
#
# fp32 master weights under half autocast (TRL's default) are the exception for a store of the policy's weights
# alone (every loss but TDPO's): their fp32 gradient has 4 D bytes a column, twice a bf16 one's, and holds the whole
# 2-byte store of up to 2 D kept tokens (Llama-3: 8192); and the stock path's own peak there is little more than
# that gradient (the modelled TRL 1.16 peak at Gemma-2, 6144 kept tokens: 2920 MiB, of which 2250 the gradient). So
# by default nothing lies beside it but the running maxima: the store keeps the columns the gradient holds, the
# backward recomputes the others (modelled at Gemma-2: 0.87x TRL's peak and 0.86x its time, where the 2 GiB default
# was 1.13x and 0.83x; Llama-3 keeps every column either way). A TDPO store, the reference's weights too, has no
# stock path to match and keeps the 2 GiB default.
DEFAULT_EAGER_BUDGET_MB = {"cpu": 1024.0}
ACCELERATOR_EAGER_BUDGET_MB = 2048.0
FP32_GRAD_EAGER_BUDGET_MB = 0.0
EAGER_DEFAULTS_TEXT = (f"{DEFAULT_EAGER_BUDGET_MB['cpu']:g} MiB on CPU, {ACCELERATOR_EAGER_BUDGET_MB:g} on "
                       f"accelerators ({FP32_GRAD_EAGER_BUDGET_MB:g} beside an fp32 master weight's gradient, which "
                       "holds the store)")


# What the eager schedule keeps of each logit. Where the GEMM operands are bf16 (an accelerator under bf16 autocast,
# or a bf16 model), ``dZ`` goes to its GEMMs rounded to bf16, so the store keeps the tile's softmax weights
# ``e^{z - c} t'(x)`` (``c`` the token's shift after the tile: at most its running max, below it by at most fp16's
# headroom, contract.shift_headroom; ``t'`` the transform's slope) in fp16, 2 bytes a logit, with ``c`` per token and
# vocabulary chunk beside (:class:`.sources.ScaledSource`); the backward forms ``dZ`` from them and the exact label
# logit. The weights stay below fp16's largest value, and fp16's unit roundoff (``2^-11``) is 8 times finer than
# bf16's (``2^-8``): before its one rounding to bf16 the kept ``dZ`` is off by at most ``2^-11`` relative, so it ends
# at most 1.125 times bf16's rounding error per entry (about 1.01 times its RMS). Entries below fp16's normal range
# (``6e-5`` of the slope at the shift, far below the tile's largest) keep an absolute error under ``3e-8`` of it.
# Everything else keeps the tiles themselves in the statistics dtype, 4 bytes a logit (8 for fp64): fp32 operands (the
# CPU widens half products to them; its ``dZ`` stays fp32), fp16 operands (an fp16 store would be no finer than their
# own rounding), a call with ``grad_filter_eps`` (its test reads ``p`` itself), or a slope
# ``logit_scale / temperature`` outside ``[2^-8, 2^8]`` (the weights would leave fp16's range).
SCALED_STORE_DTYPE = torch.float16
SCALED_STORE_SLOPES = (2.0**-8, 2.0**8)


def kept_store_dtype(operand_dtype: torch.dtype, stats_dtype: torch.dtype, opts: TokenOptions) -> torch.dtype:
    """The dtype of the eager schedule's store for GEMM operands in ``operand_dtype``: :data:`SCALED_STORE_DTYPE`
    under the rule above, else the statistics dtype (the tiles themselves)."""
    slope = opts.logit_scale / opts.temperature
    scaled = (operand_dtype == torch.bfloat16 and stats_dtype == torch.float32 and opts.grad_filter_eps is None
              and SCALED_STORE_SLOPES[0] <= abs(slope) <= SCALED_STORE_SLOPES[1])
    return SCALED_STORE_DTYPE if scaled else stats_dtype


def scaled_store_bytes_per_token(vocab: int) -> int:
    """The running maxima a scaled store keeps beside its weights, per token: one fp32 per vocabulary chunk, at most
    one chunk per ``MIN_VOCAB_CHUNK`` columns (unless ``vocab_chunk_size`` fixes narrower ones)."""
    return 4 * -(-vocab // MIN_VOCAB_CHUNK)


# auto's cost estimate (:mod:`.cost`) on an accelerator: an H100-class accelerator's dense bf16 tensor-core rate and
# HBM bandwidth at the efficiencies a roofline model fitted to H100 measurements found (about 0.79 and 0.86 of the
# peaks, 989 TFLOP/s and 3.35 TB/s), and one kernel launch; estimates from peak rates, not measurements. The CPU
# makes no estimate: there the eager schedule was measured faster at every shape tried, and auto runs it whenever it
# fits.
ACCELERATOR_FLOPS = 780e12
ACCELERATOR_BANDWIDTH = 2.9e12
LAUNCH_SECONDS = 4e-6

# Wave fitting of the vocabulary chunks (:func:`wave_fitted_width`): the output tile of a large half-precision GEMM
# on a Hopper-class accelerator (128 x 256, either orientation: what cuBLAS's large-tile kernels use; a kernel with
# other tiles quantises differently, and then the fitting is a guess that costs at most the half-budget floor of its
# search), the multiprocessor count where the device reports none (meta tensors; an H100 SXM's 132), and about how
# many launches a vocabulary chunk issues (the forward's GEMMs and fold, the backward's gradient kernel and GEMMs).
GEMM_TILE = (128, 256)
DEFAULT_MULTIPROCESSORS = 132
CHUNK_LAUNCHES = 8
ESTIMATES_COST = {"cpu": False}


def estimates_cost(device: torch.device) -> bool:
    """Whether ``auto`` weighs the schedules' estimated costs on this device (:mod:`.cost`)."""
    return ESTIMATES_COST.get(device.type, True)


def eager_budget_bytes(budget_mb: float | None, device: torch.device, fp32_grad_maxima: int | None = None) -> int:
    """The eager schedule's budget in bytes: ``budget_mb``, else the device's default; on an accelerator, for a
    scaled store of the policy's weights in an fp32 weight gradient's memory (``fp32_grad_maxima``: the bytes of its
    running maxima), :data:`FP32_GRAD_EAGER_BUDGET_MB` beside those maxima."""
    if budget_mb is not None:
        return int(budget_mb * 2**20)
    if device.type in DEFAULT_EAGER_BUDGET_MB:
        return int(DEFAULT_EAGER_BUDGET_MB[device.type] * 2**20)
    if fp32_grad_maxima is not None:
        return int(FP32_GRAD_EAGER_BUDGET_MB * 2**20) + fp32_grad_maxima
    return int(ACCELERATOR_EAGER_BUDGET_MB * 2**20)


@dataclass(frozen=True)
class TilePlan:
    """At most ``tokens`` per token block and ``vocab`` columns per vocabulary chunk; ``balanced_tokens`` /
    ``balanced_vocab``: blocks / chunks of near-equal size (this module's docstring), else of exactly that size with
    whatever is left at the end (sizes the caller fixed)."""

    tokens: int
    vocab: int
    balanced_tokens: bool = False
    balanced_vocab: bool = False
    hidden_grad_batch: int = 1  # chunks whose dH products a backward may run as one GEMM (hidden_grad_batch())

    def token_blocks(self, n: int) -> Iterator[tuple[int, int]]:
        return _pieces(n, self.tokens, 1, self.balanced_tokens)

    def vocab_chunks(self, v: int) -> Iterator[tuple[int, int]]:
        return _pieces(v, self.vocab, VOCAB_ALIGN if self.vocab > VOCAB_ALIGN else 1, self.balanced_vocab)

    def single_token_block(self, n: int) -> bool:
        return n <= self.tokens


def _pieces(total: int, most: int, align: int, balanced: bool) -> Iterator[tuple[int, int]]:
    """``[start, end)`` pieces of ``range(total)``, none longer than ``most``; balanced: as few as that allows, each a
    whole number of ``align`` units, the units shared out so that sizes differ by at most one unit."""
    if total <= most:
        yield 0, total
        return
    if not balanced:
        for start in range(0, total, most):
            yield start, min(total, start + most)
        return
    units, per_piece = -(-total // align), max(1, most // align)
    count = -(-units // per_piece)
    small, extra = divmod(units, count)
    start = 0
    for i in range(count):
        end = min(total, start + (small + (i < extra)) * align)
        yield start, end
        start = end


def plan_tiles(n: int, vocab: int, bytes_per_entry: int, opts: TokenOptions, device: torch.device,
               dim: int | None = None) -> TilePlan:
    """Tile sizes for ``n`` tokens and a ``vocab``-wide head (``dim`` wide, when it is a head: the accelerator
    default budget is derived from it), with ``bytes_per_entry`` of scratch per logit."""
    entries = max(1, tile_budget_bytes(opts, device, n, dim, bytes_per_entry) // bytes_per_entry)
    n = max(n, 1)
    narrowest = min(vocab, MIN_VOCAB_CHUNK)
    if opts.token_chunk_size is not None:
        tokens = min(n, opts.token_chunk_size)
    elif n * narrowest <= entries:
        tokens = n
    else:
        blocks = -(-n // max(1, entries // narrowest))
        tokens = -(-n // blocks)  # balanced blocks: the same count, none larger than the budget allows
    balanced_vocab = opts.vocab_chunk_size is None
    if opts.vocab_chunk_size is not None:
        width = opts.vocab_chunk_size
    else:
        width = max(1, entries // tokens)
        if width > VOCAB_ALIGN:
            width -= width % VOCAB_ALIGN
        if dim is not None and not kept_tiles_count(device) and MIN_VOCAB_CHUNK <= width < vocab:
            widest = width
            if opts.tile_budget_mb is None:  # the derived default stretches by a quarter, never past its cap
                cap = int(ACCELERATOR_TILE_BUDGET_CAP_MB * 2**20) // bytes_per_entry // tokens
                widest = max(width, min(width * 5 // 4, cap) // VOCAB_ALIGN * VOCAB_ALIGN)
            width = wave_fitted_width(tokens, dim, vocab, widest // 2, widest, multiprocessors(device))
            balanced_vocab = False
    return TilePlan(tokens=tokens, vocab=max(1, min(vocab, width)), balanced_tokens=opts.token_chunk_size is None,
                    balanced_vocab=balanced_vocab)


def multiprocessors(device: torch.device) -> int:
    """The multiprocessors a GEMM's waves fill: a CUDA device's own count, else :data:`DEFAULT_MULTIPROCESSORS`."""
    if device.type == "cuda" and torch.cuda.device_count() > 0:
        return _cuda_multiprocessors(torch.cuda.current_device() if device.index is None else device.index)
    return DEFAULT_MULTIPROCESSORS


@functools.lru_cache(maxsize=None)
def _cuda_multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _waves(rows: int, cols: int, sms: int, batch: int = 1) -> int:
    """Waves of ``batch`` ``rows x cols`` GEMM outputs of one launch in :data:`GEMM_TILE` tiles (the better
    orientation) over ``sms``."""
    def ceil(a: int, b: int) -> int:
        return -(-a // b)

    def waves(tile_rows: int, tile_cols: int) -> int:
        return ceil(batch * ceil(rows, tile_rows) * ceil(cols, tile_cols), sms)

    return min(waves(*GEMM_TILE), waves(*reversed(GEMM_TILE)))


def chunk_seconds(tokens: int, dim: int, width: int, sms: int) -> float:
    """Estimated seconds of one ``width``-column vocabulary chunk over ``tokens`` tokens of a ``dim``-wide head: its
    forward ``[tokens, width]`` and weight-gradient ``[width, dim]`` products, each last wave counted whole, and what
    every chunk costs whatever its width (:data:`CHUNK_LAUNCHES` launches, the fp32 ``dH`` accumulator read and
    written). The ``dH [tokens, dim]`` product itself is left out: its waves do not depend on the width."""
    per_wave_k = 2.0 * GEMM_TILE[0] * GEMM_TILE[1] * sms / ACCELERATOR_FLOPS  # a full wave, per unit of depth
    gemms = per_wave_k * (_waves(tokens, width, sms) * dim + _waves(width, dim, sms) * tokens)
    return gemms + CHUNK_LAUNCHES * LAUNCH_SECONDS + 8.0 * tokens * dim / ACCELERATOR_BANDWIDTH


@functools.lru_cache(maxsize=256)
def wave_fitted_width(tokens: int, dim: int, vocab: int, least: int, most: int, sms: int) -> int:
    """The vocabulary chunk width, a multiple of ``VOCAB_ALIGN`` from ``least`` (at least ``MIN_VOCAB_CHUNK``) to
    ``most``, whose chunks (all that wide but a shorter last one) take the least estimated time by
    :func:`chunk_seconds`; the widest of equals."""
    best_seconds, best = float("inf"), most
    for u in range(most // VOCAB_ALIGN, max(MIN_VOCAB_CHUNK, least) // VOCAB_ALIGN - 1, -1):
        width = u * VOCAB_ALIGN
        full, tail = divmod(vocab, width)
        seconds = full * chunk_seconds(tokens, dim, width, sms)
        seconds += chunk_seconds(tokens, dim, tail, sms) if tail else 0.0
        if seconds < best_seconds * (1 - 1e-9):
            best_seconds, best = seconds, width
    return best


# The backward's dH products (:func:`.loop.grad_all`): every vocabulary chunk's output is the same ``[tokens, D]``,
# whatever the width, so a D whose output tiles leave much of a last wave idle keeps that idle share on every chunk:
# at the Gemma-2 head (D = 2304) and 6144 kept tokens, 48 x 9 tiles of 128 x 256 are 3.3 waves of 132, run as 4 (82%
# busy). Two chunks' products as one batched GEMM into two fp32 partials are 6.5 waves of 7 (94%), for one more fp32
# ``[tokens, D]`` partial; at the Llama-3 head (D = 4096) one chunk's are 5.8 waves of 6 already. Taken where the
# batch fills its waves by at least HIDDEN_GRAD_BATCH_GAIN more; a geometric estimate, not a measurement.
HIDDEN_GRAD_BATCH = 2
HIDDEN_GRAD_BATCH_GAIN = 0.05


def wave_fill(rows: int, cols: int, sms: int, batch: int = 1) -> float:
    """The busy share of the waves of ``batch`` ``rows x cols`` GEMM outputs in one launch (:func:`_waves`)."""
    return batch * rows * cols / (_waves(rows, cols, sms, batch) * sms * GEMM_TILE[0] * GEMM_TILE[1])


def hidden_grad_batch(tokens: int, dim: int, device: torch.device) -> int:
    """How many vocabulary chunks' ``dH [tokens, dim]`` products a backward over ``tokens`` kept tokens runs as one
    batched GEMM (this module's comment above): 1 on the CPU (no waves), else :data:`HIDDEN_GRAD_BATCH` where that
    fills the device's waves better by :data:`HIDDEN_GRAD_BATCH_GAIN`."""
    if kept_tiles_count(device):
        return 1
    sms = multiprocessors(device)
    batched = wave_fill(tokens, dim, sms, HIDDEN_GRAD_BATCH)
    return HIDDEN_GRAD_BATCH if batched >= wave_fill(tokens, dim, sms) + HIDDEN_GRAD_BATCH_GAIN else 1


def plan_stored_backward(plan: TilePlan, n: int, dz_bytes_per_entry: int, opts: TokenOptions,
                         device: torch.device, dim: int | None = None) -> TilePlan:
    """The backward's tiles over a store of kept tiles (the eager schedule, :class:`.sources.TileStore`): the
    forward's vocabulary chunks, at the full height of the ``n`` kept tokens when the one scratch left, ``dZ`` in the
    GEMM operand dtype (``dz_bytes_per_entry``, 0 when ``dZ`` overwrites the kept fp32 tile), fits the tile budget at
    that height and the caller did not fix ``token_chunk_size``; else the forward's own plan. With one token block
    (and a head's ``dim``) it carries :func:`hidden_grad_batch`, the chunks whose ``dH`` products may share a GEMM.

    One token block turns each chunk's ``dH`` and ``dW`` into one GEMM each, ``dW`` written once with no fp32
    ``[vc, D]`` accumulator. Measured on the 2-core development machine (sigmoid DPO, 3072 kept tokens, D = 512,
    V = 32000, fp32): the forward's 1536-token blocks (policy and reference tiles within the 16 MiB budget) ran the
    backward's GEMMs at about 19 ms per ``1536 x 1280`` tile pair, 1.9 s in all, where full-height tiles ran the same
    FLOPs in about 1.6 s."""
    if plan.balanced_tokens and n > plan.tokens and (
            n * plan.vocab * dz_bytes_per_entry <= tile_budget_bytes(opts, device, n, dim, max(1, dz_bytes_per_entry))):
        plan = TilePlan(tokens=n, vocab=plan.vocab, balanced_tokens=True, balanced_vocab=plan.balanced_vocab)
    if dim is not None and plan.single_token_block(n):
        plan = dataclasses.replace(plan, hidden_grad_batch=hidden_grad_batch(n, dim, device))
    return plan


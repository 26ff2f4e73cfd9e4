"""Peak extra memory of the first three fused DPO steps in a fresh process (CPU: resident-set growth; GPU: peak
allocator bytes), to show what the first call costs beyond the steady state the other figures report (lazy imports
of the backend and its extension, allocator and thread-pool set-up).

    python benchmarks/first_call_memory.py --backend cpu
"""

from __future__ import annotations

import argparse

import torch

from dpo_kernels import fused_dpo_loss
from dpo_kernels.timing import PeakMemory
from output import add_shape_arguments


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_shape_arguments(parser, pairs=4, seq=128, hidden=64, vocab=32000)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    rows, device = 2 * args.pairs, torch.device(args.device)
    h = torch.randn(rows, args.seq, args.hidden, generator=g).to(device).requires_grad_()
    w = torch.randn(args.vocab, args.hidden, generator=g).to(device).requires_grad_()
    ref_h = torch.randn(rows, args.seq, args.hidden, generator=g).to(device)
    labels = torch.randint(0, args.vocab, (rows, args.seq), generator=g).to(device)
    labels[:, : args.seq // 8] = -100
    extra = []
    for _ in range(3):
        with PeakMemory(device) as memory:
            out = fused_dpo_loss(labels=labels, policy_hidden=h, lm_head_weight=w, ref_hidden=ref_h,
                                 ref_lm_head_weight=w, backend=args.backend, shift=True)
            out.loss.backward()
        extra.append(memory.mib)
    shape = f"{args.pairs} pairs x {args.seq} tokens, D={args.hidden}, V={args.vocab}, fp32, {device}"
    print(f"backend={args.backend}, {shape}: peak extra MiB of calls 1, 2, 3: "
          + ", ".join("n/a" if m is None else f"{m:.1f}" for m in extra))


if __name__ == "__main__":
    main()

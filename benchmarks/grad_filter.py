"""Does ``grad_filter_eps`` skip any backward tile on Zipf-like, peaked logits? Counted, not timed.

    python benchmarks/grad_filter.py --json benchmarks/results/cpu/grad_filter.json   # N=2048 tokens, V=32000

A tile (``token block x vocabulary chunk``) is skipped when every ``|softmax - onehot|`` in it is below ``eps``
(``dpo_kernels.ops.torch_chunked._logit_grad``'s criterion, the one every backend applies). Language-model
distributions are Zipf-like over the vocabulary and peaked at the next token; how their mass falls on vocabulary
chunks depends on how the tokenizer numbers its tokens, so three orderings are measured:

- ``bpe-ordered``: the probability rank of a token follows its id with noise (frequent tokens have small ids, as in
  byte-pair vocabularies, whose merges come in frequency order): the last chunks hold rare tokens for every context;
- ``per-context``: each token's ranking is its own random permutation (the worst case for skipping);
- both with the label drawn from the distribution itself (mean label probability as printed).

Each row gives the entropy, the mean label probability and the fraction of tiles skipped per ``eps``, at the CPU's
tile shape (1536 tokens x 1280 columns, what the plan picks at D=512) and an accelerator's (8192 x 8192).
"""

from __future__ import annotations

import argparse
import json

import torch

EPS = (1e-7, 1e-6, 1e-5, 1e-4, 1e-3)
TILES = {"cpu 1536x1280": (1536, 1280), "gpu 8192x8192": (8192, 8192)}


def zipf_logits(n: int, vocab: int, s: float, order: str, g: torch.Generator) -> torch.Tensor:
    """``[n, V]`` logits whose softmax is Zipf(``s``) over ranks, ranks placed on ids by ``order``, plus noise."""
    log_p = -s * torch.log(torch.arange(1, vocab + 1, dtype=torch.float32))
    if order == "bpe-ordered":  # rank ~ id: a jitter of a few hundred places around the id
        ranks = torch.argsort(torch.arange(vocab).float() + 300 * torch.randn(n, vocab, generator=g), dim=1)
    else:
        ranks = torch.argsort(torch.rand(n, vocab, generator=g), dim=1)
    z = torch.empty(n, vocab)
    z.scatter_(1, ranks, log_p.expand(n, vocab))
    return z + 0.5 * torch.randn(n, vocab, generator=g)


def skipped(p: torch.Tensor, labels: torch.Tensor, tile: tuple[int, int], eps: float) -> float:
    dev = p.clone()
    dev[torch.arange(len(labels)), labels] -= 1.0
    dev = dev.abs_()
    tokens, cols = tile
    total = hit = 0
    for n0 in range(0, dev.shape[0], tokens):
        for v0 in range(0, dev.shape[1], cols):
            total += 1
            hit += bool(dev[n0:n0 + tokens, v0:v0 + cols].amax() < eps)
    return hit / total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    rows = []
    for order in ("bpe-ordered", "per-context"):
        for s in (1.0, 1.3, 2.0):
            p = torch.softmax(zipf_logits(args.tokens, args.vocab, s, order, g), dim=1)
            labels = torch.multinomial(p, 1, generator=g).squeeze(1)
            entropy = float(-(p * p.clamp_min(1e-30).log()).sum(1).mean())
            label_p = float(p[torch.arange(args.tokens), labels].mean())
            for name, tile in TILES.items():
                fractions = {f"{eps:g}": skipped(p, labels, tile, eps) for eps in EPS}
                rows.append({"order": order, "zipf_s": s, "entropy": entropy, "label_p": label_p, "tile": name,
                             "skipped": fractions})
                print(f"{order:<12} s={s:<4} entropy {entropy:5.2f} nats, mean label p {label_p:.2f}, {name}: "
                      + ", ".join(f"eps {k}: {v:.0%}" for k, v in fractions.items()), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"tokens": args.tokens, "vocab": args.vocab, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

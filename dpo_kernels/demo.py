"""``python -m dpo_kernels.demo``: train a tiny causal LM with DPO, then TDPO, on synthetic preferences, fused.

The model (a random Llama, built from a config: nothing is downloaded) and the preference pairs are made in code:
chosen completions use the lower half of the vocabulary, rejected ones the upper half, so the reward accuracy rises
within a few steps. The loop is plain PyTorch: hidden states from ``causal_lm_hidden_states`` and
``fused_dpo_loss`` on the policy's and the frozen reference's hidden states, never the logits.

Then the same steps run again from the same weights through the unfused path (full logits, log_softmax, gather:
what trainers did before fused heads); the final losses of both agree up to rounding. Last, the two paths are timed
on the same training step (a DPO and a TDPO step, forward, backward and optimizer), interleaved, ``--repeats``
times each after both have run (first-call compilation, autotuning and allocator growth are not timed), and the
best time of each is compared with its peak extra memory (peak RSS on CPU, peak allocator bytes on GPU): the one-line
summary is a ratio of best times, which a busy machine disturbs far less than a single measurement. ``--dtype bf16``
loads the model in bf16; ``--amp`` trains under bf16 autocast over the weights (a trainer's ``bf16=True``).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import dataclass

import torch

from . import fused_dpo_loss
from .integrations.transformers import causal_lm_hidden_states
from .timing import PeakMemory, synchronize


def _tiny_llama(vocab: int, hidden: int, seed: int):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=1024)
    return transformers.LlamaForCausalLM(cfg)


def _batches(steps: int, pairs: int, prompt: int, completion: int, vocab: int, seed: int):
    """``steps`` batches of ``(input_ids [2B, T], labels [2B, T])``, chosen rows first; prompt labels masked."""
    g = torch.Generator().manual_seed(seed)
    half = vocab // 2
    out = []
    for _ in range(steps):
        prompts = torch.randint(0, vocab, (pairs, prompt), generator=g)
        chosen = torch.randint(0, half, (pairs, completion), generator=g)
        rejected = torch.randint(half, vocab, (pairs, completion), generator=g)
        ids = torch.cat([torch.cat([prompts, chosen], 1), torch.cat([prompts, rejected], 1)])
        labels = ids.clone()
        labels[:, :prompt] = -100
        out.append((ids, labels))
    return out


def _step_loss(policy, reference, ids, labels, loss_type: str, fused: bool, backend: str):
    options = dict(labels=labels, loss_type=loss_type, beta=0.1, shift=True)
    if fused:
        h = causal_lm_hidden_states(policy, input_ids=ids)
        with torch.no_grad():
            r = causal_lm_hidden_states(reference, input_ids=ids)
        return fused_dpo_loss(policy_hidden=h.final, lm_head_weight=h.head_weight, ref_hidden=r.final,
                              ref_lm_head_weight=r.head_weight, backend=backend, **options)
    logits = policy(input_ids=ids).logits
    with torch.no_grad():
        ref_logits = reference(input_ids=ids).logits
    return fused_dpo_loss(policy_logits=logits, ref_logits=ref_logits, backend="reference", **options)


@dataclass(frozen=True)
class _Setup:
    """Where and how the demo trains: device, backend, the model's weight dtype and bf16 autocast (mixed precision
    over those weights, as trainers' ``bf16=True`` does)."""

    device: torch.device
    backend: str
    dtype: torch.dtype
    amp: bool

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def describe(self) -> str:
        weights = str(self.dtype).removeprefix("torch.")
        return f"{weights} weights" + (", bf16 autocast" if self.amp else "")


def _copies(model, setup: _Setup):
    policy = copy.deepcopy(model).to(device=setup.device, dtype=setup.dtype).train()
    reference = copy.deepcopy(model).to(device=setup.device, dtype=setup.dtype).eval()
    return policy, reference, torch.optim.AdamW(policy.parameters(), lr=2e-3)


def _step(policy, reference, optimizer, ids, labels, loss_type: str, fused: bool, setup: _Setup):
    with setup.autocast():
        out = _step_loss(policy, reference, ids.to(setup.device), labels.to(setup.device), loss_type, fused,
                         setup.backend)
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    optimizer.step()
    return out


def _train(model, batches, loss_types, fused: bool, setup: _Setup, show: bool):
    from tqdm.auto import tqdm

    policy, reference, optimizer = _copies(model, setup)
    history = []
    for loss_type in loss_types:
        # a bar only on a terminal: redirected to a file, its carriage-return updates would interleave the lines
        bar = tqdm(batches, desc=f"{loss_type:>7} ({'fused' if fused else 'unfused'})",
                   disable=not show or not sys.stdout.isatty(),
                   file=sys.stdout, leave=True, ncols=100)
        for step, (ids, labels) in enumerate(bar, start=1):
            out = _step(policy, reference, optimizer, ids, labels, loss_type, fused, setup)
            acc = out.metrics["rewards/accuracies"]
            history.append((loss_type, step, out.loss.item(), acc))
            bar.set_postfix(loss=f"{out.loss.item():.4f}", reward_acc=f"{acc:.2f}")
            if show:
                bar.write(f"  {loss_type} step {step:>2}: loss {out.loss.item():.4f}  reward accuracy {acc:.2f}"
                          + (f"  kl/chosen {out.metrics['kl/chosen']:.4f}" if "kl/chosen" in out.metrics else ""))
    return history


def _time_step(model, batch, fused: bool, setup: _Setup) -> tuple[float, float | None]:
    """Seconds and peak extra MiB of one DPO and one TDPO training step from fresh copies of ``model`` (made before
    the measurement; the steps' gradients and optimizer state count)."""
    policy, reference, optimizer = _copies(model, setup)
    synchronize(setup.device)
    with PeakMemory(setup.device) as peak:
        start = time.perf_counter()
        for loss_type in ("sigmoid", "tdpo2"):
            _step(policy, reference, optimizer, *batch, loss_type, fused, setup)
        synchronize(setup.device)
        seconds = time.perf_counter() - start
    return seconds, peak.mib


def _best_of(model, batch, setup: _Setup, repeats: int) -> dict[str, tuple[float, float | None]]:
    """``{path: (best seconds, peak MiB of the least-memory run)}`` over ``repeats`` interleaved runs of each path."""
    runs = {"fused": [], "unfused": []}
    for _ in range(repeats):
        for name in runs:
            runs[name].append(_time_step(model, batch, name == "fused", setup))
    best = {}
    for name, results in runs.items():
        memories = [mib for _, mib in results if mib is not None]
        best[name] = (min(s for s, _ in results), min(memories) if memories else None)
    return best


def _summary(best: dict[str, tuple[float, float | None]], repeats: int) -> str:
    (fused_s, fused_mib), (unfused_s, unfused_mib) = best["fused"], best["unfused"]
    line = (f"fused vs unfused, best of {repeats}: {fused_s / unfused_s:.2f}x the time per training step "
            f"({fused_s * 1e3:.0f} ms vs {unfused_s * 1e3:.0f} ms)")
    if fused_mib is not None and unfused_mib:
        line += f", {fused_mib / unfused_mib:.2f}x the peak extra memory ({fused_mib:.0f} MiB vs {unfused_mib:.0f} MiB)"
    return line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpo_kernels.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12, help="steps per objective (DPO, then TDPO)")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--completion", type=int, default=64)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="default: cuda when a GPU is present, else cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="the model's weights")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast over the weights (mixed precision)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each path (the best is reported)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.repeats < 1:
        parser.error("--steps and --repeats must be at least 1")
    device = torch.device(args.device)
    setup = _Setup(device, args.backend, {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype], args.amp)
    model = _tiny_llama(args.vocab, args.hidden, seed=0)
    batches = _batches(args.steps, args.pairs, args.prompt, args.completion, args.vocab, seed=1)
    tokens = 2 * args.pairs * (args.prompt + args.completion)
    print(f"dpo_kernels demo: random Llama (D={args.hidden}, V={args.vocab}, 2 layers), {args.pairs} preference "
          f"pairs x {args.prompt + args.completion} tokens per step ({tokens} tokens), device {device}, "
          f"{setup.describe()}, backend={args.backend!r}\n")
    fused = _train(model, batches, ("sigmoid", "tdpo2"), True, setup, show=True)
    print("\nthe same steps through the unfused path (full logits) ...")
    unfused = _train(model, batches, ("sigmoid", "tdpo2"), False, setup, show=False)
    print(f"\n{'path':<9} {'final DPO loss':>15} {'final TDPO loss':>16}")
    for name, history in (("fused", fused), ("unfused", unfused)):
        final = {lt: loss for lt, _, loss, _ in history}
        print(f"{name:<9} {final['sigmoid']:>15.5f} {final['tdpo2']:>16.5f}")
    print(f"\ntiming one DPO + one TDPO training step of each path, interleaved, {args.repeats} times ...")
    best = _best_of(model, batches[0], setup, args.repeats)
    print(f"\n{'path':<9} {'best ms':>8} {'peak extra memory':>18}")
    for name, (seconds, mib) in best.items():
        print(f"{name:<9} {seconds * 1e3:>8.0f} {(f'{mib:.0f} MiB' if mib is not None else 'n/a'):>18}")
    print("\n" + _summary(best, args.repeats))
    return 0


if __name__ == "__main__":
    sys.exit(main())

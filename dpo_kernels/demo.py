"""``python -m dpo_kernels.demo``: train a tiny causal LM with DPO, then TDPO, on synthetic preferences, fused.

The model (a random Llama, built from a config: nothing is downloaded) and the preference pairs are made in code:
chosen completions use the lower half of the vocabulary, rejected ones the upper half, so the reward accuracy rises
within a few steps. The loop is plain PyTorch: hidden states from ``causal_lm_hidden_states`` and
``fused_dpo_loss`` on the policy's and the frozen reference's hidden states, never the logits.

At the end the same steps run again from the same weights through the unfused path (full logits, log_softmax,
gather: what trainers did before fused heads) and both are compared: time, peak extra memory (peak RSS on CPU, peak
allocator bytes on GPU) and the final loss, which agree up to rounding. Each path runs one untimed warm-up step per
objective first, so that first-call compilation is not counted. ``--dtype bf16`` loads the model in bf16; ``--amp``
trains under bf16 autocast over the weights (a trainer's ``bf16=True``).
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import sys
import time
from dataclasses import dataclass

import torch

from . import fused_dpo_loss
from .integrations.transformers import causal_lm_hidden_states
from .timing import synchronize


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


class _PeakMemory:
    """Peak extra memory of a block: allocator bytes on CUDA, resident set on Linux CPUs (``None`` elsewhere)."""

    def __init__(self, device: torch.device):
        self.device, self.mib = device, None

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as f:
            return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        elif os.path.exists("/proc/self/clear_refs"):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = self._status("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.mib = (torch.cuda.max_memory_allocated() - self.base) / 2**20
        elif os.path.exists("/proc/self/clear_refs"):
            self.mib = (self._status("VmHWM") - self.base) / 1024


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


def _train(model, batches, loss_types, fused: bool, setup: _Setup, show: bool):
    from tqdm.auto import tqdm

    policy = copy.deepcopy(model).to(device=setup.device, dtype=setup.dtype).train()
    reference = copy.deepcopy(model).to(device=setup.device, dtype=setup.dtype).eval()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=2e-3)
    history = []
    for loss_type in loss_types:
        bar = tqdm(batches, desc=f"{loss_type:>7} ({'fused' if fused else 'unfused'})", disable=not show,
                   file=sys.stdout, leave=True, ncols=100)
        for step, (ids, labels) in enumerate(bar, start=1):
            with setup.autocast():
                out = _step_loss(policy, reference, ids.to(setup.device), labels.to(setup.device), loss_type, fused,
                                 setup.backend)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
            acc = out.metrics["rewards/accuracies"]
            history.append((loss_type, step, out.loss.item(), acc))
            bar.set_postfix(loss=f"{out.loss.item():.4f}", reward_acc=f"{acc:.2f}")
            if show:
                bar.write(f"  {loss_type} step {step:>2}: loss {out.loss.item():.4f}  reward accuracy {acc:.2f}"
                          + (f"  kl/chosen {out.metrics['kl/chosen']:.4f}" if "kl/chosen" in out.metrics else ""))
    return history


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
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="the model's weights")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast over the weights (mixed precision)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    setup = _Setup(device, args.backend, {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype], args.amp)
    model = _tiny_llama(args.vocab, args.hidden, seed=0)
    batches = _batches(args.steps, args.pairs, args.prompt, args.completion, args.vocab, seed=1)
    tokens = 2 * args.pairs * (args.prompt + args.completion)
    print(f"dpo_kernels demo: random Llama (D={args.hidden}, V={args.vocab}, 2 layers), {args.pairs} preference "
          f"pairs x {args.prompt + args.completion} tokens per step ({tokens} tokens), device {device}, "
          f"{setup.describe()}, backend={args.backend!r}\n")
    runs = {}
    for fused in (True, False):
        # one untimed step of each objective first: kernel compilation, autotuning and allocator growth happen
        # on first use and are not what a training run pays per step
        _train(model, batches[:1], ("sigmoid", "tdpo2"), fused, setup, show=False)
        synchronize(device)
        start = time.perf_counter()
        with _PeakMemory(device) as peak:
            history = _train(model, batches, ("sigmoid", "tdpo2"), fused, setup, show=fused)
        runs["fused" if fused else "unfused"] = (time.perf_counter() - start, peak.mib, history)
        if fused:
            print("\nthe same steps through the unfused path (full logits) for comparison ...")
    print(f"\n{'path':<9} {'seconds':>8} {'peak extra memory':>18} {'final DPO loss':>15} {'final TDPO loss':>16}")
    for name, (seconds, mib, history) in runs.items():
        final = {lt: loss for lt, _, loss, _ in history}
        memory = f"{mib:.0f} MiB" if mib is not None else "n/a"
        print(f"{name:<9} {seconds:>8.1f} {memory:>18} {final['sigmoid']:>15.5f} {final['tdpo2']:>16.5f}")
    fused_mib, unfused_mib = runs["fused"][1], runs["unfused"][1]
    if fused_mib is not None and unfused_mib:
        print(f"\nfused / unfused: {runs['fused'][0] / runs['unfused'][0]:.2f}x the time, "
              f"{fused_mib / unfused_mib:.2f}x the peak extra memory")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""KTO on unpaired completions with `fused_kto_loss`, in a plain PyTorch loop: the policy's and the reference's hidden
states through their heads in one fused pass, the KL estimate from mismatched (prompt, completion) pairs of the same
batch (each prompt with the next row's completion), as TRL's KTOTrainer forms it.

    python examples/kto.py
"""

import copy

import torch
from _common import synthetic_preferences, tiny_causal_lm, tiny_tokenizer

from dpo_kernels import fused_kto_loss

tok = tiny_tokenizer()
pairs = synthetic_preferences(32)
# unpaired: each preference pair gives a desirable (chosen) and an undesirable (rejected) completion
rows = [(p["prompt"], p[side], side == "chosen") for p in pairs for side in ("chosen", "rejected")]


def encode(prompts, completions):
    """``input_ids`` and HF-style ``labels`` (the completion's tokens; prompt and padding ignored), right-padded."""
    ids, labels = [], []
    for prompt, completion in zip(prompts, completions, strict=True):
        p, c = tok(prompt)["input_ids"], tok(completion)["input_ids"] + [tok.eos_token_id]
        ids.append(p + c)
        labels.append([-100] * len(p) + c)
    width = max(map(len, ids))
    pad = [[tok.pad_token_id] * (width - len(x)) for x in ids]
    return (torch.tensor([x + q for x, q in zip(ids, pad, strict=True)]),
            torch.tensor([y + [-100] * len(q) for y, q in zip(labels, pad, strict=True)]))


policy = tiny_causal_lm("llama")
reference = copy.deepcopy(policy).requires_grad_(False)
optimizer = torch.optim.AdamW(policy.parameters(), lr=5e-3)
batch = 16
for step in range(1, 21):
    chunk = [rows[(step * batch + i) % len(rows)] for i in range(batch)]
    prompts, completions, desirable = zip(*chunk, strict=True)
    input_ids, labels = encode(prompts, completions)
    kl_ids, kl_labels = encode(prompts, completions[1:] + completions[:1])  # mismatched pairs
    hidden = policy.model(input_ids=input_ids).last_hidden_state
    kl_hidden = policy.model(input_ids=kl_ids).last_hidden_state.detach()  # the KL term carries no gradient
    with torch.no_grad():
        ref_hidden = reference.model(input_ids=input_ids).last_hidden_state
        kl_ref_hidden = reference.model(input_ids=kl_ids).last_hidden_state
    out = fused_kto_loss(labels=labels, desirable=torch.tensor(desirable), policy_hidden=hidden,
                         lm_head_weight=policy.lm_head.weight, ref_hidden=ref_hidden,
                         ref_lm_head_weight=reference.lm_head.weight, kl_labels=kl_labels,
                         kl_policy_hidden=kl_hidden, kl_ref_hidden=kl_ref_hidden, beta=0.1, shift=True)
    optimizer.zero_grad()
    out.loss.backward()
    optimizer.step()
    if step % 5 == 0:
        m = {k: v.item() for k, v in out.metrics.items()}
        print(f"step {step:>3}: loss={out.loss.item():.4f}, rewards/margins={m['rewards/margins']:.4f}, "
              f"kl={m['kl']:.4f}")

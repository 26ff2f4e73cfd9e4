"""Peak extra CPU memory (and time) of one DPO training step (forward + backward) in TRL 1.16, per implementation.

    python benchmarks/trl_step_memory.py        # D=256, V=128256, 2 x 4 sequences of 512 tokens, fp32

Implementations, each in its own subprocess, measured from the RSS after the trainer is built to the peak of one
``trainer.training_step`` (``/proc/self/clear_refs`` resets the peak mark):

- ``stock``: TRL 1.16's ``DPOTrainer`` as shipped (its own chunked fused LM head);
- ``patched``: the same trainer after ``dpo_kernels.integrations.trl.patch()``;
- ``logits``: the full-logits path TRL used before 1.0 (``[2B, T, V]`` logits, log_softmax, gather), through
  ``fused_dpo_loss(backend="reference")`` on the model's logits.

Results go to ``trl_step_memory.json`` in ``--out`` (default ``benchmarks/out/cpu/``, untracked).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from output import add_out_argument, add_shape_arguments, out_dir


def _child(impl: str, hidden: int, vocab: int, seq: int, pairs: int) -> dict:
    os.environ["HF_HUB_OFFLINE"] = "1"
    import copy

    import torch
    from trl import DPOConfig, DPOTrainer

    from dpo_kernels import fused_dpo_loss
    from dpo_kernels.integrations import trl as dk_trl
    from dpo_kernels.integrations.synthetic import synthetic_preferences, tiny_causal_lm, tiny_tokenizer
    from dpo_kernels.timing import PeakMemory

    words = vocab - 2
    half = seq // 2
    data = synthetic_preferences(pairs, words=words, prompt_len=(half, half), completion_len=(half, half))
    model = tiny_causal_lm("llama", words=words, hidden=hidden, layers=2)
    args = DPOConfig(output_dir="/tmp/dpo_kernels_bench", per_device_train_batch_size=pairs, report_to=[],
                     use_cpu=True, save_strategy="no", bf16=False, max_length=seq + 1, max_steps=1)
    if impl == "patched":
        dk_trl.patch(backend="auto")

    class LogitsDPOTrainer(DPOTrainer):
        def _compute_loss(self, model, inputs, return_outputs=False):
            labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
            logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
            with torch.no_grad():
                ref_logits = self.ref_model(input_ids=inputs["input_ids"],
                                            attention_mask=inputs["attention_mask"]).logits
            return fused_dpo_loss(labels=labels, policy_logits=logits, ref_logits=ref_logits, shift=True,
                                  beta=self.beta, backend="reference").loss

    trainer_cls = LogitsDPOTrainer if impl == "logits" else DPOTrainer
    trainer = trainer_cls(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=data,
                          processing_class=tiny_tokenizer(words))
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.current_gradient_accumulation_steps = 1  # normally set by the training loop
    tokens = int(batch["input_ids"].numel())
    with PeakMemory("cpu") as memory:
        start = time.perf_counter()
        loss = trainer.training_step(trainer.model, batch)
        seconds = time.perf_counter() - start
    return {"impl": impl, "tokens": tokens, "loss": float(loss), "seconds": seconds,
            "extra_peak_mib": memory.mib, "baseline_mib": memory.base_mib}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(parser, hidden=256, vocab=128256, seq=512, pairs=4)
    parser.add_argument("--impls", default="stock,patched,logits")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    add_out_argument(parser)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.hidden, args.vocab, args.seq, args.pairs)))
        return 0
    rows = []
    for impl in args.impls.split(","):
        cmd = [sys.executable, __file__, "--child", impl, "--hidden", str(args.hidden), "--vocab", str(args.vocab),
               "--seq", str(args.seq), "--pairs", str(args.pairs)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stderr[-3000:])
            return 1
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    stock = next((r for r in rows if r["impl"] == "stock"), rows[0])
    print(f"one DPO training step (fwd+bwd), TRL 1.16, Llama D={args.hidden} V={args.vocab}, {args.pairs}x2 "
          f"sequences of {args.seq} tokens, fp32, CPU ({os.cpu_count()} cores)")
    print(f"{'impl':<8} {'extra peak MiB':>15} {'vs stock':>9} {'seconds':>8} {'loss':>10}")
    for r in rows:
        print(f"{r['impl']:<8} {r['extra_peak_mib']:>15.1f} {r['extra_peak_mib'] / stock['extra_peak_mib']:>9.3f} "
              f"{r['seconds']:>8.2f} {r['loss']:>10.6f}")
    path = out_dir(args.out, "cpu") / "trl_step_memory.json"
    shape = {k: v for k, v in vars(args).items() if k not in ("child", "out")}
    path.write_text(json.dumps({"shape": shape, "results": rows}, indent=2) + "\n")
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

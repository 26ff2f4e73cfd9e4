"""Tiny models, a word-level tokenizer and a synthetic preference set, built in code (nothing is downloaded).

Used by the examples, the tests and the benchmarks. The preference set has a learnable signal: chosen completions
use the lower half of the word vocabulary, rejected ones the upper half, so reward accuracy rises within steps.
"""

from __future__ import annotations

import random

import torch

SPECIAL = ("<pad>", "<eos>")


def tiny_tokenizer(words: int = 200):
    """A whitespace, word-level tokenizer over ``w0 .. w{words-1}`` plus ``<pad>`` and ``<eos>``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(words)} | {tok: words + i for i, tok in enumerate(SPECIAL)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def tiny_causal_lm(kind: str = "llama", *, words: int = 200, hidden: int = 32, layers: int = 2, seed: int = 0,
                   softcap: float = 30.0):
    """A randomly initialised Llama, Mistral, Qwen2 or Gemma 2 (softcapped logits) sized for ``tiny_tokenizer``."""
    import transformers

    common = dict(vocab_size=words + len(SPECIAL), hidden_size=hidden, intermediate_size=2 * hidden,
                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  pad_token_id=words, eos_token_id=words + 1)
    torch.manual_seed(seed)
    if kind == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    if kind == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    if kind == "mistral":
        return transformers.MistralForCausalLM(transformers.MistralConfig(**common))
    if kind == "gemma2":
        cfg = transformers.Gemma2Config(**common, head_dim=hidden // 4, final_logit_softcapping=softcap,
                                        attn_implementation="eager")
        return transformers.Gemma2ForCausalLM(cfg)
    raise ValueError(f"kind must be 'llama', 'mistral', 'qwen2' or 'gemma2', got {kind!r}")


def synthetic_preferences(n: int = 32, *, words: int = 200, prompt_len=(3, 6), completion_len=(3, 8), seed: int = 0,
                          source: str | None = None):
    """``n`` rows of ``prompt`` / ``chosen`` / ``rejected`` text (and ``source`` when given), as a ``Dataset``; each
    completion starts with a space, so that the prompt followed by it tokenizes as the prompt's words and then the
    completion's."""
    from datasets import Dataset

    rng = random.Random(seed)
    half = words // 2

    def text(lo, hi, length):
        return " ".join(f"w{rng.randrange(lo, hi)}" for _ in range(rng.randint(*length)))

    # completions start with a space: TRL joins prompt and completion as strings, and "w1" + "w2" would make the
    # unknown word "w1w2" (a <pad>, and a prompt that is no longer a prefix of prompt + completion)
    rows = [{"prompt": text(0, words, prompt_len), "chosen": " " + text(0, half, completion_len),
             "rejected": " " + text(half, words, completion_len)} for _ in range(n)]
    if source is not None:
        for row in rows:
            row["source"] = source
    return Dataset.from_list(rows)

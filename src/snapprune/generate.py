"""Greedy sample generations: the quickest answer to "does the pruned model still talk?"."""

from __future__ import annotations

import torch

DEFAULT_PROMPTS = (
    "The capital of France is",
    "Water boils at a temperature of",
    "Once upon a time, in a small village,",
)
REPORT_TOKENS = 24
"""Tokens per prompt of the samples every run's report holds (before and after): enough to
see whether the model still talks, cheap beside the evaluation."""
COMMAND_TOKENS = 48
"""Tokens per prompt of ``snapprune generate`` unless asked otherwise."""


@torch.no_grad()
def greedy_completions(model, tokenizer, prompts: tuple[str, ...] | list[str], *,
                       max_new_tokens: int, device: str = "cpu") -> list[str]:
    """Each prompt continued greedily (no sampling: the same model gives the same text), the
    model already on ``device`` (``placement.placed``)."""
    texts = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        texts.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return texts

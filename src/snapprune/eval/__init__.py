"""Evaluation: perplexity over windows of text, zero-shot accuracy through lm-eval."""

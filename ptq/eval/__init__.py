"""Evaluators: perplexity (and, later, lm-eval tasks, passkey, speed probes)."""

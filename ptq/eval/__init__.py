"""Evaluators: perplexity, lm-eval zero-shot tasks, passkey retrieval, decoding speed and
cache bytes, peak memory; `suite.evaluate` runs a cell's configured set."""

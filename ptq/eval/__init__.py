"""Evaluators: perplexity, KL divergence to the float model, decoding and passkey probes through a KV
cache, zero-shot accuracy through lm-eval, peak memory; `suite.evaluate` runs a cell's configured set."""

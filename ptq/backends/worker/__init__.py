"""The code that runs inside a backend's environment (`python -m ptq.backends.worker request.json`).
It imports no other part of ptq (the environment has only torch, transformers, safetensors and
the library): common.py holds the exchange, one module per library the mapping and the call."""

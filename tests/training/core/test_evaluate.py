"""The evaluate command: reward-model figures on pairs, policy KL / reward / win rate on prompts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.core.data import PreferencePair
from training.core.evaluate import EvaluateConfig, run
from training.core.modeling import load_reward_model, load_tokenizer
from training.core.reward import RewardConfig, train_reward_model


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("rm")
    pairs = [
        PreferencePair(
            [{"role": "user", "content": f"Q{i}?"}], f"blue answer {i}", f"red answer {i}"
        )
        for i in range(32)
    ]
    config = RewardConfig(
        model=str(tiny_model_dir),
        output_dir=str(out),
        device="cpu",
        max_steps=8,
        batch_size=8,
        learning_rate=3e-3,
    )
    train_reward_model(
        config, pairs, load_reward_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    )
    return out


def test_reward_task_scores_pairs(tmp_path: Path, reward_model_dir: Path) -> None:
    data = write_jsonl(
        tmp_path / "pairs.jsonl",
        [
            {"prompt": f"Q{i}?", "chosen": f"blue answer {i}", "rejected": f"red answer {i}"}
            for i in range(40, 50)
        ],
    )
    metrics = run(
        EvaluateConfig(
            model=str(reward_model_dir),
            data=str(data),
            output_dir=str(tmp_path / "ev"),
            device="cpu",
        )
    )
    assert metrics["eval_pairs"] == 10
    assert metrics["eval_accuracy"] == 1.0
    saved = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert saved["task"] == "reward"
    assert saved["eval_brier"] == pytest.approx(metrics["eval_brier"])


def test_policy_task_against_itself(
    tmp_path: Path, tiny_model_dir: Path, reward_model_dir: Path
) -> None:
    data = write_jsonl(
        tmp_path / "prompts.jsonl", [{"prompt": "Hello?"}, {"prompt": "Tell me a story."}]
    )
    config = EvaluateConfig(
        model=str(tiny_model_dir),
        ref_model=str(tiny_model_dir),
        reward_model=str(reward_model_dir),
        baseline_model=str(tiny_model_dir),
        data=str(data),
        output_dir=str(tmp_path / "ev"),
        device="cpu",
        num_samples=2,
        max_new_tokens=6,
        temperature=0.8,
    )
    metrics = run(config)
    assert metrics["completions"] == 4
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-3)  # policy == reference
    assert metrics["win_rate"] == 0.5  # same model, same seed: every comparison is a tie
    assert metrics["mean_reward"] == pytest.approx(metrics["baseline_mean_reward"])

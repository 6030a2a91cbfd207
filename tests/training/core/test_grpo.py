"""GRPO trainer: each option, the gold-reward task and the CLI.

Gold task as in test_ppo.py: reward = number of letters "o" in the completion.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from training.core.data import PromptItem
from training.core.grpo import GRPOConfig, train_grpo
from training.core.modeling import load_causal_lm
from training.core.rewards import FunctionSource

REPO = Path(__file__).resolve().parents[3]
PROMPTS = [PromptItem([{"role": "user", "content": f"Write about item {i}."}]) for i in range(16)]


def gold_reward(prompts: list[Any], completions: list[str], **kwargs: Any) -> list[float]:
    return [float(c.count("o")) for c in completions]


def constant_reward(prompts: list[Any], completions: list[str], **kwargs: Any) -> list[float]:
    return [1.0] * len(completions)


def config(model_dir: Path, out: Path, **overrides: Any) -> GRPOConfig:
    base = GRPOConfig(
        model=str(model_dir),
        output_dir=str(out),
        device="cpu",
        seed=0,
        max_steps=2,
        batch_size=4,
        num_generations=4,
        learning_rate=5e-3,
        lr_schedule="constant",
        max_new_tokens=8,
        max_prompt_length=32,
    )
    return replace(base, **overrides)


def run(model_dir: Path, out: Path, reward: Any = gold_reward, **overrides: Any) -> Any:
    return train_grpo(config(model_dir, out, **overrides), PROMPTS, reward=FunctionSource(reward))


def weights(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_zero_variance_groups_are_skipped_and_leave_the_policy_untouched(tiny_model_dir, tmp_path):
    """Equal rewards in every group: no group has signal, so no update happens at all (an Adam
    step on zero gradients would still move the weights through weight decay/momentum)."""
    before = weights(load_causal_lm(tiny_model_dir))
    result = run(tiny_model_dir, tmp_path, reward=constant_reward, weight_decay=0.1, beta=0.1)
    for h in result.history:
        assert h["frac_reward_zero_std"] == 1.0
        assert h["frac_trained"] == 0.0
    after = weights(result.policy)
    for name, tensor in before.items():
        torch.testing.assert_close(after[name], tensor, rtol=0, atol=0)


def test_zero_variance_groups_can_be_kept(tiny_model_dir, tmp_path):
    """Kept, such groups take part in the loss and the optimiser steps (here only weight decay
    moves the weights: advantage 0, and the k3 gradient is 0 at the reference)."""
    before = weights(load_causal_lm(tiny_model_dir))
    result = run(
        tiny_model_dir,
        tmp_path,
        reward=constant_reward,
        skip_zero_variance_groups=False,
        weight_decay=0.1,
        beta=0.1,
    )
    assert result.history[0]["frac_trained"] == 1.0
    after = weights(result.policy)
    assert any(not torch.equal(after[k], v) for k, v in before.items())


def test_truncated_completions_can_be_masked_out(tiny_model_dir, tmp_path):
    """Two tokens are too few to reach EOS: masking truncated completions leaves (almost)
    nothing to train on; the share trained is exactly the share that stopped."""
    result = run(
        tiny_model_dir, tmp_path, max_steps=1, max_new_tokens=2, mask_truncated_completions=True
    )
    h = result.history[0]
    assert h["frac_trained"] <= h["eos_fraction"] + 1e-6


def test_kl_in_the_loss_starts_at_zero_and_is_k3(tiny_model_dir, tmp_path):
    result = run(tiny_model_dir, tmp_path, max_steps=3, beta=0.1, learning_rate=1e-2)
    assert result.history[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert result.history[0]["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert all(h["kl"] >= 0 for h in result.history)
    assert result.history[-1]["kl"] > 0


def test_no_reference_model_is_loaded_without_kl(tiny_model_dir, tmp_path):
    result = run(tiny_model_dir, tmp_path, max_steps=1, beta=0.0)
    assert result.history[0]["kl"] == 0.0


@pytest.mark.parametrize("token_level", [False, True])
def test_token_level_and_sequence_level_averaging_both_train(tiny_model_dir, tmp_path, token_level):
    result = run(tiny_model_dir, tmp_path, max_steps=2, token_level=token_level)
    assert result.history[0]["frac_trained"] > 0
    assert result.history[0]["grad_norm"] > 0


def test_several_iterations_move_the_ratio_and_clip(tiny_model_dir, tmp_path):
    """mu > 1 reuses the batch: from the second pass on the ratio leaves 1 and gets clipped."""
    result = run(
        tiny_model_dir,
        tmp_path,
        max_steps=1,
        num_iterations=4,
        num_minibatches=2,
        learning_rate=2e-2,
    )
    h = result.history[0]
    assert h["ratio_mean"] != pytest.approx(1.0, abs=1e-6)
    assert h["clipfrac"] > 0


def test_grpo_raises_gold_reward_and_kl_grows_as_beta_shrinks(tiny_model_dir, tmp_path):
    runs = {}
    for beta in (0.01, 1.0):
        h = run(tiny_model_dir, tmp_path / str(beta), max_steps=40, beta=beta).history
        runs[beta] = {
            "gold_before": sum(x["reward"] for x in h[:3]) / 3,
            "gold_after": sum(x["reward"] for x in h[-5:]) / 5,
            "kl_after": sum(x["kl"] for x in h[-5:]) / 5,
        }
    print(runs)
    assert runs[0.01]["gold_after"] > runs[0.01]["gold_before"] + 1.0
    assert 0 < runs[1.0]["kl_after"] < runs[0.01]["kl_after"] < 5.0


def test_cli_end_to_end(tiny_model_dir, tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p.prompt}) + "\n" for p in PROMPTS[:4]))
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable, "-m", "training.core", "grpo",
        "--model", str(tiny_model_dir),
        "--data", str(data),
        "--reward", "tests.training.core.test_grpo:gold_reward",
        "--output-dir", str(out),
        "--max-steps", "2", "--batch-size", "2", "--num-generations", "3",
        "--max-new-tokens", "6", "--token-level", "--device", "cpu",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["steps"] == 2
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2]
    for key in ("reward", "kl", "loss", "clipfrac", "frac_reward_zero_std", "entropy"):
        assert key in lines[-1]
    assert (out / "model.safetensors").is_file()

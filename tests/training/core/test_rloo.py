"""RLOO trainer: KL in the reward, leave-one-out baselines, the gold-reward task and the CLI.

Gold task as in test_ppo.py: reward = number of letters "o" in the completion.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from training.core.data import PromptItem
from training.core.rewards import FunctionSource
from training.core.rloo import RLOOConfig, rloo_advantages_from_rewards, train_rloo

REPO = Path(__file__).resolve().parents[3]
PROMPTS = [PromptItem([{"role": "user", "content": f"Write about item {i}."}]) for i in range(16)]


def gold_reward(prompts: list[Any], completions: list[str], **kwargs: Any) -> list[float]:
    return [float(c.count("o")) for c in completions]


def config(model_dir: Path, out: Path, **overrides: Any) -> RLOOConfig:
    base = RLOOConfig(
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


def run(model_dir: Path, out: Path, **overrides: Any) -> Any:
    return train_rloo(
        config(model_dir, out, **overrides), PROMPTS, reward=FunctionSource(gold_reward)
    )


def test_kl_goes_into_the_reward_before_the_leave_one_out_baseline():
    """Rewards [1, 2, 6], sequence KL [1, 0, -2], beta .5: penalised [.5, 2, 7];
    baselines (2 + 7)/2, (.5 + 7)/2, (.5 + 2)/2 = 4.5, 3.75, 1.25 -> [-4, -1.75, 5.75]."""
    adv = rloo_advantages_from_rewards(
        torch.tensor([1.0, 2.0, 6.0]), torch.tensor([1.0, 0.0, -2.0]), beta=0.5, group_size=3
    )
    torch.testing.assert_close(adv, torch.tensor([-4.0, -1.75, 5.75]))


def test_reward_clip_comes_before_the_kl_penalty():
    """Clip 1: [3, -3] -> [1, -1], minus .5 * [2, 0] -> [0, -1]; LOO -> [1, -1]."""
    adv = rloo_advantages_from_rewards(
        torch.tensor([3.0, -3.0]), torch.tensor([2.0, 0.0]), beta=0.5, group_size=2, reward_clip=1.0
    )
    torch.testing.assert_close(adv, torch.tensor([1.0, -1.0]))


def test_unscorable_completions_get_zero_advantage():
    adv = rloo_advantages_from_rewards(
        torch.tensor([1.0, math.nan, 3.0]), None, beta=0.0, group_size=3
    )
    torch.testing.assert_close(adv, torch.tensor([-2.0, 0.0, 2.0]))


def test_first_step_has_zero_kl_and_the_kl_is_a_summed_log_ratio(tiny_model_dir, tmp_path):
    result = run(tiny_model_dir, tmp_path, max_steps=3, learning_rate=1e-2, beta=0.1)
    first, last = result.history[0], result.history[-1]
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)
    assert first["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert last["kl"] != 0.0
    # rlhf_reward = reward - beta * KL, both per sequence.
    assert last["rlhf_reward"] == pytest.approx(last["reward"] - 0.1 * last["kl"], abs=1e-4)


def test_reused_batches_are_clipped(tiny_model_dir, tmp_path):
    h = run(
        tiny_model_dir,
        tmp_path,
        max_steps=1,
        num_iterations=4,
        num_minibatches=2,
        learning_rate=2e-2,
    ).history[0]
    assert h["ratio_mean"] != pytest.approx(1.0, abs=1e-6)
    assert h["clipfrac"] > 0


def test_rloo_raises_gold_reward_and_kl_grows_as_beta_shrinks(tiny_model_dir, tmp_path):
    runs = {}
    for beta in (0.01, 0.5):
        h = run(tiny_model_dir, tmp_path / str(beta), max_steps=40, beta=beta).history
        runs[beta] = {
            "gold_before": sum(x["reward"] for x in h[:3]) / 3,
            "gold_after": sum(x["reward"] for x in h[-5:]) / 5,
            "kl_after": sum(x["kl"] for x in h[-5:]) / 5,
        }
    print(runs)
    assert runs[0.01]["gold_after"] > runs[0.01]["gold_before"] + 1.0
    assert runs[0.5]["kl_after"] < runs[0.01]["kl_after"] < 50.0


def test_cli_end_to_end(tiny_model_dir, tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p.prompt}) + "\n" for p in PROMPTS[:4]))
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable, "-m", "training.core", "rloo",
        "--model", str(tiny_model_dir),
        "--data", str(data),
        "--reward", "tests.training.core.test_rloo:gold_reward",
        "--output-dir", str(out),
        "--max-steps", "2", "--batch-size", "2", "--num-generations", "2",
        "--max-new-tokens", "6", "--normalize-advantages", "--device", "cpu",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["steps"] == 2
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2]
    for key in ("reward", "kl", "rlhf_reward", "loss", "clipfrac", "entropy"):
        assert key in lines[-1]
    assert (out / "model.safetensors").is_file()

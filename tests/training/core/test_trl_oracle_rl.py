"""GRPO and RLOO advantages agree with TRL 1.16's own trainer code on the same rewards.

TRL computes advantages inline in ``_generate_and_score_completions``, so the oracle is that
method itself: a real ``GRPOTrainer`` / ``RLOOTrainer`` on the tiny offline model, with reward
functions that hand back fixed rewards (None included), and for RLOO's KL-in-reward path,
per-token log-probs replaced by a known function of the sampled tokens.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("trl")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from datasets import Dataset

from training.core import losses
from training.core.rewards import FunctionSource, WeightedSumSource, score_tensor
from training.core.rloo import rloo_advantages_from_rewards

G = 4
PROMPTS = [[{"role": "user", "content": f"Tell me about number {i}."}] for i in range(3)]
# Group 0: spread, group 1: one unscorable completion, group 2: all equal (zero variance).
REWARDS: list[float | None] = [1.0, 2.5, -0.5, 4.0, 0.3, None, 0.7, -1.2, 2.0, 2.0, 2.0, 2.0]


def fixed(values: list[float | None]) -> Any:
    def reward(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float | None]:
        assert len(completions) == len(values)
        return list(values)

    reward.__name__ = f"fixed_{id(values)}"
    return reward


def trainer_args(cls: type, tmp_path: Path, **kwargs: Any) -> Any:
    return cls(
        output_dir=str(tmp_path / "trl"),
        per_device_train_batch_size=len(PROMPTS) * G,
        num_generations=G,
        max_completion_length=4,
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        report_to=[],
        logging_steps=1,
        seed=0,
        **kwargs,
    )


def trl_outputs(trainer: Any) -> dict[str, Any]:
    trainer.model.train()
    inputs = [{"prompt": p} for p in PROMPTS for _ in range(G)]
    return trainer._generate_and_score_completions(inputs)


def make_grpo(tmp_path: Path, model_dir: Path, funcs: list[Any], **kwargs: Any) -> Any:
    from trl import GRPOConfig, GRPOTrainer

    return GRPOTrainer(
        model=str(model_dir),
        reward_funcs=funcs,
        args=trainer_args(GRPOConfig, tmp_path, beta=0.0, **kwargs),
        train_dataset=Dataset.from_list([{"prompt": p} for p in PROMPTS]),
    )


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_grpo_advantages_match_trl(tmp_path, tiny_model_dir, scale):
    trainer = make_grpo(tmp_path, tiny_model_dir, [fixed(REWARDS)], scale_rewards=scale)
    expected = trl_outputs(trainer)["advantages"].cpu()
    raw = torch.tensor([math.nan if r is None else r for r in REWARDS])
    ours, zero_std = losses.group_advantages(raw, G, scale)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    assert zero_std.tolist() == [False] * 8 + [True] * 4


def test_weighted_sum_of_reward_functions_matches_trl(tmp_path, tiny_model_dir):
    """TRL sums weighted functions skipping None; all None stays unscorable (advantage 0)."""
    a: list[float | None] = [1.0, None, 3.0, 0.0, None, None, 2.0, 1.0, 5.0, 1.0, None, 2.0]
    b: list[float | None] = [0.5, 2.0, None, 1.0, None, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, None]
    weights = [1.0, -0.5]
    trainer = make_grpo(tmp_path, tiny_model_dir, [fixed(a), fixed(b)], reward_weights=weights)
    expected = trl_outputs(trainer)["advantages"].cpu()
    source = WeightedSumSource([FunctionSource(fixed(a)), FunctionSource(fixed(b))], weights)
    completions = ["x"] * len(a)
    raw = score_tensor(source, [PROMPTS[i // G] for i in range(len(a))], completions)
    assert math.isnan(raw[4])
    ours, _ = losses.group_advantages(raw, G)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def fake_logps(input_ids: torch.Tensor, keep: int, offset: float) -> torch.Tensor:
    """A known per-token 'log-prob' of each completion token, different for policy and ref."""
    ids = input_ids[:, -keep:].float()
    return -((ids * 0.37 + offset) % 1.3)  # (B, keep)


def make_rloo(tmp_path: Path, model_dir: Path, rewards: list[float | None], **kwargs: Any) -> Any:
    from trl import RLOOConfig, RLOOTrainer

    trainer = RLOOTrainer(
        model=str(model_dir),
        reward_funcs=[fixed(rewards)],
        args=trainer_args(RLOOConfig, tmp_path, **kwargs),
        train_dataset=Dataset.from_list([{"prompt": p} for p in PROMPTS]),
    )

    def per_token_logps(
        model: Any, input_ids: torch.Tensor, attention_mask: Any, keep: int, *a: Any, **k: Any
    ):
        offset = 0.4 if model is trainer.ref_model else 0.0
        return fake_logps(input_ids, keep, offset), None, None

    trainer._get_per_token_logps_and_entropies = per_token_logps
    return trainer


@pytest.mark.parametrize(
    ("beta", "normalize", "clip"),
    [(0.0, False, None), (0.05, False, None), (0.3, True, (-1.0, 1.0))],
)
def test_rloo_advantages_match_trl(tmp_path, tiny_model_dir, beta, normalize, clip):
    kwargs: dict[str, Any] = {"beta": beta, "normalize_advantages": normalize}
    if clip is not None:
        kwargs["reward_clip_range"] = clip
    trainer = make_rloo(tmp_path, tiny_model_dir, REWARDS, **kwargs)
    out = trl_outputs(trainer)
    expected = out["advantages"].cpu()
    raw = torch.tensor([math.nan if r is None else r for r in REWARDS])
    kl = None
    if beta:
        ids, mask = out["completion_ids"].cpu(), out["completion_mask"].cpu().float()
        keep = ids.shape[1]
        kl = ((fake_logps(ids, keep, 0.0) - fake_logps(ids, keep, 0.4)) * mask).sum(1)  # (N,)
        assert kl.abs().sum() > 0
    ours = rloo_advantages_from_rewards(
        raw, kl, beta=beta, group_size=G, normalize=normalize, reward_clip=clip[1] if clip else 0.0
    )
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)

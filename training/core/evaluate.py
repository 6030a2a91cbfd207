"""``python -m training.core evaluate``: figures for a round's report.

* ``task=reward``: a reward model (``--model``) on labelled pairs (``--data``): accuracy, Brier
  score, calibration error, mean ensemble disagreement.
* ``task=policy``: a policy (``--model``) on prompts (``--data``): it samples completions, and
  reports the KL to a reference policy (``--ref-model``), estimated on those samples as the mean
  summed log-ratio log pi(y|x) - log pi_ref(y|x) (the k1 estimator; unbiased, can dip below 0 on
  few samples), the mean reward under ``--reward-model``, and with ``--baseline-model`` the
  win rate of the policy's completions against the baseline's on the same prompts (reward-model
  judged; a tie counts one half).
* ``task=auto`` picks ``reward`` when the data lines have chosen/rejected or a choice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from training.core.config import CommonConfig, opt
from training.core.data import Messages, read_preference_jsonl, read_prompt_jsonl
from training.core.generation import GenerationOutput, TransformersGenerator
from training.core.modeling import (
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    sequence_logprobs,
)
from training.core.reward import (
    preference_metrics,
    reward_from_logits,
    score_completions,
    score_pairs,
)
from training.core.runner import setup_runtime
from training.core.tracking import write_json_atomic


@dataclass
class EvaluateConfig(CommonConfig):
    task: str = opt("auto", "reward, policy, or auto (reward when the data has pairs).")
    ref_model: str = opt("", "Reference policy for the KL figure (policy task).")
    reward_model: str = opt("", "Reward model for mean reward and win rate (policy task).")
    baseline_model: str = opt("", "Policy to compare against for the win rate (policy task).")
    num_samples: int = opt(1, "Completions per prompt (policy task).")
    max_new_tokens: int = opt(64, "Most tokens per completion (policy task).")
    temperature: float = opt(1.0, "Sampling temperature (policy task).")
    top_p: float = opt(1.0, "Nucleus sampling mass (policy task).")
    top_k: int = opt(0, "Top-k sampling; 0 disables it (policy task).")
    lapse: float = opt(0.0, "Lapse rate the reward model was trained with (reward task).")
    calibration_bins: int = opt(10, "Confidence bins for the calibration error (reward task).")


def _is_pair_file(path: str) -> bool:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                return isinstance(row, dict) and ("chosen" in row or "choice" in row)
    return False


def evaluate_reward(config: EvaluateConfig, device: torch.device) -> dict[str, float]:
    pairs = read_preference_jsonl(config.data)
    model = load_reward_model(config.model, device=device, dtype=config.dtype)
    tokenizer = load_tokenizer(config.model)
    diffs = score_pairs(
        model,
        tokenizer,
        pairs,
        max_length=config.max_length,
        max_prompt_length=config.max_prompt_length,
        batch_size=config.batch_size,
    )
    metrics, _ = preference_metrics(diffs, pairs, lapse=config.lapse, bins=config.calibration_bins)
    return metrics


def _sample(config: EvaluateConfig, model_path: str, prompts: list[Messages], device: Any) -> Any:
    model = load_causal_lm(model_path, device=device, dtype=config.dtype)
    tokenizer = load_tokenizer(model_path)
    generator = TransformersGenerator(
        model, tokenizer, max_prompt_length=config.max_prompt_length, batch_size=config.batch_size
    )
    out = generator.generate(
        prompts,
        n=config.num_samples,
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        top_p=config.top_p,
        top_k=config.top_k,
        seed=config.seed,
    )
    return model, tokenizer, out


@torch.no_grad()
def mean_kl(
    policy_logprobs: torch.Tensor, ref_model: Any, out: GenerationOutput, temperature: float
) -> float:
    """k1 estimate of KL(pi || pi_ref) per sequence on the policy's own samples."""
    device = next(ref_model.parameters()).device
    ref_sum, _ = sequence_logprobs(
        ref_model,
        out.input_ids.to(device),
        out.attention_mask.to(device),
        out.full_completion_mask.to(device),
        temperature=temperature if temperature > 0 else 1.0,
    )
    return float((policy_logprobs.sum(-1) - ref_sum.cpu()).mean())


def evaluate_policy(config: EvaluateConfig, device: torch.device) -> dict[str, float]:
    items = read_prompt_jsonl(config.data)
    prompts = [i.prompt for i in items]
    _, _, out = _sample(config, config.model, prompts, device)
    metrics: dict[str, float] = {
        "completions": float(len(out.texts)),
        "mean_length": float(out.completion_mask.sum(-1).float().mean()),
        "eos_fraction": float(out.ended_with_eos.float().mean()),
    }
    if config.ref_model:
        ref = load_causal_lm(config.ref_model, device=device, dtype=config.dtype)
        metrics["kl"] = mean_kl(out.logprobs, ref, out, config.temperature)
    if config.reward_model:
        rm = load_reward_model(config.reward_model, device=device, dtype=config.dtype)
        rm_tok = load_tokenizer(config.reward_model)
        expanded = [prompts[i] for i in out.prompt_index]

        def rewards(texts: list[str]) -> torch.Tensor:
            raw = score_completions(
                rm,
                rm_tok,
                expanded,
                texts,
                max_length=config.max_length,
                max_prompt_length=config.max_prompt_length,
                batch_size=config.batch_size,
            )
            return reward_from_logits(raw, rm.config)  # (N,)

        policy_rewards = rewards(out.texts)
        metrics["mean_reward"] = float(policy_rewards.mean())
        if config.baseline_model:
            _, _, base = _sample(config, config.baseline_model, prompts, device)
            base_rewards = rewards(base.texts)
            wins = (policy_rewards > base_rewards).float() + 0.5 * (
                policy_rewards == base_rewards
            ).float()
            metrics["win_rate"] = float(wins.mean())
            metrics["baseline_mean_reward"] = float(base_rewards.mean())
    return metrics


def run(config: EvaluateConfig) -> dict[str, float]:
    rt = setup_runtime(config)
    task = config.task
    if task == "auto":
        task = "reward" if _is_pair_file(config.data) else "policy"
    if task == "reward":
        metrics = evaluate_reward(config, rt.device)
    elif task == "policy":
        metrics = evaluate_policy(config, rt.device)
    else:
        raise ValueError(f"task must be reward, policy or auto, got {config.task!r}")
    if rt.is_main:
        write_json_atomic(Path(config.output_dir) / "eval.json", {"task": task, **metrics})
    return metrics

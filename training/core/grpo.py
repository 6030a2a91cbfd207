"""Group Relative Policy Optimisation (Shao et al. 2024, DeepSeekMath, sec. 4.1).

No critic: each prompt gets ``num_generations`` completions, and a completion's advantage is
its reward standardised within its group, ``(r_i - mean) / (std + eps)``, applied to every one
of its tokens. The loss is the PPO clipped surrogate plus ``beta`` times the k3 estimate of
KL(pi || pi_ref) **in the loss**, per token (not in the reward, unlike PPO and RLOO). One step:

1. sample ``num_generations`` completions for each of ``batch_size`` prompts;
2. score them (reward model, functions, or a weighted sum); ``None`` = unscorable, left out of
   its group's statistics with advantage 0 (as TRL);
3. group advantages; groups whose rewards are all equal carry no signal and are skipped
   (``skip_zero_variance_groups``, their share is logged as ``frac_reward_zero_std``);
   completions cut at ``max_new_tokens`` can be left out too (``mask_truncated_completions``);
4. ``num_iterations`` passes over the batch in ``num_minibatches`` reshuffled minibatches,
   averaging the per-token loss per completion then over completions (paper), or over all tokens
   (``token_level``, DAPO).

With one iteration and one minibatch the policy that sampled is the policy being updated, so
the "old" log-probs are the current ones detached and no extra forward pass is spent on them.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from training.core import losses
from training.core.checkpoint import export_model
from training.core.config import CommonConfig, opt
from training.core.data import PromptItem, read_prompt_jsonl
from training.core.generation import TransformersGenerator
from training.core.ppo import (
    completion_logprobs,
    load_policy_and_reference,
    load_reward,
    minibatch_indices,
    prompt_columns,
    reference_logprobs,
    rollout_seed,
)
from training.core.rewards import RewardSource, score_tensor
from training.core.runner import (
    Runtime,
    StepSampler,
    clip_and_step,
    make_optimizer_and_scheduler,
    maybe_resume,
    micro_batches,
    run_config_dict,
    save_resumable,
    setup_runtime,
    should_save,
)
from training.core.tracking import MetricsWriter, progress, write_json_atomic

log = logging.getLogger(__name__)


@dataclass
class GRPOConfig(CommonConfig):
    learning_rate: float = opt(1e-6, "Peak learning rate (the paper's 1e-6).")
    max_steps: int = opt(100, "Rollout batches; each is followed by num_iterations passes.")
    batch_size: int = opt(8, "Prompts per step per process (x num_generations completions).")
    reward: str = opt(
        "",
        "Reward source: a reward-model folder or module:function, or a weighted sum "
        "'w1*src1,w2*src2' (rule-based rewards and verifiers plug in as functions).",
    )
    ref_model: str = opt("", "Frozen reference policy for the KL term; default: --model.")
    num_generations: int = opt(8, "Completions per prompt (the group size G).")
    max_new_tokens: int = opt(64, "Most tokens per completion.")
    temperature: float = opt(1.0, "Sampling temperature; log-probs use the same.")
    beta: float = opt(0.04, "Weight of the per-token k3 KL term in the loss (paper: 0.04).")
    cliprange: float = opt(0.2, "Ratio clip epsilon.")
    scale_rewards: str = opt(
        "group", "Divide advantages by the group std (group), the batch std (batch) or not (none)."
    )
    skip_zero_variance_groups: bool = opt(
        True, "Leave groups whose rewards are all equal out of the loss (no signal, only KL)."
    )
    mask_truncated_completions: bool = opt(
        False, "Leave completions that hit max_new_tokens without EOS out of the loss."
    )
    token_level: bool = opt(
        False, "Average the loss over all tokens of the batch (DAPO) instead of per completion."
    )
    num_iterations: int = opt(1, "Passes over each rollout batch (mu in the paper).")
    num_minibatches: int = opt(1, "Optimiser updates per pass; reshuffled every pass.")


@dataclass
class GRPOResult:
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    policy: Any = None


def _check(config: GRPOConfig) -> None:
    if config.num_generations < 2:
        raise ValueError("num_generations must be at least 2: the baseline is the group")
    if config.scale_rewards not in ("group", "batch", "none"):
        raise ValueError("scale_rewards must be group, batch or none")


def train_grpo(
    config: GRPOConfig,
    prompts: Sequence[PromptItem],
    *,
    reward: RewardSource | None = None,
    runtime: Runtime | None = None,
) -> GRPOResult:
    """Run GRPO on ``prompts``; ``reward`` overrides ``config.reward``. Writes metrics,
    checkpoints and the final policy on rank 0."""
    _check(config)
    rt = runtime or setup_runtime(config)
    policy, ref_policy, tokenizer = load_policy_and_reference(
        config, rt.device, ref_model=config.ref_model, need_reference=config.beta != 0.0
    )
    reward = reward or load_reward(config, config.reward, rt.device)
    prompts = list(prompts)
    out = Path(config.output_dir)
    group = config.num_generations
    sampler = StepSampler(
        len(prompts), batch_size=config.batch_size, world_size=rt.world_size, seed=config.seed
    )
    steps = (
        config.max_steps if config.max_steps > 0 else sampler.steps_for_epochs(config.num_epochs)
    )
    reuse_logprobs = config.num_iterations == 1 and config.num_minibatches == 1
    if config.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
    optimizer, scheduler = make_optimizer_and_scheduler(
        policy.parameters(), config, steps * config.num_iterations * config.num_minibatches
    )
    start, _ = maybe_resume(config, rt, model=policy, optimizer=optimizer, scheduler=scheduler)
    model, optimizer = rt.accelerator.prepare(policy, optimizer)
    policy = rt.accelerator.unwrap_model(model)
    generator = TransformersGenerator(
        policy,
        tokenizer,
        max_prompt_length=config.max_prompt_length,
        batch_size=max(config.batch_size // config.grad_accum, 1),
    )
    metrics_file = MetricsWriter(out / "metrics.jsonl", enabled=rt.is_main)
    history: list[dict[str, float]] = []
    row: dict[str, float] = {}
    with progress(steps, "grpo", enabled=rt.is_main) as bar:
        bar.update(start)
        for step in range(start, steps):
            t0 = time.monotonic()
            items = [prompts[i] for i in sampler.indices(step, rt.rank)]
            # Seeded per step, so a resumed run shuffles exactly as an uninterrupted one.
            shuffle = torch.Generator().manual_seed(rollout_seed(config.seed, rt.rank, step) + 1)

            # ---- rollout: G completions per prompt, rewards, group advantages ----
            gen = generator.generate(
                [i.prompt for i in items],
                n=group,
                max_new_tokens=config.max_new_tokens,
                temperature=config.temperature,
                seed=rollout_seed(config.seed, rt.rank, step),
            )
            input_ids = gen.input_ids.to(rt.device)  # (N, P + C), N = batch_size * G
            attention_mask = gen.attention_mask.to(rt.device)
            mask = gen.completion_mask.to(rt.device).float()  # (N, C)
            width, n = gen.prompt_ids.shape[1], input_ids.shape[0]
            prompt_messages = [items[i].prompt for i in gen.prompt_index]
            raw = score_tensor(reward, prompt_messages, gen.texts, prompt_columns(items, group))
            advantages, zero_std = losses.group_advantages(raw, group, config.scale_rewards)
            keep = torch.ones(n, dtype=torch.bool)
            if config.skip_zero_variance_groups:
                keep &= ~zero_std
            if config.mask_truncated_completions:
                keep &= gen.ended_with_eos
            advantages = advantages.to(rt.device)
            # Skipped rows stay in the batch with an all-zero mask, so every process runs the
            # same number of forward/backward passes (DDP) and the loss ignores them.
            loss_mask = mask * keep.to(rt.device).float()[:, None]  # (N, C)
            with torch.no_grad():
                old_logprobs = ref_logprobs = None
                old_parts, ref_parts = [], []
                for chunk in micro_batches(list(range(n)), config.grad_accum):
                    ids, att = input_ids[chunk], attention_mask[chunk]
                    if not reuse_logprobs:
                        old_parts.append(
                            completion_logprobs(
                                policy, ids, att, width, temperature=config.temperature
                            )
                        )
                    if config.beta != 0.0:
                        ref_parts.append(
                            reference_logprobs(
                                ref_policy, policy, ids, att, width, config.temperature
                            )
                        )
                if old_parts:
                    old_logprobs = torch.cat(old_parts)  # (N, C)
                if ref_parts:
                    ref_logprobs = torch.cat(ref_parts)  # (N, C)

            # ---- clipped surrogate + beta * k3, num_iterations passes ----
            stats = torch.zeros(5, device=rt.device)  # loss, clipfrac, kl, ratio, updates
            grad_norm = 0.0
            trained = rt.accelerator.reduce(keep.float().sum().to(rt.device), reduction="sum")
            if float(trained) == 0:
                # Nothing to learn from this batch anywhere. An optimiser step on zero gradients
                # would still move the weights (Adam momentum, weight decay): skip it, but keep
                # the schedule where it would have been.
                for _ in range(config.num_iterations * config.num_minibatches):
                    scheduler.step()
            for _ in range(config.num_iterations if float(trained) > 0 else 0):
                for minibatch in minibatch_indices(n, config.num_minibatches, shuffle):
                    # Each micro-batch's share of the minibatch average (rows or tokens).
                    weight = loss_mask[minibatch].sum(1) if config.token_level else None
                    counted = loss_mask[minibatch].sum(1) > 0
                    total = float(weight.sum() if weight is not None else counted.sum())
                    for chunk in micro_batches(minibatch, config.grad_accum):
                        logprobs = completion_logprobs(
                            model,
                            input_ids[chunk],
                            attention_mask[chunk],
                            width,
                            temperature=config.temperature,
                        )  # (b, C)
                        old = logprobs.detach() if old_logprobs is None else old_logprobs[chunk]
                        loss, loss_stats = losses.grpo_loss(
                            logprobs,
                            old,
                            None if ref_logprobs is None else ref_logprobs[chunk],
                            advantages[chunk],
                            loss_mask[chunk],
                            clip_range=config.cliprange,
                            beta=config.beta,
                            token_level=config.token_level,
                        )
                        part = loss_mask[chunk]
                        amount = float(
                            part.sum() if config.token_level else (part.sum(1) > 0).sum()
                        )
                        share = amount / total if total > 0 else 0.0
                        rt.accelerator.backward(loss * share)
                        with torch.no_grad():
                            stats += torch.stack(
                                [
                                    loss.detach(),
                                    loss_stats["clipfrac"],
                                    loss_stats["kl"],
                                    loss_stats["ratio_mean"],
                                    torch.ones((), device=rt.device),
                                ]
                            ) * (len(chunk) / len(minibatch))
                    grad_norm = clip_and_step(rt, model, optimizer, scheduler, config.max_grad_norm)

            # ---- metrics ----
            with torch.no_grad():
                stats = stats / stats[-1].clamp(min=1)
                scored = raw[~torch.isnan(raw)]
                lengths = mask.sum(1)
                # KL of the sampled batch, over every completion, trained on or not.
                rollout_kl = (
                    losses.masked_mean(
                        losses.kl_k3(gen.logprobs.to(rt.device), ref_logprobs), mask
                    ).cpu()
                    if ref_logprobs is not None
                    else torch.tensor(0.0)
                )
                per_step = torch.stack(
                    [
                        scored.mean() if scored.numel() else torch.tensor(0.0),
                        scored.std() if scored.numel() > 1 else torch.tensor(0.0),
                        zero_std.float().mean(),
                        keep.float().mean(),
                        gen.ended_with_eos.float().mean(),
                        lengths.mean().cpu(),
                        -losses.masked_mean(gen.logprobs, gen.completion_mask.float()),
                        rollout_kl,
                    ]
                ).to(rt.device)
            per_step = rt.accelerator.reduce(per_step, reduction="mean")
            stats = rt.accelerator.reduce(stats, reduction="mean")
            done = step + 1
            row = {
                "reward": float(per_step[0]),
                "reward_std": float(per_step[1]),
                "frac_reward_zero_std": float(per_step[2]),
                "frac_trained": float(per_step[3]),
                "eos_fraction": float(per_step[4]),
                "completion_length": float(per_step[5]),
                "entropy": float(per_step[6]),
                "loss": float(stats[0]),
                "clipfrac": float(stats[1]),
                "kl": float(per_step[7]),
                "kl_trained": float(stats[2]),
                "ratio_mean": float(stats[3]),
                "beta": config.beta,
                "grad_norm": grad_norm,
                "lr": float(scheduler.get_last_lr()[0]),
                "step_time": time.monotonic() - t0,
            }
            history.append(row)
            if done % config.log_every == 0 or done == steps:
                metrics_file.write(done, row)
            bar.update(1, reward=row["reward"], kl=row["kl"])
            if should_save(config, done, steps):
                save_resumable(
                    config,
                    rt,
                    command="grpo",
                    model=model,
                    tokenizer=tokenizer,
                    optimizer=optimizer,
                    scheduler=scheduler,
                    step=done,
                )

    policy.eval()
    metrics = {"steps": float(steps), **row}
    if rt.is_main:
        export_model(out, model=policy, tokenizer=tokenizer, config=run_config_dict(config, "grpo"))
        write_json_atomic(out / "eval.json", metrics)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    metrics_file.close()
    rt.barrier()
    return GRPOResult(metrics, history, policy)


def run(config: GRPOConfig) -> dict[str, float]:
    """``python -m training.core grpo``: prompts from ``--data``, reward from ``--reward``."""
    return train_grpo(config, read_prompt_jsonl(config.data)).metrics

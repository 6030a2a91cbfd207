"""REINFORCE Leave-One-Out (Ahmadian et al. 2024, "Back to basics", sec. 3.2; Kool et al. 2019).

Each prompt gets ``num_generations`` completions; a completion's advantage is its reward minus
the mean reward of its siblings, ``A_i = r_i - mean_{j != i} r_j``, an unbiased baseline that
needs no critic. The whole completion is one action: the KL penalty goes **into the reward** as
the first-order log-ratio summed over the completion, ``r_i <- r_i - beta * sum_t (log pi -
log pi_ref)`` (as the paper and TRL's ``RLOOTrainer``; GRPO instead puts a per-token k3 term in
the loss). The policy loss is the PPO clipped surrogate on the sequence log-prob ratio, which
is plain REINFORCE when the batch is used once (``num_iterations`` 1, one minibatch).
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
class RLOOConfig(CommonConfig):
    learning_rate: float = opt(1e-6, "Peak learning rate.")
    max_steps: int = opt(100, "Rollout batches; each is followed by num_iterations passes.")
    batch_size: int = opt(8, "Prompts per step per process (x num_generations completions).")
    reward: str = opt(
        "",
        "Reward source: a reward-model folder or module:function, or a weighted sum "
        "'w1*src1,w2*src2' (rule-based rewards and verifiers plug in as functions).",
    )
    ref_model: str = opt("", "Frozen reference policy for the KL penalty; default: --model.")
    num_generations: int = opt(2, "Completions per prompt (k in the paper; TRL's default 2).")
    max_new_tokens: int = opt(64, "Most tokens per completion.")
    temperature: float = opt(1.0, "Sampling temperature; log-probs use the same.")
    beta: float = opt(
        0.05, "KL coefficient: beta * sum_t log(pi / pi_ref) is taken off the reward."
    )
    cliprange: float = opt(0.2, "Clip of the sequence ratio when a batch is reused.")
    normalize_advantages: bool = opt(False, "Whiten the advantages over the batch.")
    reward_clip: float = opt(0.0, "Clip rewards to [-c, c] before the KL penalty (0: off).")
    num_iterations: int = opt(1, "Passes over each rollout batch.")
    num_minibatches: int = opt(1, "Optimiser updates per pass; reshuffled every pass.")


@dataclass
class RLOOResult:
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    policy: Any = None


def rloo_advantages_from_rewards(
    rewards: torch.Tensor,
    kl: torch.Tensor | None,
    *,
    beta: float,
    group_size: int,
    normalize: bool = False,
    reward_clip: float = 0.0,
) -> torch.Tensor:
    """Rewards (N,) (NaN = unscorable) and sequence KL (N,) -> advantages (N,).

    Clip, subtract ``beta * KL``, leave-one-out baseline, optional whitening: the order of
    TRL 1.16's ``RLOOTrainer``, which the oracle test holds this to.
    """
    if reward_clip > 0:
        rewards = rewards.clamp(-reward_clip, reward_clip)
    if kl is not None and beta != 0.0:
        rewards = rewards - beta * kl
    return losses.rloo_advantages(rewards, group_size, normalize=normalize)


def train_rloo(
    config: RLOOConfig,
    prompts: Sequence[PromptItem],
    *,
    reward: RewardSource | None = None,
    runtime: Runtime | None = None,
) -> RLOOResult:
    """Run RLOO on ``prompts``; ``reward`` overrides ``config.reward``. Writes metrics,
    checkpoints and the final policy on rank 0."""
    if config.num_generations < 2:
        raise ValueError("num_generations must be at least 2: the baseline is the siblings")
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
    with progress(steps, "rloo", enabled=rt.is_main) as bar:
        bar.update(start)
        for step in range(start, steps):
            t0 = time.monotonic()
            items = [prompts[i] for i in sampler.indices(step, rt.rank)]
            # Seeded per step, so a resumed run shuffles exactly as an uninterrupted one.
            shuffle = torch.Generator().manual_seed(rollout_seed(config.seed, rt.rank, step) + 1)

            # ---- rollout: k completions per prompt, KL-penalised rewards, LOO advantages ----
            gen = generator.generate(
                [i.prompt for i in items],
                n=group,
                max_new_tokens=config.max_new_tokens,
                temperature=config.temperature,
                seed=rollout_seed(config.seed, rt.rank, step),
            )
            input_ids = gen.input_ids.to(rt.device)  # (N, P + C), N = batch_size * k
            attention_mask = gen.attention_mask.to(rt.device)
            mask = gen.completion_mask.to(rt.device).float()  # (N, C)
            width, n = gen.prompt_ids.shape[1], input_ids.shape[0]
            with torch.no_grad():
                old_parts, ref_parts = [], []
                for chunk in micro_batches(list(range(n)), config.grad_accum):
                    ids, att = input_ids[chunk], attention_mask[chunk]
                    old_parts.append(
                        completion_logprobs(policy, ids, att, width, temperature=config.temperature)
                    )
                    if config.beta != 0.0:
                        ref_parts.append(
                            reference_logprobs(
                                ref_policy, policy, ids, att, width, config.temperature
                            )
                        )
                old_seq = (torch.cat(old_parts) * mask).sum(1)  # (N,)
                kl = None
                if ref_parts:
                    kl = (losses.kl_k1(torch.cat(old_parts), torch.cat(ref_parts)) * mask).sum(
                        1
                    )  # (N,)
            prompt_messages = [items[i].prompt for i in gen.prompt_index]
            raw = score_tensor(reward, prompt_messages, gen.texts, prompt_columns(items, group))
            advantages = rloo_advantages_from_rewards(
                raw.to(rt.device),
                kl,
                beta=config.beta,
                group_size=group,
                normalize=config.normalize_advantages,
                reward_clip=config.reward_clip,
            )  # (N,)

            # ---- clipped REINFORCE on sequence log-probs ----
            stats = torch.zeros(4, device=rt.device)  # loss, clipfrac, ratio, updates
            grad_norm = 0.0
            for _ in range(config.num_iterations):
                for minibatch in minibatch_indices(n, config.num_minibatches, shuffle):
                    for chunk in micro_batches(minibatch, config.grad_accum):
                        logprobs = completion_logprobs(
                            model,
                            input_ids[chunk],
                            attention_mask[chunk],
                            width,
                            temperature=config.temperature,
                        )
                        seq = (logprobs * mask[chunk]).sum(1, keepdim=True)  # (b, 1)
                        # A (b, 1) "sequence of one action" makes the PPO loss TRL's RLOO loss.
                        loss, loss_stats = losses.ppo_policy_loss(
                            seq,
                            old_seq[chunk].unsqueeze(1),
                            advantages[chunk].unsqueeze(1),
                            torch.ones_like(seq),
                            config.cliprange,
                        )
                        share = len(chunk) / len(minibatch)
                        rt.accelerator.backward(loss * share)
                        with torch.no_grad():
                            stats += (
                                torch.stack(
                                    [
                                        loss.detach(),
                                        loss_stats["clipfrac"],
                                        loss_stats["ratio_mean"],
                                        torch.ones((), device=rt.device),
                                    ]
                                )
                                * share
                            )
                    grad_norm = clip_and_step(rt, model, optimizer, scheduler, config.max_grad_norm)

            # ---- metrics ----
            with torch.no_grad():
                stats = stats / stats[-1].clamp(min=1)
                scored = raw[~torch.isnan(raw)]
                kl_mean = kl.mean().cpu() if kl is not None else torch.tensor(0.0)
                per_step = torch.stack(
                    [
                        scored.mean() if scored.numel() else torch.tensor(0.0),
                        scored.std() if scored.numel() > 1 else torch.tensor(0.0),
                        kl_mean,
                        (torch.nan_to_num(raw, nan=0.0) - config.beta * kl.cpu()).mean()
                        if kl is not None
                        else torch.nan_to_num(raw, nan=0.0).mean(),
                        gen.ended_with_eos.float().mean(),
                        mask.sum(1).mean().cpu(),
                        -losses.masked_mean(gen.logprobs, gen.completion_mask.float()),
                    ]
                ).to(rt.device)
            per_step = rt.accelerator.reduce(per_step, reduction="mean")
            stats = rt.accelerator.reduce(stats, reduction="mean")
            done = step + 1
            row = {
                "reward": float(per_step[0]),
                "reward_std": float(per_step[1]),
                "kl": float(per_step[2]),
                "rlhf_reward": float(per_step[3]),
                "eos_fraction": float(per_step[4]),
                "completion_length": float(per_step[5]),
                "entropy": float(per_step[6]),
                "loss": float(stats[0]),
                "clipfrac": float(stats[1]),
                "ratio_mean": float(stats[2]),
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
                    command="rloo",
                    model=model,
                    tokenizer=tokenizer,
                    optimizer=optimizer,
                    scheduler=scheduler,
                    step=done,
                )

    policy.eval()
    metrics = {"steps": float(steps), **row}
    if rt.is_main:
        export_model(out, model=policy, tokenizer=tokenizer, config=run_config_dict(config, "rloo"))
        write_json_atomic(out / "eval.json", metrics)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    metrics_file.close()
    rt.barrier()
    return RLOOResult(metrics, history, policy)


def run(config: RLOOConfig) -> dict[str, float]:
    """``python -m training.core rloo``: prompts from ``--data``, reward from ``--reward``."""
    return train_rloo(config, read_prompt_jsonl(config.data)).metrics

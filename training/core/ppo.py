"""PPO with a critic against a reward source and a KL penalty to a frozen reference policy.

Ziegler et al. 2019 ("Fine-tuning language models from human preferences"), Stiennon et al.
2020, Ouyang et al. 2022 (InstructGPT), implemented along the checklist of Huang et al. 2023,
"The N implementation details of RLHF with PPO" (``training-stack.md`` section 3; item numbers
below refer to it). One step is:

1. sample one completion per prompt from the policy (``temperature``, top-k 0, top-p 1, item 4),
   truncate at the stop token (item 14);
2. score prompt + completion with the reward source; completions that never stopped get
   ``missing_eos_penalty`` (item 14); optional normalisation (item 9) and clipping;
3. re-score the completions with the policy, the reference and the value model (no grad;
   log-probs temperature-scaled, item 10);
4. per-token rewards ``-beta * KL_t`` with the score added on the last token (item 17; k1 or
   k3), GAE advantages (item 15), whitened advantages (item 18);
5. ``num_ppo_epochs`` passes over the batch in ``num_minibatches`` reshuffled minibatches
   (item 16), each an optimiser update of the clipped policy loss plus ``vf_coef`` times the
   clipped value loss (item 19), plus ``ptx_coef`` times the SFT loss on ``ptx_data``
   (InstructGPT's PPO-ptx);
6. update the KL coefficient (fixed, or Ziegler's adaptive controller, item 20).

The value model is a separate sequence-classification model initialised from the reward model
(item 11, as TRL <= 1.12 and DeepSpeed-Chat), reading every position of the policy's tokens.
Dropout is off in all four models (item 13); every process seeds with ``seed + rank * 100003``
(item 6); the learning rate anneals linearly to zero by default (item 5).

A "step" (``max_steps``) is one rollout batch; the optimiser takes ``num_ppo_epochs *
num_minibatches`` updates per step and the learning-rate schedule runs over those updates.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object
from torch import nn
from transformers import PreTrainedTokenizerBase

from training.core import losses
from training.core.checkpoint import export_model
from training.core.config import CommonConfig, opt
from training.core.data import (
    Demonstration,
    PromptItem,
    collate_sft,
    read_prompt_jsonl,
    read_sft_jsonl,
)
from training.core.generation import GenerationOutput, TransformersGenerator
from training.core.modeling import (
    apply_lora,
    disable_dropout,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    position_ids_from_mask,
    sequence_logprobs,
)
from training.core.rewards import (
    RewardModelSource,
    RewardNormalizer,
    RewardSource,
    WeightedSumSource,
    build_reward_source,
    score_tensor,
)
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
class PPOConfig(CommonConfig):
    learning_rate: float = opt(3e-6, "Peak learning rate (policy and value model).")
    max_steps: int = opt(100, "Rollout batches; each is followed by the PPO epochs over it.")
    reward: str = opt(
        "",
        "Reward source: a reward-model folder or module:function, or a weighted sum "
        "'w1*src1,w2*src2' (rule-based rewards plug in as functions).",
    )
    value_model: str = opt(
        "",
        "Folder the value model starts from; default: the reward model (checklist 11), or the "
        "policy with a zero head when the reward is only functions.",
    )
    ref_model: str = opt("", "Frozen reference policy for the KL penalty; default: --model.")
    max_new_tokens: int = opt(64, "Most tokens per completion.")
    temperature: float = opt(1.0, "Sampling temperature; log-probs use the same (checklist 10).")
    stop_token: str = opt(
        "eos",
        "Truncate completions after this token: 'eos', another single token's text, or '' to "
        "keep fixed-length samples (checklist 4 and 14).",
    )
    missing_eos_penalty: float = opt(
        0.0, "Penalty for completions that never produced the stop token (0: off; OAI used 1)."
    )
    missing_eos_mode: str = opt(
        "subtract", "subtract the penalty from the score (TRL), or replace the score by -penalty."
    )
    num_ppo_epochs: int = opt(4, "Passes over each rollout batch.")
    num_minibatches: int = opt(1, "Optimiser updates per pass; reshuffled every pass.")
    kl_coef: float = opt(0.05, "beta of the per-token KL penalty in the reward (initial value).")
    kl_estimator: str = opt("k1", "Per-token KL in the reward: k1 (log-ratio) or k3 (>= 0).")
    adaptive_kl: bool = opt(False, "Adapt beta towards kl_target (Ziegler et al. 2019).")
    kl_target: float = opt(6.0, "Target KL (nats per sequence) of the adaptive controller.")
    kl_horizon: float = opt(10000.0, "Horizon (episodes) of the adaptive controller.")
    gamma: float = opt(1.0, "Discount (checklist 15: 1).")
    lam: float = opt(0.95, "GAE lambda.")
    whiten_advantages: bool = opt(True, "Whiten advantages per batch (mean 0, std 1).")
    whiten_rewards: bool = opt(False, "Whiten per-token rewards per batch, keeping their mean.")
    cliprange: float = opt(0.2, "PPO policy ratio clip.")
    cliprange_value: float = opt(0.2, "Value clip around the rollout's values.")
    vf_coef: float = opt(0.1, "Weight of the value loss.")
    reward_norm: str = opt(
        "none",
        "none; reference (gain/bias from samples of the initial policy, checklist 9); or "
        "running (running mean/std of scores).",
    )
    reward_norm_samples: int = opt(64, "Prompts sampled to fit the reference normalisation.")
    reward_clip: float = opt(0.0, "Clip scores to [-c, c] after normalisation (0: off).")
    ptx_data: str = opt("", "SFT JSONL whose language-model loss is mixed in (PPO-ptx).")
    ptx_coef: float = opt(1.0, "Weight of the PPO-ptx loss when ptx_data is given.")
    ptx_batch_size: int = opt(4, "Demonstrations per optimiser update for PPO-ptx.")


@dataclass
class PPOResult:
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    policy: Any = None
    value_model: Any = None


@dataclass
class PPOModels:
    policy: Any
    ref_policy: Any  # None when LoRA: the reference is the policy with its adapters off
    value_model: Any
    tokenizer: PreTrainedTokenizerBase
    reward: RewardSource


# ---- helpers shared by the on-policy trainers ----------------------------------------------


def rollout_seed(seed: int, rank: int, step: int) -> int:
    """Sampling seed of one rollout: distinct per process (item 6) and step, same on resume."""
    return (seed + rank * 100003) * 1_000_003 + step


def prompt_columns(items: Sequence[PromptItem], repeat: int = 1) -> dict[str, list[Any]]:
    """Extra fields of the prompt lines, one value per completion, for reward functions."""
    keys = sorted({k for item in items for k in item.meta})
    return {k: [item.meta.get(k) for item in items for _ in range(repeat)] for k in keys}


def stop_token_id(tokenizer: PreTrainedTokenizerBase, stop_token: str) -> int | None:
    if not stop_token:
        return None
    if stop_token == "eos":
        return int(tokenizer.eos_token_id)
    ids = tokenizer(stop_token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"stop_token {stop_token!r} is {len(ids)} tokens; it must be one")
    return int(ids[0])


def apply_stop_token(
    out: GenerationOutput, stop_id: int, tokenizer: PreTrainedTokenizerBase
) -> GenerationOutput:
    """EOS trick (item 14): cut every completion after its first ``stop_id``, pad the rest."""
    pad = int(tokenizer.pad_token_id)
    ids, keep, has_stop = losses.truncate_after_stop_token(out.completion_ids, stop_id, pad)
    mask = (keep.long() * out.completion_mask).to(out.completion_mask.dtype)  # (N, C)
    ids = ids.masked_fill(mask == 0, pad)
    texts = tokenizer.batch_decode(
        [row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)],
        skip_special_tokens=True,
    )
    return GenerationOutput(
        prompt_ids=out.prompt_ids,
        prompt_mask=out.prompt_mask,
        completion_ids=ids,
        completion_mask=mask,
        logprobs=out.logprobs * mask,
        texts=texts,
        ended_with_eos=has_stop & (mask.sum(-1) > 0),
        prompt_index=out.prompt_index,
    )


def completion_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_width: int,
    *,
    temperature: float,
) -> torch.Tensor:
    """Temperature-scaled log-probs (N, C) of the completion part of prompt + completion rows."""
    completion_mask = attention_mask.clone()
    completion_mask[:, :prompt_width] = 0
    _, per_token = sequence_logprobs(
        model, input_ids, attention_mask, completion_mask, temperature=temperature
    )  # (N, P + C - 1)
    return per_token[:, prompt_width - 1 :]  # (N, C)


def value_head(value_model: Any) -> nn.Linear:
    """The scalar head of a sequence classifier (``score`` in transformers' causal LMs)."""
    head = getattr(value_model, "score", None) or getattr(value_model, "classifier", None)
    if not isinstance(head, nn.Linear):
        raise ValueError(f"cannot find the scalar head of {type(value_model).__name__}")
    return head


def token_values(
    value_model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int
) -> torch.Tensor:
    """V(s_t) (N, C) for each completion token: the scalar head on the hidden state before it.

    A sequence classifier pools its head at the last token; the critic needs it at every
    position (item 1), so the backbone and the head are called separately.
    """
    backbone = getattr(value_model, value_model.base_model_prefix)
    hidden = backbone(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    ).last_hidden_state  # (N, P + C, H)
    return value_head(value_model)(hidden[:, prompt_width - 1 : -1]).float().mean(-1)  # (N, C)


class PolicyAndValue(nn.Module):
    """One module for both trained models, so one optimiser, one gradient clip and one DDP
    wrapper cover them (as TRL's ``PolicyAndValueWrapper``)."""

    def __init__(self, policy: nn.Module, value_model: nn.Module) -> None:
        super().__init__()
        self.policy = policy
        self.value_model = value_model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        prompt_width: int,
        temperature: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logprobs = completion_logprobs(
            self.policy, input_ids, attention_mask, prompt_width, temperature=temperature
        )
        values = token_values(self.value_model, input_ids, attention_mask, prompt_width)
        return logprobs, values  # (N, C), (N, C)


def minibatch_indices(
    batch_size: int, num_minibatches: int, generator: torch.Generator
) -> list[list[int]]:
    """One PPO epoch: a fresh permutation of the batch cut into ``num_minibatches`` (item 16)."""
    perm = torch.randperm(batch_size, generator=generator).tolist()
    size = math.ceil(batch_size / num_minibatches)
    return [perm[i : i + size] for i in range(0, batch_size, size)]


def _reward_model_paths(spec: str) -> list[str]:
    source_paths = []
    for term in spec.split(","):
        term = term.split("*", 1)[-1].strip()
        if term and (Path(term) / "config.json").is_file():
            source_paths.append(term)
    return source_paths


def load_policy_and_reference(
    config: CommonConfig, device: torch.device, *, ref_model: str = "", need_reference: bool = True
) -> tuple[Any, Any, PreTrainedTokenizerBase]:
    """(policy, frozen reference or None, tokenizer), dropout off (item 13).

    With LoRA there is no second model: the reference is the policy with its adapters
    disabled (see ``reference_logprobs``), which halves the memory of a large policy.
    """
    tokenizer = load_tokenizer(config.model)
    policy = load_causal_lm(config.model, device=device, dtype=config.dtype)
    ref_policy = None
    if config.lora:
        policy = apply_lora(policy, config, "CAUSAL_LM")
    elif need_reference:
        ref_policy = load_causal_lm(ref_model or config.model, device=device, dtype=config.dtype)
        ref_policy.requires_grad_(False)
    return policy, ref_policy, tokenizer


def load_reward(config: CommonConfig, spec: str, device: torch.device) -> RewardSource:
    return build_reward_source(
        spec,
        device=device,
        max_length=config.max_length,
        max_prompt_length=config.max_prompt_length,
    )


def load_ppo_models(
    config: PPOConfig, device: torch.device, reward: RewardSource | None = None
) -> PPOModels:
    """Policy, frozen reference, value model and reward source, all with dropout off (item 13).

    The value model must read the policy's tokens, so it has to share the policy's tokenizer.
    """
    policy, ref_policy, tokenizer = load_policy_and_reference(
        config, device, ref_model=config.ref_model
    )
    reward = reward or load_reward(config, config.reward, device)
    value_path = config.value_model or next(iter(_reward_model_paths(config.reward)), "")
    if value_path:
        value_model = load_reward_model(value_path, device=device, dtype=config.dtype)
        if load_tokenizer(value_path).get_vocab() != tokenizer.get_vocab():
            raise ValueError(
                f"value model {value_path} must use the policy's tokenizer: it reads the "
                "policy's tokens (set --value-model to a model that does)"
            )
    else:
        # No reward model to start from: the policy's backbone with a zero head (item 11, OAI).
        value_model = load_reward_model(config.model, device=device, dtype=config.dtype)
        with torch.no_grad():
            value_head(value_model).weight.zero_()
    for model in (value_model, *_reward_models(reward)):
        disable_dropout(model)
    return PPOModels(policy, ref_policy, value_model, tokenizer, reward)


def _reward_models(source: RewardSource) -> list[nn.Module]:
    if isinstance(source, RewardModelSource):
        return [source.model]
    if isinstance(source, WeightedSumSource):
        return [m for s in source.sources for m in _reward_models(s)]
    return []


@torch.no_grad()
def reference_logprobs(
    ref_policy: nn.Module | None,
    policy: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_width: int,
    temperature: float,
) -> torch.Tensor:
    """Log-probs (N, C) under the frozen reference; with LoRA, the policy with adapters off."""
    if ref_policy is not None:
        return completion_logprobs(
            ref_policy, input_ids, attention_mask, prompt_width, temperature=temperature
        )
    with policy.disable_adapter():  # type: ignore[operator]
        return completion_logprobs(
            policy, input_ids, attention_mask, prompt_width, temperature=temperature
        )


def ppo_advantages(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    config: PPOConfig,
    beta: float,
) -> dict[str, torch.Tensor]:
    """Steps 4 of the module docstring, as one pure function of a scored rollout batch.

    ``scores`` (N,) are final (penalised, normalised, clipped); the rest are (N, C).
    """
    rewards, kl = losses.kl_shaped_rewards(
        scores, logprobs, ref_logprobs, mask, beta, config.kl_estimator
    )  # (N, C)
    if config.whiten_rewards:
        rewards = losses.masked_whiten(rewards, mask, shift_mean=False)
    advantages, returns = losses.gae_advantages(rewards, values, mask, config.gamma, config.lam)
    if config.whiten_advantages:
        advantages = losses.masked_whiten(advantages, mask)
    return {"rewards": rewards, "kl": kl, "advantages": advantages, "returns": returns}


def final_scores(
    raw: torch.Tensor,
    ended_with_eos: torch.Tensor,
    config: PPOConfig,
    normalizer: RewardNormalizer | None,
) -> torch.Tensor:
    """Raw scores (N,) -> normalised, clipped, EOS-penalised; unscorable (NaN) -> 0."""
    scores = torch.nan_to_num(raw, nan=0.0)
    if normalizer is not None:
        scores = normalizer(scores)
    if config.reward_clip > 0:
        scores = scores.clamp(-config.reward_clip, config.reward_clip)
    # With no stop token (fixed-length samples) nothing can end early, so nothing is penalised.
    if config.missing_eos_penalty and config.stop_token:
        scores = losses.penalize_missing_eos(
            scores, ended_with_eos, config.missing_eos_penalty, config.missing_eos_mode
        )
    return scores


def _gathered(rt: Runtime, values: list[float]) -> list[float]:
    return list(gather_object(values)) if rt.world_size > 1 else values


def _check(config: PPOConfig) -> None:
    if config.kl_estimator not in ("k1", "k3"):
        raise ValueError("kl_estimator must be k1 or k3")
    if config.reward_norm not in ("none", "reference", "running"):
        raise ValueError("reward_norm must be none, reference or running")
    if config.missing_eos_mode not in ("subtract", "replace"):
        raise ValueError("missing_eos_mode must be subtract or replace")
    if config.num_minibatches > config.batch_size:
        raise ValueError("num_minibatches cannot exceed batch_size")


# ---- the loop ------------------------------------------------------------------------------


def train_ppo(
    config: PPOConfig,
    prompts: Sequence[PromptItem],
    *,
    models: PPOModels | None = None,
    reward: RewardSource | None = None,
    demonstrations: Sequence[Demonstration] = (),
    runtime: Runtime | None = None,
) -> PPOResult:
    """Run PPO on ``prompts``; write metrics, checkpoints and the final policy and value model
    (``output_dir/value``) on rank 0. ``reward`` overrides ``config.reward``; ``demonstrations``
    override ``config.ptx_data``."""
    _check(config)
    rt = runtime or setup_runtime(config)
    models = models or load_ppo_models(config, rt.device, reward)
    tokenizer = models.tokenizer
    prompts = list(prompts)
    out = Path(config.output_dir)
    stop_id = stop_token_id(tokenizer, config.stop_token)
    sampler = StepSampler(
        len(prompts), batch_size=config.batch_size, world_size=rt.world_size, seed=config.seed
    )
    steps = (
        config.max_steps if config.max_steps > 0 else sampler.steps_for_epochs(config.num_epochs)
    )
    updates_per_step = config.num_ppo_epochs * config.num_minibatches
    if config.gradient_checkpointing:
        models.policy.gradient_checkpointing_enable()
    wrapper = PolicyAndValue(models.policy, models.value_model)
    optimizer, scheduler = make_optimizer_and_scheduler(
        wrapper.parameters(), config, steps * updates_per_step
    )
    kl_ctl: losses.FixedKLController | losses.AdaptiveKLController = (
        losses.AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon)
        if config.adaptive_kl
        else losses.FixedKLController(config.kl_coef)
    )
    normalizer = RewardNormalizer() if config.reward_norm != "none" else None
    demos = list(demonstrations)
    if not demos and config.ptx_data:
        demos = read_sft_jsonl(config.ptx_data)

    start, extra = maybe_resume(
        config, rt, model=models.policy, optimizer=optimizer, scheduler=scheduler
    )
    if start:
        models.value_model.load_state_dict(extra["value_model"])
        kl_ctl.value = float(extra["kl_coef"])
        if normalizer is not None:
            normalizer.load_state_dict(extra["normalizer"])
        log.info("resuming PPO at step %d of %d", start, steps)
    wrapper, optimizer = rt.accelerator.prepare(wrapper, optimizer)
    unwrapped: PolicyAndValue = rt.accelerator.unwrap_model(wrapper)
    generator = TransformersGenerator(
        unwrapped.policy,
        tokenizer,
        max_prompt_length=config.max_prompt_length,
        batch_size=max(config.batch_size // config.grad_accum, 1),
        stop_at_eos=config.stop_token == "eos",
    )

    def sample(items: Sequence[PromptItem], seed: int) -> GenerationOutput:
        gen = generator.generate(
            [i.prompt for i in items],
            max_new_tokens=config.max_new_tokens,
            temperature=config.temperature,
            seed=seed,
        )
        if stop_id is not None and config.stop_token != "eos":
            gen = apply_stop_token(gen, stop_id, tokenizer)
        return gen

    if normalizer is not None and config.reward_norm == "reference" and start == 0:
        # Item 9: scores of the initial policy (= the reference) get mean 0 and std 1.
        g = torch.Generator().manual_seed(config.seed + rt.rank)
        count = min(len(prompts), config.reward_norm_samples)
        items = [prompts[i] for i in torch.randperm(len(prompts), generator=g)[:count].tolist()]
        gen = sample(items, rollout_seed(config.seed, rt.rank, -1))
        raw = score_tensor(
            models.reward, [i.prompt for i in items], gen.texts, prompt_columns(items)
        )
        normalizer.fit(_gathered(rt, [v for v in raw.tolist() if not math.isnan(v)]))

    metrics_file = MetricsWriter(out / "metrics.jsonl", enabled=rt.is_main)
    history: list[dict[str, float]] = []
    row: dict[str, float] = {}
    with progress(steps, "ppo", enabled=rt.is_main) as bar:
        bar.update(start)
        for step in range(start, steps):
            t0 = time.monotonic()
            items = [prompts[i] for i in sampler.indices(step, rt.rank)]
            # Seeded per step, so a resumed run shuffles exactly as an uninterrupted one.
            shuffle = torch.Generator().manual_seed(rollout_seed(config.seed, rt.rank, step) + 1)
            ptx_gen = torch.Generator().manual_seed(rollout_seed(config.seed, rt.rank, step) + 2)

            # ---- rollout (no gradients) ----
            unwrapped.eval()
            gen = sample(items, rollout_seed(config.seed, rt.rank, step))
            input_ids = gen.input_ids.to(rt.device)  # (N, P + C)
            attention_mask = gen.attention_mask.to(rt.device)
            mask = gen.completion_mask.to(rt.device).float()  # (N, C)
            width = gen.prompt_ids.shape[1]
            n = input_ids.shape[0]
            # The generator returned log-probs too, but they come from a cached decode (or, later,
            # another engine); the ratio must start at exactly 1, so they are recomputed here
            # and their gap is logged as logprob_mismatch.
            with torch.no_grad():
                old_logprobs, old_values, ref_logprobs = [], [], []
                for chunk in micro_batches(list(range(n)), config.grad_accum):
                    ids, att = input_ids[chunk], attention_mask[chunk]
                    lp, v = unwrapped(ids, att, width, config.temperature)
                    old_logprobs.append(lp)
                    old_values.append(v)
                    ref_logprobs.append(
                        reference_logprobs(
                            models.ref_policy, unwrapped.policy, ids, att, width, config.temperature
                        )
                    )
                logprobs = torch.cat(old_logprobs) * mask  # (N, C)
                values = torch.cat(old_values) * mask
                ref = torch.cat(ref_logprobs) * mask
            raw = score_tensor(
                models.reward, [i.prompt for i in items], gen.texts, prompt_columns(items)
            )
            if normalizer is not None and config.reward_norm == "running":
                normalizer.update(_gathered(rt, [v for v in raw.tolist() if not math.isnan(v)]))
            ended = gen.ended_with_eos.to(rt.device)
            scores = final_scores(raw.to(rt.device), ended, config, normalizer)  # (N,)
            beta = kl_ctl.value
            batch = ppo_advantages(scores, logprobs, ref, values, mask, config, beta)

            # ---- PPO epochs over the batch ----
            unwrapped.train()
            stats = torch.zeros(8, device=rt.device)
            for _ in range(config.num_ppo_epochs):
                for minibatch in minibatch_indices(n, config.num_minibatches, shuffle):
                    for chunk in micro_batches(minibatch, config.grad_accum):
                        m = mask[chunk]
                        new_logprobs, new_values = wrapper(
                            input_ids[chunk], attention_mask[chunk], width, config.temperature
                        )
                        pg_loss, pg_stats = losses.ppo_policy_loss(
                            new_logprobs,
                            logprobs[chunk],
                            batch["advantages"][chunk],
                            m,
                            config.cliprange,
                        )
                        vf_loss, vf_clipfrac = losses.ppo_value_loss(
                            new_values,
                            values[chunk],
                            batch["returns"][chunk],
                            m,
                            config.cliprange_value,
                        )
                        loss = pg_loss + config.vf_coef * vf_loss
                        ptx_loss = torch.zeros((), device=rt.device)
                        if demos:
                            picks = torch.randint(
                                len(demos), (config.ptx_batch_size,), generator=ptx_gen
                            )
                            sft = collate_sft(
                                tokenizer,
                                [demos[i] for i in picks.tolist()],
                                max_length=config.max_length,
                                max_prompt_length=config.max_prompt_length,
                            ).to(rt.device)
                            _, per_token = sequence_logprobs(
                                unwrapped.policy,
                                sft.input_ids,
                                sft.attention_mask,
                                sft.completion_mask,
                            )
                            ptx_loss = -per_token.sum() / sft.completion_mask[:, 1:].sum().clamp(
                                min=1
                            )
                            loss = loss + config.ptx_coef * ptx_loss
                        share = len(chunk) / len(minibatch)
                        rt.accelerator.backward(loss * share)
                        with torch.no_grad():
                            stats += (
                                torch.stack(
                                    [
                                        pg_loss.detach(),
                                        vf_loss.detach(),
                                        pg_stats["clipfrac"],
                                        vf_clipfrac,
                                        pg_stats["approx_kl"],
                                        pg_stats["ratio_mean"],
                                        ptx_loss.detach(),
                                        torch.ones((), device=rt.device),
                                    ]
                                )
                                * share
                            )
                    grad_norm = clip_and_step(
                        rt, wrapper, optimizer, scheduler, config.max_grad_norm
                    )

            # ---- metrics and the KL controller ----
            with torch.no_grad():
                kl_seq = batch["kl"].sum(1)  # (N,) with the estimator used in the reward
                k1 = (losses.kl_k1(logprobs, ref) * mask).sum(1)
                k3 = (losses.kl_k3(logprobs, ref) * mask).sum(1)
                per_step = torch.stack(
                    [
                        torch.nan_to_num(raw.to(rt.device), nan=0.0).mean(),
                        scores.mean(),
                        kl_seq.mean(),
                        k1.mean(),
                        k3.mean(),
                        (scores - beta * kl_seq).mean(),
                        -losses.masked_mean(logprobs, mask),
                        mask.sum(1).mean(),
                        ended.float().sum(),
                        torch.isnan(raw).float().sum().to(rt.device),
                        (gen.logprobs.to(rt.device) - logprobs).abs().max(),
                    ]
                )
                updates = stats[-1].clamp(min=1)
                stats = stats / updates
            per_step = rt.accelerator.reduce(per_step, reduction="mean")
            stats = rt.accelerator.reduce(stats, reduction="mean")
            kl_ctl.update(float(per_step[2]), n_steps=n * rt.world_size)
            done = step + 1
            row = {
                "reward/score_raw": float(per_step[0]),
                "reward/score": float(per_step[1]),
                "objective/kl": float(per_step[2]),
                "objective/kl_k1": float(per_step[3]),
                "objective/kl_k3": float(per_step[4]),
                "objective/rlhf_reward": float(per_step[5]),
                "objective/entropy": float(per_step[6]),
                "completion_length": float(per_step[7]),
                "num_eos": float(per_step[8]) * rt.world_size,
                "unscorable": float(per_step[9]) * rt.world_size,
                "logprob_mismatch": float(per_step[10]),
                "loss/policy": float(stats[0]),
                "loss/value": float(stats[1]),
                "policy/clipfrac": float(stats[2]),
                "value/clipfrac": float(stats[3]),
                "policy/approx_kl": float(stats[4]),
                "policy/ratio_mean": float(stats[5]),
                "loss/ptx": float(stats[6]),
                "beta": beta,
                "grad_norm": grad_norm,
                "lr": float(scheduler.get_last_lr()[0]),
                "step_time": time.monotonic() - t0,
            }
            history.append(row)
            if done % config.log_every == 0 or done == steps:
                metrics_file.write(done, row)
            bar.update(1, score=row["reward/score"], kl=row["objective/kl"])
            if should_save(config, done, steps):
                save_resumable(
                    config,
                    rt,
                    command="ppo",
                    model=unwrapped.policy,
                    tokenizer=tokenizer,
                    optimizer=optimizer,
                    scheduler=scheduler,
                    step=done,
                    extra={
                        "value_model": unwrapped.value_model.state_dict(),
                        "kl_coef": kl_ctl.value,
                        "normalizer": normalizer.state_dict() if normalizer else {},
                    },
                )

    unwrapped.eval()
    metrics = {"steps": float(steps), **row}
    if rt.is_main:
        export_model(
            out, model=unwrapped.policy, tokenizer=tokenizer, config=run_config_dict(config, "ppo")
        )
        export_model(out / "value", model=unwrapped.value_model, tokenizer=tokenizer)
        write_json_atomic(out / "eval.json", metrics)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    metrics_file.close()
    rt.barrier()
    return PPOResult(metrics, history, unwrapped.policy, unwrapped.value_model)


def run(config: PPOConfig) -> dict[str, float]:
    """``python -m training.core ppo``: prompts from ``--data``, reward from ``--reward``."""
    prompts = read_prompt_jsonl(config.data)
    return train_ppo(config, prompts).metrics

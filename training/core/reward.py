"""Bradley-Terry reward model training (Christiano et al. 2017; Ouyang et al. 2022, eq. 1).

The reward of a prompt + completion is a scalar head read at the last non-pad token of the
sequence (checklist item 7), on top of the policy's own backbone; a fresh head starts from
N(0, 1/sqrt(d_model + 1)) (item 8). Each step maximises the BT likelihood of the rater labels
(``losses.bradley_terry_loss``): ties are a 0.5 target, a margin shifts the logit, per-pair
weights make the loss a weighted mean ``sum(w * loss) / sum(w)`` over the step's pairs (a
Dawid-Skene reliability weight per judgment; ``use_weights=False`` ignores them), and an
optional lapse rate ``eps`` says a rater answers at random a fraction ``eps`` of the time, so
no single label can push the reward difference to infinity. A step whose pairs all weigh 0
has loss 0 and a zero gradient (AdamW's momentum still moves the weights a little).

Options:

* ``ensemble_size`` K > 1 trains K heads on one backbone; each head sees its own Poisson(1)
  bootstrap weights (Lakshminarayanan et al. 2017 use random init; bootstrap adds data
  diversity). The reward is the mean of the heads; their spread is the model's uncertainty,
  reported per pair so the loop can ask raters about pairs the reward model is unsure of.
* After training, a gain and a bias make the rewards of reference samples mean 0, std 1
  (item 9; Ziegler et al. 2019). They are stored in the saved model's ``config.json``
  (``reward_gain``, ``reward_bias``); ``reward_from_logits`` applies them.
* Evaluation on held-out pairs: accuracy (ties excluded), Brier score and expected calibration
  error of the predicted P(chosen better), written to ``eval.json``.
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
from torch import nn
from transformers import PreTrainedTokenizerBase

from training.core.checkpoint import export_model
from training.core.config import CommonConfig, opt
from training.core.data import (
    Demonstration,
    Messages,
    PreferencePair,
    collate_encoded_pairs,
    collate_pairs,
    collate_sft,
    encode_pairs,
    read_preference_jsonl,
)
from training.core.losses import bradley_terry_loss
from training.core.modeling import (
    apply_lora,
    load_reward_model,
    load_tokenizer,
    position_ids_from_mask,
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
    total_steps,
)
from training.core.tracking import MetricsWriter, progress, write_json_atomic

log = logging.getLogger(__name__)


@dataclass
class RewardConfig(CommonConfig):
    learning_rate: float = opt(5e-5, "Peak learning rate.")
    max_steps: int = opt(
        -1, "Optimiser steps; -1 means num_epochs over the data (one epoch avoids overfitting)."
    )
    eval_fraction: float = opt(
        0.1, "Fraction of the data held out for evaluation when eval_data is not given."
    )
    lapse: float = opt(
        0.0, "Rater lapse rate eps: P = (1 - eps) * sigmoid(d) + eps / 2 (Christiano 2017)."
    )
    center_rewards_coefficient: float = opt(
        0.0, "Weight of mean((r_c + r_r)^2), keeping rewards centred (TRL's; 0.01 is typical)."
    )
    use_weights: bool = opt(
        True,
        "Scale each pair's loss by its JSONL weight (e.g. a Dawid-Skene rater weight); "
        "--no-use-weights trains unweighted on the same file.",
    )
    ensemble_size: int = opt(1, "Reward heads on one backbone; their spread is the uncertainty.")
    bootstrap: bool = opt(True, "With several heads, give each Poisson(1) bootstrap weights.")
    normalize: bool = opt(True, "Set gain/bias so rewards of reference samples have mean 0, std 1.")
    normalize_samples: str = opt(
        "",
        "JSONL of reference-policy samples (the generate command's output) to normalise on; "
        "default: every completion in the training data.",
    )
    calibration_bins: int = opt(10, "Equal-width confidence bins for the calibration error.")
    eval_batch_size: int = opt(32, "Pairs per forward pass when scoring.")


@dataclass
class RewardResult:
    metrics: dict[str, float]
    gain: float = 1.0
    bias: float = 0.0
    pair_rows: list[dict[str, Any]] = field(default_factory=list)


# ---- scoring -------------------------------------------------------------------------------


def head_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
    """Raw head outputs (B, K) at each row's last non-pad token (transformers pools there,
    finding it from ``config.pad_token_id``, which ``load_reward_model`` sets)."""
    return model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    ).logits.float()  # (B, K)


def reward_from_logits(logits: torch.Tensor, model_config: Any) -> torch.Tensor:
    """Normalised reward (B,) from raw head outputs (B, K): gain * mean_k + bias."""
    gain = float(getattr(model_config, "reward_gain", 1.0))
    bias = float(getattr(model_config, "reward_bias", 0.0))
    return gain * logits.mean(-1) + bias


@torch.no_grad()
def score_completions(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Messages],
    completions: Sequence[str],
    *,
    max_length: int,
    max_prompt_length: int,
    batch_size: int = 32,
) -> torch.Tensor:
    """Raw head outputs (N, K) for prompt + completion texts, tokenised like a pair's side."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(prompts), batch_size):
        demos = [
            Demonstration(p, c)
            for p, c in zip(
                prompts[start : start + batch_size],
                completions[start : start + batch_size],
                strict=True,
            )
        ]
        batch = collate_sft(
            tokenizer, demos, max_length=max_length, max_prompt_length=max_prompt_length
        ).to(device)
        out.append(head_logits(model, batch.input_ids, batch.attention_mask).cpu())
    return torch.cat(out) if out else torch.zeros(0, 1)


@torch.no_grad()
def score_pairs(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[PreferencePair],
    *,
    max_length: int,
    max_prompt_length: int,
    batch_size: int = 32,
) -> torch.Tensor:
    """Raw head reward differences r(chosen) - r(rejected), (N, K)."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        batch = collate_pairs(
            tokenizer, chunk, max_length=max_length, max_prompt_length=max_prompt_length
        ).to(device)
        logits = head_logits(model, batch.input_ids, batch.attention_mask)  # (2b, K)
        out.append((logits[: len(chunk)] - logits[len(chunk) :]).cpu())
    return torch.cat(out) if out else torch.zeros(0, 1)


def preference_metrics(
    diffs: torch.Tensor,
    pairs: Sequence[PreferencePair],
    *,
    lapse: float = 0.0,
    bins: int = 10,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Accuracy, Brier score and ECE of P(chosen better) on labelled pairs.

    ``diffs``: raw reward differences (N, K). The predicted probability is the trained
    likelihood: ``(1 - eps) * sigmoid(mean_k d - margin) + eps / 2``. Accuracy counts strict
    preferences only; ECE bins the confidence ``max(p, 1 - p)`` against how often the side the
    model favours is the one the raters favour (soft labels count fractionally).
    """
    n = diffs.shape[0]
    if n == 0:
        return {"eval_pairs": 0.0}, []
    d = diffs.mean(-1)  # (N,)
    spread = diffs.std(-1, unbiased=False) if diffs.shape[1] > 1 else torch.zeros(n)
    margin = torch.tensor([p.margin for p in pairs])
    y = torch.tensor([p.label for p in pairs])
    p = (1 - lapse) * torch.sigmoid(d - margin) + lapse / 2  # (N,)
    strict = y != 0.5
    correct = ((d > 0) == (y > 0.5)).float()
    confidence = torch.maximum(p, 1 - p)
    agree = torch.where(p >= 0.5, y, 1 - y)
    ece = 0.0
    edges = torch.linspace(0.5, 1.0, bins + 1)
    for b in range(bins):
        lo, hi = edges[b], edges[b + 1]
        in_bin = (confidence >= lo) & ((confidence < hi) if b < bins - 1 else (confidence <= hi))
        if in_bin.any():
            gap = (confidence[in_bin].mean() - agree[in_bin].mean()).abs()
            ece += float(in_bin.float().mean() * gap)
    metrics = {
        "eval_pairs": float(n),
        "eval_accuracy": float(correct[strict].mean()) if strict.any() else math.nan,
        "eval_brier": float(((p - y) ** 2).mean()),
        "eval_ece": ece,
        "eval_nll": float(-(y * p.log() + (1 - y) * (1 - p).log()).mean()),
        "eval_reward_margin": float(d.mean()),
        "eval_disagreement": float(spread.mean()),
    }
    rows = [
        {
            "index": i,
            "diff": float(d[i]),
            "p_chosen": float(p[i]),
            "label": float(y[i]),
            "disagreement": float(spread[i]),
        }
        for i in range(n)
    ]
    return metrics, rows


def normalization(raw: torch.Tensor) -> tuple[float, float]:
    """Gain and bias with ``gain * raw + bias`` of mean 0, std 1 (checklist item 9)."""
    mean, std = float(raw.mean()), float(raw.std(unbiased=False))
    gain = 1.0 / std if std > 1e-8 else 1.0
    return gain, -mean * gain


def reference_samples_from_jsonl(path: str | Path) -> list[tuple[Messages, str]]:
    """(prompt, completion) samples from the generate command's output."""
    from training.core.data import _iter_json_lines, read_prompt_jsonl

    items = read_prompt_jsonl(path)
    samples = []
    for item, (_, row) in zip(items, _iter_json_lines(path), strict=True):
        for c in row.get("completions", []):
            text = c.get("text") if isinstance(c, dict) else c
            if isinstance(text, str):
                samples.append((item.prompt, text))
    return samples


def split_pairs(
    pairs: list[PreferencePair], fraction: float, seed: int
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    if fraction <= 0 or len(pairs) < 2:
        return pairs, []
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(pairs), generator=g).tolist()
    n_eval = max(1, round(len(pairs) * fraction))
    return [pairs[i] for i in order[n_eval:]], [pairs[i] for i in order[:n_eval]]


# ---- training ------------------------------------------------------------------------------


def train_reward_model(
    config: RewardConfig,
    pairs: Sequence[PreferencePair],
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    *,
    eval_pairs: Sequence[PreferencePair] = (),
    reference_samples: Sequence[tuple[Messages, str]] | None = None,
    runtime: Runtime | None = None,
) -> RewardResult:
    """Train ``model`` (a sequence classifier with ``config.ensemble_size`` heads) in place.

    Writes ``metrics.jsonl`` while training, then the model (with its normalisation) and
    ``eval.json`` to ``config.output_dir`` on rank 0. Resumes from the newest checkpoint there
    when ``config.resume`` is set. ``reference_samples`` default to every completion of
    ``pairs``.
    """
    rt = runtime or setup_runtime(config)
    out = Path(config.output_dir)
    pairs = list(pairs)
    heads = config.ensemble_size
    sampler = StepSampler(
        len(pairs), batch_size=config.batch_size, world_size=rt.world_size, seed=config.seed
    )
    steps = total_steps(config, sampler)
    if config.lora:
        model = apply_lora(model, config, "SEQ_CLS")
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()  # type: ignore[operator]
    optimizer, scheduler = make_optimizer_and_scheduler(model.parameters(), config, steps)
    start, _ = maybe_resume(config, rt, model=model, optimizer=optimizer, scheduler=scheduler)
    model, optimizer = rt.accelerator.prepare(model, optimizer)
    # Bootstrap weights are drawn once from the run seed so a resumed run sees the same ones.
    boot = None
    if heads > 1 and config.bootstrap:
        g = torch.Generator().manual_seed(config.seed + 7)
        boot = torch.poisson(torch.ones(len(pairs), heads), generator=g)  # (N, K)
    # Every (pair, head) term's weight: the pair's data weight times its bootstrap count.
    pair_weight = torch.tensor([p.weight if config.use_weights else 1.0 for p in pairs])  # (N,)
    term_weight = pair_weight[:, None] * (boot if boot is not None else torch.ones(1, heads))

    def step_weight_sum(step: int) -> float:
        """Sum of the weights of this step's whole global batch, every rank's slice: the
        sampler is a pure function of the step, so each rank works it out without talking."""
        rows = [i for r in range(rt.world_size) for i in sampler.indices(step, r)]
        return float(term_weight[rows].sum())

    # Tokenised once here, not again in every step (TRL tokenises its dataset up front too).
    encoded = encode_pairs(
        tokenizer, pairs, max_length=config.max_length, max_prompt_length=config.max_prompt_length
    )
    pad_id = int(tokenizer.pad_token_id)

    metrics_file = MetricsWriter(
        out / "metrics.jsonl", enabled=rt.is_main, resume_step=start if start else None
    )
    model.train()
    if start:
        log.info("resuming reward training at step %d of %d", start, steps)
    with progress(steps, "reward", enabled=rt.is_main) as bar:
        bar.update(start)
        for step in range(start, steps):
            t0 = time.monotonic()
            indices = sampler.indices(step, rt.rank)
            # Each micro-batch divides by the whole step's weight sum, so the step's gradient is
            # sum(w * loss) / sum(w) over the global batch however it is split; DDP then
            # averages the ranks' gradients, which the factor world_size undoes.
            weight_sum = step_weight_sum(step) / rt.world_size
            stats = torch.zeros(3, device=rt.device)  # loss, accuracy, margin
            for chunk in micro_batches(indices, config.grad_accum):
                batch = collate_encoded_pairs([encoded[i] for i in chunk], pad_id).to(rt.device)
                b = len(chunk)
                share = b / len(indices)
                logits = head_logits(model, batch.input_ids, batch.attention_mask)  # (2b, K)
                chosen, rejected = logits[:b], logits[b:]  # (b, K)
                # Already this micro-batch's part of the step's loss: no ``* share``, except
                # for the centring term, a plain mean over the micro-batch's pairs.
                loss = bradley_terry_loss(
                    chosen,
                    rejected,
                    margin=batch.margin,
                    label=batch.label,
                    weight=term_weight[chunk].to(rt.device),  # (b, K)
                    weight_sum=weight_sum,
                    lapse=config.lapse,
                    center_rewards_coefficient=config.center_rewards_coefficient * share,
                )
                rt.accelerator.backward(loss)
                with torch.no_grad():
                    d = (chosen - rejected).mean(-1)
                    right = ((d > 0) == (batch.label > 0.5)).float().mean()
                    stats += torch.stack([loss.detach(), right * share, d.mean() * share])
            grad_norm = clip_and_step(rt, model, optimizer, scheduler, config.max_grad_norm)
            done = step + 1
            stats = rt.accelerator.reduce(stats, reduction="mean")
            loss_v, acc_v, margin_v = (float(x) for x in stats)
            if done % config.log_every == 0 or done == steps:
                metrics_file.write(
                    done,
                    {
                        "loss": loss_v,
                        "accuracy": acc_v,
                        "reward_margin": margin_v,
                        "grad_norm": grad_norm,
                        "lr": scheduler.get_last_lr()[0],
                        "epoch": sampler.epoch_of(done),
                        "step_time": time.monotonic() - t0,
                    },
                )
            bar.update(1, loss=loss_v, acc=acc_v)
            if should_save(config, done, steps):
                save_resumable(
                    config,
                    rt,
                    command="reward",
                    model=model,
                    tokenizer=tokenizer,
                    optimizer=optimizer,
                    scheduler=scheduler,
                    step=done,
                )

    model.eval()
    unwrapped = rt.accelerator.unwrap_model(model)
    result = RewardResult(metrics={"steps": float(steps)})
    if config.normalize:
        samples = list(reference_samples or [])
        if not samples:
            seen = set()
            for p in pairs:
                for text in (p.chosen, p.rejected):
                    key = (repr(p.prompt), text)
                    if key not in seen:
                        seen.add(key)
                        samples.append((p.prompt, text))
        raw = score_completions(
            unwrapped,
            tokenizer,
            [s[0] for s in samples],
            [s[1] for s in samples],
            max_length=config.max_length,
            max_prompt_length=config.max_prompt_length,
            batch_size=config.eval_batch_size,
        ).mean(-1)
        result.gain, result.bias = normalization(raw)
        normalized = raw * result.gain + result.bias
        result.metrics.update(
            {
                "reward_gain": result.gain,
                "reward_bias": result.bias,
                "normalized_mean": float(normalized.mean()),
                "normalized_std": float(normalized.std(unbiased=False)),
                "normalization_samples": float(len(samples)),
            }
        )
    base_config = getattr(unwrapped, "config", None)
    if base_config is not None:
        base_config.reward_gain = result.gain
        base_config.reward_bias = result.bias
        base_config.reward_heads = heads
    if eval_pairs:
        diffs = score_pairs(
            unwrapped,
            tokenizer,
            eval_pairs,
            max_length=config.max_length,
            max_prompt_length=config.max_prompt_length,
            batch_size=config.eval_batch_size,
        )
        eval_metrics, result.pair_rows = preference_metrics(
            diffs, eval_pairs, lapse=config.lapse, bins=config.calibration_bins
        )
        result.metrics.update(eval_metrics)
    if rt.is_main:
        export_model(
            out, model=unwrapped, tokenizer=tokenizer, config=run_config_dict(config, "reward")
        )
        metrics_file.write(steps, {k: v for k, v in result.metrics.items() if k != "steps"})
        write_json_atomic(out / "eval.json", result.metrics)
        # The final model is in place; the resumable copy is no longer needed.
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    metrics_file.close()
    rt.barrier()
    return result


def run(config: RewardConfig) -> dict[str, float]:
    """``python -m training.core reward``: read pairs, train, evaluate, save."""
    pairs = read_preference_jsonl(config.data)
    if config.eval_data:
        train, held_out = pairs, read_preference_jsonl(config.eval_data)
    else:
        train, held_out = split_pairs(pairs, config.eval_fraction, config.seed)
    samples = (
        reference_samples_from_jsonl(config.normalize_samples) if config.normalize_samples else None
    )
    rt = setup_runtime(config)
    tokenizer = load_tokenizer(config.model)
    model = load_reward_model(
        config.model, device=rt.device, dtype=config.dtype, num_labels=config.ensemble_size
    )
    result = train_reward_model(
        config, train, model, tokenizer, eval_pairs=held_out, reference_samples=samples, runtime=rt
    )
    return result.metrics

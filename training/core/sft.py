"""Supervised fine-tuning on demonstrations (InstructGPT step 1, Ouyang et al. 2022).

The loss is the mean negative log-likelihood of the completion tokens only (EOS included, so the
model learns to stop); prompt tokens are context, not targets. One explicit loop, the same shape
as ``reward.py``: sample a batch, forward, backward, clip, step, log, maybe checkpoint.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from training.core.checkpoint import export_model
from training.core.config import CommonConfig, opt
from training.core.data import Demonstration, SequenceBatch, collate_sft, read_sft_jsonl
from training.core.modeling import apply_lora, load_causal_lm, load_tokenizer, sequence_logprobs
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
class SFTConfig(CommonConfig):
    learning_rate: float = opt(2e-5, "Peak learning rate.")
    eval_fraction: float = opt(
        0.0, "Fraction of the data held out for evaluation when eval_data is not given."
    )
    eval_batch_size: int = opt(16, "Demonstrations per forward pass when evaluating.")


def completion_nll(model: nn.Module, batch: SequenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed NLL over completion tokens, number of completion tokens) of one batch."""
    _, per_token = sequence_logprobs(
        model, batch.input_ids, batch.attention_mask, batch.completion_mask
    )  # (B, T-1)
    tokens = batch.completion_mask[:, 1:].sum()
    return -per_token.sum(), tokens


@torch.no_grad()
def evaluate_nll(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    demos: Sequence[Demonstration],
    *,
    max_length: int,
    max_prompt_length: int,
    batch_size: int = 16,
) -> dict[str, float]:
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    for start in range(0, len(demos), batch_size):
        batch = collate_sft(
            tokenizer,
            demos[start : start + batch_size],
            max_length=max_length,
            max_prompt_length=max_prompt_length,
        ).to(device)
        nll, n = completion_nll(model, batch)
        total, tokens = total + float(nll), tokens + int(n)
    mean = total / max(tokens, 1)
    return {"eval_nll": mean, "eval_perplexity": math.exp(min(mean, 50.0)), "eval_tokens": tokens}


def train_sft(
    config: SFTConfig,
    demos: Sequence[Demonstration],
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    *,
    eval_demos: Sequence[Demonstration] = (),
    runtime: Runtime | None = None,
) -> dict[str, float]:
    """Fine-tune ``model`` in place; writes metrics, the model and eval.json on rank 0."""
    rt = runtime or setup_runtime(config)
    out = Path(config.output_dir)
    demos = list(demos)
    sampler = StepSampler(
        len(demos), batch_size=config.batch_size, world_size=rt.world_size, seed=config.seed
    )
    steps = total_steps(config, sampler)
    if config.lora:
        model = apply_lora(model, config, "CAUSAL_LM")
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()  # type: ignore[operator]
    optimizer, scheduler = make_optimizer_and_scheduler(model.parameters(), config, steps)
    start, _ = maybe_resume(config, rt, model=model, optimizer=optimizer, scheduler=scheduler)
    model, optimizer = rt.accelerator.prepare(model, optimizer)
    metrics_file = MetricsWriter(
        out / "metrics.jsonl", enabled=rt.is_main, resume_step=start if start else None
    )
    model.train()
    loss_v = math.nan
    with progress(steps, "sft", enabled=rt.is_main) as bar:
        bar.update(start)
        for step in range(start, steps):
            t0 = time.monotonic()
            batches = [
                collate_sft(
                    tokenizer,
                    [demos[i] for i in chunk],
                    max_length=config.max_length,
                    max_prompt_length=config.max_prompt_length,
                ).to(rt.device)
                for chunk in micro_batches(sampler.indices(step, rt.rank), config.grad_accum)
            ]
            # Token-mean over the whole step, so short and long micro-batches weigh per token.
            step_tokens = sum(int(b.completion_mask[:, 1:].sum()) for b in batches)
            loss_sum = torch.zeros((), device=rt.device)
            for batch in batches:
                nll, _ = completion_nll(model, batch)
                loss = nll / max(step_tokens, 1)
                rt.accelerator.backward(loss)
                loss_sum += loss.detach()
            grad_norm = clip_and_step(rt, model, optimizer, scheduler, config.max_grad_norm)
            done = step + 1
            loss_v = float(rt.accelerator.reduce(loss_sum, reduction="mean"))
            if done % config.log_every == 0 or done == steps:
                metrics_file.write(
                    done,
                    {
                        "loss": loss_v,
                        "grad_norm": grad_norm,
                        "lr": scheduler.get_last_lr()[0],
                        "tokens": step_tokens,
                        "epoch": sampler.epoch_of(done),
                        "step_time": time.monotonic() - t0,
                    },
                )
            bar.update(1, loss=loss_v)
            if should_save(config, done, steps):
                save_resumable(
                    config,
                    rt,
                    command="sft",
                    model=model,
                    tokenizer=tokenizer,
                    optimizer=optimizer,
                    scheduler=scheduler,
                    step=done,
                )

    model.eval()
    unwrapped = rt.accelerator.unwrap_model(model)
    metrics: dict[str, float] = {"steps": float(steps), "train_loss": loss_v}
    if eval_demos:
        metrics.update(
            evaluate_nll(
                unwrapped,
                tokenizer,
                list(eval_demos),
                max_length=config.max_length,
                max_prompt_length=config.max_prompt_length,
                batch_size=config.eval_batch_size,
            )
        )
    if rt.is_main:
        export_model(
            out, model=unwrapped, tokenizer=tokenizer, config=run_config_dict(config, "sft")
        )
        write_json_atomic(out / "eval.json", metrics)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    metrics_file.close()
    rt.barrier()
    return metrics


def run(config: SFTConfig) -> dict[str, float]:
    """``python -m training.core sft``."""
    demos = read_sft_jsonl(config.data)
    eval_demos: list[Demonstration] = []
    if config.eval_data:
        eval_demos = read_sft_jsonl(config.eval_data)
    elif config.eval_fraction > 0 and len(demos) > 1:
        g = torch.Generator().manual_seed(config.seed)
        order = torch.randperm(len(demos), generator=g).tolist()
        n_eval = max(1, round(len(demos) * config.eval_fraction))
        eval_demos = [demos[i] for i in order[:n_eval]]
        demos = [demos[i] for i in order[n_eval:]]
    rt = setup_runtime(config)
    model = load_causal_lm(config.model, device=rt.device, dtype=config.dtype)
    tokenizer = load_tokenizer(config.model)
    return train_sft(config, demos, model, tokenizer, eval_demos=eval_demos, runtime=rt)

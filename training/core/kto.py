"""Kahneman-Tversky optimisation (Ethayarajh et al. 2024, arXiv 2402.01306) on unpaired labels.

Each example is one answer marked desirable or undesirable (thumbs up / down): lines
``{"prompt", "completion", "label": bool}``; a preference file is split into one desirable
and one undesirable example per strict pair. The loss is ``training.core.losses.kto_loss``.

KTO's reference point z0 is KL(pi || pi_ref), estimated from mismatched pairs: each example i
is given a fixed partner answer y_j from another example (a seeded cycle over the data, as TRL
builds its "KL dataset"), and z0 is the batch mean of log pi(y_j|x_i) - log pi_ref(y_j|x_i),
clamped at 0 and detached. Fixing the partners is what lets the reference side of the estimate
be cached with the rest: the reference still runs once per run (see ``training.core.dpo``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from training.core.checkpoint import export_model
from training.core.config import CommonConfig, opt
from training.core.data import (
    Demonstration,
    Messages,
    UnpairedExample,
    collate_sft,
    read_unpaired_jsonl,
)
from training.core.dpo import (
    Reference,
    RowLogps,
    cached_reference_logps,
    reduce_sums,
    sampled_kl,
    unique_prompts,
)
from training.core.losses import kl_k3, kto_kl_estimate, kto_loss
from training.core.modeling import (
    apply_lora,
    disable_dropout,
    load_causal_lm,
    load_tokenizer,
    sequence_logprobs,
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

log = logging.getLogger("training.core.kto")


@dataclass
class KTOConfig(CommonConfig):
    beta: float = opt(0.1, "Inverse temperature of the implicit reward.")
    desirable_weight: float = opt(1.0, "lambda_D, the weight of desirable examples.")
    undesirable_weight: float = opt(1.0, "lambda_U, the weight of undesirable examples.")
    reference_model: str = opt("", "Reference policy; empty: the starting policy (--model).")
    precompute_reference: bool = opt(True, "Reference log-probs in one pass before training.")
    eval_every: int = opt(0, "Evaluate on eval_data every N steps (0: only at the end).")
    kl_prompts: int = opt(16, "Eval prompts sampled for the final KL(policy || reference).")
    kl_samples: int = opt(4, "Samples per prompt for that KL estimate; 0 skips it.")
    kl_max_new_tokens: int = opt(32, "Max tokens per sample for that KL estimate.")


def kl_partners(n: int, seed: int) -> list[int]:
    """partner[i] != i (for n > 1): a seeded cycle, so every answer is used once as a mismatch."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    partner = [0] * n
    for t, i in enumerate(order):
        partner[i] = order[(t + 1) % n]
    return partner


def example_rows(
    examples: Sequence[UnpairedExample], partner: Sequence[int]
) -> list[tuple[Messages, str]]:
    """Matched rows (x_i, y_i), then mismatched rows (x_i, y_partner(i))."""
    matched = [(e.prompt, e.completion) for e in examples]
    return matched + [
        (e.prompt, examples[j].completion) for e, j in zip(examples, partner, strict=True)
    ]


def check_balance(examples: Sequence[UnpairedExample], config: KTOConfig) -> None:
    n_d = sum(e.desirable for e in examples)
    n_u = len(examples) - n_d
    if n_d and n_u:
        ratio = config.desirable_weight * n_d / (config.undesirable_weight * n_u)
        if not 1.0 <= ratio <= 4.0 / 3.0:
            log.warning(
                "lambda_D n_D / (lambda_U n_U) = %.2f; the KTO paper keeps it in [1, 4/3] "
                "(e.g. --desirable-weight %.3g)",
                ratio,
                config.undesirable_weight * n_u / n_d,
            )


def _batch(
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[tuple[Messages, str]],
    config: KTOConfig,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch = collate_sft(
        tokenizer,
        [Demonstration(m, c) for m, c in rows],
        max_length=config.max_length,
        max_prompt_length=config.max_prompt_length,
    ).to(device)
    return batch.input_ids, batch.attention_mask, batch.completion_mask


@torch.no_grad()
def mismatched_logratios(
    policy: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    mismatched: Sequence[tuple[Messages, str]],
    config: KTOConfig,
    ref_mismatched: torch.Tensor | None,
    reference: Reference | None,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log pi, log pi_ref) of the mismatched rows (B,): the inputs of KTO's z0 estimate."""
    ids, mask, completion = _batch(tokenizer, mismatched, config, device)
    policy_logps, _ = sequence_logprobs(policy, ids, mask, completion)  # (B,)
    if ref_mismatched is not None:
        return policy_logps, ref_mismatched.to(policy_logps)
    assert reference is not None
    with reference.active() as model:
        ref_logps, _ = sequence_logprobs(model, ids, mask, completion)  # (B,)
    return policy_logps, ref_logps


def batch_z0(runtime: Runtime, policy_logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """``kto_kl_estimate`` over the batch of every process: one z0 per micro-batch."""
    if runtime.world_size == 1:
        return kto_kl_estimate(policy_logps, ref_logps)
    sums = reduce_sums(
        runtime, {"sum": float((policy_logps - ref_logps).sum()), "n": float(len(ref_logps))}
    )
    return torch.tensor(max(sums["sum"] / sums["n"], 0.0), device=policy_logps.device)


def kto_forward(
    policy: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[UnpairedExample],
    z0: torch.Tensor,
    config: KTOConfig,
    ref: RowLogps | None,
    reference: Reference | None,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Per-example loss and diagnostics (each (B,)) for reference point ``z0`` (a scalar);
    ``ref`` holds the examples' cached reference rows, else ``reference`` is run live."""
    rows = [(e.prompt, e.completion) for e in examples]
    ids, mask, completion = _batch(tokenizer, rows, config, device)
    summed, per_token = sequence_logprobs(policy, ids, mask, completion)  # (B,), (B, T-1)
    if ref is not None:
        ref_summed = ref.summed.to(summed)  # (B,)
        ref_tokens = ref.per_token(completion).to(summed)  # (B, T-1)
    else:
        assert reference is not None
        with torch.no_grad(), reference.active() as model:
            ref_summed, ref_tokens = sequence_logprobs(model, ids, mask, completion)
    z0 = z0.to(summed)
    desirable = torch.tensor([e.desirable for e in examples], device=device)
    losses, rewards = kto_loss(
        summed,
        ref_summed,
        desirable,
        z0,
        beta=config.beta,
        lambda_d=config.desirable_weight,
        lambda_u=config.undesirable_weight,
    )
    k3 = kl_k3(per_token.detach(), ref_tokens) * completion[:, 1:]  # (B, T-1)
    good, bad = desirable.to(summed), (~desirable).to(summed)
    delta = (summed - ref_summed).detach()
    b = len(examples)
    return {
        "losses": losses,
        "desirable": good,
        "undesirable": bad,
        "kl": z0.expand(b),
        # Right side of the reference point: KTO's own notion of a correct label.
        "reward_accuracy": ((rewards > config.beta * z0) == desirable).to(summed),
        "reward_desirable": rewards * good,
        "reward_undesirable": rewards * bad,
        "logp_desirable": summed.detach() * good,
        "logp_undesirable": summed.detach() * bad,
        "logp_desirable_delta": delta * good,
        "logp_undesirable_delta": delta * bad,
        "kl_data": k3.sum(-1) / completion[:, 1:].sum(-1).clamp(min=1),
    }


def _summarise(sums: dict[str, float]) -> dict[str, float]:
    n, n_d, n_u = sums["n"], sums.get("desirable", 0.0), sums.get("undesirable", 0.0)
    out = {}
    for key, value in sums.items():
        if key.endswith("_desirable") or key.endswith("_desirable_delta"):
            out[key] = value / n_d if n_d else float("nan")
        elif key.endswith("_undesirable") or key.endswith("_undesirable_delta"):
            out[key] = value / n_u if n_u else float("nan")
        elif key not in ("n", "desirable", "undesirable", "losses"):
            out[key] = value / n
    out["reward_margin"] = out.get("reward_desirable", 0.0) - out.get("reward_undesirable", 0.0)
    return out


def _add(sums: dict[str, float], stats: dict[str, torch.Tensor]) -> None:
    for key, value in stats.items():
        sums[key] = sums.get(key, 0.0) + float(value.detach().sum())


@torch.no_grad()
def evaluate_examples(
    policy: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[UnpairedExample],
    partner: Sequence[int],
    config: KTOConfig,
    ref: RowLogps | None,
    reference: Reference | None,
    device: torch.device,
) -> dict[str, float]:
    """Mean figures over ``examples``; ``ref`` rows in ``example_rows`` order. z0 is estimated
    over the whole set first, so the figures do not depend on the batch size."""
    n, size = len(examples), 2 * config.batch_size
    spans = [list(range(start, min(start + size, n))) for start in range(0, n, size)]
    policy_mis, ref_mis = [], []
    for idx in spans:
        p, r = mismatched_logratios(
            policy,
            tokenizer,
            [(examples[i].prompt, examples[partner[i]].completion) for i in idx],
            config,
            None if ref is None else ref.summed[[n + i for i in idx]],
            reference,
            device,
        )
        policy_mis.append(p)
        ref_mis.append(r)
    z0 = kto_kl_estimate(torch.cat(policy_mis), torch.cat(ref_mis))
    sums: dict[str, float] = {"n": float(n)}
    for idx in spans:
        chunk = [examples[i] for i in idx]
        chunk_ref = None if ref is None else ref.take(idx)
        stats = kto_forward(policy, tokenizer, chunk, z0, config, chunk_ref, reference, device)
        weight = torch.tensor([e.weight for e in chunk], device=device)
        stats["loss"] = stats["losses"] * weight.to(stats["losses"])
        _add(sums, stats)
    return _summarise(sums)


def train_kto(
    config: KTOConfig,
    examples: Sequence[UnpairedExample],
    policy: nn.Module,
    reference: nn.Module | None,
    tokenizer: PreTrainedTokenizerBase,
    *,
    eval_examples: Sequence[UnpairedExample] | None = None,
    runtime: Runtime | None = None,
) -> dict[str, float]:
    """Train ``policy`` in place; same contract as ``training.core.dpo.train_dpo``."""
    runtime = runtime or setup_runtime(config)
    device, out_dir = runtime.device, Path(config.output_dir)
    if not examples:
        raise ValueError("no training examples")
    eval_split = "eval" if eval_examples else "train"
    eval_examples = list(eval_examples) if eval_examples else list(examples)
    check_balance(examples, config)
    partner = kl_partners(len(examples), config.seed)
    eval_partner = kl_partners(len(eval_examples), config.seed + 1)

    disable_dropout(policy)
    policy.to(device)
    if reference is None and not hasattr(policy, "disable_adapter"):
        raise ValueError("KTO needs a reference model unless the policy has LoRA adapters")
    ref_source = Reference(reference, policy)
    ref_source.to(device)
    train_ref = eval_ref = None
    live_ref: Reference | None = ref_source
    if config.precompute_reference:
        rows = example_rows(examples, partner) + example_rows(eval_examples, eval_partner)
        cache = cached_reference_logps(ref_source, rows, tokenizer, config=config, runtime=runtime)
        n = 2 * len(examples)
        train_ref, eval_ref = cache.take(range(n)), cache.take(range(n, len(rows)))
        live_ref = None
        ref_source.to("cpu")  # not needed again until the final KL estimate

    if config.gradient_checkpointing:
        policy.gradient_checkpointing_enable(  # type: ignore[operator]
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    sampler = StepSampler(
        len(examples), batch_size=config.batch_size, world_size=runtime.world_size, seed=config.seed
    )
    total = total_steps(config, sampler)
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    optimizer, scheduler = make_optimizer_and_scheduler(policy.parameters(), config, total)
    start, _ = maybe_resume(config, runtime, model=policy, optimizer=optimizer, scheduler=scheduler)
    model, optimizer = runtime.accelerator.prepare(policy, optimizer)
    metrics_path = out_dir / "metrics.jsonl"
    if runtime.is_main:
        write_json_atomic(out_dir / "run_config.json", run_config_dict(config, "kto"))

    last: dict[str, float] = {}
    model.train()
    with (
        MetricsWriter(metrics_path, enabled=runtime.is_main, resume_step=start or None) as writer,
        progress(total - start, "kto", enabled=runtime.is_main) as bar,
    ):
        for step in range(start, total):
            idx = sampler.indices(step, runtime.rank)
            chunks = micro_batches(idx, config.grad_accum)
            sums: dict[str, float] = {"n": float(len(idx))}
            lr = float(scheduler.get_last_lr()[0])
            for k, chunk in enumerate(chunks):
                batch = [examples[i] for i in chunk]
                mismatched = [(examples[i].prompt, examples[partner[i]].completion) for i in chunk]
                chunk_ref = ref_mis = None
                if train_ref is not None:
                    chunk_ref = train_ref.take(chunk)
                    ref_mis = train_ref.summed[[len(examples) + i for i in chunk]]
                z0 = batch_z0(
                    runtime,
                    *mismatched_logratios(
                        model, tokenizer, mismatched, config, ref_mis, live_ref, device
                    ),
                )
                sync = k == len(chunks) - 1
                with contextlib.nullcontext() if sync else runtime.accelerator.no_sync(model):
                    stats = kto_forward(
                        model, tokenizer, batch, z0, config, chunk_ref, live_ref, device
                    )
                    weight = torch.tensor([e.weight for e in batch], device=device)
                    weighted = stats["losses"] * weight.to(stats["losses"])  # (b,)
                    runtime.accelerator.backward(weighted.sum() / len(idx))
                stats["loss"] = weighted
                _add(sums, stats)
            grad_norm = clip_and_step(runtime, model, optimizer, scheduler, config.max_grad_norm)
            done = step + 1
            last = _summarise(reduce_sums(runtime, sums))
            last.update(lr=lr, grad_norm=grad_norm, epoch=sampler.epoch_of(done))
            if done % max(config.log_every, 1) == 0 or done == total:
                writer.write(done, last)
            bar.update(1, loss=last["loss"], kl=last["kl"])
            if config.eval_every > 0 and done % config.eval_every == 0 and done < total:
                if runtime.is_main:
                    figures = evaluate_examples(
                        runtime.accelerator.unwrap_model(model),
                        tokenizer,
                        eval_examples,
                        eval_partner,
                        config,
                        eval_ref,
                        live_ref,
                        device,
                    )
                    writer.write(done, {f"eval_{k}": v for k, v in figures.items()})
                runtime.barrier()
            if should_save(config, done, total):
                save_resumable(
                    config,
                    runtime,
                    command="kto",
                    model=model,
                    tokenizer=tokenizer,
                    optimizer=optimizer,
                    scheduler=scheduler,
                    step=done,
                )

    results: dict[str, float] = {}
    if runtime.is_main:
        unwrapped = runtime.accelerator.unwrap_model(model)
        unwrapped.eval()
        figures = evaluate_examples(
            unwrapped, tokenizer, eval_examples, eval_partner, config, eval_ref, live_ref, device
        )
        if config.kl_samples > 0:
            ref_source.to(device)
            figures.update(
                sampled_kl(
                    unwrapped,
                    ref_source,
                    tokenizer,
                    unique_prompts((e.prompt for e in eval_examples), config.kl_prompts),
                    samples=config.kl_samples,
                    max_new_tokens=config.kl_max_new_tokens,
                    max_prompt_length=config.max_prompt_length,
                    seed=config.seed,
                )
            )
        results = {f"eval_{k}": v for k, v in figures.items()}
        results.update({f"train_{k}": v for k, v in last.items() if k in ("loss", "kl")})
        results.update(steps=float(total), trainable_parameters=float(trainable))
        write_json_atomic(
            out_dir / "eval.json",
            {**results, "eval_split": eval_split, "num_eval_examples": len(eval_examples)},
        )
    runtime.barrier()
    return results


def run(config: KTOConfig) -> dict[str, float]:
    """``python -m training.core kto``: load, train, evaluate, export to ``output_dir``."""
    runtime = setup_runtime(config)
    tokenizer = load_tokenizer(config.model)
    base = load_causal_lm(config.model, device=runtime.device, dtype=config.dtype)
    reference = None
    if config.reference_model or not config.lora:
        reference = load_causal_lm(
            config.reference_model or config.model, device=runtime.device, dtype=config.dtype
        )
    policy: nn.Module = apply_lora(base, config, "CAUSAL_LM") if config.lora else base
    examples = read_unpaired_jsonl(config.data)
    eval_examples = read_unpaired_jsonl(config.eval_data) if config.eval_data else None
    results = train_kto(
        config, examples, policy, reference, tokenizer, eval_examples=eval_examples, runtime=runtime
    )
    if runtime.is_main:
        export_model(
            config.output_dir,
            model=runtime.accelerator.unwrap_model(policy),
            tokenizer=tokenizer,
            config=run_config_dict(config, "kto"),
        )
    runtime.barrier()
    return results


__all__ = ["KTOConfig", "kl_partners", "kto_forward", "run", "train_kto"]

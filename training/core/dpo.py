"""Direct preference optimisation and its variants, in one explicit loop.

DPO (Rafailov et al. 2023, arXiv 2305.18290) trains the policy directly on preference pairs:
the implicit reward of an answer is ``beta * log(pi(y|x) / pi_ref(y|x))`` and the loss is a
Bradley-Terry likelihood of the observed preference under that reward. The loss family
(sigmoid, IPO, cDPO, robust, SimPO, ORPO, paired KTO) lives in ``training.core.losses``;
``--loss-type`` picks one.

What this file adds around the loss:

* The reference is frozen, so its log-probs of every training and evaluation answer are
  computed ONCE, in one no-grad pass before training, and cached per answer (design section 7);
  the cache is written to ``output_dir`` so a resumed run does not need it again. With LoRA the
  reference is the policy with its adapters switched off: no second copy of the weights.
* Per-pair ``weight`` scales a pair's gradient, ``margin`` is an ODPO offset (losses that take
  one), and a ``label`` below 1 (a tie is 0.5) is a soft target for the losses that take one;
  the others train on strict preferences only (ties are dropped, reversed labels swapped).
* Metrics per step: loss, implicit-reward accuracy and margin, chosen and rejected log-probs and
  their change against the reference (likelihood displacement: DPO can lower both), and a KL
  estimate on the data's answer tokens. At the end ``eval.json`` adds a sampled KL(pi || pi_ref)
  (k1 and k3 estimators on the policy's own samples), the quantity over-optimisation is
  plotted against (Gao et al. 2022).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedTokenizerBase

from training.core.checkpoint import export_model
from training.core.config import CommonConfig, opt
from training.core.data import (
    Demonstration,
    EncodedPair,
    Messages,
    PairBatch,
    PreferencePair,
    collate_encoded_pairs,
    collate_encoded_rows,
    collate_pairs,
    collate_sft,
    encode_pairs,
    read_preference_jsonl,
)
from training.core.generation import TransformersGenerator
from training.core.losses import (
    PREFERENCE_LOSSES,
    PairLogps,
    PreferenceHyper,
    kl_k1,
    kl_k3,
    preference_loss,
)
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

log = logging.getLogger("training.core.dpo")

REFERENCE_CACHE = "reference_logps.safetensors"


@dataclass
class DPOConfig(CommonConfig):
    beta: float = opt(0.1, "Inverse temperature of the implicit reward (SimPO: 2-2.5).")
    loss_type: str = opt("sigmoid", f"Preference loss: {', '.join(PREFERENCE_LOSSES)}.")
    label_smoothing: float = opt(0.0, "cDPO / robust DPO: assumed rate of flipped labels.")
    ipo_tau: float = opt(0.1, "IPO regularisation tau: the target log-ratio gap is 1/(2 tau).")
    ipo_length_normalize: bool = opt(True, "IPO on per-token log-ratios (the authors' setup).")
    simpo_gamma: float = opt(1.0, "SimPO target reward margin gamma.")
    orpo_lambda: float = opt(0.1, "ORPO weight lambda of the odds-ratio term.")
    kto_lambda_d: float = opt(1.0, "kto_pair: weight of desirable (chosen) answers.")
    kto_lambda_u: float = opt(1.0, "kto_pair: weight of undesirable (rejected) answers.")
    margin_scale: float = opt(1.0, "Multiplier on each pair's data margin (ODPO offset); 0 off.")
    reference_model: str = opt("", "Reference policy; empty: the starting policy (--model).")
    precompute_reference: bool = opt(True, "Reference log-probs in one pass before training.")
    eval_every: int = opt(0, "Evaluate on eval_data every N steps (0: only at the end).")
    kl_prompts: int = opt(16, "Eval prompts sampled for the final KL(policy || reference).")
    kl_samples: int = opt(4, "Samples per prompt for that KL estimate; 0 skips it.")
    kl_max_new_tokens: int = opt(32, "Max tokens per sample for that KL estimate.")

    def __post_init__(self) -> None:
        if self.loss_type not in PREFERENCE_LOSSES:
            raise ValueError(f"loss_type must be one of {', '.join(PREFERENCE_LOSSES)}")

    def hyper(self) -> PreferenceHyper:
        return PreferenceHyper(
            beta=self.beta,
            label_smoothing=self.label_smoothing,
            ipo_tau=self.ipo_tau,
            ipo_length_normalize=self.ipo_length_normalize,
            simpo_gamma=self.simpo_gamma,
            orpo_lambda=self.orpo_lambda,
            kto_lambda_d=self.kto_lambda_d,
            kto_lambda_u=self.kto_lambda_u,
        )


# ---- the reference --------------------------------------------------------------------------


ReferenceLoader = Callable[[], nn.Module]


class Reference:
    """Where reference log-probs come from: a frozen model, or the LoRA policy's base weights.

    ``model`` may also be a loader (a function returning the model): the model is then loaded
    when first needed and ``release`` drops it, e.g. between the one reference pass and the
    end-of-run KL estimate, so that it does not sit in memory beside the policy, its gradients
    and the optimiser state for the whole of training.
    """

    def __init__(self, model: nn.Module | ReferenceLoader | None, policy: nn.Module) -> None:
        loader: ReferenceLoader | None = None
        if model is not None and not isinstance(model, nn.Module):
            loader, model = model, None
        if model is None and loader is None and not hasattr(policy, "disable_adapter"):
            raise ValueError("a reference model is needed unless the policy has LoRA adapters")
        self.model, self.policy, self._loader = model, policy, loader
        if model is not None:
            self._freeze(model)

    @staticmethod
    def _freeze(model: nn.Module) -> None:
        model.eval().requires_grad_(False)
        disable_dropout(model)

    def _loaded(self) -> nn.Module | None:
        if self.model is None and self._loader is not None:
            self.model = self._loader()
            self._freeze(self.model)
        return self.model

    def release(self) -> None:
        """Free a reference that came from a loader; it is loaded again if used again."""
        if self._loader is not None:
            self.model = None

    @contextlib.contextmanager
    def active(self) -> Iterator[nn.Module]:
        model = self._loaded()
        if model is not None:
            yield model
        else:
            with self.policy.disable_adapter():  # type: ignore[operator]
                yield self.policy

    def to(self, device: torch.device | str) -> None:
        if self.model is not None:
            self.model.to(device)

    @torch.no_grad()
    def digest(self) -> str:
        """A cheap fingerprint of the reference weights, so a cache written for other weights
        at the same path is not reused (the LoRA adapters, which move, are left out)."""
        loaded = self._loaded()
        model = loaded if loaded is not None else self.policy
        h = hashlib.sha256()
        for name, p in model.named_parameters():
            if "lora_" not in name:
                h.update(f"{name}:{tuple(p.shape)}:{float(p.double().sum()):.10e}".encode())
        return h.hexdigest()


@dataclass
class RowLogps:
    """Log-probs of N (prompt, answer) rows: summed (N,) and each answer's tokens (L_i,)."""

    summed: torch.Tensor  # (N,)
    tokens: list[torch.Tensor]

    def take(self, rows: Sequence[int]) -> RowLogps:
        return RowLogps(self.summed[list(rows)], [self.tokens[r] for r in rows])

    def per_token(self, completion_mask: torch.Tensor) -> torch.Tensor:
        """Scatter the cached answer tokens into a (R, T-1) grid laid out like
        ``sequence_logprobs``' output for the same rows (0 outside the answers)."""
        target = completion_mask[:, 1:].bool()  # (R, T-1)
        out = torch.zeros(target.shape, dtype=self.summed.dtype, device=completion_mask.device)
        flat = torch.cat(self.tokens).to(out.device) if self.tokens else out.new_zeros(0)
        if flat.numel() != int(target.sum()):
            raise RuntimeError("cached reference log-probs do not match the tokenised rows")
        out[target] = flat  # row-major: row 0's answer tokens, then row 1's, ...
        return out


def row_logps(
    model: nn.Module,
    rows: Sequence[tuple[Messages, str]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    config: CommonConfig,
    device: torch.device,
    batch_size: int,
    encoded: Sequence[tuple[list[int], list[int]]] | None = None,
) -> RowLogps:
    """Log-probs of ``rows`` under ``model``, no grad, tokenised exactly as training batches.

    ``encoded``: the same rows already tokenised (``EncodedPair.rows``), used instead of
    tokenising ``rows`` again.
    """
    summed: list[torch.Tensor] = []
    tokens: list[torch.Tensor] = []
    for start in range(0, len(rows), batch_size):
        if encoded is not None:
            batch = collate_encoded_rows(
                encoded[start : start + batch_size], int(tokenizer.pad_token_id)
            ).to(device)
        else:
            chunk = [Demonstration(m, c) for m, c in rows[start : start + batch_size]]
            batch = collate_sft(
                tokenizer,
                chunk,
                max_length=config.max_length,
                max_prompt_length=config.max_prompt_length,
            ).to(device)
        with torch.no_grad():
            s, per_token = sequence_logprobs(
                model, batch.input_ids, batch.attention_mask, batch.completion_mask
            )  # (b,), (b, T-1)
        target = batch.completion_mask[:, 1:].bool()
        summed.append(s.float().cpu())
        tokens.extend(per_token[i][target[i]].float().cpu() for i in range(len(target)))
    return RowLogps(torch.cat(summed) if summed else torch.zeros(0), tokens)


def pair_rows(pairs: Sequence[PreferencePair]) -> list[tuple[Messages, str]]:
    """Rows in ``collate_pairs`` order: every chosen answer, then every rejected one."""
    return [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]


def encoded_pair_rows(encoded: Sequence[EncodedPair]) -> list[tuple[list[int], list[int]]]:
    """``pair_rows`` of pairs tokenised by ``encode_pairs``."""
    return [e.rows()[0] for e in encoded] + [e.rows()[1] for e in encoded]


def cache_fingerprint(
    digest: str, config: CommonConfig, rows: Sequence[tuple[Messages, str]]
) -> str:
    h = hashlib.sha256(json.dumps([digest, config.max_length, config.max_prompt_length]).encode())
    for messages, completion in rows:
        h.update(json.dumps([messages, completion]).encode())
    return h.hexdigest()


def save_row_cache(path: Path, logps: RowLogps, fingerprint: str) -> None:
    lengths = torch.tensor([len(t) for t in logps.tokens], dtype=torch.long)
    flat = torch.cat(logps.tokens) if logps.tokens else torch.zeros(0)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(
        {"summed": logps.summed.contiguous(), "tokens": flat.contiguous(), "lengths": lengths},
        str(tmp),
        metadata={"fingerprint": fingerprint},
    )
    os.replace(tmp, path)


def load_row_cache(path: Path, fingerprint: str) -> RowLogps | None:
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        if (f.metadata() or {}).get("fingerprint") != fingerprint:
            return None
        summed, flat, lengths = (f.get_tensor(k) for k in ("summed", "tokens", "lengths"))
    return RowLogps(summed, list(torch.split(flat, lengths.tolist())))


def cached_reference_logps(
    reference: Reference,
    rows: Sequence[tuple[Messages, str]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    config: CommonConfig,
    runtime: Runtime,
    encoded: Sequence[tuple[list[int], list[int]]] | None = None,
) -> RowLogps:
    """The one reference pass of a run: read back from ``output_dir`` if a previous attempt of
    the same run wrote it, else computed (each process a slice, then gathered) and written.
    ``encoded``: ``rows`` already tokenised, to skip tokenising them again."""
    path = Path(config.output_dir) / REFERENCE_CACHE
    fingerprint = cache_fingerprint(reference.digest(), config, rows)
    cached = load_row_cache(path, fingerprint)
    if cached is not None:
        log.info("reference log-probs read from %s", path)
        return cached
    mine = list(range(runtime.rank, len(rows), runtime.world_size))
    with reference.active() as model:
        part = row_logps(
            model,
            [rows[i] for i in mine],
            tokenizer,
            config=config,
            device=runtime.device,
            batch_size=2 * config.batch_size,
            encoded=None if encoded is None else [encoded[i] for i in mine],
        )
    if runtime.world_size > 1:
        from accelerate.utils import gather_object

        gathered = gather_object([(mine, part.summed, part.tokens)])
        summed = torch.zeros(len(rows))
        tokens: list[torch.Tensor] = [torch.zeros(0)] * len(rows)
        for idx, s, toks in gathered:
            summed[idx] = s
            for i, t in zip(idx, toks, strict=True):
                tokens[i] = t
        part = RowLogps(summed, tokens)
    if runtime.is_main:
        Path(config.output_dir).mkdir(parents=True, exist_ok=True)
        save_row_cache(path, part, fingerprint)
    return part


# ---- one forward pass over a batch of pairs --------------------------------------------------


def pair_forward(
    policy: nn.Module,
    batch: PairBatch,
    config: DPOConfig,
    ref: RowLogps | None,
    reference: Reference | None = None,
) -> dict[str, torch.Tensor]:
    """Per-pair loss and diagnostics (each (B,)) for one batch; ``ref`` is the batch's cached
    reference rows (chosen then rejected), else ``reference`` is run live (no grad)."""
    b = batch.num_pairs
    summed, per_token = sequence_logprobs(
        policy, batch.input_ids, batch.attention_mask, batch.completion_mask
    )  # (2B,), (2B, T-1)
    lengths = batch.completion_mask.sum(-1).to(summed.dtype)  # (2B,)
    ref_summed = ref_tokens = None
    if ref is not None:
        ref_summed = ref.summed.to(summed)  # (2B,)
        ref_tokens = ref.per_token(batch.completion_mask).to(summed)  # (2B, T-1)
    elif reference is not None:
        with torch.no_grad(), reference.active() as model:
            ref_summed, ref_tokens = sequence_logprobs(
                model, batch.input_ids, batch.attention_mask, batch.completion_mask
            )
    spec = PREFERENCE_LOSSES[config.loss_type]
    margin = batch.margin.to(summed) * config.margin_scale
    logps = PairLogps(
        chosen=summed[:b],
        rejected=summed[b:],
        chosen_lengths=lengths[:b],
        rejected_lengths=lengths[b:],
        ref_chosen=None if ref_summed is None else ref_summed[:b],
        ref_rejected=None if ref_summed is None else ref_summed[b:],
        margin=margin if spec.uses_margin and config.margin_scale != 0 else None,
        label=batch.label.to(summed) if spec.soft_labels else None,
    )
    losses, chosen_rewards, rejected_rewards = preference_loss(
        config.loss_type, logps, config.hyper()
    )
    label = batch.label.to(summed)
    won = torch.where(
        label > 0.5, chosen_rewards > rejected_rewards, chosen_rewards < rejected_rewards
    )
    out = {
        "losses": losses,
        "reward_accuracy": won.to(summed),
        "decided": (label != 0.5).to(summed),  # ties have no right answer
        "reward_margin": chosen_rewards - rejected_rewards,
        "reward_chosen": chosen_rewards,
        "reward_rejected": rejected_rewards,
        "logp_chosen": summed[:b].detach(),
        "logp_rejected": summed[b:].detach(),
    }
    if ref_summed is not None and ref_tokens is not None:
        delta = (summed - ref_summed).detach()  # (2B,)
        out["logp_chosen_delta"], out["logp_rejected_delta"] = delta[:b], delta[b:]
        # k3 >= 0 per answer token (Schulman 2020). The tokens are the data's, not samples of
        # pi, so this tracks how far the policy moved on the training distribution; eval.json
        # has the KL on the policy's own samples.
        k3 = kl_k3(per_token.detach(), ref_tokens) * batch.completion_mask[:, 1:]  # (2B, T-1)
        kl_rows = k3.sum(-1) / batch.completion_mask[:, 1:].sum(-1).clamp(min=1)  # (2B,)
        out["kl_data"] = 0.5 * (kl_rows[:b] + kl_rows[b:])
    return out


def _summarise(sums: dict[str, float], pairs: float, decided: float) -> dict[str, float]:
    out = {}
    for key, value in sums.items():
        if key == "reward_accuracy":
            out[key] = value / decided if decided else float("nan")
        elif key not in ("decided", "losses", "pairs"):
            out[key] = value / pairs
    return out


def _add(sums: dict[str, float], stats: dict[str, torch.Tensor]) -> None:
    for key, value in stats.items():
        if key == "reward_accuracy":
            value = value * stats["decided"]
        sums[key] = sums.get(key, 0.0) + float(value.detach().sum())


# ---- evaluation --------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_pairs(
    policy: nn.Module,
    pairs: Sequence[PreferencePair],
    tokenizer: PreTrainedTokenizerBase,
    config: DPOConfig,
    ref: RowLogps | None,
    device: torch.device,
    reference: Reference | None = None,
) -> dict[str, float]:
    """Mean loss and diagnostics over ``pairs``; ``ref`` rows in ``pair_rows`` order (else
    ``reference`` is run live, else no reference figures)."""
    sums: dict[str, float] = {}
    n, step = len(pairs), 2 * config.batch_size
    for start in range(0, n, step):
        idx = list(range(start, min(start + step, n)))
        batch = collate_pairs(
            tokenizer,
            [pairs[i] for i in idx],
            max_length=config.max_length,
            max_prompt_length=config.max_prompt_length,
        ).to(device)
        batch_ref = None if ref is None else ref.take(idx + [n + i for i in idx])
        stats = pair_forward(policy, batch, config, batch_ref, reference)
        stats["loss"] = stats["losses"] * batch.weight.to(stats["losses"])
        _add(sums, stats)
    decided = sums.get("decided", 0.0)
    return _summarise(sums, float(max(n, 1)), decided)


@torch.no_grad()
def sampled_kl(
    policy: nn.Module,
    reference: Reference,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Messages],
    *,
    samples: int,
    max_new_tokens: int,
    max_prompt_length: int,
    seed: int,
) -> dict[str, float]:
    """KL(pi || pi_ref) per answer, from ``samples`` answers sampled from pi for each prompt.

    k1 (the summed log-ratio) is unbiased but noisy and can come out negative on few samples;
    k3 is unbiased too and never negative (Schulman 2020). Both are summed over each answer's
    tokens and averaged over answers.
    """
    if not prompts or samples <= 0:
        return {}
    generator = TransformersGenerator(policy, tokenizer, max_prompt_length=max_prompt_length)
    out = generator.generate(prompts, n=samples, max_new_tokens=max_new_tokens, seed=seed)
    device = next(policy.parameters()).device
    with reference.active() as model:
        _, ref_tokens = sequence_logprobs(
            model,
            out.input_ids.to(device),
            out.attention_mask.to(device),
            out.full_completion_mask.to(device),
        )  # (S, P+C-1)
    # per_token[:, t] scores token t + 1, so answer token c sits at column P + c - 1.
    ref_tokens = ref_tokens[:, out.prompt_ids.shape[1] - 1 :].cpu()  # (S, C)
    mask = out.completion_mask  # (S, C)
    return {
        "kl_k1": float((kl_k1(out.logprobs, ref_tokens) * mask).sum(-1).mean()),
        "kl_k3": float((kl_k3(out.logprobs, ref_tokens) * mask).sum(-1).mean()),
        "kl_answer_tokens": float(mask.sum(-1).float().mean()),
    }


# ---- the training loop -------------------------------------------------------------------------


def usable_pairs(pairs: Sequence[PreferencePair], loss_type: str) -> list[PreferencePair]:
    """Losses without soft labels see strict preferences, better answer first."""
    if PREFERENCE_LOSSES[loss_type].soft_labels:
        return list(pairs)
    out = []
    for p in pairs:
        if p.label == 0.5:
            continue
        if p.label < 0.5:
            p = PreferencePair(p.prompt, p.rejected, p.chosen, p.margin, p.weight, 1.0 - p.label)
        out.append(p)
    if len(out) < len(pairs):
        log.info("%s: dropped %d tied pairs", loss_type, len(pairs) - len(out))
    return out


def unique_prompts(prompts: Iterable[Messages], limit: int) -> list[Messages]:
    """The first ``limit`` distinct prompts, in order."""
    seen: dict[str, Messages] = {}
    for prompt in prompts:
        if len(seen) >= limit:
            break
        seen.setdefault(json.dumps(prompt, sort_keys=True), prompt)
    return list(seen.values())


def reduce_sums(runtime: Runtime, sums: dict[str, float]) -> dict[str, float]:
    if runtime.world_size == 1:
        return sums
    keys = list(sums)  # same insertion order on every process: same code path
    values = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=runtime.device)
    values = runtime.accelerator.reduce(values, reduction="sum")
    return dict(zip(keys, values.tolist(), strict=True))


def train_dpo(
    config: DPOConfig,
    pairs: Sequence[PreferencePair],
    policy: nn.Module,
    reference: nn.Module | ReferenceLoader | None,
    tokenizer: PreTrainedTokenizerBase,
    *,
    eval_pairs: Sequence[PreferencePair] | None = None,
    runtime: Runtime | None = None,
) -> dict[str, float]:
    """Train ``policy`` in place on ``pairs``; returns the final evaluation figures.

    ``reference`` may be a function that loads the reference model: it is then loaded for
    the reference pass, freed for training, and loaded again for the final KL estimate.

    ``reference`` is the frozen reference policy; None with a LoRA policy means the policy
    with its adapters off. Writes ``metrics.jsonl``, ``eval.json``, the reference cache and
    resumable checkpoints to ``config.output_dir``; the final model is exported by ``run``.
    Without ``eval_pairs`` the end-of-run figures are computed on the training pairs.
    """
    runtime = runtime or setup_runtime(config)
    device, spec = runtime.device, PREFERENCE_LOSSES[config.loss_type]
    out_dir = Path(config.output_dir)
    pairs = usable_pairs(pairs, config.loss_type)
    eval_split = "eval" if eval_pairs else "train"
    eval_pairs = usable_pairs(eval_pairs, config.loss_type) if eval_pairs else pairs
    if not pairs:
        raise ValueError("no usable training pairs")

    disable_dropout(policy)
    policy.to(device)
    has_lora = hasattr(policy, "disable_adapter")
    ref_source = Reference(reference, policy) if reference is not None or has_lora else None
    if spec.needs_reference and ref_source is None:
        raise ValueError(f"loss {config.loss_type!r} needs a reference model")

    train_ref = eval_ref = None
    live_ref = ref_source if spec.needs_reference and not config.precompute_reference else None
    if ref_source is not None:
        ref_source.to(device)
    # Every pair is tokenised once, here, for the reference pass and all steps (TRL tokenises
    # its dataset up front too); the steps only pad and stack ids.
    lengths = {"max_length": config.max_length, "max_prompt_length": config.max_prompt_length}
    encoded = encode_pairs(tokenizer, pairs, **lengths)
    pad_id = int(tokenizer.pad_token_id)
    if spec.needs_reference and ref_source is not None and config.precompute_reference:
        # Without eval data the end-of-run figures are on the training pairs themselves: one
        # reference pass serves both instead of computing the same rows twice.
        same = eval_pairs is pairs
        rows = pair_rows(pairs) + ([] if same else pair_rows(eval_pairs))
        encoded_rows = encoded_pair_rows(encoded)
        if not same:
            encoded_rows += encoded_pair_rows(encode_pairs(tokenizer, eval_pairs, **lengths))
        cache = cached_reference_logps(
            ref_source, rows, tokenizer, config=config, runtime=runtime, encoded=encoded_rows
        )
        n = 2 * len(pairs)
        train_ref = cache.take(range(n))
        eval_ref = train_ref if same else cache.take(range(n, len(rows)))
    if ref_source is not None and live_ref is None:
        # Not needed during training: a reference from a loader is freed now and loaded again
        # only for the final KL estimate (the policy, its gradients and AdamW's two moments
        # are the training peak; the reference would add one more copy of the weights).
        ref_source.release()
        # Not needed again until the final KL estimate: keep the frozen copy off the GPU.
        ref_source.to("cpu")

    if config.gradient_checkpointing:
        policy.gradient_checkpointing_enable(  # type: ignore[operator]
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    sampler = StepSampler(
        len(pairs), batch_size=config.batch_size, world_size=runtime.world_size, seed=config.seed
    )
    total = total_steps(config, sampler)
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    optimizer, scheduler = make_optimizer_and_scheduler(policy.parameters(), config, total)
    start, _ = maybe_resume(config, runtime, model=policy, optimizer=optimizer, scheduler=scheduler)
    model, optimizer = runtime.accelerator.prepare(policy, optimizer)
    metrics_path = out_dir / "metrics.jsonl"
    if runtime.is_main and start > 0:
        log.info("resuming from step %d", start)
    if runtime.is_main:
        write_json_atomic(out_dir / "run_config.json", run_config_dict(config, "dpo"))

    last: dict[str, float] = {}
    model.train()
    with (
        # On resume the writer drops lines of steps after the checkpoint: they are redone.
        MetricsWriter(metrics_path, enabled=runtime.is_main, resume_step=start or None) as writer,
        progress(total - start, "dpo", enabled=runtime.is_main) as bar,
    ):
        for step in range(start, total):
            idx = sampler.indices(step, runtime.rank)
            chunks = micro_batches(idx, config.grad_accum)
            sums: dict[str, float] = {"pairs": float(len(idx))}
            lr = float(scheduler.get_last_lr()[0])
            for k, chunk in enumerate(chunks):
                batch = collate_encoded_pairs([encoded[i] for i in chunk], pad_id).to(device)
                batch_ref = None
                if train_ref is not None:
                    batch_ref = train_ref.take(chunk + [len(pairs) + i for i in chunk])
                # Gradients are all-reduced once per optimiser step, on the last micro-batch.
                sync = k == len(chunks) - 1
                with contextlib.nullcontext() if sync else runtime.accelerator.no_sync(model):
                    stats = pair_forward(model, batch, config, batch_ref, live_ref)
                    weighted = stats["losses"] * batch.weight.to(stats["losses"])  # (b,)
                    # Sum over the step's pairs / their count: the step's gradient is the mean
                    # over its pairs however they are split into micro-batches.
                    runtime.accelerator.backward(weighted.sum() / len(idx))
                stats["loss"] = weighted
                _add(sums, stats)
            grad_norm = clip_and_step(runtime, model, optimizer, scheduler, config.max_grad_norm)
            done = step + 1
            sums = reduce_sums(runtime, sums)
            last = _summarise(sums, sums["pairs"], sums.get("decided", 0.0))
            last.update(lr=lr, grad_norm=grad_norm, epoch=sampler.epoch_of(done))
            if done % max(config.log_every, 1) == 0 or done == total:
                writer.write(done, last)
            bar.update(1, loss=last["loss"], acc=last["reward_accuracy"])
            if config.eval_every > 0 and done % config.eval_every == 0 and done < total:
                if runtime.is_main:
                    figures = evaluate_pairs(
                        runtime.accelerator.unwrap_model(model),
                        eval_pairs,
                        tokenizer,
                        config,
                        eval_ref,
                        device,
                        live_ref,
                    )
                    writer.write(done, {f"eval_{k}": v for k, v in figures.items()})
                runtime.barrier()
            if should_save(config, done, total):
                save_resumable(
                    config,
                    runtime,
                    command="dpo",
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
        figures = evaluate_pairs(
            unwrapped, eval_pairs, tokenizer, config, eval_ref, device, live_ref
        )
        if ref_source is not None and config.kl_samples > 0:
            ref_source.to(device)
            figures.update(
                sampled_kl(
                    unwrapped,
                    ref_source,
                    tokenizer,
                    unique_prompts((p.prompt for p in eval_pairs), config.kl_prompts),
                    samples=config.kl_samples,
                    max_new_tokens=config.kl_max_new_tokens,
                    max_prompt_length=config.max_prompt_length,
                    seed=config.seed,
                )
            )
        results = {f"eval_{k}": v for k, v in figures.items()}
        results.update(
            {f"train_{k}": v for k, v in last.items() if k in ("loss", "reward_accuracy")}
        )
        results.update(steps=float(total), trainable_parameters=float(trainable))
        write_json_atomic(
            out_dir / "eval.json",
            {**results, "eval_split": eval_split, "num_eval_pairs": len(eval_pairs)},
        )
    runtime.barrier()
    return results


def run(config: DPOConfig) -> dict[str, float]:
    """``python -m training.core dpo``: load, train, evaluate, export to ``output_dir``."""
    runtime = setup_runtime(config)
    spec = PREFERENCE_LOSSES[config.loss_type]
    tokenizer = load_tokenizer(config.model)
    tokenizer.padding_side = "right"
    base = load_causal_lm(config.model, device=runtime.device, dtype=config.dtype)
    reference: ReferenceLoader | None = None
    # With LoRA and no separate reference, the adapters switched off are the reference. A
    # reference-free loss loads one only for the final KL estimate. Passed as a loader, so it
    # is in memory only while used (see ``Reference``), not beside the training state.
    wants_reference = spec.needs_reference or config.kl_samples > 0
    if wants_reference and (config.reference_model or not config.lora):
        reference = functools.partial(
            load_causal_lm,
            config.reference_model or config.model,
            device=runtime.device,
            dtype=config.dtype,
        )

    policy: nn.Module = apply_lora(base, config, "CAUSAL_LM") if config.lora else base
    pairs = read_preference_jsonl(config.data)
    eval_pairs = read_preference_jsonl(config.eval_data) if config.eval_data else None
    results = train_dpo(
        config, pairs, policy, reference, tokenizer, eval_pairs=eval_pairs, runtime=runtime
    )
    if runtime.is_main:
        export_model(
            config.output_dir,
            model=runtime.accelerator.unwrap_model(policy),
            tokenizer=tokenizer,
            config=run_config_dict(config, "dpo"),
        )
    runtime.barrier()
    return results


__all__ = [
    "DPOConfig",
    "Reference",
    "RowLogps",
    "evaluate_pairs",
    "pair_forward",
    "run",
    "sampled_kl",
    "train_dpo",
]

"""Sampling completions: one interface, a transformers backend now, server backends later.

Trainers (PPO, GRPO, RLOO, online DPO) and the ``generate`` command talk to a ``Generator``
only. ``TransformersGenerator`` samples with ``model.generate`` in left-padded batches; a vLLM
or other server backend implements the same ``generate`` and a ``sync_weights`` step (push the
policy's current weights, e.g. by saving them and asking the server to reload) so a trainer can
swap backends without changing its loop.

Log-probs returned with the samples are of the *sampling temperature*: the logits are divided
by ``temperature`` before the softmax (checklist item 10), and they are taken before top-p /
top-k filtering, i.e. exactly what ``modeling.sequence_logprobs(..., temperature=t)`` recomputes
from the same tokens. Position ids are left to ``generate`` (checklist item 3: passing them
broke generation in the blog's test).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig, PreTrainedTokenizerBase

from training.core.config import CommonConfig, opt
from training.core.data import Messages, collate_prompts, pad_rows, read_prompt_jsonl
from training.core.modeling import load_causal_lm, load_tokenizer, selective_log_softmax
from training.core.runner import setup_runtime
from training.core.tracking import write_json_atomic


@dataclass
class GenerationOutput:
    """``N = len(prompts) * n`` samples; rows ``i * n .. i * n + n - 1`` answer prompt ``i``."""

    prompt_ids: torch.Tensor  # (N, P) left-padded
    prompt_mask: torch.Tensor  # (N, P)
    completion_ids: torch.Tensor  # (N, C) right-padded; EOS included when it was sampled
    completion_mask: torch.Tensor  # (N, C) 1 on sampled tokens up to and including EOS
    logprobs: torch.Tensor  # (N, C) temperature-scaled log-probs of the sampled tokens; 0 on pad
    texts: list[str]  # completions decoded without special tokens
    ended_with_eos: torch.Tensor  # (N,) bool: False means cut off at max_new_tokens
    prompt_index: list[int]  # (N,) which prompt each row answers

    @property
    def input_ids(self) -> torch.Tensor:
        """Prompt + completion (N, P + C), for re-scoring with ``sequence_logprobs``."""
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)

    @property
    def full_completion_mask(self) -> torch.Tensor:
        """Completion mask aligned with ``input_ids`` (N, P + C)."""
        return torch.cat([torch.zeros_like(self.prompt_mask), self.completion_mask], dim=1)


class Generator(ABC):
    """What a trainer needs from a sampler. Implementations must be deterministic given seed."""

    @abstractmethod
    def generate(
        self,
        prompts: Sequence[Messages],
        *,
        n: int = 1,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
    ) -> GenerationOutput: ...

    def sync_weights(self, model: nn.Module) -> None:  # noqa: B027 (optional hook)
        """Make the backend sample from ``model``'s current weights (no-op in process)."""


def _pad_cat(parts: Sequence[torch.Tensor], value: float, *, left: bool) -> torch.Tensor:
    width = max(p.shape[1] for p in parts)
    padded = [
        F.pad(p, (width - p.shape[1], 0) if left else (0, width - p.shape[1]), value=value)
        for p in parts
    ]
    return torch.cat(padded)


class TransformersGenerator(Generator):
    """Batched sampling with ``model.generate``: left padding, chat templates, EOS handling.

    ``stop_at_eos=False`` samples fixed-length completions that ignore EOS (checklist item 4,
    the original OpenAI setting); the default stops at EOS like later work.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_prompt_length: int = 256,
        batch_size: int = 16,
        stop_at_eos: bool = True,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_prompt_length = max_prompt_length
        self.batch_size = batch_size
        self.stop_at_eos = stop_at_eos

    def sync_weights(self, model: nn.Module) -> None:
        self.model = model

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[Messages],
        *,
        n: int = 1,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
    ) -> GenerationOutput:
        device = next(self.model.parameters()).device
        eos, pad = int(self.tokenizer.eos_token_id), int(self.tokenizer.pad_token_id)
        sample = temperature > 0
        gen_config = GenerationConfig(
            do_sample=sample,
            temperature=temperature if sample else None,
            top_p=top_p if sample else None,
            top_k=top_k if sample else None,
            max_new_tokens=max_new_tokens,
            # Greedy decoding refuses several return sequences; each prompt is then repeated
            # n times instead (the n answers are the same, as greedy answers are).
            num_return_sequences=n if sample else 1,
            eos_token_id=eos if self.stop_at_eos else None,
            pad_token_id=pad,
            bos_token_id=self.tokenizer.bos_token_id,
            return_dict_in_generate=True,
            output_logits=True,
            use_cache=True,
        )
        was_training = self.model.training
        self.model.eval()
        # generate() fills every unset option from the model's own generation_config (a hub
        # model's may carry a repetition penalty or an EOS we were told to ignore), so a
        # neutral one stands in for it during the call.
        model_defaults = getattr(self.model, "generation_config", None)
        self.model.generation_config = GenerationConfig(  # type: ignore[assignment]
            pad_token_id=pad,
            bos_token_id=self.tokenizer.bos_token_id,
            eos_token_id=eos if self.stop_at_eos else None,
        )
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("pi", "pm", "ci", "lp")}
        devices = [device] if device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                if seed is not None:
                    torch.manual_seed(seed)
                for start in range(0, len(prompts), self.batch_size):
                    chunk = list(prompts[start : start + self.batch_size])
                    prompt_ids, prompt_mask = collate_prompts(
                        self.tokenizer, chunk, self.max_prompt_length
                    )
                    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
                    if not sample and n > 1:
                        prompt_ids = prompt_ids.repeat_interleave(n, dim=0)
                        prompt_mask = prompt_mask.repeat_interleave(n, dim=0)
                    out: Any = self.model.generate(  # type: ignore[operator]
                        input_ids=prompt_ids,
                        attention_mask=prompt_mask,
                        generation_config=gen_config,
                    )
                    completion = out.sequences[:, prompt_ids.shape[1] :]  # (b*n, C)
                    scale = temperature if sample else 1.0
                    logits = torch.stack(out.logits, dim=1) / scale  # (b*n, C, V)
                    repeat = n if sample else 1  # greedy rows are already repeated
                    parts["pi"].append(prompt_ids.repeat_interleave(repeat, dim=0).cpu())
                    parts["pm"].append(prompt_mask.repeat_interleave(repeat, dim=0).cpu())
                    parts["ci"].append(completion.cpu())
                    parts["lp"].append(selective_log_softmax(logits, completion).cpu())
        finally:
            self.model.train(was_training)
            self.model.generation_config = model_defaults  # type: ignore[assignment]

        completion_ids = _pad_cat(parts["ci"], pad, left=False)  # (N, C)
        # Everything after the first EOS is padding, whatever generate put there.
        is_eos = completion_ids == eos if self.stop_at_eos else torch.zeros_like(completion_ids)
        after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0  # (N, C)
        width = torch.cat([torch.full((p.shape[0],), p.shape[1]) for p in parts["ci"]])
        in_range = torch.arange(completion_ids.shape[1])[None, :] < width[:, None]
        completion_mask = (in_range & ~after_eos).long()
        completion_ids = completion_ids.masked_fill(completion_mask == 0, pad)
        logprobs = _pad_cat(parts["lp"], 0.0, left=False) * completion_mask
        ended = (is_eos.bool() & completion_mask.bool()).any(-1)
        texts = self.tokenizer.batch_decode(
            [
                row[m.bool()].tolist()
                for row, m in zip(completion_ids, completion_mask, strict=True)
            ],
            skip_special_tokens=True,
        )
        return GenerationOutput(
            prompt_ids=_pad_cat(parts["pi"], pad, left=True),
            prompt_mask=_pad_cat(parts["pm"], 0, left=True),
            completion_ids=completion_ids,
            completion_mask=completion_mask,
            logprobs=logprobs,
            texts=texts,
            ended_with_eos=ended,
            prompt_index=[i for i in range(len(prompts)) for _ in range(n)],
        )


def tokens_to_rows(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    return [row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)]


def repad(rows: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token rows, e.g. prompt + completion rows re-joined without inner padding."""
    return pad_rows(rows, pad_id)


# ---- the ``generate`` command --------------------------------------------------------------


@dataclass
class GenerateConfig(CommonConfig):
    num_samples: int = opt(2, "Completions per prompt.")
    max_new_tokens: int = opt(64, "Most tokens per completion.")
    temperature: float = opt(1.0, "Sampling temperature; 0 for greedy decoding.")
    top_p: float = opt(1.0, "Nucleus sampling mass; 1 disables it.")
    top_k: int = opt(0, "Sample among the k likeliest tokens; 0 disables it.")
    stop_at_eos: bool = opt(True, "Stop each completion at EOS (off: fixed-length samples).")
    source: str = opt("", "Source name recorded with each completion (default: the model path).")
    output_file: str = opt("", "JSONL to write (default: output_dir/completions.jsonl).")


def run(config: GenerateConfig) -> dict[str, float]:
    """Write ``{"prompt": [...messages], "completions": [{"text", "source"}]}`` lines: the
    annotation app's import format."""
    from accelerate.utils import gather_object

    items = read_prompt_jsonl(config.data)
    rt = setup_runtime(config)
    model = load_causal_lm(config.model, device=rt.device, dtype=config.dtype)
    tokenizer = load_tokenizer(config.model)
    generator = TransformersGenerator(
        model,
        tokenizer,
        max_prompt_length=config.max_prompt_length,
        batch_size=config.batch_size,
        stop_at_eos=config.stop_at_eos,
    )
    # Each process answers every world_size-th prompt; rank 0 writes them back in order.
    mine = list(range(rt.rank, len(items), rt.world_size))
    out = generator.generate(
        [items[i].prompt for i in mine],
        n=config.num_samples,
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        top_p=config.top_p,
        top_k=config.top_k,
        seed=config.seed + rt.rank * 100003,
    )
    rows = [
        (mine[j], out.texts[j * config.num_samples : (j + 1) * config.num_samples])
        for j in range(len(mine))
    ]
    lengths = out.completion_mask.sum(-1).float()
    stats = [(float(lengths.sum()), float(out.ended_with_eos.float().sum()), len(out.texts))]
    if rt.world_size > 1:
        rows, stats = gather_object(rows), gather_object(stats)
    source = config.source or str(config.model)
    total = sum(s[2] for s in stats)
    metrics = {
        "prompts": float(len(items)),
        "completions": float(total),
        "mean_length": sum(s[0] for s in stats) / max(total, 1),
        "eos_fraction": sum(s[1] for s in stats) / max(total, 1),
    }
    if rt.is_main:
        path = Path(config.output_file or Path(config.output_dir) / "completions.jsonl")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for index, texts in sorted(rows, key=lambda r: r[0]):
                line = {
                    "prompt": items[index].prompt,
                    "completions": [{"text": t, "source": source} for t in texts],
                }
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
        tmp.replace(path)
        write_json_atomic(Path(config.output_dir) / "eval.json", metrics)
    rt.barrier()
    return metrics

"""Configuration shared by every trainer.

Each algorithm module defines its own frozen-free dataclass that inherits ``CommonConfig`` and
adds its hyper-parameters. Every field carries ``metadata={"help": ...}``: the command line
builds its flags and ``--help`` text from these dataclasses, and ``--config file.json`` fills
the same fields from a file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeVar, cast

T = TypeVar("T")


def opt(default: T, help: str) -> T:
    """A dataclass field with a default and the help text the CLI shows."""
    return cast(T, field(default=default, metadata={"help": help}))


@dataclass
class CommonConfig:
    model: str = opt("", "Hugging Face model name, local folder, or .gguf file to start from.")
    data: str = opt("", "Training data, JSONL in the annotation app's export format.")
    eval_data: str = opt("", "Optional held-out JSONL for evaluation figures.")
    output_dir: str = opt("runs/out", "Folder for the checkpoint, metrics.jsonl and eval.json.")
    seed: int = opt(0, "Random seed (each process adds rank * 100003).")
    device: str = opt("auto", "cpu, cuda, cuda:N or auto.")
    dtype: str = opt("float32", "Parameter dtype: float32, bfloat16 or float16.")
    max_steps: int = opt(100, "Optimiser steps; -1 means run num_epochs over the data.")
    num_epochs: int = opt(1, "Epochs over the data when max_steps is -1.")
    batch_size: int = opt(8, "Examples (pairs, prompts, ...) per optimiser step per process.")
    grad_accum: int = opt(1, "Micro-batches accumulated into one optimiser step.")
    learning_rate: float = opt(1e-5, "Peak learning rate.")
    lr_schedule: str = opt("linear", "linear (anneal to zero), cosine or constant.")
    warmup_steps: int = opt(0, "Linear warm-up steps.")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    max_grad_norm: float = opt(1.0, "Gradient clipping norm; 0 disables.")
    max_length: int = opt(512, "Max tokens of prompt + completion (longer is truncated).")
    max_prompt_length: int = opt(256, "Max prompt tokens (kept from the end).")
    lora: bool = opt(False, "Train LoRA adapters instead of all weights.")
    lora_r: int = opt(8, "LoRA rank.")
    lora_alpha: int = opt(16, "LoRA alpha.")
    lora_dropout: float = opt(0.0, "LoRA dropout.")
    lora_target_modules: str = opt("all-linear", "Comma-separated module names or all-linear.")
    lora_top_layers: int = opt(
        0,
        "Adapters in the top N transformer layers only (0: every layer). Backward then stops "
        "below them: on a CPU a step costs a fraction.",
    )
    save_every: int = opt(0, "Write a resumable checkpoint every N steps (0: only at the end).")
    resume: bool = opt(True, "Resume from output_dir/checkpoint if one exists.")
    log_every: int = opt(1, "Append a metrics line every N steps.")
    gradient_checkpointing: bool = opt(False, "Trade compute for memory.")

"""The few things every trainer needs besides its loss: processes, batches, optimiser, resume.

The same trainer runs in one CPU process, on one GPU, or under ``accelerate launch`` /
``torchrun`` with several processes (gloo on CPU). ``setup_runtime`` builds the
``Accelerator``; the trainer wraps its model and optimiser with ``runtime.accelerator.prepare``
and keeps its own explicit loop. Only rank 0 writes files.

Batches come from ``StepSampler``: the batch of step ``s`` is a pure function of
``(seed, s)``, so a resumed run sees exactly the batches an uninterrupted run would have seen,
and the only "data cursor" a checkpoint needs is the step number.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import nn

from training.core.checkpoint import (
    checkpoint_dir,
    find_resumable,
    load_checkpoint,
    prune_checkpoints,
    rng_state,
    save_checkpoint,
)
from training.core.config import CommonConfig
from training.core.modeling import resolve_device, set_seed
from training.core.tracking import PAUSE_FILE, StopRequested


@dataclass
class Runtime:
    accelerator: Accelerator
    device: torch.device
    rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()


def setup_runtime(config: CommonConfig) -> Runtime:
    """One ``Accelerator`` per run; seeds this process with ``seed + rank * 100003``."""
    wanted = resolve_device(config.device)
    accelerator = Accelerator(cpu=wanted.type == "cpu", mixed_precision="no")
    # In one process, honour an explicit device such as cuda:1; several processes get theirs
    # from the launcher.
    device = accelerator.device if accelerator.num_processes > 1 else wanted
    runtime = Runtime(accelerator, device, accelerator.process_index, accelerator.num_processes)
    set_seed(config.seed, runtime.rank)
    return runtime


class StepSampler:
    """Indices of the examples of optimiser step ``s``, for rank ``r`` of ``world`` processes.

    The data is walked in epochs, each a fresh permutation drawn from ``(seed, epoch)``; epochs
    are concatenated so a step may straddle two of them and no example is dropped. The global
    batch of a step is ``batch_size * world_size`` consecutive indices; rank ``r`` takes the
    ``r``-th slice.
    """

    def __init__(self, num_examples: int, *, batch_size: int, world_size: int, seed: int) -> None:
        if num_examples <= 0:
            raise ValueError("no training examples")
        self.n, self.batch_size, self.world_size, self.seed = (
            num_examples,
            batch_size,
            world_size,
            seed,
        )
        self._perms: dict[int, list[int]] = {}

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def steps_for_epochs(self, epochs: int) -> int:
        return max(1, math.ceil(epochs * self.n / self.global_batch))

    def epoch_of(self, step: int) -> float:
        return step * self.global_batch / self.n

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=g).tolist()}
        return self._perms[epoch]

    def indices(self, step: int, rank: int) -> list[int]:
        start = step * self.global_batch + rank * self.batch_size
        out = []
        for pos in range(start, start + self.batch_size):
            out.append(self._perm(pos // self.n)[pos % self.n])
        return out


def total_steps(config: CommonConfig, sampler: StepSampler) -> int:
    return config.max_steps if config.max_steps > 0 else sampler.steps_for_epochs(config.num_epochs)


def micro_batches(items: list[Any], grad_accum: int) -> list[list[Any]]:
    """Split one step's examples into ``grad_accum`` nearly equal, non-empty chunks."""
    k = max(1, min(grad_accum, len(items)))
    size = math.ceil(len(items) / k)
    return [items[i : i + size] for i in range(0, len(items), size)]


def lr_lambda(schedule: str, warmup_steps: int, total: int) -> Any:
    """Multiplier of the peak learning rate at each step.

    ``linear`` anneals to zero at the last step (checklist item 5: RM and policy both anneal).
    """
    if schedule not in ("linear", "cosine", "constant"):
        raise ValueError(f"lr_schedule must be linear, cosine or constant, got {schedule!r}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total - warmup_steps))
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def make_optimizer_and_scheduler(
    params: Any, config: CommonConfig, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (no decay on biases and norms) and a warm-up + linear/cosine/constant schedule."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    try:
        # One fused kernel per step instead of ~10 tensor ops per parameter: on CPU the
        # default (single-tensor) AdamW costs ~1 s per step for a 135M model. transformers'
        # Trainer (and so TRL) defaults to the fused AdamW too; same update up to rounding.
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(
            groups, lr=config.learning_rate, betas=(0.9, 0.999), fused=True
        )
    except (RuntimeError, ValueError):  # a device or dtype without the fused kernel
        optimizer = torch.optim.AdamW(
            groups, lr=config.learning_rate, betas=(0.9, 0.999), foreach=True
        )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(config.lr_schedule, config.warmup_steps, total_steps)
    )
    return optimizer, scheduler


def clip_and_step(
    runtime: Runtime,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    max_grad_norm: float,
) -> float:
    """Clip, step, zero; returns the gradient norm before clipping (0 when clipping is off)."""
    grad_norm = 0.0
    if max_grad_norm > 0:
        grad_norm = float(runtime.accelerator.clip_grad_norm_(model.parameters(), max_grad_norm))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def run_config_dict(config: CommonConfig, command: str) -> dict[str, Any]:
    return {"command": command, **asdict(config)}


def maybe_resume(
    config: CommonConfig,
    runtime: Runtime,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
) -> tuple[int, dict[str, Any]]:
    """Load the newest checkpoint of ``config.output_dir`` when ``config.resume`` is on.

    Call before ``accelerator.prepare``. Returns ``(start_step, extra)``; ``(0, {})`` for a
    fresh run.
    """
    folder = find_resumable(config.output_dir) if config.resume else None
    if folder is None:
        return 0, {}
    state = load_checkpoint(
        folder, model=model, optimizer=optimizer, scheduler=scheduler, rank=runtime.rank
    )
    return state["step"], state["extra"]


def save_resumable(
    config: CommonConfig,
    runtime: Runtime,
    *,
    command: str,
    model: nn.Module,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    step: int,
    extra: dict[str, Any] | None = None,
) -> Path | None:
    """Collective: every rank calls it; rank 0 writes ``checkpoints/step-N`` and prunes."""
    states = gather_object([rng_state()]) if runtime.world_size > 1 else [rng_state()]
    folder = None
    if runtime.is_main:
        folder = save_checkpoint(
            checkpoint_dir(config.output_dir, step),
            model=runtime.accelerator.unwrap_model(model),
            tokenizer=tokenizer,
            optimizer=optimizer,
            scheduler=scheduler,
            step=step,
            extra=extra,
            config=run_config_dict(config, command),
            rng_states=states,
        )
        prune_checkpoints(config.output_dir, keep=1)
    runtime.barrier()
    if step == pause_step(config):
        raise StopRequested(f"paused after step {step}; the checkpoint is saved")
    return folder


# ``PAUSE_FILE`` in the output folder, holding a step number S, asks the trainer to save
# a checkpoint after step S and stop (``StopRequested``): how a worker near its time limit
# pauses a run so the next attempt resumes exactly there. Every process acts at the same step
# S (not "as soon as it sees the file"), so the collective save never waits for a rank that
# has not seen it yet; a step already passed simply never comes, and nothing happens.
def pause_step(config: CommonConfig) -> int | None:
    try:
        return int((Path(config.output_dir) / PAUSE_FILE).read_text().strip())
    except (OSError, ValueError):
        return None


def should_save(config: CommonConfig, step: int, total: int) -> bool:
    """After optimiser step ``step`` (1-based count of steps done)."""
    if step < total and step == pause_step(config):
        return True
    return config.save_every > 0 and step % config.save_every == 0 and step < total

"""Checkpoints that survive a kill at any moment, and loading them back safely.

Layout of a run's ``output_dir``::

    output_dir/
      config.json  model.safetensors  tokenizer files   the final model (export_model)
      run_config.json  metrics.jsonl  eval.json
      checkpoints/step-00000040/                         resumable state (save_checkpoint)
        config.json  model.safetensors (or adapter_model.safetensors)  tokenizer files
        run_config.json  trainer_state.pt

A checkpoint folder is written under a temporary name and renamed into place with
``os.replace``, so a folder named ``step-N`` is always complete: a process killed mid-write
leaves only a ``.tmp`` folder, which is ignored and cleaned, and the previous checkpoint stays
the one ``find_resumable`` returns. ``trainer_state.pt`` holds only tensors and plain Python
values and is read with ``torch.load(weights_only=True)``: a checkpoint cannot run code.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from training.core.tracking import write_json_atomic

STATE_FILE = "trainer_state.pt"
RUN_CONFIG_FILE = "run_config.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def rng_state() -> dict[str, Any]:
    """The RNG streams of this process, as values ``weights_only`` loading accepts."""
    np_state: Any = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [
            str(np_state[0]),
            torch.from_numpy(np.asarray(np_state[1]).astype(np.int64)),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config")


def _save_weights(folder: Path, model: nn.Module, tokenizer: Any) -> None:
    # save_pretrained writes safetensors by default; on a peft model it writes the adapter only.
    model.save_pretrained(folder)  # type: ignore[operator]
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def save_checkpoint(
    dir: str | Path,
    *,
    model: nn.Module,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    step: int,
    extra: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
    rng_states: list[dict[str, Any]] | None = None,
) -> Path:
    """Write a complete checkpoint to ``dir`` atomically and return ``dir``.

    ``model`` must be unwrapped (no DDP). ``extra`` carries the data cursor and anything the
    trainer needs to continue (plain values and tensors only). ``rng_states`` is one entry per
    process (rank order); by default this process's state.
    """
    final = Path(dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}.tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    _save_weights(tmp, model, tokenizer)
    write_json_atomic(tmp / RUN_CONFIG_FILE, config or {})
    state = {
        "step": step,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": rng_states if rng_states is not None else [rng_state()],
        "extra": extra or {},
    }
    torch.save(state, tmp / STATE_FILE)
    _fsync_dir(tmp)
    if final.exists():
        # rename(2) cannot replace a non-empty folder: move the old one aside first. Between the
        # two renames only ``.old`` exists; ``find_resumable`` never looks at it, but it is
        # deleted only after the new folder is in place.
        old = final.with_name(f"{final.name}.old{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)
    return final


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step-{step:08d}"


def find_resumable(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under ``output_dir/checkpoints``, or None."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return None
    best: tuple[int, Path] | None = None
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / STATE_FILE).is_file():
            step = int(match.group(1))
            if best is None or step > best[0]:
                best = (step, child)
    return best[1] if best else None


def prune_checkpoints(output_dir: str | Path, *, keep: int = 1) -> None:
    """Delete all but the newest ``keep`` checkpoints and any leftovers of killed writes."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return
    complete = sorted(
        (c for c in root.iterdir() if _STEP_DIR.match(c.name) and (c / STATE_FILE).is_file()),
        key=lambda c: c.name,
    )
    stale = [c for c in root.iterdir() if ".tmp" in c.name or ".old" in c.name]
    for folder in complete[: max(len(complete) - keep, 0)] + stale:
        shutil.rmtree(folder, ignore_errors=True)


def load_weights(folder: str | Path, model: nn.Module) -> None:
    """Load safetensors weights (full model or LoRA adapter) saved by ``save_checkpoint``."""
    folder = Path(folder)
    if _is_peft(model):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors"))
        return
    state: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(file))
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"{folder}: unexpected weights {result.unexpected_keys[:5]}")
    present = {p.data_ptr() for name, p in model.state_dict().items() if name in state}
    # save_pretrained drops tied copies (lm_head tied to the embeddings); anything else missing
    # is a real mismatch.
    missing = [k for k in result.missing_keys if model.state_dict()[k].data_ptr() not in present]
    if missing:
        raise ValueError(f"{folder}: missing weights {missing[:5]}")


def load_checkpoint(
    dir: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    rank: int = 0,
) -> dict[str, Any]:
    """Restore weights, optimiser, scheduler and this rank's RNG; return ``{"step", "extra"}``."""
    folder = Path(dir)
    load_weights(folder, model)
    state = torch.load(folder / STATE_FILE, weights_only=True, map_location="cpu")
    if optimizer is not None and state["optimizer"] is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    rng = state["rng"]
    if rng:
        set_rng_state(rng[rank] if rank < len(rng) else rng[0])
    return {"step": int(state["step"]), "extra": state["extra"]}


def export_model(
    output_dir: str | Path,
    *,
    model: nn.Module,
    tokenizer: Any,
    config: dict[str, Any] | None = None,
) -> Path:
    """Write the final model into ``output_dir`` itself (loadable with ``--model output_dir``).

    LoRA adapters are merged so the folder is a plain model. Files are written to a temp folder
    and moved in one by one, so each file is either the old or the new version.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if _is_peft(model):
        model = model.merge_and_unload()  # type: ignore[operator]
    tmp = out / f".export.tmp{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    _save_weights(tmp, model, tokenizer)
    for file in tmp.iterdir():
        os.replace(file, out / file.name)
    shutil.rmtree(tmp, ignore_errors=True)
    if config is not None:
        write_json_atomic(out / RUN_CONFIG_FILE, config)
    return out

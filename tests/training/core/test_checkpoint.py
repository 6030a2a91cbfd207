"""Checkpoints: atomic writes, safe loading, and a killed run that resumes to the same result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import training.core.checkpoint as ckpt
from training.core.checkpoint import (
    STATE_FILE,
    checkpoint_dir,
    find_resumable,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from training.core.cli import main
from training.core.config import CommonConfig
from training.core.modeling import load_causal_lm, load_tokenizer
from training.core.runner import make_optimizer_and_scheduler
from training.core.tracking import read_metrics

ROOT = Path(__file__).resolve().parents[3]


def one_step(model: Any, optimizer: Any, scheduler: Any) -> None:
    ids = torch.tensor([[5, 6, 7, 8]])
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def test_round_trip_restores_weights_optimizer_scheduler_and_rng(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    model = load_causal_lm(tiny_model_dir, device="cpu")
    tokenizer = load_tokenizer(tiny_model_dir)
    optimizer, scheduler = make_optimizer_and_scheduler(
        model.parameters(), CommonConfig(learning_rate=1e-3), 10
    )
    one_step(model, optimizer, scheduler)
    folder = save_checkpoint(
        checkpoint_dir(tmp_path, 1),
        model=model,
        tokenizer=tokenizer,
        optimizer=optimizer,
        scheduler=scheduler,
        step=1,
        extra={"cursor": 16},
        config={"seed": 0},
    )
    expected_next = torch.rand(4)

    fresh = load_causal_lm(tiny_model_dir, device="cpu")
    opt2, sched2 = make_optimizer_and_scheduler(
        fresh.parameters(), CommonConfig(learning_rate=1e-3), 10
    )
    state = load_checkpoint(folder, model=fresh, optimizer=opt2, scheduler=sched2)
    assert state == {"step": 1, "extra": {"cursor": 16}}
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert sched2.get_last_lr() == scheduler.get_last_lr()
    assert torch.equal(torch.rand(4), expected_next)  # RNG state restored
    one_step(model, optimizer, scheduler)
    one_step(fresh, opt2, sched2)
    for a, b in zip(model.parameters(), fresh.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the folder is a loadable model and the state is plain data
    assert (folder / "model.safetensors").exists()
    assert json.loads((folder / "run_config.json").read_text()) == {"seed": 0}
    torch.load(folder / STATE_FILE, weights_only=True)
    assert load_causal_lm(folder, device="cpu") is not None


def test_crash_during_write_leaves_the_previous_checkpoint(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = load_causal_lm(tiny_model_dir, device="cpu")
    tokenizer = load_tokenizer(tiny_model_dir)
    save_checkpoint(checkpoint_dir(tmp_path, 2), model=model, tokenizer=tokenizer, step=2)

    def dies(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt("killed while writing trainer_state.pt")

    monkeypatch.setattr(ckpt.torch, "save", dies)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(checkpoint_dir(tmp_path, 4), model=model, tokenizer=tokenizer, step=4)
    monkeypatch.undo()

    assert find_resumable(tmp_path) == checkpoint_dir(tmp_path, 2)
    assert not checkpoint_dir(tmp_path, 4).exists()
    assert load_checkpoint(find_resumable(tmp_path) or "", model=model)["step"] == 2
    leftovers = [p.name for p in (tmp_path / "checkpoints").iterdir()]
    assert any(".tmp" in name for name in leftovers)
    prune_checkpoints(tmp_path)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000002"]


KILLABLE = """
import sys, time
import training.core.reward as reward
real_step = reward.clip_and_step
done = 0

def step_then_hang(*args, **kwargs):
    global done
    out = real_step(*args, **kwargs)
    done += 1
    if done == 6:  # step 5 is logged, step 4 is the last checkpoint: wait to be killed
        print("HANGING", flush=True)
        time.sleep(600)
    return out

reward.clip_and_step = step_then_hang
from training.core.cli import main
sys.exit(main(sys.argv[1:]))
"""


def reward_args(data: Path, model: Path, out: Path) -> list[str]:
    return [
        "reward",
        f"--model={model}",
        f"--data={data}",
        f"--output-dir={out}",
        "--device=cpu",
        "--max-steps=10",
        "--save-every=2",
        "--batch-size=4",
        "--learning-rate=3e-3",
        "--max-length=32",
        "--eval-fraction=0.2",
    ]


def write_pairs(path: Path) -> Path:
    rows = [
        {"prompt": f"Question {i}?", "chosen": f"blue answer {i}", "rejected": f"answer {i} red"}
        for i in range(20)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_killed_run_resumes_to_the_same_model(tmp_path: Path, tiny_model_dir: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    data = write_pairs(tmp_path / "pairs.jsonl")
    killed, straight = tmp_path / "killed", tmp_path / "straight"

    child = subprocess.Popen(
        [sys.executable, "-c", KILLABLE, *reward_args(data, tiny_model_dir, killed)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "HANGING"
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert find_resumable(killed) == checkpoint_dir(killed, 4)
    assert not (killed / "eval.json").exists()
    assert [r["step"] for r in read_metrics(killed / "metrics.jsonl")] == [1, 2, 3, 4, 5]

    # Resume the killed run, and run the same command uninterrupted (in this process: only the
    # killed run needs a process of its own).
    for out in (killed, straight):
        assert main(reward_args(data, tiny_model_dir, out)) == 0
    # each step is logged once: the killed run's step-5 line is dropped on resume
    assert [r["step"] for r in read_metrics(killed / "metrics.jsonl")] == [*range(1, 11), 10]
    assert read_metrics(straight / "metrics.jsonl")[-1]["step"] == 10
    resumed, reference = (
        load_file(killed / "model.safetensors"),
        load_file(straight / "model.safetensors"),
    )
    assert resumed.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(resumed[name], reference[name], rtol=0, atol=1e-6)
    eval_killed = json.loads((killed / "eval.json").read_text())
    eval_straight = json.loads((straight / "eval.json").read_text())
    assert eval_killed["eval_accuracy"] == eval_straight["eval_accuracy"]
    assert eval_killed["reward_gain"] == pytest.approx(eval_straight["reward_gain"], rel=1e-5)


def test_pause_saves_at_exactly_the_named_step_and_only_there(tmp_path: Path) -> None:
    from training.core.config import CommonConfig
    from training.core.runner import PAUSE_FILE, pause_step, should_save

    config = CommonConfig(output_dir=str(tmp_path), save_every=0)
    assert pause_step(config) is None
    assert not should_save(config, 7, 10)
    (tmp_path / PAUSE_FILE).write_text("7")
    assert pause_step(config) == 7
    # Every process decides by the step, not by when it saw the file.
    assert [s for s in range(1, 11) if should_save(config, s, 10)] == [7]
    assert not should_save(config, 7, 7)  # the last step exports instead
    (tmp_path / PAUSE_FILE).write_text("garbage")
    assert pause_step(config) is None


def test_metrics_writer_raises_once_stop_is_requested(tmp_path: Path) -> None:
    from training.core.tracking import STOP_FILE, MetricsWriter, StopRequested

    with MetricsWriter(tmp_path / "metrics.jsonl") as writer:
        writer.write(1, {"loss": 1.0})
        (tmp_path / STOP_FILE).touch()
        with pytest.raises(StopRequested, match="step 2"):
            writer.write(2, {"loss": 0.9})
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1

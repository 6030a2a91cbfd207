"""The same reward trainer under torchrun with two CPU processes (gloo) and in one process.

Two processes with 4 pairs each see the same global batch of 8 as one process with 8 pairs
(``StepSampler`` slices one global batch per step), each divides its weighted loss by the whole
step's weight sum, and DDP averages their gradients, so the runs must agree up to float
reduction order.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training.core.cli import main
from training.core.tracking import read_metrics

ROOT = Path(__file__).resolve().parents[3]


def run_reward(launcher: list[str], data: Path, model: Path, out: Path, batch_size: int) -> None:
    args = [
        "reward",
        f"--model={model}",
        f"--data={data}",
        f"--output-dir={out}",
        "--device=cpu",
        f"--batch-size={batch_size}",
        "--max-steps=6",
        "--learning-rate=3e-3",
        "--max-length=32",
        "--eval-fraction=0.25",
    ]
    if not launcher:  # one process: run in this one, saving an interpreter start
        assert main(args) == 0
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [*launcher, "-m", "training.core", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_two_gloo_processes_match_one_process(tmp_path: Path, tiny_model_dir: Path) -> None:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun not installed next to this python")
    # Unequal weights: each rank's slice of a step weighs differently, and both ranks must
    # still divide by the whole step's weight sum to match one process.
    rows = [
        {
            "prompt": f"Question {i}?",
            "chosen": f"a blue answer {i}",
            "rejected": f"an answer {i}",
            "weight": (i % 4) * 0.5,
        }
        for i in range(40)
    ]
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    run_reward(
        [torchrun, "--standalone", "--nproc_per_node=2"], data, tiny_model_dir, tmp_path / "two", 4
    )
    run_reward([], data, tiny_model_dir, tmp_path / "one", 8)

    two, one = (
        read_metrics(tmp_path / "two" / "metrics.jsonl"),
        read_metrics(tmp_path / "one" / "metrics.jsonl"),
    )
    assert [r["step"] for r in two] == [r["step"] for r in one]
    for a, b in zip(two[:-1], one[:-1], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    w2, w1 = (
        load_file(tmp_path / "two" / "model.safetensors"),
        load_file(tmp_path / "one" / "model.safetensors"),
    )
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-4, atol=1e-5)
    e2 = json.loads((tmp_path / "two" / "eval.json").read_text())
    e1 = json.loads((tmp_path / "one" / "eval.json").read_text())
    assert e2["eval_accuracy"] == e1["eval_accuracy"]
    assert e2["eval_nll"] == pytest.approx(e1["eval_nll"], abs=1e-4)

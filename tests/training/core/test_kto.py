"""KTO on unpaired thumbs-up / thumbs-down examples of the same gold rule as test_dpo.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from torch import nn

from training.core.data import read_unpaired_jsonl, unpair
from training.core.kto import KTOConfig, kl_partners, train_kto
from training.core.modeling import apply_lora, load_causal_lm, load_tokenizer
from training.core.tracking import read_metrics

from .test_dpo import HELD_OUT, TRAIN

EXAMPLES, HELD_OUT_EXAMPLES = unpair(TRAIN), unpair(HELD_OUT)


def config(tmp_path: Path, model_dir: Path, **overrides: Any) -> KTOConfig:
    values: dict[str, Any] = {
        "model": str(model_dir),
        "output_dir": str(tmp_path / "run"),
        "max_steps": 30,
        "batch_size": 16,
        "learning_rate": 1e-3,
        "lr_schedule": "constant",
        "max_length": 64,
        "max_prompt_length": 32,
        "kl_samples": 2,
        "kl_prompts": 4,
        "kl_max_new_tokens": 8,
        "device": "cpu",
    }
    values.update(overrides)
    return KTOConfig(**values)


def test_kl_partners_are_a_derangement() -> None:
    for n in (2, 3, 10):
        partner = kl_partners(n, seed=0)
        assert sorted(partner) == list(range(n))
        assert all(partner[i] != i for i in range(n))
    assert kl_partners(1, seed=0) == [0]


def test_kto_learns_from_unpaired_labels(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Desirable answers gain implicit reward, undesirable ones lose it, on held-out prompts;
    the reference runs once over every matched and mismatched row."""
    cfg = config(tmp_path, tiny_model_dir)
    reference = load_causal_lm(tiny_model_dir)
    calls = [0]

    def hook(*_: Any) -> None:
        calls[0] += 1

    reference.register_forward_pre_hook(hook)
    result = train_kto(
        cfg,
        EXAMPLES,
        load_causal_lm(tiny_model_dir),
        reference,
        load_tokenizer(tiny_model_dir),
        eval_examples=HELD_OUT_EXAMPLES,
    )
    rows_per_pass = 2 * (len(EXAMPLES) + len(HELD_OUT_EXAMPLES))  # matched + mismatched
    reference_batches = -(-rows_per_pass // (2 * cfg.batch_size))
    kl_passes = 1  # the final sampled KL scores the samples once under the reference
    assert calls[0] == reference_batches + kl_passes

    rows = read_metrics(Path(cfg.output_dir) / "metrics.jsonl")
    assert rows[0]["loss"] == pytest.approx(0.5, abs=1e-3)  # 1 - sigma(0) for every example
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-4)
    assert rows[-1]["loss"] < 0.45
    assert rows[-1]["reward_margin"] > 0.3
    assert all(r["kl"] >= 0.0 for r in rows)
    # Rewards are judged against the reference point beta * z0, which rises as the policy
    # moves (the " Thanks!" habit also lifts the mismatched answers).
    reference_point = cfg.beta * result["eval_kl"]
    assert result["eval_reward_desirable"] > reference_point > result["eval_reward_undesirable"]
    assert result["eval_reward_accuracy"] > 0.9
    assert result["eval_logp_desirable_delta"] > 1.0
    assert 0.0 < result["eval_kl_k3"] < 5.0
    saved = json.loads((Path(cfg.output_dir) / "eval.json").read_text())
    assert saved["num_eval_examples"] == len(HELD_OUT_EXAMPLES)


@pytest.mark.filterwarnings("ignore:.*is deprecated and will be removed in v6:FutureWarning")
def test_kto_with_lora_needs_no_reference_copy(tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg = config(tmp_path, tiny_model_dir, max_steps=15, lora=True, learning_rate=5e-3)
    policy: nn.Module = apply_lora(load_causal_lm(tiny_model_dir), cfg, "CAUSAL_LM")
    result = train_kto(cfg, EXAMPLES, policy, None, load_tokenizer(tiny_model_dir))
    lora_numel = sum(p.numel() for n, p in policy.named_parameters() if "lora_" in n)
    assert result["trainable_parameters"] == lora_numel
    assert result["eval_reward_desirable"] > result["eval_reward_undesirable"]


def test_cli_kto_on_unpaired_and_preference_files(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Unpaired lines train directly; a preference file is split into both kinds."""
    unpaired = tmp_path / "unpaired.jsonl"
    unpaired.write_text(
        "".join(
            json.dumps({"prompt": e.prompt, "completion": e.completion, "label": e.desirable})
            + "\n"
            for e in EXAMPLES[:16]
        ),
        encoding="utf-8",
    )
    preferences = tmp_path / "pairs.jsonl"
    preferences.write_text(
        "".join(
            json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n"
            for p in HELD_OUT[:4]
        ),
        encoding="utf-8",
    )
    assert [e.desirable for e in read_unpaired_jsonl(preferences)] == [True, False] * 4
    out = tmp_path / "cli-run"
    command = [
        sys.executable, "-m", "training.core", "kto",
        "--model", str(tiny_model_dir),
        "--data", str(unpaired),
        "--eval-data", str(preferences),
        "--output-dir", str(out),
        "--max-steps", "3",
        "--batch-size", "4",
        "--max-length", "64",
        "--kl-samples", "1",
        "--kl-max-new-tokens", "8",
        "--device", "cpu",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    repo = Path(__file__).resolve().parents[3]
    done = subprocess.run(
        command, cwd=repo, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "model.safetensors").is_file()
    assert len(read_metrics(out / "metrics.jsonl")) == 3
    figures = json.loads((out / "eval.json").read_text())
    assert figures["num_eval_examples"] == 8
    for key in ("eval_loss", "eval_kl", "eval_reward_margin", "eval_kl_k3"):
        assert key in figures

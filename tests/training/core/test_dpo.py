"""DPO on a synthetic task with a known gold preference, on the tiny offline Llama.

Gold rule: an answer that ends with " Thanks!" is better than the same answer without it.
Prompts and answers are drawn from a small vocabulary of subjects; held-out pairs use other
combinations, so a held-out margin means the policy learned the rule, not the pairs.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from training.core.data import PreferencePair, collate_pairs
from training.core.dpo import DPOConfig, Reference, pair_forward, train_dpo, usable_pairs
from training.core.modeling import (
    apply_lora,
    build_tiny_causal_lm,
    load_causal_lm,
    load_tokenizer,
)
from training.core.tracking import read_metrics

SUBJECTS = ["the sea", "the cat", "my dog", "the sky", "a robot", "the moon", "Paris", "the fox"]
SUBJECTS += ["a bird", "the rain", "my homework", "the sun"]


def gold_pairs(n: int, seed: int) -> list[PreferencePair]:
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        subject, other = rng.choice(SUBJECTS), rng.choice(SUBJECTS)
        prompt = [{"role": "user", "content": f"Tell me about {subject}."}]
        answer = f"{subject.capitalize()} is like {other}."
        pairs.append(PreferencePair(prompt, answer + " Thanks!", answer))
    return pairs


TRAIN, HELD_OUT = gold_pairs(64, seed=0), gold_pairs(16, seed=1)


def config(tmp_path: Path, model_dir: Path, **overrides: Any) -> DPOConfig:
    values: dict[str, Any] = {
        "model": str(model_dir),
        "output_dir": str(tmp_path / "run"),
        "max_steps": 40,
        "batch_size": 8,
        "learning_rate": 1e-3,
        "lr_schedule": "constant",
        "max_length": 64,
        "max_prompt_length": 32,
        "kl_samples": 4,
        "kl_prompts": 8,
        "kl_max_new_tokens": 16,
        "device": "cpu",
    }
    values.update(overrides)
    return DPOConfig(**values)


def count_forwards(model: nn.Module) -> list[int]:
    calls = [0]

    def hook(*_: Any) -> None:
        calls[0] += 1

    model.register_forward_pre_hook(hook)
    return calls


def test_dpo_learns_the_gold_preference(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Margin and accuracy rise on held-out pairs; the chosen style gains log-prob against the
    reference; the KL to the reference grows from 0 but stays small."""
    cfg = config(tmp_path, tiny_model_dir, beta=0.1)
    policy, reference = load_causal_lm(tiny_model_dir), load_causal_lm(tiny_model_dir)
    result = train_dpo(
        cfg, TRAIN, policy, reference, load_tokenizer(tiny_model_dir), eval_pairs=HELD_OUT
    )
    rows = read_metrics(Path(cfg.output_dir) / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 41))
    first, last = rows[0], rows[-1]
    # Before the first update the policy is the reference: every implicit reward is 0.
    assert first["reward_margin"] == pytest.approx(0.0, abs=1e-4)
    assert first["loss"] == pytest.approx(0.6931, abs=1e-3)
    assert first["kl_data"] == pytest.approx(0.0, abs=1e-5)
    assert last["loss"] < 0.45
    assert last["reward_margin"] > 0.5
    assert last["reward_accuracy"] == 1.0
    assert result["eval_reward_accuracy"] == 1.0
    assert result["eval_reward_margin"] > 0.5
    # Likelihood displacement check: the preferred style gained probability, not just
    # the rejected one lost it.
    assert result["eval_logp_chosen_delta"] > 1.0
    assert result["eval_logp_chosen_delta"] > result["eval_logp_rejected_delta"]
    assert 0.0 < result["eval_kl_data"] < 2.0
    assert 0.0 < result["eval_kl_k3"] < 5.0
    saved = json.loads((Path(cfg.output_dir) / "eval.json").read_text())
    assert saved["eval_split"] == "eval"
    assert saved["eval_reward_margin"] == pytest.approx(result["eval_reward_margin"])
    for key in ("logp_chosen", "logp_rejected", "reward_chosen", "reward_rejected", "lr"):
        assert key in last


def test_kl_to_the_reference_is_larger_with_a_smaller_beta(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """beta weighs the KL constraint: a small beta lets the policy drift further."""
    tokenizer = load_tokenizer(tiny_model_dir)
    kl = {}
    for beta in (0.03, 0.5):
        cfg = config(tmp_path / str(beta), tiny_model_dir, beta=beta)
        policy, reference = load_causal_lm(tiny_model_dir), load_causal_lm(tiny_model_dir)
        kl[beta] = train_dpo(cfg, TRAIN, policy, reference, tokenizer, eval_pairs=HELD_OUT)
    assert kl[0.03]["eval_kl_k3"] > kl[0.5]["eval_kl_k3"]
    assert kl[0.03]["eval_kl_data"] > kl[0.5]["eval_kl_data"]
    assert kl[0.03]["eval_kl_k3"] < 5.0


def test_reference_log_probs_are_computed_once(tiny_model_dir: Path, tmp_path: Path) -> None:
    """One no-grad pass over every train and eval answer, none during training; a resumed run
    reads them back from output_dir. Without precomputing, one call per micro-batch."""
    tokenizer = load_tokenizer(tiny_model_dir)
    train, held_out = TRAIN[:24], HELD_OUT[:8]
    cfg = config(tmp_path, tiny_model_dir, max_steps=6, kl_samples=0, save_every=3)
    reference = load_causal_lm(tiny_model_dir)
    calls = count_forwards(reference)
    train_dpo(cfg, train, load_causal_lm(tiny_model_dir), reference, tokenizer, eval_pairs=held_out)
    rows = 2 * (len(train) + len(held_out))  # 64 answers, batches of 2 * batch_size = 16
    assert calls[0] == rows // 16

    resumed = config(tmp_path, tiny_model_dir, max_steps=8, kl_samples=0, save_every=3)
    reference = load_causal_lm(tiny_model_dir)
    calls = count_forwards(reference)
    train_dpo(
        resumed, train, load_causal_lm(tiny_model_dir), reference, tokenizer, eval_pairs=held_out
    )
    assert calls[0] == 0

    # Other reference weights in the same output_dir: the cache is not reused.
    other = load_causal_lm(build_tiny_causal_lm(tmp_path / "other", seed=1))
    calls = count_forwards(other)
    train_dpo(resumed, train, load_causal_lm(tiny_model_dir), other, tokenizer, eval_pairs=held_out)
    assert calls[0] == rows // 16

    live = config(
        tmp_path / "live", tiny_model_dir, max_steps=3, kl_samples=0, precompute_reference=False
    )
    reference = load_causal_lm(tiny_model_dir)
    calls = count_forwards(reference)
    train_dpo(
        live, train, load_causal_lm(tiny_model_dir), reference, tokenizer, eval_pairs=held_out
    )
    assert calls[0] == 3 + 1  # one per step, one for the 8 eval pairs


def test_precomputed_and_live_reference_give_the_same_run(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    tokenizer = load_tokenizer(tiny_model_dir)
    results = []
    for precompute in (True, False):
        cfg = config(
            tmp_path / str(precompute),
            tiny_model_dir,
            max_steps=5,
            kl_samples=0,
            precompute_reference=precompute,
        )
        policy, reference = load_causal_lm(tiny_model_dir), load_causal_lm(tiny_model_dir)
        train_dpo(cfg, TRAIN, policy, reference, tokenizer, eval_pairs=HELD_OUT)
        results.append(read_metrics(Path(cfg.output_dir) / "metrics.jsonl"))
    for cached, live in zip(*results, strict=True):
        assert cached["loss"] == pytest.approx(live["loss"], abs=1e-5)
        assert cached["kl_data"] == pytest.approx(live["kl_data"], abs=1e-5)


# peft asks transformers about gradient checkpointing through a deprecated name.
@pytest.mark.filterwarnings("ignore:.*is deprecated and will be removed in v6:FutureWarning")
def test_lora_trains_only_the_adapters(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The reference is the base model with adapters off: no second copy, no reference arg."""
    cfg = config(tmp_path, tiny_model_dir, max_steps=20, lora=True, lora_r=8, lora_alpha=16)
    cfg.learning_rate = 5e-3
    base = load_causal_lm(tiny_model_dir)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    policy = apply_lora(base, cfg, "CAUSAL_LM")
    result = train_dpo(
        cfg, TRAIN, policy, None, load_tokenizer(tiny_model_dir), eval_pairs=HELD_OUT
    )
    lora_numel = sum(p.numel() for n, p in policy.named_parameters() if "lora_" in n)
    assert result["trainable_parameters"] == lora_numel
    changed = {
        name
        for name, value in policy.state_dict().items()
        if "lora_" in name and not torch.equal(value, torch.zeros_like(value))
    }
    assert any("lora_B" in name for name in changed)
    with policy.disable_adapter():
        for name, value in policy.get_base_model().state_dict().items():
            key = name.replace("base_layer.", "")
            if "lora_" not in name:
                torch.testing.assert_close(value, before[key], msg=name)
    assert result["eval_reward_margin"] > 0.1
    assert result["eval_reward_accuracy"] == 1.0
    assert result["eval_kl_k3"] > 0.0


def test_resume_continues_the_same_run(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A run stopped after a checkpoint and resumed ends where an unbroken run ends."""
    tokenizer = load_tokenizer(tiny_model_dir)
    unbroken = config(tmp_path / "a", tiny_model_dir, max_steps=6, kl_samples=0)
    whole = load_causal_lm(tiny_model_dir)
    train_dpo(unbroken, TRAIN, whole, load_causal_lm(tiny_model_dir), tokenizer)

    # "Killed" after step 4: a run that saved at step 3 and did one more step.
    part = config(tmp_path / "b", tiny_model_dir, max_steps=4, save_every=3, kl_samples=0)
    train_dpo(
        part, TRAIN, load_causal_lm(tiny_model_dir), load_causal_lm(tiny_model_dir), tokenizer
    )
    rest = config(tmp_path / "b", tiny_model_dir, max_steps=6, save_every=3, kl_samples=0)
    resumed = load_causal_lm(tiny_model_dir)
    train_dpo(rest, TRAIN, resumed, load_causal_lm(tiny_model_dir), tokenizer)

    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
    rows = read_metrics(Path(rest.output_dir) / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("loss_type", ["ipo", "cdpo", "robust", "simpo", "orpo", "kto_pair"])
def test_every_registry_loss_trains(loss_type: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    overrides: dict[str, Any] = {"loss_type": loss_type, "max_steps": 15, "kl_samples": 0}
    if loss_type in ("cdpo", "robust"):
        overrides["label_smoothing"] = 0.1
    if loss_type == "simpo":
        overrides.update(beta=2.0, simpo_gamma=0.5)
    cfg = config(tmp_path, tiny_model_dir, **overrides)
    reference = None if loss_type in ("simpo", "orpo") else load_causal_lm(tiny_model_dir)
    result = train_dpo(
        cfg, TRAIN, load_causal_lm(tiny_model_dir), reference, load_tokenizer(tiny_model_dir)
    )
    rows = read_metrics(Path(cfg.output_dir) / "metrics.jsonl")
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert result["eval_reward_margin"] > rows[0]["reward_margin"]
    assert result["eval_reward_accuracy"] > 0.9


def test_data_margins_and_weights_are_honoured(tiny_model_dir: Path, tmp_path: Path) -> None:
    """At the start h = 0, so a margin m gives -log sigma(-m): log 2 = 0.6931 for m = 0 and
    log(1 + e) = 1.3133 for m = 1 (ODPO offset); IPO takes no margin. Zero weights: no update."""
    tokenizer = load_tokenizer(tiny_model_dir)
    prompt = [{"role": "user", "content": "Tell me about the sea."}]
    pairs = [
        PreferencePair(prompt, "The sea is deep. Thanks!", "The sea is deep."),
        PreferencePair(prompt, "The sea is blue. Thanks!", "The sea is blue.", margin=1.0),
    ]
    batch = collate_pairs(tokenizer, pairs, max_length=64, max_prompt_length=32)
    policy = load_causal_lm(tiny_model_dir)
    reference = Reference(load_causal_lm(tiny_model_dir), policy)
    expected = {
        ("sigmoid", 1.0): [math.log(2.0), math.log1p(math.e)],
        ("sigmoid", 0.0): [math.log(2.0), math.log(2.0)],
        ("ipo", 1.0): [(1 / (2 * 0.1)) ** 2] * 2,  # h = 0 against the target 1/(2 tau) = 5
    }
    for (loss_type, scale), values in expected.items():
        cfg = config(tmp_path, tiny_model_dir, loss_type=loss_type, margin_scale=scale)
        with torch.no_grad():
            stats = pair_forward(policy, batch, cfg, None, reference)
        torch.testing.assert_close(stats["losses"], torch.tensor(values), atol=1e-5, rtol=0)

    weightless = [PreferencePair(p.prompt, p.chosen, p.rejected, weight=0.0) for p in TRAIN[:16]]
    cfg = config(tmp_path / "w", tiny_model_dir, max_steps=3, kl_samples=0)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    train_dpo(cfg, weightless, policy, load_causal_lm(tiny_model_dir), tokenizer)
    for name, value in policy.state_dict().items():
        torch.testing.assert_close(value, before[name], atol=0, rtol=0, msg=name)
    assert read_metrics(Path(cfg.output_dir) / "metrics.jsonl")[-1]["loss"] == 0.0


def test_ties_are_soft_labels_or_dropped() -> None:
    prompt = [{"role": "user", "content": "hi"}]
    pairs = [
        PreferencePair(prompt, "a", "b"),
        PreferencePair(prompt, "c", "d", label=0.5),
        PreferencePair(prompt, "e", "f", label=0.2),
    ]
    assert usable_pairs(pairs, "sigmoid") == pairs
    strict = usable_pairs(pairs, "robust")
    assert [(p.chosen, p.rejected, p.label) for p in strict] == [("a", "b", 1.0), ("f", "e", 0.8)]


def test_unknown_loss_type_is_refused() -> None:
    with pytest.raises(ValueError, match="loss_type"):
        DPOConfig(loss_type="nope")


def write_jsonl(path: Path, pairs: list[PreferencePair]) -> None:
    lines = [
        json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) for p in pairs
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_cli_writes_model_metrics_and_eval(tiny_model_dir: Path, tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", TRAIN[:16])
    write_jsonl(tmp_path / "eval.jsonl", HELD_OUT[:4])
    out = tmp_path / "cli-run"
    command = [
        sys.executable,
        "-m",
        "training.core",
        "dpo",
        "--model", str(tiny_model_dir),
        "--data", str(tmp_path / "train.jsonl"),
        "--eval-data", str(tmp_path / "eval.jsonl"),
        "--output-dir", str(out),
        "--max-steps", "3",
        "--batch-size", "4",
        "--learning-rate", "1e-3",
        "--max-length", "64",
        "--loss-type", "sigmoid",
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
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 3
    assert (out / "model.safetensors").is_file()
    assert (out / "config.json").is_file()
    assert len(read_metrics(out / "metrics.jsonl")) == 3
    figures = json.loads((out / "eval.json").read_text())
    for key in ("eval_loss", "eval_reward_accuracy", "eval_reward_margin", "eval_kl_k3"):
        assert key in figures
    reloaded = load_causal_lm(out)
    assert sum(p.numel() for p in reloaded.parameters()) > 0

"""PPO trainer: one test per checklist option, a gold-reward task, resume and the CLI.

The gold task: the reward of a completion is the number of letters "o" in it (a Python
reward function, so the true reward is known). A random tiny Llama samples about 1.5 per 8
tokens; PPO should raise that while the KL to the reference stays finite, and a smaller KL
coefficient should buy more reward for more KL.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from training.core import losses
from training.core.data import Demonstration, PromptItem
from training.core.modeling import load_reward_model, load_tokenizer
from training.core.ppo import (
    PPOConfig,
    apply_stop_token,
    completion_logprobs,
    final_scores,
    load_ppo_models,
    minibatch_indices,
    ppo_advantages,
    rollout_seed,
    train_ppo,
)
from training.core.rewards import FunctionSource, RewardNormalizer

REPO = Path(__file__).resolve().parents[3]


def gold_reward(prompts: list[Any], completions: list[str], **kwargs: Any) -> list[float]:
    """+1 for each letter "o": the known true reward of the synthetic task."""
    return [float(c.count("o")) for c in completions]


def constant_reward(prompts: list[Any], completions: list[str], **kwargs: Any) -> list[float]:
    return [1.0] * len(completions)


def length_reward(prompts: list[Any], completions: list[str], **kwargs: Any) -> list[float]:
    return [float(len(c)) for c in completions]


PROMPTS = [PromptItem([{"role": "user", "content": f"Write about item {i}."}]) for i in range(16)]


def config(model_dir: Path, out: Path, **overrides: Any) -> PPOConfig:
    base = PPOConfig(
        model=str(model_dir),
        output_dir=str(out),
        device="cpu",
        seed=0,
        max_steps=2,
        batch_size=8,
        learning_rate=3e-3,
        lr_schedule="constant",
        max_new_tokens=8,
        max_prompt_length=32,
        num_ppo_epochs=2,
    )
    return replace(base, **overrides)


def run(model_dir: Path, out: Path, reward: Any = gold_reward, **overrides: Any) -> Any:
    return train_ppo(config(model_dir, out, **overrides), PROMPTS, reward=FunctionSource(reward))


@pytest.fixture(scope="module")
def reward_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A reward model (fresh scalar head on the tiny backbone), saved like reward training."""
    torch.manual_seed(1)
    out = tmp_path_factory.mktemp("rm")
    load_reward_model(tiny_model_dir).save_pretrained(out)
    load_tokenizer(tiny_model_dir).save_pretrained(out)
    return out


# ---- checklist 11 and 13: value model from the reward model, dropout off ----------------


def test_value_model_starts_as_a_copy_of_the_reward_model(
    tiny_model_dir, reward_model_dir, tmp_path
):
    cfg = config(tiny_model_dir, tmp_path, reward=str(reward_model_dir))
    models = load_ppo_models(cfg, torch.device("cpu"))
    reward_weights = models.reward.model.state_dict()  # type: ignore[attr-defined]
    value_weights = models.value_model.state_dict()
    assert value_weights.keys() == reward_weights.keys()
    for name, tensor in reward_weights.items():
        torch.testing.assert_close(value_weights[name], tensor, rtol=0, atol=0)
    result = train_ppo(cfg, PROMPTS, models=models)
    # The critic trains; the reward model it came from must not move.
    assert not torch.equal(result.value_model.score.weight, reward_weights["score.weight"])
    fresh = load_reward_model(reward_model_dir).state_dict()
    for name, tensor in models.reward.model.state_dict().items():  # type: ignore[attr-defined]
        torch.testing.assert_close(tensor, fresh[name], rtol=0, atol=0)
    assert (tmp_path / "value" / "config.json").is_file()


def test_value_model_without_reward_model_has_a_zero_head(tiny_model_dir, tmp_path):
    models = load_ppo_models(
        config(tiny_model_dir, tmp_path), torch.device("cpu"), FunctionSource(gold_reward)
    )
    assert models.value_model.score.weight.abs().sum() == 0


def test_dropout_is_off_in_policy_reference_value_and_reward(tiny_gpt2_dir, tmp_path):
    """GPT-2's config has dropout 0.1 everywhere; every model PPO runs must have it off."""
    rm_dir = tmp_path / "rm"
    load_reward_model(tiny_gpt2_dir).save_pretrained(rm_dir)
    load_tokenizer(tiny_gpt2_dir).save_pretrained(rm_dir)
    models = load_ppo_models(
        config(tiny_gpt2_dir, tmp_path, reward=str(rm_dir)), torch.device("cpu")
    )
    all_models = [models.policy, models.ref_policy, models.value_model, models.reward.model]  # type: ignore[attr-defined]
    dropouts = [m for model in all_models for m in model.modules() if isinstance(m, nn.Dropout)]
    assert dropouts, "GPT-2 should have dropout modules"
    assert all(d.p == 0.0 for d in dropouts)


# ---- checklist 10, 17: temperature-scaled log-probs, KL in the reward ---------------------


def test_first_update_sees_ratio_one_and_zero_kl_at_a_non_unit_temperature(
    tiny_model_dir, tmp_path
):
    """Log-probs are recomputed at the sampling temperature, so before any update the policy
    ratio is exactly 1, the KL to the (identical) reference is 0, and the generator's log-probs
    agree with the recomputed ones."""
    result = run(tiny_model_dir, tmp_path, max_steps=1, temperature=0.6, num_ppo_epochs=1)
    first = result.history[0]
    assert first["policy/ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert first["policy/approx_kl"] == pytest.approx(0.0, abs=1e-8)
    assert first["objective/kl"] == pytest.approx(0.0, abs=1e-6)
    assert first["logprob_mismatch"] < 1e-4


def test_temperature_changes_the_log_probs(tiny_llama):
    model, _ = tiny_llama
    ids = torch.randint(5, 500, (2, 10))
    att = torch.ones_like(ids)
    at_one = completion_logprobs(model, ids, att, 4, temperature=1.0)
    at_half = completion_logprobs(model, ids, att, 4, temperature=0.5)
    assert at_one.shape == (2, 6)
    assert (at_one - at_half).abs().max() > 1e-3
    logits = model(ids).logits[:, 3:-1] / 0.5
    expected = logits.log_softmax(-1).gather(-1, ids[:, 4:, None]).squeeze(-1)
    torch.testing.assert_close(at_half, expected, atol=1e-5, rtol=0)


def _rollout(gen: torch.Generator, n: int = 4, c: int = 5) -> dict[str, torch.Tensor]:
    mask = torch.ones(n, c)
    mask[0, 3:] = 0
    return {
        "scores": torch.randn(n, generator=gen),
        "logprobs": -torch.rand(n, c, generator=gen) * mask,
        "ref": -torch.rand(n, c, generator=gen) * mask,
        "values": torch.randn(n, c, generator=gen) * mask,
        "mask": mask,
    }


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_kl_penalty_in_the_reward_uses_the_chosen_estimator(tiny_model_dir, tmp_path, estimator):
    r = _rollout(torch.Generator().manual_seed(0))
    cfg = config(tiny_model_dir, tmp_path, kl_estimator=estimator, whiten_advantages=False)
    out = ppo_advantages(r["scores"], r["logprobs"], r["ref"], r["values"], r["mask"], cfg, 0.1)
    kl = losses.kl_estimate(r["logprobs"], r["ref"], estimator) * r["mask"]
    torch.testing.assert_close(out["kl"], kl)
    # Rewards are -beta * KL per token; the score sits on the last real token.
    expected = -0.1 * kl
    expected[0, 2] += r["scores"][0]
    expected[1:, 4] += r["scores"][1:]
    torch.testing.assert_close(out["rewards"], expected)
    if estimator == "k3":
        assert (out["kl"] >= 0).all()


# ---- checklist 15, 18: GAE, whitening --------------------------------------------------------


def test_gae_and_whitening_options(tiny_model_dir, tmp_path):
    r = _rollout(torch.Generator().manual_seed(1))
    args = (r["scores"], r["logprobs"], r["ref"], r["values"], r["mask"])
    raw_cfg = config(tiny_model_dir, tmp_path, whiten_advantages=False, gamma=0.9, lam=0.8)
    raw = ppo_advantages(*args, raw_cfg, 0.05)
    adv, ret = losses.gae_advantages(raw["rewards"], r["values"], r["mask"], 0.9, 0.8)
    torch.testing.assert_close(raw["advantages"], adv)
    torch.testing.assert_close(raw["returns"], ret)

    white = ppo_advantages(*args, replace(raw_cfg, whiten_advantages=True), 0.05)["advantages"]
    assert losses.masked_mean(white, r["mask"]).item() == pytest.approx(0.0, abs=1e-6)
    assert losses.masked_var(white, r["mask"]).item() == pytest.approx(1.0, abs=1e-4)
    # Returns (the critic's targets) are never whitened.
    torch.testing.assert_close(
        ppo_advantages(*args, replace(raw_cfg, whiten_advantages=True), 0.05)["returns"], ret
    )

    wr = ppo_advantages(*args, replace(raw_cfg, whiten_rewards=True), 0.05)["rewards"]
    assert losses.masked_var(wr, r["mask"]).item() == pytest.approx(1.0, abs=1e-4)
    # Whitened without the mean shift: the mean is kept.
    assert losses.masked_mean(wr, r["mask"]).item() == pytest.approx(
        losses.masked_mean(raw["rewards"], r["mask"]).item(), abs=1e-5
    )


# ---- checklist 20: fixed and adaptive KL controller -----------------------------------------


def test_fixed_kl_coefficient_never_moves(tiny_model_dir, tmp_path):
    result = run(tiny_model_dir, tmp_path, max_steps=3, kl_coef=0.07)
    assert [h["beta"] for h in result.history] == [0.07] * 3


def test_adaptive_kl_controller_follows_ziegler_update(tiny_model_dir, tmp_path):
    """beta_{t+1} = beta_t * (1 + clip(KL_t / target - 1, -.2, .2) * N / horizon), N = 8 episodes.

    Step 1 samples from the reference itself (KL 0, far below the target), so beta must fall by
    exactly 1 - .2 * 8 / 100 = .984; later steps follow the formula with the measured KL."""
    result = run(
        tiny_model_dir, tmp_path, max_steps=4, adaptive_kl=True, kl_target=0.5, kl_horizon=100
    )
    betas = [h["beta"] for h in result.history]
    assert betas[0] == 0.05
    assert betas[1] == pytest.approx(0.05 * 0.984)
    for before, after in zip(result.history, result.history[1:], strict=False):
        expected = losses.adaptive_kl_coef(before["beta"], before["objective/kl"], 0.5, 100, 8)
        assert after["beta"] == pytest.approx(expected)


# ---- checklist 14: EOS trick ----------------------------------------------------------------


def test_missing_eos_penalty_subtracts_or_replaces(tiny_model_dir, tmp_path):
    raw = torch.tensor([2.0, 2.0, float("nan")])
    ended = torch.tensor([True, False, False])
    sub = config(tiny_model_dir, tmp_path, missing_eos_penalty=1.0)
    torch.testing.assert_close(final_scores(raw, ended, sub, None), torch.tensor([2.0, 1.0, -1.0]))
    rep = replace(sub, missing_eos_mode="replace")
    torch.testing.assert_close(final_scores(raw, ended, rep, None), torch.tensor([2.0, -1.0, -1.0]))
    clipped = config(tiny_model_dir, tmp_path, reward_clip=1.5)
    torch.testing.assert_close(
        final_scores(raw, ended, clipped, None), torch.tensor([1.5, 1.5, 0.0])
    )


def test_missing_eos_penalty_in_a_run(tiny_model_dir, tmp_path):
    """Constant reward 1, penalty 1: the score is exactly the fraction that stopped."""
    result = run(
        tiny_model_dir,
        tmp_path,
        reward=constant_reward,
        max_steps=1,
        max_new_tokens=3,
        missing_eos_penalty=1.0,
    )
    first = result.history[0]
    assert first["reward/score_raw"] == 1.0
    assert first["reward/score"] == pytest.approx(first["num_eos"] / 8)


def test_stop_token_truncates_completions(tiny_model_dir, tmp_path):
    """A custom stop token: every completion ends at its first occurrence, later tokens are
    padding, and the text no longer contains what followed."""
    from training.core.generation import TransformersGenerator
    from training.core.modeling import load_causal_lm

    tokenizer = load_tokenizer(tiny_model_dir)
    generator = TransformersGenerator(load_causal_lm(tiny_model_dir), tokenizer, stop_at_eos=False)
    out = generator.generate([p.prompt for p in PROMPTS], max_new_tokens=12, seed=0)
    counts = torch.bincount(out.completion_ids[:, 1:].flatten(), minlength=len(tokenizer))
    stop = int(counts.argmax())  # a token that occurs somewhere after the first position
    cut = apply_stop_token(out, stop, tokenizer)
    for row in range(len(PROMPTS)):
        ids = cut.completion_ids[row][cut.completion_mask[row].bool()].tolist()
        if cut.ended_with_eos[row]:
            assert ids[-1] == stop
            assert stop not in ids[:-1]
        else:
            assert stop not in ids
    assert cut.ended_with_eos.any()
    assert (cut.completion_mask.sum(1) <= out.completion_mask.sum(1)).all()
    assert (cut.logprobs[cut.completion_mask == 0] == 0).all()


# ---- checklist 16: minibatches reshuffled every epoch ---------------------------------------


def test_minibatches_are_reshuffled_partitions():
    gen = torch.Generator().manual_seed(0)
    epochs = [minibatch_indices(8, 2, gen) for _ in range(3)]
    for mbs in epochs:
        assert len(mbs) == 2
        assert sorted(i for mb in mbs for i in mb) == list(range(8))
    assert epochs[0] != epochs[1] or epochs[1] != epochs[2]


def test_optimizer_takes_epochs_times_minibatches_updates_per_step(tiny_model_dir, tmp_path):
    """Linear decay over 2 steps x 2 epochs x 2 minibatches = 8 updates: after step 1 the lr
    has made 4 of them, so it is at half its peak."""
    result = run(
        tiny_model_dir, tmp_path, num_ppo_epochs=2, num_minibatches=2, lr_schedule="linear"
    )
    assert result.history[0]["lr"] == pytest.approx(3e-3 * 0.5)
    assert result.history[1]["lr"] == pytest.approx(0.0)


# ---- checklist 9: reward normalisation ------------------------------------------------------


def test_reward_normalizer_fit_and_running():
    norm = RewardNormalizer()
    norm.fit([1.0, 3.0, 5.0])  # mean 3, std sqrt(8/3)
    out = norm(torch.tensor([1.0, 3.0, 5.0]))
    assert out.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert out.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-6)
    running = RewardNormalizer()
    running.update([1.0, 3.0])
    running.update([5.0])
    assert running.bias / -running.gain == pytest.approx(3.0)
    assert 1 / running.gain == pytest.approx(math.sqrt(8 / 3), rel=1e-6)


def test_reference_normalisation_uses_samples_of_the_initial_policy(tiny_model_dir, tmp_path):
    """Before step 1, one completion per prompt is sampled from the initial policy (the
    reference) and scored; gain/bias make those scores mean 0, std 1, and every later score
    goes through the same affine map."""
    calls: list[list[float]] = []

    def recorded(prompts: list[Any], completions: list[str], **kw: Any) -> list[float]:
        calls.append(length_reward(prompts, completions))
        return calls[-1]

    result = run(tiny_model_dir, tmp_path, reward=recorded, max_steps=1, reward_norm="reference")
    fit, step = torch.tensor(calls[0]), torch.tensor(calls[1])
    assert len(fit) == len(PROMPTS)
    expected = ((step - fit.mean()) / fit.std(unbiased=False)).mean()
    assert result.history[0]["reward/score_raw"] == pytest.approx(step.mean().item())
    assert result.history[0]["reward/score"] == pytest.approx(expected.item(), abs=1e-4)


def test_running_normalisation_standardises_the_first_batch(tiny_model_dir, tmp_path):
    result = run(tiny_model_dir, tmp_path, reward=length_reward, max_steps=1, reward_norm="running")
    assert result.history[0]["reward/score_raw"] > 5
    assert result.history[0]["reward/score"] == pytest.approx(0.0, abs=1e-5)


# ---- PPO-ptx ----------------------------------------------------------------------------------


def test_ptx_loss_is_mixed_in_and_falls(tiny_model_dir, tmp_path):
    demos = [Demonstration([{"role": "user", "content": "hi"}], "the cat sat on the mat")] * 4
    cfg = config(
        tiny_model_dir, tmp_path, max_steps=6, kl_coef=0.0, ptx_coef=1.0, learning_rate=1e-2
    )
    result = train_ppo(cfg, PROMPTS, reward=FunctionSource(constant_reward), demonstrations=demos)
    ptx = [h["loss/ptx"] for h in result.history]
    assert ptx[0] > 0
    assert ptx[-1] < ptx[0] - 1.0
    no_ptx = run(tiny_model_dir, tmp_path / "plain", max_steps=1)
    assert no_ptx.history[0]["loss/ptx"] == 0.0


# ---- checklist 6: per-process seed, determinism, resume -------------------------------------


def test_rollout_seeds_differ_per_process_and_step():
    seeds = {rollout_seed(0, rank, step) for rank in range(4) for step in range(100)}
    assert len(seeds) == 400


def test_same_seed_same_run_other_seed_other_run(tiny_model_dir, tmp_path):
    a = run(tiny_model_dir, tmp_path / "a", max_steps=2).history
    b = run(tiny_model_dir, tmp_path / "b", max_steps=2).history
    c = run(tiny_model_dir, tmp_path / "c", max_steps=2, seed=1).history
    keys = ("reward/score", "objective/kl", "loss/policy", "loss/value")
    assert [[h[k] for k in keys] for h in a] == [[h[k] for k in keys] for h in b]
    assert [h["reward/score"] for h in a] != [h["reward/score"] for h in c]


def test_resume_continues_exactly_where_it_stopped(tiny_model_dir, tmp_path):
    calls = {"n": 0}

    def dies_in_step_three(prompts: list[Any], completions: list[str], **kw: Any) -> list[float]:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return gold_reward(prompts, completions)

    full = run(tiny_model_dir, tmp_path / "full", max_steps=3, adaptive_kl=True, kl_target=0.01)
    with pytest.raises(KeyboardInterrupt):
        run(
            tiny_model_dir,
            tmp_path / "cut",
            reward=dies_in_step_three,
            max_steps=3,
            save_every=1,
            adaptive_kl=True,
            kl_target=0.01,
        )
    assert (tmp_path / "cut" / "checkpoints" / "step-00000002").is_dir()
    resumed = run(tiny_model_dir, tmp_path / "cut", max_steps=3, adaptive_kl=True, kl_target=0.01)
    assert len(resumed.history) == 1
    for key in ("reward/score", "objective/kl", "beta", "loss/policy", "loss/value"):
        assert resumed.history[0][key] == pytest.approx(full.history[2][key], rel=1e-5, abs=1e-6)


# ---- LoRA: the reference is the policy with adapters off -------------------------------------


def test_lora_policy_uses_disabled_adapters_as_reference(tiny_model_dir, tmp_path):
    result = run(tiny_model_dir, tmp_path, lora=True, max_steps=2, learning_rate=1e-2)
    assert result.history[0]["objective/kl"] == pytest.approx(0.0, abs=1e-6)
    assert result.history[1]["objective/kl_k3"] > 0


# ---- the gold task ------------------------------------------------------------------------


def test_ppo_raises_gold_reward_and_kl_grows_as_the_coefficient_shrinks(tiny_model_dir, tmp_path):
    runs = {}
    for beta in (0.02, 0.2):
        result = run(
            tiny_model_dir,
            tmp_path / str(beta),
            max_steps=30,
            batch_size=16,
            kl_coef=beta,
            num_ppo_epochs=4,
        )
        h = result.history
        runs[beta] = {
            "gold_before": sum(x["reward/score_raw"] for x in h[:3]) / 3,
            "gold_after": sum(x["reward/score_raw"] for x in h[-5:]) / 5,
            "kl_after": sum(x["objective/kl_k3"] for x in h[-5:]) / 5,
        }
    print(runs)
    for beta, r in runs.items():
        assert r["gold_after"] > r["gold_before"] + 0.5, beta
        assert 0 < r["kl_after"] < 50, beta
    assert runs[0.02]["kl_after"] > runs[0.2]["kl_after"]
    assert runs[0.02]["gold_after"] > runs[0.2]["gold_after"]


# ---- command line ---------------------------------------------------------------------------


def test_cli_end_to_end(tiny_model_dir, reward_model_dir, tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p.prompt}) + "\n" for p in PROMPTS[:8]))
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        "-m",
        "training.core",
        "ppo",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(data),
        "--reward",
        f"{reward_model_dir},0.1*tests.training.core.test_ppo:gold_reward",
        "--output-dir",
        str(out),
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--max-new-tokens",
        "6",
        "--kl-estimator",
        "k3",
        "--adaptive-kl",
        "--device",
        "cpu",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = json.loads(proc.stdout.strip().splitlines()[-1])
    assert final["steps"] == 2
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2]
    for key in (
        "reward/score",
        "objective/kl_k1",
        "objective/kl_k3",
        "objective/entropy",
        "loss/policy",
        "loss/value",
        "policy/clipfrac",
        "policy/approx_kl",
        "policy/ratio_mean",
        "num_eos",
        "beta",
    ):
        assert key in lines[-1]
    assert (out / "model.safetensors").is_file()
    assert (out / "value" / "model.safetensors").is_file()
    assert json.loads((out / "eval.json").read_text())["steps"] == 2

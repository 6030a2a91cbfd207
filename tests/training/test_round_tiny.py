"""Two real rounds on a tiny model, in this process: every stage runs the real trainers and
services, so a config the trainers do not take, or an artifact a later stage cannot load,
fails here. (The end-to-end test with a real worker process is test_loop_e2e.py.)"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from annotation.models import Comparison, Completion
from tests.training.helpers import add_judgments, judged_campaign, tiny_base_model
from tests.training.test_rounds import drive
from training.models import ModelVersion, RunMetric, RunStatus
from training.services import rounds

pytestmark = [pytest.mark.django_db, pytest.mark.slow]

TINY_ROUND = {
    "reward_steps": 3,
    "policy_steps": 2,
    "batch_size": 2,
    "ensemble_size": 2,
    "num_samples": 2,
    "max_new_tokens": 6,
    "max_length": 64,
    "eval_prompts": 2,
    "pairs_per_prompt": 1,
    "device": "cpu",
}


def test_two_rounds_train_generate_and_keep_the_lineage(settings, tmp_path: Path) -> None:
    settings.ARTIFACTS_ROOT = tmp_path / "artifacts"
    settings.TRAINING_HEARTBEAT_SECONDS = 1
    settings.LOOP_POLICY_MODEL = str(tiny_base_model(tmp_path / "base"))
    campaign = judged_campaign(comparisons=4)
    comparisons_before = Comparison.objects.filter(campaign=campaign).count()

    first = drive(
        rounds.round_create(campaign=campaign, config={**TINY_ROUND, "strategy": "uncertainty"})
    )
    assert first.status == RunStatus.SUCCEEDED, first.error
    assert sorted(first.runs.values_list("kind", flat=True)) == [
        "dpo",
        "eval",
        "generate",
        "reward",
    ]
    policy = first.policy_version
    assert Path(policy.artifact, "config.json").is_file()
    assert Path(first.reward_version.artifact, "config.json").is_file()
    new = Completion.objects.filter(source=policy.source, round_number=1)
    assert new.count() == 2 * campaign.prompts.filter(split="train").count()
    assert first.completions_created >= new.count()
    made = Comparison.objects.filter(campaign=campaign).count() - comparisons_before
    assert made == first.comparisons_created > 0
    # Uncertain pairs carry the ensemble's disagreement as their priority.
    assert Comparison.objects.filter(campaign=campaign, priority__gt=0).exists()
    for name in ("kl", "win_rate", "mean_reward", "reward_accuracy"):
        assert name in first.metrics, name
    assert 0.0 <= first.metrics["win_rate"] <= 1.0
    assert math.isfinite(first.metrics["kl"])
    dpo = first.runs.get(kind="dpo")
    assert RunMetric.objects.filter(run=dpo, name="loss").count() == 2
    assert dpo.dataset_sha256 == first.runs.get(kind="reward").dataset_sha256

    add_judgments(campaign)
    second = drive(
        rounds.round_create(campaign=campaign, config={**TINY_ROUND, "strategy": "new_vs_previous"})
    )
    assert second.status == RunStatus.SUCCEEDED, second.error
    assert second.policy_version.parent == policy
    assert second.runs.get(kind="dpo").config["reference_model"] == first.policy_before.artifact
    # Each new comparison pits round 2's policy against round 1's.
    pairs = Comparison.objects.filter(campaign=campaign, completion_a__round_number=2) | (
        Comparison.objects.filter(campaign=campaign, completion_b__round_number=2)
    )
    sources = {
        frozenset((c.completion_a.source_id, c.completion_b.source_id))
        for c in pairs.select_related("completion_a", "completion_b")
    }
    assert sources == {frozenset((second.policy_version.source_id, policy.source_id))}
    chain = [second.policy_version]
    while chain[-1].parent_id:
        chain.append(ModelVersion.objects.get(pk=chain[-1].parent_id))
    assert [v.name for v in chain][-1].startswith("base:")
    assert len(chain) == 3


def test_a_ppo_round_trains_against_its_reward_model(settings, tmp_path: Path) -> None:
    settings.ARTIFACTS_ROOT = tmp_path / "artifacts"
    settings.TRAINING_HEARTBEAT_SECONDS = 1
    settings.LOOP_POLICY_MODEL = str(tiny_base_model(tmp_path / "base"))
    campaign = judged_campaign(comparisons=4)
    made = drive(
        rounds.round_create(
            campaign=campaign,
            config={**TINY_ROUND, "algorithm": "ppo", "strategy": "two_samples"},
        )
    )
    assert made.status == RunStatus.SUCCEEDED, made.error
    ppo = made.runs.get(kind="ppo")
    assert ppo.config["reward_model"] == made.reward_version.artifact
    assert Path(made.policy_version.artifact, "config.json").is_file()
    names = set(RunMetric.objects.filter(run=ppo).values_list("name", flat=True))
    # The live plots get PPO's reward, KL and losses.
    assert {"reward/score", "objective/kl", "loss/policy", "loss/value"} <= names
    assert RunMetric.objects.filter(run=ppo).values("step").distinct().count() == 2
    assert Completion.objects.filter(source=made.policy_version.source).count() > 0

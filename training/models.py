"""Training runs, their metrics, and the model registry.

A ``TrainingRun`` row is the state machine a Celery task drives (``services.runs.run_execute``):
queued -> running -> succeeded / failed / cancelled. The row, not the broker, is the source of
truth: attempts are counted here, the heartbeat says whether a worker is still on it, and the
dataset snapshot (judgment cutoff + SHA-256) pins exactly what the run learned from.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models import Q

from annotation.models import Campaign, Source


class RunKind(models.TextChoices):
    REWARD = "reward", "Reward model"
    DPO = "dpo", "DPO policy"
    PPO = "ppo", "PPO policy"
    GENERATE = "generate", "Candidate generation"
    CRITIQUE = "critique", "Critiques"
    EVAL = "eval", "Evaluation"


class RunStatus(models.TextChoices):
    QUEUED = "queued", "Queued"
    RUNNING = "running", "Running"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"
    CANCELLED = "cancelled", "Cancelled"


ACTIVE_STATUSES = (RunStatus.QUEUED, RunStatus.RUNNING)
TERMINAL_STATUSES = (RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED)


class TrainingRun(models.Model):
    kind = models.CharField(max_length=16, choices=RunKind.choices)
    campaign = models.ForeignKey(Campaign, on_delete=models.PROTECT, related_name="training_runs")
    config = models.JSONField(default=dict, blank=True)
    status = models.CharField(max_length=16, choices=RunStatus.choices, default=RunStatus.QUEUED)
    progress = models.FloatField(default=0.0, help_text="0..1")
    step = models.PositiveIntegerField(default=0)
    total_steps = models.PositiveIntegerField(default=0)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    worker = models.CharField(max_length=255, blank=True, help_text="hostname:pid")
    attempts = models.PositiveSmallIntegerField(default=0)
    max_attempts = models.PositiveSmallIntegerField(default=3)
    judgment_cutoff = models.BigIntegerField(
        null=True, blank=True, help_text="Largest judgment id in the dataset snapshot."
    )
    dataset_sha256 = models.CharField(max_length=64, blank=True)
    dataset_path = models.CharField(max_length=1024, blank=True)
    dataset_pairs = models.PositiveIntegerField(default=0)
    output_dir = models.CharField(max_length=1024, blank=True)
    results = models.JSONField(default=dict, blank=True, help_text="Final figures.")
    error = models.TextField(blank=True, help_text="Shown to users.")
    log_tail = models.TextField(blank=True)
    round = models.ForeignKey(
        "Round", on_delete=models.SET_NULL, null=True, blank=True, related_name="runs"
    )
    input_version = models.ForeignKey(
        "ModelVersion",
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="runs_started",
        help_text="The registered model this run started from (a policy's parent).",
    )
    cancel_requested = models.BooleanField(default=False)
    requeued_at = models.DateTimeField(
        null=True, blank=True, help_text="When the watchdog last re-sent its message."
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="training_runs",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-id"]
        indexes = [models.Index(fields=["status", "heartbeat_at"], name="training_run_status_hb")]
        constraints = [
            # Never two active runs of one kind for one campaign: the database says so, not a
            # check-then-insert race in Python (R23).
            models.UniqueConstraint(
                fields=["campaign", "kind"],
                condition=Q(status__in=["queued", "running"]),
                name="training_run_one_active_per_campaign_kind",
            )
        ]

    def __str__(self) -> str:
        return f"Run {self.pk} ({self.kind}, {self.status})"

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


class RunMetric(models.Model):
    run = models.ForeignKey(TrainingRun, on_delete=models.CASCADE, related_name="metrics")
    step = models.PositiveIntegerField()
    name = models.CharField(max_length=64)
    value = models.FloatField()

    class Meta:
        ordering = ["run", "step", "name"]
        constraints = [
            models.UniqueConstraint(fields=["run", "step", "name"], name="run_metric_unique")
        ]

    def __str__(self) -> str:
        return f"{self.name}@{self.step}={self.value}"


class ModelKind(models.TextChoices):
    POLICY = "policy", "Policy"
    REWARD = "reward", "Reward model"
    VALUE = "value", "Value model"
    CRITIC = "critic", "Critic"


class ModelVersion(models.Model):
    kind = models.CharField(max_length=16, choices=ModelKind.choices)
    name = models.CharField(max_length=200)
    base_model = models.CharField(max_length=1024, blank=True)
    parent = models.ForeignKey(
        "self", on_delete=models.SET_NULL, null=True, blank=True, related_name="children"
    )
    artifact = models.CharField(max_length=1024, help_text="Folder of the saved model.")
    metrics = models.JSONField(default=dict, blank=True)
    run = models.ForeignKey(
        TrainingRun,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="model_versions",
    )
    # The annotation Source its completions are registered under (policies only): how a
    # completion a rater judged leads back to the model that wrote it.
    source = models.ForeignKey(
        Source, on_delete=models.SET_NULL, null=True, blank=True, related_name="model_versions"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-id"]
        constraints = [models.UniqueConstraint(fields=["name"], name="model_version_name_unique")]

    def __str__(self) -> str:
        return f"{self.kind} {self.name}"


class RoundStage(models.TextChoices):
    """The steps of one round, in order (``critique`` only where the campaign shows critiques)."""

    REWARD = "reward", "Train the reward model"
    POLICY = "policy", "Train the policy"
    GENERATE = "generate", "Generate candidates"
    CRITIQUE = "critique", "Write critiques"
    EVALUATE = "evaluate", "Evaluate"
    DONE = "done", "Done"


class RoundTrigger(models.TextChoices):
    MANUAL = "manual", "Started by hand"
    SCHEDULE = "schedule", "Started by the schedule"


class Round(models.Model):
    """One turn of the loop: judgments -> reward model -> policy -> candidates -> comparisons.

    Each stage is a ``TrainingRun`` (``runs``) with its own attempts, heartbeat and
    checkpoints; the round records where it is and what it made."""

    campaign = models.ForeignKey(Campaign, on_delete=models.PROTECT, related_name="rounds")
    number = models.PositiveIntegerField()
    status = models.CharField(max_length=16, choices=RunStatus.choices, default=RunStatus.QUEUED)
    stage = models.CharField(max_length=16, choices=RoundStage.choices, default=RoundStage.REWARD)
    trigger = models.CharField(
        max_length=16, choices=RoundTrigger.choices, default=RoundTrigger.MANUAL
    )
    config = models.JSONField(default=dict, blank=True)
    judgment_cutoff = models.BigIntegerField(null=True, blank=True)
    new_judgments = models.PositiveIntegerField(
        default=0, help_text="Judgments since the previous round's cutoff."
    )
    policy_before = models.ForeignKey(
        "ModelVersion", on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    reward_version = models.ForeignKey(
        "ModelVersion", on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    policy_version = models.ForeignKey(
        "ModelVersion", on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    metrics = models.JSONField(default=dict, blank=True)
    completions_created = models.PositiveIntegerField(default=0)
    comparisons_created = models.PositiveIntegerField(default=0)
    error = models.TextField(blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="training_rounds",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-id"]
        constraints = [
            models.UniqueConstraint(fields=["campaign", "number"], name="round_number_unique"),
            # Never two rounds of one campaign at once (R23): the second trigger is refused by
            # the database and reported as skipped.
            models.UniqueConstraint(
                fields=["campaign"],
                condition=Q(status__in=["queued", "running"]),
                name="round_one_active_per_campaign",
            ),
        ]

    def __str__(self) -> str:
        return f"Round {self.number} of {self.campaign_id} ({self.status})"

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


class LoopSchedule(models.Model):
    """Start a round when a campaign has ``min_new_judgments`` new judgments since its last
    round (checked by beat); ``config`` is the round's settings."""

    campaign = models.OneToOneField(
        Campaign, on_delete=models.CASCADE, related_name="loop_schedule"
    )
    enabled = models.BooleanField(default=True)
    min_new_judgments = models.PositiveIntegerField(default=200)
    config = models.JSONField(default=dict, blank=True)
    last_checked_at = models.DateTimeField(null=True, blank=True)
    last_message = models.CharField(max_length=300, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"Loop schedule of {self.campaign_id}"

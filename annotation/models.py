"""The labeling domain: campaigns, prompts, completions, comparisons, slots and judgments.

Models hold data and invariants only. The invariants that matter are database constraints:

- a comparison is an unordered pair, stored canonically (``completion_a_id < completion_b_id``)
  and unique per campaign;
- a comparison has exactly ``overlap`` slots; a judgment fills one slot, so there are never more
  judgments than the overlap;
- a rater holds at most one slot of a comparison (live lease or filled), and has at most one
  judgment per comparison;
- an idempotency key names at most one judgment per rater.

Writes live in ``annotation/services``; reads in ``annotation/selectors.py``.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models import F, Q


class Role(models.TextChoices):
    RATER = "rater", "Rater"
    ADMIN = "admin", "Campaign admin"
    ML_STAFF = "ml_staff", "ML staff"


class CampaignStatus(models.TextChoices):
    DRAFT = "draft", "Draft"
    ACTIVE = "active", "Active"
    PAUSED = "paused", "Paused"
    ARCHIVED = "archived", "Archived"


class CritiqueMode(models.TextChoices):
    OFF = "off", "Off"
    ALWAYS = "always", "Always shown"
    EXPERIMENT = "experiment", "Experiment (shown at random)"


class Choice(models.TextChoices):
    A = "a", "A is better"
    B = "b", "B is better"
    TIE = "tie", "Tie"
    BOTH_BAD = "both_bad", "Both bad"


class Split(models.TextChoices):
    TRAIN = "train", "Train"
    EVAL = "eval", "Eval"


class Campaign(models.Model):
    name = models.CharField(max_length=200)
    slug = models.SlugField(max_length=80, unique=True)
    description = models.TextField(blank=True)
    guidelines = models.TextField(blank=True, help_text="Markdown shown to raters.")
    guidelines_version = models.PositiveIntegerField(default=1)
    status = models.CharField(
        max_length=16, choices=CampaignStatus.choices, default=CampaignStatus.DRAFT
    )
    overlap = models.PositiveSmallIntegerField(
        default=1, help_text="Judgments wanted per comparison."
    )
    lease_seconds = models.PositiveIntegerField(default=600)
    # Form options.
    strength_scale = models.PositiveSmallIntegerField(
        default=3, help_text="Points on the 'how much better' scale; 0 hides it."
    )
    aspects = models.JSONField(default=list, blank=True, help_text="Aspect names (list).")
    reason_tags = models.JSONField(default=list, blank=True, help_text="Reason tags (list).")
    flag_options = models.JSONField(default=list, blank=True, help_text="Flags (list).")
    allow_tie = models.BooleanField(default=True)
    allow_both_bad = models.BooleanField(default=True)
    require_rationale = models.BooleanField(default=False)
    critique_mode = models.CharField(
        max_length=16, choices=CritiqueMode.choices, default=CritiqueMode.OFF
    )
    critique_fraction = models.FloatField(
        default=0.5, help_text="Share of leases that show critiques in experiment mode."
    )
    gold_fraction = models.FloatField(
        default=0.0, help_text="Share of each rater's leases drawn from the gold items."
    )
    gold_overlap = models.PositiveSmallIntegerField(
        default=10, help_text="How many raters answer each gold item."
    )
    agreement_fraction = models.FloatField(
        default=0.0,
        help_text="Share of new comparisons answered by agreement_overlap raters instead of "
        "overlap, to measure agreement.",
    )
    agreement_overlap = models.PositiveSmallIntegerField(
        default=3, help_text="How many raters answer each agreement comparison."
    )
    screening_items = models.PositiveSmallIntegerField(
        default=0, help_text="Gold items a rater must answer before real work; 0: no screening."
    )
    screening_min_accuracy = models.FloatField(
        default=0.8, help_text="Share of the screening items a rater must get right."
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.CheckConstraint(
                condition=Q(overlap__gte=1) & Q(overlap__lte=50), name="campaign_overlap_range"
            ),
            models.CheckConstraint(
                condition=Q(lease_seconds__gte=10), name="campaign_lease_min_10s"
            ),
            models.CheckConstraint(
                condition=Q(critique_fraction__gte=0) & Q(critique_fraction__lte=1),
                name="campaign_critique_fraction_range",
            ),
            models.CheckConstraint(
                condition=Q(gold_fraction__gte=0) & Q(gold_fraction__lte=1),
                name="campaign_gold_fraction_range",
            ),
            models.CheckConstraint(
                condition=Q(gold_overlap__gte=1) & Q(gold_overlap__lte=50),
                name="campaign_gold_overlap_range",
            ),
            models.CheckConstraint(
                condition=Q(agreement_fraction__gte=0) & Q(agreement_fraction__lte=1),
                name="campaign_agreement_fraction_range",
            ),
            models.CheckConstraint(
                condition=Q(agreement_overlap__gte=1) & Q(agreement_overlap__lte=50),
                name="campaign_agreement_overlap_range",
            ),
            models.CheckConstraint(
                condition=Q(screening_min_accuracy__gte=0) & Q(screening_min_accuracy__lte=1),
                name="campaign_screening_accuracy_range",
            ),
        ]

    def __str__(self) -> str:
        return self.name

    @property
    def is_active(self) -> bool:
        return self.status == CampaignStatus.ACTIVE


class Membership(models.Model):
    campaign = models.ForeignKey(Campaign, on_delete=models.CASCADE, related_name="memberships")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships"
    )
    role = models.CharField(max_length=16, choices=Role.choices)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["campaign", "user", "role"], name="membership_unique")
        ]
        indexes = [models.Index(fields=["user", "role"])]

    def __str__(self) -> str:
        return f"{self.user} {self.role} in {self.campaign}"


class SourceKind(models.TextChoices):
    MODEL = "model", "Imported model output"
    HUMAN = "human", "Human-written"
    POLICY = "policy", "Policy version trained here"
    GOLD = "gold", "Corrupted copy made for a gold item"


class Source(models.Model):
    """Where a completion came from. Never shown to raters."""

    name = models.CharField(max_length=200, unique=True)
    kind = models.CharField(max_length=16, choices=SourceKind.choices, default=SourceKind.MODEL)
    metadata = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return self.name


class Prompt(models.Model):
    campaign = models.ForeignKey(Campaign, on_delete=models.CASCADE, related_name="prompts")
    external_id = models.CharField(max_length=200, blank=True)
    messages = models.JSONField(help_text="A list of {role, content}; multi-turn is first class.")
    split = models.CharField(max_length=8, choices=Split.choices, default=Split.TRAIN)
    metadata = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["campaign", "external_id"],
                condition=~Q(external_id=""),
                name="prompt_external_id_unique",
            )
        ]

    def __str__(self) -> str:
        return f"Prompt {self.pk}"


class Completion(models.Model):
    prompt = models.ForeignKey(Prompt, on_delete=models.CASCADE, related_name="completions")
    source = models.ForeignKey(Source, on_delete=models.PROTECT, related_name="completions")
    text = models.TextField()
    generation = models.JSONField(default=dict, blank=True, help_text="Sampling settings.")
    round_number = models.PositiveIntegerField(null=True, blank=True)
    external_id = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        indexes = [models.Index(fields=["prompt", "source"])]

    def __str__(self) -> str:
        return f"Completion {self.pk}"


class Critique(models.Model):
    """A critic model's critique of one completion, shown beside it (CriticGPT-style)."""

    completion = models.ForeignKey(Completion, on_delete=models.CASCADE, related_name="critiques")
    critic = models.CharField(max_length=200)
    text = models.TextField()
    spans = models.JSONField(default=list, blank=True, help_text="Quoted spans [{start, end}].")
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"Critique {self.pk} of completion {self.completion_id}"


class Comparison(models.Model):
    campaign = models.ForeignKey(Campaign, on_delete=models.CASCADE, related_name="comparisons")
    prompt = models.ForeignKey(Prompt, on_delete=models.CASCADE, related_name="comparisons")
    # Canonical order: A has the smaller id, so (x, y) and (y, x) are one comparison.
    completion_a = models.ForeignKey(Completion, on_delete=models.CASCADE, related_name="+")
    completion_b = models.ForeignKey(Completion, on_delete=models.CASCADE, related_name="+")
    # Gold: the known right answer (canonical a / b / tie / both_bad); never shown to raters.
    gold_choice = models.CharField(max_length=16, choices=Choice.choices, blank=True)
    # How a generated gold item was made (annotation.gold.Corruption), for the admin only.
    gold_kind = models.CharField(max_length=32, blank=True)
    gold_note = models.CharField(max_length=300, blank=True)
    # One of the campaign's agreement share: answered by ``agreement_overlap`` raters.
    agreement_item = models.BooleanField(default=False)
    priority = models.FloatField(default=0.0, help_text="Higher is served first.")
    judgments_wanted = models.PositiveSmallIntegerField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=Q(completion_a__lt=F("completion_b")), name="comparison_canonical_order"
            ),
            models.UniqueConstraint(
                fields=["campaign", "completion_a", "completion_b"], name="comparison_unique_pair"
            ),
        ]

    def __str__(self) -> str:
        return f"Comparison {self.pk}"

    @property
    def is_gold(self) -> bool:
        return bool(self.gold_choice)


class SlotStatus(models.TextChoices):
    OPEN = "open", "Open"
    LEASED = "leased", "Leased"
    FILLED = "filled", "Filled"


class Slot(models.Model):
    """One wanted judgment of a comparison. Raters lease open slots; a judgment fills one.

    ``rater`` is set while a lease is live and stays set once the slot is filled, so the unique
    constraint on (comparison, rater) means one rater can never hold two slots of a comparison.
    An expired lease is returned to the pool by clearing ``rater``.
    """

    campaign = models.ForeignKey(Campaign, on_delete=models.CASCADE, related_name="slots")
    comparison = models.ForeignKey(Comparison, on_delete=models.CASCADE, related_name="slots")
    index = models.PositiveSmallIntegerField()
    # Copied from the comparison so the queue is one index scan on this table.
    priority = models.FloatField(default=0.0)
    status = models.CharField(max_length=8, choices=SlotStatus.choices, default=SlotStatus.OPEN)
    rater = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.CASCADE, related_name="+"
    )
    leased_at = models.DateTimeField(null=True, blank=True)
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    # Decided at lease time and recorded with the judgment.
    left_is_a = models.BooleanField(default=True)
    critique_shown = models.BooleanField(default=False)
    filled_at = models.DateTimeField(null=True, blank=True)
    # Copied from the comparison (gold_choice set): gold slots wait in a queue of their own,
    # served at the campaign's gold fraction, so they can be mixed in at a known rate.
    gold = models.BooleanField(default=False)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["comparison", "index"], name="slot_unique_index"),
            models.UniqueConstraint(
                fields=["comparison", "rater"],
                condition=Q(rater__isnull=False),
                name="slot_one_per_rater_per_comparison",
            ),
            # One live lease per rater per campaign: a second tab or a retrying client gets
            # the lease it already holds instead of locking away more work.
            models.UniqueConstraint(
                fields=["campaign", "rater"],
                condition=Q(status="leased"),
                name="slot_one_lease_per_rater_per_campaign",
            ),
            models.CheckConstraint(
                condition=(
                    Q(status=SlotStatus.OPEN, rater__isnull=True)
                    | Q(
                        status=SlotStatus.LEASED,
                        rater__isnull=False,
                        lease_expires_at__isnull=False,
                    )
                    | Q(status=SlotStatus.FILLED, rater__isnull=False)
                ),
                name="slot_status_consistent",
            ),
        ]
        indexes = [
            # The queue: open slots of a campaign, best first. Partial, so it only holds work.
            models.Index(
                fields=["campaign", "-priority", "id"],
                condition=Q(status="open", gold=False),
                name="slot_queue_open",
            ),
            # Gold items waiting, in the order they are served.
            models.Index(
                fields=["campaign", "id"],
                condition=Q(status="open", gold=True),
                name="slot_queue_gold",
            ),
            # Expired-lease reclaim: only live leases are in it.
            models.Index(
                fields=["campaign", "lease_expires_at"],
                condition=Q(status="leased"),
                name="slot_queue_leased",
            ),
            models.Index(fields=["rater", "status"], name="slot_rater_status"),
            models.Index(fields=["campaign", "status"], name="slot_campaign_status"),
        ]

    def __str__(self) -> str:
        return f"Slot {self.pk} ({self.status})"


class Judgment(models.Model):
    """A rater's answer to one comparison. Append-only: never updated (a trigger enforces it
    on PostgreSQL). ``choice`` is in canonical A/B terms; ``left_was_a`` records the layout."""

    campaign = models.ForeignKey(Campaign, on_delete=models.CASCADE, related_name="judgments")
    comparison = models.ForeignKey(Comparison, on_delete=models.CASCADE, related_name="judgments")
    slot = models.OneToOneField(Slot, on_delete=models.CASCADE, related_name="judgment")
    rater = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="judgments"
    )
    choice = models.CharField(max_length=16, choices=Choice.choices)
    strength = models.PositiveSmallIntegerField(null=True, blank=True)
    aspects = models.JSONField(default=dict, blank=True, help_text="{aspect: a|b|tie}")
    reason_tags = models.JSONField(default=list, blank=True)
    rationale = models.TextField(blank=True)
    flags = models.JSONField(default=list, blank=True)
    left_was_a = models.BooleanField()
    critique_shown = models.BooleanField(default=False)
    decision_ms = models.PositiveIntegerField(null=True, blank=True)
    guidelines_version = models.PositiveIntegerField()
    # NULL, not "", means "no key": the partial unique index only covers real keys.
    idempotency_key = models.CharField(max_length=64, null=True, blank=True)  # noqa: DJ001
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["comparison", "rater"], name="judgment_one_per_rater_per_comparison"
            ),
            models.UniqueConstraint(
                fields=["rater", "idempotency_key"],
                condition=Q(idempotency_key__isnull=False),
                name="judgment_idempotency_key_unique",
            ),
        ]
        indexes = [models.Index(fields=["campaign", "id"], name="judgment_campaign_id")]

    def __str__(self) -> str:
        return f"Judgment {self.pk}: {self.choice}"


class CritiqueVerdict(models.Model):
    """A rater's call on a critique they were shown with a comparison: does it point at a real
    problem? Written with the judgment, in its transaction; what critique precision is
    measured from (the CriticGPT experiment)."""

    judgment = models.ForeignKey(Judgment, on_delete=models.CASCADE, related_name="verdicts")
    critique = models.ForeignKey(Critique, on_delete=models.CASCADE, related_name="verdicts")
    valid = models.BooleanField()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["judgment", "critique"], name="critique_verdict_once")
        ]

    def __str__(self) -> str:
        return f"{'valid' if self.valid else 'invalid'}: critique {self.critique_id}"


class ScreeningStatus(models.TextChoices):
    PASSED = "passed", "Passed"
    FAILED = "failed", "Failed"


class RaterScreening(models.Model):
    """A rater's result on a campaign's screening: the first ``screening_items`` gold items
    they answered. Written once, when the last of them is submitted (or the gold ran out);
    kept, so a failed rater stays out and the admin can see why."""

    campaign = models.ForeignKey(Campaign, on_delete=models.CASCADE, related_name="screenings")
    rater = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="screenings"
    )
    status = models.CharField(max_length=8, choices=ScreeningStatus.choices)
    correct = models.PositiveIntegerField()
    total = models.PositiveIntegerField()
    required_accuracy = models.FloatField()
    finished_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["campaign", "rater"], name="screening_once_per_rater")
        ]

    def __str__(self) -> str:
        return f"{self.rater} {self.status} screening of {self.campaign}"


# -- K-wise ranking (InstructGPT): K = 3..9 outputs of one prompt, ranked best to worst ---------


class RankingTask(models.Model):
    """K completions of one prompt to be ranked. ``completions`` holds their ids in ascending
    order (the service stores them so) and ``key`` the same ids joined by ",", so one set of
    completions is one task per campaign whatever order it was given in. Which completions
    answer which prompt is checked by the service: a JSON list has no foreign keys."""

    campaign = models.ForeignKey(Campaign, on_delete=models.CASCADE, related_name="ranking_tasks")
    prompt = models.ForeignKey(Prompt, on_delete=models.CASCADE, related_name="ranking_tasks")
    completions = models.JSONField(help_text="Completion ids, ascending (3 to 9).")
    key = models.CharField(max_length=200)
    priority = models.FloatField(default=0.0, help_text="Higher is served first.")
    judgments_wanted = models.PositiveSmallIntegerField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["campaign", "prompt", "key"], name="ranking_task_unique_set"
            ),
            models.CheckConstraint(
                condition=Q(judgments_wanted__gte=1) & Q(judgments_wanted__lte=50),
                name="ranking_task_wanted_range",
            ),
        ]

    def __str__(self) -> str:
        return f"Ranking task {self.pk}"


class RankingSlot(models.Model):
    """One wanted ranking of a task; leased and filled like ``Slot`` (same guarantees, same
    style of constraints). ``shown_order`` is the order the outputs were shown in (completion
    ids, position 1 first), drawn at random for each lease and copied onto the ranking, so
    position bias can be measured."""

    campaign = models.ForeignKey(Campaign, on_delete=models.CASCADE, related_name="ranking_slots")
    task = models.ForeignKey(RankingTask, on_delete=models.CASCADE, related_name="slots")
    index = models.PositiveSmallIntegerField()
    # Copied from the task so the queue is one index scan on this table.
    priority = models.FloatField(default=0.0)
    status = models.CharField(max_length=8, choices=SlotStatus.choices, default=SlotStatus.OPEN)
    rater = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.CASCADE, related_name="+"
    )
    leased_at = models.DateTimeField(null=True, blank=True)
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    shown_order = models.JSONField(default=list, blank=True)
    filled_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["task", "index"], name="ranking_slot_unique_index"),
            models.UniqueConstraint(
                fields=["task", "rater"],
                condition=Q(rater__isnull=False),
                name="ranking_slot_one_per_rater_per_task",
            ),
            models.UniqueConstraint(
                fields=["campaign", "rater"],
                condition=Q(status="leased"),
                name="ranking_slot_one_lease_per_rater",
            ),
            models.CheckConstraint(
                condition=(
                    Q(status=SlotStatus.OPEN, rater__isnull=True)
                    | Q(
                        status=SlotStatus.LEASED,
                        rater__isnull=False,
                        lease_expires_at__isnull=False,
                    )
                    | Q(status=SlotStatus.FILLED, rater__isnull=False)
                ),
                name="ranking_slot_status_consistent",
            ),
        ]
        indexes = [
            models.Index(
                fields=["campaign", "-priority", "id"],
                condition=Q(status="open"),
                name="ranking_slot_queue_open",
            ),
            models.Index(
                fields=["campaign", "lease_expires_at"],
                condition=Q(status="leased"),
                name="ranking_slot_queue_leased",
            ),
            models.Index(fields=["rater", "status"], name="ranking_slot_rater_status"),
        ]

    def __str__(self) -> str:
        return f"Ranking slot {self.pk} ({self.status})"


class Ranking(models.Model):
    """A rater's ranking of a task's outputs: ``order`` holds completion ids, best first, a
    total order (ties are not supported). Append-only like ``Judgment`` (a trigger enforces it
    on PostgreSQL)."""

    campaign = models.ForeignKey(Campaign, on_delete=models.CASCADE, related_name="rankings")
    task = models.ForeignKey(RankingTask, on_delete=models.CASCADE, related_name="rankings")
    slot = models.OneToOneField(RankingSlot, on_delete=models.CASCADE, related_name="ranking")
    rater = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="rankings"
    )
    order = models.JSONField(help_text="Completion ids, best first.")
    shown_order = models.JSONField(help_text="Completion ids in the order shown (position 1..K).")
    decision_ms = models.PositiveIntegerField(null=True, blank=True)
    guidelines_version = models.PositiveIntegerField()
    # NULL, not "", means "no key": the partial unique index only covers real keys.
    idempotency_key = models.CharField(max_length=64, null=True, blank=True)  # noqa: DJ001
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["task", "rater"], name="ranking_one_per_rater_per_task"
            ),
            models.UniqueConstraint(
                fields=["rater", "idempotency_key"],
                condition=Q(idempotency_key__isnull=False),
                name="ranking_idempotency_key_unique",
            ),
        ]
        indexes = [models.Index(fields=["campaign", "id"], name="ranking_campaign_id")]

    def __str__(self) -> str:
        return f"Ranking {self.pk}"

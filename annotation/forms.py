"""Forms for the campaign-admin pages. They parse and validate input only; the views pass
``cleaned_data`` to a service, which owns every rule that must also hold for the API."""

from __future__ import annotations

from typing import Any

from django import forms

from annotation.formats import KINDS
from annotation.models import Campaign, CampaignStatus, CritiqueMode, Role
from annotation.services.items import PairingStrategy

LIST_HELP = "One per line (or comma-separated)."
# /campaigns/new/ is the create page, so a campaign called "new" could never be reached.
RESERVED_SLUGS = {"new"}


class ListField(forms.CharField):
    """A list of short names typed one per line or separated by commas."""

    widget = forms.Textarea(attrs={"rows": 3})

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("required", False)
        kwargs.setdefault("help_text", LIST_HELP)
        super().__init__(**kwargs)

    def prepare_value(self, value: Any) -> Any:
        if isinstance(value, list):
            return "\n".join(value)
        return value

    def to_python(self, value: Any) -> list[str]:  # type: ignore[override]
        text = super().to_python(value) or ""
        items = [part.strip() for line in text.splitlines() for part in line.split(",")]
        return list(dict.fromkeys(item for item in items if item))


class GuidelinesField(forms.CharField):
    """Markdown kept as typed, with browser line endings (CRLF) normalised: an edit that only
    re-submits the same text must not count as a change (it would bump the version)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(strip=False, **kwargs)

    def to_python(self, value: Any) -> str:
        return str(super().to_python(value)).replace("\r\n", "\n")


class CampaignForm(forms.Form):
    """Every editable option of a campaign. ``slug`` only when creating (URLs use it)."""

    name = forms.CharField(max_length=200)
    description = forms.CharField(required=False, widget=forms.Textarea(attrs={"rows": 2}))
    guidelines = GuidelinesField(
        required=False,
        widget=forms.Textarea(attrs={"rows": 12}),
        help_text="Markdown, shown to raters. Changing it bumps the guidelines version.",
    )
    overlap = forms.IntegerField(
        min_value=1, max_value=50, initial=1, help_text="Judgments wanted per comparison."
    )
    lease_seconds = forms.IntegerField(
        min_value=10,
        max_value=24 * 3600,
        initial=600,
        help_text="How long a rater holds a comparison before it goes back to the pool.",
    )
    strength_scale = forms.IntegerField(
        min_value=0,
        max_value=10,
        initial=3,
        help_text="Points on the 'how much better' scale; 0 hides the question.",
    )
    aspects = ListField(help_text="Aspects rated separately, e.g. helpfulness. " + LIST_HELP)
    reason_tags = ListField()
    flag_options = ListField(label="Flags", initial=["unsafe", "pii", "hallucination"])
    allow_tie = forms.BooleanField(required=False, initial=True)
    allow_both_bad = forms.BooleanField(required=False, initial=True)
    require_rationale = forms.BooleanField(required=False)
    critique_mode = forms.ChoiceField(choices=CritiqueMode.choices, initial=CritiqueMode.OFF)
    critique_fraction = forms.FloatField(
        min_value=0,
        max_value=1,
        initial=0.5,
        help_text="In experiment mode, the share of leases that show critiques.",
    )
    gold_fraction = forms.FloatField(
        min_value=0,
        max_value=1,
        initial=0.0,
        help_text="Share of each rater's comparisons drawn from the gold items (e.g. 0.05).",
    )
    gold_overlap = forms.IntegerField(
        min_value=1, max_value=50, initial=10, help_text="How many raters answer each gold item."
    )
    agreement_fraction = forms.FloatField(
        min_value=0,
        max_value=1,
        initial=0.0,
        help_text="Share of new comparisons answered by several raters to measure agreement "
        "(e.g. 0.1).",
    )
    agreement_overlap = forms.IntegerField(
        min_value=1,
        max_value=50,
        initial=3,
        help_text="How many raters answer each of those comparisons.",
    )
    screening_items = forms.IntegerField(
        min_value=0,
        max_value=100,
        initial=0,
        help_text="Gold items a new rater must answer before real work; 0 turns screening off.",
    )
    screening_min_accuracy = forms.FloatField(
        min_value=0,
        max_value=1,
        initial=0.8,
        help_text="Share of the screening items a rater must get right to go on.",
    )

    def __init__(self, *args: Any, creating: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if creating:
            self.fields["slug"] = forms.SlugField(
                max_length=80, help_text="Part of the campaign's address; cannot change later."
            )
            self.order_fields(["name", "slug"])

    def clean_slug(self) -> str:
        slug: str = self.cleaned_data["slug"]
        if slug in RESERVED_SLUGS:
            raise forms.ValidationError("This word is reserved for a page; pick another slug.")
        return slug

    @staticmethod
    def initial_from(campaign: Campaign) -> dict[str, Any]:
        return {name: getattr(campaign, name) for name in CampaignForm.base_fields}


class MemberAddForm(forms.Form):
    username = forms.CharField(max_length=150)
    role = forms.ChoiceField(choices=Role.choices)


class MemberRemoveForm(forms.Form):
    user_id = forms.IntegerField(min_value=1)
    role = forms.ChoiceField(choices=Role.choices)


class StatusForm(forms.Form):
    status = forms.ChoiceField(choices=CampaignStatus.choices)


_STRATEGIES = [
    (PairingStrategy.ALL_PAIRS, "All pairs of each prompt's completions"),
    (PairingStrategy.RANDOM_K, "k random pairs per prompt"),
]


class PairingFields(forms.Form):
    strategy = forms.ChoiceField(
        choices=_STRATEGIES,
        initial=PairingStrategy.ALL_PAIRS,
        help_text="How each prompt's candidates are paired into comparisons.",
    )
    k = forms.IntegerField(
        label="k",
        min_value=1,
        max_value=500,
        initial=1,
        help_text="Pairs per prompt, for the random strategy.",
    )
    seed = forms.IntegerField(
        required=False,
        min_value=0,
        max_value=2**63 - 1,
        help_text="Optional: the same seed picks the same random pairs.",
    )


class ImportForm(PairingFields):
    kind = forms.ChoiceField(
        choices=[
            (KINDS[0], "Prompts"),
            (KINDS[1], "Prompts with candidate completions"),
            (KINDS[2], "Ready-made pairs"),
        ],
        initial=KINDS[1],
    )
    file = forms.FileField(help_text="A .jsonl file, UTF-8, one JSON object per line.")
    source_name = forms.CharField(
        max_length=200,
        initial="imported",
        help_text="Source recorded for completions that name none.",
    )
    field_order = ["kind", "file", "source_name", "strategy", "k", "seed"]


class BuildForm(PairingFields):
    pass


class GoldGenerateForm(forms.Form):
    count = forms.IntegerField(
        min_value=1, max_value=1000, initial=20, help_text="How many gold items to make."
    )
    kinds = forms.MultipleChoiceField(
        choices=[
            ("truncate", "Truncate it mid-sentence"),
            ("swap", "Swap in an answer to another prompt"),
            ("refusal", "Replace it with a refusal"),
            ("shuffle", "Shuffle its sentences"),
            ("planted_error", "Plant one of the errors below"),
        ],
        widget=forms.CheckboxSelectMultiple,
        required=False,
        help_text="Ways to corrupt a good answer; none ticked: all that apply.",
    )
    planted_errors = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 5}),
        required=False,
        max_length=20_000,
        help_text=(
            "One per line: 'find => replace' swaps a word or phrase (e.g. 'boiling => freezing'),"
            " anything else is inserted as a false statement. Lines starting with # are skipped."
        ),
    )
    source_name = forms.CharField(
        required=False,
        max_length=200,
        label="Only answers from source",
        help_text="The model whose answers are good enough to be the right answer; empty: any.",
    )
    seed = forms.IntegerField(required=False, help_text="For a reproducible draw.")


class RankingBuildForm(forms.Form):
    k = forms.IntegerField(
        min_value=3,
        max_value=9,
        initial=4,
        label="Outputs per ranking task (k)",
        help_text="One task of k randomly chosen candidates for each prompt with at least k.",
    )
    seed = forms.IntegerField(required=False, help_text="For a reproducible draw.")

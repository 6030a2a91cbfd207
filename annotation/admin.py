"""Django admin: an operator's window onto every model.

Writes that have rules go through the services, as everywhere else: a campaign's settings
through ``campaign_update`` (which adds or removes slots when the overlap changes), its status
through ``campaign_set_status`` (admin actions), members through ``membership_add`` /
``membership_remove`` (which keep the last admin). Items, comparisons, slots and judgments are
read-only here: editing them by hand would break the slot bookkeeping or rewrite what raters
said (judgments are append-only; PostgreSQL enforces it with a trigger).
"""

from __future__ import annotations

from typing import Any, cast

from django import forms
from django.contrib import admin, messages
from django.contrib.auth.models import AbstractBaseUser
from django.db.models import QuerySet
from django.forms import BaseInlineFormSet, ModelForm
from django.http import HttpRequest

from annotation.exceptions import AnnotationError
from annotation.models import (
    Campaign,
    CampaignStatus,
    Comparison,
    Completion,
    Critique,
    Judgment,
    Membership,
    Prompt,
    Ranking,
    RankingSlot,
    RankingTask,
    Slot,
    Source,
)
from annotation.services.campaigns import (
    EDITABLE_FIELDS,
    campaign_create,
    campaign_set_status,
    campaign_update,
    clean_option_list,
    membership_add,
    membership_remove,
)
from annotation.services.judgments import slots_reclaim_expired


class ReadOnlyAdmin(admin.ModelAdmin):
    """View and search only: no add, change or delete."""

    show_full_result_count = False  # no COUNT(*) over a big table on every filtered page

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


def _shorten(text: str, limit: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# -- campaigns and members ----------------------------------------------------------------------


class MembershipInline(admin.TabularInline):
    """Members are added and removed here; a membership is never edited in place (remove it
    and add the new role), so every change goes through the membership services."""

    model = Membership
    extra = 1
    fields = ("user", "role", "created_at")
    readonly_fields = ("created_at",)
    raw_id_fields = ("user",)

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class CampaignAdminForm(forms.ModelForm):
    """Checks the option lists as the service will, so a bad list is a form error, not a 500."""

    class Meta:
        model = Campaign
        fields = ("slug", *EDITABLE_FIELDS)

    def _clean_option_list(self, field: str) -> list[str]:
        try:
            return clean_option_list(self.cleaned_data.get(field), field=field)
        except AnnotationError as exc:
            raise forms.ValidationError(exc.message) from exc

    def clean_aspects(self) -> list[str]:
        return self._clean_option_list("aspects")

    def clean_reason_tags(self) -> list[str]:
        return self._clean_option_list("reason_tags")

    def clean_flag_options(self) -> list[str]:
        return self._clean_option_list("flag_options")


@admin.register(Campaign)
class CampaignAdmin(admin.ModelAdmin):
    form = CampaignAdminForm
    list_display = (
        "name",
        "slug",
        "status",
        "overlap",
        "lease_seconds",
        "critique_mode",
        "guidelines_version",
        "created_at",
    )
    list_filter = ("status", "critique_mode")
    search_fields = ("name", "slug")
    ordering = ("-created_at",)
    inlines = (MembershipInline,)
    readonly_fields = ("status", "guidelines_version", "created_by", "created_at", "updated_at")
    fieldsets = (
        (None, {"fields": ("name", "slug", "description", "status", "created_by")}),
        ("Guidelines", {"fields": ("guidelines", "guidelines_version")}),
        ("Assignment", {"fields": ("overlap", "lease_seconds", "gold_fraction")}),
        (
            "Form",
            {
                "fields": (
                    "strength_scale",
                    "aspects",
                    "reason_tags",
                    "flag_options",
                    "allow_tie",
                    "allow_both_bad",
                    "require_rationale",
                )
            },
        ),
        ("Critiques", {"fields": ("critique_mode", "critique_fraction")}),
        ("Times", {"fields": ("created_at", "updated_at")}),
    )
    actions = ("activate", "pause", "archive", "reclaim_expired_leases")

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> tuple[str, ...]:
        # The slug is in every URL of the campaign; it is chosen once.
        return (*self.readonly_fields, "slug") if obj is not None else self.readonly_fields

    def save_model(
        self, request: HttpRequest, obj: Campaign, form: ModelForm, change: bool
    ) -> None:
        if change:
            changed = {f: getattr(obj, f) for f in form.changed_data if f in EDITABLE_FIELDS}
            if changed:
                campaign_update(campaign=obj, **changed)
        else:
            values = {f: getattr(obj, f) for f in EDITABLE_FIELDS if f not in ("name",)}
            creator = cast(AbstractBaseUser, request.user)  # the admin site admits staff only
            created = campaign_create(creator=creator, name=obj.name, slug=obj.slug, **values)
            obj.pk = created.pk
            obj._state.adding = False
        obj.refresh_from_db()

    def save_formset(
        self, request: HttpRequest, form: ModelForm, formset: BaseInlineFormSet, change: bool
    ) -> None:
        if formset.model is not Membership:
            super().save_formset(request, form, formset, change)
            return
        campaign = form.instance
        new_members = formset.save(commit=False)
        for membership in new_members:
            membership_add(campaign=campaign, user=membership.user, role=membership.role)
        for membership in formset.deleted_objects:
            try:
                membership_remove(campaign=campaign, user=membership.user, role=membership.role)
            except AnnotationError as exc:
                messages.error(request, exc.message)

    def _set_status(self, request: HttpRequest, queryset: QuerySet[Campaign], status: str) -> None:
        done = 0
        for campaign in queryset:
            try:
                campaign_set_status(campaign=campaign, status=status)
                done += 1
            except AnnotationError as exc:
                messages.warning(request, f"{campaign.name}: {exc.message}")
        if done:
            messages.success(request, f"{done} campaign(s) now {status}.")

    @admin.action(description="Activate (hand out work)")
    def activate(self, request: HttpRequest, queryset: QuerySet[Campaign]) -> None:
        self._set_status(request, queryset, CampaignStatus.ACTIVE)

    @admin.action(description="Pause (no new leases)")
    def pause(self, request: HttpRequest, queryset: QuerySet[Campaign]) -> None:
        self._set_status(request, queryset, CampaignStatus.PAUSED)

    @admin.action(description="Archive (final)")
    def archive(self, request: HttpRequest, queryset: QuerySet[Campaign]) -> None:
        self._set_status(request, queryset, CampaignStatus.ARCHIVED)

    @admin.action(description="Return expired leases to the pool")
    def reclaim_expired_leases(self, request: HttpRequest, queryset: QuerySet[Campaign]) -> None:
        freed = sum(slots_reclaim_expired(campaign=campaign) for campaign in queryset)
        messages.success(request, f"{freed} expired lease(s) returned to the pool.")


@admin.register(Membership)
class MembershipAdmin(admin.ModelAdmin):
    """Listed for search across campaigns; added and removed through the campaign page."""

    list_display = ("campaign", "user", "role", "created_at")
    list_filter = ("role",)
    search_fields = ("user__username", "user__email", "campaign__name", "campaign__slug")
    list_select_related = ("campaign", "user")
    raw_id_fields = ("campaign", "user")

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def delete_model(self, request: HttpRequest, obj: Membership) -> None:
        try:
            membership_remove(campaign=obj.campaign, user=obj.user, role=obj.role)
        except AnnotationError as exc:
            messages.error(request, exc.message)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Membership]) -> None:
        for membership in queryset.select_related("campaign", "user"):
            self.delete_model(request, membership)


# -- sources and items --------------------------------------------------------------------------


@admin.register(Source)
class SourceAdmin(admin.ModelAdmin):
    list_display = ("name", "kind", "created_at")
    list_filter = ("kind",)
    search_fields = ("name",)

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # completions keep their source (PROTECT)


@admin.register(Prompt)
class PromptAdmin(ReadOnlyAdmin):
    list_display = ("id", "campaign", "external_id", "split", "first_message", "created_at")
    list_filter = ("split",)
    search_fields = ("external_id", "campaign__slug")
    list_select_related = ("campaign",)
    raw_id_fields = ("campaign",)

    @admin.display(description="Last user turn")
    def first_message(self, obj: Prompt) -> str:
        messages_ = obj.messages if isinstance(obj.messages, list) else []
        return _shorten(str(messages_[-1].get("content", ""))) if messages_ else ""


@admin.register(Completion)
class CompletionAdmin(ReadOnlyAdmin):
    list_display = ("id", "prompt", "source", "round_number", "external_id", "preview")
    list_filter = ("source__kind",)
    search_fields = ("external_id", "source__name")
    list_select_related = ("prompt", "source")
    raw_id_fields = ("prompt", "source")

    @admin.display(description="Text")
    def preview(self, obj: Completion) -> str:
        return _shorten(obj.text)


@admin.register(Critique)
class CritiqueAdmin(ReadOnlyAdmin):
    list_display = ("id", "completion", "critic", "preview", "created_at")
    search_fields = ("critic",)
    list_select_related = ("completion",)
    raw_id_fields = ("completion",)

    @admin.display(description="Text")
    def preview(self, obj: Critique) -> str:
        return _shorten(obj.text)


# -- the queue and the answers ------------------------------------------------------------------


@admin.register(Comparison)
class ComparisonAdmin(ReadOnlyAdmin):
    list_display = (
        "id",
        "campaign",
        "prompt",
        "completion_a",
        "completion_b",
        "judgments_wanted",
        "gold_choice",
        "priority",
    )
    list_filter = ("gold_choice",)
    search_fields = ("campaign__slug",)
    list_select_related = ("campaign", "prompt", "completion_a", "completion_b")
    raw_id_fields = ("campaign", "prompt", "completion_a", "completion_b")


@admin.register(Slot)
class SlotAdmin(ReadOnlyAdmin):
    list_display = (
        "id",
        "campaign",
        "comparison",
        "index",
        "status",
        "rater",
        "lease_expires_at",
        "left_is_a",
        "critique_shown",
        "filled_at",
    )
    list_filter = ("status", "critique_shown")
    search_fields = ("rater__username", "campaign__slug")
    list_select_related = ("campaign", "comparison", "rater")
    raw_id_fields = ("campaign", "comparison", "rater")


@admin.register(Judgment)
class JudgmentAdmin(ReadOnlyAdmin):
    """Append-only: viewable, never added, changed or deleted here."""

    list_display = (
        "id",
        "campaign",
        "comparison",
        "rater",
        "choice",
        "strength",
        "left_was_a",
        "critique_shown",
        "decision_ms",
        "guidelines_version",
        "created_at",
    )
    list_filter = ("choice", "critique_shown", "left_was_a")
    search_fields = ("rater__username", "idempotency_key", "campaign__slug")
    list_select_related = ("campaign", "comparison", "rater")
    raw_id_fields = ("campaign", "comparison", "slot", "rater")


# -- K-wise ranking -----------------------------------------------------------------------------


@admin.register(RankingTask)
class RankingTaskAdmin(ReadOnlyAdmin):
    list_display = ("id", "campaign", "prompt", "key", "judgments_wanted", "priority", "created_at")
    search_fields = ("campaign__slug", "key")
    list_select_related = ("campaign", "prompt")
    raw_id_fields = ("campaign", "prompt")


@admin.register(RankingSlot)
class RankingSlotAdmin(ReadOnlyAdmin):
    list_display = (
        "id",
        "campaign",
        "task",
        "index",
        "status",
        "rater",
        "lease_expires_at",
        "shown_order",
        "filled_at",
    )
    list_filter = ("status",)
    search_fields = ("rater__username", "campaign__slug")
    list_select_related = ("campaign", "task", "rater")
    raw_id_fields = ("campaign", "task", "rater")


@admin.register(Ranking)
class RankingAdmin(ReadOnlyAdmin):
    """Append-only: viewable, never added, changed or deleted here."""

    list_display = (
        "id",
        "campaign",
        "task",
        "rater",
        "order",
        "shown_order",
        "decision_ms",
        "guidelines_version",
        "created_at",
    )
    search_fields = ("rater__username", "idempotency_key", "campaign__slug")
    list_select_related = ("campaign", "task", "rater")
    raw_id_fields = ("campaign", "task", "slot", "rater")

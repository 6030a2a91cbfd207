"""The campaign-admin pages: who gets in, what each form changes, and what a bad input shows."""

from __future__ import annotations

import json

import pytest
from django.contrib.auth.models import Permission
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from django.urls import reverse

from annotation.models import (
    Campaign,
    CampaignStatus,
    Comparison,
    Judgment,
    Membership,
    Prompt,
    Role,
    Slot,
)
from annotation.services.judgments import judgment_submit, slot_lease_next
from tests.factories import CompletionFactory, MembershipFactory, PromptFactory, UserFactory

SLUG_ROUTES = [
    "campaign_detail",
    "campaign_edit",
    "campaign_members",
    "campaign_import",
    "campaign_build",
]


def url(name: str, campaign: Campaign | None = None) -> str:
    kwargs = {"slug": campaign.slug} if campaign is not None else {}
    return reverse(f"annotation:{name}", kwargs=kwargs)


def creator() -> object:
    user = UserFactory()
    user.user_permissions.add(Permission.objects.get(codename="add_campaign"))
    return user


def form_data(**overrides: object) -> dict[str, object]:
    data: dict[str, object] = {
        "name": "Helpful answers",
        "slug": "helpful",
        "description": "",
        "guidelines": "# Rules\n\nPick the better one.",
        "overlap": 3,
        "lease_seconds": 300,
        "strength_scale": 4,
        "aspects": "helpfulness\nharmlessness, honesty",
        "reason_tags": "clearer\nsafer",
        "flag_options": "unsafe\npii",
        "allow_tie": "on",
        "require_rationale": "on",
        "critique_mode": "experiment",
        "critique_fraction": 0.25,
        "gold_fraction": 0.1,
        "gold_overlap": 5,
        "agreement_fraction": 0.1,
        "agreement_overlap": 3,
        "screening_items": 3,
        "screening_min_accuracy": 0.75,
    }
    data.update(overrides)
    return {k: v for k, v in data.items() if v is not None}


def page_text(response) -> str:
    return response.content.decode()


# -- access -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SLUG_ROUTES)
@pytest.mark.parametrize(
    ("who", "status"),
    [("admin", 200), ("rater", 403), ("ml_staff", 403), ("other_admin", 404), ("outsider", 404)],
)
def test_admin_pages_are_for_the_campaigns_admins_only(world, client, name, who, status):
    client.force_login(getattr(world, who))
    assert client.get(url(name, world.campaign)).status_code == status


def test_a_superuser_acts_as_admin_everywhere(world, client):
    client.force_login(UserFactory(is_superuser=True))
    assert client.get(url("campaign_detail", world.other_campaign)).status_code == 200


@pytest.mark.parametrize("name", [*SLUG_ROUTES, "campaign_status"])
def test_anonymous_users_are_sent_to_log_in(world, client, name):
    response = client.get(url(name, world.campaign))
    assert response.status_code in (302, 405)
    if response.status_code == 302:
        assert response["Location"].startswith(reverse("login"))


def test_every_write_needs_a_csrf_token(world):
    client = Client(enforce_csrf_checks=True)
    client.force_login(world.admin)
    for name in [
        "campaign_edit",
        "campaign_members",
        "campaign_status",
        "campaign_import",
        "campaign_build",
    ]:
        assert client.post(url(name, world.campaign), {}).status_code == 403, name
    client.force_login(creator())
    assert client.post(url("campaign_create"), form_data()).status_code == 403
    assert not Campaign.objects.filter(slug="helpful").exists()


def test_status_changes_are_post_only(world, client):
    client.force_login(world.admin)
    assert client.get(url("campaign_status", world.campaign)).status_code == 405


# -- list and create ----------------------------------------------------------------------------


def test_list_shows_only_campaigns_the_user_administers(world, client):
    client.force_login(world.admin)
    text = page_text(client.get(url("campaign_list")))
    assert world.campaign.name in text
    assert world.other_campaign.name not in text
    assert url("campaign_create") not in text  # no permission to create

    client.force_login(world.rater)
    text = page_text(client.get(url("campaign_list")))
    assert world.campaign.name not in text


def test_creating_needs_the_add_campaign_permission(world, client):
    client.force_login(world.admin)
    assert client.get(url("campaign_create")).status_code == 403
    assert client.post(url("campaign_create"), form_data()).status_code == 403
    assert not Campaign.objects.filter(slug="helpful").exists()


def test_create_stores_every_option_as_a_draft_with_the_creator_as_admin(db, client):
    user = creator()
    client.force_login(user)
    assert url("campaign_create") in page_text(client.get(url("campaign_list")))

    response = client.post(url("campaign_create"), form_data())

    campaign = Campaign.objects.get(slug="helpful")
    assert response.status_code == 302
    assert response["Location"] == url("campaign_detail", campaign)
    assert campaign.status == CampaignStatus.DRAFT
    assert (campaign.overlap, campaign.lease_seconds, campaign.strength_scale) == (3, 300, 4)
    assert campaign.aspects == ["helpfulness", "harmlessness", "honesty"]
    assert campaign.reason_tags == ["clearer", "safer"]
    assert campaign.flag_options == ["unsafe", "pii"]
    assert (campaign.allow_tie, campaign.allow_both_bad, campaign.require_rationale) == (
        True,
        False,
        True,
    )
    assert (campaign.critique_mode, campaign.critique_fraction) == ("experiment", 0.25)
    assert campaign.gold_fraction == 0.1
    assert (campaign.gold_overlap, campaign.screening_items) == (5, 3)
    assert campaign.screening_min_accuracy == 0.75
    assert campaign.guidelines_version == 1
    assert Membership.objects.filter(campaign=campaign, user=user, role=Role.ADMIN).exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"slug": "new"}, "reserved"),
        ({"slug": "not a slug"}, "Enter a valid"),
        ({"overlap": 0}, "greater than or equal to 1"),
        ({"lease_seconds": 5}, "greater than or equal to 10"),
        ({"critique_fraction": 1.5}, "less than or equal to 1"),
        ({"critique_mode": "sometimes"}, "Select a valid choice"),
        ({"name": ""}, "This field is required"),
    ],
)
def test_create_rejects_bad_input_and_writes_nothing(db, client, overrides, message):
    client.force_login(creator())
    response = client.post(url("campaign_create"), form_data(**overrides))
    assert response.status_code == 400
    assert message in page_text(response)
    assert Campaign.objects.count() == 0


def test_create_with_a_taken_slug_shows_the_error(world, client):
    client.force_login(creator())
    response = client.post(url("campaign_create"), form_data(slug=world.campaign.slug))
    assert response.status_code == 400
    assert "already exists" in page_text(response)


# -- edit ---------------------------------------------------------------------------------------


def edit_data(campaign: Campaign, **overrides: object) -> dict[str, object]:
    data = form_data(
        name=campaign.name,
        slug=None,
        guidelines=campaign.guidelines,
        overlap=campaign.overlap,
        lease_seconds=campaign.lease_seconds,
        strength_scale=campaign.strength_scale,
        aspects="\n".join(campaign.aspects),
        reason_tags="\n".join(campaign.reason_tags),
        flag_options="\n".join(campaign.flag_options),
        allow_tie="on" if campaign.allow_tie else None,
        allow_both_bad="on" if campaign.allow_both_bad else None,
        require_rationale="on" if campaign.require_rationale else None,
        critique_mode=campaign.critique_mode,
        critique_fraction=campaign.critique_fraction,
        gold_fraction=campaign.gold_fraction,
        gold_overlap=campaign.gold_overlap,
        agreement_fraction=campaign.agreement_fraction,
        agreement_overlap=campaign.agreement_overlap,
        screening_items=campaign.screening_items,
        screening_min_accuracy=campaign.screening_min_accuracy,
    )
    data.update(overrides)
    return {k: v for k, v in data.items() if v is not None}


def test_editing_the_guidelines_bumps_their_version(world, client):
    client.force_login(world.admin)
    response = client.post(
        url("campaign_edit", world.campaign), edit_data(world.campaign, guidelines="New rules.")
    )
    assert response.status_code == 302
    world.campaign.refresh_from_db()
    assert world.campaign.guidelines == "New rules."
    assert world.campaign.guidelines_version == 2


def test_resubmitting_unchanged_guidelines_with_browser_line_endings_keeps_the_version(
    world, client
):
    world.campaign.guidelines = "Line one.\nLine two.\n"
    world.campaign.save()
    client.force_login(world.admin)
    data = edit_data(world.campaign, guidelines="Line one.\r\nLine two.\r\n", lease_seconds=900)
    assert client.post(url("campaign_edit", world.campaign), data).status_code == 302
    world.campaign.refresh_from_db()
    assert world.campaign.lease_seconds == 900
    assert world.campaign.guidelines_version == 1


def test_raising_the_overlap_adds_slots(world, client):
    client.force_login(world.admin)
    before = Slot.objects.filter(campaign=world.campaign).count()
    client.post(url("campaign_edit", world.campaign), edit_data(world.campaign, overlap=3))
    assert Slot.objects.filter(campaign=world.campaign).count() == before * 3


def test_edit_form_shows_the_current_settings(world, client):
    client.force_login(world.admin)
    text = page_text(client.get(url("campaign_edit", world.campaign)))
    assert "helpfulness\nharmlessness</textarea>" in text
    assert 'name="slug"' not in text  # the slug is fixed once created


def test_a_rater_cannot_edit(world, client):
    client.force_login(world.rater)
    response = client.post(
        url("campaign_edit", world.campaign), edit_data(world.campaign, overlap=5)
    )
    assert response.status_code == 403
    world.campaign.refresh_from_db()
    assert world.campaign.overlap == 1


# -- members ------------------------------------------------------------------------------------


def test_add_a_member_by_username_with_a_role(world, client):
    newcomer = UserFactory(username="newcomer")
    client.force_login(world.admin)
    response = client.post(
        url("campaign_members", world.campaign),
        {"action": "add", "username": "newcomer", "role": Role.ML_STAFF},
    )
    assert response.status_code == 302
    assert Membership.objects.filter(
        campaign=world.campaign, user=newcomer, role=Role.ML_STAFF
    ).exists()
    assert "newcomer" in page_text(client.get(url("campaign_members", world.campaign)))


def test_adding_an_unknown_username_says_so(world, client):
    client.force_login(world.admin)
    response = client.post(
        url("campaign_members", world.campaign),
        {"action": "add", "username": "nobody", "role": Role.RATER},
    )
    assert response.status_code == 400
    assert "No active user has this username." in page_text(response)


def test_remove_a_member(world, client):
    client.force_login(world.admin)
    client.post(
        url("campaign_members", world.campaign),
        {"action": "remove", "user_id": world.rater.pk, "role": Role.RATER},
    )
    assert not Membership.objects.filter(campaign=world.campaign, user=world.rater).exists()


def test_the_last_admin_cannot_be_removed(world, client):
    client.force_login(world.admin)
    response = client.post(
        url("campaign_members", world.campaign),
        {"action": "remove", "user_id": world.admin.pk, "role": Role.ADMIN},
        follow=True,
    )
    assert "at least one admin" in page_text(response)
    assert Membership.objects.filter(
        campaign=world.campaign, user=world.admin, role=Role.ADMIN
    ).exists()


def test_removing_members_of_another_campaign_is_impossible(world, client):
    client.force_login(world.admin)
    client.post(
        url("campaign_members", world.campaign),
        {"action": "remove", "user_id": world.other_admin.pk, "role": Role.ADMIN},
    )
    assert Membership.objects.filter(campaign=world.other_campaign, user=world.other_admin).exists()


# -- status -------------------------------------------------------------------------------------


def test_pause_resume_and_archive(world, client):
    client.force_login(world.admin)
    for target in ("paused", "active", "archived"):
        client.post(url("campaign_status", world.campaign), {"status": target})
        world.campaign.refresh_from_db()
        assert world.campaign.status == target


def test_a_forbidden_transition_shows_a_message_and_changes_nothing(world, client):
    world.campaign.status = CampaignStatus.ARCHIVED
    world.campaign.save()
    client.force_login(world.admin)
    response = client.post(
        url("campaign_status", world.campaign), {"status": "active"}, follow=True
    )
    assert "cannot become active" in page_text(response)
    world.campaign.refresh_from_db()
    assert world.campaign.status == CampaignStatus.ARCHIVED


def test_detail_offers_only_the_allowed_transitions(world, client):
    client.force_login(world.admin)
    text = page_text(client.get(url("campaign_detail", world.campaign)))
    assert ">Pause</button>" in text
    assert ">Resume</button>" not in text


# -- progress -----------------------------------------------------------------------------------


def test_progress_shows_campaign_and_rater_figures(world, client):
    slot = slot_lease_next(rater=world.rater, campaign=world.campaign)
    judgment_submit(
        rater=world.rater, campaign=world.campaign, slot_id=slot.pk, choice="tie", decision_ms=3000
    )
    client.force_login(world.admin)
    text = page_text(client.get(url("campaign_detail", world.campaign)))
    assert "<dt>Comparisons</dt><dd>3</dd>" in text
    assert "<dt>Filled</dt><dd>1</dd>" in text
    assert "<dt>Done</dt><dd>33.3%</dd>" in text
    assert world.rater.username in text
    assert "3000 ms" in text
    assert "<td>100%</td>" in text  # tie / both-bad rate
    assert url("campaign_export", world.campaign) + "?format=trl" in text


def test_htmx_poll_gets_only_the_progress_panel(world, client):
    client.force_login(world.admin)
    response = client.get(url("campaign_detail", world.campaign), headers={"HX-Request": "true"})
    text = page_text(response)
    assert text.lstrip().startswith('<section id="progress"')
    assert "<html" not in text


def test_untrusted_campaign_text_is_escaped_or_sanitised(world, client):
    world.campaign.name = '<script>alert("n")</script>'
    world.campaign.guidelines = (
        '<img src=x onerror=alert(1)> [x](javascript:alert(2)) <b hx-get="/">'
    )
    world.campaign.save()
    client.force_login(world.admin)
    text = page_text(client.get(url("campaign_detail", world.campaign)))
    assert '<script>alert("n")' not in text
    assert "&lt;script&gt;" in text
    assert "<img" not in text
    assert 'href="javascript:' not in text
    assert "<b hx-get" not in text


# -- import -------------------------------------------------------------------------------------


def upload(rows_or_bytes: list[dict] | bytes, name: str = "items.jsonl") -> SimpleUploadedFile:
    if isinstance(rows_or_bytes, bytes):
        data = rows_or_bytes
    else:
        data = b"".join(json.dumps(row).encode() + b"\n" for row in rows_or_bytes)
    return SimpleUploadedFile(name, data, content_type="application/jsonl")


def import_post(client, campaign, file, **fields):
    data = {"kind": "candidates", "source_name": "imported", "strategy": "all_pairs", "k": 1}
    data.update(fields)
    return client.post(url("campaign_import", campaign), {**data, "file": file})


def test_import_page_imports_candidates_and_builds_comparisons(world, client):
    client.force_login(world.admin)
    rows = [
        {"prompt": f"Q{n}?", "completions": ["one", "two", {"text": "three", "critique": "meh"}]}
        for n in range(3)
    ]
    before = Comparison.objects.filter(campaign=world.campaign).count()
    response = import_post(client, world.campaign, upload(rows))
    assert response.status_code == 302
    assert Comparison.objects.filter(campaign=world.campaign).count() == before + 9
    followed = client.get(response["Location"])
    assert "Imported 3 prompts, 9 completions, 3 critiques and 9 new comparisons." in page_text(
        followed
    )


def test_import_page_random_k_strategy(world, client):
    client.force_login(world.admin)
    rows = [{"prompt": f"Q{n}?", "completions": ["a", "b", "c", "d"]} for n in range(4)]
    before = Comparison.objects.filter(campaign=world.campaign).count()
    import_post(client, world.campaign, upload(rows), strategy="random_k", k=2, seed=7)
    assert Comparison.objects.filter(campaign=world.campaign).count() == before + 8


def test_a_bad_upload_lists_the_problems_by_line_and_writes_nothing(world, client):
    client.force_login(world.admin)
    data = (
        b'{"prompt": "fine", "completions": ["a", "b"]}\n'
        b'{"prompt": "<script>x</script>", "completions": "oops"}\n'
        b'{"prompt": "fine", "completions": ["a", "b"]\n'
    )
    before = Prompt.objects.count()
    response = import_post(client, world.campaign, upload(data))
    text = page_text(response)
    assert response.status_code == 400
    assert (
        "<td>2</td><td><code>completions</code></td><td>must be a list, not a string</td>" in text
    )
    assert "<td>3</td>" in text
    assert "Nothing was imported" in text
    assert Prompt.objects.count() == before


def test_an_upload_over_the_cap_is_dropped_before_it_is_stored(world, client, settings):
    settings.IMPORT_MAX_BYTES = 100
    client.force_login(world.admin)
    rows = [{"prompt": f"Q{n}?", "completions": ["a", "b"]} for n in range(20)]
    before = Prompt.objects.count()
    response = import_post(client, world.campaign, upload(rows))
    assert response.status_code == 400
    assert "The file is larger than 100 bytes." in page_text(response)
    assert Prompt.objects.count() == before


def test_import_into_an_archived_campaign_is_refused(world, client):
    world.campaign.status = CampaignStatus.ARCHIVED
    world.campaign.save()
    client.force_login(world.admin)
    response = import_post(client, world.campaign, upload([{"prompt": "Q", "completions": ["a"]}]))
    assert response.status_code == 400
    assert "archived" in page_text(response)


def test_a_rater_cannot_import(world, client):
    client.force_login(world.rater)
    before = Prompt.objects.count()
    response = import_post(client, world.campaign, upload([{"prompt": "Q", "completions": ["a"]}]))
    assert response.status_code == 403
    assert Prompt.objects.count() == before


# -- build --------------------------------------------------------------------------------------


def test_build_pairs_candidates_that_have_no_comparisons_yet(world, client):
    prompt = PromptFactory(campaign=world.campaign)
    for _ in range(4):
        CompletionFactory(prompt=prompt)
    client.force_login(world.admin)
    response = client.post(
        url("campaign_build", world.campaign), {"strategy": "all_pairs", "k": 1}, follow=True
    )
    assert "Built 6 new comparisons." in page_text(response)
    assert Comparison.objects.filter(prompt=prompt).count() == 6
    again = client.post(
        url("campaign_build", world.campaign), {"strategy": "all_pairs", "k": 1}, follow=True
    )
    assert "Built 0 new comparisons." in page_text(again)


def test_build_rejects_a_bad_k(world, client):
    client.force_login(world.admin)
    response = client.post(url("campaign_build", world.campaign), {"strategy": "random_k", "k": 0})
    assert response.status_code == 400


def test_no_judgments_are_touched_by_admin_pages(world, client):
    # Judgments are append-only; nothing on these pages may rewrite them.
    slot = slot_lease_next(rater=world.rater, campaign=world.campaign)
    judgment_submit(rater=world.rater, campaign=world.campaign, slot_id=slot.pk, choice="a")
    before = list(Judgment.objects.values())
    client.force_login(world.admin)
    client.post(url("campaign_edit", world.campaign), edit_data(world.campaign, overlap=2))
    client.post(url("campaign_status", world.campaign), {"status": "paused"})
    assert list(Judgment.objects.values()) == before


def test_members_page_lists_roles(world, client):
    MembershipFactory(campaign=world.campaign, user=world.admin, role=Role.RATER)
    client.force_login(world.admin)
    text = page_text(client.get(url("campaign_members", world.campaign)))
    assert text.count(f"<td>{world.admin.username}</td>") == 2

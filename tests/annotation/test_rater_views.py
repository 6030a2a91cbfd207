"""The rater's pages through Django's test client: the card, submit, skip, roles, sessions."""

from __future__ import annotations

from datetime import timedelta
from html.parser import HTMLParser

import pytest
from django.contrib.auth import SESSION_KEY
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from annotation import selectors
from annotation.models import (
    CampaignStatus,
    Comparison,
    CritiqueMode,
    Judgment,
    Role,
    Slot,
    SlotStatus,
)
from annotation.services.campaigns import campaign_set_status
from annotation.services.items import PairSpec, comparisons_create, critique_create
from annotation.views import rater as rater_views
from tests.conftest import make_campaign
from tests.factories import (
    CampaignFactory,
    CompletionFactory,
    MembershipFactory,
    PromptFactory,
    SourceFactory,
    UserFactory,
)

HTMX = {"HX-Request": "true"}


class _Form(HTMLParser):
    """The judge form's hidden fields and which completion text sits in which column."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden: dict[str, str] = {}
        self.in_form = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "form" and "judge" in (a.get("class") or ""):
            self.in_form = True
        if self.in_form and tag == "input" and a.get("type") == "hidden":
            self.hidden[a["name"]] = a.get("value") or ""

    def handle_endtag(self, tag):
        if tag == "form":
            self.in_form = False


def card_fields(html: str) -> dict[str, str]:
    parser = _Form()
    parser.feed(html)
    assert "slot_id" in parser.hidden, "no comparison card on the page"
    return parser.hidden


def rate_url(campaign) -> str:
    return reverse("annotation:rate", kwargs={"slug": campaign.slug})


def submit_url(campaign) -> str:
    return reverse("annotation:rate_submit", kwargs={"slug": campaign.slug})


def skip_url(campaign) -> str:
    return reverse("annotation:rate_skip", kwargs={"slug": campaign.slug})


def rater_client(campaign, user=None) -> tuple[Client, object]:
    user = user or UserFactory()
    MembershipFactory(campaign=campaign, user=user, role=Role.RATER)
    client = Client()
    client.force_login(user)
    return client, user


def open_card(client, campaign) -> tuple[str, dict[str, str]]:
    response = client.get(rate_url(campaign))
    assert response.status_code == 200
    html = response.content.decode()
    return html, card_fields(html)


def answer(fields, **extra) -> dict[str, object]:
    data = {k: fields[k] for k in ("slot_id", "lease", "idempotency_key")}
    data.update(extra)
    return data


def positions(html: str, *texts: str) -> list[int]:
    found = [html.index(t) for t in texts]
    return found


# -- the card -------------------------------------------------------------------------------------


def _secret_campaign(**fields):
    """A campaign whose sources and critic have names a rater must never see."""
    campaign = CampaignFactory(critique_mode=CritiqueMode.ALWAYS, **fields)
    prompt = PromptFactory(
        campaign=campaign,
        messages=[
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "First question here"},
            {"role": "assistant", "content": "First answer here"},
            {"role": "user", "content": "Follow-up question here"},
        ],
    )
    x = CompletionFactory(
        prompt=prompt, source=SourceFactory(name="secret-model-alpha"), text="Reply from X."
    )
    y = CompletionFactory(
        prompt=prompt, source=SourceFactory(name="secret-model-beta"), text="Reply from Y."
    )
    critique_create(completion=x, critic="critic-model-gamma", text="X skips a step.")
    critique_create(completion=y, critic="critic-model-gamma", text="Y is fine.")
    comparisons_create(
        campaign=campaign,
        pairs=[PairSpec(prompt_id=prompt.pk, completion_x=x.pk, completion_y=y.pk)],
    )
    return campaign, x, y


def test_rate_page_shows_whole_conversation_both_outputs_and_critiques(db):
    campaign, _x, _y = _secret_campaign()
    client, _ = rater_client(campaign)
    html, _ = open_card(client, campaign)
    order = positions(
        html, "You are terse.", "First question here", "First answer here", "Follow-up question"
    )
    assert order == sorted(order), "the conversation is shown in order"
    for label in ("System", "User", "Assistant"):
        assert f'<div class="turn-role">{label}</div>' in html
    assert "Reply from X." in html
    assert "Reply from Y." in html
    assert "X skips a step." in html
    assert "Y is fine." in html
    assert Slot.objects.get(campaign=campaign, rater__isnull=False).critique_shown


def test_rate_page_never_names_a_model_source_or_critic(db):
    campaign, _x, _y = _secret_campaign()
    client, _ = rater_client(campaign)
    html, _ = open_card(client, campaign)
    for secret in ("secret-model-alpha", "secret-model-beta", "critic-model-gamma", "secret"):
        assert secret not in html
    # Nor which side is canonical A: the layout stays on the server.
    assert "left_is_a" not in html
    assert "completion_a" not in html


def test_outputs_follow_the_slot_layout(db):
    campaign, _x, _y = _secret_campaign()
    client, _ = rater_client(campaign)
    open_card(client, campaign)
    slot = Slot.objects.get(campaign=campaign, status=SlotStatus.LEASED)
    comparison = Comparison.objects.get(pk=slot.comparison_id)
    a_text = comparison.completion_a.text
    b_text = comparison.completion_b.text
    for left_is_a in (True, False):
        Slot.objects.filter(pk=slot.pk).update(left_is_a=left_is_a)
        html = client.get(rate_url(campaign)).content.decode()  # renews the same lease
        a_at, b_at = positions(html, a_text, b_text)
        assert (a_at < b_at) is left_is_a


def test_guidelines_are_rendered_markdown_with_their_version(db):
    campaign = make_campaign(comparisons=1, guidelines="Prefer **honest** answers.")
    campaign.guidelines_version = 7
    campaign.save()
    client, _ = rater_client(campaign)
    html, _ = open_card(client, campaign)
    assert "<strong>honest</strong>" in html
    assert "version 7" in html


def test_strength_is_hidden_when_the_campaign_does_not_ask_for_it(db):
    campaign = make_campaign(comparisons=1, strength_scale=0)
    client, _ = rater_client(campaign)
    html, _ = open_card(client, campaign)
    assert 'name="strength"' not in html
    campaign2 = make_campaign(comparisons=1, strength_scale=5)
    client2, _ = rater_client(campaign2)
    html2, _ = open_card(client2, campaign2)
    assert html2.count('name="strength"') == 5


def test_progress_counts_done_and_left_for_this_rater(db):
    campaign = make_campaign(comparisons=3)
    client, _ = rater_client(campaign)
    html, fields = open_card(client, campaign)
    assert "<strong>0</strong> done · <strong>3</strong> left" in html
    response = client.post(submit_url(campaign), answer(fields, choice="left"), headers=HTMX)
    assert "<strong>1</strong> done · <strong>2</strong> left" in response.content.decode()


def test_remaining_count_is_capped_and_counts_comparisons_not_slots(db, monkeypatch):
    campaign = make_campaign(comparisons=3, overlap=2)
    client, rater = rater_client(campaign)
    assert selectors.rater_remaining_count(rater=rater, campaign=campaign, cap=10) == (3, False)
    assert selectors.rater_remaining_count(rater=rater, campaign=campaign, cap=2) == (2, True)
    monkeypatch.setattr(rater_views, "REMAINING_CAP", 1)
    html, _ = open_card(client, campaign)
    # One held plus "at least one more": the page says so rather than guessing.
    assert "<strong>2+</strong> left" in html
    assert selectors.rater_remaining_count(rater=rater, campaign=campaign, cap=10) == (2, False)


# -- answering ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("left_is_a", "side", "expected"),
    [
        (True, "left", "a"),
        (True, "right", "b"),
        (False, "left", "b"),
        (False, "right", "a"),
        (False, "tie", "tie"),
        (True, "both_bad", "both_bad"),
    ],
)
def test_left_right_answer_is_stored_as_canonical_a_b(db, left_is_a, side, expected):
    campaign = make_campaign(comparisons=2, aspects=["accuracy"])
    client, rater = rater_client(campaign)
    _, fields = open_card(client, campaign)
    Slot.objects.filter(pk=fields["slot_id"]).update(left_is_a=left_is_a)
    aspect_side = "left" if side in ("tie", "both_bad") else side
    response = client.post(
        submit_url(campaign),
        answer(fields, choice=side, **{"aspect-0": aspect_side}),
        headers=HTMX,
    )
    assert response.status_code == 200
    judgment = Judgment.objects.get(rater=rater)
    assert judgment.choice == expected
    assert judgment.left_was_a is left_is_a
    expected_aspect = {"left": "a" if left_is_a else "b", "right": "b" if left_is_a else "a"}
    assert judgment.aspects == {"accuracy": expected_aspect[aspect_side]}


def test_submit_records_the_whole_answer_and_swaps_in_the_next_card(db):
    campaign = make_campaign(
        comparisons=2, strength_scale=3, reason_tags=["clearer"], flag_options=["unsafe"]
    )
    client, rater = rater_client(campaign)
    _, fields = open_card(client, campaign)
    response = client.post(
        submit_url(campaign),
        answer(
            fields,
            choice="left",
            strength="3",
            reason_tags=["clearer"],
            flags=["unsafe"],
            rationale="More precise.",
            decision_ms="4321",
        ),
        headers=HTMX,
    )
    assert response.status_code == 200
    html = response.content.decode()
    assert "<html" not in html, "an HTMX answer is a partial, not a page"
    assert "Saved." in html
    next_fields = card_fields(html)
    assert next_fields["slot_id"] != fields["slot_id"]
    assert next_fields["idempotency_key"] != fields["idempotency_key"]
    judgment = Judgment.objects.get(rater=rater)
    assert judgment.strength == 3
    assert judgment.reason_tags == ["clearer"]
    assert judgment.flags == ["unsafe"]
    assert judgment.rationale == "More precise."
    assert judgment.decision_ms == 4321
    assert judgment.guidelines_version == campaign.guidelines_version
    assert Slot.objects.get(pk=fields["slot_id"]).status == SlotStatus.FILLED


def test_strength_given_before_switching_to_tie_is_dropped_not_refused(db):
    campaign = make_campaign(comparisons=1, strength_scale=3)
    client, rater = rater_client(campaign)
    _, fields = open_card(client, campaign)
    response = client.post(
        submit_url(campaign), answer(fields, choice="tie", strength="2"), headers=HTMX
    )
    assert response.status_code == 200
    assert Judgment.objects.get(rater=rater).strength is None


def test_double_submit_stores_one_row_and_returns_the_same_judgment(db):
    campaign = make_campaign(comparisons=3)
    client, rater = rater_client(campaign)
    _, fields = open_card(client, campaign)
    data = answer(fields, choice="right")
    first = client.post(submit_url(campaign), data, headers=HTMX)
    second = client.post(submit_url(campaign), data, headers=HTMX)
    assert first.status_code == second.status_code == 200
    assert Judgment.objects.filter(rater=rater).count() == 1
    assert "Already saved" in second.content.decode()
    # Both answers show the same next card: the replay did not lease another one.
    assert (
        card_fields(first.content.decode())["slot_id"]
        == card_fields(second.content.decode())["slot_id"]
    )
    assert Slot.objects.filter(campaign=campaign, rater=rater).count() == 2


def test_replayed_form_without_its_key_still_stores_one_row(db):
    campaign = make_campaign(comparisons=2)
    client, rater = rater_client(campaign)
    _, fields = open_card(client, campaign)
    data = answer(fields, choice="left", idempotency_key="")
    client.post(submit_url(campaign), data, headers=HTMX)
    response = client.post(submit_url(campaign), data, headers=HTMX)
    assert response.status_code == 200
    assert Judgment.objects.filter(rater=rater).count() == 1


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({}, "choice"),
        ({"choice": "sideways"}, "choice"),
        ({"choice": "left", "strength": "9"}, "strength"),
        ({"choice": "left", "strength": "lots"}, "strength"),
        ({"choice": "left", "reason_tags": ["not-a-tag"]}, "reason_tags"),
        ({"choice": "left", "aspect-0": "up"}, "aspects"),
        ({"choice": "left", "decision_ms": "-5"}, "decision_ms"),
    ],
)
def test_invalid_answer_gets_422_naming_the_field_and_stores_nothing(db, extra, field):
    campaign = make_campaign(comparisons=1, aspects=["accuracy"], strength_scale=3)
    client, _rater = rater_client(campaign)
    _, fields = open_card(client, campaign)
    response = client.post(submit_url(campaign), answer(fields, **extra), headers=HTMX)
    assert response.status_code == 422
    assert response["HX-Retarget"] == "#card-errors"
    html = response.content.decode()
    assert f'data-field="{field}"' in html
    assert "Not saved" in html
    assert not Judgment.objects.exists()
    assert Slot.objects.get(pk=fields["slot_id"]).status == SlotStatus.LEASED


def test_tie_refused_when_the_campaign_does_not_allow_it(db):
    campaign = make_campaign(comparisons=1, allow_tie=False)
    client, _ = rater_client(campaign)
    html, fields = open_card(client, campaign)
    assert 'value="tie"' not in html.split('name="choice"', 1)[1].split("</fieldset>", 1)[0]
    response = client.post(submit_url(campaign), answer(fields, choice="tie"), headers=HTMX)
    assert response.status_code == 422
    assert 'data-field="choice"' in response.content.decode()


def test_expired_lease_taken_by_someone_else_gets_a_clear_409(db):
    campaign = make_campaign(comparisons=1)
    client, rater = rater_client(campaign)
    _, fields = open_card(client, campaign)
    Slot.objects.filter(pk=fields["slot_id"]).update(
        lease_expires_at=timezone.now() - timedelta(seconds=1)
    )
    other_client, _other = rater_client(campaign)
    _, other_fields = open_card(other_client, campaign)
    assert other_fields["slot_id"] == fields["slot_id"], "the expired lease went back to the pool"
    response = client.post(submit_url(campaign), answer(fields, choice="left"), headers=HTMX)
    assert response.status_code == 409
    html = response.content.decode()
    assert "no longer yours" in html
    assert 'data-state="lease-lost"' in html
    assert not Judgment.objects.filter(rater=rater).exists()


def test_answer_on_a_card_whose_slot_was_leased_again_is_refused(db):
    """The slot expired and came back to this rater with new sides: the old card's 'left'
    must not be mapped with the new layout."""
    campaign = make_campaign(comparisons=1)
    client, _rater = rater_client(campaign)
    _, old = open_card(client, campaign)
    Slot.objects.filter(pk=old["slot_id"]).update(
        status=SlotStatus.OPEN, rater=None, leased_at=None, lease_expires_at=None
    )
    _, new = open_card(client, campaign)
    assert new["slot_id"] == old["slot_id"]
    assert new["lease"] != old["lease"]
    response = client.post(submit_url(campaign), answer(old, choice="left"), headers=HTMX)
    assert response.status_code == 409
    assert not Judgment.objects.exists()


def test_submit_for_a_slot_of_another_rater_is_refused(db):
    campaign = make_campaign(comparisons=2)
    client, _ = rater_client(campaign)
    other_client, _other = rater_client(campaign)
    _, theirs = open_card(other_client, campaign)
    response = client.post(submit_url(campaign), answer(theirs, choice="left"), headers=HTMX)
    assert response.status_code == 409
    assert not Judgment.objects.exists()


def test_non_htmx_submit_redirects_to_the_card(db):
    campaign = make_campaign(comparisons=2)
    client, rater = rater_client(campaign)
    _, fields = open_card(client, campaign)
    response = client.post(submit_url(campaign), answer(fields, choice="left"))
    assert response.status_code == 303
    assert response["Location"] == rate_url(campaign)
    assert Judgment.objects.filter(rater=rater).count() == 1
    page = client.get(rate_url(campaign)).content.decode()
    assert "Saved." in page  # the flash message


def test_empty_queue_gets_a_clear_message(db):
    campaign = make_campaign(comparisons=1)
    client, _ = rater_client(campaign)
    _, fields = open_card(client, campaign)
    response = client.post(submit_url(campaign), answer(fields, choice="left"), headers=HTMX)
    html = response.content.decode()
    assert 'data-state="empty"' in html
    assert "Nothing left to rate" in html
    page = client.get(rate_url(campaign))
    assert page.status_code == 200
    assert "Nothing left to rate" in page.content.decode()


def test_paused_campaign_gets_a_clear_message(db):
    campaign = make_campaign(comparisons=2)
    client, rater = rater_client(campaign)
    _, fields = open_card(client, campaign)
    campaign_set_status(campaign=campaign, status=CampaignStatus.PAUSED)
    # The answer in hand is still saved; the next card is not served.
    response = client.post(submit_url(campaign), answer(fields, choice="left"), headers=HTMX)
    assert response.status_code == 200
    html = response.content.decode()
    assert "Saved." in html
    assert 'data-state="paused"' in html
    assert Judgment.objects.filter(rater=rater).count() == 1
    page = client.get(rate_url(campaign))
    assert page.status_code == 409
    assert "not open for rating" in page.content.decode()


# -- skipping -------------------------------------------------------------------------------------


def test_skip_returns_the_slot_and_shows_another_comparison(db):
    campaign = make_campaign(comparisons=2)
    client, _rater = rater_client(campaign)
    _, first = open_card(client, campaign)
    response = client.post(skip_url(campaign), {"slot_id": first["slot_id"]}, headers=HTMX)
    assert response.status_code == 200
    second = card_fields(response.content.decode())
    assert second["slot_id"] != first["slot_id"]
    assert Slot.objects.get(pk=first["slot_id"]).status == SlotStatus.OPEN
    # Skipping the last one ends in an empty queue that offers the skipped ones again.
    response = client.post(skip_url(campaign), {"slot_id": second["slot_id"]}, headers=HTMX)
    html = response.content.decode()
    assert "You skipped 2 comparisons" in html
    response = client.post(skip_url(campaign), {"reset": "1"}, headers=HTMX)
    assert card_fields(response.content.decode())["slot_id"] in {
        first["slot_id"],
        second["slot_id"],
    }


def test_skip_with_a_bad_slot_id_just_shows_the_card(db):
    campaign = make_campaign(comparisons=1)
    client, _ = rater_client(campaign)
    open_card(client, campaign)
    response = client.post(skip_url(campaign), {"slot_id": "nope"}, headers=HTMX)
    assert response.status_code == 200
    card_fields(response.content.decode())


# -- roles and sessions ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("who", "status"),
    [("other_rater", 404), ("outsider", 404), ("admin", 403), ("ml_staff", 403)],
)
@pytest.mark.parametrize("method", ["get", "submit", "skip"])
def test_only_raters_of_the_campaign_can_rate(world, who, status, method):
    client = Client()
    client.force_login(getattr(world, who))
    campaign = world.campaign
    if method == "get":
        response = client.get(rate_url(campaign))
    elif method == "submit":
        response = client.post(submit_url(campaign), {"slot_id": "1", "choice": "left"})
    else:
        response = client.post(skip_url(campaign), {"slot_id": "1"})
    assert response.status_code == status
    assert not Slot.objects.filter(rater=getattr(world, who)).exists()
    assert not Judgment.objects.exists()


@pytest.mark.parametrize("path", ["rate", "submit", "skip"])
def test_anonymous_is_sent_to_log_in(world, path):
    client = Client()
    url = {"rate": rate_url, "submit": submit_url, "skip": skip_url}[path](world.campaign)
    response = client.get(url) if path == "rate" else client.post(url, {"slot_id": "1"})
    assert response.status_code == 302
    assert response["Location"] == f"/accounts/login/?next=/rate/{world.campaign.slug}/"


def test_lost_session_on_an_htmx_submit_redirects_the_whole_page_to_log_in(world):
    client = Client()
    client.force_login(world.rater)
    _, fields = open_card(client, world.campaign)
    client.post(reverse("logout"))
    response = client.post(submit_url(world.campaign), answer(fields, choice="left"), headers=HTMX)
    assert response.status_code == 200
    assert response["HX-Redirect"] == f"/accounts/login/?next=%2Frate%2F{world.campaign.slug}%2F"
    assert b"password" not in response.content.lower(), "no login form swapped into the card"
    assert not Judgment.objects.exists()
    htmx_get = client.get(rate_url(world.campaign), headers=HTMX)
    assert htmx_get.status_code == 200
    assert htmx_get["HX-Redirect"].startswith("/accounts/login/")


def test_mutations_need_a_csrf_token(world):
    client = Client(enforce_csrf_checks=True)
    client.force_login(world.rater)
    response = client.get(rate_url(world.campaign))
    fields = card_fields(response.content.decode())
    for url in (submit_url(world.campaign), skip_url(world.campaign)):
        assert client.post(url, answer(fields, choice="left"), headers=HTMX).status_code == 403
    assert not Judgment.objects.exists()
    token = response.cookies["csrftoken"].value
    ok = client.post(
        submit_url(world.campaign),
        answer(fields, choice="left"),
        headers={**HTMX, "X-CSRFToken": token},
    )
    assert ok.status_code == 200
    assert Judgment.objects.count() == 1


# -- query counts ---------------------------------------------------------------------------------


def _campaign_with(n: int):
    campaign = CampaignFactory(
        critique_mode=CritiqueMode.ALWAYS,
        aspects=[f"aspect {i}" for i in range(n)],
        reason_tags=[f"tag {i}" for i in range(n)],
        flag_options=[f"flag {i}" for i in range(n)],
    )
    prompt = PromptFactory(
        campaign=campaign,
        messages=[{"role": "user", "content": f"turn {i}"} for i in range(n)],
    )
    x, y = CompletionFactory(prompt=prompt), CompletionFactory(prompt=prompt)
    for completion in (x, y):
        for i in range(n):
            critique_create(completion=completion, critic=f"critic {i}", text=f"critique {i}")
    comparisons_create(
        campaign=campaign,
        pairs=[PairSpec(prompt_id=prompt.pk, completion_x=x.pk, completion_y=y.pk)],
    )
    return campaign


def _count_page_queries(campaign) -> tuple[int, str]:
    client, _ = rater_client(campaign)
    with CaptureQueriesContext(connection) as ctx:
        response = client.get(rate_url(campaign))
    assert response.status_code == 200
    return len(ctx.captured_queries), response.content.decode()


def test_rate_page_query_count_does_not_grow_with_critiques_aspects_or_turns(
    db, django_assert_max_num_queries
):
    small, _small_html = _count_page_queries(_campaign_with(1))
    big, big_html = _count_page_queries(_campaign_with(10))
    assert "critique 9" in big_html
    assert "aspect 9" in big_html
    assert small == big
    campaign = _campaign_with(10)
    client, _ = rater_client(campaign)
    with django_assert_max_num_queries(16):
        assert client.get(rate_url(campaign)).status_code == 200


def test_submit_query_count_is_bounded(db, django_assert_max_num_queries):
    campaign = _campaign_with(10)
    client, _ = rater_client(campaign)
    _, fields = open_card(client, campaign)
    with django_assert_max_num_queries(24):
        response = client.post(submit_url(campaign), answer(fields, choice="left"), headers=HTMX)
    assert response.status_code == 200


# -- home, log in, log out ------------------------------------------------------------------------


def test_home_lists_the_users_campaigns_with_roles_and_links(world):
    world.campaign.name = "Helpfulness round"
    world.campaign.save()
    MembershipFactory(campaign=world.campaign, user=world.rater, role=Role.ADMIN)
    client = Client()
    client.force_login(world.rater)
    html = client.get(reverse("annotation:home")).content.decode()
    assert "Helpfulness round" in html
    assert "Rater, Campaign admin" in html
    assert f'href="{rate_url(world.campaign)}"' in html
    assert f'href="/campaigns/{world.campaign.slug}/"' in html
    assert world.other_campaign.name not in html


def test_home_offers_no_rating_link_to_a_non_rater_or_for_a_paused_campaign(world):
    client = Client()
    client.force_login(world.admin)
    html = client.get(reverse("annotation:home")).content.decode()
    assert world.campaign.name in html
    assert rate_url(world.campaign) not in html
    campaign_set_status(campaign=world.campaign, status=CampaignStatus.PAUSED)
    client.force_login(world.rater)
    html = client.get(reverse("annotation:home")).content.decode()
    assert rate_url(world.campaign) not in html
    assert "Rating paused" in html


def test_home_needs_a_login(db):
    response = Client().get(reverse("annotation:home"))
    assert response.status_code == 302
    assert response["Location"].startswith("/accounts/login/")


def test_login_rotates_the_session_key_and_logout_ends_the_session(db):
    user = UserFactory(username="carol")
    client = Client()
    client.get(reverse("login"))
    session = client.session
    session["before-login"] = True
    session.save()
    before = session.session_key
    response = client.post(
        reverse("login"), {"username": "carol", "password": "correct-horse-battery"}
    )
    assert response.status_code == 302
    assert response["Location"] == reverse("annotation:home")
    after = client.session.session_key
    assert after != before
    assert client.session[SESSION_KEY] == str(user.pk)
    stolen = client.cookies["sessionid"].value
    assert client.post(reverse("logout")).status_code == 302
    replay = Client()
    replay.cookies["sessionid"] = stolen
    response = replay.get(reverse("annotation:home"))
    assert response.status_code == 302
    assert response["Location"].startswith("/accounts/login/")


def test_logout_needs_post(db):
    client = Client()
    client.force_login(UserFactory())
    assert client.get(reverse("logout")).status_code == 405


def test_repeated_failed_logins_lock_out_with_a_clear_429_page(db, settings):
    UserFactory(username="dave")
    client = Client()
    for _ in range(settings.AXES_FAILURE_LIMIT - 1):
        response = client.post(reverse("login"), {"username": "dave", "password": "wrong-guess"})
        assert response.status_code == 200
        assert "enter a correct username and password" in response.content.decode()
    response = client.post(reverse("login"), {"username": "dave", "password": "wrong-guess"})
    assert response.status_code == 429
    # Even the right password is refused while locked out.
    response = client.post(
        reverse("login"), {"username": "dave", "password": "correct-horse-battery"}
    )
    assert response.status_code == 429
    html = response.content.decode()
    assert "Too many failed log-in attempts" in html
    assert "15 minutes" in html
    assert SESSION_KEY not in client.session

"""The rater API's hot path skips DRF serializers and the ORM's query compiler; these tests hold
it to the same answers as the slow path it replaced: the input check against the serializer,
the plain outputs against the output serializers, and the SQL helpers against the ORM."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.utils import timezone
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rest_framework.test import APIClient

from annotation import db
from annotation.api import (
    JudgmentSubmitApi,
    SlotLeaseApi,
    fast_judgment_input,
    judgment_as_seen,
)
from annotation.authentication import TokenAuthentication
from annotation.models import Critique, CritiqueMode, Judgment, Role, Slot, SlotStatus
from annotation.services.tokens import token_issue
from tests.conftest import make_campaign
from tests.factories import MembershipFactory, UserFactory

# Values near every edge the serializer checks: types, bounds, blanks, padding, NUL, surrogates.
texts = st.one_of(
    st.sampled_from(["", " ", "ok", " padded ", "x" * 60, "x" * 61, "a\x00b", "\ud800", "🙂"]),
    st.text(max_size=70),
)
ints = st.one_of(
    st.sampled_from([0, 1, -1, 2, True, False, 1.0, 1.5, "1", "x", None]),
    st.integers(-3, 10**6),
)
scalars = st.one_of(ints, texts, st.none())
tag_lists = st.one_of(st.lists(texts, max_size=3), st.lists(scalars, max_size=3), scalars)
aspect_maps = st.one_of(
    st.dictionaries(
        st.sampled_from(["helpful", "safe", ""]),
        st.sampled_from(["left", "right", "tie", "a", "both_bad", "", 1]),
        max_size=3,
    ),
    scalars,
)
bodies = st.fixed_dictionaries(
    {},
    optional={
        "slot": ints,
        "choice": st.sampled_from(["left", "right", "tie", "both_bad", "a", "b", "", 1, None]),
        "strength": ints,
        "aspects": aspect_maps,
        "reason_tags": tag_lists,
        "rationale": st.one_of(texts, st.just("y" * 5001), scalars),
        "flags": tag_lists,
        "decision_ms": ints,
        "idempotency_key": st.one_of(texts, st.just("k" * 65), scalars),
        "critique_verdicts": st.one_of(
            st.dictionaries(
                st.sampled_from(["1", "22", "x", ""]),
                st.sampled_from([True, False, "true", 1, None]),
                max_size=3,
            ),
            scalars,
        ),
        "unknown": scalars,
    },
)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=bodies)
def test_fast_input_check_accepts_only_what_the_serializer_accepts_unchanged(body):
    fast = fast_judgment_input(body)
    if fast is None:
        return  # the API then runs the serializer itself
    serializer = JudgmentSubmitApi.InputSerializer(data=body)
    assert serializer.is_valid(), (body, serializer.errors)
    assert fast == dict(serializer.validated_data)


def test_fast_input_check_takes_the_common_body():
    body = {
        "slot": 7,
        "choice": "left",
        "strength": 2,
        "aspects": {"helpful": "right"},
        "reason_tags": ["clearer"],
        "rationale": " kept as typed ",
        "flags": [],
        "decision_ms": 4200,
        "idempotency_key": "k-1",
    }
    assert fast_judgment_input(body) == body
    assert fast_judgment_input({"slot": 7, "choice": "tie"}) == {"slot": 7, "choice": "tie"}


@pytest.fixture
def rater_client(db):
    campaign = make_campaign(
        comparisons=2, critique_mode=CritiqueMode.ALWAYS, aspects=["helpful"], strength_scale=3
    )
    rater = UserFactory()
    MembershipFactory(campaign=campaign, user=rater, role=Role.RATER)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token_issue(user=rater).key}")
    return campaign, rater, client


def test_lease_and_submit_answers_match_their_output_serializers(rater_client):
    campaign, _, client = rater_client
    comparison = campaign.comparisons.first()
    Critique.objects.create(
        completion=comparison.completion_a,
        critic="critic-1",
        text="Misses a step.",
        spans=[{"start": 0, "end": 4}],
    )
    lease = client.post(f"/api/campaigns/{campaign.slug}/next/")
    assert lease.status_code == 200
    slot = Slot.objects.get(pk=lease.json()["slot"])
    expected = SlotLeaseApi.OutputSerializer(
        {
            **lease.json(),
            "lease_expires_at": slot.lease_expires_at,
        }
    ).data
    assert lease.json() == expected
    assert any(side["critiques"] for side in (lease.json()["left"], lease.json()["right"]))

    submit = client.post(
        f"/api/campaigns/{campaign.slug}/judgments/",
        {"slot": slot.pk, "choice": "left", "strength": 3, "aspects": {"helpful": "right"}},
        format="json",
    )
    assert submit.status_code == 201, submit.content
    judgment = Judgment.objects.get(slot=slot)
    seen = judgment_as_seen(judgment)
    by_serializer = JudgmentSubmitApi.OutputSerializer(
        {**seen, "slot_id": seen["slot"], "created_at": judgment.created_at}
    ).data
    assert submit.json() == by_serializer
    assert submit.json()["choice"] == "left"
    assert judgment.choice == ("a" if judgment.left_was_a else "b")
    assert submit.json()["aspects"] == {"helpful": "right"}


def test_token_user_carries_the_right_flags(db):
    user_model = get_user_model()
    staff = UserFactory(is_staff=True, is_superuser=False)
    boss = UserFactory(is_staff=False, is_superuser=True)
    for user in (staff, boss):
        loaded, token = TokenAuthentication().authenticate_credentials(token_issue(user=user).key)
        fresh = user_model.objects.get(pk=user.pk)
        assert (loaded.pk, loaded.username, loaded.is_active) == (fresh.pk, fresh.username, True)
        assert (loaded.is_staff, loaded.is_superuser) == (fresh.is_staff, fresh.is_superuser)
        assert token.user_id == user.pk
        # Fields the query left out still load on first use.
        assert loaded.email == fresh.email


def test_sql_helpers_round_trip_like_the_orm(rater_client):
    campaign, rater, _ = rater_client
    slot = Slot.objects.filter(campaign=campaign).first()
    # Field order differs from the model's on purpose: from_db needs model order.
    fields = ("left_is_a", "critique_shown", "rater_id", "status", "id")
    locked = db.get_for_update(Slot, attnames=fields, where={"id": slot.pk})
    assert locked is not None
    assert (locked.id, locked.status, locked.rater_id) == (slot.pk, slot.status, None)
    assert locked.left_is_a is slot.left_is_a
    assert db.get_for_update(Slot, attnames=fields, where={"id": -1}) is None

    now = timezone.now() - timedelta(minutes=1)
    changed = db.update_by_pk(
        Slot, slot.pk, status=SlotStatus.FILLED, rater_id=rater.pk, leased_at=now, filled_at=now
    )
    assert changed == 1
    slot.refresh_from_db()
    assert (slot.status, slot.rater_id, slot.filled_at) == (SlotStatus.FILLED, rater.pk, now)

    judgment = db.insert(
        Judgment(
            campaign=campaign,
            comparison_id=slot.comparison_id,
            slot_id=slot.pk,
            rater_id=rater.pk,
            choice="tie",
            aspects={"helpful": "tie"},
            reason_tags=["clearer"],
            left_was_a=True,
            guidelines_version=1,
        )
    )
    stored = Judgment.objects.get(pk=judgment.pk)
    assert stored.created_at == judgment.created_at is not None
    assert (stored.aspects, stored.reason_tags, stored.flags) == (
        {"helpful": "tie"},
        ["clearer"],
        [],
    )
    assert stored.critique_shown is False
    assert stored.left_was_a is True

"""Export through the streaming view: every line parses, counts match, roles are enforced, and
what was imported comes back out in the TRL fields."""

from __future__ import annotations

import io
import json
import random

import pytest
from django.http import StreamingHttpResponse
from django.urls import reverse

from annotation import selectors
from annotation.models import (
    Campaign,
    Comparison,
    Completion,
    Judgment,
    Membership,
    Prompt,
    Role,
    Slot,
    SlotStatus,
)
from annotation.services.imports import import_jsonl
from annotation.services.items import PairSpec, comparisons_create
from annotation.services.judgments import judgment_submit, slot_lease_next
from tests.factories import CampaignFactory, SourceFactory, UserFactory

CHOICES = ["a", "b", "a", "tie", "b", "both_bad"]


def export_url(campaign: Campaign, **params: str) -> str:
    url = reverse("annotation:campaign_export", kwargs={"slug": campaign.slug})
    return url + ("?" + "&".join(f"{k}={v}" for k, v in params.items()) if params else "")


def stream_lines(response) -> list[dict]:
    assert isinstance(response, StreamingHttpResponse)
    body = b"".join(response.streaming_content)
    assert body.endswith(b"\n")
    return [json.loads(line) for line in body.decode("utf-8").split("\n")[:-1]]


def judged_campaign(*, comparisons: int, overlap: int) -> tuple[Campaign, list]:
    """A campaign where every slot is filled: ``comparisons * overlap`` judgments, written in
    bulk (the submit path has its own tests; here only the export is under test)."""
    campaign = CampaignFactory(overlap=overlap)
    raters = [UserFactory() for _ in range(overlap)]
    source_x, source_y = SourceFactory(name="model-x"), SourceFactory(name="model-y")
    prompts = Prompt.objects.bulk_create(
        Prompt(
            campaign=campaign,
            messages=[{"role": "user", "content": f"Question {i}?"}],
            split="eval" if i % 4 == 0 else "train",
        )
        for i in range(comparisons)
    )
    completions = Completion.objects.bulk_create(
        Completion(prompt=p, source=source, text=f"{source.name} answers {p.pk}")
        for p in prompts
        for source in (source_x, source_y)
    )
    comparisons_create(
        campaign=campaign,
        pairs=(
            PairSpec(
                prompt_id=p.pk,
                completion_x=completions[2 * i].pk,
                completion_y=completions[2 * i + 1].pk,
            )
            for i, p in enumerate(prompts)
        ),
    )
    slots = list(Slot.objects.filter(campaign=campaign).order_by("id"))
    Judgment.objects.bulk_create(
        Judgment(
            campaign=campaign,
            comparison_id=slot.comparison_id,
            slot=slot,
            rater=raters[slot.index],
            choice=CHOICES[n % len(CHOICES)],
            strength=(n % 3) + 1 if CHOICES[n % len(CHOICES)] in ("a", "b") else None,
            left_was_a=n % 2 == 0,
            decision_ms=1000 + n,
            guidelines_version=1,
        )
        for n, slot in enumerate(slots)
    )
    for index, rater in enumerate(raters):
        Slot.objects.filter(campaign=campaign, index=index).update(
            status=SlotStatus.FILLED, rater=rater
        )
    return campaign, raters


def with_admin(campaign: Campaign) -> tuple[Campaign, object]:
    admin = UserFactory()
    Membership.objects.create(campaign=campaign, user=admin, role=Role.ADMIN)
    return campaign, admin


@pytest.fixture
def big(db):
    return with_admin(judged_campaign(comparisons=1500, overlap=2)[0])


@pytest.fixture
def small(db):
    return with_admin(judged_campaign(comparisons=40, overlap=2)[0])


def test_full_export_of_thousands_of_judgments_streams_every_line(
    big, client, django_assert_max_num_queries
):
    campaign, admin = big
    client.force_login(admin)
    response = client.get(export_url(campaign, format="full"))
    assert response.status_code == 200
    assert response["Content-Type"] == "application/x-ndjson; charset=utf-8"
    assert response["Content-Disposition"] == f'attachment; filename="{campaign.slug}-full.jsonl"'
    # Keyset pages of 2000: the cutoff, two pages and the empty page that ends the stream.
    with django_assert_max_num_queries(4):
        chunks = list(response.streaming_content)
    # Streamed in pieces of about 64 KiB, not built whole in memory and sent at once.
    assert len(chunks) > 10
    assert max(len(chunk) for chunk in chunks) < 64 * 1024 + 2048
    lines = [json.loads(line) for line in b"".join(chunks).decode().splitlines()]
    assert len(lines) == 3000 == Judgment.objects.filter(campaign=campaign).count()
    assert len({line["judgment_id"] for line in lines}) == 3000
    assert [line["judgment_id"] for line in lines] == sorted(line["judgment_id"] for line in lines)
    choices = [line["choice"] for line in lines]
    assert choices.count("tie") == choices.count("both_bad") == 500


def test_trl_export_skips_ties_and_both_bad_and_every_line_is_a_preference(big, client):
    campaign, admin = big
    client.force_login(admin)
    lines = stream_lines(client.get(export_url(campaign, format="trl")))
    decisive = Judgment.objects.filter(campaign=campaign, choice__in=("a", "b")).count()
    assert len(lines) == decisive == 2000
    for line in lines:
        assert set(line) == {"prompt", "chosen", "rejected", "margin", "weight"}
        assert 0.0 <= line["weight"] <= 1.0
        assert line["chosen"][0]["role"] == line["rejected"][0]["role"] == "assistant"
        assert line["chosen"] != line["rejected"]
        assert line["margin"] in (0.0, 1.0, 2.0)


def test_split_filter_exports_only_that_split(small, client):
    campaign, admin = small
    client.force_login(admin)
    response = client.get(export_url(campaign, format="full", split="eval"))
    assert (
        response["Content-Disposition"] == f'attachment; filename="{campaign.slug}-full-eval.jsonl"'
    )
    lines = stream_lines(response)
    assert {line["split"] for line in lines} == {"eval"}
    assert (
        len(lines)
        == Judgment.objects.filter(campaign=campaign, comparison__prompt__split="eval").count()
    )


def test_text_export_gives_hh_style_strings(small, client):
    campaign, admin = small
    client.force_login(admin)
    line = stream_lines(client.get(export_url(campaign, format="text")))[0]
    assert line["prompt"].startswith("\n\nHuman: Question ")
    assert line["prompt"].endswith("\n\nAssistant:")
    assert isinstance(line["chosen"], str)


def test_export_is_a_snapshot_of_judgments_at_its_start(db):
    campaign, _raters = judged_campaign(comparisons=3, overlap=1)
    stream = selectors.judgments_for_export(campaign=campaign, chunk_size=1)
    first = next(stream)
    extra_slot = Slot.objects.create(
        campaign=campaign, comparison=first.comparison, index=5, status=SlotStatus.OPEN
    )
    Judgment.objects.create(
        campaign=campaign,
        comparison=first.comparison,
        slot=extra_slot,
        rater=UserFactory(),
        choice="a",
        left_was_a=True,
        guidelines_version=1,
    )
    assert 1 + len(list(stream)) == 3


# -- who may export -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("who", "status"),
    [
        ("admin", 200),
        ("ml_staff", 200),
        ("rater", 403),
        ("other_admin", 404),
        ("other_rater", 404),
        ("outsider", 404),
    ],
)
def test_only_admins_and_ml_staff_of_the_campaign_can_export(world, client, who, status):
    client.force_login(getattr(world, who))
    assert client.get(export_url(world.campaign)).status_code == status


def test_anonymous_export_is_sent_to_log_in(world, client):
    response = client.get(export_url(world.campaign))
    assert response.status_code == 302
    assert "login" in response["Location"]


@pytest.mark.parametrize("params", [{"format": "csv"}, {"split": "test"}])
def test_bad_format_or_split_is_a_400(world, client, params):
    client.force_login(world.admin)
    assert client.get(export_url(world.campaign, **params)).status_code == 400


def test_export_is_get_only(world, client):
    client.force_login(world.admin)
    assert client.post(export_url(world.campaign)).status_code == 405


# -- round trip ---------------------------------------------------------------------------------


def test_imported_candidates_come_back_in_the_trl_fields(db, client):
    campaign = CampaignFactory(overlap=2, strength_scale=3)
    conversation = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy? ✓ «ok» \u2028 line"},
    ]
    rows = [
        {
            "prompt": conversation,
            "completions": [
                {"text": "Rome.", "source": "good"},
                {"text": "Milan.", "source": "bad"},
            ],
        },
        {
            "prompt": "2+2?",
            "completions": [{"text": "4", "source": "good"}, {"text": "5", "source": "bad"}],
        },
    ]
    data = b"".join(json.dumps(row).encode() + b"\n" for row in rows)
    import_jsonl(campaign=campaign, stream=io.BytesIO(data), kind="candidates")

    raters = [UserFactory(), UserFactory()]
    for strength, rater in zip((3, 1), raters, strict=True):
        while (slot := slot_lease_next(rater=rater, campaign=campaign)) is not None:
            comparison = Comparison.objects.select_related("completion_a").get(
                pk=slot.comparison_id
            )
            good_is_a = comparison.completion_a.source.name == "good"
            judgment_submit(
                rater=rater,
                campaign=campaign,
                slot_id=slot.pk,
                choice="a" if good_is_a else "b",
                strength=strength,
            )
    admin = UserFactory()
    Membership.objects.create(campaign=campaign, user=admin, role=Role.ML_STAFF)
    client.force_login(admin)

    lines = stream_lines(client.get(export_url(campaign, format="trl")))
    assert len(lines) == 4
    got = sorted(
        (
            json.dumps(line["prompt"]),
            line["chosen"][0]["content"],
            line["rejected"][0]["content"],
            line["margin"],
        )
        for line in lines
    )
    expected = sorted(
        (json.dumps(messages), good, bad, margin)
        for messages, good, bad in (
            (conversation, "Rome.", "Milan."),
            ([{"role": "user", "content": "2+2?"}], "4", "5"),
        )
        for margin in (2.0, 0.0)
    )
    assert got == expected

    full = stream_lines(client.get(export_url(campaign, format="full")))
    assert {line["rater"] for line in full} == {r.username for r in raters}
    assert all(
        {line["completion_a"]["source"], line["completion_b"]["source"]} == {"good", "bad"}
        for line in full
    )


# -- Dawid-Skene weight per line ----------------------------------------------------------------


def spammed_campaign() -> Campaign:
    """Two careful raters ("careful-a", "careful-b") and a random clicker ("spammer") on the
    same 30 comparisons, through the lease and submit services; the truth alternates a, b."""
    campaign = CampaignFactory(overlap=3)
    source = SourceFactory(name="model-w")
    pairs = []
    for i in range(30):
        prompt = Prompt.objects.create(
            campaign=campaign, messages=[{"role": "user", "content": f"Q{i}"}]
        )
        x = Completion.objects.create(prompt=prompt, source=source, text=f"first {i}")
        y = Completion.objects.create(prompt=prompt, source=source, text=f"second {i}")
        pairs.append(PairSpec(prompt_id=prompt.pk, completion_x=x.pk, completion_y=y.pk))
    comparisons_create(campaign=campaign, pairs=pairs)
    truth = {
        c.pk: "a" if n % 2 == 0 else "b"
        for n, c in enumerate(Comparison.objects.filter(campaign=campaign).order_by("id"))
    }
    careful = [UserFactory(username="careful-a"), UserFactory(username="careful-b")]
    spammer = UserFactory(username="spammer")
    rng = random.Random(7)
    for rater in [*careful, spammer]:
        while (slot := slot_lease_next(rater=rater, campaign=campaign, rng=rng)) is not None:
            choice = (
                rng.choice(["a", "b", "tie", "both_bad"])
                if rater is spammer
                else truth[slot.comparison_id]
            )
            judgment_submit(rater=rater, campaign=campaign, slot_id=slot.pk, choice=choice)
    return campaign


def test_full_and_trl_lines_carry_the_raters_weight_lower_for_a_spammer(db, client):
    campaign = spammed_campaign()
    _, admin = with_admin(campaign)
    client.force_login(admin)

    full = stream_lines(client.get(export_url(campaign, format="full")))

    assert len(full) == 90
    by_rater: dict[str, set[float]] = {}
    for line in full:
        by_rater.setdefault(line["rater"], set()).add(line["weight"])
    # One weight per rater (computed once per export), rounded to 4 places, in [0, 1].
    assert all(len(weights) == 1 for weights in by_rater.values())
    weight = {name: weights.pop() for name, weights in by_rater.items()}
    assert all(0.0 <= w <= 1.0 and round(w, 4) == w for w in weight.values())
    assert weight["spammer"] < 0.2 < 0.6 < min(weight["careful-a"], weight["careful-b"])

    trl = stream_lines(client.get(export_url(campaign, format="trl")))
    assert {line["weight"] for line in trl} <= set(weight.values())
    assert all(
        "weight" not in line
        for line in stream_lines(client.get(export_url(campaign, format="text")))
    )


def test_api_export_carries_the_same_weights_as_the_page_export(db, client):
    from rest_framework.test import APIClient

    campaign = spammed_campaign()
    _, admin = with_admin(campaign)
    client.force_login(admin)
    page = stream_lines(client.get(export_url(campaign, format="full")))
    api = APIClient()
    api.force_authenticate(admin)
    response = api.get(f"/api/campaigns/{campaign.slug}/export/?format=full")
    lines = [json.loads(line) for line in b"".join(response.streaming_content).splitlines()]
    assert [(x["judgment_id"], x["weight"]) for x in lines] == [
        (x["judgment_id"], x["weight"]) for x in page
    ]


def test_weights_are_computed_before_the_stream_and_do_not_add_queries_per_line(
    small, client, django_assert_max_num_queries
):
    campaign, admin = small
    client.force_login(admin)
    response = client.get(export_url(campaign, format="trl"))
    # The cutoff, one page and the empty page: the weights were read before streaming.
    with django_assert_max_num_queries(3):
        lines = stream_lines(response)
    assert lines
    assert all("weight" in line for line in lines)
